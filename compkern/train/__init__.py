"""Trainers: the shared loop (loop), CoInD (coind), Separate-and-Enhance (sepen), the positions
models (positions), the shapes detector (detector), the 2-D toy DDPMs (toy_ddpm, denoise)."""
from compkern.train.loop import Trainer

__all__ = ["Trainer"]
