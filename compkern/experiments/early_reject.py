"""`compkern early-reject`: early rejection measured on the main job's trained world and suites.

    compkern early-reject run --world runs/world --out runs/early --suites not_filter,and_heldout
    compkern early-reject report --out runs/early

A cell is (suite, prompt) of `compkern main-job`. For each, exactly as `compkern generate` runs it
(``pipelines.generate.sample_batch`` and ``score``, its default scorer, batches of --batch-size):
a pilot (seeds after the evaluated ones) sampled in full until it holds --pilot images and
enough accepted ones for --confidence (at most 4 x --pilot) calibrates the rule; then the --n evaluated seeds are generated twice, in full and with the rule. The
detector judges every image sampled to the end (a survivor's latents equal its full-trajectory
latents: dropping others does not touch it); a third run sends the same seeds through continuous
batching (``ContinuousSampler``, --batch-size slots, a stopped image's slot refilled at once).
Reported per suite: UNet rows and wall seconds per
accepted image of both runs (the pilot's cost apart: it is paid once per prompt), the share of
seeds whose decision is the same, the full run's accepted images stopped early, and the precision
(the detector's share of accepted images that satisfy the expression).
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from compkern.experiments._args import add_progress, add_sample_steps, add_threads
from compkern.experiments.main_job import SUITES, check_at_least_one, judge, open_world, parse_suites, suite_prompts
from compkern.pipelines import early_reject as ER
from compkern.utils.checkpoint import load
from compkern.utils.run_folder import RunFolder

_FROZEN = ("world", "prompts", "n", "pilot", "confidence", "steps", "guidance", "eta", "seed", "batch_size", "check_at")


def _run_seeds(pipe, comp, seeds: list[int], opts, rule) -> dict:
    """Sample and score ``seeds`` in batches as `compkern generate` does: accepted (N,) bool,
    alive (N,) bool, margins (n_checks, N), latents (N, C, h, w), rows and wall seconds in all."""
    from compkern.pipelines.generate import sample_batch, score

    out = {"accepted": [], "alive": [], "margins": [], "latents": [], "rows": 0, "wall": 0.0}
    for s in range(0, len(seeds), opts.batch_size):
        t0 = time.perf_counter()
        res = sample_batch(pipe, comp, seeds[s:s + opts.batch_size], opts, early_reject=rule)
        maps, ok = score(pipe, comp, res, opts, seed=opts.seed)
        out["wall"] += time.perf_counter() - t0
        out["rows"] += res.n_evals + (0 if maps is None else maps.n_evals)
        out["accepted"].append(ok)
        B = res.latents.shape[0]
        out["alive"].append(torch.ones(B, dtype=torch.bool) if res.alive is None else res.alive)
        out["margins"].append(torch.zeros(0, B) if res.margins is None else res.margins)
        out["latents"].append(res.latents.cpu())
    for k in ("accepted", "alive", "latents"):
        out[k] = torch.cat(out[k])
    out["margins"] = torch.cat(out["margins"], 1)
    return out


def _run_continuous(pipe, comp, seeds: list[int], opts, rule) -> dict:
    """``seeds`` through one ContinuousSampler of ``opts.batch_size`` slots with ``rule``, the
    finished images scored in groups of batch_size as they come: accepted (N,) bool in seed order."""
    from compkern.pipelines.continuous import ContinuousSampler
    from compkern.pipelines.generate import _sample_kwargs, score

    t0 = time.perf_counter()
    sampler = ContinuousSampler(pipe, comp, slots=opts.batch_size, early_reject=rule, **_sample_kwargs(comp, opts))
    done, rows, accepted = [], 0, {}
    for r in sampler.run(seeds):
        done.append(r)
        if len(done) == opts.batch_size or len(accepted) + len(done) == len(seeds):
            res = sampler.output(done)
            maps, ok = score(pipe, comp, res, opts, seed=opts.seed)
            rows += res.n_evals + (0 if maps is None else maps.n_evals)
            accepted.update({d.seed: bool(k) for d, k in zip(done, ok.tolist())})
            done = []
    return {"accepted": torch.tensor([accepted[s] for s in seeds]), "rows": rows, "wall": time.perf_counter() - t0}


def _pilot(pipe, comp, first_seed: int, opts, off, pilot: int, need: int) -> dict:
    """The pilot as `compkern generate` runs it: batches of full trajectories from ``first_seed``
    until they hold >= ``pilot`` images and >= ``need`` accepted ones (at most 4 x pilot images)."""
    parts, seed = [], first_seed
    while True:
        parts.append(_run_seeds(pipe, comp, list(range(seed, seed + opts.batch_size)), opts, off))
        seed += opts.batch_size
        images = seed - first_seed
        if images >= pilot and sum(int(q["accepted"].sum()) for q in parts) >= need or images >= 4 * pilot:
            break
    return {"accepted": torch.cat([q["accepted"] for q in parts]), "margins": torch.cat([q["margins"] for q in parts], 1),
            "rows": sum(q["rows"] for q in parts), "wall": sum(q["wall"] for q in parts)}


def run_cell(pipe, detector, expr: str, objs: list[int], cfg: dict, model: str) -> dict:
    from compkern.pipelines.composition import parse_composition
    from compkern.pipelines.generate import GenerateOptions

    comp = parse_composition(expr)
    opts = GenerateOptions(model=model, prompt=expr, out="", steps=cfg["steps"], guidance=cfg["guidance"], eta=cfg["eta"],
                           seed=cfg["seed"], batch_size=cfg["batch_size"], dtype="fp32", device="cpu", progress=False)
    checks = ER.default_checks(cfg["steps"], cfg["check_at"])
    off = ER.EarlyRejectRule(checks, (-math.inf,) * len(checks), 1.0)
    n, seed = cfg["n"], cfg["seed"]
    pilot = _pilot(pipe, comp, seed + n, opts, off, cfg["pilot"], ER.min_pilot_accepts(cfg["confidence"], len(checks)))
    rule = ER.EarlyRejectRule.calibrate(pilot["margins"], pilot["accepted"], checks, cfg["confidence"])
    seeds = list(range(seed, seed + n))
    full = _run_seeds(pipe, comp, seeds, opts, None)
    early = _run_seeds(pipe, comp, seeds, opts, rule)
    cont = _run_continuous(pipe, comp, seeds, opts, rule)
    alive = early["alive"]
    # the survivors are the full run's images: the UNet's numerics follow the rows of each call (the
    # early run records every row up to the check; oneDNN picks kernels by shape) and the early
    # steps' 1 / sqrt(abar) amplifies them (2e-3 on an Intel Xeon, random-weight world); a sampler
    # that depended on the batch would move an image by O(1)
    if not torch.allclose(early["latents"][alive], full["latents"][alive], atol=2e-2, rtol=1e-3):
        diff = float((early["latents"][alive] - full["latents"][alive]).abs().max())
        raise RuntimeError(f"early rejection changed a surviving image by {diff:.3g}: sampling must not depend on the batch")
    sat, _ = judge(detector, full["latents"], objs, comp.expression)
    return {"expression": expr, "objs": objs, "rule": rule.to_dict(), "satisfied": sat,
            "pilot": {"rows": pilot["rows"], "wall": pilot["wall"], "accepted": pilot["accepted"]},
            "checks_on": all(math.isfinite(t) for t in rule.thresholds),
            "full": {k: full[k] for k in ("accepted", "rows", "wall")},
            "early": {"accepted": early["accepted"], "alive": alive, "margins": early["margins"], "rows": early["rows"],
                      "wall": early["wall"]},
            "continuous": cont}


def run(args: argparse.Namespace) -> int:
    if args.action == "report":
        print(report(Path(args.out)))
        return 0
    from tqdm.auto import tqdm

    from compkern.pipelines.composition import CompositionPipeline
    from compkern.train.sepen import load_detector

    check_at_least_one(args, ("n", "prompts", "steps", "pilot", "batch_size"))
    ER.check_confidence(args.confidence)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    suites = parse_suites(args.suites)
    world_dir, model, world = open_world(args.world)
    cfg = {k: getattr(args, k) for k in _FROZEN if k != "world"}
    cfg["world"] = world.to_dict()
    folder = RunFolder(out, cfg, keys=_FROZEN, what="benchmark")
    pipe = CompositionPipeline.from_pretrained(model)
    detector = load_detector(world_dir)
    cells = [(s, i, e, o) for s in suites for i, (e, o) in enumerate(suite_prompts(world, s, args.prompts))]
    todo = [c for c in cells if not folder.exists(f"cells/{c[0]}-{c[1]:02d}.pt")]
    for suite, i, expr, objs in tqdm(todo, desc="early-reject cells", initial=len(cells) - len(todo), total=len(cells),
                                     disable=args.no_progress):
        cell = run_cell(pipe, detector, expr, objs, cfg, str(model.resolve()))
        cell["suite"] = suite
        folder.save(f"cells/{suite}-{i:02d}.pt", cell)
    print(report(out))
    return 0


def _precision(acc: torch.Tensor, sat: torch.Tensor) -> float:
    return float((acc & sat).sum() / acc.sum()) if acc.any() else float("nan")


def report(out: Path) -> str:
    """Per suite: the full run against early rejection on the same seeds; writes results.json and table.md."""
    files = sorted((out / "cells").glob("*.pt"))
    if not files:
        raise ValueError(f"--out {out} holds no cells yet: run `compkern early-reject run` first")
    cells = [load(f) for f in files]
    rows = []
    for suite in SUITES:
        sc = [c for c in cells if c["suite"] == suite]
        if not sc:
            continue
        cat = lambda part, k: torch.cat([c[part][k] for c in sc])  # noqa: E731
        full, early, alive, sat = cat("full", "accepted"), cat("early", "accepted"), cat("early", "alive"), \
            torch.cat([c["satisfied"] for c in sc])
        tot = lambda part, k: sum(c[part][k] for c in sc)  # noqa: E731
        n_full, n_early = int(full.sum()), int(early.sum())
        rows.append({
            "suite": suite, "candidates": len(full), "acceptance": n_full / len(full),
            "rows_per_accepted_full": tot("full", "rows") / max(n_full, 1),
            "rows_per_accepted_early": tot("early", "rows") / max(n_early, 1),
            "wall_per_accepted_full": tot("full", "wall") / max(n_full, 1),
            "wall_per_accepted_early": tot("early", "wall") / max(n_early, 1),
            "rows_per_accepted_continuous": tot("continuous", "rows") / max(int(cat("continuous", "accepted").sum()), 1),
            "wall_per_accepted_continuous": tot("continuous", "wall") / max(int(cat("continuous", "accepted").sum()), 1),
            "continuous_equal_early": float((cat("continuous", "accepted") == early).float().mean()),
            "stopped": int((~alive).sum()), "decisions_equal": float((full == early).float().mean()),
            "accepted_lost": int((full & ~alive).sum()), "accepted_full": n_full, "accepted_early": n_early,
            "precision_full": _precision(full, sat), "precision_early": _precision(early, sat),
            "pilot_rows_per_prompt": tot("pilot", "rows") / len(sc),
            "pilot_images_per_prompt": sum(len(c["pilot"]["accepted"]) for c in sc) / len(sc),
            "prompts_with_checks_on": sum(bool(c.get("checks_on")) for c in sc), "prompts": len(sc),
            "thresholds": [c["rule"]["thresholds"] for c in sc]})
    RunFolder(out).write_json("results.json", {"rows": rows, "config": RunFolder(out).stored_config()})
    lines = ["| suite | acceptance | rows / accepted: full -> early | wall s / accepted: full -> early -> + continuous "
             "| stopped early | decisions equal | accepted lost | precision: full -> early | pilot images (rows) / prompt "
             "| prompts with the check on |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['suite']} | {r['acceptance']:.2f} | {r['rows_per_accepted_full']:.0f} -> "
                     f"{r['rows_per_accepted_early']:.0f} ({r['rows_per_accepted_full'] / r['rows_per_accepted_early']:.2f}x) | "
                     f"{r['wall_per_accepted_full']:.2f} -> {r['wall_per_accepted_early']:.2f} -> "
                     f"{r['wall_per_accepted_continuous']:.2f} | {r['stopped']}/{r['candidates']} | "
                     f"{r['decisions_equal']:.3f} | {r['accepted_lost']}/{r['accepted_full']} | "
                     f"{r['precision_full']:.3f} -> {r['precision_early']:.3f} | {r['pilot_images_per_prompt']:.0f} "
                     f"({r['pilot_rows_per_prompt']:.0f}) | {r['prompts_with_checks_on']}/{r['prompts']} |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    return table


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", default="run", choices=["run", "report"])
    p.add_argument("--world", default="runs/world", help="a `compkern sepen train` folder trained with --extra-fraction")
    p.add_argument("--out", default="runs/early_reject", help="benchmark folder (resumable: one shard per cell)")
    p.add_argument("--suites", default="not_filter,and_heldout", help=f"comma-separated subset of {','.join(SUITES)}")
    p.add_argument("--prompts", type=int, default=4, help="prompts per suite")
    p.add_argument("--n", type=int, default=24, help="evaluated seeds per prompt (--seed ... --seed + n - 1)")
    p.add_argument("--pilot", type=int, default=48, help="pilot images per prompt (the seeds after the evaluated ones)")
    p.add_argument("--confidence", type=float, default=0.95, help="--early-reject of `compkern generate`")
    p.add_argument("--check-at", type=float, default=ER.CHECK_AT, help="--early-check of `compkern generate`")
    p.add_argument("--batch-size", type=int, default=8)
    add_sample_steps(p, 50, dest="steps")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    add_threads(p)
    add_progress(p)
