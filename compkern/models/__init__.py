"""Models: the EpsModel protocol, noise schedules, batched multi-condition evaluation, and adapters
(2-D MLPs, the RRR energy wrapper, image UNets, the diffusers UNet2DConditionModel), and the
shapes world's models (models.shapes: text encoder and tiny text-to-image model; models.detector)."""
from compkern.models.attribute_unet import AttributeEmbedding, AttributeMLP, AttributeUNet
from compkern.models.base import EpsModel, evaluate_conditions, stack_conditions
from compkern.models.classifier import AttributeClassifier
from compkern.models.detector import ShapeDetector
from compkern.models.energy import EnergyEps, EnergyMLP, is_energy_model
from compkern.models.mlp import ConditionalMLP
from compkern.models.position_unet import PositionEnergyUNet, PositionUNet, position_schedule
from compkern.models.schedule import NoiseSchedule
from compkern.models.unet import SDComponents, UNetEps

__all__ = [
    "AttributeClassifier", "AttributeEmbedding", "AttributeMLP", "AttributeUNet", "ConditionalMLP", "EnergyEps", "EnergyMLP", "EpsModel",
    "NoiseSchedule", "PositionEnergyUNet", "PositionUNet", "SDComponents", "ShapeDetector", "UNetEps",
    "evaluate_conditions", "is_energy_model", "position_schedule", "stack_conditions",
]
