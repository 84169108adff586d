"""combine_eps: the composed noise prediction of Composable Diffusion / projective composition.

    out = preds[0] + sum_k weights[..., k] * (preds[k+1] - preds[0])

preds (K+1, B, *S) is the condition-major output of one batched model call (base condition first:
unconditional or background); weights (K,) or (B, K); negative weights implement NOT.

Autograd: one ``torch.autograd.Function`` (``_CombineFn``) for every backend. Its forward calls the
chosen backend's kernel; its backward is the same on every backend, in fp32 (fp64 for fp64):

    d out / d preds[0]   = 1 - sum_k w[b, k]          d out / d preds[k+1] = w[b, k]
    d L / d w[b, k]      = sum_S g[b] * (preds[k+1, b] - preds[0, b])   (summed over b for w (K,))

cast to the dtype of preds / weights, as the reference's own autograd does (it upcasts, so its
gradients arrive in fp32 and are cast back by the ``.to``).

``out=``: a caller's preallocated (B, *S) buffer of preds' dtype, contiguous, on preds' device,
not overlapping the inputs. Every backend writes into it (the C++ and Triton kernels directly, the
torch reference by a copy) and it is returned. Like torch's ``out=`` variants it does not support
autograd: inputs that require grad (with grad mode on) are refused.
"""
from __future__ import annotations

import torch

from compkern import _dispatch
from compkern.kernels import reference
from compkern.ops._checks import check_out, check_same_device, check_tensor


def _check(preds: torch.Tensor, weights: torch.Tensor) -> None:
    check_tensor("preds", preds, ndim_min=2, expected="(K+1, B, *S)")
    check_tensor("weights", weights, expected="(K,) or (B, K)")
    check_same_device(preds=preds, weights=weights)
    K, B = preds.shape[0] - 1, preds.shape[1]
    if K < 1:
        raise ValueError(f"preds must stack the base row and at least one condition: (K+1, B, *S) with K >= 1, got {tuple(preds.shape)}")
    if tuple(weights.shape) not in ((K,), (B, K)):
        raise ValueError(f"weights must have shape (K,) = ({K},) or (B, K) = ({B}, {K}) for preds {tuple(preds.shape)}, got {tuple(weights.shape)}")


def _torch(preds: torch.Tensor, weights: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    res = reference.combine_eps(preds, weights)
    return res if out is None else out.copy_(res)


def _cpp(preds: torch.Tensor, weights: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return _dispatch.cpp_module().combine_eps(preds, weights, out)


def _triton(preds: torch.Tensor, weights: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    from compkern.kernels.triton import combine as triton_combine

    return triton_combine.combine_eps(preds, weights, out=out)


IMPLS = {"torch": _torch, "cpp": _cpp, "triton": _triton}


class _CombineFn(torch.autograd.Function):
    """Forward: the backend's kernel. Backward: the closed form above, in fp32 (fp64 for fp64),
    for every backend. Saves preds only when weights need a gradient."""

    @staticmethod
    def forward(ctx, impl, preds, weights):
        ctx.save_for_backward(weights, preds if ctx.needs_input_grad[2] else None)
        ctx.preds_dtype, ctx.preds_dim = preds.dtype, preds.dim()
        return impl(preds, weights, None)

    @staticmethod
    def backward(ctx, grad):
        weights, preds = ctx.saved_tensors
        K1, B = weights.shape[-1] + 1, grad.shape[0]
        acc = torch.float64 if ctx.preds_dtype == torch.float64 else torch.float32
        g = grad.to(acc)
        w = weights.to(acc).expand(B, K1 - 1)  # (B, K)
        grad_preds = grad_weights = None
        if ctx.needs_input_grad[1]:
            coef = torch.cat([1 - w.sum(1, keepdim=True), w], 1).t()  # (K+1, B)
            grad_preds = (coef.reshape(K1, B, *([1] * (ctx.preds_dim - 2))) * g).to(ctx.preds_dtype)
        if ctx.needs_input_grad[2]:
            p = preds.to(acc)
            gw = ((p[1:] - p[0]) * g).reshape(K1 - 1, B, -1).sum(-1).t()  # (B, K)
            grad_weights = (gw if weights.dim() == 2 else gw.sum(0)).to(weights.dtype)
        return None, grad_preds, grad_weights


def combine_eps(preds: torch.Tensor, weights: torch.Tensor, *, out: torch.Tensor | None = None,
                backend: str = "auto") -> torch.Tensor:
    """preds (K+1, B, *S), weights (K,) or (B, K) -> (B, *S) in the dtype of preds (fp32 accumulation).

    backend: "auto" (triton on CUDA, cpp on CPU), "torch", "cpp" or "triton". Differentiable
    w.r.t. preds and weights on every backend. out: optional preallocated (B, *S) output (preds'
    dtype and device, contiguous, not overlapping the inputs), written and returned; not with
    inputs that require grad. NaN/inf in preds or weights propagate into the output (a weight of
    0 does not hide a NaN prediction)."""
    _check(preds, weights)
    impl = _dispatch.resolve("combine_eps", backend, preds.device, IMPLS)
    needs_grad = torch.is_grad_enabled() and (preds.requires_grad or weights.requires_grad)
    if out is not None:
        check_out(out, tuple(preds.shape[1:]), preds.dtype, preds.device, "(B, *S)", preds=preds, weights=weights)
        if needs_grad or (torch.is_grad_enabled() and out.requires_grad):
            raise RuntimeError("combine_eps(): out= does not support automatic differentiation, but preds, weights "
                               "or out requires grad; call it without out= (or under torch.no_grad())")
        with torch.no_grad():
            impl(preds, weights, out)
        if impl is not _torch:  # the kernels write through the data pointer: tell autograd out changed
            torch.autograd.graph.increment_version(out)
        return out
    if not needs_grad:
        return impl(preds, weights, None)
    return _CombineFn.apply(impl, preds, weights)
