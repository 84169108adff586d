"""`compkern positions train|sample|eval`: multi-object positions by composing a one-object model.

    compkern positions train --out runs/positions/eps --steps 2000 --threads 1
    compkern positions train --out runs/positions/energy --energy --steps 1000 --threads 1
    compkern positions sample runs/positions/eps --objects 3 --method reverse --base background --png s.png
    compkern positions eval --eps-run runs/positions/eps --energy-run runs/positions/energy --n 32
    compkern positions grid runs/positions/eval.json --png docs/positions.png

The model learns p(x | one object at (x, y)), p(x | empty scene) and p(x). n objects are composed as
log p(x | y_1..y_n) = log p(x | base) + sum_i (log p(x | y_i) - log p(x | base)), the base being the
unconditional null (Composable Diffusion) or the empty background (projective composition,
Bradley et al. 2025). Samplers: reverse diffusion (DDIM / DDPM), annealed ULA / MALA / HMC (energy
model), each optionally followed by CompLift rejection (lift of every y_i > 0, against the null as in
CompLift, or against the empty background).
CompLift scorers (--lift): compkern's estimator with fixed or adaptive uniform-t trials, and the
public CLEVR scorer (one trial at t = 928 with one noise shared by every sample and condition).
Accuracy: the training-free detector of compkern.data.clevr. Training and evaluation resume: eval
saves a cell's samples before scoring them and writes the results JSON after every cell and lift
variant, so a rerun adds only the missing cells and scorers.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from compkern.data.clevr import position_accuracy, sample_positions
from compkern.experiments._args import add_batch_size, add_progress, add_sample_steps, add_threads, add_train_steps
from compkern.lift.fixed_t import PUBLIC_CLEVR_T
from compkern.lift.positions import LIFT_MODES, accept_positions
from compkern.models.position_unet import PositionEnergyUNet, PositionUNet, position_schedule
from compkern.samplers.compositions import POSITION_MCMC_STEP as DEFAULT_STEP
from compkern.samplers.compositions import POSITION_METHODS as METHODS
from compkern.samplers.compositions import compose_positions
from compkern.train.positions import heldout_loss, load_run, train_position_model
from compkern.utils.checkpoint import load
from compkern.utils.run_folder import RunFolder


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    add_threads(common)

    tr = sub.add_parser("train", parents=[common], help="train the one-object position model (resumable)")
    tr.add_argument("--out", required=True, help="training folder (resumable)")
    tr.add_argument("--energy", action="store_true", help="energy-parameterized (RRR) variant")
    tr.add_argument("--size", type=int, default=24)
    tr.add_argument("--channels", type=int, nargs="+", default=[24, 48])
    tr.add_argument("--attention", action="store_true")
    add_train_steps(tr, 2000, dest="steps")
    add_batch_size(tr, 32, dest="batch")
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--p-empty", type=float, default=0.15, help="fraction of empty (background) scenes")
    tr.add_argument("--p-uncond", type=float, default=0.1, help="condition dropped to the null")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--save-every", type=int, default=100)
    add_progress(tr)

    samp = argparse.ArgumentParser(add_help=False)
    samp.add_argument("--base", choices=["null", "background"], default="background",
                      help="base condition of the composition (background: projective composition)")
    samp.add_argument("--scale", type=float, default=1.0, help="weight of every object condition")
    add_sample_steps(samp, 50, "reverse-diffusion steps / annealing levels", dest="steps")
    samp.add_argument("--eta", type=float, default=1.0, help="reverse diffusion: 1 ancestral (DDPM), 0 DDIM")
    samp.add_argument("--mcmc-steps", type=int, default=2, help="MCMC steps per level")
    samp.add_argument("--step-size", type=float, default=None, help="MCMC step size (default per kind)")
    samp.add_argument("--leapfrog", type=int, default=3)
    samp.add_argument("--clip-x0", type=float, default=None,
                      help="clamp the predicted x0 to [-v, v] at every step (the public code clips at 1; default off)")

    sa = sub.add_parser("sample", parents=[common, samp], help="compose n objects at random positions, save a PNG")
    sa.add_argument("run")
    sa.add_argument("--objects", type=int, default=3)
    sa.add_argument("--method", choices=list(METHODS), default="reverse")
    sa.add_argument("--n", type=int, default=8)
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--png", default="positions_samples.png")

    ev = sub.add_parser("eval", parents=[common, samp], help="accuracy vs number of objects per method (resumable)")
    ev.add_argument("--eps-run", default=None, help="eps-model run: reverse diffusion (+ ULA with --eps-mcmc)")
    ev.add_argument("--energy-run", default=None, help="energy-model run: reverse diffusion, ULA, MALA, HMC")
    ev.add_argument("--lift-run", default=None, help="model that estimates lifts for CompLift (default: --eps-run)")
    ev.add_argument("--methods", nargs="+", default=None,
                    help="cells as MODEL:METHOD:BASE, e.g. eps:reverse:null energy:hmc:background (default: all)")
    ev.add_argument("--objects", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ev.add_argument("--n", type=int, default=32, help="samples per cell")
    ev.add_argument("--lift", nargs="+", choices=LIFT_MODES, default=["fixed", "adaptive"],
                    help="CompLift scorers: fixed (--lift-trials uniform-t trials, compkern.lift.estimate_lift), "
                         "adaptive (at most --lift-max-trials, stop once the AND is certain), public (the public "
                         "CLEVR scorer: one trial per --lift-t with one noise shared by every sample and condition)")
    ev.add_argument("--lift-trials", type=int, default=32, help="CompLift fixed trials per sample")
    ev.add_argument("--lift-max-trials", type=int, default=64, help="CompLift adaptive: most trials per pair")
    ev.add_argument("--lift-t", type=int, nargs="+", default=[PUBLIC_CLEVR_T],
                    help="--lift public: the trials' timesteps (of 1000; the public code: 928)")
    ev.add_argument("--no-lift", action="store_true")
    ev.add_argument("--lift-bases", nargs="+", choices=["null", "background"], default=["null", "background"],
                    help="reference of the lift: null (CompLift's log p(x|y) - log p(x)) and/or background "
                         "(log p(x|y) - log p(x|empty scene))")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--threshold", type=float, default=0.1, help="detection distance threshold (normalized)")
    ev.add_argument("--out", default="runs/positions/eval",
                    help="eval folder: eval.json and eval_samples/ (a path ending in .json: that results file)")
    ev.add_argument("--png", default=None, help="grid of samples per method (e.g. docs/positions.png)")
    ev.add_argument("--table", action="store_true", help="only print the table of an existing --out")
    ev.add_argument("--chunk-size", type=int, default=128, help="most rows per model call")
    add_progress(ev)

    gr = sub.add_parser("grid", help="one PNG with a row of samples per method from one or more eval outputs")
    gr.add_argument("evals", nargs="+", help="eval folders (or their eval JSON files; the *_samples folders beside them hold the images)")
    gr.add_argument("--png", default="docs/positions.png")
    gr.add_argument("--per-cell", type=int, default=2)


# -- actions ----------------------------------------------------------------------------------------
def _train(args) -> int:
    kw = dict(channels=tuple(args.channels), attention=args.attention)
    model = PositionEnergyUNet(position_schedule(), **kw) if args.energy else PositionUNet(**kw)
    t0 = time.time()
    hist = train_position_model(model, args.out, size=args.size, steps=args.steps, batch_size=args.batch, lr=args.lr,
                                p_empty=args.p_empty, p_uncond=args.p_uncond, seed=args.seed,
                                save_every=args.save_every, progress=not args.no_progress)
    last = [h["loss"] for h in hist[-10:]]
    print(f"trained {args.out}: step {args.steps}, mean of the last {len(last)} logged losses {sum(last) / len(last):.4g}, "
          f"held-out loss {heldout_loss(model, size=args.size):.4g} ({time.time() - t0:.0f} s this run)")
    return 0


def _parse_cell(spec: str) -> tuple[str, str, str]:
    parts = spec.split(":")
    if len(parts) != 3 or parts[0] not in ("eps", "energy") or parts[1] not in METHODS or parts[2] not in ("null", "background"):
        raise ValueError(f"cells are MODEL:METHOD:BASE with MODEL eps|energy, METHOD {'|'.join(METHODS)}, "
                         f"BASE null|background; got {spec!r}")
    if parts[0] == "eps" and parts[1] in ("mala", "hmc"):
        raise ValueError(f"{spec!r}: MALA and HMC need energies; use the energy model")
    return parts[0], parts[1], parts[2]


DEFAULT_CELLS = ["eps:reverse:null", "eps:reverse:background", "energy:reverse:null", "energy:reverse:background",
                 "energy:ula:background", "energy:mala:background", "energy:hmc:background"]


def _cell_positions(n_objects: int, N: int, seed: int) -> tuple[torch.Tensor, torch.Generator]:
    g = torch.Generator().manual_seed(seed * 1000 + n_objects)
    return sample_positions(N, n_objects, generator=g), g


def _variant_key(mode: str, lift_base: str) -> str:
    return f"lift_{mode}" if lift_base == "null" else f"lift_{mode}_bg"


def _variant_config(mode: str, args) -> dict:
    if mode == "public":
        return {"t": list(args.lift_t)}
    return {"trials": args.lift_trials if mode == "fixed" else args.lift_max_trials}


def eval_paths(out: str | Path) -> tuple[Path, str]:
    """(folder, results file name) of an eval's --out: a folder holds eval.json and eval_samples/;
    an --out ending in .json (the older spelling) is that results file, its samples beside it."""
    out = Path(out)
    return (out.parent, out.name) if out.suffix == ".json" else (out, "eval.json")


def _model_id(cfg: dict) -> dict:
    """What identifies a trained model in a cell's settings: its training configuration."""
    return {k: cfg.get(k) for k in ("model", "size", "steps", "batch_size", "lr", "p_empty", "p_uncond", "schedule")}


