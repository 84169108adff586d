"""ComposedEps: one batched model call for all K+1 conditions, combined with ops.combine_eps.

The base row (index 0) is the unconditional or the background condition (projective
composition); weights (K,) or (B, K), negative for NOT. With ``record=True`` every call keeps
(x_t, t, preds) on the device: CompLift's cached trials reuse them at no extra model call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from compkern.models.base import EpsModel, evaluate_conditions
from compkern.ops import combine_eps

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StepRecord:
    """Predictions made while sampling: lists of x_t (B, *S), t (B,), preds (K+1, B, *S)."""

    x_t: list[torch.Tensor] = field(default_factory=list)
    t: list[torch.Tensor] = field(default_factory=list)
    preds: list[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.t)


NEGATIONS = ("linear", "perp")


def perp_neg_eps(preds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Perpendicular negation (Perp-Neg, Armandpour et al. 2023): preds (R, B, *S), rows [base,
    conditions...], weights (R-1,) or (B, R-1) -> eps (B, *S) in fp32:

        p = sum_{w_k > 0} w_k d_k,   d_k = eps_k - eps_0   (the positive direction, per sample)
        eps = eps_0 + p + sum_{w_k < 0} w_k (d_k - <d_k, p> / |p|^2 p)

    each negative direction taken off its component along the positive one, so a NOT pushes away
    from what only the negative prompt has and never against the positive prompt itself (where
    |p| = 0 nothing is projected). Plain torch (a few reductions per sample)."""
    x = preds.float()
    w = weights.float().to(x.device)
    w = w.expand(x.shape[1], -1) if w.dim() == 1 else w  # (B, R-1)
    d = x[1:] - x[0]  # (R-1, B, *S)
    shape = (w.shape[1], w.shape[0]) + (1,) * (x.dim() - 2)
    wk = w.T.reshape(shape)
    pos = (wk.clamp(min=0) * d).sum(0)  # (B, *S)
    flat = pos.flatten(1)
    norm2 = (flat * flat).sum(1)
    dots = (d.flatten(2) * flat[None]).sum(2)  # (R-1, B)
    coef = torch.where(norm2 > 0, dots / norm2.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(dots))
    perp = d - coef.reshape(coef.shape + (1,) * (x.dim() - 2)) * pos[None]
    return x[0] + pos + (wk.clamp(max=0) * perp).sum(0)


def compose_eps(preds: torch.Tensor, weights: torch.Tensor, negation: str = "linear", backend: str = "auto") -> torch.Tensor:
    """The composed eps of preds (R, B, *S): 'linear' = combine_eps (Composable Diffusion; NOT is a
    negative weight), 'perp' = perp_neg_eps."""
    if negation == "linear":
        return combine_eps(preds, weights, backend=backend)
    if negation == "perp":
        return perp_neg_eps(preds, weights).to(preds.dtype)
    raise ValueError(f"negation must be one of {NEGATIONS}, got {negation!r}")


def used_rows(weights: torch.Tensor) -> torch.Tensor:
    """The condition rows (int64, ascending) generation needs for weights (K,) or (B, K): the base
    row 0 and every row some sample weighs (rows no weight uses are evaluated only to be recorded)."""
    w = weights.reshape(-1, weights.shape[-1])
    return torch.cat([torch.zeros(1, dtype=torch.long, device=w.device), 1 + (w != 0).any(0).nonzero().flatten()])


class ComposedEps:
    """eps_fn(x_t (B, *S), t (B,)) -> compose_eps(evaluate_conditions(model, x_t, t, conds), weights, negation).

    Rows no weight uses (weight 0 for every sample) are evaluated only where they are kept:
    record=True keeps (x_t, t, preds of every condition row) of every ``record_every``-th call
    (0, k, 2k, ...); every other call, and every call without a record, evaluates only the base
    and the weighted rows (rows kept for scoring cost 1/k as much)."""

    def __init__(self, model: EpsModel, conds: Any, weights: torch.Tensor, *, chunk_size: int | None = None,
                 record: bool = False, record_every: int = 1, record_until: int | None = None, backend: str = "auto",
                 negation: str = "linear",
                 output_to_eps: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
        if int(record_every) < 1:
            raise ValueError(f"record_every must be >= 1, got {record_every}")
        if negation not in NEGATIONS:
            raise ValueError(f"negation must be one of {NEGATIONS}, got {negation!r}")
        self.model, self.conds, self.chunk_size, self.backend, self.negation = model, conds, chunk_size, backend, negation
        self.weights = torch.as_tensor(weights, dtype=torch.float32)
        self.output_to_eps = output_to_eps  # e.g. schedule.v_to_eps for v-prediction models
        self.record = StepRecord() if record else None
        self.record_every = int(record_every)
        self.record_until = record_until  # calls after which nothing more is recorded (None: all)
        self.n_evals = 0  # model rows evaluated
        self.n_calls = 0
        self._used = used_rows(self.weights)

    def _evaluate(self, x_t: torch.Tensor, t: torch.Tensor, conds: Any) -> torch.Tensor:
        preds = evaluate_conditions(self.model, x_t, t, conds, chunk_size=self.chunk_size)
        if self.output_to_eps is not None:
            tt = t.expand(x_t.shape[0]) if t.dim() == 0 else t
            preds = self.output_to_eps(x_t.unsqueeze(0).expand_as(preds).flatten(0, 1), preds.flatten(0, 1),
                                       tt.repeat(preds.shape[0])).view_as(preds)
        self.n_evals += preds.shape[0] * preds.shape[1]
        return preds

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        keep = self.record is not None and self.n_calls % self.record_every == 0 and \
            (self.record_until is None or self.n_calls < self.record_until)
        self.n_calls += 1
        used = self._used
        if keep or len(used) == self.weights.shape[-1] + 1:  # every row: no selection copy
            preds = self._evaluate(x_t, t, self.conds)
            weights = self.weights
            if keep:
                self.record.x_t.append(x_t.detach())
                self.record.t.append(t.detach().expand(x_t.shape[0]).clone())
                self.record.preds.append(preds.detach())
        else:
            conds = self.conds[used.to(self.conds.device)] if isinstance(self.conds, torch.Tensor) else \
                [self.conds[i] for i in used.tolist()]
            preds = self._evaluate(x_t, t, conds)
            weights = self.weights[..., used[1:] - 1]
        return compose_eps(preds, weights.to(preds.device), self.negation, backend=self.backend)

    def select(self, keep: torch.Tensor) -> None:
        """Narrow every per-sample state to the samples of the (B,) bool mask ``keep`` (early
        rejection): the conditions (R, B, *C), per-sample weights (B, K) and the record."""
        if isinstance(self.conds, torch.Tensor) and self.conds.dim() >= 2:
            self.conds = self.conds[:, keep.to(self.conds.device)]
        else:
            raise TypeError("select needs the conditions as a condition-major (R, B, *C) tensor")
        if self.weights.dim() == 2:
            self.weights = self.weights[keep.to(self.weights.device)]
        if self.record is not None:
            r = self.record
            r.x_t = [x[keep.to(x.device)] for x in r.x_t]
            r.t = [t[keep.to(t.device)] for t in r.t]
            r.preds = [p[:, keep.to(p.device)] for p in r.preds]
