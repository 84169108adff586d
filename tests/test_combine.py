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
