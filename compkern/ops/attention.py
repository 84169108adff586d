"""aggregate_attention and attention_losses: the attention-map losses of Separate-and-Enhance.

Pipeline (what a SepEn trainer does each step):

    maps = aggregate_attention(layer_probs, heads=8, resolution=16)      # (B, P, N), P = 16 * 16
    sep, en = attention_losses(maps, token_indices)                      # (B,), (B,)
    loss = lambda_sep * sep.mean() + lambda_en * en.mean()

Both ops are differentiable w.r.t. their tensor inputs; the gradient flows back through
aggregate_attention into every layer's attention probabilities (and so into the UNet).

Normalization (where it comes from)
-----------------------------------
* Attend-and-Excite (github.com/yuval-alaluf/Attend-and-Excite, pipeline_attend_and_excite.py,
  ``_compute_max_attention_per_index``; the diffusers port StableDiffusionAttendAndExcitePipeline
  does the same): ``attention_maps[:, :, 1:last_idx] * 100``, softmax over that token range,
  token indices shifted by one; ``last_idx = -1`` by default (``len(tokenize(prompt)) - 1``, the
  end-of-text token, with ``normalize_eot``). Then per token a 3x3 Gaussian smoothing with
  sigma 0.5 on the reflect-padded map (``utils/gaussian_smoothing.py``), whose weights are
  ``exp(-((i - c) / (2 sigma))^2)`` normalized to sum 1 (note the 2 sigma: an effective standard
  deviation of sigma * sqrt(2); we keep that formula so sigma means what it means there).
  Loss = max over tokens of (1 - max over pixels of the smoothed map) = 1 - min_k max_p.
* Separate-and-Enhance (github.com/adobe/SeperateAndEnhance, src/utils.py
  ``compute_separate_loss`` / ``compute_enhance_loss``, src/train_individual.py): the raw averaged
  probabilities (no renormalization), Separate = max of M1 * M2 / (M1 + M2), Enhance = 1 - min of
  the two smoothed maxima, the same GaussianSmoothing(kernel_size=3, sigma=0.5). Their
  aggregate_attention averages over layers only and keeps heads as channels; the DESIGN contract
  here averages over layers and heads (as Attend-and-Excite does).

Adopted rule: ``normalize="softmax"`` (default) is the Attend-and-Excite normalization: token 0
(start token) and tokens >= ``text_end`` (default N - 1, i.e. A&E's ``1:-1``; pass the index of
the end-of-text token for A&E's ``normalize_eot``) are dropped, the rest are scaled by
``softmax_scale`` (100) and softmaxed over tokens. Token indices are given in the original
token numbering (0 = start token; they must lie in [1, text_end)). ``normalize="none"``
reproduces the SepEn code exactly (raw maps; any index in [0, N)). For K tokens, Separate =
max_p prod_k M_k / sum_k M_k (0 where the sum is 0), which is SepEn's formula for K = 2 and is 1
for K = 1.

Backward and ties: the max over pixels and the min over tokens route the gradient to a single
element, the FIRST one in case of ties (lowest row-major pixel index; first token in
``token_indices`` order), exactly as the reference does with torch.argmax / torch.argmin (which
return the first occurrence). Every backend follows this rule; tests avoid exact ties.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from compkern import _dispatch
from compkern.kernels import reference
from compkern.ops._checks import check_same_device, check_tensor

NORMALIZE_MODES = ("softmax", "none")


# ----------------------------------------------------------------------------------------------
# argument checks (one place)
# ----------------------------------------------------------------------------------------------

def _layer_views(layer_probs, resolution: int, heads: int | None,
                 batch_size: int | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Checks layer_probs; returns (the layers at ``resolution`` as given, the same as
    (B, H_l, P, N) views)."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    if isinstance(layer_probs, torch.Tensor):
        layer_probs = [layer_probs]
    if not isinstance(layer_probs, (list, tuple)) or len(layer_probs) == 0:
        raise TypeError("layer_probs must be a non-empty list of (B*heads, P, N) or (B, heads, P, N) tensors")
    for name, v in (("heads", heads), ("batch_size", batch_size)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive int or None, got {v!r}")
    P = resolution * resolution
    views: list[torch.Tensor] = []
    originals: list[torch.Tensor] = []
    for i, x in enumerate(layer_probs):
        check_tensor(f"layer_probs[{i}]", x, expected="(B*heads, P, N) or (B, heads, P, N)")
        if x.dim() not in (3, 4):
            raise ValueError(f"layer_probs[{i}] must have shape (B*heads, P, N) or (B, heads, P, N), got {tuple(x.shape)}")
        if x.shape[-2] != P:
            continue  # another resolution: skipped, as Attend-and-Excite's aggregate_attention does
        originals.append(x)
        if x.dim() == 3:
            rows = x.shape[0]
            if heads is not None:
                if rows % heads:
                    raise ValueError(f"layer_probs[{i}] has {rows} rows, not a multiple of heads={heads}")
                B = rows // heads
            elif batch_size is not None:
                if rows % batch_size:
                    raise ValueError(f"layer_probs[{i}] has {rows} rows, not a multiple of batch_size={batch_size}")
                B = batch_size
            else:
                raise ValueError("3D layer_probs (B*heads, P, N) need heads= or batch_size= to split the rows")
            x = x.reshape(B, rows // B, P, x.shape[-1])
        views.append(x)
    if not views:
        shapes = [tuple(x.shape) for x in layer_probs]
        raise ValueError(f"no layer in layer_probs has P = resolution^2 = {P} pixels (shapes {shapes})")
    B, N, dtype = views[0].shape[0], views[0].shape[-1], views[0].dtype
    for v in views[1:]:
        if v.shape[0] != B or v.shape[-1] != N:
            raise ValueError(f"all layers must share B = {B} and N = {N}, got (B, H, P, N) = {tuple(v.shape)}")
        if v.dtype != dtype:
            raise TypeError(f"all layers must share one dtype, got {dtype} and {v.dtype}")
    if batch_size is not None and B != batch_size:
        raise ValueError(f"layer_probs have batch {B}, but batch_size={batch_size}")
    check_same_device(**{f"layer_probs[{i}]": v for i, v in enumerate(views)})
    return originals, views


def _check_losses(maps, token_indices, sigma, kernel_size, normalize, softmax_scale, text_end):
    """Checks attention_losses' arguments; returns (tokens (B, K) int64, text_end (B,) int64, R)."""
    check_tensor("maps", maps, ndim=3, expected="(B, P, N) with P = h * w, h == w")
    B, P, N = maps.shape
    if B < 1 or N < 1:
        raise ValueError(f"maps must have B >= 1 and N >= 1, got {tuple(maps.shape)}")
    R = math.isqrt(P)
    if R * R != P or P == 0:
        raise ValueError(f"maps must have a square number of pixels P = h * w (h == w) on axis 1, got P = {P}")
    # A finite sum implies finite elements (NaN and inf propagate); the full test only when it is not.
    acc = torch.float64 if maps.dtype == torch.float64 else torch.float32
    if not bool(torch.isfinite(maps.sum(dtype=acc))) and not bool(torch.isfinite(maps).all()):
        raise ValueError("maps contains NaN or inf")
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma must be a finite float > 0, got {sigma!r}")
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd int >= 1, got {kernel_size!r}")
    if kernel_size // 2 >= R:
        raise ValueError(f"kernel_size must satisfy kernel_size // 2 < h = {R} (reflect padding), got {kernel_size}")
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) \
            or not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale must be a finite float > 0, got {softmax_scale!r}")
    # token_indices
    if isinstance(token_indices, (list, tuple)):
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in token_indices):
            raise TypeError(f"token_indices must be ints, got {token_indices!r}")
        token_indices = torch.tensor(token_indices, dtype=torch.int64)
    if not isinstance(token_indices, torch.Tensor):
        raise TypeError(f"token_indices must be an int64 tensor (K,) or (B, K), got {type(token_indices).__name__}")
    if token_indices.dtype != torch.int64:
        raise TypeError(f"token_indices must be int64 (K,) or (B, K), got {token_indices.dtype}")
    if token_indices.dim() == 1:
        token_indices = token_indices[None, :].expand(B, -1)
    if token_indices.dim() != 2 or token_indices.shape[0] != B:
        raise ValueError(f"token_indices must have shape (K,) or (B, K) = ({B}, K), got {tuple(token_indices.shape)}")
    K = token_indices.shape[1]
    if K < 1:
        raise ValueError("token_indices must not be empty (K >= 1)")
    token_indices = token_indices.to(maps.device).contiguous()
    tok_cpu = token_indices.cpu()
    sorted_tok = tok_cpu.sort(1).values
    if K > 1 and bool((sorted_tok[:, 1:] == sorted_tok[:, :-1]).any()):
        raise ValueError(f"token_indices must not repeat a token, got {tok_cpu.tolist()}")
    # text_end
    if text_end is None:
        text_end = N - 1
    if isinstance(text_end, int) and not isinstance(text_end, bool):
        text_end = torch.full((B,), text_end, dtype=torch.int64)
    if not isinstance(text_end, torch.Tensor) or text_end.dtype != torch.int64 or tuple(text_end.shape) not in ((B,), ()):
        raise TypeError(f"text_end must be None, an int or an int64 tensor (B,) = ({B},), got {text_end!r}")
    text_end = text_end.expand(B).to(maps.device).contiguous()
    end_cpu = text_end.cpu()
    if normalize == "softmax":
        if bool(((end_cpu < 2) | (end_cpu > N)).any()):
            raise ValueError(f"text_end must lie in [2, N = {N}] (tokens [1, text_end) are renormalized), got {end_cpu.tolist()}")
        if bool(((tok_cpu < 1) | (tok_cpu >= end_cpu[:, None])).any()):
            raise ValueError(f"token_indices must lie in [1, text_end) = [1, {end_cpu.tolist()}) with normalize='softmax' "
                             f"(token 0 is the start token), got {tok_cpu.tolist()}")
    elif bool(((tok_cpu < 0) | (tok_cpu >= N)).any()):
        raise ValueError(f"token_indices must lie in [0, N = {N}), got {tok_cpu.tolist()}")
    return token_indices, text_end, R


