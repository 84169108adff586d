"""The EpsModel protocol and the batched multi-condition evaluation every method builds on."""
from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class EpsModel(Protocol):
    """``model(x_t (N, *S), t (N,) int64, cond) -> eps (N, *S)``; cond is the model's own batch of
    N conditions (class ids with a null id, a (N, L, D) encoder-state tensor, ...)."""

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor: ...


def config_dict(model) -> dict:
    """The constructor arguments of a model with a config (a diffusers ModelMixin / ConfigMixin,
    or a wrapper whose ``config`` is a dict) as a plain dict, without diffusers' private keys
    (``_class_name``, ``_use_default_values``, ...): what a run folder records of its model."""
    return {k: v for k, v in dict(model.config).items() if not k.startswith("_")}


def stack_conditions(conds: torch.Tensor | Sequence[Any], batch: int) -> torch.Tensor:
    """Condition-major stack (K+1, B, *C).

    Two forms, no guessing: a tensor is already per-sample, (K+1, B, *C); a list holds K+1
    conditions each shared by the whole batch (a class id, an (L, D) encoder state, ...)."""
    if isinstance(conds, torch.Tensor):
        if conds.dim() < 2 or conds.shape[1] != batch:
            raise ValueError(f"conds as a tensor must be condition-major (K+1, B={batch}, *C), got {tuple(conds.shape)}; "
                             "pass a list of K+1 conditions to share each across the batch")
        return conds
    if not isinstance(conds, (list, tuple)) or not conds:
        raise TypeError(f"conds must be a tensor (K+1, B, *C) or a non-empty list of K+1 shared conditions, got {type(conds).__name__}")
    rows = [torch.as_tensor(c) for c in conds]
    if len({tuple(r.shape) for r in rows}) != 1:
        raise ValueError(f"conds entries must share one shape (*C), got {[tuple(r.shape) for r in rows]}")
    return torch.stack(rows).unsqueeze(1).expand(len(rows), batch, *rows[0].shape)


def evaluate_conditions(model: EpsModel, x_t: torch.Tensor, t: torch.Tensor, conds,
                        *, chunk_size: int | None = None) -> torch.Tensor:
    """x_t (B, *S), t (B,) or (), conds (K+1 conditions) -> preds (K+1, B, *S).

    The K+1 conditions are evaluated as one condition-major batch of (K+1) x B rows, in chunks of
    at most ``chunk_size`` rows (None: one call), written into one preallocated output."""
    if not isinstance(x_t, torch.Tensor) or x_t.dim() < 1:
        raise TypeError("x_t must be a tensor (B, *S)")
    B = x_t.shape[0]
    t = torch.as_tensor(t, device=x_t.device)
    if t.dim() == 0:
        t = t.expand(B)
    if t.shape != (B,):
        raise ValueError(f"t must have shape () or (B,) = ({B},), got {tuple(t.shape)}")
    c = stack_conditions(conds, B).to(x_t.device)
    K1 = c.shape[0]
    rows = K1 * B
    x_rows = x_t.unsqueeze(0).expand(K1, *x_t.shape).reshape(rows, *x_t.shape[1:])
    t_rows = t.repeat(K1)
    c_rows = c.reshape(rows, *c.shape[2:])
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows or None, got {chunk_size}")
    step = rows if chunk_size is None else chunk_size
    out = None
    for s in range(0, rows, step):
        e = min(rows, s + step)
        y = model(x_rows[s:e], t_rows[s:e], c_rows[s:e])
        if out is None:
            out = torch.empty(rows, *y.shape[1:], dtype=y.dtype, device=y.device)
        out[s:e] = y
    return out.reshape(K1, B, *out.shape[1:])
