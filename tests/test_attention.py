"""aggregate_attention / attention_losses: reference vs the Attend-and-Excite / SepEn formulas,
gradcheck, cpp and triton (interpreter) values and gradients vs the fp64 reference, bad inputs."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from compkern import _dispatch
from compkern.kernels import reference
from compkern.ops import AttentionAccumulator, aggregate_attention, attention_losses
from tests.helpers import DTYPES, assert_close_to_reference

BACKENDS = [b for b in ("cpp", "triton") if _dispatch.unavailable_reason(b, torch.device("cpu")) is None]


def _probs(shape, dtype=torch.float32, seed=0, temp=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(temp * torch.randn(*shape, generator=g, dtype=torch.float64), -1).to(dtype)


def _tokens(B, K, N, seed=0):
    """(B, K) distinct indices in [1, N - 1) (valid for the default text_end = N - 1)."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.stack([torch.randperm(N - 2, generator=g)[:K] + 1 for _ in range(B)])


def _min_gap(maps, tokens, normalize, kernel_size=3, sigma=0.5):
    """Smallest relative gap between the top two candidates of every arg-max / arg-min (fp64)."""
    x = maps.double()
    B, P, N = x.shape
    R, K = int(P ** 0.5), tokens.shape[1]
    if normalize == "softmax":
        a = torch.softmax(100 * x[:, :, 1:N - 1], -1)
        m = a.gather(2, (tokens - 1)[:, None, :].expand(B, P, K))
    else:
        m = x.gather(2, tokens[:, None, :].expand(B, P, K))
    ratio = m.prod(-1) / m.sum(-1)
    pad = kernel_size // 2
    img = F.pad(m.permute(0, 2, 1).reshape(B * K, 1, R, R), (pad,) * 4, mode="reflect")
    w = reference.attention_gaussian_weights(sigma, kernel_size)
    sm = F.conv2d(img, torch.outer(w, w)[None, None]).reshape(B, K, P)
    gaps = []
    if K > 1:
        top = ratio.topk(2, -1).values
        gaps.append(((top[:, 0] - top[:, 1]) / top[:, 0]).min())
    top = sm.topk(2, -1).values  # (B, K, 2)
    k_en = top[..., 0].argmin(-1)  # only the arg-min token's arg-max pixel carries a gradient
    top = top[torch.arange(B), k_en]
    gaps.append(((top[:, 0] - top[:, 1]) / top[:, 0]).min())
    if K > 1:
        mx = sm.amax(-1).sort(-1).values
        gaps.append(((mx[:, 1] - mx[:, 0]) / mx[:, 1]).min())
    return min(float(g) for g in gaps)


def _case(B, K, R, N, dtype, normalize="softmax"):
    """Maps without near-ties in any arg-max / arg-min (tests avoid exact ties)."""
    for seed in range(20):
        maps = _probs((B, R * R, N), dtype, seed)
        tokens = _tokens(B, K, N, seed)
        if _min_gap(maps, tokens, normalize) > 1e-4:
            return maps, tokens
    raise AssertionError("no tie-free case found")


def _loss_and_grads(maps, tokens, backend, normalize="softmax", ws=None, we=None):
    x = maps.detach().clone().requires_grad_()
    sep, en = attention_losses(x, tokens, normalize=normalize, backend=backend)
    B = x.shape[0]
    ws = torch.linspace(0.5, 1.5, B, dtype=sep.dtype) if ws is None else ws
    we = torch.linspace(-1.0, 2.0, B, dtype=sep.dtype) if we is None else we
    (sep * ws + en * we).sum().backward()
    return sep.detach(), en.detach(), x.grad


# ---- the reference is the Attend-and-Excite / Separate-and-Enhance computation ---------------

def _ae_gaussian_2d(kernel_size, sigma):
    # Attend-and-Excite's utils/gaussian_smoothing.py GaussianSmoothing weights, 2D, written out.
    import math
    grid = torch.meshgrid([torch.arange(kernel_size, dtype=torch.float64)] * 2, indexing="ij")
    kernel = 1
    for g in grid:
        mean = (kernel_size - 1) / 2
        kernel = kernel * 1 / (sigma * math.sqrt(2 * math.pi)) * torch.exp(-((g - mean) / (2 * sigma)) ** 2)
    return (kernel / kernel.sum())[None, None]


