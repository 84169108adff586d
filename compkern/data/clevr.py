"""Procedural CLEVR-like position scenes (no download) and a training-free position detector.

A scene is a plain, softly lit floor (a vertical gradient with a per-scene brightness jitter) with
0..M shaded objects (spheres and cubes in six saturated colors). Positions are continuous
(x, y) in [0, 1]^2 (x to the right, y down; pixel centers at (i + 0.5) / size). Images are
(3, size, size) in [-1, 1].

Conditions are float rows (3,) = (x, y, mode), mode OBJECT (one object at (x, y)), BACKGROUND
(the empty scene: projective composition's base) or NULL (unconditional); see ``position_cond``.

The detector needs no training: it estimates the floor color as the per-channel median of the
image, marks pixels far from it, splits them into connected blobs and matches blob centroids to
the requested positions one to one (Hungarian). A scene is correct when every requested position
is matched within ``threshold`` (normalized units): the accuracy of the composition papers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["OBJECT", "BACKGROUND", "NULL", "PALETTE", "position_cond", "background_cond", "null_cond",
           "render_scenes", "sample_positions", "training_batch", "Detection", "detect_objects", "position_accuracy"]

OBJECT, BACKGROUND, NULL = 0, 1, 2
LO, HI = 0.15, 0.85  # object centers lie in [LO, HI]^2
RADIUS = (0.09, 0.12)  # object radius range, normalized
PALETTE = torch.tensor([[0.85, 0.18, 0.15], [0.15, 0.35, 0.85], [0.15, 0.65, 0.25],
                        [0.90, 0.80, 0.15], [0.55, 0.20, 0.70], [0.10, 0.70, 0.75]])
FLOOR = torch.tensor([0.55, 0.55, 0.52])


def position_cond(xy: torch.Tensor) -> torch.Tensor:
    """xy (..., 2) positions in [0, 1] -> object conditions (..., 3)."""
    xy = torch.as_tensor(xy, dtype=torch.float32)
    if xy.shape[-1:] != (2,):
        raise ValueError(f"xy must have shape (..., 2), got {tuple(xy.shape)}")
    return torch.cat([xy, torch.full((*xy.shape[:-1], 1), float(OBJECT))], -1)


def background_cond() -> torch.Tensor:
    """(3,): the empty-scene condition."""
    return torch.tensor([0.0, 0.0, float(BACKGROUND)])


def null_cond() -> torch.Tensor:
    """(3,): the unconditional (null) condition."""
    return torch.tensor([0.0, 0.0, float(NULL)])


# -- rendering ------------------------------------------------------------------------------------
def render_scenes(positions: torch.Tensor, *, size: int = 32, valid: torch.Tensor | None = None,
                  radius: torch.Tensor | None = None, color: torch.Tensor | None = None,
                  shape: torch.Tensor | None = None, brightness: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """positions (B, M, 2) -> images (B, 3, size, size) in [-1, 1].

    valid (B, M) bool marks real objects (default all). Unset attributes are drawn with
    ``generator``: radius (B, M) in RADIUS, color (B, M) palette ids, shape (B, M) 0 sphere / 1 cube,
    brightness (B,) floor jitter in [-0.04, 0.04]. Objects lower in the image are drawn on top."""
    positions = torch.as_tensor(positions, dtype=torch.float32)
    if positions.dim() != 3 or positions.shape[-1] != 2:
        raise ValueError(f"positions must have shape (B, M, 2), got {tuple(positions.shape)}")
    if not isinstance(size, int) or size < 4:
        raise ValueError(f"size must be an int >= 4, got {size!r}")
    B, M, _ = positions.shape
    g = generator
    if valid is None:
        valid = torch.ones(B, M, dtype=torch.bool)
    if radius is None:
        radius = RADIUS[0] + (RADIUS[1] - RADIUS[0]) * torch.rand(B, M, generator=g)
    if color is None:
        color = torch.randint(0, len(PALETTE), (B, M), generator=g)
    if shape is None:
        shape = torch.randint(0, 2, (B, M), generator=g)
    if brightness is None:
        brightness = (torch.rand(B, generator=g) * 2 - 1) * 0.04
    u = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = u[:, None].expand(size, size), u[None, :].expand(size, size)
    img = (FLOOR[None, :, None, None] + brightness[:, None, None, None] + 0.08 * (yy - 0.5)[None, None]).expand(B, 3, size, size).clone()
    px = 1.0 / size  # one pixel, normalized
    order = torch.argsort(positions[..., 1], dim=1)  # far (top) first
    for j in range(M):
        idx = order[:, j]
        take = lambda a: a.gather(1, idx[:, None]).squeeze(1)  # noqa: E731
        cx, cy = take(positions[..., 0]), take(positions[..., 1])
        r, col, shp, ok = take(radius), PALETTE[take(color)], take(shape), take(valid)
        dx = (xx[None] - cx[:, None, None]) / r[:, None, None]  # (B, H, W), in radii
        dy = (yy[None] - cy[:, None, None]) / r[:, None, None]
        rp = (r / px)[:, None, None]  # radius in pixels
        # sphere: Lambert + specular from a light at the upper left
        d = torch.sqrt(dx ** 2 + dy ** 2)
        nz = torch.sqrt((1 - d ** 2).clamp_min(0))
        lam = ((-0.5 * dx - 0.6 * dy + 0.62 * nz) / 1.0).clamp_min(0)
        spec = ((-0.45 * dx - 0.55 * dy + 0.7 * nz).clamp_min(0)) ** 12
        a_sph = ((1 - d) * rp + 0.5).clamp(0, 1)
        shade_sph = 0.35 + 0.75 * lam
        # cube (front view): top face lighter, side darker, soft edges
        h = 0.85
        a_cub = ((h - torch.maximum(dx.abs(), dy.abs())) * rp + 0.5).clamp(0, 1)
        shade_cub = torch.where(dy < -0.35 * h, torch.full_like(dy, 1.05), torch.where(dx > 0.45 * h, 0.6, 0.82))
        cube = (shp == 1)[:, None, None]
        alpha = torch.where(cube, a_cub, a_sph) * ok[:, None, None]
        shade = torch.where(cube, shade_cub, shade_sph)
        spec = torch.where(cube, torch.zeros_like(spec), spec)
        obj = (col[:, :, None, None] * shade[:, None] + 0.5 * spec[:, None]).clamp(0, 1)
        img = img * (1 - alpha[:, None]) + obj * alpha[:, None]
    return img.clamp(0, 1) * 2 - 1


def sample_positions(batch: int, n_objects: int, *, min_dist: float = 0.3, generator: torch.Generator | None = None,
                     max_tries: int = 1000) -> torch.Tensor:
    """(batch, n_objects, 2) positions in [LO, HI]^2, pairwise at least ``min_dist`` apart
    (sequential placement with restarts; objects then do not touch)."""
    if n_objects < 0 or batch < 0:
        raise ValueError(f"batch and n_objects must be >= 0, got {batch}, {n_objects}")
    out = torch.empty(batch, n_objects, 2)
    for b in range(batch):
        for _ in range(max_tries):  # restarts
            pts: list[torch.Tensor] = []
            for _ in range(50 * max(n_objects, 1)):  # sequential placement
                if len(pts) == n_objects:
                    break
                q = LO + (HI - LO) * torch.rand(2, generator=generator)
                if all(float((q - p).norm()) >= min_dist for p in pts):
                    pts.append(q)
            if len(pts) == n_objects:
                if n_objects:
                    out[b] = torch.stack(pts)
                break
        else:
            raise RuntimeError(f"could not place {n_objects} objects {min_dist} apart in {max_tries} tries")
    return out


def training_batch(batch: int, *, size: int = 32, p_empty: float = 0.1,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One-object scenes (condition: its position) and, with probability ``p_empty``, empty scenes
    (condition: BACKGROUND). Returns (images (B, 3, size, size), conds (B, 3))."""
    pos = LO + (HI - LO) * torch.rand(batch, 1, 2, generator=generator)
    empty = torch.rand(batch, generator=generator) < p_empty
    x = render_scenes(pos, size=size, valid=~empty[:, None], generator=generator)
    cond = position_cond(pos[:, 0])
    cond[empty] = background_cond()
    return x, cond


