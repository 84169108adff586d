"""pytest-benchmark suite of the SepEn attention losses, forward + backward, CPU:
torch eager reference vs torch.compile of it vs the C++ kernels (aggregate_attention over 5 layers
of (B*8, 256, 77) probabilities -> attention_losses -> gradients w.r.t. every layer).

    python -m pytest benchmarks/test_attention.py --benchmark-columns=min,median,rounds
    python -m pytest benchmarks/test_attention.py -k cpp            # one implementation

For the markdown table (K = 2..4, fp32 / bf16), run `compkern bench attention` or
`python -m compkern.experiments.bench_attention`.
"""
from __future__ import annotations

import pytest
import torch

from compkern import _dispatch
from compkern.experiments.bench_attention import DTYPES, _make_step

B, H, L, R, N = 8, 8, 5, 16, 77


@pytest.mark.parametrize("variant", ["eager", "compile", "cpp"])
@pytest.mark.parametrize("K", [2, 4])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_attention_fwd_bwd(benchmark, dtype, K, variant):
    if variant == "cpp" and _dispatch.unavailable_reason("cpp", torch.device("cpu")):
        pytest.skip("C++ extension not built")
    g = torch.Generator().manual_seed(0)
    layers = [torch.softmax(torch.randn(B * H, R * R, N, generator=g), -1).to(DTYPES[dtype]).requires_grad_()
              for _ in range(L)]
    tokens = (torch.arange(K) * 3 + 2)[None].expand(B, K).contiguous()
    text_end = torch.full((B,), N - 1, dtype=torch.int64)
    step = _make_step(variant, B, H, R)
    step(layers, tokens, text_end)  # warm-up (and compilation for torch.compile)
    benchmark.pedantic(step, args=(layers, tokens, text_end), rounds=10, warmup_rounds=1)
    benchmark.extra_info.update(B=B, heads=H, layers=L, resolution=R, N=N, K=K)
