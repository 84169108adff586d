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


# ---------------------------------------------------------------------------------------------
# attention: aggregate_attention, attention_losses (Separate-and-Enhance / Attend-and-Excite)
# ---------------------------------------------------------------------------------------------

def attention_gaussian_weights(sigma: float, kernel_size: int, dtype: torch.dtype = torch.float64,
                               device: torch.device | str = "cpu") -> torch.Tensor:
    """(kernel_size,) 1D smoothing weights, normalized to sum 1, as Attend-and-Excite's
    GaussianSmoothing builds them: w[i] ~ exp(-((i - c) / (2 sigma))^2), c = (kernel_size - 1) / 2.
    The 2D kernel is the outer product w w^T (separable)."""
    c = (kernel_size - 1) / 2
    i = torch.arange(kernel_size, dtype=torch.float64)
    w = torch.exp(-(((i - c) / (2.0 * sigma)) ** 2))
    return (w / w.sum()).to(dtype=dtype, device=device)


def aggregate_attention(layer_probs: list[torch.Tensor]) -> torch.Tensor:
    """layer_probs: list of (B, H_l, P, N) cross-attention probabilities -> (B, P, N), the mean over
    all (layer, head) maps, in fp32 (fp64 for fp64 inputs)."""
    acc = _acc_dtype(layer_probs[0].dtype)
    total = sum(x.shape[1] for x in layer_probs)
    out = sum(x.to(acc).sum(1) for x in layer_probs)
    return out / total


def attention_losses(maps: torch.Tensor, token_indices: torch.Tensor, text_end: torch.Tensor,
                     sigma: float, kernel_size: int, normalize: str,
                     softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """maps (B, P, N), token_indices (B, K) int64, text_end (B,) int64 -> (sep (B,), en (B,)) in
    fp32 (fp64 for fp64 maps). The definition the kernels follow (see compkern.ops.attention):

    normalize="softmax": A = softmax over tokens j in [1, text_end) of softmax_scale * maps
    (other tokens excluded); "none": A = maps. M_k = A[:, :, token_indices[:, k]] (B, P, K).
    sep = max_p prod_k M_k / sum_k M_k (0 where the sum is 0);
    en = 1 - min_k max_p smooth(M_k), smooth = 2D conv with the outer product of
    attention_gaussian_weights, reflect padding kernel_size // 2.
    Ties: argmax / argmin pick the first index (torch.argmax/argmin), so the gradient goes to the
    lowest row-major pixel and the first token in token_indices order."""
    acc = _acc_dtype(maps.dtype)
    x = maps.to(acc)
    B, P, N = x.shape
    K = token_indices.shape[1]
    R = int(round(P ** 0.5))
    if normalize == "softmax":
        pos = torch.arange(N, device=x.device)
        valid = (pos >= 1) & (pos < text_end[:, None])  # (B, N)
        a = torch.softmax((softmax_scale * x).masked_fill(~valid[:, None, :], float("-inf")), dim=-1)
    else:
        a = x
    m = a.gather(2, token_indices[:, None, :].expand(B, P, K))  # (B, P, K)
    s = m.sum(-1)
    if K == 1:  # prod / sum == 1 wherever M > 0: constant, no gradient (and no 0 * inf in fp32 autograd)
        ratio = (s > 0).to(acc) + 0.0 * s  # (0 * s: keeps sep differentiable, with a zero gradient)
    else:
        ratio = torch.where(s > 0, m.prod(-1) / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
    sep = ratio.gather(1, ratio.argmax(1, keepdim=True)).squeeze(1)
    pad = kernel_size // 2
    img = m.permute(0, 2, 1).reshape(B * K, 1, R, R)
    if pad > 0:
        img = torch.nn.functional.pad(img, (pad, pad, pad, pad), mode="reflect")
    w = attention_gaussian_weights(sigma, kernel_size, acc, x.device)
    sm = torch.nn.functional.conv2d(img, torch.outer(w, w)[None, None]).reshape(B, K, P)
    smax = sm.gather(2, sm.argmax(2, keepdim=True)).squeeze(2)  # (B, K)
    en = 1.0 - smax.gather(1, smax.argmin(1, keepdim=True)).squeeze(1)
    return sep, en
