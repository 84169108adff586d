"""Plain torch definitions of every op. Tests compare all backends to these (run in fp64).

Accumulation is in fp32 at least (fp64 when the inputs are fp64); outputs follow the contract in
../shared/DESIGN.md.
"""
from __future__ import annotations

import torch


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def combine_eps(preds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """preds (K+1, B, *S), weights (K,) or (B, K) -> (B, *S) in preds' dtype:
    preds[0] + sum_k weights[..., k] * (preds[k+1] - preds[0])."""
    acc = _acc_dtype(preds.dtype)
    p = preds.to(acc)
    K, B = p.shape[0] - 1, p.shape[1]
    w = weights.to(acc).expand(B, K).t()  # (K, B)
    w = w.reshape(K, B, *([1] * (p.dim() - 2)))
    out = p[0] + (w * (p[1:] - p[0])).sum(0)
    return out.to(preds.dtype)


def lift_partial(noise: torch.Tensor, preds: torch.Tensor, weights: torch.Tensor,
                 pixel_map: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """noise (T, B, *S), preds (T, K+1, B, *S), weights (T, B) ->
    (sum_wd (K, B), sum_wd2 (K, B), sum_wd_pixel (K, B, H, W) or None), all fp32 (fp64 for fp64).

    d[t, k, b] = sum_S (noise - preds[:, 0])^2 - (noise - preds[:, k+1])^2; the pixel map sums
    the same difference over the channel axis only (S = (C, H, W))."""
    acc = _acc_dtype(preds.dtype)
    n = noise.to(acc).unsqueeze(1)  # (T, 1, B, *S)
    p = preds.to(acc)
    err_null = (n[:, 0] - p[:, 0]).square()  # (T, B, *S)
    diff = err_null.unsqueeze(1) - (n - p[:, 1:]).square()  # (T, K, B, *S)
    w = weights.to(acc)[:, None, :]  # (T, 1, B)
    d = diff.flatten(3).sum(-1)  # (T, K, B)
    sum_wd = (w * d).sum(0)
    sum_wd2 = (w * d * d).sum(0)
    pixel = None
    if pixel_map:
        dpix = diff.sum(3)  # over C -> (T, K, B, H, W)
        pixel = (w[..., None, None] * dpix).sum(0)
    return sum_wd, sum_wd2, pixel
