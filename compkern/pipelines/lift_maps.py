"""CompLift for images: per-pixel lift maps in latent space and the object acceptance rule.

Lift of component k at latent pixel (i, j), averaged over trials and latent channels:

    L_k(i, j) = mean_{t, c} [ (T - eps(x_t, c_0))^2 - (T - eps(x_t, c_k))^2 ](c, i, j)

The target T of a trial:
- 'auto' (the default, ``resolve_target``): 'joint' for a pure AND of two or more components,
  the one case where CompLift's public code defines a target (its full prompt); 'noise', CompLift's
  own estimand, for everything else (a NOT or OR term, a single prompt).
  `compkern generate` scores 'joint' on cached trials (every other recorded step) and 'noise' on
  ``FIXED_TRIALS`` fixed, evenly spaced trials (``fixed_lift_maps``; cached noise trials were 3-16
  points less precise on the NOT suites of a held-out seed set; 50 trials fell 3-14 points short of
  the public scorer's 200 on A AND B AND NOT C, where 100 matched it). Measured on `compkern main-job` over several
  seed sets (benchmarks/RESULTS.md).
- 'term': per component: 'joint' for the required components (``Expr.required``), 'noise' for
  the others. Measured and not the default: on "A AND B AND NOT C" the joint target calls B
  present where it is not drawn (the joint prediction follows the caption, not the image), and
  precision fell below no filter.
- 'noise': the true noise eps of x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps: CompLift's estimand.
  Fresh trials (``fresh_lift_maps``, ``fixed_lift_maps(target='noise')``) draw it; cached trials
  (the sampling run's own steps, no extra UNet row) recover it from x_t and the final x_0.
- 'joint': the prediction for the joint caption (``Composition.joint``, "a cat and a dog" for
  "a cat AND a dog"), recorded as one more condition row while sampling. This is what CompLift's
  public text-to-image code scores against (for AND prompts; it encodes the full prompt beside
  the objects). compkern extends it to every expression with the caption of the required
  components; for NOT / OR terms it is a design of compkern's, measured in benchmarks/RESULTS.md.
- 'composed': eps_0 + sum_k s_k (eps_k - eps_0) with the generation signs. Kept for comparison
  only: with a NOT sign it makes the lift of the negated component 2 a.b - 3 |b|^2 (a, b the
  components' eps - eps_0), <= 0 wherever the objects do not overlap, so NOT can never fail.

Object rule (the CompLift text-to-image code): component k is present in an image when at least
``min_pixels`` latent pixels have L_k > ``threshold``; the expression then combines the
per-component decisions (AND: all present, NOT: absent). ``min_pixels`` below 1 is a fraction of
the latent pixels, so that the rule means the same share of the image at every size. The
defaults (``default_rule``: per target, and for the noise per trial source) were chosen with
`compkern main-job` on a trained world; the public code swept threshold in {0, 9e-5, ..., 1e-3}
and the pixel count, and shows SDXL samples at 2e-4 and 300 of 128 x 128 pixels.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from compkern.ops import combine_eps, lift_partial
from compkern.samplers.composed import StepRecord

# The default object rule, (threshold, min_pixels), of each target and trial source. A pixel
# counts where its lift exceeds the threshold; a component is present on at least min_pixels of
# the latent. Joint: just above the sign of the pixel lift (CompLift's criterion, free of the
# model's units) on 3/16 of the latent: the precision-oriented point of the joint maps' precision /
# recall curve, the one at the public scorer's recall (seed sets A-C of `compkern main-job`).
# Noise on cached trials: 1e-3 on 1/8 (the true-noise lift is noisier per pixel: its cross term
# 2 eps.(eps_k - eps_0) averages out only over many trials). Noise on sampled trials (x_t drawn from
# q(x_t | x_0): fixed evenly spaced or fresh uniform t): 5e-4 on 3/16, the best F1 of the public
# scorer and of fresh trials alike. Chosen on the calibration seeds of `compkern main-job` (the
# shapes world; benchmarks/RESULTS.md), held on seeds no rule was chosen on. The public code's SDXL
# plot setting was 2e-4 and 300 / (128 x 128).
DEFAULT_RULES = {"joint": (5e-5, 3 / 16), "composed": (0.0, 3 / 32), "noise": (1e-3, 1 / 8)}
SAMPLED_NOISE_RULE = (5e-4, 3 / 16)
# fixed trials per image of `compkern generate --lift auto` wherever the target is the noise
FIXED_TRIALS = 100
DEFAULT_THRESHOLD, DEFAULT_MIN_PIXELS = DEFAULT_RULES["joint"]
SOURCES = ("cached", "sampled")


def default_rule(target: str, source: str = "cached") -> tuple[float, float]:
    """(threshold, min_pixels) by default for maps of ``target`` from trials of ``source``
    ('cached': the sampling run's own steps; 'sampled': fresh or fixed trials)."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    return SAMPLED_NOISE_RULE if (target, source) == ("noise", "sampled") else DEFAULT_RULES[target]


TARGETS = ("auto", "term", "joint", "noise", "composed")


def resolve_target(target: str, required: Sequence[int] | None, K: int) -> str:
    """'auto' -> 'joint' when every one of K >= 2 components is required (a pure AND: its joint
    caption is a row of its own), else 'noise'; any other target is returned as it is. Not the
    joint caption for an AND with NOT terms: "A and B" does not explain C, so C's lift against it
    is <= 0 wherever C is drawn and NOT C could never fail (tests/test_lift_maps.py). A single
    component's joint caption is the component itself, whose lift against itself,
    |eps_k - eps_0|^2, is never negative: it could not fail either."""
    if target != "auto":
        return target
    if required is None:
        raise ValueError("target='auto' needs required, the components every accepted image holds "
                         "(Composition.expression.required())")
    return "joint" if K >= 2 and set(int(k) for k in required) == set(range(K)) else "noise"


@dataclass
class LiftMaps:
    """pixel_lift (K, B, h, w) fp32: lift per latent pixel (mean over trials and channels);
    lift (K, B): its spatial mean; n_trials; n_evals: UNet rows spent on scoring (0 when cached);
    targets (K,): the target each component's row was scored against (None: unknown, the joint
    rule is the default); source: 'cached' (the sampling run's steps) or 'sampled' (fresh or
    fixed trials): with targets it picks each row's default rule (``default_rule``)."""

    pixel_lift: torch.Tensor
    n_trials: int
    n_evals: int
    targets: tuple[str, ...] | None = None
    source: str = "cached"

    def __post_init__(self):
        if self.targets is not None:
            self.targets = tuple(self.targets)
            if len(self.targets) != self.pixel_lift.shape[0] or not set(self.targets) <= set(DEFAULT_RULES):
                raise ValueError(f"targets must name one of {tuple(DEFAULT_RULES)} per component "
                                 f"(K = {self.pixel_lift.shape[0]}), got {self.targets}")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")

    def _per_component(self, value, which: int, name: str) -> list[float]:
        """value: None (each row's target default), one number for every row, or K numbers."""
        K = self.pixel_lift.shape[0]
        if value is None:
            return [default_rule(t, self.source)[which] for t in (self.targets or ("joint",) * K)]
        if isinstance(value, (int, float)):
            return [float(value)] * K
        value = [float(v) for v in value]
        if len(value) != K:
            raise ValueError(f"{name} must be one number or K = {K} numbers (one per component), got {len(value)}")
        return value

    @property
    def lift(self) -> torch.Tensor:
        return self.pixel_lift.mean(dim=(-2, -1))

    def min_count(self, min_pixels: float) -> int:
        """The pixel count a present component needs: ceil(min_pixels x h x w) for a fraction
        (min_pixels < 1), else min_pixels itself (a whole number of pixels)."""
        n = self.pixel_lift.shape[-1] * self.pixel_lift.shape[-2]
        if not 0 < min_pixels < 1 and not (min_pixels >= 1 and float(min_pixels).is_integer()):
            raise ValueError(f"min_pixels must be a fraction in (0, 1) of the latent pixels or a whole count >= 1, "
                             f"got {min_pixels}")
        m = math.ceil(min_pixels * n - 1e-9) if min_pixels < 1 else int(min_pixels)
        if m > n:
            raise ValueError(f"min_pixels={min_pixels:g} asks for {m} pixels but the latent has only {n} "
                             f"({self.pixel_lift.shape[-2]} x {self.pixel_lift.shape[-1]}): no component could be present")
        return max(m, 1)

    def counts(self, threshold: float | Sequence[float] | None = None) -> torch.Tensor:
        """(K, B) int64: latent pixels with lift above threshold (one number, K numbers, or None:
        each row's target default)."""
        thr = torch.tensor(self._per_component(threshold, 0, "threshold"), dtype=self.pixel_lift.dtype,
                           device=self.pixel_lift.device)
        return (self.pixel_lift > thr[:, None, None, None]).sum(dim=(-2, -1))

    def scores(self, threshold: float | Sequence[float] | None = None,
               min_pixels: float | Sequence[float] | None = None) -> torch.Tensor:
        """(K, B) fp32, positive exactly where component k is present (count >= min_count): the
        per-component input of ``Composition.accept``. Each argument: one number for every row,
        K numbers, or None for each row's default (``default_rule`` of its target and source)."""
        need = torch.tensor([self.min_count(m) - 0.5 for m in self._per_component(min_pixels, 1, "min_pixels")],
                            device=self.pixel_lift.device)
        return self.counts(threshold).float() - need[:, None]


def per_term(joint: LiftMaps | None, noise: LiftMaps, required: Sequence[int]) -> LiftMaps:
    """The 'term' target from two maps of the same images and trials: rows in ``required``
    (component indices, ``Expr.required()``) from ``joint``, the others from ``noise``; the
    trials' UNet rows are counted once."""
    K = noise.pixel_lift.shape[0]
    req = sorted(set(int(k) for k in required))
    if any(not 0 <= k < K for k in req):
        raise ValueError(f"required must hold component indices in [0, {K}), got {list(required)}")
    if req and (joint is None or joint.pixel_lift.shape != noise.pixel_lift.shape):
        raise ValueError("required components need joint maps of the same shape as the noise maps")
    rows = [joint.pixel_lift[k] if k in req else noise.pixel_lift[k] for k in range(K)]
    return LiftMaps(torch.stack(rows), max(noise.n_trials, joint.n_trials if joint else 0),
                    max(noise.n_evals, joint.n_evals if joint else 0), tuple("joint" if k in req else "noise" for k in range(K)),
                    noise.source)


def _check_finite(name: str, x: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} holds NaN or inf")


def composed_target(preds: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """preds (K+1, B, *S), signs (K,) -> eps_0 + sum_k signs_k (eps_k - eps_0), (B, *S)."""
    return combine_eps(preds, signs.to(device=preds.device, dtype=torch.float32))


def _target(preds: torch.Tensor, signs: torch.Tensor, target: str, joint_row: int | None) -> torch.Tensor:
    """preds (T, R, B, *S) -> the 'joint' or 'composed' target (T, B, *S)."""
    if target == "joint":
        return preds[:, joint_row]
    return torch.stack([composed_target(p[:signs.shape[0] + 1], signs) for p in preds])


def _check_target(target: str, joint_row: int | None, K: int, R: int, required: Sequence[int] | None = None) -> None:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if R < K + 1:
        raise ValueError(f"the predictions hold {R} condition rows, fewer than the K + 1 = {K + 1} the signs need")
    if target == "term" and required is None:
        raise ValueError("target='term' needs required, the components every accepted image holds "
                         "(Composition.expression.required())")
    if target == "term" and not required:
        return  # no required component (a pure OR / NOT): every row is scored against the noise
    if target in ("joint", "term") and (joint_row is None or not 1 <= joint_row < R):
        raise ValueError(f"target='joint' needs joint_row, the row of the joint caption among the {R} condition rows "
                         f"(1..{R - 1}; Composition.joint_row), got {joint_row}: record it with record_joint=True")


@torch.no_grad()
def cached_lift_maps(record: StepRecord, signs: torch.Tensor, *, target: str = "auto", joint_row: int | None = None,
                     required: Sequence[int] | None = None, latents: torch.Tensor | None = None, schedule=None,
                     steps: slice | None = None, chunk: int = 8) -> LiftMaps:
    """Lift maps from the predictions recorded while sampling, each step one trial, no UNet row.
    record.preds: S steps of (R, B, C, h, w), rows [base, K components, extra rows such as the
    joint caption]; signs (K,): the expression's composed-eps signs (they give K).

    target: 'auto' (default, ``resolve_target``), 'term' ('joint' for the ``required`` components,
    'noise' for the others), 'joint' (the prediction of row ``joint_row``), 'noise' (recovered
    from x_t and the final ``latents``; needs ``schedule``) or 'composed' (see the module docstring)."""
    if record is None or len(record) == 0:
        raise ValueError("record must hold the steps of a sampling run made with record=True")
    preds_all = record.preds if steps is None else record.preds[steps]
    if not preds_all:
        raise ValueError(f"steps={steps} selects no recorded step of {len(record)}")
    if preds_all[0].dim() != 5:
        raise ValueError(f"recorded preds must be (R, B, C, h, w), got {tuple(preds_all[0].shape)}")
    signs = torch.as_tensor(signs, dtype=torch.float32).flatten()
    K, R, C = signs.shape[0], preds_all[0].shape[0], preds_all[0].shape[2]
    if K < 1:
        raise ValueError("signs must hold one weight per component (K >= 1)")
    target = resolve_target(target, required, K)
    _check_target(target, joint_row, K, R, required)
    if target == "term":
        kw = dict(latents=latents, schedule=schedule, steps=steps, chunk=chunk)
        noise = cached_lift_maps(record, signs, target="noise", **kw)
        joint = cached_lift_maps(record, signs, target="joint", joint_row=joint_row, **kw) if required else None
        return per_term(joint, noise, required)
    if target == "noise":
        from compkern.lift import estimate_lift

        if latents is None or schedule is None:
            raise ValueError("target='noise' needs the final latents (B, C, h, w) and the schedule")
        sel = slice(None) if steps is None else steps
        rec = StepRecord(record.x_t[sel], record.t[sel], [p[:K + 1] for p in preds_all])
        res = estimate_lift(None, latents.float(), list(range(1, K + 1)), 0, schedule, n_trials=0, record=rec,
                            pixel_map=True)
        pix = res.pixel_lift.float() / C
    else:
        total = None
        for s in range(0, len(preds_all), chunk):
            preds = torch.stack(preds_all[s:s + chunk])  # (T, R, B, C, h, w)
            part = lift_partial(_target(preds, signs, target, joint_row), preds[:, :K + 1], pixel_map=True)
            total = part if total is None else total + part
        pix = total.pixel_mean.float() / C
    _check_finite("pixel lift", pix)
    return LiftMaps(pix, len(preds_all), 0, (target,) * K)


@torch.no_grad()
def fresh_lift_maps(pipe, latents: torch.Tensor, embeddings, *, n_trials: int = 50, adaptive: bool = False,
                    expr=None, seed: int = 0, chunk_size: int | None = None, **options) -> LiftMaps:
    """Lift maps from fresh trials (true noise as target) on the final latents (B, C, h, w) through
    compkern.lift.estimate_lift: ``n_trials`` per image, or with ``adaptive`` at most that many,
    stopping once every sign ``expr`` needs is certain. Conditions are rows 0..K of ``embeddings``
    (row 0 the null; K = the expression's components, else every row); ``options`` go to estimate_lift."""
    from compkern.lift import estimate_lift

    K = expr.num_components if expr is not None else len(embeddings) - 1
    res = estimate_lift(pipe.eps_model(embeddings), latents.float(), list(range(1, K + 1)), 0, pipe.schedule,
                        n_trials=n_trials, adaptive=adaptive, expr=expr, pixel_map=True, chunk_size=chunk_size,
                        generator=torch.Generator().manual_seed(int(seed)), **options)
    pix = res.pixel_lift.float() / latents.shape[1]
    _check_finite("pixel lift", pix)
    return LiftMaps(pix, int(res.n_trials.max()), int(res.n_evals), ("noise",) * K, "sampled")


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
                    seed: int = 0, target: str = "auto", joint_row: int | None = None,
                    required: Sequence[int] | None = None, chunk_trials: int = 25,
                    chunk_size: int | None = None) -> LiftMaps:
    """The public text-to-image estimator, batched: ``n_trials`` evenly spaced t with a fixed noise
    bank (``evenly_spaced_trials``), every condition row of ``embeddings`` evaluated at each trial,
    'auto' (``resolve_target``), the joint caption's prediction (row ``joint_row``, the public
    code's full prompt), the noise, the composed prediction, or per term ('term': joint for the ``required`` components, noise
    for the others, from the same trials) as target; signs (K,) give the K components (rows 1..K). Each
    chunk of trials is one batched call of R x chunk_trials x B rows (``chunk_size`` caps the
    rows per UNet call); nothing leaves the device."""
    signs = torch.as_tensor(signs, dtype=torch.float32).flatten()
    K = signs.shape[0]
    target = resolve_target(target, required, K)
    _check_target(target, joint_row, K, len(embeddings), required)
    B, S = latents.shape[0], tuple(latents.shape[1:])
    ts, bank = evenly_spaced_trials(pipe.schedule.num_steps, n_trials, S, seed=seed)
    parts = ["noise", "joint"] if target == "term" and required else ["noise" if target == "term" else target]
    total, rows = {}, 0
    for s in range(0, n_trials, chunk_trials):
        n = min(chunk_trials, n_trials - s)
        noise = bank[s:s + n].to(latents.device)[:, None].expand(n, B, *S)
        t = ts[s:s + n].to(latents.device)[:, None].expand(n, B).reshape(-1)
        x_t = pipe.schedule.add_noise(latents.float()[None].expand(n, B, *S).reshape(n * B, *S),
                                      noise.reshape(n * B, *S), t)
        preds = pipe.predict(x_t, t, embeddings, chunk_size=chunk_size)  # (R, n*B, *S)
        rows += preds.shape[0] * preds.shape[1]
        preds = preds.reshape(preds.shape[0], n, B, *S).transpose(0, 1)  # (n, R, B, *S)
        for name in parts:
            tgt = noise if name == "noise" else _target(preds, signs, name, joint_row)
            part = lift_partial(tgt.to(preds.dtype), preds[:, :K + 1], pixel_map=True)
            total[name] = part if name not in total else total[name] + part
    maps = {}
    for name, part in total.items():
        pix = part.pixel_mean.float() / S[0]
        _check_finite("pixel lift", pix)
        maps[name] = LiftMaps(pix, n_trials, rows, (name,) * K, "sampled")
    return per_term(maps.get("joint"), maps["noise"], required) if target == "term" else maps[target]


def accept(composition, maps: LiftMaps, *, threshold: float | Sequence[float] | None = None,
           min_pixels: float | Sequence[float] | None = None, rule: str = "pixels") -> torch.Tensor:
    """(B,) bool. rule='pixels': the object rule (count of pixels above threshold vs min_pixels;
    each None: each row's default, ``default_rule``); rule='mean': the sign of the
    image-mean lift (CompLift's rule for 2-D / CLEVR)."""
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
