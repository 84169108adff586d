"""Early rejection's rule: stop generating a candidate whose partial evidence says it will be rejected.

A generator that samples in steps can score a candidate after ``s`` of its steps from what it has
computed so far (the cached trials of the steps done: a partial lift) and turn that into one
number per candidate, a *margin*: the expression's value (``Expr.margin``), positive where the
partial evidence alone would accept. ``EarlyRejectRule`` drops a candidate at check ``i`` when its
margin there is below ``thresholds[i]``. ``EarlyRejectRule.calibrate`` sets each threshold from a
pilot of full trajectories (their margins at the checks and their final decisions): the (k+1)-th
smallest margin among the n pilot candidates finally accepted, k + 1 = floor(alpha (n + 1)),
alpha = (1 - confidence) / number of checks. For a new candidate exchangeable with the pilot and
finally accepted, the chance to fall below it is (k + 1) / (n + 1) <= alpha at each check, so it
survives every check with probability >= confidence (split conformal, Bonferroni over the
checks). Too few pilot accepts for that (k + 1 = 0) leave the check off (threshold -inf);
confidence 1 turns every check off, i.e. exactly the full-trajectory decisions.

Used by ``compkern.lift.RejectionSampler`` (``partial_lift_margins``: the cached lift of the steps
so far against the predicted x0, for any EpsModel) and by `compkern generate`
(``compkern.pipelines.early_reject``: partial lift maps of images).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["CHECK_AT", "EarlyRejectRule", "check_checks", "check_confidence", "default_checks", "min_pilot_accepts",
           "partial_lift_margins"]


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


@torch.no_grad()
def partial_lift_margins(expr, record, schedule, weights: torch.Tensor, conds, null_cond, *,
                         backend: str = "auto") -> torch.Tensor:
    """(B,) fp32: ``expr.margin`` of the cached lift (K, B) of the steps in ``record`` so far (a
    StepRecord of preds (K+1, B, *S), row 0 the null), scored against the predicted x0 of the last
    of them (x0 from the composed eps with the generation ``weights``): the partial evidence of a
    candidate that is still being sampled. No model row is evaluated."""
    from compkern.lift.estimator import estimate_lift
    from compkern.ops import combine_eps

    if record is None or len(record) == 0:
        raise ValueError("record must hold the steps sampled so far (a ComposedEps made with record=True)")
    x_t, t, preds = record.x_t[-1], record.t[-1], record.preds[-1]
    x0 = schedule.eps_to_x0(x_t.float(), combine_eps(preds, torch.as_tensor(weights).to(preds.device)).float(), t)
    res = estimate_lift(None, x0, conds, null_cond, schedule, n_trials=0, record=record, backend=backend)
    return expr.margin(res.lift.float())