def _eval(args) -> int:
    """Resumable: a cell's samples are saved (atomically) before its lifts, the results JSON after
    every step, so a rerun only computes the missing cells and lift variants. Every cell and lift
    variant stores the settings it was made with (the model's training config, seed, detection
    threshold, sampler settings; the lift model and scorer settings): a rerun with other settings
    into the same --out is refused instead of reusing stale cells."""
    folder, name = eval_paths(args.out)
    run_folder = RunFolder(folder)
    results = run_folder.read_json(name, {})
    if args.table:
        print(format_table(results))
        return 0
    runs = {"eps": args.eps_run, "energy": args.energy_run}
    cells = [_parse_cell(c) for c in (args.methods or [c for c in DEFAULT_CELLS if runs[c.split(":")[0]]])]
    models, cfgs, size = {}, {}, None
    for kind, path in runs.items():
        if path and any(c[0] == kind for c in cells):
            models[kind], cfgs[kind] = load_run(path)
            size = cfgs[kind]["size"]
    missing = {c[0] for c in cells} - set(models)
    if missing:
        raise ValueError(f"cells need the {sorted(missing)} model run(s): pass --eps-run / --energy-run")
    lift_path = args.lift_run or args.eps_run
    lift_model = lift_cfg = None
    if not args.no_lift and lift_path:
        lift_model, lift_cfg = load_run(lift_path)
    variants = [] if lift_model is None else [(m, lb) for lb in args.lift_bases for m in args.lift]
    sample_dir = Path(name).stem + "_samples"
    jobs = [(c, n) for c in cells for n in args.objects]
    bar = tqdm(jobs, desc="positions eval", disable=args.no_progress)
    for (kind, method, base), n in bar:
        key = f"{kind}:{method}:{base}:{n}"
        bar.set_postfix_str(key)
        gen = {"samples": args.n, "scale": args.scale, "steps": args.steps,
               "eta": args.eta if method == "reverse" else None,
               "mcmc_steps": None if method == "reverse" else args.mcmc_steps,
               "step_size": None if method == "reverse" else (args.step_size or DEFAULT_STEP[method]),
               "leapfrog": args.leapfrog if method == "hmc" else None, "clip_x0": args.clip_x0,
               "seed": args.seed, "threshold": args.threshold, "model_run": _model_id(cfgs[kind])}
        sample_file = f"{sample_dir}/{key.replace(':', '_')}.pt"
        positions, g = _cell_positions(n, args.n, args.seed)
        row = run_folder.cell(results, key, gen, what=f"cell {key}")
        if row is None or not run_folder.exists(sample_file):
            t0 = time.time()
            r = compose_positions(models[kind], positions, method=method, base=base, scale=args.scale, steps=args.steps,
                                  eta=args.eta, mcmc_steps=args.mcmc_steps, step_size=args.step_size,
                                  leapfrog=args.leapfrog, size=size, clip_x0=args.clip_x0, chunk_size=args.chunk_size,
                                  progress=not args.no_progress, generator=g)
            correct = position_accuracy(r["x"], positions, threshold=args.threshold)
            run_folder.save(sample_file, {"x": r["x"].clone(), "positions": positions.clone(), "correct": correct.clone()})
            row = {"model": kind, "method": method, "base": base, "objects": n, **gen,
                   "accuracy": float(correct.float().mean()), "evals_per_sample": r["n_evals"] / args.n,
                   "mh_accept": r["accept"], "mcmc_step_sizes": r["step_sizes"], "seconds": round(time.time() - t0, 1)}
            results[key] = row
            run_folder.write_json(name, results)
            tqdm.write(f"{key}: acc {row['accuracy']:.3f} ({row['seconds']:.0f} s)")
        saved = run_folder.load(sample_file)
        if not torch.equal(saved["positions"], positions):
            raise ValueError(f"{run_folder.file(sample_file)} was made for other positions (--seed / --n differ); "
                             "pass another --out")
        x, correct = saved["x"], saved["correct"]
        for mode, lift_base in variants:
            vkey = _variant_key(mode, lift_base)
            vcfg = {**_variant_config(mode, args), "lift_run": _model_id(lift_cfg)}
            if run_folder.cell(row, vkey, vcfg, what=f"{key} {vkey}") is not None:
                continue
            t0 = time.time()
            lr = accept_positions(lift_model, x, positions, mode=mode, n_trials=vcfg.get("trials", 0),
                                  lift_t=args.lift_t, lift_base=lift_base, chunk_size=args.chunk_size,
                                  generator=torch.Generator().manual_seed(args.seed + 7))
            acc = lr["accept"]
            k = int(acc.sum())
            row[vkey] = {**vcfg, "accepted": k, "accept_rate": k / args.n,
                         "accuracy": float(correct[acc].float().mean()) if k else None,
                         "rejected_correct": int((correct & ~acc).sum()), "rejected_wrong": int((~correct & ~acc).sum()),
                         "lift_evals_per_sample": lr["n_evals"] / args.n,
                         "evals_per_accepted": (row["evals_per_sample"] * args.n + lr["n_evals"]) / k if k else None,
                         "seconds": round(time.time() - t0, 1)}
            run_folder.write_json(name, results)
    print(format_table(results))
    if args.png:
        save_grid(load_grid_rows(run_folder.file(sample_dir), [f"{k}:{m}:{b}" for k, m, b in cells], args.objects), args.png)
    return 0


