"""Early rejection: stop sampling a candidate whose partial CompLift evidence says it will be rejected.

After ``s`` of ``S`` sampling steps the record already holds s steps' predictions of every
condition row, so a partial lift map is free. ``partial_margins`` turns it into one number per
candidate, the expression's margin (``Expr.margin`` of the per-component object scores, in pixel
counts; positive where the partial maps alone would accept):

- a pure AND (target 'joint', ``lift_maps.resolve_target``): the joint caption's cached maps over
  the steps so far;
- anything else (a NOT / OR term): the noise target on the steps so far, recovered against the
  predicted x0 of the last of them (the final x0 does not exist yet).

``EarlyRejectRule`` drops a candidate at check ``i`` when its margin there is below
``thresholds[i]``. ``EarlyRejectRule.calibrate`` sets each threshold from a pilot of full
trajectories (their margins at the checks and their final decisions): the (k+1)-th smallest
margin among the n pilot images finally accepted, k + 1 = floor(alpha (n + 1)), alpha =
(1 - confidence) / number of checks. For a new image exchangeable with the pilot and finally
accepted, the chance to fall below it is (k + 1) / (n + 1) <= alpha at each check, so it survives
every check with probability >= confidence (split conformal, Bonferroni over the checks). Too few
pilot accepts for that (k + 1 = 0) leave the check off (threshold -inf); confidence 1 turns every
check off, i.e. exactly the full-trajectory decisions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from compkern.pipelines import lift_maps as LM
from compkern.samplers.composed import compose_eps


def check_confidence(confidence: float) -> float:
    if not isinstance(confidence, (int, float)) or not 0.5 < float(confidence) <= 1.0:
        raise ValueError(f"confidence (--early-reject) must lie in (0.5, 1], got {confidence!r}")
    return float(confidence)


def min_pilot_accepts(confidence: float, n_checks: int = 1) -> int:
    """The fewest finally-accepted pilot images for which ``EarlyRejectRule.calibrate`` turns a
    check on at ``confidence``: n with floor(alpha (n + 1)) >= 1, alpha = (1 - confidence) / n_checks
    (19 for one check at 0.95); 0 at confidence 1 (every check stays off)."""
    alpha = (1 - check_confidence(confidence)) / n_checks
    return 0 if alpha <= 0 else max(0, math.ceil(1 / alpha - 1 - 1e-9))


CHECK_AT = 0.4  # the default check, a fraction of the steps


def default_checks(num_steps: int, at: float = CHECK_AT) -> tuple[int, ...]:
    """One check after the fraction ``at`` of the steps (default 0.4: 20 of 50, where the shapes
    world's probe separated the images best; benchmarks/RESULTS.md)."""
    if not 0 < at < 1:
        raise ValueError(f"the check (--early-check) must be a fraction of the steps in (0, 1), got {at}")
    return (max(1, min(num_steps - 1, round(at * num_steps))),)


def check_checks(checks: Sequence[int], num_steps: int) -> tuple[int, ...]:
    checks = tuple(int(c) for c in checks)
    if not checks or any(not 1 <= c < num_steps for c in checks) or list(checks) != sorted(set(checks)):
        raise ValueError(f"checks must be increasing step counts in [1, {num_steps - 1}] (steps done before a "
                         f"check), got {checks}")
    return checks


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


@dataclass(frozen=True)
class EarlyRejectRule:
    """Drop a candidate after ``checks[i]`` steps when its partial margin is below ``thresholds[i]``."""

    checks: tuple[int, ...]
    thresholds: tuple[float, ...]
    confidence: float

    def __post_init__(self):
        check_confidence(self.confidence)
        if len(self.checks) != len(self.thresholds):
            raise ValueError(f"one threshold per check: {len(self.checks)} checks, {len(self.thresholds)} thresholds")

    def keep(self, i: int, margins: torch.Tensor) -> torch.Tensor:
        """margins (B,) at check i -> (B,) bool, the candidates that go on."""
        return margins >= self.thresholds[i]

    @classmethod
    def calibrate(cls, margins: torch.Tensor, accepted: torch.Tensor, checks: Sequence[int],
                  confidence: float) -> "EarlyRejectRule":
        """margins (n_checks, P) of P pilot images at the checks, accepted (P,) bool: their
        full-trajectory decisions -> the rule (module docstring)."""
        confidence = check_confidence(confidence)
        checks = tuple(int(c) for c in checks)
        if margins.dim() != 2 or margins.shape[0] != len(checks) or accepted.shape != margins.shape[1:]:
            raise ValueError(f"margins must be (n_checks = {len(checks)}, P) and accepted (P,), got "
                             f"{tuple(margins.shape)} and {tuple(accepted.shape)}")
        if not torch.isfinite(margins).all():
            raise ValueError("margins hold NaN or inf")
        acc = margins[:, accepted.bool()].float()
        n = acc.shape[1]
        alpha = (1 - confidence) / len(checks)
        k1 = math.floor(alpha * (n + 1) + 1e-9)  # rank of the threshold among the accepted margins
        if k1 < 1:
            return cls(checks, (-math.inf,) * len(checks), confidence)
        taus = tuple(float(row.sort().values[k1 - 1]) for row in acc)
        return cls(checks, taus, confidence)

    def to_dict(self) -> dict:
        return {"checks": list(self.checks), "thresholds": list(self.thresholds), "confidence": self.confidence}
