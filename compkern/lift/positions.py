"""CompLift's acceptance rule for the multi-object positions benchmark: keep a scene when the
lift of every requested object is > 0 (an AND over the objects), with three scorers: compkern's
estimator at fixed or adaptive uniform-t trials, and the public CLEVR one-trial scorer
(``compkern.lift.fixed_t``)."""
from __future__ import annotations

from typing import Sequence

import torch

from compkern.data.clevr import background_cond, null_cond, position_cond
from compkern.lift.estimator import estimate_lift
from compkern.lift.expr import parse
from compkern.lift.fixed_t import PUBLIC_CLEVR_T, fixed_t_lift
from compkern.models.position_unet import position_schedule

__all__ = ["LIFT_MODES", "accept_positions"]

LIFT_MODES = ("fixed", "adaptive", "public")


def accept_positions(lift_model, x: torch.Tensor, positions: torch.Tensor, *, mode: str = "fixed", n_trials: int = 24,
                    lift_t: Sequence[int] = (PUBLIC_CLEVR_T,), lift_base: str = "null", chunk_size: int | None = None,
                    generator: torch.Generator | None = None) -> dict:
    """CompLift's rejection of scenes x (B, 3, H, W) with objects requested at positions (B, n, 2):
    keep a scene when the lift of every requested object is > 0, taken against ``lift_base``: "null"
    (CompLift: log p(x|y) - log p(x)) or "background" (log p(x|y) - log p(x|empty scene)).
    mode "fixed": ``n_trials`` uniform-t trials each (compkern.lift.estimate_lift); "adaptive": stop
    per sample once the AND is certain at z = 2, at most ``n_trials`` per object; "public": the public
    CLEVR scorer, one trial per entry of ``lift_t`` with one noise shared by every sample and
    condition (compkern.lift.fixed_t). Returns {"accept": (B,) bool, "n_evals": model rows}."""
    if mode not in LIFT_MODES:
        raise ValueError(f"mode must be one of {LIFT_MODES}, got {mode!r}")
    if lift_base not in ("null", "background"):
        raise ValueError(f"lift_base must be 'null' or 'background', got {lift_base!r}")
    n = positions.shape[1]
    if n == 0:
        return {"accept": torch.ones(x.shape[0], dtype=torch.bool), "n_evals": 0}
    conds = position_cond(positions).transpose(0, 1).contiguous()  # (n, B, 3)
    expr = parse(" AND ".join(f"o{i}" for i in range(n)))
    ref = null_cond() if lift_base == "null" else background_cond()
    if mode == "public":
        res = fixed_t_lift(lift_model, x, conds, ref, position_schedule(), timesteps=list(lift_t), chunk_size=chunk_size,
                           generator=generator)
    else:
        adaptive = mode == "adaptive"
        res = estimate_lift(lift_model, x, conds, ref, position_schedule(), n_trials=n_trials, adaptive=adaptive,
                            expr=expr if adaptive else None, z=2.0, min_trials=4, chunk_trials=4 if adaptive else 8,
                            chunk_size=chunk_size, generator=generator)
    return {"accept": expr.accept(res.lift), "n_evals": int(res.n_evals)}
