"""Early rejection of images in `compkern generate`: the partial CompLift evidence of a candidate
image, as lift maps.

After ``s`` of ``S`` sampling steps the record already holds s steps' predictions of every
condition row, so a partial lift map is free. ``partial_margins`` turns it into one number per
candidate, the expression's margin (``Expr.margin`` of the per-component object scores, in pixel
counts; positive where the partial maps alone would accept):

- a pure AND (target 'joint', ``lift_maps.resolve_target``): the joint caption's cached maps over
  the steps so far;
- anything else (a NOT / OR term): the noise target on the steps so far, recovered against the
  predicted x0 of the last of them (the final x0 does not exist yet).

The rule that reads the margins, its split-conformal calibration on a pilot and the check
helpers are ``compkern.lift.early_reject`` (re-exported here).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from compkern.lift.early_reject import (CHECK_AT, EarlyRejectRule, check_checks, check_confidence,  # noqa: F401
                                        default_checks, min_pilot_accepts)
from compkern.pipelines import lift_maps as LM
from compkern.samplers.composed import compose_eps


def partial_maps(comp, record, s: int, *, record_every: int = 1, schedule=None, weights: torch.Tensor | None = None,
                 clip_x0: float | None = None, negation: str = "linear") -> LM.LiftMaps:
    """Lift maps (K, B, h, w) from the steps of ``record`` taken before step ``s`` (record_every:
    the record's step spacing). Pure AND: joint target; else noise against the predicted x0 of
    the last of those steps (needs ``schedule``, the generation ``weights`` (R - 1,) and its ``negation``)."""
    n_rec = math.ceil(s / record_every)
    if not 1 <= n_rec <= len(record):
        raise ValueError(f"check after {s} steps needs recorded steps 0..{n_rec - 1}; the record holds {len(record)}")
    signs = torch.tensor(comp.signs)
    steps = slice(0, n_rec)
    if LM.resolve_target("auto", comp.expression.required(), comp.K) == "joint":
        return LM.cached_lift_maps(record, signs, target="joint", joint_row=comp.joint_row, steps=steps)
    if schedule is None or weights is None:
        raise ValueError("a partial noise-target map needs the schedule and the generation weights")
    j = n_rec - 1
    x_t, t, preds = record.x_t[j], record.t[j], record.preds[j]
    x0 = schedule.eps_to_x0(x_t.float(), compose_eps(preds, weights.to(preds.device), negation).float(), t)
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
    return LM.cached_lift_maps(record, signs, target="noise", latents=x0, schedule=schedule, steps=steps)


def partial_margins(comp, record, checks: Sequence[int], **kw) -> torch.Tensor:
    """(len(checks), B) fp32: ``Expr.margin`` of the partial maps' object scores at each check
    (keywords of ``partial_maps``)."""
    return torch.stack([comp.expression.margin(partial_maps(comp, record, s, **kw).scores()) for s in checks])
