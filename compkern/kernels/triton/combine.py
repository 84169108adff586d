"""combine_eps as one Triton kernel: out[b] = p0 + sum_k w[b, k] * (p[k+1, b] - p0), p0 = p[0, b].

One program per (row b, block of BLOCK elements); K is a runtime loop, so every K compiles once.
Every load is converted to fp32 (fp64 for fp64 inputs) right away (the interpreter mishandles bf16
arithmetic, and it is the accumulation type anyway); the result is stored in the input dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _to_bf16_rne(x):
    """fp32 -> bf16, round to nearest even, NaN kept (what the GPU's cvt.rn does; the interpreter's
    own cast truncates, so the kernel rounds explicitly and both agree)."""
    u = x.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    u = tl.where(x != x, 0x7FC0, u)
    return u.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _combine_eps_kernel(preds_ptr, w_ptr, out_ptr, B, N, K, BLOCK: tl.constexpr, ACC: tl.constexpr,
                        OUT_BF16: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs = pid_n * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    row = pid_b.to(tl.int64) * N  # int64: (K+1) * B * N may exceed 2**31
    p0 = tl.load(preds_ptr + row + offs, mask=mask, other=0.0).to(ACC)
    acc = tl.zeros([BLOCK], dtype=ACC)
    for k in range(K):
        pk_row = ((k + 1) * B + pid_b).to(tl.int64) * N
        pk = tl.load(preds_ptr + pk_row + offs, mask=mask, other=0.0).to(ACC)
        wk = tl.load(w_ptr + pid_b * K + k).to(ACC)
        acc += wk * (pk - p0)
    out = p0 + acc
    if OUT_BF16:
        tl.store(out_ptr + row + offs, _to_bf16_rne(out), mask=mask)
    else:
        tl.store(out_ptr + row + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def combine_eps(preds: torch.Tensor, weights: torch.Tensor, *, out: torch.Tensor | None = None,
                block: int = 1024) -> torch.Tensor:
    """preds (K+1, B, *S), weights (K,) or (B, K) -> (B, *S) in preds' dtype, written into ``out``
    when given (contiguous, checked by compkern.ops.combine like every argument); non-contiguous
    inputs are copied once."""
    K, B = preds.shape[0] - 1, preds.shape[1]
    acc = torch.float64 if preds.dtype == torch.float64 else torch.float32
    preds = preds.contiguous()
    w = weights.to(acc).expand(B, K).contiguous()
    if out is None:
        out = torch.empty(preds.shape[1:], dtype=preds.dtype, device=preds.device)
    N = out.numel() // B if B else 0
    if out.numel() == 0:
        return out
    block = min(block, triton.next_power_of_2(N))
    grid = (B, triton.cdiv(N, block))
    _combine_eps_kernel[grid](preds, w, out, B, N, K, BLOCK=block,
                              ACC=tl.float64 if acc == torch.float64 else tl.float32,
                              OUT_BF16=preds.dtype == torch.bfloat16)
    return out
