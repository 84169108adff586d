"""The CompLift estimator: lift(x0 | c_k) = E_{t, eps}[ |eps - eps(x_t, null)|^2 - |eps - eps(x_t, c_k)|^2 ].

One batched model call per chunk of trials evaluates the null row and the K conditions on the
same (eps, t) (compkern.models.evaluate_conditions); ops.lift_partial reduces it. Trials draw t
uniformly (the paper) or from importance probabilities ``t_probs`` (weights keep the estimand the
uniform-t average: importance sampling changes the variance, never the answer), in stratified
blocks of ``chunk_trials`` draws. With ``antithetic`` a trial is eps paired with -eps at one t; the
pair's mean is one independent draw (the pairs' t are stratified over the whole proposal).

Modes:
- fixed: ``n_trials`` trials for every sample (the paper's settings: 50 in 2-D, 1000 best).
- adaptive: per (condition, sample), stop once the sign is certain or, with an ``expr``, once the
  expression's decision is certain; settled pairs leave the batch, so a sample pays its null row
  only while one of its signs is still open.
- cached: ``record`` (a StepRecord from ComposedEps(record=True) that generated x0) supplies free
  trials: the noise of step t is recovered as n_t = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t).

The stop rule (one rule for every mode). A sign is *settled* only by fresh trials, by a group
sequential test with the error budget alpha = 1 - confidence (or 1 - Phi(z); default z = 3, alpha =
0.135%): P(a settled sign is wrong) <= alpha for every (condition, sample) pair, over all the looks.
The test looks after every chunk once ``min_trials`` fresh trials are in, at the draw counts
m_1 < ... < m_L fixed by n_trials, chunk_trials and min_trials; it settles the sign of the mean when
|mean| > c_t * stderr, where c is the constant (Pocock) boundary for which a Gaussian random walk
with mean 0 first leaves (-c sqrt(m), c sqrt(m)) on the wrong side, at one of those looks, with
probability alpha (recursive numerical integration, ``_boundary``), and c_t converts c's per-look
tail to Student-t at the standard error's degrees of freedom d0 + n - 1. The standard error is
moderated (empirical Bayes, as limma-trend): the pair's sample variance is shrunk toward a
variance-vs-lift trend worth d0 draws, the calibration's (d0 = its prior_dof) or, without one, a
trend fitted across this batch's pairs (d0 = 4, once >= 8 pairs have two draws; else d0 = 0, the
plain t). Trial values are skewed, so a pair's mean and sample variance are correlated; an
unmoderated t-test settled wrong signs 3-4x more often than alpha on pairs near lift 0. Under the
Gaussian model a mean of 0 is the worst case, so the bound holds for every lift; with the skewed
trials of a real model it is met on average over decisions, and pairs whose lift is within a few
hundredths of 0 can still exceed it on one side (benchmarks/bench_lift_sign_error.py). An
expression is decided from settled signs only: it is wrong only if one of the signs it used is.

Cached trials are not independent draws: the steps of one reverse trajectory are strongly
correlated and, with DDIM (eta = 0), a deterministic function of x0, so they carry no error bar.
They give the estimate (``lift``, ``pixel_lift``, ``cached_lift``) of every pair that receives no
fresh trial (e.g. ``n_trials=0``: free lift maps), with stderr inf; they never count toward
``min_trials``, the stderr or the stop, and once a pair has fresh trials its estimate is the fresh
mean (unbiased), which alone settles its sign. With an ``expr``, the cached signs choose which open
pair to test first: when settling one open component at its cached sign would decide a sample's
expression, only that component (the one of largest cached |z|) gets fresh trials until it settles
(the order of the tests never changes their error bound).

``calibrate`` runs a small uniform pilot once per (model, task): it returns the importance
proposal over t and a variance-vs-lift trend that moderates the per-pair standard errors
(empirical Bayes). The estimate is the plain importance-sampling mean of v = w d with its iid
standard error.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from compkern.models.base import EpsModel, evaluate_conditions, stack_conditions
from compkern.models.schedule import NoiseSchedule
from compkern.ops import lift_partial


@dataclass
class LiftResult:
    """lift, stderr, n_trials (K, B); pixel_lift (K, B, H, W) or None; n_evals: model rows spent
    (cached trials are free); accept (B,) bool and decided (B,) bool when an ``expr`` was given.

    lift: the mean of the fresh trials, or of the cached ones where a pair got no fresh trial;
    stderr: of the fresh mean (inf with fewer than two fresh draws); n_trials: fresh trials;
    settled (K, B) bool: signs the stop marked certain (P(wrong) <= alpha each); alpha: that error
    budget; boundary: the Gaussian per-look boundary c of the sequential test (inf: no look);
    cached_lift (K, B) or None: the mean of the record's trials; n_cached: record steps used."""

    lift: torch.Tensor
    stderr: torch.Tensor
    n_trials: torch.Tensor
    n_evals: int
    pixel_lift: torch.Tensor | None = None
    accept: torch.Tensor | None = None
    decided: torch.Tensor | None = None
    settled: torch.Tensor | None = None
    alpha: float | None = None
    boundary: float | None = None
    cached_lift: torch.Tensor | None = None
    n_cached: int = 0


