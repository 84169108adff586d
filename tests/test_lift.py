"""lift_partial: every backend against the fp64 torch reference, pixel map, chunked streaming,
weights (T,) and (T, B), bad inputs, NaN propagation, non-contiguous inputs."""
from __future__ import annotations

import pytest
import torch

from compkern import _dispatch
from compkern.kernels import reference
from compkern.ops import LiftPartial, lift_partial
from compkern.ops import lift as lift_mod
from helpers import BACKENDS, DTYPES, assert_close_to_reference, assert_lowers_for_cuda, require_backend

CPU = torch.device("cpu")


def _naive(noise, preds, weights, pixel_map):
    """The reference formula evaluated at the input dtype (no upcast): the tolerance yardstick."""
    n = noise.unsqueeze(1)
    diff = (n[:, 0] - preds[:, 0]).square().unsqueeze(1) - (n - preds[:, 1:]).square()
    w = weights.to(noise.dtype)[:, None, :]
    d = diff.flatten(3).sum(-1)
    pix = (w[..., None, None] * diff.sum(3)).sum(0) if pixel_map else None
    return (w * d).sum(0), (w * d * d).sum(0), pix


def _inputs(T, K, B, S, dtype, weight_kind):
    noise = torch.randn(T, B, *S).to(dtype)
    # predictions near the noise, as a trained model's are: d is a difference of similar sums
    preds = (noise.float().unsqueeze(1) + 0.5 * torch.randn(T, K + 1, B, *S)).to(dtype)
    weights = {"none": None, "T": torch.rand(T) + 0.5, "TB": torch.rand(T, B) + 0.5}[weight_kind]
    return noise, preds, weights


def _check_against_reference(part: LiftPartial, noise, preds, weights, pixel_map, name):
    T, B = noise.shape[:2]
    w = torch.ones(T, B) if weights is None else weights.expand(T, B) if weights.dim() == 2 else weights[:, None].expand(T, B)
    ref = reference.lift_partial(noise.double(), preds.double(), w.double(), pixel_map)
    naive = _naive(noise, preds, w, pixel_map)
    assert_close_to_reference(part.sum_wd, ref[0], naive[0], name=f"{name} sum_wd")
    assert_close_to_reference(part.sum_wd2, ref[1], naive[1], name=f"{name} sum_wd2")
    torch.testing.assert_close(part.sum_w.double(), w.double().sum(0))
    torch.testing.assert_close(part.count, torch.full((B,), float(T)))
    if pixel_map:
        assert part.sum_wd_pixel.shape == (preds.shape[1] - 1, B, *noise.shape[-2:])
        assert_close_to_reference(part.sum_wd_pixel, ref[2], naive[2], name=f"{name} pixel")
    else:
        assert part.sum_wd_pixel is None