def test_reference_is_attend_and_excite_and_sepen():
    B, R, N = 2, 8, 12
    maps = _probs((B, R * R, N), torch.float64, 3)
    idx = [2, 5, 7]
    sep, en = attention_losses(maps, idx, backend="torch")
    kernel = _ae_gaussian_2d(3, 0.5)
    for b in range(B):
        att = maps[b].reshape(R, R, N)
        # A&E _compute_max_attention_per_index + _compute_loss (loss = max_i (1 - max smoothed))
        text = torch.softmax(att[:, :, 1:-1] * 100, -1)
        maxes = []
        for i in [t - 1 for t in idx]:
            img = F.pad(text[:, :, i][None, None], (1, 1, 1, 1), mode="reflect")
            maxes.append(F.conv2d(img, kernel).max())
        assert torch.allclose(en[b], max(1 - m for m in maxes), atol=1e-12)
        m = [text[:, :, t - 1] for t in idx]
        assert torch.allclose(sep[b], (m[0] * m[1] * m[2] / (m[0] + m[1] + m[2])).max(), atol=1e-12)
    # SepEn compute_separate_loss / compute_enhance_loss on the raw maps (normalize="none"), K = 2
    sep, en = attention_losses(maps, [3, 6], normalize="none", backend="torch")
    for b in range(B):
        a1, a2 = maps[b, :, 3].reshape(R, R), maps[b, :, 6].reshape(R, R)
        assert torch.allclose(sep[b], (a1 * a2 / (a1 + a2)).max(), atol=1e-12)
        s1 = F.conv2d(F.pad(a1[None, None], (1, 1, 1, 1), mode="reflect"), kernel).max()
        s2 = F.conv2d(F.pad(a2[None, None], (1, 1, 1, 1), mode="reflect"), kernel).max()
        assert torch.allclose(en[b], 1 - torch.minimum(s1, s2), atol=1e-12)


@pytest.mark.parametrize("normalize,tokens,ks", [
    ("softmax", [[2], [3]], 3), ("softmax", [[1, 3, 5], [2, 4, 1]], 3), ("none", [[0, 6], [3, 4]], 5)])
def test_reference_gradcheck(normalize, tokens, ks):
    maps = _probs((2, 16, 7), torch.float64, 4).requires_grad_()
    text_end = torch.tensor([6, 5])

    def f(x):
        return attention_losses(x, torch.tensor(tokens), normalize=normalize, kernel_size=ks, sigma=0.8,
                                text_end=text_end, backend="torch")
    assert torch.autograd.gradcheck(f, (maps,), fast_mode=True)


# ---- backends vs the fp64 reference ----------------------------------------------------------

_FULL = list(itertools.product([1, 3], [1, 2, 4], [8, 16, 32], [5, 77]))
# The Triton interpreter is slow: a subset that still covers every value of B, K, R and N.
_TRITON = [(1, 1, 8, 5), (3, 2, 16, 77), (3, 4, 32, 77), (1, 4, 8, 77), (3, 2, 32, 5)]


def _cases(backend):
    """cpp: the full product in fp32, the covering subset in fp16 / bf16; triton: the subset."""
    return [(backend, dtype, *shape) for dtype in DTYPES
            for shape in (_FULL if backend == "cpp" and dtype == torch.float32 else _TRITON)]


