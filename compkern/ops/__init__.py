"""Public ops: one per file, each with argument checks, backend dispatch and autograd."""
from compkern.ops.attention import AttentionAccumulator, aggregate_attention, attention_losses
from compkern.ops.combine import combine_eps
from compkern.ops.lift import LiftPartial, lift_partial

__all__ = ["combine_eps", "lift_partial", "LiftPartial", "aggregate_attention", "attention_losses",
           "AttentionAccumulator"]
