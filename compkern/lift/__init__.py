"""CompLift (Yu & Gao, ICML 2025): lift estimation, composition expressions, rejection sampling.

    lift(x | c) = log p(x | c) - log p(x) ~ E_{t, eps}[ |eps - eps(x_t, null)|^2 - |eps - eps(x_t, c)|^2 ]

A sample satisfies "A AND NOT B" when lift(x | A) > 0 and lift(x | B) <= 0.
"""
from compkern.lift.early_reject import EarlyRejectRule
from compkern.lift.estimator import LiftCalibration, LiftResult, calibrate, calibrate_t_probs, estimate_lift, importance_probs
from compkern.lift.expr import Expr, parse
from compkern.lift.positions import LIFT_MODES, accept_positions

__all__ = ["LIFT_MODES", "EarlyRejectRule", "Expr", "LiftCalibration", "accept_positions", "LiftResult", "calibrate", "RejectionSampler", "calibrate_t_probs", "estimate_lift", "importance_probs", "parse"]


def __getattr__(name):
    if name == "RejectionSampler":
        from compkern.lift.rejection import RejectionSampler
        return RejectionSampler
    raise AttributeError(name)