VARIANTS = {"plain": "-", "lift_fixed": "+ CompLift fixed", "lift_adaptive": "+ CompLift adaptive",
            "lift_public": "+ CompLift public one-trial", "lift_fixed_bg": "+ CompLift fixed, lift vs background",
            "lift_adaptive_bg": "+ CompLift adaptive, lift vs background",
            "lift_public_bg": "+ CompLift public one-trial, lift vs background"}


def binomial_se(p: float, n: int) -> float:
    """Standard error sqrt(p (1 - p) / n) of a proportion p over n samples."""
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def format_table(results: dict) -> str:
    """Markdown table: one row per (model, method, base) and variant, one column per object count;
    cells "accuracy +- binomial standard error" in %, lift variants over the kept samples with the
    share kept."""
    cells = sorted({(r["model"], r["method"], r["base"]) for r in results.values()},
                   key=lambda c: (c[0] != "eps", list(METHODS).index(c[1]), c[2]))
    ns = sorted({r["objects"] for r in results.values()})
    head = "| model | sampler | base | variant | " + " | ".join(f"{n} obj" for n in ns) + " | evals / accepted sample (max n) |"
    lines = [head, "|" + "---|" * (5 + len(ns))]
    for c in cells:
        rows = {r["objects"]: r for r in results.values() if (r["model"], r["method"], r["base"]) == c}
        for variant, name in VARIANTS.items():
            vals, ev = [], ""
            for n in ns:
                r = rows.get(n)
                if r is None or (variant != "plain" and variant not in r):
                    vals.append("-")
                    continue
                N = r.get("samples", 0)
                if variant == "plain":
                    vals.append(f"{100 * r['accuracy']:.1f} ± {100 * binomial_se(r['accuracy'], N):.1f}")
                    ev = f"{r['evals_per_sample']:.0f}"
                else:
                    v = r[variant]
                    vals.append("none kept" if v["accuracy"] is None else
                                f"{100 * v['accuracy']:.1f} ± {100 * binomial_se(v['accuracy'], v['accepted']):.1f} "
                                f"({100 * v['accept_rate']:.0f}% kept)")
                    ev = "-" if v["evals_per_accepted"] is None else f"{v['evals_per_accepted']:.0f}"
            if all(v == "-" for v in vals):
                continue
            lines.append(f"| {c[0]} | {METHODS[c[1]]} | {c[2]} | {name} | " + " | ".join(vals) + f" | {ev} |")
    return "\n".join(lines)


