"""The public CompLift 2-D lift: each condition's own model, tempered, stands in for p(x).

    lift(x0 | c) = ELBO(eps_c) - ELBO(alpha * eps_c)
                 = E_{t, eps} mean_d[ (eps - alpha eps_c(x_t, t))^2 - (eps - eps_c(x_t, t))^2 ]

with ELBO(f) = -E mean_d (eps - f(x_t, t))^2. Scaling a score by alpha is the score of the tempered
density p_c^alpha, so the lift is ~ (1 - alpha) log p_c(x0) + const: positive where p_c is high
relative to its own spread, with no separate unconditional model. Per trial and coordinate the
value is 2 (1 - alpha) eps e - (1 - alpha^2) e^2, e = eps_c(x_t, t).

As in the public code (alpha 0.9, 50 trials, ``sample_timesteps: random``, ``same_noise: false``):
every trial draws one t uniform in [0, num_steps) and one eps (D,), shared by all samples of the
batch and by all conditions; the tempered copy reuses the same model output (one row per sample,
trial and condition; the public code evaluates it twice).
"""
from __future__ import annotations

from typing import Sequence

import torch

from compkern.lift.estimator import LiftResult
from compkern.models.base import EpsModel, evaluate_conditions
from compkern.models.schedule import NoiseSchedule
from compkern.ops import lift_partial

__all__ = ["tempered_lift"]


def tempered_lift(model: EpsModel, x0: torch.Tensor, conds: Sequence[int], schedule: NoiseSchedule, *,
                  n_trials: int = 50, alpha: float = 0.9, t_max: int | None = None, chunk_trials: int = 10,
                  generator: torch.Generator | None = None) -> LiftResult:
    """x0 (B, D), K condition ids -> LiftResult with lift, stderr, n_trials (K, B) (the mean over
    the D coordinates, as the public code), n_evals = K * n_trials * B model rows. Trials draw t
    uniform in [0, t_max) (default: the whole schedule)."""
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point() or x0.dim() != 2:
        raise ValueError(f"x0 must be a float tensor (B, D), got {getattr(x0, 'shape', type(x0).__name__)}")
    if n_trials < 1 or chunk_trials < 1:
        raise ValueError(f"n_trials and chunk_trials must be positive, got {n_trials}, {chunk_trials}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    t_max = schedule.num_steps if t_max is None else t_max
    if not 1 <= t_max <= schedule.num_steps:
        raise ValueError(f"t_max must lie in [1, {schedule.num_steps}], got {t_max}")
    conds = list(conds)
    if not conds:
        raise ValueError("conds must name at least one condition")
    B, D = x0.shape
    K = len(conds)
    t_all = torch.randint(0, t_max, (n_trials,), generator=generator)
    eps_all = torch.randn(n_trials, D, generator=generator).to(x0)
    parts: list = [None] * K
    for s in range(0, n_trials, chunk_trials):
        t, eps = t_all[s:s + chunk_trials], eps_all[s:s + chunk_trials]
        T = t.shape[0]
        noise = eps[:, None, :].expand(T, B, D)
        x_t = schedule.add_noise(x0.unsqueeze(0).expand(T, B, D).reshape(T * B, D), noise.reshape(T * B, D),
                                 t.repeat_interleave(B))
        with torch.no_grad():
            preds = evaluate_conditions(model, x_t, t.repeat_interleave(B), conds).view(K, T, B, D)
        for k in range(K):
            part = lift_partial(noise.contiguous(), torch.stack([alpha * preds[k], preds[k]], dim=1))
            parts[k] = part if parts[k] is None else parts[k] + part
    lift = torch.cat([p.mean for p in parts]) / D
    stderr = torch.cat([p.stderr for p in parts]) / D
    return LiftResult(lift=lift, stderr=stderr, n_trials=torch.full((K, B), n_trials), n_evals=K * n_trials * B)
