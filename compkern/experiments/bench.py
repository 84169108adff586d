"""`compkern bench ops`: time combine_eps and lift_partial (torch eager reference, torch.compile of
the reference, the C++ kernels) on Stable-Diffusion-sized latents against the bandwidth floor.

Floor = bytes the op must move (inputs read once + outputs written once) / copy bandwidth, where
the copy bandwidth (bytes read + written per second) is measured in the same run on 2 x 256 MiB
buffers, far beyond the L3 cache. Times are minimums over repetitions (a shared 2-core VM swings
2-5x between runs). Inputs that fit in the last-level cache are flagged: their floor is no floor.

`compkern bench attention` runs compkern.experiments.bench_attention (the attention ops).
"""
from __future__ import annotations

import argparse
import functools
import itertools
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from compkern.experiments._args import add_alias

SD_C, SD_H, SD_W = 4, 64, 64  # Stable Diffusion latents
MiB = 2**20


# ---- configurations and byte counts (shared with benchmarks/gpu_bench.py) -------------------

@dataclass(frozen=True)
class Config:
    op: str  # "combine_eps" or "lift_partial"
    B: int
    K: int
    T: int  # trials (lift_partial only; 0 for combine_eps)
    dtype: torch.dtype

    @property
    def label(self) -> str:
        t = f" T={self.T:<2d}" if self.op == "lift_partial" else " " * 5
        return f"B={self.B:<3d}{t} K={self.K}"


def configs(full: bool) -> list[Config]:
    """The issue's grid (B in {4, 16}, T in {8, 32}, K in {2, 4}, fp32 and bf16) with --full; a
    representative subset by default. combine_eps at SD batch sizes reads at most 5 MB (always in
    cache), so B = 512 rows are added to measure it against the floor out of cache."""
    dtypes = [torch.float32, torch.bfloat16]
    if full:
        lift = [Config("lift_partial", B, K, T, dt) for dt, B, T, K in itertools.product(dtypes, (4, 16), (8, 32), (2, 4))]
        comb = [Config("combine_eps", B, K, 0, dt) for dt, B, K in itertools.product(dtypes, (4, 16, 512), (2, 4))]
    else:
        lift = [Config("lift_partial", B, K, T, dt) for dt in dtypes for B, T, K in ((4, 8, 2), (16, 32, 4))]
        comb = [Config("combine_eps", B, 4, 0, dt) for dt in dtypes for B in (16, 512)]
    return comb + lift


def op_bytes(cfg: Config, pixel_map: bool = True) -> int:
    """Bytes the op must move at least: every input element read once, every output written once."""
    e = torch.tensor([], dtype=cfg.dtype).element_size()
    S = SD_C * SD_H * SD_W
    if cfg.op == "combine_eps":
        return (cfg.K + 1) * cfg.B * S * e + cfg.B * S * e + cfg.B * cfg.K * 4
    read = cfg.T * (cfg.K + 2) * cfg.B * S * e + cfg.T * cfg.B * 4
    write = 2 * cfg.K * cfg.B * 4 + (cfg.K * cfg.B * SD_H * SD_W * 4 if pixel_map else 0)
    return read + write


def make_inputs(cfg: Config, device="cpu", generator: torch.Generator | None = None):
    S = (SD_C, SD_H, SD_W)
    if cfg.op == "combine_eps":
        preds = torch.randn(cfg.K + 1, cfg.B, *S, generator=generator).to(device=device, dtype=cfg.dtype)
        weights = torch.randn(cfg.K, generator=generator).to(device)
        return preds, weights
    noise = torch.randn(cfg.T, cfg.B, *S, generator=generator).to(device=device, dtype=cfg.dtype)
    preds = torch.randn(cfg.T, cfg.K + 1, cfg.B, *S, generator=generator).to(device=device, dtype=cfg.dtype)
    weights = torch.ones(cfg.T, cfg.B, device=device)
    return noise, preds, weights


def implementations(cfg: Config, backend: str) -> dict[str, Callable]:
    """name -> callable(*inputs): torch eager reference, torch.compile of it, and ``backend``."""
    from compkern.kernels import reference
    from compkern.ops import combine_eps, lift_partial

    if cfg.op == "combine_eps":
        ref = reference.combine_eps
        ours = lambda preds, weights: combine_eps(preds, weights, backend=backend)  # noqa: E731
    else:
        ref = lambda noise, preds, weights: reference.lift_partial(noise, preds, weights, True)  # noqa: E731
        ours = lambda noise, preds, weights: lift_partial(noise, preds, weights=weights, pixel_map=True, backend=backend)  # noqa: E731
    _raise_recompile_limit()
    impls = {"eager": ref, "compile": torch.compile(ref, dynamic=False), backend: ours}
    if cfg.op == "combine_eps":  # the caller's preallocated output: no allocation, no page faults
        buf: dict = {}

        def ours_out(preds, weights):
            out = buf.get("out")
            if out is None or out.shape != preds.shape[1:] or out.dtype != preds.dtype:
                out = buf["out"] = torch.empty(preds.shape[1:], dtype=preds.dtype)
            return combine_eps(preds, weights, out=out, backend=backend)
        impls[f"{backend} out="] = ours_out
    return impls


