"""lift_partial: the shared-(eps, t) CompLift reduction, streamable in chunks of trials.

For trials t = 1..T with noise eps_t and predictions preds[t, 0] (null) and preds[t, k+1]
(condition k), d[t, k, b] = |eps - pred_null|^2 - |eps - pred_k|^2 summed over S. The lift
estimate is the weighted mean of d over trials; LiftPartial holds running sums that add.
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


def lift_partial(noise: torch.Tensor, preds: torch.Tensor, *, weights: torch.Tensor | None = None,
                 pixel_map: bool = False, backend: str = "auto") -> LiftPartial:
    """noise (T, B, *S), preds (T, K+1, B, *S), weights (T,) or (T, B) -> LiftPartial.

    backend: "auto" (triton on CUDA, cpp on CPU), "torch", "cpp" or "triton". The kernels read
    noise and preds[:, 0] once for all K conditions and produce the pixel map in the same pass;
    noise and preds of different float dtypes are promoted to the wider one. NaN/inf in the
    inputs propagate into the sums (never dropped)."""
    weights = _check(noise, preds, weights, pixel_map)
    impl = _dispatch.resolve("lift_partial", backend, noise.device, IMPLS)
    sum_wd, sum_wd2, pixel = impl(noise, preds, weights, pixel_map)
    acc = sum_wd.dtype
    w = weights.to(acc)
    T = noise.shape[0]
    return LiftPartial(w.sum(0), w.square().sum(0), torch.full_like(w[0], T), sum_wd, sum_wd2, pixel)
