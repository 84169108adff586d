"""combine_eps: every backend against the fp64 torch reference, odd shapes, bad inputs, NaN."""
from __future__ import annotations

import pytest
import torch

from compkern import _dispatch
from compkern.kernels import reference
from compkern.ops import combine as combine_mod
from compkern.ops import combine_eps
from helpers import BACKENDS, DTYPES, assert_close_to_reference, assert_lowers_for_cuda, require_backend

CPU = torch.device("cpu")


def _naive(preds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The same formula in plain torch at the input dtype (no upcast): the tolerance yardstick."""
    K, B = preds.shape[0] - 1, preds.shape[1]
    w = weights.to(preds.dtype).expand(B, K).t().reshape(K, B, *([1] * (preds.dim() - 2)))
    return preds[0] + (w * (preds[1:] - preds[0])).sum(0)


# (K, B, S): K = 1, B = 1, no spatial axes, 1-D, non-power-of-two images, several blocks per row.
SHAPES = [(1, 1, (4, 8, 8)), (3, 2, (4, 7, 5)), (2, 3, (13,)), (4, 2, ()), (2, 1, (3, 50, 47))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K,B,S", SHAPES)
@pytest.mark.parametrize("per_sample", [False, True], ids=["w(K)", "w(B,K)"])
def test_matches_fp64_reference(backend, dtype, K, B, S, per_sample):
    require_backend(backend)
    preds = torch.randn(K + 1, B, *S).to(dtype)
    weights = torch.randn(B, K) * 3 if per_sample else torch.randn(K) * 3
    out = combine_eps(preds, weights, backend=backend)
    assert out.shape == (B, *S) and out.dtype == dtype
    ref = reference.combine_eps(preds.double(), weights.double())
    assert_close_to_reference(out, ref, _naive(preds, weights), name=f"{backend} {dtype}")


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_fp64_inputs_accumulate_in_fp64(backend):
    require_backend(backend)
    preds = torch.randn(3, 2, 4, 9, 11, dtype=torch.float64)
    weights = torch.randn(2, dtype=torch.float64)
    out = combine_eps(preds, weights, backend=backend)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference.combine_eps(preds, weights), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_non_contiguous_inputs(backend):
    require_backend(backend)
    base = torch.randn(2, 4, 3, 20, 30)  # (B, K+1, C, W, H): permuted and sliced below
    preds = base.permute(1, 0, 2, 4, 3)[:, :, :, ::2]  # (K+1, B, C, 15, 20), strided
    weights = torch.randn(3, 2).t()  # (B, K) = (2, 3), transposed
    assert not preds.is_contiguous() and not weights.is_contiguous()
    out = combine_eps(preds, weights, backend=backend)
    expected = combine_eps(preds.contiguous(), weights.contiguous(), backend=backend)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert_close_to_reference(out, reference.combine_eps(preds.double(), weights.double()), _naive(preds, weights))


def test_large_rows_cpp_matches_reference():
    """Rows longer than one work block, B > number of threads: exercises the OpenMP split."""
    require_backend("cpp")
    preds = torch.randn(3, 5, 4, 33, 65)
    weights = torch.randn(5, 2)
    out = combine_eps(preds, weights, backend="cpp")
    assert_close_to_reference(out, reference.combine_eps(preds.double(), weights.double()), _naive(preds, weights))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate(backend):
    require_backend(backend)
    preds = torch.randn(3, 2, 4, 5, 6)
    preds[2, 1, 0, 2, 3] = float("nan")  # condition 2 has weight 0 below: must still show up
    preds[1, 0, 3, 4, 5] = float("inf")
    weights = torch.tensor([1.5, 0.0])
    out = combine_eps(preds, weights, backend=backend)
    assert torch.isnan(out[1, 0, 2, 3])
    assert not torch.isfinite(out[0, 3, 4, 5])
    finite = torch.ones_like(out, dtype=torch.bool)
    finite[1, 0, 2, 3] = finite[0, 3, 4, 5] = False
    assert torch.isfinite(out[finite]).all()
    w_nan = torch.tensor([float("nan"), 1.0])
    assert torch.isnan(combine_eps(torch.randn(3, 2, 4), w_nan, backend=backend)).all()


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_empty_spatial(backend):
    require_backend(backend)
    out = combine_eps(torch.randn(3, 2, 0, 4), torch.randn(2), backend=backend)
    assert out.shape == (2, 0, 4)


def test_auto_picks_cpp_on_cpu():
    require_backend("cpp")
    assert _dispatch.resolve("combine_eps", "auto", CPU, combine_mod.IMPLS) is combine_mod.IMPLS["cpp"]


BAD = [
    # (preds, weights, exception, words the message must contain)
    (torch.randn(3), torch.randn(2), ValueError, ["preds", "(K+1, B, *S)"]),
    (torch.randn(1, 2, 4), torch.randn(0), ValueError, ["preds", "K >= 1"]),
    (torch.randn(3, 2, 4), torch.randn(3), ValueError, ["weights", "(K,)", "(B, K)"]),
    (torch.randn(3, 4, 4), torch.randn(2, 4), ValueError, ["weights", "(B, K)"]),
    (torch.randn(3, 2, 4), torch.randn(2, 2, 2), ValueError, ["weights"]),
    (torch.randint(0, 5, (3, 2, 4)), torch.randn(2), TypeError, ["preds", "float"]),
    (torch.randn(3, 2, 4), torch.tensor([1, 2]), TypeError, ["weights", "float"]),
    (torch.randn(3, 2, 4), [0.5, 0.5], TypeError, ["weights", "Tensor"]),
    ("preds", torch.randn(2), TypeError, ["preds", "Tensor"]),
    (torch.randn(3, 2, 4), torch.randn(2, device="meta"), ValueError, ["device", "preds", "weights"]),
]


@pytest.mark.parametrize("backend", ["auto", "cpp", "triton"])
@pytest.mark.parametrize("preds,weights,exc,words", BAD)
def test_bad_inputs_raise(backend, preds, weights, exc, words):
    with pytest.raises(exc) as info:
        combine_eps(preds, weights, backend=backend)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


def test_bad_backend():
    preds, weights = torch.randn(3, 2, 4), torch.randn(2)
    with pytest.raises(ValueError, match="backend"):
        combine_eps(preds, weights, backend="cuda")
    with pytest.raises(TypeError, match="backend"):
        combine_eps(preds, weights, backend=None)


_CUDA_COMPILE = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from compkern.kernels.triton.combine import _combine_eps_kernel
sig = {"preds_ptr": "*bf16", "w_ptr": "*fp32", "out_ptr": "*bf16", "B": "i32", "N": "i32", "K": "i32",
       "BLOCK": "constexpr", "ACC": "constexpr", "OUT_BF16": "constexpr"}
src = ASTSource(fn=_combine_eps_kernel, signature=sig, constexprs={"BLOCK": 1024, "ACC": tl.float32, "OUT_BF16": True})
print(len(triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]))
"""


def test_triton_kernel_lowers_for_cuda():
    """No GPU here: compile the kernel for sm_90 (the real, non-interpreted pipeline down to PTX)."""
    assert_lowers_for_cuda(_CUDA_COMPILE)


# ---- autograd: one Function, every backend --------------------------------------------------

GRAD_SHAPES = [(1, 1, (3, 5)), (3, 2, (2, 3, 5)), (2, 3, ()), (4, 1, (7,))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K,B,S", GRAD_SHAPES)
@pytest.mark.parametrize("per_sample", [False, True], ids=["w(K)", "w(B,K)"])
def test_gradcheck_fp64(backend, K, B, S, per_sample):
    require_backend(backend)
    preds = torch.randn(K + 1, B, *S, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(*((B, K) if per_sample else (K,)), dtype=torch.float64, requires_grad=True)
    fn = lambda p, w: combine_eps(p, w, backend=backend)  # noqa: E731
    # the interpreter is slow: random projections for triton, every element for the others
    assert torch.autograd.gradcheck(fn, (preds, weights), fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K,B,S", [(3, 2, (4, 7, 5)), (1, 3, (13,))])
def test_grads_match_reference_autograd(backend, dtype, K, B, S):
    """Gradients w.r.t. preds (in preds' dtype) and weights (fp32) against the fp64 reference's
    autograd, with the reference's own autograd at the input dtype as the tolerance yardstick."""
    require_backend(backend)
    preds0 = torch.randn(K + 1, B, *S).to(dtype)
    weights0 = torch.randn(B, K) * 2
    grad_out = torch.randn(B, *S).to(dtype)

    def grads(fn, p, w):
        p, w = p.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(p, w)
        out.backward(grad_out.to(out.dtype))
        return out, p.grad, w.grad

    out, gp, gw = grads(lambda p, w: combine_eps(p, w, backend=backend), preds0, weights0)
    assert out.requires_grad and out.grad_fn is not None  # not detached (the cpp/triton bug)
    assert gp.dtype == dtype and gw.dtype == torch.float32
    _, gp64, gw64 = grads(reference.combine_eps, preds0.double(), weights0.double())
    _, gp_naive, gw_naive = grads(reference.combine_eps, preds0, weights0)
    assert_close_to_reference(gp, gp64, gp_naive, name=f"{backend} {dtype} grad preds")
    assert_close_to_reference(gw, gw64, gw_naive, name=f"{backend} {dtype} grad weights")


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_grad_only_preds_or_only_weights(backend):
    require_backend(backend)
    preds, weights = torch.randn(3, 2, 5, 3), torch.randn(2)
    p = preds.clone().requires_grad_()
    combine_eps(p, weights, backend=backend).sum().backward()
    expected = torch.cat([1 - weights.sum().reshape(1), weights]).reshape(3, 1, 1, 1).expand_as(preds)
    torch.testing.assert_close(p.grad, expected)
    w = weights.clone().requires_grad_()
    combine_eps(preds, w, backend=backend).sum().backward()
    torch.testing.assert_close(w.grad, (preds[1:] - preds[0]).flatten(1).sum(1))


# ---- out= -----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_out_is_written_and_returned(backend, dtype):
    require_backend(backend)
    preds, weights = torch.randn(3, 2, 4, 7, 5).to(dtype), torch.randn(2, 2)
    out = torch.full((2, 4, 7, 5), float("nan"), dtype=dtype)
    res = combine_eps(preds, weights, out=out, backend=backend)
    assert res is out
    torch.testing.assert_close(out, combine_eps(preds, weights, backend=backend), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_out_bumps_version_counter(backend):
    require_backend(backend)
    preds, weights = torch.randn(3, 2, 6), torch.randn(2)
    out = torch.empty(2, 6)
    v = out._version
    combine_eps(preds, weights, out=out, backend=backend)
    assert out._version > v


def _bad_outs():
    preds = torch.randn(3, 2, 4, 5)
    wide = torch.empty(2, 4, 10)
    return [
        # (out, exception, words the message must contain)
        (torch.empty(2, 4, 6), ValueError, ["out", "(2, 4, 5)"]),
        (torch.empty(2, 20), ValueError, ["out", "(B, *S)"]),
        (torch.empty(2, 4, 5, dtype=torch.float64), TypeError, ["out", "float32"]),
        (torch.empty(2, 4, 5, dtype=torch.bfloat16), TypeError, ["out", "dtype"]),
        (torch.empty(2, 4, 5, device="meta"), ValueError, ["out", "cpu"]),
        (wide[:, :, ::2], ValueError, ["out", "contiguous"]),
        ([[0.0]], TypeError, ["out", "Tensor", "(2, 4, 5)"]),
        (preds[1], ValueError, ["out", "overlap", "preds"]),
    ], preds


@pytest.mark.parametrize("backend", ["auto", "torch", "cpp", "triton"])
@pytest.mark.parametrize("case", range(8))
def test_bad_out_raises(backend, case):
    cases, preds = _bad_outs()
    out, exc, words = cases[case]
    with pytest.raises(exc) as info:
        combine_eps(preds, torch.randn(2), out=out, backend=backend)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_refuses_autograd(backend):
    require_backend(backend)
    preds, weights = torch.randn(3, 2, 5), torch.randn(2)
    for p, w in ((preds.clone().requires_grad_(), weights), (preds, weights.clone().requires_grad_())):
        with pytest.raises(RuntimeError, match="out= does not support automatic differentiation"):
            combine_eps(p, w, out=torch.empty(2, 5), backend=backend)
        with torch.no_grad():  # no graph to record: fine
            out = combine_eps(p, w, out=torch.empty(2, 5), backend=backend)
        torch.testing.assert_close(out, reference.combine_eps(preds, weights))
    with pytest.raises(RuntimeError, match="out= does not support"):
        combine_eps(preds, weights, out=torch.empty(2, 5, requires_grad=True), backend=backend)


def test_cpp_recycles_large_fresh_outputs():
    """Outputs >= 4 MiB come back from the C++ pool (no page faults): same buffer, right values."""
    require_backend("cpp")
    mod = _dispatch.cpp_module()
    mod.combine_eps_pool_clear()
    preds, weights = torch.randn(3, 2, 1 << 19), torch.randn(2)  # output 4 MiB
    first = combine_eps(preds, weights, backend="cpp")
    ptr = first.data_ptr()
    expected = reference.combine_eps(preds, weights)
    torch.testing.assert_close(first, expected)
    del first
    assert mod.combine_eps_pool_bytes() >= 4 << 20
    second = combine_eps(preds * 2, weights, backend="cpp")
    assert second.data_ptr() == ptr and mod.combine_eps_pool_bytes() == 0
    torch.testing.assert_close(second, 2 * expected)
    kept = [combine_eps(preds, weights, backend="cpp") for _ in range(6)]  # all alive: all fresh
    assert len({t.data_ptr() for t in kept} | {second.data_ptr()}) == 7
    del kept, second
    assert mod.combine_eps_pool_bytes() <= 4 * (4 << 20)  # at most 4 buffers kept
    mod.combine_eps_pool_clear()
    assert mod.combine_eps_pool_bytes() == 0


def test_perp_neg_takes_the_negative_direction_off_the_positive_one():
    """Perp-Neg on synthetic predictions whose answer is known by hand, and its invariants."""
    from compkern.samplers.composed import compose_eps, perp_neg_eps

    e0 = torch.tensor([[0.5, -0.5]])
    pos, neg = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    preds = torch.stack([e0, e0 + pos, e0 + neg])  # (3, 1, 2): base, A, B
    out = perp_neg_eps(preds, torch.tensor([2.0, -1.0]))  # A AND NOT B, weights 2, -1
    # p = 2 (1, 0); B's direction (1, 1) off p is (0, 1): eps = e0 + (2, 0) - (0, 1)
    assert torch.allclose(out, e0 + torch.tensor([[2.0, -1.0]]))
    # the linear NOT would also have pulled against A: e0 + (2, 0) - (1, 1)
    assert torch.allclose(compose_eps(preds, torch.tensor([2.0, -1.0])), e0 + torch.tensor([[1.0, -1.0]]))
    g = torch.Generator().manual_seed(0)
    preds = torch.randn(4, 3, 2, 5, 5, generator=g)
    w = torch.tensor([[1.5, 0.5, -1.0], [2.0, 0.0, -0.5], [1.0, 1.0, 0.0]])  # per sample (B, K)
    out = perp_neg_eps(preds, w)
    d = preds[1:] - preds[0]
    p = (w.T.clamp(min=0)[..., None, None, None] * d).sum(0)
    # along the positive direction the result is exactly eps_0 + p: the NOT adds nothing there
    along = ((out - preds[0] - p) * p).flatten(1).sum(1)
    assert torch.allclose(along, torch.zeros(3), atol=1e-4)
    # without a negative weight it is the linear composition
    assert torch.allclose(out[2], compose_eps(preds, w)[2], atol=1e-5)
    with pytest.raises(ValueError, match="negation"):
        compose_eps(preds, w, "orthogonal")