def _raise_recompile_limit() -> None:
    """Every benchmarked shape compiles its own static graph; keep dynamo from giving up on them."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 1024))


# ---- timing ---------------------------------------------------------------------------------

CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def time_min(fn: Callable, *args, reps: int = 10, max_seconds: float = 3.0, clock: str = "wall") -> float:
    """Minimum time of ``fn(*args)`` over ``reps`` calls (fewer if ``max_seconds`` of wall time run
    out, at least 3), after one warm-up call. clock="cpu" measures this thread's CPU time: with one
    thread it excludes the time other processes hold the core (use it on an oversubscribed machine)."""
    now = CLOCKS[clock]
    fn(*args)
    best, start = math.inf, time.perf_counter()
    for i in range(reps):
        t0 = now()
        fn(*args)
        best = min(best, now() - t0)
        if i >= 2 and time.perf_counter() - start > max_seconds:
            break
    return best


def copy_bandwidth(nbytes: int = 256 * MiB, piece: int = 16 * MiB, reps: int = 10, clock: str = "wall") -> float:
    """Copy bandwidth in bytes/s (read + written), on buffers of ``nbytes`` each, far beyond L3.
    Timed piece by piece (each a fresh, uncached 16 MiB) and the minimum per piece kept, so a
    preempted piece does not spoil the whole measurement."""
    src = torch.ones(nbytes // 4)
    dst = torch.zeros_like(src)
    n = piece // 4
    pieces = [(src[i:i + n], dst[i:i + n]) for i in range(0, src.numel(), n)]
    best = [math.inf] * len(pieces)
    now = CLOCKS[clock]
    for _ in range(reps):
        for j, (s, d) in enumerate(pieces):
            t0 = now()
            d.copy_(s)
            best[j] = min(best[j], now() - t0)
    return 2 * nbytes / sum(best)


def last_level_cache_bytes() -> int:
    try:
        for index in sorted(os.listdir("/sys/devices/system/cpu/cpu0/cache"), reverse=True):
            path = f"/sys/devices/system/cpu/cpu0/cache/{index}"
            if open(f"{path}/level").read().strip() == "3":
                size = open(f"{path}/size").read().strip()
                return int(size[:-1]) * (1024 if size.endswith("K") else MiB)
    except (OSError, ValueError):
        pass
    return 32 * MiB


def cache_note(nbytes: int, llc: int) -> str:
    if nbytes <= llc:
        return "in cache: no floor"
    if nbytes <= 2 * llc:
        return "partly cached"
    return ""


# ---- the table ------------------------------------------------------------------------------

HEADER = "| op | shape | dtype | MB | impl | time ms | floor ms | x floor | vs compile | note |"
RULE = "|---|---|---|---:|---|---:|---:|---:|---:|---|"


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The checkout's commit (None outside a git checkout)."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)), check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def record(cfg: Config, impl: str, seconds: float, floor: float, *, device: str, note: str = "") -> dict:
    """One structured benchmark row (a JSON line of --jsonl): what was timed, where, and the result.
    peak_mem_bytes: the device's peak allocation on CUDA, the process's peak RSS on the CPU."""
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"op": cfg.op, "config": cfg.label, "B": cfg.B, "K": cfg.K, "T": cfg.T,
            "dtype": str(cfg.dtype).replace("torch.", ""), "bytes": op_bytes(cfg), "impl": impl, "device": device,
            "threads": torch.get_num_threads(), "commit": git_commit(), "torch": torch.__version__,
            "time_s": seconds, "floor_s": floor, "x_floor": seconds / floor, "peak_mem_bytes": int(peak), "note": note,
            "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def append_jsonl(path: str, rows: list[dict]) -> None:
    import json

    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def row(rec: dict, compile_s: float | None = None) -> str:
    """One markdown row of HEADER from a ``record``; compile_s: torch.compile's time on the same
    config (the "vs compile" column), None to leave it empty."""
    vs = f"{compile_s / rec['time_s']:.2f}x" if compile_s else ""
    return (f"| {rec['op']} | {rec['config']} | {rec['dtype']} | {rec['bytes'] / 1e6:.1f} | {rec['impl']} | "
            f"{rec['time_s'] * 1e3:.3f} | {rec['floor_s'] * 1e3:.3f} | {rec['x_floor']:.2f} | {vs} | {rec['note']} |")


def table_from_rows(rows: list[dict]) -> str:
    """The markdown table (HEADER, RULE, one row per record) of structured rows, e.g. a --jsonl
    file: what RESULTS.md tables are made from. The "vs compile" column is filled for compkern's
    own rows (every impl but the 'eager' and 'compile' baselines) of a config with a 'compile' row."""
    compile_s = {(r["op"], r["config"], r["dtype"], r["device"]): r["time_s"] for r in rows if r["impl"] == "compile"}
    lines = [HEADER, RULE]
    for r in rows:
        own = r["impl"] not in ("eager", "compile")
        c = compile_s.get((r["op"], r["config"], r["dtype"], r["device"])) if own else None
        lines.append(row(r, c))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", nargs="?", default="ops", choices=["ops", "attention", "table"],
                        help="what to benchmark (default: ops)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="full", action="store_false", help="a representative subset (default)")
    mode.add_argument("--full", dest="full", action="store_true", help="the whole grid of the issue (~15 min)")
    parser.set_defaults(full=False)
    parser.add_argument("--reps", type=int, default=15, help="repetitions per timing (the minimum is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or this thread's CPU time (needs --threads 1; robust when other "
                             "processes share the cores)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (saves compile time)")
    parser.add_argument("--results", dest="out", default=None, help="also append the markdown table to this file")
    parser.add_argument("--jsonl", default=None, help="also append one JSON line per timing to this file "
                        "(op, config, dtype, bytes, impl, device, threads, commit, time, floor, peak memory)")
    add_alias(parser, "--out", "out")  # old spelling (--out is a folder everywhere else)


def _reexec_with_thp() -> None:
    """Fresh outputs above 2 MB (combine_eps at B=512: 33 MB) cost 4 KiB page faults that take
    longer than the op itself (~14 ms vs a 5 ms floor on the 2-core VM). c10 backs large
    allocations with transparent huge pages when THP_MEM_ALLOC_ENABLE=1, read once at start-up, so
    the benchmark restarts itself with it set (all implementations profit alike)."""
    if os.environ.get("THP_MEM_ALLOC_ENABLE") is None and "bench" in sys.argv[1:2]:
        print("(restarting with THP_MEM_ALLOC_ENABLE=1; set THP_MEM_ALLOC_ENABLE=0 to keep 4 KiB pages)", flush=True)
        os.execve(sys.executable, [sys.executable, "-m", "compkern.cli", *sys.argv[1:]],
                  {**os.environ, "THP_MEM_ALLOC_ENABLE": "1"})


def run(args: argparse.Namespace) -> int:
    if args.target == "table":  # the markdown table of a --jsonl file
        import json

        if not args.jsonl or not os.path.exists(args.jsonl):
            raise ValueError(f"`compkern bench table` needs --jsonl FILE, the rows of an earlier run; got {args.jsonl!r}")
        with open(args.jsonl) as f:
            print(table_from_rows([json.loads(line) for line in f if line.strip()]))
        return 0
    if args.target == "attention":
        from compkern.experiments import bench_attention

        return bench_attention.run(args)
    _reexec_with_thp()
    if args.clock == "cpu" and args.threads != 1:
        raise SystemExit("--clock cpu needs --threads 1 (CPU time of one thread)")
    if args.threads:
        torch.set_num_threads(args.threads)
    from compkern import _dispatch

    backend = "cpp" if _dispatch.unavailable_reason("cpp", torch.device("cpu")) is None else "torch"
    if backend == "torch":
        print("warning: the C++ extension is not built; only the torch reference is timed")
    llc = last_level_cache_bytes()
    bw = copy_bandwidth(clock=args.clock)
    lines = [
        f"compkern bench ops ({'full' if args.full else 'quick'}) on {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"copy bandwidth {bw / 1e9:.1f} GB/s (2 x 256 MiB buffers, read + written); L3 {llc // MiB} MiB; "
        f"times: min of {args.reps} reps ({args.clock} clock); load average {os.getloadavg()[0]:.1f}; "
        f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}",
        "", HEADER, RULE,
    ]
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if args.clock == "wall" and load > cores:
        lines.insert(2, f"warning: load average {load:.1f} on {cores} cores: other processes hold the cores and wall "
                        "times (the copy bandwidth's too) are unreliable; `--threads 1 --clock cpu` is robust to that")
    print("\n".join(lines), flush=True)
    gen = torch.Generator().manual_seed(0)
    for cfg in configs(args.full):
        inputs = make_inputs(cfg, generator=gen)
        floor = op_bytes(cfg) / bw
        note = cache_note(op_bytes(cfg), llc)
        impls = implementations(cfg, backend)
        if args.no_compile:
            impls.pop("compile")
        times = {}
        for name, fn in impls.items():
            reps = max(3, args.reps // 3) if name == "eager" else args.reps
            times[name] = time_min(fn, *inputs, reps=reps, clock=args.clock)
            rec = record(cfg, name, times[name], floor, device="cpu", note=note)
            if getattr(args, "jsonl", None):
                append_jsonl(args.jsonl, [rec])
            line = row(rec, times.get("compile") if name.startswith(backend) else None)
            lines.append(line)
            print(line, flush=True)
        del inputs
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")
    return 0