def load_grid_rows(sample_dir: str | Path, cells: list[str], objects: list[int]) -> list[tuple[str, dict]]:
    """[(cell, {n: {"x", "positions", "correct"}})] from an eval's sample folder."""
    rows = []
    for cell in cells:
        per_n = {}
        for n in objects:
            f = Path(sample_dir) / f"{cell.replace(':', '_')}_{n}.pt"
            if f.exists():
                per_n[n] = load(f)
        rows.append((cell, per_n))
    return rows


def save_grid(rows: list[tuple[str, dict]], png: str | Path, per_cell: int = 2) -> None:
    """rows [(label, {n: {"x" (B, 3, H, W), "positions" (B, n, 2), "correct" (B,)}})]: one panel
    row per label, ``per_cell`` samples for each object count, requested positions marked (green
    cross: scene correct, red: not)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objects = sorted({n for _, per_n in rows for n in per_n})
    fig, axes = plt.subplots(len(rows), max(1, len(objects) * per_cell),
                             figsize=(1.1 * len(objects) * per_cell, 1.25 * len(rows)), squeeze=False)
    for i, (label, per_n) in enumerate(rows):
        for j, n in enumerate(objects):
            d = per_n.get(n)
            for s in range(per_cell):
                ax = axes[i, j * per_cell + s]
                ax.set_xticks([])
                ax.set_yticks([])
                if d is None or s >= len(d["x"]):
                    continue
                img = ((d["x"][s].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
                ax.imshow(img, extent=(0, 1, 1, 0), interpolation="nearest")
                p = d["positions"][s]
                ax.scatter(p[:, 0], p[:, 1], s=14, marker="+", c="lime" if bool(d["correct"][s]) else "red", linewidths=1)
                if i == 0 and s == 0:
                    ax.set_title(f"{n} obj", fontsize=7)
        axes[i, 0].set_ylabel(label.replace(":", "\n"), fontsize=6)
    fig.tight_layout(pad=0.2)
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _grid(args) -> int:
    rows = []
    for path in args.evals:
        folder, name = eval_paths(path)
        results = json.loads((folder / name).read_text())
        order = sorted({(r["model"], r["method"], r["base"]) for r in results.values()},
                       key=lambda c: (c[0] != "eps", list(METHODS).index(c[1]), c[2] != "null"))
        cells = [":".join(c) for c in order]
        objects = sorted({r["objects"] for r in results.values()})
        rows += load_grid_rows(folder / (Path(name).stem + "_samples"), cells, objects)
    save_grid(rows, args.png, per_cell=args.per_cell)
    print(f"wrote {args.png} ({len(rows)} methods)")
    return 0


def _sample(args) -> int:
    model, cfg = load_run(args.run)
    g = torch.Generator().manual_seed(args.seed)
    positions = sample_positions(args.n, args.objects, generator=g)
    r = compose_positions(model, positions, method=args.method, base=args.base, scale=args.scale, steps=args.steps,
                       eta=args.eta, mcmc_steps=args.mcmc_steps, step_size=args.step_size, leapfrog=args.leapfrog,
                       size=cfg["size"], clip_x0=args.clip_x0, generator=g)
    correct = position_accuracy(r["x"], positions)
    save_grid([(f"{args.method}:{args.base}", {args.objects: {"x": r["x"], "positions": positions, "correct": correct}})],
              args.png, per_cell=args.n)
    print(f"{args.method} {args.base} {args.objects} objects: accuracy {float(correct.float().mean()):.3f} over {args.n}, "
          f"{r['n_evals'] / args.n:.0f} model rows per sample, MH accept {r['accept']}; wrote {args.png}")
    return 0


def run(args) -> int:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return {"train": _train, "sample": _sample, "eval": _eval, "grid": _grid}[args.action](args)
