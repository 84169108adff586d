"""combine_eps: the composed noise prediction of Composable Diffusion / projective composition.

    out = preds[0] + sum_k weights[..., k] * (preds[k+1] - preds[0])

preds (K+1, B, *S) is the condition-major output of one batched model call (base condition first:
unconditional or background); weights (K,) or (B, K); negative weights implement NOT.
"""
from __future__ import annotations

import torch

from compkern import _dispatch
from compkern.kernels import reference
from compkern.ops._checks import check_same_device, check_tensor


def _check(preds: torch.Tensor, weights: torch.Tensor) -> None:
    check_tensor("preds", preds, ndim_min=2, expected="(K+1, B, *S)")
    check_tensor("weights", weights, expected="(K,) or (B, K)")
    check_same_device(preds=preds, weights=weights)
    K, B = preds.shape[0] - 1, preds.shape[1]
    if K < 1:
        raise ValueError(f"preds must stack the base row and at least one condition: (K+1, B, *S) with K >= 1, got {tuple(preds.shape)}")
    if tuple(weights.shape) not in ((K,), (B, K)):
        raise ValueError(f"weights must have shape (K,) = ({K},) or (B, K) = ({B}, {K}) for preds {tuple(preds.shape)}, got {tuple(weights.shape)}")


def _torch(preds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return reference.combine_eps(preds, weights)


def _cpp(preds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return _dispatch.cpp_module().combine_eps(preds, weights)


def _triton(preds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    from compkern.kernels.triton import combine as triton_combine

    return triton_combine.combine_eps(preds, weights)


IMPLS = {"torch": _torch, "cpp": _cpp, "triton": _triton}


def combine_eps(preds: torch.Tensor, weights: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """preds (K+1, B, *S), weights (K,) or (B, K) -> (B, *S) in the dtype of preds (fp32 accumulation).

    backend: "auto" (triton on CUDA, cpp on CPU), "torch", "cpp" or "triton". NaN/inf in preds or
    weights propagate into the output (a weight of 0 does not hide a NaN prediction)."""
    _check(preds, weights)
    impl = _dispatch.resolve("combine_eps", backend, preds.device, IMPLS)
    return impl(preds, weights)