# (T, K, B, S): T = 1, K = 1, B = 1, non-power-of-two images, a flat (non-image) S.
SHAPES = [(1, 1, 1, (4, 8, 8)), (3, 2, 2, (3, 7, 5)), (2, 3, 1, (2, 13, 11)), (2, 1, 3, (37,))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,K,B,S", SHAPES)
def test_matches_fp64_reference(backend, dtype, T, K, B, S):
    require_backend(backend)
    weight_kind = ["none", "T", "TB"][(T + K + B) % 3]
    noise, preds, weights = _inputs(T, K, B, S, dtype, weight_kind)
    pixel_map = len(S) == 3
    part = lift_partial(noise, preds, weights=weights, pixel_map=pixel_map, backend=backend)
    assert part.sum_wd.dtype == torch.float32 and part.sum_wd.shape == (K, B)
    _check_against_reference(part, noise, preds, weights, pixel_map, f"{backend} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_kind", ["T", "TB"])
def test_weights_and_pixel_map_off(backend, weight_kind):
    require_backend(backend)
    noise, preds, weights = _inputs(3, 2, 2, (4, 6, 5), torch.float32, weight_kind)
    part = lift_partial(noise, preds, weights=weights, backend=backend)
    _check_against_reference(part, noise, preds, weights, False, backend)
    with pytest.raises(ValueError, match="pixel_map"):
        part.pixel_mean


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_fp64_inputs_accumulate_in_fp64(backend):
    require_backend(backend)
    noise, preds, weights = _inputs(2, 2, 2, (3, 5, 6), torch.float64, "TB")
    weights = weights.double()
    part = lift_partial(noise, preds, weights=weights, pixel_map=True, backend=backend)
    ref = reference.lift_partial(noise, preds, weights, True)
    assert part.sum_wd.dtype == torch.float64
    for got, want in zip((part.sum_wd, part.sum_wd2, part.sum_wd_pixel), ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_streaming_equals_one_pass(backend):
    require_backend(backend)
    noise, preds, weights = _inputs(5, 2, 2, (2, 6, 7), torch.float32, "TB")
    whole = lift_partial(noise, preds, weights=weights, pixel_map=True, backend=backend)
    parts = [lift_partial(noise[a:b], preds[a:b], weights=weights[a:b], pixel_map=True, backend=backend)
             for a, b in [(0, 2), (2, 3), (3, 5)]]
    merged = parts[0] + parts[1] + parts[2]
    for field in ("sum_w", "sum_w2", "count", "sum_wd", "sum_wd2", "sum_wd_pixel"):
        torch.testing.assert_close(getattr(merged, field), getattr(whole, field), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(merged.mean, whole.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged.stderr, whole.stderr, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged.pixel_mean, whole.pixel_mean, rtol=1e-5, atol=1e-5)


def test_pixel_map_sums_to_lift_and_statistics():
    """The pixel map summed over H, W is sum_wd; mean/stderr/pixel_mean follow their definitions."""
    require_backend("cpp")
    noise, preds, weights = _inputs(4, 3, 2, (4, 9, 10), torch.float32, "T")
    part = lift_partial(noise, preds, weights=weights, pixel_map=True, backend="cpp")
    torch.testing.assert_close(part.sum_wd_pixel.sum((-1, -2)), part.sum_wd, rtol=1e-4, atol=1e-3)
    w = weights.double()[:, None, None]  # (T, 1, 1)
    ref = reference.lift_partial(noise.double(), preds.double(), weights.double()[:, None].expand(4, 2), True)
    n = noise.double().unsqueeze(1)
    d = ((n[:, 0] - preds.double()[:, 0]).square().unsqueeze(1) - (n - preds.double()[:, 1:]).square()).flatten(3).sum(-1)
    mean = (w * d).sum(0) / w.sum(0)
    var = (w * (d - mean) ** 2).sum(0) / w.sum(0)
    neff_term = (w.square().sum(0) / w.sum(0) ** 2)  # 1 / Kish effective count
    stderr = (var * 4 / 3 * neff_term).sqrt()
    torch.testing.assert_close(part.mean.double(), mean, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(part.stderr.double(), stderr, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(part.pixel_mean.double(), ref[2] / weights.double().sum(), rtol=1e-4, atol=1e-4)


def test_large_image_cpp_splits_rows():
    """P > one work range (8192 pixels) and B = 1: rows split across OpenMP items."""
    require_backend("cpp")
    noise, preds, weights = _inputs(2, 2, 1, (2, 100, 130), torch.bfloat16, "TB")
    part = lift_partial(noise, preds, weights=weights, pixel_map=True, backend="cpp")
    _check_against_reference(part, noise, preds, weights, True, "cpp large")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_conditions_cpp(dtype):
    """K = 9: beyond the register-accumulator kernels (K <= 8), the portable C++ loop runs."""
    require_backend("cpp")
    noise, preds, weights = _inputs(2, 9, 2, (3, 11, 7), dtype, "TB")
    part = lift_partial(noise, preds, weights=weights, pixel_map=True, backend="cpp")
    _check_against_reference(part, noise, preds, weights, True, f"cpp K=9 {dtype}")


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_non_contiguous_and_mixed_dtype_inputs(backend):
    require_backend(backend)
    T, K, B = 2, 2, 2
    big = torch.randn(B, T, 3, 12, 10)
    noise = big.transpose(0, 1)[..., ::2, :]  # (T, B, 3, 6, 10), strided
    preds = (noise.unsqueeze(1) + 0.3 * torch.randn(T, K + 1, B, 3, 6, 10)).transpose(-1, -2).contiguous().transpose(-1, -2)
    weights = torch.rand(B, T).t()
    assert not noise.is_contiguous() and not preds.is_contiguous() and not weights.is_contiguous()
    part = lift_partial(noise, preds, weights=weights, pixel_map=True, backend=backend)
    _check_against_reference(part, noise, preds, weights, True, f"{backend} strided")
    # noise fp32 with bf16 predictions (a half-precision model): promoted, exact like the reference
    mixed = lift_partial(noise, preds.bfloat16(), weights=weights, pixel_map=True, backend=backend)
    ref = reference.lift_partial(noise.double(), preds.bfloat16().double(), weights.double(), True)
    torch.testing.assert_close(mixed.sum_wd.double(), ref[0], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates(backend):
    require_backend(backend)
    noise, preds, weights = _inputs(3, 2, 3, (2, 5, 4), torch.float32, "TB")
    noise[1, 2, 1, 3, 2] = float("nan")  # sample b = 2, pixel (3, 2)
    preds[0, 2, 0, 0, 0, 1] = float("inf")  # condition k = 1, sample b = 0
    part = lift_partial(noise, preds, weights=weights, pixel_map=True, backend=backend)
    assert torch.isnan(part.sum_wd[:, 2]).all() and torch.isnan(part.sum_wd2[:, 2]).all()
    assert torch.isnan(part.sum_wd_pixel[:, 2, 3, 2]).all()
    assert not torch.isfinite(part.sum_wd[1, 0])
    assert torch.isfinite(part.sum_wd[:, 1]).all() and torch.isfinite(part.sum_wd[0, 0])
    assert torch.isnan(part.mean[:, 2]).all() and torch.isnan(part.stderr[:, 2]).all()
    weights[0, 1] = float("nan")
    part = lift_partial(noise, preds, weights=weights, backend=backend)
    assert torch.isnan(part.mean[:, 1]).all()


def test_auto_picks_cpp_on_cpu():
    require_backend("cpp")
    assert _dispatch.resolve("lift_partial", "auto", CPU, lift_mod.IMPLS) is lift_mod.IMPLS["cpp"]


def test_merge_mismatch_raises():
    noise, preds, _ = _inputs(2, 2, 2, (2, 4, 4), torch.float32, "none")
    a = lift_partial(noise, preds, pixel_map=True)
    with pytest.raises(ValueError, match="pixel_map"):
        a + lift_partial(noise, preds)
    with pytest.raises(ValueError, match="shapes"):
        a + lift_partial(noise, preds[:, :2], pixel_map=True)


def _bad_cases():
    n, p = torch.randn(2, 3, 4, 5, 6), torch.randn(2, 3, 3, 4, 5, 6)  # T=2, K=2, B=3
    return [
        # (noise, preds, kwargs, exception, words the message must contain)
        (torch.randn(2), p, {}, ValueError, ["noise", "(T, B, *S)"]),
        (n, torch.randn(2, 3), {}, ValueError, ["preds", "(T, K+1, B, *S)"]),
        (n, p[:1], {}, ValueError, ["preds", "(T, K+1, B, *S)"]),  # T mismatch
        (n, p[:, :, :2], {}, ValueError, ["preds"]),  # B mismatch
        (n, p[..., :5], {}, ValueError, ["preds"]),  # spatial mismatch
        (n, p[:, :, None], {}, ValueError, ["preds"]),  # rank mismatch
        (n, p[:, :1], {}, ValueError, ["preds", "K+1 >= 2"]),
        (torch.randn(0, 3, 4), torch.randn(0, 2, 3, 4), {}, ValueError, ["noise", "T >= 1"]),
        (n, p, {"weights": torch.rand(3)}, ValueError, ["weights", "(T,)", "(T, B)"]),
        (n, p, {"weights": torch.rand(3, 2)}, ValueError, ["weights", "(T, B)"]),
        (n, p, {"weights": torch.ones(2, 3, dtype=torch.int64)}, TypeError, ["weights", "float"]),
        (n, p, {"weights": [1.0, 1.0]}, TypeError, ["weights", "Tensor"]),
        (n.long(), p, {}, TypeError, ["noise", "float"]),
        (n, p.to(torch.int32), {}, TypeError, ["preds", "float"]),
        (n.flatten(2), p.flatten(3), {"pixel_map": True}, ValueError, ["pixel_map", "(C, H, W)"]),
        (n, p, {"pixel_map": 1}, TypeError, ["pixel_map", "bool"]),
        (n, p.to("meta"), {}, ValueError, ["device", "noise", "preds"]),
        (n, p, {"weights": torch.ones(2, 3, device="meta")}, ValueError, ["device", "weights"]),
    ]


@pytest.mark.parametrize("backend", ["auto", "cpp", "triton"])
@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_inputs_raise(backend, case):
    noise, preds, kwargs, exc, words = _bad_cases()[case]
    with pytest.raises(exc) as info:
        lift_partial(noise, preds, backend=backend, **kwargs)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


_CUDA_COMPILE = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from compkern.kernels.triton.lift import _lift_partial_kernel
sig = {"noise_ptr": "*bf16", "preds_ptr": "*bf16", "w_ptr": "*fp32", "d_ptr": "*fp32", "pix_ptr": "*fp32",
       "B": "i32", "C": "i32", "P": "i32", "K": "i32", "KP": "constexpr", "BLOCK": "constexpr",
       "PIXEL": "constexpr", "ACC": "constexpr"}
src = ASTSource(fn=_lift_partial_kernel, signature=sig,
                constexprs={"KP": 4, "BLOCK": 512, "PIXEL": True, "ACC": tl.float32})
print(len(triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]))
"""


def test_triton_kernel_lowers_for_cuda():
    """No GPU here: compile the kernel for sm_90 (the real, non-interpreted pipeline down to PTX)."""
    assert_lowers_for_cuda(_CUDA_COMPILE)


# ---- autograd: one Function, every backend --------------------------------------------------

def _outputs(part: LiftPartial):
    return (part.sum_wd, part.sum_wd2) + ((part.sum_wd_pixel,) if part.sum_wd_pixel is not None else ())


# (T, K, B, S, pixel_map): odd sizes, a flat S, K = 1, T = 1
GRAD_CASES = [(2, 2, 2, (2, 3, 5), True), (1, 1, 3, (7,), False), (3, 3, 1, (1, 2, 3), True), (2, 1, 2, (3, 5), False)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,K,B,S,pixel_map", GRAD_CASES)
def test_gradcheck_fp64(backend, T, K, B, S, pixel_map):
    """All outputs (sum_wd, sum_wd2, the pixel map) w.r.t. noise, preds and weights (T, B)."""
    require_backend(backend)
    noise, preds, _ = _inputs(T, K, B, S, torch.float64, "none")
    noise.requires_grad_()
    preds.requires_grad_()
    weights = (torch.rand(T, B, dtype=torch.float64) + 0.5).requires_grad_()
    fn = lambda n, p, w: _outputs(lift_partial(n, p, weights=w, pixel_map=pixel_map, backend=backend))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (noise, preds, weights), fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_fp64_weights_T_and_one_output(backend):
    """weights (T,) (expanded outside the Function), and only sum_wd2 used (other grads None)."""
    require_backend(backend)
    noise, preds, _ = _inputs(3, 2, 2, (2, 3, 4), torch.float64, "none")
    noise.requires_grad_()
    preds.requires_grad_()
    weights = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    fn = lambda n, p, w: lift_partial(n, p, weights=w, pixel_map=True, backend=backend).sum_wd2  # noqa: E731
    assert torch.autograd.gradcheck(fn, (noise, preds, weights), fast_mode=backend == "triton")
    fn = lambda n, p, w: lift_partial(n, p, weights=w, pixel_map=True, backend=backend).pixel_mean  # noqa: E731
    assert torch.autograd.gradcheck(fn, (noise, preds, weights), fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,K,B,S,pixel_map", [(2, 2, 2, (3, 7, 5), True), (3, 1, 2, (37,), False)])
def test_grads_match_reference_autograd(backend, dtype, T, K, B, S, pixel_map):
    """Gradients (in each input's dtype) against the fp64 reference's autograd; the reference's
    own autograd at the input dtype (fp32 inside, cast back) is the tolerance yardstick."""
    require_backend(backend)
    noise0, preds0, _ = _inputs(T, K, B, S, dtype, "none")
    w0 = torch.rand(T, B) + 0.5
    gouts = [torch.randn(K, B), torch.randn(K, B) * 1e-2] + ([torch.randn(K, B, *S[1:])] if pixel_map else [])

    def grads(fn, n, p, w):
        n, p, w = n.clone().requires_grad_(), p.clone().requires_grad_(), w.clone().requires_grad_()
        outs = [o for o in fn(n, p, w) if o is not None]
        torch.autograd.backward(outs, [g.to(o.dtype) for g, o in zip(gouts, outs)])
        return outs, (n.grad, p.grad, w.grad)

    outs, got = grads(lambda n, p, w: _outputs(lift_partial(n, p, weights=w, pixel_map=pixel_map, backend=backend)),
                      noise0, preds0, w0)
    assert all(o.requires_grad for o in outs)  # not detached (the cpp/triton bug)
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == torch.float32
    ref_fn = lambda n, p, w: reference.lift_partial(n, p, w, pixel_map)  # noqa: E731
    _, want = grads(ref_fn, noise0.double(), preds0.double(), w0.double())
    _, naive = grads(ref_fn, noise0, preds0, w0)
    for name, g, r, y in zip(("noise", "preds", "weights"), got, want, naive):
        assert_close_to_reference(g, r, y, name=f"{backend} {dtype} grad {name}")


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_grad_mixed_dtypes_follow_inputs(backend):
    """noise fp32, preds bf16: the kernels promote, the gradients come back in each input's dtype."""
    require_backend(backend)
    noise, preds, weights = _inputs(2, 2, 2, (2, 3, 4), torch.float32, "TB")
    preds = preds.bfloat16().requires_grad_()
    noise.requires_grad_()
    lift_partial(noise, preds, weights=weights, pixel_map=True, backend=backend).sum_wd.sum().backward()
    assert noise.grad.dtype == torch.float32 and preds.grad.dtype == torch.bfloat16
    n, p = noise.detach().clone().requires_grad_(), preds.detach().float().requires_grad_()
    reference.lift_partial(n, p, weights, True)[0].sum().backward()
    torch.testing.assert_close(noise.grad, n.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(preds.grad.float(), p.grad, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_inputs_accumulate_in_fp32(backend, dtype):
    """fp16/bf16 inputs, fp32 outputs: they must match the fp64 computation on the same (rounded)
    inputs to fp32 accuracy, not to the input dtype's. The yardstick is not computed at the input
    dtype; the same sums accumulated in the input dtype fail the bound (checked below)."""
    require_backend(backend)
    T, K, B, S = 2, 2, 2, (4, 16, 16)  # 1024 elements summed per d
    noise, preds, weights = _inputs(T, K, B, S, dtype, "TB")
    part = lift_partial(noise, preds, weights=weights, pixel_map=True, backend=backend)
    assert part.sum_wd.dtype == torch.float32
    n, p, w = noise.double().unsqueeze(1), preds.double(), weights.double()
    diff = (n[:, 0] - p[:, 0]).square().unsqueeze(1) - (n - p[:, 1:]).square()  # (T, K, B, *S)
    ref = reference.lift_partial(noise.double(), preds.double(), w, True)
    # fp32 accumulation error bound: a few ulp of fp32 times the magnitude of the summed terms
    l1 = (w[:, None, :] * diff.abs().flatten(3).sum(-1))  # (T, K, B)
    d_abs = diff.flatten(3).sum(-1).abs() + diff.abs().flatten(3).sum(-1)
    bound1 = 1e-5 * l1.sum(0)
    bound2 = 1e-5 * (w[:, None, :] * d_abs * diff.abs().flatten(3).sum(-1)).sum(0) * 2
    boundp = 1e-5 * (w[:, None, :, None, None] * diff.abs().sum(3)).sum(0) + 1e-6
    assert ((part.sum_wd.double() - ref[0]).abs() <= bound1).all(), (part.sum_wd.double() - ref[0]).abs().max()
    assert ((part.sum_wd2.double() - ref[1]).abs() <= bound2).all()
    assert ((part.sum_wd_pixel.double() - ref[2]).abs() <= boundp).all()
    # the same sums accumulated at the input dtype would not pass: the test can fail
    terms = diff.to(dtype).flatten(3)
    acc = torch.zeros(terms.shape[:3], dtype=dtype)
    for i in range(terms.shape[-1]):  # sequential accumulation, rounded to the input dtype each step
        acc = acc + terms[..., i]
    low = (acc * weights.to(dtype)[:, None, :]).sum(0)
    assert ((low.double() - ref[0]).abs() > bound1).any()
