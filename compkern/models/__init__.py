"""Models: the EpsModel protocol, noise schedules, batched multi-condition evaluation, adapters."""
from compkern.models.base import EpsModel, evaluate_conditions, stack_conditions
from compkern.models.schedule import NoiseSchedule

__all__ = ["EpsModel", "NoiseSchedule", "evaluate_conditions", "stack_conditions"]

# 2-D toy models (issue 6): class-conditional MLP and the RRR energy-parameterized wrapper.
from compkern.models.energy import EnergyEps, EnergyMLP, is_energy_model  # noqa: E402
from compkern.models.mlp import ConditionalMLP  # noqa: E402

__all__ += ["ConditionalMLP", "EnergyEps", "EnergyMLP", "is_energy_model"]

# Multi-object positions (issue 10): position-conditioned UNet, eps- and energy-parameterized.
from compkern.models.position_unet import PositionEnergyUNet, PositionUNet  # noqa: E402

__all__ += ["PositionEnergyUNet", "PositionUNet"]

# Multi-attribute conditioning (issue 8, CoInD): per-attribute null tokens, summed embeddings.
from compkern.models.attribute_unet import AttributeEmbedding, AttributeMLP, AttributeUNet  # noqa: E402

__all__ += ["AttributeEmbedding", "AttributeMLP", "AttributeUNet"]

# Stable Diffusion UNet adapter and SD 1.x folder loading (issue 9, SepEn); diffusers is imported lazily.
from compkern.models.unet import SDComponents, UNetEps  # noqa: E402

__all__ += ["SDComponents", "UNetEps"]