@pytest.mark.parametrize("backend,dtype,B,K,R,N", [c for b in BACKENDS for c in _cases(b)])
def test_losses_match_reference(backend, dtype, B, K, R, N):
    if K > N - 2:
        K = N - 2
    maps, tokens = _case(B, K, R, N, dtype)
    sep, en, grad = _loss_and_grads(maps, tokens, backend)
    ws = torch.linspace(0.5, 1.5, B, dtype=torch.float64)
    we = torch.linspace(-1.0, 2.0, B, dtype=torch.float64)
    rsep, ren, rgrad = _loss_and_grads(maps.double(), tokens, "torch", ws=ws, we=we)
    nsep, nen, ngrad = _loss_and_grads(maps, tokens, "torch")
    assert sep.dtype == torch.float32 and en.dtype == torch.float32 and grad.dtype == dtype
    assert_close_to_reference(sep, rsep, nsep, name="sep")
    assert_close_to_reference(en, ren, nen, name="en")
    assert_close_to_reference(grad, rgrad, ngrad, atol=1e-4, name="grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_losses_none_normalization_and_text_end(backend):
    B, K, R, N = 3, 3, 8, 9
    maps, tokens = _case(B, K, R, N, torch.float32, "none")
    tokens[0, 0] = 0  # the start token is selectable without renormalization
    sep, en, grad = _loss_and_grads(maps, tokens, backend, normalize="none")
    rsep, ren, rgrad = _loss_and_grads(maps.double(), tokens, "torch", normalize="none")
    torch.testing.assert_close(sep, rsep.float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(en, ren.float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, rgrad.float(), atol=1e-5, rtol=1e-4)
    # per-sample text_end and per-sample tokens with the softmax normalization
    text_end = torch.tensor([5, 9, 7])
    tokens = torch.tensor([[1, 3], [2, 8], [6, 4]])
    out = attention_losses(maps, tokens, text_end=text_end, backend=backend)
    ref = attention_losses(maps.double(), tokens, text_end=text_end, backend="torch")
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r.float(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", *BACKENDS])
def test_single_token_separate_is_one(backend):
    maps = _probs((3, 64, 10), torch.float32, 5)
    sep, en = attention_losses(maps, [4], backend=backend)
    torch.testing.assert_close(sep, torch.ones(3), atol=1e-6, rtol=0)
    assert bool(((en > 0) & (en < 1)).all())


# ---- aggregate_attention ---------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", *BACKENDS])
@pytest.mark.parametrize("dtype", DTYPES)
def test_aggregate_is_mean_over_layers_and_heads(backend, dtype):
    B, H, R, N = 2, 3, 4, 6
    layers = [_probs((B * H, R * R, N), dtype, s).requires_grad_() for s in range(3)]
    other = _probs((B * H, 4 * R * R, N), dtype, 9)  # another resolution: skipped
    out = aggregate_attention([layers[0], other, *layers[1:]], heads=H, resolution=R, backend=backend)
    plain = torch.stack([x.double().reshape(B, H, R * R, N) for x in layers]).mean((0, 2))
    assert out.shape == (B, R * R, N) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), plain, atol=1e-6, rtol=1e-6)
    weight = _probs((B, R * R, N), torch.float32, 11)
    (out * weight).sum().backward()
    expected = (weight / (3 * H)).repeat_interleave(H, 0).to(dtype)  # (B*H, P, N)
    for x in layers:
        torch.testing.assert_close(x.grad, expected, atol=1e-6, rtol=1e-2 if dtype != torch.float32 else 1e-6)


@pytest.mark.parametrize("backend", ["torch", *BACKENDS])
def test_aggregate_layouts_and_accumulator(backend):
    B, R, N = 2, 4, 5
    a = _probs((B * 2, R * R, N), torch.float32, 1)  # 2 heads
    b = _probs((B * 4, R * R, N), torch.float32, 2)  # 4 heads
    c = _probs((B, 3, R * R, N), torch.float32, 3)   # (B, H, P, N)
    plain = torch.cat([a.reshape(B, 2, -1, N), b.reshape(B, 4, -1, N), c], 1).mean(1)
    out = aggregate_attention([a, b, c], batch_size=B, resolution=R, backend=backend)
    torch.testing.assert_close(out, plain, atol=1e-6, rtol=1e-6)
    acc = AttentionAccumulator(batch_size=B, resolution=R, backend=backend)
    for x in (a, b, c, _probs((B * 2, 4 * R * R, N))):
        acc.add(x)  # no grad: folded into a running sum
    torch.testing.assert_close(acc.mean(), plain, atol=1e-6, rtol=1e-6)
    acc.reset()
    leaves = [x.clone().requires_grad_() for x in (a, b, c)]
    for x in leaves:
        acc.add(x)  # with grad: kept by reference, one fused aggregate at mean()
    maps = acc.mean()
    torch.testing.assert_close(maps, plain, atol=1e-6, rtol=1e-6)
    maps.sum().backward()
    for x in leaves:
        torch.testing.assert_close(x.grad, torch.full_like(x, 1 / 9))


@pytest.mark.parametrize("backend", BACKENDS)
def test_end_to_end_gradient_matches_torch(backend):
    B, H, R, N = 2, 2, 8, 10
    base = [_probs((B * H, R * R, N), torch.float32, s) for s in range(3)]
    grads = {}
    for be in ("torch", backend):
        layers = [x.clone().requires_grad_() for x in base]
        sep, en = attention_losses(aggregate_attention(layers, heads=H, resolution=R, backend=be), [2, 6], backend=be)
        (sep.sum() + 2 * en.sum()).backward()
        grads[be] = [x.grad for x in layers]
    for g, r in zip(grads[backend], grads["torch"]):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-4)


