"""CompLift for images: per-pixel lift maps in latent space and the object acceptance rule.

Lift of component k at latent pixel (i, j), averaged over trials and latent channels:

    L_k(i, j) = mean_{t, c} [ (T - eps(x_t, c_0))^2 - (T - eps(x_t, c_k))^2 ](c, i, j)

T is the noise eps of a fresh trial x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps (``fresh_lift_maps``,
through compkern.lift.estimate_lift), or, for the cached trials recorded while sampling
(``cached_lift_maps``, no extra UNet row), the composed prediction eps(x_t, c_compose) =
eps_0 + sum_k s_k (eps_k - eps_0) with s_k = +1 / -1 (NOT): the variance-reduction target of the
CompLift paper, which its public text-to-image code uses for both variants.

Object rule (the CompLift text-to-image code): component k is present in an image when the number
of latent pixels with L_k > ``threshold`` reaches ``min_pixels``; the composition's expression then
combines the per-component decisions (AND: all present, NOT: absent). The public code swept
threshold in {0, 9e-5, ..., 1e-3} and the pixel count in {1, ..., 16384} and shows SDXL samples at
threshold 2e-4, 300 pixels (of 128 x 128) -- the defaults here. ``min_pixels`` below 1 is read as
a fraction of the latent pixels. Note: with a single positive component (K = 1) the composed
target equals eps_1, so the cached map is |eps_1 - eps_0|^2 >= 0 everywhere; use fresh trials there.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from compkern.ops import combine_eps, lift_partial
from compkern.samplers.composed import StepRecord

DEFAULT_THRESHOLD = 2e-4
DEFAULT_MIN_PIXELS = 300.0


@dataclass
class LiftMaps:
    """pixel_lift (K, B, h, w) fp32: lift per latent pixel (mean over trials and channels);
    lift (K, B): its spatial mean; n_trials; n_evals: UNet rows spent on scoring (0 when cached)."""

    pixel_lift: torch.Tensor
    n_trials: int
    n_evals: int

    @property
    def lift(self) -> torch.Tensor:
        return self.pixel_lift.mean(dim=(-2, -1))

    def min_count(self, min_pixels: float) -> float:
        """An absolute pixel count (values below 1 are fractions of the h x w latent pixels)."""
        if min_pixels < 0:
            raise ValueError(f"min_pixels must be >= 0 (a count, or a fraction below 1), got {min_pixels}")
        n = self.pixel_lift.shape[-1] * self.pixel_lift.shape[-2]
        return min_pixels * n if min_pixels < 1 else float(min_pixels)

    def counts(self, threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
        """(K, B) int64: latent pixels with lift above threshold."""
        return (self.pixel_lift > threshold).sum(dim=(-2, -1))

    def scores(self, threshold: float = DEFAULT_THRESHOLD, min_pixels: float = DEFAULT_MIN_PIXELS) -> torch.Tensor:
        """(K, B) fp32, positive exactly where component k is present (count >= min_pixels): the
        per-component input of ``Composition.accept``."""
        return self.counts(threshold).float() - (self.min_count(min_pixels) - 0.5)


def _check_finite(name: str, x: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} holds NaN or inf")


def composed_target(preds: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """preds (K+1, B, *S), signs (K,) -> eps_0 + sum_k signs_k (eps_k - eps_0), (B, *S)."""
    return combine_eps(preds, signs.to(device=preds.device, dtype=torch.float32))


@torch.no_grad()
def cached_lift_maps(record: StepRecord, signs: torch.Tensor, *, target: str = "composed",
                     latents: torch.Tensor | None = None, schedule=None, steps: slice | None = None,
                     chunk: int = 8) -> LiftMaps:
    """Lift maps from the predictions recorded while sampling, each step one trial, no UNet row.
    record.preds: S steps of (K+1, B, C, h, w); signs (K,): the composed-eps weights.

    target='composed': the composed prediction eps_0 + sum_k signs_k (eps_k - eps_0) (the
    paper's text-to-image variance reduction); target='noise': the noise recovered from x_t and
    the final ``latents`` through compkern.lift.estimate_lift's cached trials (needs ``schedule``)."""
    if record is None or len(record) == 0:
        raise ValueError("record must hold the steps of a sampling run made with record=True")
    preds_all = record.preds if steps is None else record.preds[steps]
    if not preds_all:
        raise ValueError(f"steps={steps} selects no recorded step of {len(record)}")
    if preds_all[0].dim() != 5:
        raise ValueError(f"recorded preds must be (K+1, B, C, h, w), got {tuple(preds_all[0].shape)}")
    K, C = preds_all[0].shape[0] - 1, preds_all[0].shape[2]
    signs = torch.as_tensor(signs, dtype=torch.float32).flatten()
    if signs.shape != (K,):
        raise ValueError(f"signs must have shape (K,) = ({K},), got {tuple(signs.shape)}")
    if target == "noise":
        from compkern.lift import estimate_lift

        if latents is None or schedule is None:
            raise ValueError("target='noise' needs the final latents (B, C, h, w) and the schedule")
        if steps is not None:
            record = StepRecord(record.x_t[steps], record.t[steps], record.preds[steps])
        res = estimate_lift(None, latents.float(), list(range(1, K + 1)), 0, schedule, n_trials=0, record=record,
                            pixel_map=True)
        pix = res.pixel_lift.float() / C
    elif target == "composed":
        total = None
        for s in range(0, len(preds_all), chunk):
            preds = torch.stack(preds_all[s:s + chunk])  # (T, K+1, B, C, h, w)
            tgt = torch.stack([composed_target(p, signs) for p in preds])
            part = lift_partial(tgt, preds, pixel_map=True)
            total = part if total is None else total + part
        pix = total.pixel_mean.float() / C
    else:
        raise ValueError(f"target must be 'composed' or 'noise', got {target!r}")
    _check_finite("pixel lift", pix)
    return LiftMaps(pix, len(preds_all), 0)


@torch.no_grad()
def fresh_lift_maps(pipe, latents: torch.Tensor, embeddings, *, n_trials: int = 50, adaptive: bool = False,
                    expr=None, seed: int = 0, chunk_size: int | None = None, **options) -> LiftMaps:
    """Lift maps from fresh trials (true noise as target) on the final latents (B, C, h, w) through
    compkern.lift.estimate_lift: ``n_trials`` per image, or with ``adaptive`` at most that many,
    stopping once every sign ``expr`` needs is certain. Conditions are the rows of ``embeddings``
    (row 0 the null); ``options`` go to estimate_lift."""
    from compkern.lift import estimate_lift

    K = len(embeddings) - 1
    res = estimate_lift(pipe.eps_model(embeddings), latents.float(), list(range(1, K + 1)), 0, pipe.schedule,
                        n_trials=n_trials, adaptive=adaptive, expr=expr, pixel_map=True, chunk_size=chunk_size,
                        generator=torch.Generator().manual_seed(int(seed)), **options)
    pix = res.pixel_lift.float() / latents.shape[1]
    _check_finite("pixel lift", pix)
    return LiftMaps(pix, int(res.n_trials.max()), int(res.n_evals))


def evenly_spaced_trials(num_steps: int, n_trials: int, shape: tuple[int, ...], *, seed: int = 0
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The public CompLift text-to-image trials: t (n_trials,) int64 evenly spaced over the
    training steps (descending, as the scheduler lists them), noise (n_trials, *shape) from one
    fixed bank shared by every image."""
    if n_trials < 1:
        raise ValueError(f"n_trials must be >= 1, got {n_trials}")
    idx = torch.linspace(0, num_steps - 1, n_trials).round().long().clamp(0, num_steps - 1)
    t = (num_steps - 1) - idx
    noise = torch.randn(n_trials, *shape, generator=torch.Generator().manual_seed(int(seed)))
    return t, noise


@torch.no_grad()
def fixed_lift_maps(pipe, latents: torch.Tensor, embeddings, signs: torch.Tensor, *, n_trials: int = 200,
                    seed: int = 0, target: str = "composed", chunk_trials: int = 25,
                    chunk_size: int | None = None) -> LiftMaps:
    """The public text-to-image estimator, batched: ``n_trials`` evenly spaced t with a fixed noise
    bank (``evenly_spaced_trials``), the composed prediction (or the noise) as target. Each
    chunk of trials is one batched call of (K+1) x chunk_trials x B rows (``chunk_size`` caps
    the rows per UNet call); nothing leaves the device."""
    if target not in ("composed", "noise"):
        raise ValueError(f"target must be 'composed' or 'noise', got {target!r}")
    B, S = latents.shape[0], tuple(latents.shape[1:])
    signs = torch.as_tensor(signs, dtype=torch.float32).flatten()
    ts, bank = evenly_spaced_trials(pipe.schedule.num_steps, n_trials, S, seed=seed)
    total, rows = None, 0
    for s in range(0, n_trials, chunk_trials):
        n = min(chunk_trials, n_trials - s)
        noise = bank[s:s + n].to(latents.device)[:, None].expand(n, B, *S)
        t = ts[s:s + n].to(latents.device)[:, None].expand(n, B).reshape(-1)
        x_t = pipe.schedule.add_noise(latents.float()[None].expand(n, B, *S).reshape(n * B, *S),
                                      noise.reshape(n * B, *S), t)
        preds = pipe.predict(x_t, t, embeddings, chunk_size=chunk_size)  # (K+1, n*B, *S)
        rows += preds.shape[0] * preds.shape[1]
        preds = preds.reshape(preds.shape[0], n, B, *S).transpose(0, 1)  # (n, K+1, B, *S)
        tgt = torch.stack([composed_target(p, signs) for p in preds]) if target == "composed" else noise
        part = lift_partial(tgt.to(preds.dtype), preds, pixel_map=True)
        total = part if total is None else total + part
    pix = total.pixel_mean.float() / S[0]
    _check_finite("pixel lift", pix)
    return LiftMaps(pix, n_trials, rows)


def accept(composition, maps: LiftMaps, *, threshold: float = DEFAULT_THRESHOLD,
           min_pixels: float = DEFAULT_MIN_PIXELS, rule: str = "pixels") -> torch.Tensor:
    """(B,) bool. rule='pixels': the object rule (count of pixels above threshold vs min_pixels);
    rule='mean': the sign of the image-mean lift (CompLift's rule for 2-D / CLEVR)."""
    if rule == "pixels":
        scores = maps.scores(threshold, min_pixels)
    elif rule == "mean":
        scores = maps.lift
    else:
        raise ValueError(f"rule must be 'pixels' or 'mean', got {rule!r}")
    return composition.accept(scores).bool()


def overlay(image, pixel_lift: torch.Tensor, *, alpha: float = 0.5, cmap: str = "coolwarm"):
    """Blend a heat map of one lift map (h, w) over an image (PIL or (H, W, 3) uint8): red where
    the lift is positive, blue where negative, symmetric colour scale. Returns a PIL image."""
    import matplotlib
    import numpy as np
    from PIL import Image

    img = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32) / 255.0
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got {img.shape}")
    if pixel_lift.dim() != 2:
        raise ValueError(f"pixel_lift must be one map (h, w), got {tuple(pixel_lift.shape)}")
    H, W = img.shape[:2]
    m = torch.nn.functional.interpolate(pixel_lift[None, None].float().cpu(), size=(H, W), mode="bilinear",
                                        align_corners=False)[0, 0]
    scale = float(m.abs().max()) or 1.0
    heat = matplotlib.colormaps[cmap](((m / scale + 1) / 2).numpy())[..., :3]
    out = (1 - alpha) * img + alpha * heat
    return Image.fromarray((out * 255).round().clip(0, 255).astype(np.uint8))


def save_overlays(images: Sequence, maps: LiftMaps, out_dir: str | os.PathLike, stems: Sequence[str],
                  names: Sequence[str] | None = None) -> list[list[str]]:
    """Write ``{stem}_lift{k}.png`` for every image b and component k; returns the file names
    per image. ``names`` (K,) are only used for validation of K."""
    K, B = maps.pixel_lift.shape[:2]
    if len(images) != B or len(stems) != B:
        raise ValueError(f"images and stems must have B = {B} entries, got {len(images)} and {len(stems)}")
    if names is not None and len(names) != K:
        raise ValueError(f"names must have K = {K} entries, got {len(names)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for b in range(B):
        row = []
        for k in range(K):
            f = f"{stems[b]}_lift{k}.png"
            overlay(images[b], maps.pixel_lift[k, b]).save(out_dir / f)
            row.append(f)
        files.append(row)
    return files
