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
After the last level, ``final_denoise`` maps x to the predicted x0 (the last DDIM step);
``clip_x0`` clamps the predicted x0 in these diffusion steps as in ddim_sample.

``composition`` is an eps callable ``f(x_t (B, *S), t (B,)) -> eps`` for ULA, and must also have
``energy_and_eps(x_t, t) -> (E (B,), eps)`` for MALA and HMC (compkern.samplers.compositions with an
energy-parameterized model). Model evaluations are counted in rows (``composition.n_evals``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from compkern.models.schedule import NoiseSchedule
from compkern.samplers.diffusion import ddim_step

__all__ = ["MCMCResult", "annealed_mcmc", "KINDS"]

KINDS = ("ula", "mala", "hmc")


@dataclass
class MCMCResult:
    """x (B, *S) the samples; timesteps (L,) the levels (descending); step_sizes (L,) the step
    used per level (eta for ULA/MALA, leapfrog h for HMC); accept_rates (L,) the mean Metropolis
    acceptance per level (None for ULA); n_evals the model rows evaluated; n_grad_calls the calls
    of the composed energy/eps (each evaluates K x B rows)."""

    x: torch.Tensor
    timesteps: torch.Tensor
    step_sizes: torch.Tensor
    accept_rates: torch.Tensor | None
    n_evals: int
    n_grad_calls: int

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
        raise ValueError(f"kind={kind!r} needs energies for its Metropolis correction: compose an "
                         "energy-parameterized model (compkern.models.EnergyMLP), or use kind='ula'")


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
    return v.flatten(1).sum(1)


def annealed_mcmc(composition, x_T: torch.Tensor, schedule: NoiseSchedule, *, kind: str = "ula",
                  num_levels: int = 50, timesteps: torch.Tensor | None = None, steps_per_level: int = 10,
                  step_size: float | torch.Tensor = 0.05, step_scale: str = "noise", leapfrog_steps: int = 3,
                  damping: float = 0.0, diffusion_step: bool = True, final_denoise: bool = True,
                  clip_x0: float | None = None, generator: torch.Generator | None = None, progress: bool = False) -> MCMCResult:
    """Annealed ULA / MALA / HMC from x_T (B, *S) (standard normal at the first level) through the
    levels; returns an MCMCResult (samples, per-level acceptance rates, model evaluations)."""
    _check(kind, x_T, schedule, steps_per_level, leapfrog_steps, damping, step_scale, composition)
    ts = _levels(schedule, num_levels, timesteps)
    L = len(ts)
    base = torch.as_tensor(step_size, dtype=torch.float64)
    if base.dim() == 0:
        base = base.expand(L)
    if base.shape != (L,):
        raise ValueError(f"step_size must be a float or a ({L},) tensor (one per level), got shape {tuple(base.shape)}")
    if not bool(torch.isfinite(base).all()) or bool((base <= 0).any()):
        raise ValueError(f"step_size must be positive and finite, got {base.tolist() if L <= 8 else 'a tensor with non-positive entries'}")
    abar = schedule.alphas_cumprod
    sig2 = (1 - abar[ts])
    scale = 1.0 if step_scale == "constant" else (sig2 if kind != "hmc" else sig2.sqrt())
    steps = (base * scale).double()

    need_energy = kind != "ula"
    counter = {"calls": 0}
    evals0 = getattr(composition, "n_evals", None)

    def energy_eps(x: torch.Tensor, t_vec: torch.Tensor):
        counter["calls"] += 1
        if need_energy:
            E, eps = composition.energy_and_eps(x, t_vec)
        else:
            E, eps = None, composition(x, t_vec)
        return E, eps.to(x.dtype)

    def randn_like(x):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    def rand(n, device):
        return torch.rand(n, generator=generator, device=device)

    x = x_T
    B = x.shape[0]
    view = (B,) + (1,) * (x.dim() - 1)
    accept = torch.zeros(L, dtype=torch.float64) if need_energy else None
    state = None  # (E, eps) at the current x and level
    v = None
    with torch.no_grad():
        for i, t in enumerate(tqdm(ts.tolist(), desc=f"annealed {kind}", disable=not progress, leave=False)):
            t_vec = torch.full((B,), t, dtype=torch.long, device=x.device)
            if i > 0 and diffusion_step:
                t_prev = int(ts[i - 1])
                x = ddim_step(x, state[1], float(abar[t_prev]), float(abar[t]), eta=1.0, clip_x0=clip_x0,
                              generator=generator)
                state = None
            sigma = float(sig2[i]) ** 0.5
            if state is None:
                state = energy_eps(x, t_vec)
            h = float(steps[i])
            if kind == "hmc":
                v = randn_like(x)
            for _ in range(steps_per_level):
                E0, eps0 = state
                if kind == "ula":
                    x = x - (h / sigma) * eps0 + math.sqrt(2 * h) * randn_like(x)
                    if not bool(torch.isfinite(x).all()):
                        raise FloatingPointError(f"annealed ULA diverged at level {i} (t={t}, eta={h:.3g}): "
                                                 "lower step_size")
                    state = energy_eps(x, t_vec)
                elif kind == "mala":
                    mean_f = x - (h / sigma) * eps0
                    xp = mean_f + math.sqrt(2 * h) * randn_like(x)
                    Ep, epsp = energy_eps(xp, t_vec)
                    mean_r = xp - (h / sigma) * epsp
                    log_q_fwd = -_sum_rest((xp - mean_f) ** 2) / (4 * h)
                    log_q_rev = -_sum_rest((x - mean_r) ** 2) / (4 * h)
                    log_a = (E0 - Ep + log_q_rev - log_q_fwd).float()
                    acc = torch.log(rand(B, x.device)) < log_a  # NaN proposals are rejected
                    x = torch.where(acc.view(view), xp, x)
                    state = (torch.where(acc, Ep, E0), torch.where(acc.view(view), epsp, eps0))
                    accept[i] += acc.double().mean().item()
                else:  # hmc
                    v0 = damping * v + math.sqrt(1 - damping ** 2) * randn_like(x)
                    xn = x
                    vn = v0 - (0.5 * h / sigma) * eps0
                    for l in range(leapfrog_steps):
                        xn = xn + h * vn
                        En, epsn = energy_eps(xn, t_vec)
                        vn = vn - ((h if l < leapfrog_steps - 1 else 0.5 * h) / sigma) * epsn
                    log_a = ((E0 + 0.5 * _sum_rest(v0 ** 2)) - (En + 0.5 * _sum_rest(vn ** 2))).float()
                    acc = torch.log(rand(B, x.device)) < log_a
                    x = torch.where(acc.view(view), xn, x)
                    v = torch.where(acc.view(view), vn, -v0)
                    state = (torch.where(acc, En, E0), torch.where(acc.view(view), epsn, eps0))
                    accept[i] += acc.double().mean().item()
            if not bool(torch.isfinite(x).all()):
                raise FloatingPointError(f"annealed {kind}: non-finite samples at level {i} (t={t})")
        if final_denoise:
            x = ddim_step(x, state[1], float(abar[ts[-1]]), 1.0, eta=0.0, clip_x0=clip_x0)
    if accept is not None:
        accept /= steps_per_level
    evals = getattr(composition, "n_evals", None)
    n_evals = evals - evals0 if isinstance(evals, int) and isinstance(evals0, int) else counter["calls"] * B
    return MCMCResult(x=x, timesteps=ts, step_sizes=steps.float(), accept_rates=accept, n_evals=n_evals,
                      n_grad_calls=counter["calls"])
