"""AttributeClassifier: the real-image attribute classifier behind CoInD's conformity score
(trained by ``compkern.train.coind.train_attribute_classifier``)."""
from __future__ import annotations

from typing import Sequence

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

__all__ = ["AttributeClassifier"]


class AttributeClassifier(ModelMixin, ConfigMixin):
    """Small CNN, one head per attribute: x (N, C, H, W) -> list of A logits (N, n_values[a])."""

    @register_to_config
    def __init__(self, n_values: Sequence[int], in_channels: int = 3, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(), nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.SiLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.heads = nn.ModuleList(nn.Linear(8 * width, int(n)) for n in n_values)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.features(x)
        return [head(h) for head in self.heads]
