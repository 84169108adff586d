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


class ComposedEps:
    """eps_fn(x_t (B, *S), t (B,)) -> combine_eps(evaluate_conditions(model, x_t, t, conds), weights).

    Rows no weight uses (weight 0 for every sample) are evaluated only where they are kept:
    record=True keeps (x_t, t, preds of every condition row) of every ``record_every``-th call
    (0, k, 2k, ...); every other call, and every call without a record, evaluates only the base
    and the weighted rows (rows kept for scoring cost 1/k as much)."""

    def __init__(self, model: EpsModel, conds: Any, weights: torch.Tensor, *, chunk_size: int | None = None,
                 record: bool = False, record_every: int = 1, record_until: int | None = None, backend: str = "auto",
                 output_to_eps: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
        if int(record_every) < 1:
            raise ValueError(f"record_every must be >= 1, got {record_every}")
        self.model, self.conds, self.chunk_size, self.backend = model, conds, chunk_size, backend
        self.weights = torch.as_tensor(weights, dtype=torch.float32)
        self.output_to_eps = output_to_eps  # e.g. schedule.v_to_eps for v-prediction models
        self.record = StepRecord() if record else None
        self.record_every = int(record_every)
        self.record_until = record_until  # calls after which nothing more is recorded (None: all)
        self.n_evals = 0  # model rows evaluated
        self.n_calls = 0
        w = self.weights.reshape(-1, self.weights.shape[-1])
        self._used = torch.cat([torch.zeros(1, dtype=torch.long), 1 + (w != 0).any(0).nonzero().flatten()])

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
        return combine_eps(preds, weights.to(preds.device), backend=self.backend)

    def select(self, keep: torch.Tensor) -> None:
        """Narrow every per-sample state to the samples of the (B,) bool mask ``keep`` (early
        rejection): the condition ids (R, B), per-sample weights (B, K) and the record."""
        if isinstance(self.conds, torch.Tensor) and self.conds.dim() == 2:
            self.conds = self.conds[:, keep.to(self.conds.device)]
        elif not isinstance(self.conds, torch.Tensor):
            raise TypeError("select needs the condition ids as an (R, B) tensor")
        if self.weights.dim() == 2:
            self.weights = self.weights[keep.to(self.weights.device)]
        if self.record is not None:
            r = self.record
            r.x_t = [x[keep.to(x.device)] for x in r.x_t]
            r.t = [t[keep.to(t.device)] for t in r.t]
            r.preds = [p[:, keep.to(p.device)] for p in r.preds]
