"""Models: the EpsModel protocol, noise schedules, batched multi-condition evaluation, adapters."""
from compkern.models.base import EpsModel, evaluate_conditions, stack_conditions
from compkern.models.schedule import NoiseSchedule

__all__ = ["EpsModel", "NoiseSchedule", "evaluate_conditions", "stack_conditions"]
