"""CompLift for flow-matching models (rectified flow, SD3): the lift as a difference of conditional
flow-matching losses at shared (noise, t).

With x_t = (1 - t) x + t eps and u = eps - x (compkern.models.flow), a velocity v is the eps
prediction eps_hat = x_t + (1 - t) v, so |eps - eps_hat|^2 = (1 - t)^2 |u - v|^2, and the
diffusion ELBO with its likelihood weighting (Kingma et al. 2021: -log p(x) = 1/2 int E|eps -
eps_hat|^2 dlambda + const over the log-SNR lambda = 2 log((1 - t) / t)) gives, for exact models,

    lift(x | c) = log p(x | c) - log p(x) = 1/2 int E_eps[|u - v(x_t, null)|^2 - |u - v(x_t, c)|^2] (1 - t)^2 dlambda

(the prior terms at t = 1 cancel). ``weighting='elbo'`` (default) draws lambda uniform on
[-lambda_max, lambda_max] (t = 1 / (1 + exp(lambda / 2))), so a trial is lambda_max (1 - t)^2 times
the loss difference: an unbiased estimate of the ratio up to the tails beyond lambda_max, where the
integrand vanishes. ``weighting='uniform'`` is the training loss difference itself, t ~ U[0, 1]
(the analogue of CompLift's unweighted eps loss; its scale is not the log ratio, its sign is
what acceptance reads). Both use the same (eps, t) for every condition of a sample.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from compkern.lift.exact import GaussianClassesEps
from compkern.models.flow import flow_abar, flow_interpolate

WEIGHTINGS = ("elbo", "uniform")


@dataclass
class FlowLift:
    """lift (K, B) fp64: the mean over trials; stderr (K, B): its standard error; n_trials."""

    lift: torch.Tensor
    stderr: torch.Tensor
    n_trials: int


def flow_times(n: int, weighting: str = "elbo", *, lambda_max: float = 10.0,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """n flow times t (n,) fp32 in (0, 1) and the weight (n,) each trial's loss difference takes."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if weighting == "uniform":
        return torch.rand(n, generator=generator), torch.ones(n)
    if not lambda_max > 0:
        raise ValueError(f"lambda_max must be > 0, got {lambda_max}")
    lam = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * lambda_max
    t = torch.sigmoid(-lam / 2)  # 1 / (1 + exp(lambda / 2))
    return t.float(), (lambda_max * (1 - t) ** 2).float()


@torch.no_grad()
def flow_lift(model, x: torch.Tensor, conds: Sequence[int], null_id: int, *, n_trials: int = 100,
              weighting: str = "elbo", lambda_max: float = 10.0, batch_trials: int = 50,
              generator: torch.Generator | None = None) -> FlowLift:
    """lift of x (B, *S) under each condition of ``conds`` (K ids) against ``null_id`` for a
    velocity model ``model(x_t (N, *S), t (N,) float, cond (N,) int64) -> v``: per trial one (eps,
    t) per sample shared by all K + 1 conditions, evaluated in one batched call."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise TypeError("x must be a floating-point tensor (B, *S)")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x holds NaN or inf")
    conds = [int(c) for c in conds]
    if not conds:
        raise ValueError("conds must name at least one condition id")
    if n_trials < 1 or batch_trials < 1:
        raise ValueError(f"n_trials and batch_trials must be >= 1, got {n_trials}, {batch_trials}")
    B, K = x.shape[0], len(conds)
    ids = torch.tensor([null_id, *conds], dtype=torch.long, device=x.device)
    total = torch.zeros(K, B, dtype=torch.float64)
    total_sq = torch.zeros(K, B, dtype=torch.float64)
    done = 0
    while done < n_trials:
        n = min(batch_trials, n_trials - done)
        t, w = flow_times(n * B, weighting, lambda_max=lambda_max, generator=generator)
        noise = torch.randn((n * B, *x.shape[1:]), generator=generator).to(x)
        x0 = x.repeat(n, *([1] * (x.dim() - 1)))  # trial-major: row r*B + b is sample b
        t, w = t.to(x.device), w.to(x.device)
        x_t = flow_interpolate(x0, noise, t)
        R = K + 1
        v = model(x_t.repeat(R, *([1] * (x.dim() - 1))), t.repeat(R), ids.repeat_interleave(n * B))
        if not bool(torch.isfinite(v).all()):
            raise FloatingPointError("flow_lift: the velocity model returned NaN or inf")
        err = (v.view(R, n * B, -1).double() - (noise - x0).flatten(1).double()[None]).square().sum(-1)  # (R, n*B)
        d = ((err[0:1] - err[1:]) * w.double()[None]).view(K, n, B)
        total += d.sum(1).cpu()
        total_sq += d.square().sum(1).cpu()
        done += n
    mean = total / n_trials
    var = (total_sq / n_trials - mean.square()).clamp(min=0) * n_trials / max(n_trials - 1, 1)
    return FlowLift(mean, (var / n_trials).sqrt(), n_trials)


class GaussianClassesVelocity(torch.nn.Module):
    """The exact velocity of isotropic Gaussian classes (``GaussianClassesEps``'s data) under the
    rectified-flow path: v(x_t, t, c) = (eps_hat - x_t) / (1 - t), eps_hat the exact eps at the
    variance-preserving point x_t / c_t, abar(t) (compkern.models.flow)."""

    def __init__(self, classes: GaussianClassesEps):
        super().__init__()
        self.classes = classes
        self.null_id = classes.null_id

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        t = t.double().clamp(max=1 - 1e-9)
        c = ((1 - t) ** 2 + t ** 2).sqrt()[:, None]
        eps = self.classes.eps_at(x_t.double() / c, flow_abar(t), cond).double()
        return ((eps - x_t.double()) / (1 - t)[:, None]).to(x_t.dtype)


def sign_agreement(estimate: torch.Tensor, truth: torch.Tensor, *, margin: float = 0.0) -> float:
    """Share of entries where sign(estimate) == sign(truth), over those with |truth| > margin."""
    keep = truth.abs() > margin
    if not bool(keep.any()):
        raise ValueError(f"no entry has |truth| > margin = {margin}")
    return float(((estimate > 0) == (truth > 0))[keep].double().mean())


__all__ = ["FlowLift", "GaussianClassesVelocity", "WEIGHTINGS", "flow_lift", "flow_times", "sign_agreement"]
