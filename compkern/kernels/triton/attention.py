"""Triton kernels of aggregate_attention and attention_losses (Separate / Enhance).

Definition and tie rule: compkern.ops.attention (the torch reference is
compkern.kernels.reference.attention_losses). Every load is converted to the accumulation type
(fp32; fp64 for fp64 inputs) right after it.

Forward:  _aggregate_kernel (once per layer, accumulating into the fp32 output) ->
          _select_kernel (B, pixel blocks): normalize + select the K tokens -> M (B, K, P) ->
          _reduce_kernel (B,): Separate (max of prod / sum), smoothing, Enhance, arg indices.
Backward: _grad_m_kernel (B,): d loss / d M, non-zero at the arg-max pixel and the smoothing
          neighbourhood of the Enhance arg-max -> _grad_maps_kernel (B, pixel blocks): through
          the softmax into d loss / d maps (written densely, zeros included).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _aggregate_kernel(x_ptr, out_ptr, H, PN, scale, FIRST: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PN
    acc_t = out_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK], dtype=acc_t)
    for h in range(H):
        acc += tl.load(x_ptr + (b * H + h) * PN + offs, mask=mask, other=0).to(acc_t)
    acc = acc * scale
    if not FIRST:
        acc += tl.load(out_ptr + b * PN + offs, mask=mask, other=0)
    tl.store(out_ptr + b * PN + offs, acc, mask=mask)


@triton.jit
def _softmax_tile(x_ptr, end, offs_p, offs_n, pmask, P, N, scale, acc_t: tl.constexpr):
    """Normalized probabilities A (BLOCK_P, BLOCK_N) over tokens [1, end) (0 elsewhere), and the row max / sum."""
    nmask = (offs_n >= 1) & (offs_n < end)
    mask = pmask[:, None] & nmask[None, :]
    x = tl.load(x_ptr + offs_p[:, None] * N + offs_n[None, :], mask=mask, other=float("-inf")).to(acc_t)
    mx = tl.max(x, axis=1)
    mx = tl.where(pmask, mx, 0.0)
    e = tl.where(mask, tl.exp(scale * (x - mx[:, None])), 0.0)
    z = tl.sum(e, axis=1)
    z = tl.where(pmask, z, 1.0)
    return e / z[:, None], mx, z


@triton.jit
def _select_kernel(x_ptr, tok_ptr, end_ptr, m_ptr, P, N, scale, K: tl.constexpr, SOFTMAX: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    pmask = offs_p < P
    acc_t = m_ptr.dtype.element_ty
    xb = x_ptr + b * P * N
    if SOFTMAX:
        end = tl.load(end_ptr + b)
        _, mx, z = _softmax_tile(xb, end, offs_p, offs_n, pmask, P, N, scale, acc_t)
    for k in tl.static_range(K):
        t = tl.load(tok_ptr + b * K + k)
        xt = tl.load(xb + offs_p * N + t, mask=pmask, other=0).to(acc_t)
        if SOFTMAX:
            v = tl.exp(scale * (xt - mx)) / z
        else:
            v = xt
        tl.store(m_ptr + (b * K + k) * P + offs_p, v, mask=pmask)


@triton.jit
def _reflect(i, R):
    i = tl.where(i < 0, -i, i)
    return tl.where(i >= R, 2 * (R - 1) - i, i)


@triton.jit
def _reduce_kernel(m_ptr, w_ptr, sep_ptr, en_ptr, arg_ptr, P, R, K: tl.constexpr, KS: tl.constexpr,
                   BLOCK_P: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK_P)
    pmask = offs < P
    y = offs // R
    x = offs % R
    mb = m_ptr + b * K * P
    acc_t = m_ptr.dtype.element_ty
    # Separate: max over pixels of prod_k M_k / sum_k M_k (0 where the sum is 0); first max wins.
    prod = tl.full([BLOCK_P], 1.0, dtype=acc_t)
    s = tl.zeros([BLOCK_P], dtype=acc_t)
    for k in tl.static_range(K):
        v = tl.load(mb + k * P + offs, mask=pmask, other=0).to(acc_t)
        prod *= v
        s += v
    ratio = tl.where(s > 0, prod / tl.where(s > 0, s, 1.0), 0.0)
    ratio = tl.where(pmask, ratio, float("-inf"))
    sep, p_sep = tl.max(ratio, axis=0, return_indices=True, return_indices_tie_break_left=True)
    # Enhance: 1 - min_k max_p smooth(M_k); first token / first pixel win ties.
    C: tl.constexpr = KS // 2
    minv = float("inf")
    k_en = 0
    q_en = 0
    for k in tl.static_range(K):
        sm = tl.zeros([BLOCK_P], dtype=acc_t)
        for dy in tl.static_range(KS):
            yy = _reflect(y + (dy - C), R)
            wy = tl.load(w_ptr + dy).to(acc_t)
            for dx in tl.static_range(KS):
                xx = _reflect(x + (dx - C), R)
                wx = tl.load(w_ptr + dx).to(acc_t)
                sm += wy * wx * tl.load(mb + k * P + yy * R + xx, mask=pmask, other=0).to(acc_t)
        sm = tl.where(pmask, sm, float("-inf"))
        mk, qk = tl.max(sm, axis=0, return_indices=True, return_indices_tie_break_left=True)
        better = mk < minv
        minv = tl.where(better, mk, minv)
        k_en = tl.where(better, k, k_en)
        q_en = tl.where(better, qk, q_en)
    tl.store(sep_ptr + b, sep)
    tl.store(en_ptr + b, 1.0 - minv)
    tl.store(arg_ptr + b * 3 + 0, p_sep.to(tl.int64))
    tl.store(arg_ptr + b * 3 + 1, k_en.to(tl.int64))
    tl.store(arg_ptr + b * 3 + 2, q_en.to(tl.int64))


@triton.jit
def _grad_m_kernel(m_ptr, w_ptr, arg_ptr, gs_ptr, ge_ptr, g_ptr, P, R, K: tl.constexpr, KS: tl.constexpr,
                   BLOCK_P: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK_P)
    pmask = offs < P
    mb = m_ptr + b * K * P
    acc_t = m_ptr.dtype.element_ty
    p_sep = tl.load(arg_ptr + b * 3 + 0)
    k_en = tl.load(arg_ptr + b * 3 + 1)
    q_en = tl.load(arg_ptr + b * 3 + 2)
    gs = tl.load(gs_ptr + b).to(acc_t)
    ge = tl.load(ge_ptr + b).to(acc_t)
    # Enhance: -ge times the adjoint of the smoothing at q_en (reflected taps add up).
    C: tl.constexpr = KS // 2
    qy = q_en // R
    qx = q_en % R
    adj = tl.zeros([BLOCK_P], dtype=acc_t)
    for dy in tl.static_range(KS):
        py = _reflect(qy + (dy - C), R)
        wy = tl.load(w_ptr + dy).to(acc_t)
        for dx in tl.static_range(KS):
            px = _reflect(qx + (dx - C), R)
            wx = tl.load(w_ptr + dx).to(acc_t)
            adj += tl.where(offs == py * R + px, wy * wx, 0.0)
    # Separate: d (prod / sum) / d M_k at p_sep = (prod_{i != k} M_i - prod / sum) / sum.
    s = tl.full([], 0.0, acc_t)
    prod = tl.full([], 1.0, acc_t)
    for k in tl.static_range(K):
        v = tl.load(mb + k * P + p_sep).to(acc_t)
        s += v
        prod *= v
    s_safe = tl.where(s > 0, s, 1.0)
    for k in tl.static_range(K):
        others = tl.full([], 1.0, acc_t)
        for i in tl.static_range(K):
            if i != k:
                others *= tl.load(mb + i * P + p_sep).to(acc_t)
        dk = tl.where(s > 0, gs * ((others - prod / s_safe) / s_safe), 0.0)  # no s * s (fp32 underflow)
        g = tl.where(offs == p_sep, dk, 0.0) - tl.where(k_en == k, ge, 0.0) * adj
        tl.store(g_ptr + (b * K + k) * P + offs, g, mask=pmask)


@triton.jit
def _round_to_bf16_rtne(x):
    """fp32 -> the nearest bf16 value (ties to even), still fp32: the later .to(bfloat16) is exact.
    (The Triton CPU interpreter truncates fp32 -> bf16; GPUs round to nearest even.)"""
    u = x.to(tl.uint32, bitcast=True)
    u = u + (0x7FFF + ((u >> 16) & 1))
    u = (u >> 16) << 16
    return u.to(tl.float32, bitcast=True)


@triton.jit
def _grad_maps_kernel(x_ptr, tok_ptr, end_ptr, g_ptr, out_ptr, P, N, scale, K: tl.constexpr, SOFTMAX: tl.constexpr,
                      BF16: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    pmask = offs_p < P
    acc_t = g_ptr.dtype.element_ty
    ga = tl.zeros([BLOCK_P, BLOCK_N], dtype=acc_t)
    for k in tl.static_range(K):
        t = tl.load(tok_ptr + b * K + k)
        gk = tl.load(g_ptr + (b * K + k) * P + offs_p, mask=pmask, other=0)
        ga += tl.where(offs_n[None, :] == t, gk[:, None], 0.0)
    if SOFTMAX:
        end = tl.load(end_ptr + b)
        a, _, _ = _softmax_tile(x_ptr + b * P * N, end, offs_p, offs_n, pmask, P, N, scale, acc_t)
        dot = tl.sum(a * ga, axis=1)
        out = scale * a * (ga - dot[:, None])
    else:
        out = ga
    mask = pmask[:, None] & (offs_n < N)[None, :]
    if BF16:
        out = _round_to_bf16_rtne(out)
    tl.store(out_ptr + b * P * N + offs_p[:, None] * N + offs_n[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tile(P: int, N: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_N): about 4096 elements per program on a GPU; in the CPU interpreter, where
    each program costs Python overhead, whole maps per program."""
    block_n = triton.next_power_of_2(N)
    elems = 1 << 17 if _interpret() else 4096
    block_p = min(triton.next_power_of_2(P), max(1, elems // block_n))
    return block_p, block_n


def aggregate_attention_forward(views: list[torch.Tensor]) -> torch.Tensor:
    """views: list of contiguous (B, H_l, P, N), one dtype -> (B, P, N) mean over (layer, head), fp32 (fp64)."""
    B, _, P, N = views[0].shape
    total = sum(v.shape[1] for v in views)
    out = torch.empty(B, P, N, dtype=_acc_dtype(views[0].dtype), device=views[0].device)
    BLOCK = min(1 << 18, triton.next_power_of_2(P * N)) if _interpret() else 1024
    grid = (B, triton.cdiv(P * N, BLOCK))
    for i, v in enumerate(views):
        _aggregate_kernel[grid](v, out, v.shape[1], P * N, 1.0 / total, FIRST=(i == 0), BLOCK=BLOCK)
    return out


def attention_losses_forward(maps, tokens, text_end, weights, softmax: bool, scale: float):
    """maps (B, P, N) contiguous, tokens (B, K) int64, text_end (B,) int64, weights (ks,) ->
    (sep (B,), en (B,), arg (B, 3) int64 = (p_sep, k_en, q_en))."""
    B, P, N = maps.shape
    K, KS = tokens.shape[1], weights.shape[0]
    R = int(round(P ** 0.5))
    acc = _acc_dtype(maps.dtype)
    m = torch.empty(B, K, P, dtype=acc, device=maps.device)
    block_p, block_n = _tile(P, N)
    _select_kernel[(B, triton.cdiv(P, block_p))](maps, tokens, text_end, m, P, N, scale, K=K, SOFTMAX=softmax,
                                                 BLOCK_P=block_p, BLOCK_N=block_n)
    sep = torch.empty(B, dtype=acc, device=maps.device)
    en = torch.empty(B, dtype=acc, device=maps.device)
    arg = torch.empty(B, 3, dtype=torch.int64, device=maps.device)
    _reduce_kernel[(B,)](m, weights, sep, en, arg, P, R, K=K, KS=KS, BLOCK_P=triton.next_power_of_2(P))
    return sep, en, arg


def attention_losses_backward(maps, tokens, text_end, weights, softmax: bool, scale: float, arg, grad_sep, grad_en):
    """-> d (sum grad_sep * sep + grad_en * en) / d maps, (B, P, N) in maps' dtype."""
    B, P, N = maps.shape
    K, KS = tokens.shape[1], weights.shape[0]
    R = int(round(P ** 0.5))
    acc = _acc_dtype(maps.dtype)
    block_p, block_n = _tile(P, N)
    m = torch.empty(B, K, P, dtype=acc, device=maps.device)
    _select_kernel[(B, triton.cdiv(P, block_p))](maps, tokens, text_end, m, P, N, scale, K=K, SOFTMAX=softmax,
                                                 BLOCK_P=block_p, BLOCK_N=block_n)
    g = torch.empty(B, K, P, dtype=acc, device=maps.device)
    _grad_m_kernel[(B,)](m, weights, arg, grad_sep, grad_en, g, P, R, K=K, KS=KS, BLOCK_P=triton.next_power_of_2(P))
    out = torch.empty_like(maps)
    _grad_maps_kernel[(B, triton.cdiv(P, block_p))](maps, tokens, text_end, g, out, P, N, scale, K=K,
                                                    SOFTMAX=softmax, BF16=maps.dtype == torch.bfloat16,
                                                    BLOCK_P=block_p, BLOCK_N=block_n)
    return out
