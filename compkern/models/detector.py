"""The shapes world's detector: ``ShapeDetector`` (a small CNN: which of the nine objects an
image (B, 3, 16, 16) holds, and how many) and ``score_samples``, the reading of its outputs as
per-sample outcomes (success / missing / swapped_or_duplicated). Trained by
``compkern.train.detector.train_detector``."""
from __future__ import annotations

import torch

from compkern.data.shapes import IMAGE_SIZE, MAX_OBJECTS, OBJECTS

__all__ = ["DETECTION_THRESHOLD", "OUTCOMES", "ShapeDetector", "score_samples"]


class ShapeDetector(torch.nn.Module):
    """A small CNN with BatchNorm: images (B, 3, 16, 16) in [-1, 1] -> (presence logits (B, 9),
    count logits (B, MAX_OBJECTS + 1)). Trained on ``random_scenes`` renders (with pixel noise and
    blur so that imperfect generated samples stay in distribution)."""

    def __init__(self, width: int = 24):
        super().__init__()
        c = width
        block = lambda i, o: [torch.nn.Conv2d(i, o, 3, padding=1), torch.nn.BatchNorm2d(o), torch.nn.ReLU()]  # noqa: E731
        self.features = torch.nn.Sequential(*block(3, c), *block(c, c), torch.nn.MaxPool2d(2),
                                            *block(c, 2 * c), *block(2 * c, 2 * c), torch.nn.MaxPool2d(2),
                                            *block(2 * c, 2 * c), torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten())
        self.presence = torch.nn.Linear(2 * c, len(OBJECTS))
        self.count = torch.nn.Linear(2 * c, MAX_OBJECTS + 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dim() != 4 or images.shape[1:] != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"images must be (B, 3, {IMAGE_SIZE}, {IMAGE_SIZE}), got {tuple(images.shape)}")
        h = self.features(images)
        return self.presence(h), self.count(h)


OUTCOMES = ("success", "missing", "swapped_or_duplicated")
DETECTION_THRESHOLD = 0.7  # the paper's confidence threshold for "object present"


@torch.no_grad()
def score_samples(detector: ShapeDetector, images: torch.Tensor, prompts: list[tuple[int, ...]],
                  threshold: float = DETECTION_THRESHOLD) -> dict[str, torch.Tensor]:
    """images (B, 3, 16, 16), prompts (B object tuples) -> per-sample outcome masks (B,) bool:

    - success: every prompt object detected with confidence > threshold (the paper's criterion);
    - missing: not a success and the detector counts fewer objects than the prompt names (an
      object was dropped: "catastrophic neglect");
    - swapped_or_duplicated: not a success although enough objects are present (attributes
      swapped or leaked, or an object drawn twice).
    Also returns ``confidence`` (B, K = max objects per prompt; 1 past a prompt's end),
    ``detected`` (B, K) bool (confidence > threshold; False past a prompt's end) and ``count`` (B,)."""
    if images.shape[0] != len(prompts):
        raise ValueError(f"images ({images.shape[0]}) and prompts ({len(prompts)}) must have the same length")
    detector.eval()
    pl, cl = detector(images.clamp(-1, 1).float())
    prob = pl.sigmoid()
    count = cl.argmax(1)
    K = max(len(p) for p in prompts)
    conf = torch.ones(len(prompts), K)
    need = torch.zeros(len(prompts), dtype=torch.long)
    for i, p in enumerate(prompts):
        need[i] = len(p)
        conf[i, :len(p)] = prob[i, list(p)]
    hit = conf > threshold
    success = hit.all(1)
    missing = ~success & (count < need)
    named = torch.arange(K) < need.unsqueeze(1)
    return {"success": success, "missing": missing, "swapped_or_duplicated": ~success & ~missing,
            "confidence": conf, "detected": hit & named, "count": count}
