"""Annealed MCMC on a composed diffusion model (Reduce, Reuse, Recycle; Du et al. 2023).

The noise levels t_1 > ... > t_L (``schedule.timesteps(num_levels)`` or given) define the
annealed targets p_t(x) ~ exp(-E_t(x)), with score -grad E_t = -eps / sqrt(1 - abar_t). At each
level the chain (one per batch row) first takes a DDPM step from the previous level
(``diffusion_step``; RRR's "reverse diffusion + MCMC" sampler), then ``steps_per_level`` MCMC steps:

    ula   x' = x - eta grad E + sqrt(2 eta) z                       (no correction; eps only)
    mala  the same proposal, Metropolis-Hastings accept/reject with the energies
    hmc   ``leapfrog_steps`` leapfrog steps of size h with unit mass, momentum refreshed as
          v = damping v + sqrt(1 - damping^2) z (damping 0: full refresh; on reject v flips sign),
          Metropolis accept/reject on H = E + |v|^2 / 2

Step sizes: ``step_size`` (a float or (L,) per level) times sigma_t^2 = 1 - abar_t for ULA/MALA
(eta) and times sigma_t for HMC (h) when ``step_scale="noise"``; as given when "constant".

Step-size adaptation (``adapt=True``, the default): one step per level, shared by all chains, tuned
by Robbins-Monro on log(step) over the level's first ``adapt_steps`` MCMC steps (default: half of
them). After each, log(step) -= gain * clip(log(r / (1 - target_accept)), -1, 1), gain 0.4, with r
the chains' mean rejection probability 1 - min(1, exp(log_a)) (a NaN ratio rejects). The level's
remaining steps use the geometric mean of these iterates (Polyak averaging: it damps the
oscillation where the acceptance falls steeply with the step), and the next level starts from it;
the first level starts from ``step_size`` scaled as above (a per-level step_size tensor fixes the
steps and needs adapt=False). Default targets (TARGET_ACCEPT): MALA 0.574 (Roberts & Rosenthal
1998), HMC 0.75 (between Beskos et al. 2013's 0.651 and Stan's 0.8). ULA has no correction: it
adapts on the MALA acceptance of its own move, the energy difference taken by the trapezoid rule
from the two eps it evaluates anyway (exact for Gaussian levels; no energies needed), toward the
stricter 0.99, which holds ULA's bias to about +2% in std on Gaussian levels. MCMCResult.step_sizes
reports the adapted steps.

After the last level, ``final_denoise`` maps x to the predicted x0 (the last DDIM step);
``clip_x0`` clamps the predicted x0 in these diffusion steps as in ddim_sample.

``composition`` is an eps callable ``f(x_t (B, *S), t (B,)) -> eps`` for ULA, and must also have
``energy_and_eps(x_t, t) -> (E (B,), eps)`` for MALA and HMC (compkern.samplers.compositions with an
energy-parameterized model). Model evaluations are counted in rows (``composition.n_evals``).
A NaN energy or eps from the composition raises FloatingPointError naming t (one check per call);
+-inf energies are left to the Metropolis test, which rejects them.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from compkern.models.schedule import NoiseSchedule
from compkern.samplers.diffusion import ddim_step

__all__ = ["KINDS", "MCMCResult", "annealed_mcmc"]

KINDS = ("ula", "mala", "hmc")
TARGET_ACCEPT = {"ula": 0.99, "mala": 0.574, "hmc": 0.75}  # defaults of target_accept per kind
_ADAPT_GAIN = 0.4  # Robbins-Monro gain: log(step) -= gain * clip(log(rejection / target rejection), -1, 1)


@dataclass
class MCMCResult:
    """x (B, *S) the samples; timesteps (L,) the levels (descending); step_sizes (L,) float64 the
    step per level (eta for ULA/MALA, leapfrog h for HMC; with adaptation the adapted step, used
    for the level's steps after ``adapt_steps`` and carried to the next level); accept_rates (L,)
    the mean Metropolis acceptance per level over all its steps (None for ULA); n_evals the model
    rows evaluated; n_grad_calls the calls of the composed energy/eps (each evaluates K x B rows);
    target_accept the acceptance the steps were adapted toward (None without adaptation)."""

    x: torch.Tensor
    timesteps: torch.Tensor
    step_sizes: torch.Tensor
    accept_rates: torch.Tensor | None
    n_evals: int
    n_grad_calls: int
    target_accept: float | None = None

    @property
    def mean_accept(self) -> float | None:
        return None if self.accept_rates is None else float(self.accept_rates.mean())


def _has_energy(composition) -> bool:
    return callable(getattr(composition, "energy_and_eps", None)) and bool(getattr(composition, "has_energy", True))


def _check(kind, x_T, schedule, steps_per_level, leapfrog_steps, damping, step_scale, composition) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point() or x_T.dim() < 1:
        raise TypeError("x_T must be a floating-point tensor (B, *S)")
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    if not isinstance(steps_per_level, int) or steps_per_level < 1:
        raise ValueError(f"steps_per_level must be an int >= 1, got {steps_per_level!r}")
    if not isinstance(leapfrog_steps, int) or leapfrog_steps < 1:
        raise ValueError(f"leapfrog_steps must be an int >= 1, got {leapfrog_steps!r}")
    if not 0 <= damping < 1:
        raise ValueError(f"damping must lie in [0, 1), got {damping}")
    if step_scale not in ("noise", "constant"):
        raise ValueError(f"step_scale must be 'noise' or 'constant', got {step_scale!r}")
    if not callable(composition):
        raise TypeError("composition must be an eps callable f(x_t, t) (e.g. compkern.samplers.product(...))")
    if kind in ("mala", "hmc") and not _has_energy(composition):
        raise ValueError(f"composition has no energies, and kind={kind!r} needs energies for its Metropolis "
                         "correction: compose an energy-parameterized model (compkern.models.EnergyMLP), or use "
                         "kind='ula'")


def _adaptation(kind: str, adapt, target_accept, adapt_steps, steps_per_level: int) -> tuple[float | None, int]:
    """(target acceptance or None without adaptation, number of adapting steps per level)."""
    if not isinstance(adapt, bool):
        raise TypeError(f"adapt must be a bool, got {type(adapt).__name__}")
    if target_accept is not None:
        if isinstance(target_accept, bool) or not isinstance(target_accept, (int, float)):
            raise TypeError(f"target_accept must be a float in (0, 1), got {type(target_accept).__name__}")
        if not 0 < target_accept < 1:  # also rejects NaN
            raise ValueError(f"target_accept must lie in (0, 1), got {target_accept}")
    if adapt_steps is not None and (isinstance(adapt_steps, bool) or not isinstance(adapt_steps, int)
                                    or not 1 <= adapt_steps <= steps_per_level):
        raise ValueError(f"adapt_steps must be an int in [1, steps_per_level={steps_per_level}], got {adapt_steps!r}")
    if not adapt:
        return None, 0
    target = TARGET_ACCEPT[kind] if target_accept is None else float(target_accept)
    return target, max(1, steps_per_level // 2) if adapt_steps is None else adapt_steps


def _levels(schedule: NoiseSchedule, num_levels: int, timesteps) -> torch.Tensor:
    if timesteps is None:
        return schedule.timesteps(num_levels)
    ts = torch.as_tensor(timesteps)
    if ts.dtype not in (torch.int64, torch.int32) or ts.dim() != 1 or len(ts) < 1:
        raise ValueError("timesteps must be a non-empty 1-D integer tensor of levels")
    if int(ts.min()) < 0 or int(ts.max()) >= schedule.num_steps or bool((ts[1:] >= ts[:-1]).any()):
        raise ValueError(f"timesteps must be strictly descending in [0, {schedule.num_steps}), got {ts.tolist()}")
    return ts.long()


def _sum_rest(v: torch.Tensor) -> torch.Tensor:
    """(B, *S) -> (B,) float64 sums over all but the first axis."""
    return v.flatten(1).double().sum(1)


def _accept_prob(log_a: torch.Tensor) -> torch.Tensor:
    """Metropolis acceptance probabilities min(1, exp(log_a)) (B,), NaN -> 0."""
    return torch.nan_to_num(log_a.clamp(max=0).exp(), nan=0.0)


def _ula_log_accept(x0: torch.Tensor, x1: torch.Tensor, grad0: torch.Tensor, grad1: torch.Tensor,
                    eta: float) -> torch.Tensor:
    """MALA log acceptance ratio (B,) of the ULA move x0 -> x1 (B, *S), with the energy difference
    E(x1) - E(x0) by the trapezoid rule from grad E at both ends (exact for quadratic E)."""
    dE = 0.5 * _sum_rest((grad0 + grad1) * (x1 - x0))
    log_q_fwd = -_sum_rest((x1 - x0 + eta * grad0) ** 2) / (4 * eta)
    log_q_rev = -_sum_rest((x0 - x1 + eta * grad1) ** 2) / (4 * eta)
    return -dE + log_q_rev - log_q_fwd


def annealed_mcmc(composition, x_T: torch.Tensor, schedule: NoiseSchedule, *, kind: str = "ula",
                  num_levels: int = 50, timesteps: torch.Tensor | None = None, steps_per_level: int = 10,
                  step_size: float | torch.Tensor = 0.05, step_scale: str = "noise", adapt: bool = True,
                  target_accept: float | None = None, adapt_steps: int | None = None, leapfrog_steps: int = 3,
                  damping: float = 0.0, diffusion_step: bool = True, final_denoise: bool = True,
                  clip_x0: float | None = None, generator: torch.Generator | None = None, progress: bool = False) -> MCMCResult:
    """Annealed ULA / MALA / HMC from x_T (B, *S) (standard normal at the first level) through the
    levels; returns an MCMCResult (samples, per-level steps and acceptance rates, model evaluations).
    ``adapt`` tunes the step per level toward ``target_accept`` (default TARGET_ACCEPT[kind]) over
    the first ``adapt_steps`` steps of each level; ``step_size`` then only sets the first level's
    starting step.

    The steps: check the arguments and fix the levels and their base steps (``_fixed_steps``); per
    level, a DDPM step from the previous level, the energy and eps at the level's own t, then
    ``_run_level`` (the MCMC moves ``_ula_move`` / ``_mala_move`` / ``_hmc_move`` and the step
    adaptation ``_adapted``); finally the optional last DDIM step to x0."""
    _check(kind, x_T, schedule, steps_per_level, leapfrog_steps, damping, step_scale, composition)
    target, n_adapt = _adaptation(kind, adapt, target_accept, adapt_steps, steps_per_level)
    ts = _levels(schedule, num_levels, timesteps)
    L = len(ts)
    abar = schedule.alphas_cumprod
    sig2 = (1 - abar[ts])
    fixed_steps = _fixed_steps(step_size, adapt, L, kind, sig2, step_scale)
    chosen = torch.empty(L, dtype=torch.float64)
    f = _Composed(composition, need_energy=kind != "ula")
    evals0 = getattr(composition, "n_evals", None)
    rng = _Rng(generator)
    level_options = {"kind": kind, "steps_per_level": steps_per_level, "n_adapt": n_adapt, "target": target,
                     "leapfrog_steps": leapfrog_steps, "damping": damping}

    x = x_T
    B = x.shape[0]
    accept = torch.zeros(L, dtype=torch.float64) if kind != "ula" else None
    state = None  # (E, eps) at the current x and level
    h = float(fixed_steps[0])
    with torch.no_grad():
        for i, t in enumerate(tqdm(ts.tolist(), desc=f"annealed {kind}", disable=not progress, leave=False)):
            t_vec = torch.full((B,), t, dtype=torch.long, device=x.device)
            if i > 0 and diffusion_step:
                t_prev = int(ts[i - 1])
                x = ddim_step(x, state[1], float(abar[t_prev]), float(abar[t]), eta=1.0, clip_x0=clip_x0,
                              generator=generator)
            state = f(x, t_vec)  # every level: energy and eps of its own t
            if not adapt:
                h = float(fixed_steps[i])
            level = _Level(i, t, t_vec, float(sig2[i]) ** 0.5)
            x, state, h, accept_sum = _run_level(f, rng, x, state, h, level, **level_options)
            if accept is not None:
                accept[i] += accept_sum
            chosen[i] = h
            if not bool(torch.isfinite(x).all()):
                raise FloatingPointError(f"annealed {kind}: non-finite samples at level {i} (t={t})")
        if final_denoise:
            x = ddim_step(x, state[1], float(abar[ts[-1]]), 1.0, eta=0.0, clip_x0=clip_x0)
    if accept is not None:
        accept /= steps_per_level
    evals = getattr(composition, "n_evals", None)
    n_evals = evals - evals0 if isinstance(evals, int) and isinstance(evals0, int) else f.calls * B
    return MCMCResult(x=x, timesteps=ts, step_sizes=chosen, accept_rates=accept, n_evals=n_evals,
                      n_grad_calls=f.calls, target_accept=target)


def _fixed_steps(step_size, adapt: bool, L: int, kind: str, sig2: torch.Tensor, step_scale: str) -> torch.Tensor:
    """(L,) fp64: the step of each level without adaptation (``step_size`` times sigma_t^2 for
    ULA/MALA, sigma_t for HMC, with step_scale "noise"; sig2 (L,) = 1 - abar_t); [0] starts the
    adaptation. Checks step_size (a positive finite float, or (L,) with adapt=False)."""
    base = torch.as_tensor(step_size, dtype=torch.float64)
    if adapt and base.dim() != 0:
        raise ValueError("step_size: a per-level tensor fixes the steps; pass a float with adapt=True "
                         "(the first level's starting step) or adapt=False")
    if base.dim() == 0:
        base = base.expand(L)
    if base.shape != (L,):
        raise ValueError(f"step_size must be a float or a ({L},) tensor (one per level), got shape {tuple(base.shape)}")
    if not bool(torch.isfinite(base).all()) or bool((base <= 0).any()):
        raise ValueError(f"step_size must be positive and finite, got {base.tolist() if L <= 8 else 'a tensor with non-positive entries'}")
    scale = 1.0 if step_scale == "constant" else (sig2 if kind != "hmc" else sig2.sqrt())
    return (base * scale).double()


class _Composed:
    """The composition as (x (B, *S), t (B,)) -> (E (B,) or None for ULA, eps (B, *S) in x's dtype),
    counting its calls; a NaN energy or eps raises FloatingPointError naming t."""

    def __init__(self, composition, *, need_energy: bool):
        self.composition, self.need_energy, self.calls = composition, need_energy, 0

    def __call__(self, x: torch.Tensor, t_vec: torch.Tensor):
        self.calls += 1
        if self.need_energy:
            E, eps = self.composition.energy_and_eps(x, t_vec)
        else:
            E, eps = None, self.composition(x, t_vec)
        bad = eps.isnan().any() if E is None else eps.isnan().any() | E.isnan().any()
        if bool(bad):  # one check per call; +-inf is left to the Metropolis test (it rejects)
            what = "eps (score)" if E is None or not bool(E.isnan().any()) else "energy"
            raise FloatingPointError(f"annealed mcmc: the composition returned NaN {what} at t={int(t_vec[0])} "
                                     f"(call {self.calls}); check the model (and its energy parameterization) there")
        return E, eps.to(x.dtype)


class _Rng:
    """The chain's random draws, all from one ``generator``."""

    def __init__(self, generator: torch.Generator | None):
        self.generator = generator

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)

    def rand(self, n: int, device) -> torch.Tensor:
        return torch.rand(n, generator=self.generator, device=device)


@dataclass
class _Level:
    """Level i of the annealing: its timestep t, t_vec (B,) int64 and sigma_t = sqrt(1 - abar_t)."""

    i: int
    t: int
    t_vec: torch.Tensor
    sigma: float


def _run_level(f: _Composed, rng: _Rng, x: torch.Tensor, state: tuple, h: float, level: _Level, *, kind: str,
               steps_per_level: int, n_adapt: int, target: float | None, leapfrog_steps: int,
               damping: float) -> tuple[torch.Tensor, tuple, float, float]:
    """``steps_per_level`` MCMC moves at one level from x (B, *S) with state (E, eps) at x; the
    first ``n_adapt`` adapt the step h, the rest use the geometric mean of those iterates.
    Returns (x, state, the level's step, the sum over moves of the mean acceptance (0 for ULA))."""
    view = (x.shape[0],) + (1,) * (x.dim() - 1)
    v = rng.randn_like(x) if kind == "hmc" else None
    log_h_sum = 0.0  # of the level's adapted iterates
    accept_sum = 0.0
    for k in range(steps_per_level):
        if kind == "ula":
            x, state, log_a = _ula_move(f, rng, x, state, h, level, with_ratio=k < n_adapt)
        elif kind == "mala":
            x, state, log_a, rate = _mala_move(f, rng, x, state, h, level, view)
            accept_sum += rate
        else:
            x, v, state, log_a, rate = _hmc_move(f, rng, x, v, state, h, level, view, leapfrog_steps, damping)
            accept_sum += rate
        if k < n_adapt:
            h = _adapted(h, _accept_prob(log_a), target, level)
            log_h_sum += math.log(h)
            if k == n_adapt - 1:  # the average damps oscillation where acceptance falls steeply
                h = math.exp(log_h_sum / n_adapt)
    return x, state, h, accept_sum


def _ula_move(f: _Composed, rng: _Rng, x: torch.Tensor, state: tuple, h: float, level: _Level, *,
              with_ratio: bool):
    """x' = x - eta grad E + sqrt(2 eta) z on x (B, *S); returns (x', (E, eps) at x', the MALA log
    ratio (B,) of the move when ``with_ratio`` (for the adaptation only), else None)."""
    eps0 = state[1]
    xp = x - (h / level.sigma) * eps0 + math.sqrt(2 * h) * rng.randn_like(x)
    if not bool(torch.isfinite(xp).all()):
        raise FloatingPointError(f"annealed ULA diverged at level {level.i} (t={level.t}, eta={h:.3g}): "
                                 "lower step_size")
    state = f(xp, level.t_vec)
    log_a = _ula_log_accept(x, xp, eps0 / level.sigma, state[1] / level.sigma, h) if with_ratio else None
    return xp, state, log_a


def _mala_move(f: _Composed, rng: _Rng, x: torch.Tensor, state: tuple, h: float, level: _Level, view: tuple):
    """The ULA proposal with a Metropolis-Hastings accept/reject (NaN proposals are rejected);
    returns (x (B, *S), (E (B,), eps) at x, log acceptance ratio (B,) fp64, mean acceptance)."""
    E0, eps0 = state
    mean_f = x - (h / level.sigma) * eps0
    xp = mean_f + math.sqrt(2 * h) * rng.randn_like(x)
    Ep, epsp = f(xp, level.t_vec)
    mean_r = xp - (h / level.sigma) * epsp
    log_q_fwd = -_sum_rest((xp - mean_f) ** 2) / (4 * h)
    log_q_rev = -_sum_rest((x - mean_r) ** 2) / (4 * h)
    log_a = (E0.double() - Ep.double() + log_q_rev - log_q_fwd)
    acc = torch.log(rng.rand(x.shape[0], x.device)).double() < log_a  # NaN proposals are rejected
    x = torch.where(acc.view(view), xp, x)
    state = (torch.where(acc, Ep, E0), torch.where(acc.view(view), epsp, eps0))
    return x, state, log_a, acc.double().mean().item()


def _hmc_move(f: _Composed, rng: _Rng, x: torch.Tensor, v: torch.Tensor, state: tuple, h: float, level: _Level,
              view: tuple, leapfrog_steps: int, damping: float):
    """Partial momentum refresh, ``leapfrog_steps`` leapfrog steps of size h (unit mass), Metropolis
    on H = E + |v|^2 / 2 (on reject the momentum flips); returns (x (B, *S), v (B, *S), (E, eps)
    at x, log acceptance ratio (B,) fp64, mean acceptance)."""
    E0, eps0 = state
    v0 = damping * v + math.sqrt(1 - damping ** 2) * rng.randn_like(x)
    xn = x
    vn = v0 - (0.5 * h / level.sigma) * eps0
    for l in range(leapfrog_steps):
        xn = xn + h * vn
        En, epsn = f(xn, level.t_vec)
        vn = vn - ((h if l < leapfrog_steps - 1 else 0.5 * h) / level.sigma) * epsn
    log_a = ((E0.double() + 0.5 * _sum_rest(v0 ** 2)) - (En.double() + 0.5 * _sum_rest(vn ** 2)))
    acc = torch.log(rng.rand(x.shape[0], x.device)).double() < log_a
    x = torch.where(acc.view(view), xn, x)
    v = torch.where(acc.view(view), vn, -v0)
    state = (torch.where(acc, En, E0), torch.where(acc.view(view), epsn, eps0))
    return x, v, state, log_a, acc.double().mean().item()


def _adapted(h: float, prob: torch.Tensor, target: float, level: _Level) -> float:
    """The next step from h and the chains' acceptance probabilities prob (B,), in log space
    (Robbins-Monro on log h toward ``target``)."""
    mean_prob = float(prob.mean())
    log_ratio = math.log(max(1.0 - mean_prob, 1e-300) / (1.0 - target))  # rejection / target rejection
    h_new = math.exp(math.log(h) - _ADAPT_GAIN * min(max(log_ratio, -1.0), 1.0))
    if not math.isfinite(h_new) or h_new < sys.float_info.min:  # subnormal steps would stall, not shrink
        raise ValueError(f"step_size: the adapted step left the positive finite range (became {h_new:.3g}) at "
                         f"level {level.i} (t={level.t}): mean acceptance {mean_prob:.3g} vs target_accept={target}; the "
                         "composition's energies may be flat or non-finite there (check them, or pass "
                         "adapt=False with a fixed step_size)")
    return h_new
