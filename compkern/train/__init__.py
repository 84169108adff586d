"""Trainers: the shared loop, CoInD, Separate-and-Enhance."""
from compkern.train.loop import Trainer

__all__ = ["Trainer"]