# ----------------------------------------------------------------------------------------------
# aggregate_attention
# ----------------------------------------------------------------------------------------------

class _AggregateFn(torch.autograd.Function):
    """Fused mean over (layer, head). Inputs are the layers as given ((B*H, P, N) or (B, H, P, N));
    d out / d layer = 1 / (number of maps) broadcast over heads: a stride-0 view for 4D layers, one
    materialized tensor per distinct (shape, dtype) for 3D layers, shared by all such layers."""

    @staticmethod
    def forward(ctx, kernels, B, *layers):
        fwd, ctx.fill = kernels
        views = [x.reshape(B, x.shape[0] // B, *x.shape[1:]) if x.dim() == 3 else x for x in layers]
        ctx.B = B
        ctx.metas = [(x.shape, x.dtype) for x in layers]
        return fwd(views)

    @staticmethod
    def backward(ctx, grad):
        B = ctx.B
        total = sum(shape[0] // B if len(shape) == 3 else shape[1] for shape, _ in ctx.metas)
        grad = grad.contiguous()
        cache: dict = {}
        for shape, dtype in ctx.metas:
            key = (tuple(shape), dtype)
            if key in cache:
                continue
            if len(shape) == 4:
                cache[key] = (grad * (1.0 / total)).to(dtype).unsqueeze(1).expand(shape)
                continue
            out = torch.empty(shape, dtype=dtype, device=grad.device)
            if ctx.fill is not None:
                ctx.fill(grad, 1.0 / total, out)  # one pass: scale, broadcast over heads, convert
            else:
                out.view(B, shape[0] // B, *shape[1:]).copy_((grad * (1.0 / total)).unsqueeze(1))
            cache[key] = out
        return (None, None, *[cache[(tuple(shape), dtype)] for shape, dtype in ctx.metas])


def _aggregate_cpp(views):
    return _dispatch.cpp_module().aggregate_attention_forward([v.contiguous() for v in views])


def _aggregate_cpp_fill(grad, scale, out):
    _dispatch.cpp_module().aggregate_attention_backward(grad, scale, out)


def _aggregate_triton(views):
    from compkern.kernels.triton.attention import aggregate_attention_forward
    return aggregate_attention_forward([v.contiguous() for v in views])


AGGREGATE_IMPLS = {"torch": "torch", "cpp": (_aggregate_cpp, _aggregate_cpp_fill), "triton": (_aggregate_triton, None)}


def aggregate_attention(layer_probs: Sequence[torch.Tensor] | torch.Tensor, *, resolution: int = 16,
                        heads: int | None = None, batch_size: int | None = None,
                        backend: str = "auto") -> torch.Tensor:
    """Mean cross-attention map over layers and heads.

    layer_probs: list of per-layer probabilities, each (B*heads, P, N) as attention processors
    produce them (give ``heads=`` or ``batch_size=``; heads may differ per layer with
    ``batch_size=``) or (B, heads, P, N). Layers whose P != resolution**2 are skipped (as
    Attend-and-Excite's aggregate_attention does). Returns (B, P, N) in fp32 (fp64 for fp64), the
    mean over all (layer, head) maps, read once from each layer (no stacked copy).
    Differentiable w.r.t. every layer."""
    layers, views = _layer_views(layer_probs, resolution, heads, batch_size)
    impl = _dispatch.resolve("aggregate_attention", backend, views[0].device, AGGREGATE_IMPLS)
    if impl == "torch":
        return reference.aggregate_attention(views)
    return _AggregateFn.apply(impl, views[0].shape[0], *layers)


class AttentionAccumulator:
    """Collects per-layer attention probabilities inside attention processors, then averages.

        acc = AttentionAccumulator(batch_size=B, resolution=16)
        # in each cross-attention processor:  acc.add(attention_probs)      # (B*heads, P, N)
        maps = acc.mean()                                                  # (B, P, N)
        acc.reset()

    Layers at other resolutions are ignored. With autograd on (training), ``add`` keeps a
    reference (no copy: autograd keeps these tensors alive anyway) and ``mean`` runs one fused
    aggregate_attention over all of them, differentiable. Without autograd (guidance at inference),
    ``add`` folds each layer into an fp32 running sum so that layers can be freed at once.
    """

    def __init__(self, batch_size: int, resolution: int = 16, backend: str = "auto"):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.batch_size, self.resolution, self.backend = batch_size, resolution, backend
        self.reset()

    def reset(self) -> None:
        self._layers: list[torch.Tensor] = []
        self._sum: torch.Tensor | None = None
        self._count = 0  # maps (layer, head) folded into _sum

    def add(self, probs: torch.Tensor) -> None:
        """probs (B*heads, P, N) or (B, heads, P, N); ignored when P != resolution**2."""
        check_tensor("probs", probs, expected="(B*heads, P, N) or (B, heads, P, N)")
        if probs.dim() not in (3, 4):
            raise ValueError(f"probs must have shape (B*heads, P, N) or (B, heads, P, N), got {tuple(probs.shape)}")
        if probs.shape[-2] != self.resolution ** 2:
            return
        if torch.is_grad_enabled() and probs.requires_grad:
            self._layers.append(probs)
            return
        _, (v,) = _layer_views([probs], self.resolution, None, self.batch_size)
        part = aggregate_attention([v], resolution=self.resolution, backend=self.backend) * v.shape[1]
        self._sum = part if self._sum is None else self._sum + part
        self._count += v.shape[1]

    def __len__(self) -> int:
        return len(self._layers) + (1 if self._sum is not None else 0)

    def mean(self) -> torch.Tensor:
        """(B, P, N) mean over every (layer, head) map added since the last reset."""
        if not self._layers and self._sum is None:
            raise ValueError(f"AttentionAccumulator holds no layer at resolution {self.resolution}")
        if not self._layers:
            return self._sum / self._count
        _, views = _layer_views(self._layers, self.resolution, None, self.batch_size)
        out = aggregate_attention(self._layers, resolution=self.resolution, batch_size=self.batch_size,
                                  backend=self.backend)
        if self._sum is None:
            return out
        n = sum(v.shape[1] for v in views)
        return (out * n + self._sum) / (n + self._count)


# ----------------------------------------------------------------------------------------------
# attention_losses
# ----------------------------------------------------------------------------------------------

class _LossesFn(torch.autograd.Function):
    """Fused forward (selection, normalization, smoothing, both reductions) and a backward that
    writes the gradient only at the arg-max pixels / arg-min token (the rest of grad is zero)."""

    @staticmethod
    def forward(ctx, kernels, maps, tokens, text_end, weights, normalize, scale):
        fwd, bwd = kernels
        sep, en, arg = fwd(maps, tokens, text_end, weights, normalize, scale)
        ctx.save_for_backward(maps, tokens, text_end, weights, arg)
        ctx.bwd, ctx.normalize, ctx.scale = bwd, normalize, scale
        ctx.mark_non_differentiable(arg)
        return sep, en, arg

    @staticmethod
    def backward(ctx, grad_sep, grad_en, _grad_arg):
        maps, tokens, text_end, weights, arg = ctx.saved_tensors
        B = maps.shape[0]
        acc = torch.float64 if maps.dtype == torch.float64 else torch.float32
        gs = torch.zeros(B, dtype=acc, device=maps.device) if grad_sep is None else grad_sep.to(acc).contiguous()
        ge = torch.zeros(B, dtype=acc, device=maps.device) if grad_en is None else grad_en.to(acc).contiguous()
        grad = ctx.bwd(maps, tokens, text_end, weights, ctx.normalize, ctx.scale, arg, gs, ge)
        return None, grad, None, None, None, None, None


def _losses_cpp_fwd(maps, tokens, text_end, weights, normalize, scale):
    return _dispatch.cpp_module().attention_losses_forward(maps, tokens, text_end, weights, normalize == "softmax", scale)


def _losses_cpp_bwd(maps, tokens, text_end, weights, normalize, scale, arg, gs, ge):
    return _dispatch.cpp_module().attention_losses_backward(maps, tokens, text_end, weights, normalize == "softmax",
                                                            scale, arg, gs, ge)


def _losses_triton_fwd(maps, tokens, text_end, weights, normalize, scale):
    from compkern.kernels.triton.attention import attention_losses_forward
    return attention_losses_forward(maps, tokens, text_end, weights, normalize == "softmax", scale)


def _losses_triton_bwd(maps, tokens, text_end, weights, normalize, scale, arg, gs, ge):
    from compkern.kernels.triton.attention import attention_losses_backward
    return attention_losses_backward(maps, tokens, text_end, weights, normalize == "softmax", scale, arg, gs, ge)


LOSSES_IMPLS = {"torch": "torch", "cpp": (_losses_cpp_fwd, _losses_cpp_bwd),
                "triton": (_losses_triton_fwd, _losses_triton_bwd)}


def attention_losses(maps: torch.Tensor, token_indices: torch.Tensor | Sequence[int], *, sigma: float = 0.5,
                     kernel_size: int = 3, normalize: str = "softmax", softmax_scale: float = 100.0,
                     text_end: int | torch.Tensor | None = None,
                     backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Separate and Enhance losses per sample.

    maps (B, P, N): cross-attention probabilities averaged over layers and heads (see
    aggregate_attention), P = h * w with h == w; token_indices (K,) or (B, K) int64, distinct, in
    the original token numbering (0 = start token). Returns (sep, en), each (B,) fp32 (fp64 for
    fp64 maps), differentiable w.r.t. maps:

        M_k = normalized maps at token k (normalize="softmax": Attend-and-Excite's softmax of
              softmax_scale * maps over tokens [1, text_end), text_end default N - 1;
              "none": the raw maps, as the Separate-and-Enhance code uses them)
        sep = max over pixels of prod_k M_k / sum_k M_k            (1 for K = 1)
        en  = 1 - min_k max over pixels of smooth(M_k)

    smooth: separable Gaussian (A&E's weights exp(-((i-c)/(2 sigma))^2), normalized), reflect
    padding kernel_size // 2. See the module docstring for sources and the tie rule.
    """
    tokens, text_end, _ = _check_losses(maps, token_indices, sigma, kernel_size, normalize, softmax_scale, text_end)
    impl = _dispatch.resolve("attention_losses", backend, maps.device, LOSSES_IMPLS)
    if impl == "torch":
        return reference.attention_losses(maps, tokens, text_end, float(sigma), kernel_size, normalize,
                                          float(softmax_scale))
    acc = torch.float64 if maps.dtype == torch.float64 else torch.float32
    weights = reference.attention_gaussian_weights(float(sigma), kernel_size, acc, maps.device)
    sep, en, _ = _LossesFn.apply(impl, maps.contiguous(), tokens, text_end, weights, normalize, float(softmax_scale))
    return sep, en