# -- detection ------------------------------------------------------------------------------------
@dataclass
class Detection:
    """centers: list of (n_i, 2) arrays of blob centroids (normalized x, y), one per image."""

    centers: list


def detect_objects(images: torch.Tensor, *, diff_threshold: float = 0.12, min_area: float | None = None) -> Detection:
    """images (B, 3, H, W) in [-1, 1] -> blob centroids per image.

    A pixel is foreground when some channel differs from the image's median floor color by more
    than ``diff_threshold`` (in [0, 1] color units); blobs are 4-connected components of at least
    ``min_area`` pixels (default: a quarter of the smallest object's area)."""
    from scipy import ndimage

    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a tensor (B, 3, H, W), got {getattr(images, 'shape', type(images))}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images hold NaN or inf")
    B, _, H, W = images.shape
    img = ((images.detach().float().cpu() + 1) / 2).clamp(0, 1)
    floor = img.flatten(2).median(dim=2).values  # (B, 3)
    diff = (img - floor[:, :, None, None]).abs().amax(1).numpy()  # (B, H, W)
    if min_area is None:
        min_area = 0.25 * math.pi * (RADIUS[0] * H) ** 2
    structure = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)  # 4-connected
    centers = []
    for b in range(B):
        fg = diff[b] > diff_threshold
        lab, n = ndimage.label(fg, structure=structure)
        cs = []
        for i in range(1, n + 1):
            m = lab == i
            if m.sum() < min_area:
                continue
            ys, xs = np.nonzero(m)
            w = diff[b][ys, xs]  # centroid weighted by the difference from the floor
            cs.append((((xs * w).sum() / w.sum() + 0.5) / W, ((ys * w).sum() / w.sum() + 0.5) / H))
        centers.append(np.array(cs, dtype=np.float64).reshape(-1, 2))
    return Detection(centers)


def position_accuracy(images: torch.Tensor, positions: torch.Tensor, *, threshold: float = 0.1,
                      detection: Detection | None = None, **detect_kw) -> torch.Tensor:
    """images (B, 3, H, W), positions (B, n, 2) requested -> correct (B,) bool: every requested
    position matched one to one to a detected blob within ``threshold`` (normalized distance)."""
    from scipy.optimize import linear_sum_assignment

    positions = torch.as_tensor(positions, dtype=torch.float64)
    if positions.dim() != 3 or positions.shape[-1] != 2 or positions.shape[0] != images.shape[0]:
        raise ValueError(f"positions must have shape (B={images.shape[0]}, n, 2), got {tuple(positions.shape)}")
    det = detection or detect_objects(images, **detect_kw)
    out = torch.zeros(images.shape[0], dtype=torch.bool)
    for b, c in enumerate(det.centers):
        p = positions[b].numpy()
        if len(p) == 0:
            out[b] = True
            continue
        if len(c) < len(p):
            continue
        cost = np.linalg.norm(p[:, None, :] - c[None, :, :], axis=-1)
        r, k = linear_sum_assignment(cost)
        out[b] = bool((cost[r, k] <= threshold).all())
    return out
