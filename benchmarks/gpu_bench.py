"""GPU benchmark of the memory-bound ops: Triton kernels vs torch eager vs torch.compile, against
the bandwidth floor, on Stable-Diffusion-sized latents (the grid of `compkern bench ops --full`).

    python benchmarks/gpu_bench.py                   # needs a CUDA device
    python benchmarks/gpu_bench.py --out benchmarks/RESULTS.md

Floor = bytes the op must move / device copy bandwidth, measured in the same run on 2 x 2 GiB
buffers (far beyond the L2 cache). Times come from triton.testing.do_bench, which flushes the L2
cache between repetitions, so no input is timed hot. Before timing, each Triton result is checked
against the fp64 reference.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the subset of `compkern bench ops`")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", default=None, help="append the markdown table to this file")
    parser.add_argument("--jsonl", default=None, help="also append one JSON line per timing to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_bench.py needs a CUDA device", file=sys.stderr)
        return 1
    import triton.testing

    from compkern.experiments.bench import (HEADER, RULE, append_jsonl, configs, implementations, make_inputs, op_bytes,
                                            record, row)
    from compkern.kernels import reference

    dev = torch.device("cuda")
    src = torch.empty(2**29, dtype=torch.float32, device=dev).fill_(1.0)  # 2 GiB
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=5, rep=50, return_mode="min")
    bw = 2 * src.numel() * 4 / (copy_ms * 1e-3)
    del src, dst
    lines = [f"gpu_bench on {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"copy bandwidth {bw / 1e9:.0f} GB/s (2 x 2 GiB, read + written); times: do_bench min, L2 flushed",
             "", HEADER, RULE]
    print("\n".join(lines), flush=True)
    gen = torch.Generator().manual_seed(0)
    for cfg in configs(full=not args.quick):
        inputs = make_inputs(cfg, device=dev, generator=gen)
        impls = implementations(cfg, "triton")
        if args.no_compile:
            impls.pop("compile")
        _check(cfg, impls["triton"], inputs, reference)
        floor = op_bytes(cfg) / bw
        times = {}
        for name, fn in impls.items():
            times[name] = triton.testing.do_bench(lambda: fn(*inputs), warmup=10, rep=100, return_mode="min") * 1e-3
            rec = record(cfg, name, times[name], floor, device="cuda")
            if args.jsonl:
                append_jsonl(args.jsonl, [rec])
            line = row(rec, times.get("compile") if name == "triton" else None)
            lines.append(line)
            print(line, flush=True)
        del inputs
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")
    return 0


def _check(cfg, fn, inputs, reference) -> None:
    """The Triton result against the fp64 reference (loose: a smoke check before timing)."""
    if cfg.op == "combine_eps":
        got = fn(*inputs).double()
        want = reference.combine_eps(*(x.double() for x in inputs))
    else:
        got = fn(*inputs).sum_wd.double()
        want = reference.lift_partial(*(x.double() for x in inputs), False)[0]
    scale = want.abs().max().clamp_min(1.0)
    err = ((got - want).abs().max() / scale).item()
    tol = 1e-2 if cfg.dtype != torch.float32 else 1e-4
    if not err <= tol:
        raise AssertionError(f"{cfg}: triton result off the fp64 reference by {err:.3g} (relative)")


if __name__ == "__main__":
    sys.exit(main())