class _Sums:
    """Running sums per (condition, sample) of independent draws of the importance-weighted trial
    value v = w * d (an antithetic pair's mean is one draw): count n, sum of v, sum of v^2 (and of
    the per-pixel v), each (K, B) (pixel: (K, B, H, W)). Per pair, because settled pairs stop
    receiving trials while their sample goes on.

    The estimate is the plain importance-sampling mean sum(v) / n (unbiased for the uniform-t
    average, since E_q[w] = 1) with the iid standard error of v. (ops.LiftPartial's Kish stderr
    is meant for weights unrelated to d; importance weights are large exactly where d is small,
    where it overstates the error several-fold.)"""

    def __init__(self, K: int, B: int, pixel_shape: tuple[int, ...] | None, device, dtype):
        z = lambda *s: torch.zeros(*s, device=device, dtype=dtype)
        self.n, self.s1, self.s2 = z(K, B), z(K, B), z(K, B)
        self.pix = None if pixel_shape is None else z(K, B, *pixel_shape)

    def add(self, k: torch.Tensor, b: torch.Tensor, n, s1, s2, pix=None) -> None:
        """Add sums for the pairs (k[i], b[i]) (each pair at most once per call)."""
        self.n[k, b] += n
        self.s1[k, b] += s1
        self.s2[k, b] += s2
        if pix is not None and self.pix is not None:
            self.pix[k, b] += pix

    @property
    def mean(self) -> torch.Tensor:
        return self.s1 / self.n.clamp_min(1)

    @property
    def stderr(self) -> torch.Tensor:
        n = self.n
        var = (self.s2 / n.clamp_min(1) - self.mean.square()).clamp_min(0) * n / (n - 1).clamp_min(1)
        return torch.where(n > 1, (var / n.clamp_min(1)).sqrt(), torch.full_like(n, float("inf")))


