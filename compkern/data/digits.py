"""Colored digits from scikit-learn's bundled handwritten digits (8x8, real handwriting).

Two attributes: digit (0 .. n_digits-1) and color (0 .. n_colors-1). An image is the gray stroke
intensity times the RGB color, in [-1, 1], at 16x16 (bilinear upscale of the 8x8 scan) or the
native 8x8. Colors are drawn per sample from the training support, so every step sees fresh
(digit image, color) pairs. Support masks are (n_digits, n_colors) bool:

- ``full_support``: every combination.
- ``partial_support``: the CoInD reference rule, digit d gets colors d and d + 1 (when they exist);
  for 5 digits x 5 colors that is 9 seen and 16 unseen combinations.

Any training support must cover every value of every attribute (``check_support_cover``);
otherwise a marginal is never seen and cannot be composed.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch.nn import functional as F

# distinguishable RGB colors in [0, 1]
COLORS = torch.tensor([
    [1.00, 0.20, 0.20],  # red
    [0.20, 0.85, 0.20],  # green
    [0.25, 0.45, 1.00],  # blue
    [1.00, 0.90, 0.10],  # yellow
    [0.85, 0.25, 1.00],  # magenta
    [0.10, 0.95, 0.95],  # cyan
    [1.00, 0.55, 0.05],  # orange
    [1.00, 1.00, 1.00],  # white
    [0.55, 0.30, 0.10],  # brown
    [0.50, 0.50, 0.50],  # gray
])


def full_support(n_digits: int, n_colors: int) -> torch.Tensor:
    return torch.ones(n_digits, n_colors, dtype=torch.bool)


def partial_support(n_digits: int, n_colors: int) -> torch.Tensor:
    """Digit d gets colors d and d + 1 (those < n_colors). Needs n_colors >= n_digits to cover."""
    m = torch.zeros(n_digits, n_colors, dtype=torch.bool)
    for d in range(n_digits):
        for c in (d, d + 1):
            if c < n_colors:
                m[d, c] = True
    return m


def check_support_cover(support: torch.Tensor) -> None:
    """Raise ValueError unless every digit and every color occurs in some seen combination."""
    if support.dtype != torch.bool or support.dim() != 2:
        raise TypeError("support must be a (n_digits, n_colors) bool tensor")
    missing_d = (~support.any(1)).nonzero().flatten().tolist()
    missing_c = (~support.any(0)).nonzero().flatten().tolist()
    if missing_d or missing_c:
        raise ValueError(f"support does not cover every attribute value: digits {missing_d}, colors {missing_c} never seen")


def load_gray_digits(n_digits: int = 5, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits 0 .. n_digits-1 -> (gray (N, 1, size, size) in [0, 1], digit (N,) int64)."""
    from sklearn.datasets import load_digits

    if size not in (8, 16):
        raise ValueError(f"size must be 8 (native) or 16 (bilinear upscale), got {size}")
    if not 1 <= n_digits <= 10:
        raise ValueError(f"n_digits must lie in [1, 10], got {n_digits}")
    d = load_digits()
    keep = d.target < n_digits
    gray = torch.tensor(d.images[keep], dtype=torch.float32).unsqueeze(1) / 16.0
    if size == 16:
        gray = F.interpolate(gray, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1)
    return gray, torch.tensor(d.target[keep], dtype=torch.long)


def colorize(gray: torch.Tensor, color: torch.Tensor) -> torch.Tensor:
    """gray (N, 1, H, W) in [0, 1], color ids (N,) -> RGB (N, 3, H, W) in [-1, 1]."""
    return (gray * COLORS[color][:, :, None, None]) * 2 - 1


class ColoredDigits:
    """One split of the colored digits. ``sample(batch)`` draws training pairs from ``support``;
    ``render(labels)`` draws real images of given (digit, color) labels (any combination, seen or
    not: the ground truth for evaluation)."""

    def __init__(self, *, size: int = 16, n_digits: int = 5, n_colors: int = 5,
                 support: Literal["full", "partial"] | torch.Tensor = "full",
                 split: Literal["train", "test", "all"] = "train", test_fraction: float = 0.2, split_seed: int = 0):
        if n_colors > len(COLORS):
            raise ValueError(f"n_colors must be <= {len(COLORS)}, got {n_colors}")
        if split not in ("train", "test", "all"):
            raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
        gray, digit = load_gray_digits(n_digits, size)
        perm = torch.randperm(len(digit), generator=torch.Generator().manual_seed(split_seed))
        n_test = int(round(test_fraction * len(digit)))
        idx = {"test": perm[:n_test], "train": perm[n_test:], "all": perm}[split]
        self.gray, self.digit = gray[idx], digit[idx]
        self.size, self.n_digits, self.n_colors = size, n_digits, n_colors
        if isinstance(support, str):
            if support not in ("full", "partial"):
                raise ValueError(f"support must be 'full', 'partial' or a bool mask, got {support!r}")
            support = (full_support if support == "full" else partial_support)(n_digits, n_colors)
        if tuple(support.shape) != (n_digits, n_colors):
            raise ValueError(f"support mask must be (n_digits, n_colors) = ({n_digits}, {n_colors}), got {tuple(support.shape)}")
        check_support_cover(support)
        self.support = support
        self._by_digit = [torch.nonzero(self.digit == d).flatten() for d in range(n_digits)]

    @property
    def n_values(self) -> list[int]:
        return [self.n_digits, self.n_colors]

    def seen(self) -> torch.Tensor:
        """(M, 2) int64 labels of the seen combinations."""
        return self.support.nonzero()

    def unseen(self) -> torch.Tensor:
        """(M, 2) int64 labels of the held-out combinations."""
        return (~self.support).nonzero()

    def sample(self, batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> x (batch, 3, H, W) in [-1, 1], labels (batch, 2) int64 (digit, color) from the support."""
        i = torch.randint(0, len(self.digit), (batch,), generator=generator)
        d = self.digit[i]
        color = torch.multinomial(self.support[d].float(), 1, generator=generator).squeeze(1)
        return colorize(self.gray[i], color), torch.stack([d, color], 1)

    def render(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """labels (N, 2) (digit, color), any combination -> real images (N, 3, H, W) of that digit
        (drawn from this split) in that color."""
        if labels.dim() != 2 or labels.shape[1] != 2:
            raise ValueError(f"labels must be (N, 2) (digit, color), got {tuple(labels.shape)}")
        pick = torch.empty(len(labels), dtype=torch.long)
        for d in range(self.n_digits):  # loop over the few digit values, not over images
            rows = (labels[:, 0] == d).nonzero().flatten()
            if len(rows):
                pool = self._by_digit[d]
                pick[rows] = pool[torch.randint(0, len(pool), (len(rows),), generator=generator)]
        return colorize(self.gray[pick], labels[:, 1])
