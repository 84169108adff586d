"""lift_partial: the shared-(eps, t) CompLift reduction, streamable in chunks of trials.

For trials t = 1..T with noise eps_t and predictions preds[t, 0] (null) and preds[t, k+1]
(condition k), d[t, k, b] = |eps - pred_null|^2 - |eps - pred_k|^2 summed over S. The lift
estimate is the weighted mean of d over trials; LiftPartial holds running sums that add.

Autograd: one ``torch.autograd.Function`` (``_LiftFn``) for every backend; its forward calls the
chosen backend's kernel, its backward (the same for every backend) recomputes the per-trial
differences in fp32 (fp64 for fp64 inputs) and casts each gradient to its input's dtype. With
e0 = noise - preds[:, 0], ek = noise - preds[:, k+1], diff = e0^2 - ek^2, d = sum_S diff and the
incoming gradients G1 (of sum_wd), G2 (of sum_wd2), Gp (of sum_wd_pixel, broadcast over C):

    D[t, k, b, *S] = w[t, b] * (G1[k, b] + 2 G2[k, b] d[t, k, b] + Gp[k, b, h, w])
    d/d preds[:, k+1] = 2 D ek        d/d preds[:, 0] = -2 e0 sum_k D
    d/d noise = 2 sum_k D (e0 - ek)   d/d w[t, b] = sum_k G1 d + G2 d^2 + sum_hw Gp sum_C diff
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from compkern import _dispatch
from compkern.kernels import reference
from compkern.ops._checks import check_same_device, check_tensor


@dataclass
class LiftPartial:
    """Running sums over trials. sum_w, sum_w2, count (B,); sum_wd, sum_wd2 (K, B);
    sum_wd_pixel (K, B, H, W) or None. All fp32 (fp64 for fp64 inputs)."""

    sum_w: torch.Tensor
    sum_w2: torch.Tensor
    count: torch.Tensor
    sum_wd: torch.Tensor
    sum_wd2: torch.Tensor
    sum_wd_pixel: torch.Tensor | None = None

    def __add__(self, other: "LiftPartial") -> "LiftPartial":
        if not isinstance(other, LiftPartial):
            return NotImplemented
        if self.sum_wd.shape != other.sum_wd.shape:
            raise ValueError(f"cannot merge LiftPartial of shapes (K, B) = {tuple(self.sum_wd.shape)} and {tuple(other.sum_wd.shape)}")
        if (self.sum_wd_pixel is None) != (other.sum_wd_pixel is None):
            raise ValueError("cannot merge a LiftPartial with a pixel map and one without (pixel_map must match)")
        pix = None if self.sum_wd_pixel is None else self.sum_wd_pixel + other.sum_wd_pixel
        return LiftPartial(self.sum_w + other.sum_w, self.sum_w2 + other.sum_w2, self.count + other.count,
                           self.sum_wd + other.sum_wd, self.sum_wd2 + other.sum_wd2, pix)

    @property
    def mean(self) -> torch.Tensor:
        """(K, B): weighted mean of d over trials (the lift estimate)."""
        return self.sum_wd / self.sum_w

    @property
    def stderr(self) -> torch.Tensor:
        """(K, B): standard error of ``mean``: the weighted variance of d times sum_w2 / sum_w^2
        (Kish's effective count), inf with fewer than two trials. Exact for unit weights; with
        importance weights it assumes w and (d - mean)^2 uncorrelated, and overstates the error
        when the proposal puts more trials where d varies most (compkern.lift's estimator keeps
        its own weighted sums for that case)."""
        mean = self.mean
        var = (self.sum_wd2 / self.sum_w - mean.square()).clamp_min(0)
        n = self.count
        bessel = torch.where(n > 1, n / (n - 1).clamp_min(1), torch.full_like(n, float("inf")))
        return (var * bessel * self.sum_w2 / self.sum_w.square()).sqrt()

    @property
    def pixel_mean(self) -> torch.Tensor:
        """(K, B, H, W): per-pixel lift map (summed over channels, averaged over trials)."""
        if self.sum_wd_pixel is None:
            raise ValueError("this LiftPartial has no pixel map: call lift_partial(..., pixel_map=True)")
        return self.sum_wd_pixel / self.sum_w[:, None, None]


def _check(noise, preds, weights, pixel_map) -> torch.Tensor:
    check_tensor("noise", noise, ndim_min=2, expected="(T, B, *S)")
    check_tensor("preds", preds, ndim_min=3, expected="(T, K+1, B, *S)")
    if weights is not None:
        check_tensor("weights", weights, expected="(T,) or (T, B)")
    if not isinstance(pixel_map, bool):
        raise TypeError(f"pixel_map must be a bool, got {type(pixel_map).__name__}")
    check_same_device(noise=noise, preds=preds, weights=weights)
    T, B, S = noise.shape[0], noise.shape[1], tuple(noise.shape[2:])
    if preds.dim() != noise.dim() + 1 or preds.shape[0] != T or preds.shape[2] != B or tuple(preds.shape[3:]) != S:
        raise ValueError(f"preds must have shape (T, K+1, B, *S) = ({T}, K+1, {B}, {', '.join(map(str, S))}) "
                         f"for noise {tuple(noise.shape)}, got {tuple(preds.shape)}")
    if preds.shape[1] < 2:
        raise ValueError(f"preds must stack the null row and at least one condition (K+1 >= 2 on axis 1), got {tuple(preds.shape)}")
    if T < 1 or B < 1:
        raise ValueError(f"noise must have T >= 1 trials and B >= 1 samples, got {tuple(noise.shape)}")
    if pixel_map and len(S) != 3:
        raise ValueError(f"pixel_map=True needs an image layout S = (C, H, W), got S = {S}")
    if weights is None:
        return torch.ones(T, B, dtype=torch.float32, device=noise.device)
    if tuple(weights.shape) == (T,):
        weights = weights[:, None].expand(T, B)
    elif tuple(weights.shape) != (T, B):
        raise ValueError(f"weights must have shape (T,) = ({T},) or (T, B) = ({T}, {B}), got {tuple(weights.shape)}")
    return weights


def _torch(noise, preds, weights, pixel_map):
    return reference.lift_partial(noise, preds, weights, pixel_map)


def _common_dtype(noise, preds):
    """The kernels read one dtype: promote the narrower of noise/preds (exact, like the reference)."""
    dtype = torch.promote_types(noise.dtype, preds.dtype)
    return noise.to(dtype), preds.to(dtype)


def _cpp(noise, preds, weights, pixel_map):
    noise, preds = _common_dtype(noise, preds)
    return _dispatch.cpp_module().lift_partial(noise, preds, weights, pixel_map)


def _triton(noise, preds, weights, pixel_map):
    from compkern.kernels.triton import lift as triton_lift

    noise, preds = _common_dtype(noise, preds)
    return triton_lift.lift_partial(noise, preds, weights, pixel_map)


IMPLS = {"torch": _torch, "cpp": _cpp, "triton": _triton}


class _LiftFn(torch.autograd.Function):
    """Forward: the backend's kernel -> (sum_wd, sum_wd2[, sum_wd_pixel]). Backward: the closed
    form in the module docstring, in fp32 (fp64 for fp64), for every backend."""

    @staticmethod
    def forward(ctx, impl, pixel_map, noise, preds, weights):
        sum_wd, sum_wd2, pixel = impl(noise, preds, weights, pixel_map)
        ctx.save_for_backward(noise, preds, weights)
        ctx.set_materialize_grads(False)  # outputs without a gradient arrive as None: skipped
        return (sum_wd, sum_wd2) if pixel is None else (sum_wd, sum_wd2, pixel)

    @staticmethod
    def backward(ctx, g1, g2, gp=None):
        noise, preds, weights = ctx.saved_tensors
        if g1 is None and g2 is None and gp is None:
            return None, None, None, None, None
        acc = torch.float64 if torch.float64 in (noise.dtype, preds.dtype) else torch.float32
        T, K1, B = preds.shape[:3]
        S = tuple(preds.shape[3:])
        ones = (1,) * len(S)
        n = noise.to(acc).unsqueeze(1)  # (T, 1, B, *S)
        p = preds.to(acc)
        e0 = n[:, 0] - p[:, 0]  # (T, B, *S)
        ek = n - p[:, 1:]  # (T, K, B, *S)
        diff = d = None
        if g2 is not None or ctx.needs_input_grad[4]:  # d (T, K, B) is needed
            diff = e0.square().unsqueeze(1) - ek.square()  # (T, K, B, *S)
            d = diff.flatten(3).sum(-1)
        w = weights.to(acc)[:, None, :]  # (T, 1, B)
        a = torch.zeros(T, K1 - 1, B, dtype=acc, device=noise.device)  # per-(t, k, b) part of dL/d diff / w
        if g1 is not None:
            a = a + g1.to(acc)
        if g2 is not None:
            a = a + 2 * g2.to(acc) * d
        D = (w * a).reshape(T, K1 - 1, B, *ones)
        if gp is not None:  # (K, B, H, W) -> broadcast over trials and channels
            D = D + w.reshape(T, 1, B, 1, 1, 1) * gp.to(acc).unsqueeze(2)
        grad_noise = grad_preds = grad_w = None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            dk = D.expand_as(ek)
            sum_d = dk.sum(1)  # (T, B, *S)
            if ctx.needs_input_grad[2]:
                grad_noise = (2 * (e0 * sum_d - (dk * ek).sum(1))).to(noise.dtype)
            if ctx.needs_input_grad[3]:
                grad_preds = torch.cat([(-2 * e0 * sum_d).unsqueeze(1), 2 * dk * ek], 1).to(preds.dtype)
        if ctx.needs_input_grad[4]:
            gw = torch.zeros(T, B, dtype=acc, device=noise.device)
            if g1 is not None:
                gw = gw + (g1.to(acc) * d).sum(1)
            if g2 is not None:
                gw = gw + (g2.to(acc) * d * d).sum(1)
            if gp is not None:
                gw = gw + (gp.to(acc) * diff.sum(3)).flatten(3).sum(-1).sum(1)
            grad_w = gw.to(weights.dtype)
        return None, None, grad_noise, grad_preds, grad_w


def lift_partial(noise: torch.Tensor, preds: torch.Tensor, *, weights: torch.Tensor | None = None,
                 pixel_map: bool = False, backend: str = "auto") -> LiftPartial:
    """noise (T, B, *S), preds (T, K+1, B, *S), weights (T,) or (T, B) -> LiftPartial.

    backend: "auto" (triton on CUDA, cpp on CPU), "torch", "cpp" or "triton". The kernels read
    noise and preds[:, 0] once for all K conditions and produce the pixel map in the same pass;
    noise and preds of different float dtypes are promoted to the wider one. NaN/inf in the
    inputs propagate into the sums (never dropped). Differentiable w.r.t. noise, preds and
    weights on every backend (one autograd.Function; see the module docstring)."""
    weights = _check(noise, preds, weights, pixel_map)
    impl = _dispatch.resolve("lift_partial", backend, noise.device, IMPLS)
    if torch.is_grad_enabled() and (noise.requires_grad or preds.requires_grad or weights.requires_grad):
        res = _LiftFn.apply(impl, pixel_map, noise, preds, weights)
        sum_wd, sum_wd2, pixel = res if pixel_map else (*res, None)
    else:
        sum_wd, sum_wd2, pixel = impl(noise, preds, weights, pixel_map)
    acc = sum_wd.dtype
    w = weights.to(acc)
    T = noise.shape[0]
    return LiftPartial(w.sum(0), w.square().sum(0), torch.full_like(w[0], T), sum_wd, sum_wd2, pixel)