# ---- bad inputs ------------------------------------------------------------------------------

_MAPS = _probs((2, 16, 6))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(maps=_MAPS[0]), ValueError, "maps must have 3 dimensions"),
    (dict(maps=_MAPS.to(torch.int32)), TypeError, "maps must be float32"),
    (dict(maps=_MAPS.tolist()), TypeError, "maps must be a torch.Tensor"),
    (dict(maps=_probs((2, 15, 6))), ValueError, "square number of pixels"),
    (dict(maps=_MAPS.masked_fill(_MAPS > 0.3, float("nan"))), ValueError, "NaN or inf"),
    (dict(token_indices=[]), ValueError, "must not be empty"),
    (dict(token_indices=[1, 1]), ValueError, "must not repeat"),
    (dict(token_indices=[0, 2]), ValueError, r"\[1, text_end\)"),
    (dict(token_indices=[2, 5]), ValueError, r"\[1, text_end\)"),  # 5 == text_end (N - 1)
    (dict(token_indices=[2, 6], normalize="none"), ValueError, r"\[0, N = 6\)"),
    (dict(token_indices=[-1, 2], normalize="none"), ValueError, r"\[0, N = 6\)"),
    (dict(token_indices=torch.tensor([1.0, 2.0])), TypeError, "int64"),
    (dict(token_indices=torch.tensor([[1, 2]] * 3)), ValueError, r"\(B, K\)"),
    (dict(sigma=0.0), ValueError, "sigma must be"),
    (dict(sigma=-1.0), ValueError, "sigma must be"),
    (dict(sigma=float("nan")), ValueError, "sigma must be"),
    (dict(kernel_size=4), ValueError, "kernel_size must be an odd int"),
    (dict(kernel_size=0), ValueError, "kernel_size must be an odd int"),
    (dict(kernel_size=9), ValueError, "reflect padding"),
    (dict(normalize="l1"), ValueError, "normalize must be one of"),
    (dict(softmax_scale=0.0), ValueError, "softmax_scale"),
    (dict(text_end=1), ValueError, "text_end must lie in"),
    (dict(text_end=7), ValueError, "text_end must lie in"),
    (dict(text_end=2.5), TypeError, "text_end must be"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
])
def test_losses_bad_inputs(kwargs, exc, match):
    args = dict(maps=_MAPS, token_indices=[1, 3])
    args.update(kwargs)
    maps, tokens = args.pop("maps"), args.pop("token_indices")
    with pytest.raises(exc, match=match):
        attention_losses(maps, tokens, **args)


@pytest.mark.parametrize("layers,kwargs,exc,match", [
    ([], dict(heads=2), TypeError, "non-empty list"),
    ([_probs((4, 16, 6))], dict(), ValueError, "need heads= or batch_size="),
    ([_probs((4, 16, 6))], dict(heads=3), ValueError, "not a multiple of heads=3"),
    ([_probs((16, 6))], dict(heads=2), ValueError, r"\(B\*heads, P, N\)"),
    ([_probs((4, 16, 6)).long()], dict(heads=2), TypeError, "float32"),
    ([_probs((4, 64, 6))], dict(heads=2), ValueError, "no layer in layer_probs has P"),
    ([_probs((4, 16, 6)), _probs((4, 16, 7))], dict(heads=2), ValueError, "share B"),
    ([_probs((4, 16, 6)), _probs((4, 16, 6), torch.float16)], dict(heads=2), TypeError, "one dtype"),
    ([_probs((4, 16, 6))], dict(heads=2, resolution=0), ValueError, "resolution must be"),
    ([_probs((4, 16, 6))], dict(batch_size=4, heads=0), ValueError, "heads must be"),
])
def test_aggregate_bad_inputs(layers, kwargs, exc, match):
    kwargs.setdefault("resolution", 4)
    with pytest.raises(exc, match=match):
        aggregate_attention(layers, **kwargs)
