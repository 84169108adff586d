"""lift_partial as one Triton kernel.

noise (T, B, C, P), preds (T, K+1, B, C, P) (P = H*W with a pixel map; without one C = 1 and
P = prod(S)). One program per (trial t, row b, block of BLOCK pixels): it walks the C channels,
reads noise and preds[t, 0] once for all K conditions (the K conditions form the first axis of a
(KP, BLOCK) tile, KP = next power of two >= K), and forms the channel-summed difference
pix[k] = sum_c (noise - p0)^2 - (noise - pk)^2. Its block sum is added atomically to d (T, K, B);
with a pixel map, w[t, b] * pix is added atomically to the map (K, B, P). Loads are converted to
fp32 (fp64 for fp64 inputs) right away and atomics are in that type. The launcher finishes
sum_wd = sum_t w d and sum_wd2 = sum_t w d^2 on the small (T, K, B) array.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _lift_partial_kernel(noise_ptr, preds_ptr, w_ptr, d_ptr, pix_ptr, B, C, P, K,
                         KP: tl.constexpr, BLOCK: tl.constexpr, PIXEL: tl.constexpr, ACC: tl.constexpr):
    t = tl.program_id(0)
    b = tl.program_id(1)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    ks = tl.arange(0, KP)
    kmask = ks < K
    mask2 = kmask[:, None] & mask[None, :]
    t64 = t.to(tl.int64)  # row offsets in int64: T * (K+1) * B * C * P may exceed 2**31
    noise_row = (t64 * B + b) * C * P
    p0_row = (t64 * (K + 1) * B + b) * C * P
    pk_rows = ((t64 * (K + 1) + 1 + ks) * B + b) * C * P  # (KP,)
    pix = tl.zeros([KP, BLOCK], dtype=ACC)
    for c in range(C):
        coffs = offs + c * P
        n = tl.load(noise_ptr + noise_row + coffs, mask=mask, other=0.0).to(ACC)
        p0 = tl.load(preds_ptr + p0_row + coffs, mask=mask, other=0.0).to(ACC)
        pk = tl.load(preds_ptr + pk_rows[:, None] + coffs[None, :], mask=mask2, other=0.0).to(ACC)
        e0 = (n - p0) * (n - p0)
        dk = n[None, :] - pk
        pix += e0[None, :] - dk * dk  # masked lanes add exactly 0
    dsum = tl.sum(pix, axis=1)  # (KP,)
    tl.atomic_add(d_ptr + (t * K + ks) * B + b, dsum, mask=kmask)
    if PIXEL:
        w = tl.load(w_ptr + t * B + b).to(ACC)
        pix_offs = (ks.to(tl.int64)[:, None] * B + b) * P + offs[None, :]
        tl.atomic_add(pix_ptr + pix_offs, w * pix, mask=mask2)


def lift_partial(noise: torch.Tensor, preds: torch.Tensor, weights: torch.Tensor, pixel_map: bool):
    """noise (T, B, *S), preds (T, K+1, B, *S), weights (T, B) -> (sum_wd (K, B), sum_wd2 (K, B),
    sum_wd_pixel (K, B, H, W) or None), fp32 (fp64 for fp64 inputs). Arguments are checked by
    compkern.ops.lift; non-contiguous inputs are copied once."""
    T, B = noise.shape[0], noise.shape[1]
    K = preds.shape[1] - 1
    acc = torch.float64 if preds.dtype == torch.float64 else torch.float32
    noise, preds = noise.contiguous(), preds.contiguous()
    w = weights.to(acc).expand(T, B).contiguous()
    S = tuple(noise.shape[2:])
    numel_s = noise[0, 0].numel() if T and B else 0
    C, P = (S[0], S[1] * S[2]) if pixel_map else (1, numel_s)
    d = torch.zeros(T, K, B, dtype=acc, device=noise.device)
    pix = torch.zeros(K, B, *S[1:], dtype=acc, device=noise.device) if pixel_map else None
    if numel_s > 0 and T > 0 and B > 0:
        KP = triton.next_power_of_2(K)
        block = min(triton.next_power_of_2(P), max(64, 2048 // KP))
        grid = (T, B, triton.cdiv(P, block))
        _lift_partial_kernel[grid](noise, preds, w, d, pix if pixel_map else d, B, C, P, K,
                                   KP=KP, BLOCK=block, PIXEL=pixel_map,
                                   ACC=tl.float64 if acc == torch.float64 else tl.float32)
    wd = w[:, None, :] * d  # (T, K, B)
    return wd.sum(0), (wd * d).sum(0), pix