# -- timestep proposals -----------------------------------------------------------------------------
def _draw_t(probs: torch.Tensor | None, num_steps: int, n: int, B: int, stratified: bool,
            generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(t (n, B) int64, w (n, B) fp32) with w = (1/T) / q(t); stratified: draw j of each sample
    comes from the j-th of n equal-mass slices of q."""
    if probs is None:
        q = torch.full((num_steps,), 1.0 / num_steps, dtype=torch.float64)
    else:
        q = probs
    u = torch.rand(n, B, generator=generator, dtype=torch.float64)
    if stratified:
        u = (torch.arange(n, dtype=torch.float64)[:, None] + u) / n
    cdf = torch.cumsum(q, 0)
    cdf = cdf / cdf[-1]
    t = torch.searchsorted(cdf, u.clamp(max=1 - 1e-12), right=True).clamp(max=num_steps - 1)
    w = ((1.0 / num_steps) / q[t]).float()
    return t, w


def importance_probs(profile: torch.Tensor, *, floor: float = 0.1) -> torch.Tensor:
    """A proposal over timesteps from a per-t profile (num_steps,) of sqrt(E[d^2 | t]) (the
    variance-minimizing shape), mixed with ``floor`` of the uniform so weights stay bounded."""
    profile = torch.as_tensor(profile, dtype=torch.float64)
    if profile.dim() != 1 or bool((profile < 0).any()) or not bool(torch.isfinite(profile).all()):
        raise ValueError("profile must be a finite non-negative 1-D tensor (num_steps,)")
    if not 0 < floor <= 1:
        raise ValueError(f"floor must lie in (0, 1], got {floor}")
    T = profile.shape[0]
    q = profile / profile.sum() if float(profile.sum()) > 0 else torch.full((T,), 1.0 / T, dtype=torch.float64)
    return (1 - floor) * q + floor / T


@dataclass
class LiftCalibration:
    """What a pilot learns about a (model, task): t_probs (num_steps,), the importance proposal;
    var_coef (3,): the per-trial variance of the weighted trial value under that proposal, as a
    trend c0 + c1 m^2 + c2 |m| in the lift m; prior_dof: how many trials that prior is worth in the
    moderated standard error (empirical Bayes, as limma-trend); rows: model rows the pilot spent."""

    t_probs: torch.Tensor
    var_coef: torch.Tensor
    prior_dof: float
    rows: int

    def prior_var(self, m: torch.Tensor) -> torch.Tensor:
        c = self.var_coef.to(m.device, m.dtype)
        return (c[0] + c[1] * m.square() + c[2] * m.abs()).clamp_min(1e-12)


@torch.no_grad()
def calibrate(model: EpsModel, x0: torch.Tensor, conds: Any, null_cond: Any, schedule: NoiseSchedule, *,
              n_trials: int = 16, bins: int = 20, floor: float = 0.1, prior_dof: float = 8.0,
              generator: torch.Generator | None = None, chunk_size: int | None = None,
              backend: str = "auto") -> LiftCalibration:
    """A uniform-t pilot of ``n_trials`` trials on a few samples x0 (B, *S) (64 is plenty).

    t_probs: sqrt(mean d^2) in ``bins`` equal bins of t (the variance-minimizing shape), piecewise
    constant, mixed with ``floor`` of the uniform. The variance trend is fitted across the pilot's
    (condition, sample) pairs, each pair's variance under t_probs computed from its uniform trials
    by reweighting (E_q[(w d)^2] = E_uniform[w d^2]). Calibrate once per model and task."""
    T = schedule.num_steps
    B, S = x0.shape[0], tuple(x0.shape[1:])
    full = _stack(conds, null_cond, B, x0.device)
    t, _ = _draw_t(None, T, n_trials, B, True, generator)
    eps = torch.randn(n_trials, B, *S, generator=generator, dtype=x0.dtype).to(x0.device)
    t = t.to(x0.device)
    x_t = schedule.add_noise(x0.unsqueeze(0).expand(n_trials, *x0.shape).reshape(-1, *S), eps.reshape(-1, *S), t.reshape(-1))
    cond_rows = full.repeat(1, n_trials, *([1] * (full.dim() - 2)))
    preds = evaluate_conditions(model, x_t, t.reshape(-1), cond_rows, chunk_size=chunk_size)
    rows = preds.shape[0] * preds.shape[1]
    K = full.shape[0] - 1
    d = lift_partial(eps.reshape(1, -1, *S), preds.unsqueeze(0), backend=backend).sum_wd.reshape(K, n_trials, B).double().cpu()
    tc = t.cpu()
    edges = torch.linspace(0, T, bins + 1).round().long()
    idx = (tc * bins // T).clamp(max=bins - 1)  # (n, B)
    d2 = d.square().mean(0)  # (n, B)
    prof = torch.zeros(T, dtype=torch.float64)
    for i in range(bins):
        sel = idx == i
        if bool(sel.any()):
            prof[edges[i]:edges[i + 1]] = d2[sel].mean().sqrt()
    probs = importance_probs(prof, floor=floor)
    w = ((1.0 / T) / probs[tc])[None]  # (1, n, B)
    m = d.mean(1).reshape(-1)
    var = ((w * d.square()).mean(1).reshape(-1) - m.square()).clamp_min(0)
    coef = _fit_trend(m, var)
    return LiftCalibration(probs.float(), coef.float(), float(prior_dof), rows)


def _fit_trend(m: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """(3,) fp64 coefficients of the non-negative trend var ~ c0 + c1 m^2 + c2 |m| (m, var (P,)),
    least squares; c0 > 0."""
    m, var = m.double().cpu(), var.double().cpu()
    A = torch.stack([torch.ones_like(m), m.square(), m.abs()], 1)
    coef = torch.linalg.lstsq(A, var[:, None]).solution.flatten()
    if bool((coef < 0).any()):  # keep the trend non-negative: refit on the non-negative terms
        keep = coef >= 0
        keep[0] = True
        sub = torch.linalg.lstsq(A[:, keep], var[:, None]).solution.flatten().clamp_min(0)
        coef = torch.zeros(3, dtype=torch.float64)
        coef[keep] = sub
    if float(coef[0]) <= 0:
        coef[0] = max(float(var.mean()) * 1e-3, 1e-12)
    return coef


def calibrate_t_probs(model: EpsModel, x0: torch.Tensor, conds: Any, null_cond: Any, schedule: NoiseSchedule,
                      **options) -> tuple[torch.Tensor, int]:
    """(t_probs (num_steps,), pilot rows): the importance proposal of ``calibrate``."""
    cal = calibrate(model, x0, conds, null_cond, schedule, **options)
    return cal.t_probs, cal.rows


def _t_crit(z: float, dof: torch.Tensor) -> torch.Tensor:
    """The Student-t critical value with the one-sided tail 1 - Phi(z) of the normal one, at dof
    (K, B) degrees of freedom (inf where dof < 1: no standard error yet)."""
    from scipy.special import ndtr, stdtrit

    d = dof.detach().double().cpu().numpy()
    crit = torch.from_numpy(stdtrit(d.clip(min=1), float(ndtr(z)))).to(dof.device, dof.dtype)
    return torch.where(dof >= 1, crit, torch.full_like(crit, float("inf")))


@functools.lru_cache(maxsize=64)
def _boundary(looks: tuple[int, ...], alpha: float) -> float:
    """The constant (Pocock) boundary c of a sign test looking at draw counts ``looks``
    (increasing): a Gaussian random walk S_m with mean 0, unit variance, absorbed once |S_m| >
    c sqrt(m) at a look, leaves through -c sqrt(m) with probability alpha. Recursive numerical
    integration (Armitage, McPherson & Rowe 1969) on a grid of the continuation region, Simpson
    weights, Illinois root finding on log P(error); ~1e-4 accurate, cached per (looks, alpha)."""
    from scipy.special import ndtr, ndtri

    z1 = float(ndtri(1 - alpha))
    if len(looks) <= 1:
        return z1
    m = np.asarray(looks, dtype=np.float64)
    sd = np.sqrt(np.diff(m))
    top = float(ndtri(1 - alpha / len(looks)))  # Bonferroni: the boundary lies in [z1, top]
    G = min(401, max(61, int(3 * top * math.sqrt(m[-1]) / sd.min()) // 2 * 2 + 1))
    u = np.linspace(-1.0, 1.0, G)
    simpson = np.ones(G)
    simpson[1:-1:2], simpson[2:-1:2] = 4, 2
    simpson *= 2 / (3 * (G - 1))  # on u in [-1, 1]

    def log_err(c: float) -> float:
        b = c * math.sqrt(m[0])
        x = b * u
        f = np.exp(-0.5 * x ** 2 / m[0]) / math.sqrt(2 * math.pi * m[0]) * simpson * b  # density x weight
        err = float(ndtr(-c))
        for j in range(1, len(m)):
            b = c * math.sqrt(m[j])
            err += float(f @ ndtr((-b - x) / sd[j - 1]))
            xn = b * u
            f = (f @ np.exp(-0.5 * ((xn[None] - x[:, None]) / sd[j - 1]) ** 2)) / (sd[j - 1] * math.sqrt(2 * math.pi)) * simpson * b
            x = xn
        return math.log(err) - math.log(alpha)

    lo, hi = z1, top
    flo, fhi = log_err(lo), log_err(hi)
    side, c = 0, hi
    for _ in range(60):
        c = (lo * fhi - hi * flo) / (fhi - flo)
        fc = log_err(c)
        if abs(fc) < 1e-7 or hi - lo < 1e-7:
            break
        if fc > 0:
            lo, flo = c, fc
            if side == 1:
                fhi /= 2
            side = 1
        else:
            hi, fhi = c, fc
            if side == -1:
                flo /= 2
            side = -1
    return max(c, z1)


_SELF_MIN_PAIRS = 8  # pairs needed to fit the variance trend from the batch itself
_SELF_DOF = 4.0  # prior draws that self-fitted trend is worth


# -- the estimator ------------------------------------------------------------------------------------
def _stack(conds: Any, null_cond: Any, B: int, device) -> torch.Tensor:
    """(K+1, B, *C) condition-major, null first."""
    if isinstance(conds, torch.Tensor):
        if conds.dim() < 2 or conds.shape[1] != B:
            raise ValueError(f"conds as a tensor must be (K, B={B}, *C), got {tuple(conds.shape)}; "
                             "or pass a list of K conditions shared by the batch")
        null = torch.as_tensor(null_cond, device=conds.device)
        C = tuple(conds.shape[2:])
        if tuple(null.shape) == (B, *C):
            null = null.unsqueeze(0)
        elif tuple(null.shape) == C:
            null = null.reshape(1, 1, *C).expand(1, B, *C)
        else:
            raise ValueError(f"null_cond must have shape (*C) = {C} or (B, *C) = {(B, *C)} for conds {tuple(conds.shape)}, "
                             f"got {tuple(null.shape)}")
        return torch.cat([null.to(conds.dtype), conds]).to(device)
    if not isinstance(conds, (list, tuple)) or not conds:
        raise TypeError(f"conds must be a non-empty list of K conditions or a tensor (K, B, *C), got {type(conds).__name__}")
    return stack_conditions([null_cond, *conds], B).to(device)


def _alpha_from(confidence: float | None, z: float | None) -> tuple[float, float]:
    """(alpha, z): the error budget of a settled sign, alpha = 1 - confidence = 1 - Phi(z)."""
    from scipy.special import ndtr, ndtri

    if confidence is not None:
        if not 0.5 < confidence < 1:
            raise ValueError(f"confidence must lie in (0.5, 1), got {confidence}")
        return 1 - float(confidence), float(ndtri(confidence))
    z = 3.0 if z is None else float(z)
    if not (math.isfinite(z) and z > 0):
        raise ValueError(f"z must be a finite positive number, got {z}")
    return float(ndtr(-z)), z


def _looks(n_trials: int, chunk_trials: int, min_trials: int, adaptive: bool, per_draw: int) -> tuple[int, ...]:
    """The draw counts at which the stop tests a pair: adaptive, after every chunk of chunk_trials
    (the cap n_trials rounded up to whole chunks) once min_trials fresh trials are in; fixed, once at
    n_trials. per_draw: trials per independent draw (2 for antithetic pairs)."""
    if n_trials == 0:
        return ()
    ends = [n_trials] if not adaptive else range(chunk_trials, -(-n_trials // chunk_trials) * chunk_trials + 1, chunk_trials)
    return tuple(e // per_draw for e in ends if e >= min_trials and e // per_draw >= 2)


@torch.no_grad()
def estimate_lift(model: EpsModel, x0: torch.Tensor, conds: Any, null_cond: Any, schedule: NoiseSchedule, *,
                  n_trials: int = 50, adaptive: bool = False, expr: Any = None, z: float | None = None,
                  confidence: float | None = None, min_trials: int = 4, chunk_trials: int = 8,
                  t_probs: torch.Tensor | None = None, stratified: bool = True, antithetic: bool = False,
                  record: Any = None, pixel_map: bool = False, chunk_size: int | None = None,
                  generator: torch.Generator | None = None, backend: str = "auto", calibration: LiftCalibration | None = None) -> LiftResult:
    """Estimate the lift of K conditions for each sample.

    x0 (B, *S) clean samples; conds: K conditions (a list, each shared by the batch, or a tensor
    (K, B, *C)); null_cond: the null/base condition (the model's null id, an empty-prompt state).
    n_trials: the fixed budget of fresh trials, or the per-pair maximum in adaptive mode (rounded
    up to whole chunks of ``chunk_trials``). expr: an expression from ``compkern.lift.parse`` over
    the K conditions (in order); in adaptive mode a sample stops once the expression's value is
    certain. confidence / z: a settled sign is wrong with probability at most alpha = 1 -
    confidence = 1 - Phi(z) (default z = 3), over all the sequential looks (module docstring).
    min_trials: fresh trials before the first look. t_probs (num_steps,): importance proposal
    over t (see ``calibrate_t_probs``). calibration: a ``calibrate`` result: its t_probs, and
    standard errors moderated toward its variance trend (without one: toward a trend fitted on
    the batch). antithetic: each trial is
    eps and -eps at one t, the pair one draw (chunk_trials and n_trials even). record: a
    StepRecord of the sampling run that produced x0 (cached trials: the estimate where no fresh
    trial is drawn, and the test order of an expr; never a settled sign). pixel_map: also a
    per-pixel lift (K, B, H, W) for image layouts S = (C, H, W).

    The steps: check the arguments, fix the sequential test (looks and boundary), then per chunk:
    find the open pairs (``_open_pairs``), draw trials for the samples that have one
    (``_draw_trials``), evaluate them rectangularly or packed (``_rectangular_chunk`` /
    ``_packed_chunk``); finally assemble the result (``_lift_result``)."""
    _check_lift_args(x0, n_trials, chunk_trials, min_trials, antithetic, pixel_map)
    T = schedule.num_steps
    t_probs = _normalized_t_probs(calibration.t_probs if calibration is not None and t_probs is None else t_probs, T)
    alpha, _ = _alpha_from(confidence, z)
    per_draw = 2 if antithetic else 1
    looks = _looks(n_trials, chunk_trials, min_trials, adaptive, per_draw)
    c = _boundary(looks, alpha) if looks else float("inf")
    B, S, dev = x0.shape[0], tuple(x0.shape[1:]), x0.device
    full = _stack(conds, null_cond, B, dev)
    K = full.shape[0] - 1
    if expr is not None and hasattr(expr, "num_components") and expr.num_components != K:
        raise ValueError(f"expr uses {expr.num_components} components but {K} conditions were given")
    acc = torch.float64 if x0.dtype == torch.float64 else torch.float32
    sums = _Sums(K, B, S[1:] if pixel_map else None, dev, acc)
    cached = None
    if record is not None:
        cached = _Sums(K, B, S[1:] if pixel_map else None, dev, acc)
        _add_cached(cached, record, x0, schedule, K, pixel_map, backend)
    fresh = torch.zeros(K, B, device=dev)  # (K, B) fresh trials per pair
    signs = functools.partial(_moderated_signs, sums, fresh, calibration=calibration, c=c, looks=looks,
                              min_trials=min_trials)
    evaluate = {"model": model, "full": full, "sums": sums, "fresh": fresh, "per_draw": per_draw,
                "pixel_map": pixel_map, "chunk_size": chunk_size, "backend": backend}
    n_evals = 0
    while True:
        open_ = _open_pairs(signs, fresh, n_trials=n_trials, adaptive=adaptive, expr=expr, cached=cached)
        if not bool(open_.any()):
            break
        b_act = open_.any(0).nonzero().squeeze(1)  # (Ba,)
        n = chunk_trials if adaptive else min(chunk_trials, int((n_trials - fresh[:, b_act][open_[:, b_act]]).max().item()))
        n += n % per_draw
        trials = _draw_trials(x0[b_act], schedule, n, per_draw, t_probs=t_probs, stratified=stratified,
                              generator=generator)
        sub_open = open_[:, b_act]  # (K, Ba)
        if bool(sub_open.all()):
            n_evals += _rectangular_chunk(trials, b_act, **evaluate)
        else:
            n_evals += _packed_chunk(trials, b_act, sub_open, **evaluate)
    return _lift_result(signs(), sums, cached, fresh, expr, n_evals, alpha, c, 0 if record is None else len(record))


def _check_lift_args(x0: torch.Tensor, n_trials: int, chunk_trials: int, min_trials: int, antithetic: bool,
                     pixel_map: bool) -> None:
    """The argument checks of estimate_lift: x0 a finite tensor (B, *S) ((B, C, H, W) with
    pixel_map), the trial counts, even counts with antithetic."""
    if not isinstance(x0, torch.Tensor) or x0.dim() < 2:
        raise TypeError("x0 must be a tensor (B, *S)")
    if not torch.isfinite(x0).all():
        raise ValueError("x0 holds NaN or inf")
    if n_trials < 0 or chunk_trials < 1 or min_trials < 2:
        raise ValueError(f"need n_trials >= 0, chunk_trials >= 1, min_trials >= 2; got {n_trials}, {chunk_trials}, {min_trials}")
    if antithetic and (chunk_trials % 2 or n_trials % 2):
        raise ValueError(f"antithetic=True pairs eps with -eps: chunk_trials and n_trials must be even, got "
                         f"{chunk_trials} and {n_trials}")
    if pixel_map and x0.dim() != 4:
        raise ValueError(f"pixel_map=True needs an image layout x0 (B, C, H, W), got {tuple(x0.shape)}")


def _normalized_t_probs(t_probs: Any, T: int) -> torch.Tensor | None:
    """The importance proposal as a (T,) fp64 CPU tensor summing to 1 (None: uniform t)."""
    if t_probs is None:
        return None
    t_probs = torch.as_tensor(t_probs, dtype=torch.float64).cpu()
    if t_probs.shape != (T,) or bool((t_probs < 0).any()) or float(t_probs.sum()) <= 0:
        raise ValueError(f"t_probs must be a non-negative (num_steps,) = ({T},) tensor with positive sum")
    return t_probs / t_probs.sum()


def _moderated_signs(sums: _Sums, fresh: torch.Tensor, *, calibration: LiftCalibration | None, c: float,
                     looks: tuple[int, ...], min_trials: int):
    """(mean, stderr, surely > 0, surely <= 0), each (K, B), from the fresh draws only.

    The per-draw sample variance is shrunk toward a variance-vs-lift trend worth d0 draws (the
    calibration's, else one fitted across the batch's pairs once there are enough, else none);
    a pair is looked at once it has ``min_trials`` fresh trials (``fresh`` (K, B)) and two draws,
    and its sign is settled when |mean| exceeds the Student-t version of the boundary ``c``."""
    mean, n = sums.mean, sums.n
    s2 = (sums.stderr.square() * n).nan_to_num(0.0, posinf=0.0)  # per-draw sample variance
    if calibration is not None:
        prior, d0 = calibration.prior_var(mean), calibration.prior_dof
    else:  # the trend fitted across this batch's pairs (sample variance vs mean), when enough
        seen = n >= 2
        if int(seen.sum()) >= _SELF_MIN_PAIRS:
            coef = _fit_trend(mean[seen], s2[seen]).to(mean.device, mean.dtype)
            prior, d0 = (coef[0] + coef[1] * mean.square() + coef[2] * mean.abs()).clamp_min(1e-12), _SELF_DOF
        else:
            prior, d0 = torch.zeros_like(mean), 0.0
    # moderated: the pair's variance shrunk toward the trend (d0 prior draws)
    var = (d0 * prior + (n - 1).clamp_min(0) * s2) / (d0 + (n - 1).clamp_min(0)).clamp_min(1e-12)
    se = torch.where(n >= 2, (var / n.clamp_min(1)).sqrt(), torch.full_like(n, float("inf")))
    crit = _t_crit(c, d0 + n - 1) if looks else torch.full_like(mean, float("inf"))
    look = (fresh >= min_trials) & (n >= 2)
    return mean, se, look & (mean - crit * se > 0), look & (mean + crit * se <= 0)


def _open_pairs(signs, fresh: torch.Tensor, *, n_trials: int, adaptive: bool, expr: Any,
                cached: _Sums | None) -> torch.Tensor:
    """(K, B) bool: the pairs that still need trials. Fixed mode: fewer than ``n_trials`` fresh
    trials. Adaptive: not settled (``signs()``), under the cap, the sample's expression (if any)
    not yet decided; with cached trials narrowed to the one component worth testing first."""
    if not adaptive:
        return fresh < n_trials
    _, _, pos, neg = signs()
    open_ = ~(pos | neg) & (fresh < n_trials)
    if expr is not None:
        done, _ = expr.decide(pos, neg)
        open_ &= ~done[None, :]
        if cached is not None:
            open_ = _cached_first(expr, open_, pos, neg, cached.mean)
    return open_


@dataclass
class _Trials:
    """One chunk of n trials for Ba active samples: t (n, Ba) int64, w (n, Ba) fp32 importance
    weights, eps (n, Ba, *S) noise, x_t (n * Ba, *S) the noised samples (trial-major)."""

    t: torch.Tensor
    w: torch.Tensor
    eps: torch.Tensor
    x_t: torch.Tensor


def _draw_trials(xb: torch.Tensor, schedule: NoiseSchedule, n: int, per_draw: int, *, t_probs: torch.Tensor | None,
                 stratified: bool, generator: torch.Generator | None) -> _Trials:
    """n trials (n // per_draw independent draws; antithetic: trial j and j + n/2 share t, with eps
    and -eps) for the active samples xb (Ba, *S), on xb's device."""
    Ba, S, dev = xb.shape[0], tuple(xb.shape[1:]), xb.device
    t, w = _draw_t(t_probs, schedule.num_steps, n // per_draw, Ba, stratified, generator)  # (n / per_draw, Ba)
    eps = torch.randn(n // per_draw, Ba, *S, generator=generator, dtype=xb.dtype)
    if per_draw == 2:
        eps, t, w = torch.cat([eps, -eps]), torch.cat([t, t]), torch.cat([w, w])
    t, w, eps = t.to(dev), w.to(dev), eps.to(dev)
    x_t = schedule.add_noise(xb.unsqueeze(0).expand(n, *xb.shape).reshape(n * Ba, *S), eps.reshape(n * Ba, *S),
                             t.reshape(-1))
    return _Trials(t, w, eps, x_t)


def _rectangular_chunk(trials: _Trials, b_act: torch.Tensor, *, model: EpsModel, full: torch.Tensor, sums: _Sums,
                       fresh: torch.Tensor, per_draw: int, pixel_map: bool, chunk_size: int | None,
                       backend: str) -> int:
    """Every condition of every active sample b_act (Ba,) (all K x Ba pairs open): one batched call
    on the (K+1, n*Ba) condition-major rows of ``full`` (K+1, B, *C), zero-copy into lift_partial;
    adds the draws to ``sums`` and the trials to ``fresh`` (K, B). Returns the model rows spent."""
    n, Ba = trials.t.shape
    K, S, dev = full.shape[0] - 1, tuple(trials.eps.shape[2:]), trials.eps.device
    cond_rows = full[:, b_act].repeat(1, n, *([1] * (full.dim() - 2)))  # (K+1, n*Ba, *C)
    preds = evaluate_conditions(model, trials.x_t, trials.t.reshape(-1), cond_rows, chunk_size=chunk_size)
    part = lift_partial(trials.eps.reshape(1, n * Ba, *S), preds.unsqueeze(0), weights=trials.w.reshape(1, -1),
                        pixel_map=pixel_map, backend=backend)
    d = part.sum_wd.reshape(K, n, Ba)  # w * d per trial
    _check_finite(d)
    draws = d.reshape(K, per_draw, n // per_draw, Ba).mean(1)  # (K, draws, Ba)
    kk = torch.arange(K, device=dev)[:, None].expand(K, Ba).reshape(-1)
    bb = b_act[None, :].expand(K, Ba).reshape(-1)
    pix = None if part.sum_wd_pixel is None else part.sum_wd_pixel.reshape(K, n, Ba, *S[1:]).sum(1).reshape(K * Ba, *S[1:]) / per_draw
    acc = sums.n.dtype
    sums.add(kk, bb, float(n // per_draw), draws.sum(1).reshape(-1).to(acc), draws.square().sum(1).reshape(-1).to(acc), pix)
    fresh[:, b_act] += n
    return preds.shape[0] * preds.shape[1]


def _packed_chunk(trials: _Trials, b_act: torch.Tensor, sub_open: torch.Tensor, *, model: EpsModel,
                  full: torch.Tensor, sums: _Sums, fresh: torch.Tensor, per_draw: int, pixel_map: bool,
                  chunk_size: int | None, backend: str) -> int:
    """The null row of each active sample b_act (Ba,) plus only its open conditions (sub_open
    (K, Ba)), as one call on n*Ba + n*P rows (P open pairs); adds the draws to ``sums`` and the
    trials to ``fresh`` (K, B). Returns the model rows spent."""
    n, Ba = trials.t.shape
    S, dev = tuple(trials.eps.shape[2:]), trials.eps.device
    kp, bp = sub_open.nonzero(as_tuple=True)  # pairs among active samples, local b index
    P = len(kp)
    null_rows = full[0, b_act].unsqueeze(0).expand(n, *full[0, b_act].shape).reshape(n * Ba, *full.shape[2:])
    trial = torch.arange(n, device=dev)[:, None]
    pair_rows = (trial * Ba + bp[None, :]).reshape(-1)  # (n*P,) rows of x_t for each pair-trial
    cond_rows = full[kp + 1, b_act[bp]].unsqueeze(0).expand(n, P, *full.shape[2:]).reshape(n * P, *full.shape[2:])
    xs = torch.cat([trials.x_t, trials.x_t[pair_rows]])
    ts = torch.cat([trials.t.reshape(-1), trials.t.reshape(-1)[pair_rows]])
    cs = torch.cat([null_rows, cond_rows])
    out = evaluate_conditions(model, xs, ts, cs.unsqueeze(0), chunk_size=chunk_size)[0]
    pred_null, pred_c = out[: n * Ba][pair_rows], out[n * Ba:]
    noise = trials.eps.reshape(n * Ba, *S)[pair_rows]
    part = lift_partial(noise.unsqueeze(0), torch.stack([pred_null, pred_c]).unsqueeze(0),
                        weights=trials.w.reshape(-1)[pair_rows].unsqueeze(0), pixel_map=pixel_map, backend=backend)
    d = part.sum_wd.reshape(n, P)
    _check_finite(d)
    draws = d.reshape(per_draw, n // per_draw, P).mean(0)  # (draws, P)
    pix = None if part.sum_wd_pixel is None else part.sum_wd_pixel.reshape(n, P, *S[1:]).sum(0) / per_draw
    acc = sums.n.dtype
    sums.add(kp, b_act[bp], float(n // per_draw), draws.sum(0).to(acc), draws.square().sum(0).to(acc), pix)
    fresh[kp, b_act[bp]] += n
    return out.shape[0]


def _lift_result(signs: tuple, sums: _Sums, cached: _Sums | None, fresh: torch.Tensor, expr: Any, n_evals: int,
                 alpha: float, c: float, n_cached: int) -> LiftResult:
    """The LiftResult from the final (mean, stderr, pos, neg) (K, B) of ``_moderated_signs``: the
    fresh mean (the cached one where a pair got no fresh trial), per-pixel lift (K, B, H, W) the
    same way, the expression's accept / decided (B,)."""
    mean, se, pos, neg = signs
    has = sums.n > 0
    pix = None if sums.pix is None else sums.pix / sums.n.clamp_min(1)[..., None, None]
    if cached is not None:
        mean = torch.where(has, mean, cached.mean)
        if pix is not None:
            pix = torch.where(has[..., None, None], pix, cached.pix / cached.n.clamp_min(1)[..., None, None])
    accept = decided = None
    if expr is not None:
        accept = expr.accept(mean)
        decided, _ = expr.decide(pos, neg)
    return LiftResult(mean, se, fresh.to(sums.n.dtype), n_evals, pix, accept, decided, pos | neg, alpha, c,
                      None if cached is None else cached.mean, n_cached)


def _cached_first(expr: Any, open_: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                  cached_mean: torch.Tensor) -> torch.Tensor:
    """open_ (K, B) narrowed, per sample, to one open component whose settling at its cached
    sign would decide the expression (the largest cached |lift|); other samples unchanged."""
    K, B = open_.shape
    score = torch.full((K, B), -1.0, device=open_.device, dtype=cached_mean.dtype)
    for k in range(K):
        p, q = pos.clone(), neg.clone()
        p[k] |= open_[k] & (cached_mean[k] > 0)
        q[k] |= open_[k] & (cached_mean[k] <= 0)
        done, _ = expr.decide(p, q)
        score[k] = torch.where(done & open_[k], cached_mean[k].abs(), score[k])
    pick = score.max(0)
    narrowed = torch.zeros_like(open_)
    narrowed[pick.indices, torch.arange(B, device=open_.device)] = True
    return torch.where((pick.values >= 0)[None], narrowed, open_)


def _check_finite(d: torch.Tensor) -> None:
    if not bool(torch.isfinite(d).all()):
        raise FloatingPointError("lift trials are NaN or inf: the model's predictions (or the schedule) produced "
                                 "non-finite values")


def _add_cached(sums: _Sums, record: Any, x0: torch.Tensor, schedule: NoiseSchedule, K: int, pixel_map: bool,
                backend: str) -> None:
    """Free trials from a sampling record: noise recovered from x_t and the final x0."""
    if len(record) == 0:
        raise ValueError("record is empty: sample with ComposedEps(..., record=True) first")
    B = x0.shape[0]
    for i, (x_t, t, preds) in enumerate(zip(record.x_t, record.t, record.preds)):
        if preds.shape[0] != K + 1 or preds.shape[1] != B or tuple(x_t.shape) != tuple(x0.shape):
            raise ValueError(f"record step {i}: preds {tuple(preds.shape)} / x_t {tuple(x_t.shape)} do not match "
                             f"K+1 = {K + 1} conditions and x0 {tuple(x0.shape)}; the record must come from the run that made x0")
    xt = torch.stack(list(record.x_t)).to(x0.device)  # (R, B, *S)
    ts = torch.stack(list(record.t)).to(x0.device)  # (R, B)
    preds = torch.stack(list(record.preds)).to(x0.device)  # (R, K+1, B, *S)
    R = xt.shape[0]
    flat_t = ts.reshape(-1)
    x0r = x0.unsqueeze(0).expand(R, *x0.shape).reshape(R * B, *x0.shape[1:])
    noise = schedule.x0_to_eps(xt.reshape(R * B, *x0.shape[1:]).to(x0.dtype), x0r, flat_t).reshape_as(xt)
    part = lift_partial(noise, preds.to(noise.dtype), pixel_map=pixel_map, backend=backend)
    _check_finite(part.sum_wd)
    kk = torch.arange(K, device=x0.device)[:, None].expand(K, B).reshape(-1)
    bb = torch.arange(B, device=x0.device)[None, :].expand(K, B).reshape(-1)
    acc = sums.n.dtype
    pix = None if part.sum_wd_pixel is None else part.sum_wd_pixel.reshape(K * B, *part.sum_wd_pixel.shape[2:]).to(acc)
    sums.add(kk, bb, float(R), part.sum_wd.to(acc).reshape(-1), part.sum_wd2.to(acc).reshape(-1), pix)
