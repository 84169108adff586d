"""`compkern toy2d`: the 2-D compositions of Reduce, Reuse, Recycle (Du et al. 2023), reproduced.

Trains two class-conditional models on the five 2-D components of compkern.data.toy2d (a plain
eps MLP and the RRR energy-parameterized MLP; checkpoints cached in --out, resumable), then samples
the product (ring AND bar), mixture (left OR right) and negation (ring AND NOT plus) with

    ddpm-eps      reverse diffusion (DDPM) on the summed eps of the plain eps model
    ddpm-energy   reverse diffusion on the summed eps of the energy model
    ula/mala/hmc  annealed MCMC on the energy model (a DDPM step between levels, then MCMC; steps
                  adapted per level toward annealed_mcmc's target acceptance unless --fixed-steps)

and scores each against the exact composed density: the fraction of samples inside the target's
95% high-density region (an exact sampler scores ~0.95) and the energy distance to exact target
samples (grid inverse-CDF sampling; the "exact" row shows the floor for this sample size). Writes
results.json and a PNG grid of scatter plots.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from compkern.data.toy2d import (composition_tasks, default_components, energy_distance, hdr_fraction,
                                 hdr_threshold, make_labeled_dataset)
from compkern.models import ConditionalMLP, EnergyMLP, NoiseSchedule
from compkern.samplers import annealed_mcmc, ddpm_sample, mixture, negation, product
from compkern.train.denoise import train_eps_model
from compkern.utils.checkpoint import atomic_write_json

METHODS = ("ddpm-eps", "ddpm-energy", "ula", "mala", "hmc")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/toy2d", help="folder for checkpoints, results.json and the PNG")
    p.add_argument("--png", default=None, help="where to write the scatter grid (default: OUT/toy2d.png)")
    p.add_argument("--train-steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--n-per-class", type=int, default=5000)
    p.add_argument("--diffusion-steps", type=int, default=100, help="training timesteps (cosine schedule, as RRR)")
    p.add_argument("--levels", type=int, default=100, help="noise levels for reverse diffusion and annealed MCMC")
    p.add_argument("--mcmc-steps", type=int, default=10, help="MCMC steps per level (RRR: 10)")
    p.add_argument("--ula-step", type=float, default=0.05,
                   help="ULA eta = step * (1 - abar_t): at the first level (then adapted), or at every level with --fixed-steps")
    p.add_argument("--mala-step", type=float, default=0.2,
                   help="MALA eta = step * (1 - abar_t): at the first level (then adapted), or at every level with --fixed-steps")
    p.add_argument("--hmc-step", type=float, default=0.3,
                   help="HMC leapfrog h = step * sqrt(1 - abar_t): at the first level (then adapted), or at every "
                        "level with --fixed-steps")
    p.add_argument("--fixed-steps", action="store_true",
                   help="no step-size adaptation (annealed_mcmc adapt=False): the noise-scaled steps above at every level")
    p.add_argument("--leapfrog", type=int, default=3, help="leapfrog steps per HMC step (RRR: 3)")
    p.add_argument("--damping", type=float, default=0.5, help="HMC partial momentum refresh (RRR: 0.5)")
    p.add_argument("--clip-x0", type=float, default=2.5, help="clamp predicted x0 in every diffusion step (0: off)")
    p.add_argument("--n-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="data and training seed")
    p.add_argument("--sample-seed", type=int, default=None, help="sampling seed (default: --seed)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--sweep", action="store_true",
                   help="instead of the main table: the product task with each MCMC kind at several fixed "
                        "step sizes (no adaptation; writes OUT/sweep.json)")
    p.add_argument("--sweep-factors", default="0.25,1,4", help="step-size multipliers for --sweep")
    p.add_argument("--sweep-steps", default=None,
                   help="absolute ULA/MALA step sizes for --sweep (comma list; overrides --sweep-factors for them)")
    p.add_argument("--sweep-kinds", default="ula,mala,hmc", help="MCMC kinds for --sweep")
    p.add_argument("--sweep-out", default="sweep.json", help="file name (in OUT) of the --sweep results")


def _models(args, schedule):
    eps_model = ConditionalMLP(5, dim=2, hidden=args.hidden, depth=args.depth, num_steps=schedule.num_steps)
    energy_model = EnergyMLP(5, schedule, dim=2, hidden=args.hidden, depth=args.depth)
    return eps_model, energy_model


def _compose(task, model):
    a, b = task.classes
    if task.kind == "product":
        return product(model, [a, b])
    if task.kind == "negation":
        return negation(model, a, b, alpha=task.alpha)
    return mixture(model, [a, b])


def _sample(method, task, models, schedule, args, x_T, g):
    eps_model, energy_model = models
    if method == "ddpm-eps":
        if task.kind == "mixture":
            return None  # a mixture needs energies (logsumexp); a plain eps model cannot express it
        comp = _compose(task, eps_model)
        x = ddpm_sample(comp, x_T, schedule, num_steps=args.levels, clip_x0=args.clip_x0 or None, generator=g)
        return {"x": x, "n_evals": comp.n_evals, "accept": None}
    comp = _compose(task, energy_model)
    if method == "ddpm-energy":
        x = ddpm_sample(comp, x_T, schedule, num_steps=args.levels, clip_x0=args.clip_x0 or None, generator=g)
        return {"x": x, "n_evals": comp.n_evals, "accept": None}
    step = {"ula": args.ula_step, "mala": args.mala_step, "hmc": args.hmc_step}[method]
    res = annealed_mcmc(comp, x_T, schedule, kind=method, num_levels=args.levels, steps_per_level=args.mcmc_steps,
                        step_size=step, adapt=not args.fixed_steps, leapfrog_steps=args.leapfrog,
                        damping=args.damping, clip_x0=args.clip_x0 or None, generator=g)
    return {"x": res.x, "n_evals": res.n_evals, "accept": res.accept_rates, "steps": res.step_sizes}


def _scores(target, x, thr, ref):
    ok = torch.isfinite(x).all(1)
    return {"hdr95": round(hdr_fraction(target, x, thr), 4),
            "energy_dist": round(energy_distance(x[ok], ref), 5) if bool(ok.any()) else float("nan"),
            "non_finite": int((~ok).sum())}


def _plot(path: Path, panels: list[list[tuple[str, torch.Tensor | None]]], row_names: list[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, cols = len(panels), max(len(r) for r in panels)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.3 * rows), squeeze=False)
    for i, row in enumerate(panels):
        for j in range(cols):
            ax = axes[i][j]
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_xlim(-1.8, 1.8), ax.set_ylim(-1.8, 1.8), ax.set_aspect("equal")
            if j >= len(row):
                ax.axis("off")
                continue
            title, x = row[j]
            if x is None:
                ax.text(0, 0, "n/a", ha="center", va="center")
            else:
                x = x[torch.isfinite(x).all(1)].numpy()
                ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4, color="C0" if j else "k")
            ax.set_title(title, fontsize=8)
            if j == 0:
                ax.set_ylabel(row_names[i], fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, args.threads))
    out = Path(args.out)
    progress = not args.no_progress
    schedule = NoiseSchedule.cosine(args.diffusion_steps)
    comps = default_components()
    tasks = composition_tasks(comps)
    x, y = make_labeled_dataset(comps, args.n_per_class, torch.Generator().manual_seed(args.seed))
    models = _models(args, schedule)
    train = {}
    for name, model in zip(("eps_model", "energy_model"), models):
        t0 = time.time()
        hist = train_eps_model(model, x, y, schedule, out / name, steps=args.train_steps, batch_size=args.batch_size,
                               lr=args.lr, p_uncond=0.1, seed=args.seed, progress=progress)
        train[name] = {"final_loss": round(hist[-1]["loss"], 5) if hist else None, "seconds": round(time.time() - t0, 1)}
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)

    results = {"config": {k: v for k, v in vars(args).items()}, "train": train, "components": {}, "tasks": {}}
    ss = args.seed if args.sample_seed is None else args.sample_seed
    g_ref = torch.Generator().manual_seed(ss + 1)
    # how well each model fits each single component (reverse diffusion, one condition)
    for k, comp in enumerate(comps):
        ref = comp.sample(args.n_samples, generator=g_ref)
        row = {}
        for name, model in zip(("eps_model", "energy_model"), models):
            g = torch.Generator().manual_seed(ss + 10 + k)
            c = product(model, [k])
            with torch.no_grad():
                xs = ddpm_sample(c, torch.randn(args.n_samples, 2, generator=g), schedule, num_steps=args.levels,
                                 clip_x0=args.clip_x0 or None, generator=g)
            row[name] = round(energy_distance(xs, ref), 5)
        row["exact"] = round(energy_distance(comp.sample(args.n_samples, generator=g_ref), ref), 5)
        results["components"][comp.name] = row
    print("single components, energy distance to exact samples:", json.dumps(results["components"]))

    if args.sweep:
        return _sweep(args, tasks["product"], models, schedule, g_ref, out, results)
    panels, row_names = [], []
    for tname, task in tasks.items():
        target = task.target
        thr = hdr_threshold(target, target.sample(20000, generator=g_ref))
        ref = target.sample(args.n_samples, generator=g_ref)
        exact = target.sample(args.n_samples, generator=g_ref)
        rows = {"exact": {**_scores(target, exact, thr, ref), "evals_per_sample": 0}}
        panel = [(f"exact {target.name}", exact)]
        for mi, method in enumerate(METHODS):
            g = torch.Generator().manual_seed(ss + 100 + mi)
            x_T = torch.randn(args.n_samples, 2, generator=g)
            t0 = time.time()
            with torch.no_grad():
                r = _sample(method, task, models, schedule, args, x_T, g)
            if r is None:
                rows[method] = None
                panel.append((f"{method}: n/a", None))
                continue
            s = _scores(target, r["x"], thr, ref)
            s["evals_per_sample"] = round(r["n_evals"] / args.n_samples, 1)
            s["seconds"] = round(time.time() - t0, 2)
            if r["accept"] is not None:
                a = r["accept"]
                s["accept_mean"] = round(float(a.mean()), 3)
                s["accept_by_level"] = [round(float(v), 3) for v in a[:: max(1, len(a) // 10)]]
            if r.get("steps") is not None:
                st = r["steps"]
                s["step_by_level"] = [float(f"{float(v):.4g}") for v in st[:: max(1, len(st) // 10)]]
            rows[method] = s
            panel.append((f"{method}: hdr {s['hdr95']:.2f} ED {s['energy_dist']:.3f}", r["x"]))
            print(f"{tname:9s} {method:12s} " + " ".join(f"{k}={v}" for k, v in s.items() if not k.endswith("_by_level")),
                  flush=True)
        results["tasks"][tname] = {"target": target.name, "methods": rows}
        panels.append(panel)
        row_names.append(tname)
    png = Path(args.png) if args.png else out / ("toy2d.png" if args.sample_seed is None else f"toy2d_s{ss}.png")
    _plot(png, panels, row_names)
    res_path = out / ("results.json" if args.sample_seed is None else f"results_s{ss}.json")
    atomic_write_json(results, res_path)
    print(_table(results))
    print(f"wrote {res_path} and {png}")
    return 0


def _sweep(args, task, models, schedule, g_ref, out: Path, results: dict) -> int:
    """The product task with ULA, MALA and HMC at step sizes (default step) x each factor."""
    target = task.target
    thr = hdr_threshold(target, target.sample(20000, generator=g_ref))
    ref = target.sample(args.n_samples, generator=g_ref)
    rows = []
    for method in args.sweep_kinds.split(","):
        key = f"{method}_step"
        if args.sweep_steps and method != "hmc":
            steps = [float(v) for v in args.sweep_steps.split(",")]
        else:
            steps = [getattr(args, key) * float(f) for f in args.sweep_factors.split(",")]
        for step in steps:
            a = argparse.Namespace(**vars(args))
            setattr(a, key, step)
            a.fixed_steps = True  # a sweep of fixed steps: adaptation would undo it
            g = torch.Generator().manual_seed((args.seed if args.sample_seed is None else args.sample_seed) + 200)
            t0 = time.time()
            try:
                r = _sample(method, task, models, schedule, a, torch.randn(args.n_samples, 2, generator=g), g)
            except FloatingPointError as e:  # ULA can diverge at large steps: record it, go on
                rows.append({"method": method, "step": step, "diverged": str(e)})
                print(f"method={method} step={step} diverged: {e}", flush=True)
                continue
            s = {"method": method, "step": getattr(a, key), **_scores(target, r["x"], thr, ref),
                 "evals_per_sample": round(r["n_evals"] / args.n_samples, 1), "seconds": round(time.time() - t0, 2),
                 "accept_mean": None if r["accept"] is None else round(float(r["accept"].mean()), 3)}
            rows.append(s)
            print(" ".join(f"{k}={v}" for k, v in s.items()), flush=True)
    results["sweep"] = rows
    atomic_write_json(results, out / args.sweep_out)
    lines = ["| method | step | in 95% HDR | energy dist. | accept (mean) | model evals / sample |", "|---|---|---|---|---|---|"]
    for s in rows:
        if "diverged" in s:
            lines.append(f"| {s['method']} | {s['step']:g} | diverged | | | |")
            continue
        acc = "-" if s["accept_mean"] is None else f"{s['accept_mean']:.2f}"
        lines.append(f"| {s['method']} | {s['step']:g} | {s['hdr95']:.3f} | {s['energy_dist']:.4f} | {acc} | {s['evals_per_sample']:g} |")
    print("\n".join(lines))
    print(f"wrote {out / args.sweep_out}")
    return 0


def _table(results: dict) -> str:
    """Markdown table: task x method -> hdr95 / energy distance / acceptance / evals per sample."""
    lines = ["| task | method | in 95% HDR | energy dist. | accept (mean) | model evals / sample |",
             "|---|---|---|---|---|---|"]
    for tname, t in results["tasks"].items():
        for m, s in t["methods"].items():
            if s is None:
                lines.append(f"| {tname} | {m} | n/a (needs energies) | | | |")
                continue
            acc = f"{s['accept_mean']:.2f}" if "accept_mean" in s else "-"
            lines.append(f"| {tname} | {m} | {s['hdr95']:.3f} | {s['energy_dist']:.4f} | {acc} | {s['evals_per_sample']:g} |")
    return "\n".join(lines)
