"""Training of the shapes world's detector (``compkern.models.detector.ShapeDetector``) on fresh
procedural renders (``compkern.data.shapes.random_scenes``)."""
from __future__ import annotations

import torch

from compkern.data.shapes import random_scenes
from compkern.models.detector import ShapeDetector

__all__ = ["augment", "train_detector"]


def augment(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Detector augmentation: random per-image pixel noise (std up to 0.3), slight color scaling,
    and a light blur on half the images."""
    B = images.shape[0]
    std = torch.rand(B, 1, 1, 1, generator=generator) * 0.3
    scale = 0.8 + 0.4 * torch.rand(B, 3, 1, 1, generator=generator)
    x = (images + 1) * scale - 1 + std * torch.randn(images.shape, generator=generator)
    k = torch.tensor([0.25, 0.5, 0.25])
    blur = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"),
                                      (k[:, None] * k[None, :]).expand(3, 1, 3, 3), groups=3)
    use = torch.rand(B, 1, 1, 1, generator=generator) < 0.5
    return torch.where(use, blur, x).clamp(-1.5, 1.5)


def train_detector(steps: int = 1200, batch: int = 64, seed: int = 0, lr: float = 2e-3, progress: bool = True
                   ) -> tuple[ShapeDetector, dict[str, float]]:
    """Trains a ``ShapeDetector`` on fresh procedural renders; returns it (eval mode) and its
    held-out accuracy {"presence_acc": per-image all-9-labels-right rate, "count_acc": ...}."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    det = ShapeDetector()
    opt = torch.optim.AdamW(det.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    det.train()
    for _ in tqdm(range(steps), desc="detector", disable=not progress):
        x, present, n = random_scenes(batch, g)
        pl, cl = det(augment(x, g))
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(pl, present)
                + torch.nn.functional.cross_entropy(cl, n))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    det.eval()
    gv = torch.Generator().manual_seed(seed + 12345)
    with torch.no_grad():
        x, present, n = random_scenes(2000, gv)
        pl, cl = det(augment(x, gv))
    return det, {"presence_acc": float(((pl.sigmoid() > 0.5).float() == present).all(1).float().mean()),
                 "count_acc": float((cl.argmax(1) == n).float().mean())}
