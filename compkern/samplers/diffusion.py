"""Reverse diffusion on any eps callable: DDIM (eta = 0) and ancestral DDPM (eta = 1), and any
diffusers scheduler's ``step`` (``scheduler_sample``: DPM-Solver++, Euler, UniPC, ..., and the
flow-matching schedulers of SD3, which step a velocity).

DDIM and DDPM use the same step (Song et al. 2021, eq. 12) on an evenly spaced subsequence of the
training timesteps; with eta = 1 it is the DDPM posterior of the respaced chain.
"""
from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from compkern.models.schedule import NoiseSchedule

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None


def randn_like_rows(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise shaped like x (B, *S): from one generator, or row b from generator[b]
    (one per sample, as diffusers takes a list, so a sample's noise does not depend on its batch)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if len(generator) != x.shape[0]:
        raise ValueError(f"generator: a list needs one generator per sample ({x.shape[0]}), got {len(generator)}")
    return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype) for g in generator]).to(x.device)


def ddim_sample(eps_fn: EpsFn, x_T: torch.Tensor, schedule: NoiseSchedule, *, num_steps: int = 50,
                eta: float = 0.0, clip_x0: float | None = None, generator: Generators = None,
                progress: bool = False, on_step: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None
                ) -> torch.Tensor:
    """x_T (B, *S) standard normal -> x_0 (B', *S). eps_fn(x_t, t (B,) int64) -> eps (B, *S).
    ``clip_x0`` clamps the predicted x0 to [-clip_x0, clip_x0] at each step; ``generator``: one,
    or a list of B (see ``randn_like_rows``). NaN or inf eps raises FloatingPointError naming the
    step. ``on_step(s, x)`` runs after s steps; it may return a (B,) bool mask of the samples that
    go on (early rejection): the others leave the batch (their generators too; the caller
    narrows eps_fn's own per-sample state), so B' <= B rows come back."""
    if not isinstance(x_T, torch.Tensor) or x_T.dim() < 1:
        raise TypeError("x_T must be a tensor (B, *S)")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if not bool(torch.isfinite(x_T).all()):
        raise ValueError("x_T holds NaN or inf")
    abar = schedule.alphas_cumprod
    ts = schedule.timesteps(num_steps)
    x = x_T
    for i, t in enumerate(tqdm(ts.tolist(), desc="sampling", disable=not progress, leave=False)):
        if x.shape[0] == 0:
            break
        t_vec = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        eps = eps_fn(x, t_vec).to(x.dtype)
        if not bool(torch.isfinite(eps).all()):  # one check per step
            raise FloatingPointError(f"ddim_sample: the eps model returned NaN or inf at step {i} of {len(ts)} "
                                     f"(t={t}); check the model (and the composition weights) there")
        a_t = float(abar[t])
        a_prev = float(abar[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        x = ddim_step(x, eps, a_t, a_prev, eta=eta, clip_x0=clip_x0, generator=generator)
        keep = on_step(i + 1, x) if on_step is not None else None
        if keep is not None and not bool(keep.all()):
            if keep.shape != (x.shape[0],) or keep.dtype != torch.bool:
                raise ValueError(f"on_step must return a ({x.shape[0]},) bool mask or None, got {tuple(keep.shape)} {keep.dtype}")
            x = x[keep.to(x.device)]
            if generator is not None and not isinstance(generator, torch.Generator):
                generator = [g for g, k in zip(generator, keep.tolist()) if k]
    return x


def ddim_step(x: torch.Tensor, eps: torch.Tensor, a_t: float | torch.Tensor, a_prev: float | torch.Tensor, *,
              eta: float = 0.0, clip_x0: float | None = None, generator: Generators = None) -> torch.Tensor:
    """One step x_t -> x_prev (Song et al. 2021, eq. 12) given eps at x_t; a_t, a_prev are
    alphas_cumprod at t and at the previous (less noisy) level (1.0 for x0): numbers, or (B,)
    tensors, one level per sample (continuous batching: every sample at its own step). The
    coefficients are computed in fp64. Noise is drawn only for the samples whose sigma > 0."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    a_t = torch.as_tensor(a_t, dtype=torch.float64).reshape(shape)
    a_prev = torch.as_tensor(a_prev, dtype=torch.float64).reshape(shape)
    c = lambda v: v.to(device=x.device, dtype=x.dtype)  # noqa: E731
    x0 = (x - c((1 - a_t) ** 0.5) * eps) / c(a_t ** 0.5)
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
        eps = (x - c(a_t ** 0.5) * x0) / c((1 - a_t) ** 0.5)
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
    x = c(a_prev ** 0.5) * x0 + c((1 - a_prev - sigma ** 2).clamp(min=0.0) ** 0.5) * eps
    noisy = (sigma > 0).flatten().expand(x.shape[0])
    if bool(noisy.all()):
        x = x + c(sigma) * randn_like_rows(x, generator)
    elif bool(noisy.any()):
        rows = noisy.nonzero().flatten()
        gens = generator if generator is None or isinstance(generator, torch.Generator) else [generator[i] for i in rows]
        x[rows] = x[rows] + c(sigma.expand(x.shape[0], *shape[1:])[rows]) * randn_like_rows(x[rows], gens)
    return x


def ddpm_sample(eps_fn: EpsFn, x_T: torch.Tensor, schedule: NoiseSchedule, *, num_steps: int | None = None,
                clip_x0: float | None = None, generator: torch.Generator | None = None,
                progress: bool = False) -> torch.Tensor:
    """Ancestral sampling (DDIM with eta = 1); num_steps None uses every training step."""
    return ddim_sample(eps_fn, x_T, schedule, num_steps=num_steps or schedule.num_steps, eta=1.0,
                       clip_x0=clip_x0, generator=generator, progress=progress)


def _clip_eps(x_t: torch.Tensor, eps: torch.Tensor, schedule: NoiseSchedule, t: torch.Tensor, clip_x0: float) -> torch.Tensor:
    """eps whose predicted x0 at x_t (VP scaling) is clamped to [-clip_x0, clip_x0]."""
    x0 = schedule.eps_to_x0(x_t, eps, t).clamp(-clip_x0, clip_x0)
    return schedule.x0_to_eps(x_t, x0, t)


def check_scheduler(scheduler) -> None:
    """TypeError unless ``scheduler`` has a diffusers scheduler's set_timesteps, step and config."""
    if not (hasattr(scheduler, "step") and hasattr(scheduler, "set_timesteps") and hasattr(scheduler, "config")):
        raise TypeError(f"scheduler must be a diffusers scheduler instance (set_timesteps, step, config) or a name, "
                        f"got {type(scheduler).__name__}")


def is_flow_scheduler(scheduler) -> bool:
    """Whether a diffusers scheduler steps a flow-matching velocity (FlowMatchEulerDiscreteScheduler,
    ...; SD3, SD3.5): x_sigma = (1 - sigma) x0 + sigma eps, timesteps sigma * num_train_timesteps."""
    return type(scheduler).__name__.startswith("FlowMatch")


def epsilon_scheduler(scheduler):
    """A fresh copy of a diffusers scheduler (same class and config) that takes eps predictions
    (composition combines eps, so a v-prediction model's outputs are converted before the step)."""
    check_scheduler(scheduler)
    config = dict(scheduler.config)
    if "prediction_type" in config:
        config["prediction_type"] = "epsilon"
    return type(scheduler).from_config(config)


def scheduler_sample(eps_fn: EpsFn, x_T: torch.Tensor, scheduler, *, num_steps: int = 50,
                     schedule: NoiseSchedule | None = None, clip_x0: float | None = None, eta: float = 0.0,
                     generator: Generators = None, progress: bool = False,
                     on_step: Callable[[int, torch.Tensor], None] | None = None,
                     timestep_kwargs: dict | None = None) -> torch.Tensor:
    """x_T (B, *S) standard normal -> x_0 (B, *S) through a diffusers scheduler's ``step``, as
    diffusers' pipelines call it: x = x_T * init_noise_sigma; per timestep t the model sees
    ``scale_model_input(x, t)`` (the variance-preserving x_t at t, which is what a record keeps)
    and eps_fn(x_t, t (B,)) -> eps goes to ``step`` (a copy of the scheduler set to eps
    predictions, ``epsilon_scheduler``; its own state is never touched). ``eta`` goes to the
    step where it takes one (DDIM), ``generator`` (one, or one per sample) where it draws noise.
    clip_x0 (needs ``schedule``, the model's noise schedule) clamps the predicted x0 before the
    step. NaN or inf eps raises FloatingPointError naming the step. ``on_step(s, x)`` runs after s
    steps (it may change x in place; no sample leaves the batch here: a multistep scheduler's
    history is batch-wide). A flow-matching scheduler (``is_flow_scheduler``) steps x in its own
    coordinates: eps_fn(x, t) returns the velocity there (no input scaling; clip_x0 is refused).
    ``timestep_kwargs`` go to ``set_timesteps`` (e.g. ``mu`` of a dynamically shifted flow schedule)."""
    if not isinstance(x_T, torch.Tensor) or x_T.dim() < 1:
        raise TypeError("x_T must be a tensor (B, *S)")
    if not bool(torch.isfinite(x_T).all()):
        raise ValueError("x_T holds NaN or inf")
    if clip_x0 is not None and schedule is None:
        raise ValueError("clip_x0 needs the model's noise schedule (schedule=)")
    flow = is_flow_scheduler(scheduler)
    if flow and clip_x0 is not None:
        raise ValueError("clip_x0 clamps a variance-preserving x0: a flow-matching scheduler takes clip_x0=None")
    sched = epsilon_scheduler(scheduler)
    sched.set_timesteps(num_steps, device=x_T.device, **(timestep_kwargs or {}))
    takes = inspect.signature(sched.step).parameters
    kw = {}
    if "eta" in takes:
        kw["eta"] = float(eta)
    elif eta:
        raise ValueError(f"eta={eta}: {type(sched).__name__}.step takes no eta")
    if "generator" in takes and generator is not None:
        kw["generator"] = generator if isinstance(generator, torch.Generator) else list(generator)
    x = x_T if flow else x_T * sched.init_noise_sigma
    timesteps = sched.timesteps
    for i, t in enumerate(tqdm(timesteps, desc="sampling", disable=not progress, leave=False)):
        x_t = x if flow else sched.scale_model_input(x, t)
        t_vec = t.reshape(1).expand(x.shape[0]).to(x.device)
        eps = eps_fn(x_t, t_vec).to(x.dtype)
        if not bool(torch.isfinite(eps).all()):
            raise FloatingPointError(f"scheduler_sample: the model returned NaN or inf at step {i} of "
                                     f"{len(timesteps)} (t={float(t)}); check the model (and the composition weights) there")
        if clip_x0 is not None:
            eps = _clip_eps(x_t, eps, schedule, t_vec, clip_x0)
        x = sched.step(eps, t, x, return_dict=False, **kw)[0]
        if on_step is not None and on_step(i + 1, x) is not None:
            raise ValueError("scheduler_sample: on_step must return None (samples cannot leave a scheduler's batch)")
    return x
