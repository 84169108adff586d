"""CompLift's public CLEVR-position scorer: trials at given timesteps with one shared noise.

    lift(x0 | c_k) = mean over the trials t in ``timesteps`` of
                     sum_S [ (eps - eps(x_t, t, null))^2 - (eps - eps(x_t, t, c_k))^2 ],
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,

with ONE eps (*S) drawn once and shared by every sample, every condition, the null and every
trial. The public code (github.com/rainorangelemon/complift-2d-and-clevr, conf/clevr_base.yaml:
``elbo: n_samples: 1, same_noise: true, sample_timesteps: specified928``) scores each object with
this single trial at t = 928 of 1000 and rejects a sample when any component's lift is <= 0. It
takes the mean over S instead of the sum (this lift divided by prod(S)); the sign, which is all
the rejection reads, is the same. With shared noise the trials carry no error bar.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from compkern.lift.estimator import LiftResult, _stack
from compkern.models.base import EpsModel, evaluate_conditions
from compkern.models.schedule import NoiseSchedule
from compkern.ops import lift_partial

__all__ = ["PUBLIC_CLEVR_T", "fixed_t_lift"]

PUBLIC_CLEVR_T = 928  # the public CLEVR-position scorer's one trial ("specified928", of 1000 steps)


@torch.no_grad()
def fixed_t_lift(model: EpsModel, x0: torch.Tensor, conds: Any, null_cond: Any, schedule: NoiseSchedule, *,
                 timesteps: Sequence[int] = (PUBLIC_CLEVR_T,), chunk_size: int | None = None,
                 generator: torch.Generator | None = None) -> LiftResult:
    """x0 (B, *S); conds: K conditions (a list shared by the batch, or a tensor (K, B, *C));
    null_cond: the reference condition. One trial per entry of ``timesteps`` (ints in
    [0, num_steps)), all with the same noise eps (*S) drawn from ``generator``. Returns a
    LiftResult: lift (K, B) in estimate_lift's units (sum over S, mean over trials), stderr
    (K, B) inf, n_trials (K, B), n_evals = (K + 1) * B * len(timesteps) model rows."""
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point() or x0.dim() < 2:
        raise ValueError(f"x0 must be a float tensor (B, *S), got "
                         f"{tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__}")
    if not bool(torch.isfinite(x0).all()):
        raise ValueError("x0 holds NaN or inf")
    T = schedule.num_steps
    ts = list(timesteps) if isinstance(timesteps, (list, tuple)) else None
    if not ts or any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < T for t in ts):
        raise ValueError(f"timesteps must be a non-empty list of ints in [0, {T}), got {timesteps!r}")
    B, S, dev = x0.shape[0], tuple(x0.shape[1:]), x0.device
    full = _stack(conds, null_cond, B, dev)  # (K+1, B, *C), the reference first
    K = full.shape[0] - 1
    if K < 1:
        raise ValueError("conds must hold at least one condition")
    eps = torch.randn(S, generator=generator).to(device=dev, dtype=x0.dtype)
    noise = eps.expand(B, *S)
    total = None
    for t in ts:
        t_vec = torch.full((B,), t, dtype=torch.long, device=dev)
        preds = evaluate_conditions(model, schedule.add_noise(x0, noise, t_vec), t_vec, full, chunk_size=chunk_size)
        part = lift_partial(noise.unsqueeze(0).contiguous(), preds.unsqueeze(0).to(x0.dtype))
        total = part if total is None else total + part
    lift = total.mean
    return LiftResult(lift=lift, stderr=torch.full_like(lift, float("inf")), n_trials=torch.full((K, B), len(ts)),
                      n_evals=(K + 1) * B * len(ts))
