"""Benchmark of aggregate_attention + attention_losses, forward + backward (`compkern bench attention`).

The SepEn training step's attention-loss part: L layers of (B*heads, P, N) cross-attention
probabilities -> aggregate (B, P, N) -> Separate / Enhance losses -> gradients w.r.t. every layer
(torch.autograd.grad, as the UNet backward would consume them). Variants:

  eager    the torch reference (compkern.kernels.reference), plain autograd
  compile  torch.compile of the same reference function (forward and backward compiled)
  cpp      compkern.ops with backend="cpp" (argument checks included)
  triton   compkern.ops with backend="triton" (CUDA only)

Times are the minimum (and median) over --repeats runs after warm-up; the CPU is shared, so the
minimum is the figure to compare. `--threads 1 --clock cpu` times this thread's CPU time (all
variants then run in the calling thread), which other processes on the cores barely disturb.

    python -m compkern.experiments.bench_attention [--k 2 3 4] [--dtypes fp32 bf16] [--repeats 30]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from compkern.experiments._args import add_alias, add_batch_size
from compkern.kernels import reference
from compkern.ops import aggregate_attention, attention_losses

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VARIANTS = ("eager", "compile", "cpp", "triton")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_batch_size(parser, 8, dest="batch")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=77, help="N, text tokens")
    parser.add_argument("--k", type=int, nargs="+", default=[2, 3, 4], help="object tokens K")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--variants", nargs="+", default=None, choices=VARIANTS,
                        help="default: eager compile cpp (triton instead of cpp on CUDA)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave)")
    parser.add_argument("--results", dest="out", default=None, help="also append the markdown table to this file")
    add_alias(parser, "--out", "out")  # old spelling (--out is a folder everywhere else)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or this thread's CPU time (needs --threads 1; robust on a shared CPU)")
    parser.add_argument("--json", default=None, help="write the rows here")


def _reference_step(layers, B, H, tokens, text_end):
    views = [x.view(B, H, *x.shape[1:]) for x in layers]
    maps = reference.aggregate_attention(views)
    sep, en = reference.attention_losses(maps, tokens, text_end, 0.5, 3, "softmax", 100.0)
    return sep.mean() + 2.0 * en.mean()


def _make_step(variant: str, B: int, H: int, R: int):
    if variant in ("eager", "compile"):
        fn = _reference_step if variant == "eager" else torch.compile(_reference_step, dynamic=False)

        def step(layers, tokens, text_end):
            return torch.autograd.grad(fn(layers, B, H, tokens, text_end), layers)
        return step

    def step(layers, tokens, text_end):
        maps = aggregate_attention(layers, heads=H, resolution=R, backend=variant)
        sep, en = attention_losses(maps, tokens, text_end=text_end, backend=variant)
        return torch.autograd.grad(sep.mean() + 2.0 * en.mean(), layers)
    return step


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def _time(step, inputs, warmup: int, repeats: int, sync, clock=time.perf_counter) -> tuple[float, float]:
    for _ in range(warmup):
        step(*inputs)
    sync()
    times = []
    for _ in range(repeats):
        t0 = clock()
        step(*inputs)
        sync()
        times.append(clock() - t0)
    return min(times), statistics.median(times)


def run(args: argparse.Namespace) -> int:
    """Entry point of `compkern bench attention` and of `python -m compkern.experiments.bench_attention`.
    Accepts this module's options, or the `compkern bench` dispatcher's (--reps, --threads,
    --no-compile, --out; the other sizes take their defaults)."""
    def opt(name, default):
        value = getattr(args, name, None)
        return default if value is None else value

    device = torch.device(opt("device", "cpu"))
    variants = opt("variants", None)
    if variants is None:
        variants = ["eager", "cpp"] if opt("no_compile", False) else ["eager", "compile", "cpp"]
        if device.type == "cuda":
            variants = [v if v != "cpp" else "triton" for v in variants]
    if opt("threads", None):
        torch.set_num_threads(opt("threads", None))
    clock = opt("clock", "wall")
    if clock == "cpu" and (torch.get_num_threads() != 1 or device.type != "cpu"):
        raise SystemExit("--clock cpu needs --threads 1 on the CPU (the CPU time of one thread)")
    lines, _ = benchmark(clock=clock, batch=opt("batch", 8), heads=opt("heads", 8), layers=opt("layers", 5),
                         resolution=opt("resolution", 16), tokens=opt("tokens", 77), ks=opt("k", [2, 3, 4]),
                         dtypes=opt("dtypes", ["fp32", "bf16"]), variants=variants,
                         repeats=opt("repeats", None) or opt("reps", 30), warmup=opt("warmup", 3), device=device,
                         json_path=opt("json", None))
    if opt("out", None):
        with open(opt("out", None), "a") as f:
            f.write("\n".join(lines) + "\n")
    return 0


def benchmark(*, clock: str = "wall", batch: int, heads: int, layers: int, resolution: int, tokens: int, ks, dtypes, variants,
              repeats: int, warmup: int, device: torch.device, json_path: str | None = None):
    """Times every (dtype, K, variant); prints and returns (markdown lines, rows)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    B, H, L, R, N = batch, heads, layers, resolution, tokens
    P = R * R
    rows, lines = [], []

    def emit(line):
        print(line, flush=True)
        lines.append(line)

    emit(f"attention_losses fwd+bwd: B={B} heads={H} layers={L} {R}x{R} N={N}, device={device}, "
         f"threads={torch.get_num_threads()}, clock={clock}, min / median of {repeats}")
    emit("")
    emit("| dtype | K | variant | min ms | median ms | eager / variant (min) |")
    emit("|---|---|---|---|---|---|")
    for dname in dtypes:
        dtype = DTYPES[dname]
        g = torch.Generator().manual_seed(0)
        probs = [torch.softmax(torch.randn(B * H, P, N, generator=g), -1).to(device=device, dtype=dtype).requires_grad_()
                 for _ in range(L)]
        for K in ks:
            tok = (torch.arange(K, device=device) * 3 + 2)[None].expand(B, K).contiguous()
            text_end = torch.full((B,), N - 1, dtype=torch.int64, device=device)
            # Variants are timed round-robin (one run of each per round), so that load from other
            # processes on the shared CPU falls on all of them alike.
            steps = {}
            for variant in variants:
                try:
                    steps[variant] = _make_step(variant, B, H, R)
                    _time(steps[variant], (probs, tok, text_end), warmup, 1, sync, CLOCKS[clock])
                except Exception as e:  # noqa: BLE001 - a variant that cannot run is reported, not fatal
                    steps.pop(variant, None)
                    emit(f"| {dname} | {K} | {variant} | failed: {type(e).__name__}: {str(e).splitlines()[0][:80]} | | |")
            times = {v: [] for v in steps}
            for _ in range(repeats):
                for variant, step in steps.items():
                    times[variant].append(_time(step, (probs, tok, text_end), 0, 1, sync, CLOCKS[clock])[0])
            base = min(times["eager"]) if "eager" in times else None
            for variant, ts in times.items():
                tmin, tmed = min(ts), statistics.median(ts)
                speed = f"{base / tmin:.2f}x" if base else "-"
                emit(f"| {dname} | {K} | {variant} | {tmin * 1e3:.3f} | {tmed * 1e3:.3f} | {speed} |")
                rows.append(dict(dtype=dname, K=K, variant=variant, min_ms=tmin * 1e3, median_ms=tmed * 1e3,
                                 B=B, heads=H, layers=L, resolution=R, N=N, device=str(device), clock=clock))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    return lines, rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
