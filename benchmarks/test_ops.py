"""pytest-benchmark suite of the memory-bound ops on SD-sized latents (C=4, 64x64), CPU:
torch eager reference vs torch.compile of it vs the C++ kernels (combine_eps also into a
caller's buffer, ``out=``, as the samplers reuse one per step).

    python -m pytest benchmarks/test_ops.py --benchmark-columns=min,median,rounds
    python -m pytest benchmarks/test_ops.py -k "lift and cpp"           # one implementation
    COMPKERN_BENCH_THREADS=1 python -m pytest benchmarks/test_ops.py     # one thread (a busy machine)

Each benchmark records the bytes the op must move and the GB/s at its minimum time in
``extra_info``. For the table against the copy-bandwidth floor, run `compkern bench ops`.
"""
from __future__ import annotations

import os

import pytest
import torch

from compkern import _dispatch
from compkern.experiments.bench import Config, implementations, make_inputs, op_bytes

if os.environ.get("COMPKERN_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["COMPKERN_BENCH_THREADS"]))

CASES = [
    Config("combine_eps", 16, 4, 0, torch.float32),
    Config("combine_eps", 16, 4, 0, torch.bfloat16),
    Config("lift_partial", 4, 2, 8, torch.float32),
    Config("lift_partial", 16, 4, 32, torch.float32),
    Config("lift_partial", 16, 4, 32, torch.bfloat16),
]


@pytest.mark.parametrize("impl", ["eager", "compile", "cpp", "cpp out="])
@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c.op}-{c.label.replace(' ', '')}-{str(c.dtype)[6:]}")
def test_op(benchmark, cfg, impl):
    if impl.startswith("cpp") and _dispatch.unavailable_reason("cpp", torch.device("cpu")):
        pytest.skip("C++ extension not built")
    fns = implementations(cfg, "cpp")
    if impl not in fns:
        pytest.skip(f"{cfg.op} takes no out= (its outputs are reductions)")
    fn = fns[impl]
    inputs = make_inputs(cfg, generator=torch.Generator().manual_seed(0))
    fn(*inputs)  # warm-up (and compilation for torch.compile)
    rounds = 3 if impl == "eager" else 10
    benchmark.pedantic(fn, args=inputs, rounds=rounds, warmup_rounds=1)
    nbytes = op_bytes(cfg)
    benchmark.extra_info["bytes"] = nbytes
    if benchmark.stats is not None:  # None under --benchmark-disable (a smoke run)
        benchmark.extra_info["GB/s at min"] = round(nbytes / benchmark.stats.stats.min / 1e9, 2)
