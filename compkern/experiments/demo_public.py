"""`compkern demo --protocol public`: the nine CompLift 2-D tasks under the public code's protocol.

Protocol of the public CompLift 2-D code (rainorangelemon/complift-2d-and-clevr: ddpm.py,
elbo.py, baselines_2d.py, conf/2d.yaml, scripts/train_2d.sh), and what is scaled here:

- models: one unconditional DDPM per component, no shared model and no null class (the public
  script trains 18 runs, 3 algebras x 6 datasets; they hold 11 distinct distributions, so 11 are
  trained here, together as one batched StackedToyDenoiser with independent weights). Public MLP:
  hidden 128, 4 residual blocks, learned time embedding (ToyDenoiser); here hidden 64 by default
  (``--hidden 128`` is the public size, ~4x the CPU time). The public runs use its energy form
  (eps = grad_x |x - f|^2); here the plain eps form (the lift and the product / negation
  compositions use only eps).
- schedule: 50 steps, betas linear 1e-4 .. 0.02 (abar_T = 0.60: the chain never reaches pure
  noise; sampling still starts from N(0, I), as in the public code).
- training: Adam lr 1e-3, batch 128, grad clip 1, EMA 0.999 (the EMA weights are used), fresh
  samples of the component every step. Public: 1000 epochs x 63 steps = 63k steps per model;
  here ``--train-steps`` (default 6000) per model, 1 CPU thread.
- generation: 50-step ancestral DDPM on the composed eps of the separate models: AND = e1 + e2,
  AND NOT = e1 - 0.5 e2 (the public negation temperature), OR = one operand per sample (the
  public code weights the two by an energy softmax; ancestral choice samples the mixture exactly).
  Public: 8000 samples per task; here ``--n`` (default 2000).
- lift: lift(x | c) = ELBO(eps_c) - ELBO(0.9 eps_c) (compkern.lift.tempered), 50 trials of one
  random t uniform in [0, 50) and one eps shared by the batch; accept as the public code:
  AND: all lifts > 0, OR: any > 0, NOT: lift <= 0.
- accuracy: compkern.lift.tasks2d.accuracy (the public rule; mixture c uses |r - 1| <= 0.1,
  where the public code's check has no absolute value and counts every point inside a circle).

The components are compkern's (circles of width 0.02, box edges blurred by 0.01), the same as the
default protocol, so the two protocols differ only in models, schedule and lift.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import time
from pathlib import Path

import torch

from compkern.experiments import demo_report
from compkern.lift import tasks2d
from compkern.lift.tempered import tempered_lift
from compkern.models.schedule import NoiseSchedule
from compkern.models.toy_ddpm import ComponentBank, ToyDenoiser
from compkern.samplers import ComposedEps, ddim_sample
from compkern.train.toy_ddpm import train_component_denoisers
from compkern.utils.checkpoint import atomic_save, atomic_write_json, load

DEFAULTS = {"out": "compkern_demo_public", "n": 2000, "train_steps": 6000, "batch_size": 128, "hidden": 64,
            "depth": 4}
PUBLIC_STEPS = 50  # the public 2-D schedule length
METHODS = ["composable diffusion", "+ CompLift public (tempered, 50 trials)"]
FULL_METHOD = "+ CompLift public (tempered, 1000 trials)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the public protocol only (the shared ones are in demo.add_arguments)."""
    p.add_argument("--trials", type=int, default=50, help="public protocol: lift trials (public code: 50)")
    p.add_argument("--alpha", type=float, default=0.9, help="tempered lift: the 'unconditional' is alpha * eps_c (public code: 0.9)")
    p.add_argument("--ema", type=float, default=0.999, help="public protocol: EMA decay of the weights used")
    p.add_argument("--compare", default=None,
                   help="results.json of a `compkern demo` (default protocol) run to put beside this one in results.md")


def train_models(out: Path, classes: list[int], args: argparse.Namespace, schedule: NoiseSchedule) -> dict[int, ToyDenoiser]:
    """One denoiser per component id in ``classes``: {id: EMA model}. Finished models are loaded
    from out/models/<component>.pt (written atomically, with their training configuration); the
    missing ones train together, resumably, in out/train/<their names' hash>."""
    comps = tasks2d.complift_components()
    config = {"hidden": args.hidden, "depth": args.depth, "num_steps": schedule.num_steps, "steps": args.train_steps,
              "batch_size": args.batch_size, "ema": args.ema, "seed": args.seed}
    nets, missing = {}, []
    for k in classes:
        path = out / "models" / f"{comps[k].name}.pt"
        saved = load(path) if path.exists() else None
        if saved is not None and saved["config"] == config and saved["component"] == repr(comps[k]):
            nets[k] = ToyDenoiser(args.hidden, args.depth, schedule.num_steps)
            nets[k].load_state_dict(saved["state"])
            nets[k].eval()
        else:
            missing.append(k)
    if missing:
        key = hashlib.sha1(",".join(comps[k].name for k in missing).encode()).hexdigest()[:10]
        trained = train_component_denoisers([comps[k] for k in missing], schedule, out / "train" / key,
                                            steps=args.train_steps, hidden=args.hidden, depth=args.depth,
                                            batch_size=args.batch_size, ema=args.ema, seed=args.seed,
                                            progress=not args.no_progress)
        for k, net in zip(missing, trained):
            atomic_save({"config": config, "component": repr(comps[k]), "state": net.state_dict()},
                        out / "models" / f"{comps[k].name}.pt")
            nets[k] = net
    return nets


def run_task(nets: dict[int, ToyDenoiser], schedule: NoiseSchedule, task: tasks2d.Task, args: argparse.Namespace,
             g: torch.Generator) -> dict:
    """Generate ``args.n`` samples of the task by the composed separate models, score them."""
    K = len(task.classes)
    bank = ComponentBank([nets[c] for c in task.classes])  # task-local ids 0..K-1, zero base K
    eps_fn = ComposedEps(bank, [bank.null_id, *range(K)], task.expr.sample_weights(args.n, g))
    with torch.no_grad():
        x = ddim_sample(eps_fn, torch.randn(args.n, 2, generator=g), schedule, num_steps=args.sample_steps, eta=1.0,
                        generator=g)
    res = {"task": task.name, "expr": task.expr.source, "classes": task.classes, "n": args.n,
           "generation_rows": eps_fn.n_evals, "methods": {}}

    def record(name: str, keep: torch.Tensor, rows: int) -> None:
        res["methods"][name] = {"accuracy": tasks2d.accuracy(task, x[keep], args.n), "accepted": int(keep.sum()),
                                "acceptance": float(keep.float().mean()), "lift_rows": int(rows),
                                "rows_per_decision": rows / (K * args.n)}

    record("composable diffusion", torch.ones(args.n, dtype=torch.bool), 0)
    r = tempered_lift(bank, x, range(K), schedule, n_trials=args.trials, alpha=args.alpha, generator=g)
    keep = task.expr.accept(r.lift)
    record(METHODS[1], keep, r.n_evals)
    if args.full:
        r1k = tempered_lift(bank, x, range(K), schedule, n_trials=1000, alpha=args.alpha, chunk_trials=50, generator=g)
        record(FULL_METHOD, task.expr.accept(r1k.lift), r1k.n_evals)
    res["_x"], res["_accept"] = x, keep
    return res


def markdown(columns: list[tuple[str, list[dict], str]]) -> str:
    """A markdown table: one row per task, one column per (label, task results, method name),
    cells 'accuracy (kept)', then the group means."""
    expr = {r["task"]: r["expr"] for _, rs, _ in columns for r in rs}
    tasks = [t.name for t in tasks2d.complift_tasks() if t.name in expr]
    by = [({r["task"]: r for r in rs}, m) for _, rs, m in columns]
    lines = ["| task | expression | " + " | ".join(label for label, _, _ in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for t in tasks:
        cells = []
        for rs, m in by:
            v = rs[t]["methods"][m] if t in rs else None
            cells.append("-" if v is None else f"{100 * v['accuracy']:.1f}% ({100 * v['acceptance']:.0f}% kept)")
        lines.append(f"| {t} | `{expr[t]}` | " + " | ".join(cells) + " |")
    for group in ["product", "mixture", "negation", "all"]:
        cells = []
        for rs, m in by:
            accs = [rs[t]["methods"][m]["accuracy"] for t in tasks if t in rs and (group == "all" or t.startswith(group))]
            accs = [a for a in accs if not math.isnan(a)]
            cells.append(f"{100 * sum(accs) / len(accs):.1f}%" if accs else "-")
        name = "mean of the tasks" if group == "all" else f"mean {group}"
        lines.append(f"| **{name}** | | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    """The public-protocol run: train or load the component models, then generate and score."""
    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.trials < 1:
        raise ValueError(f"--trials must be >= 1, got {args.trials}")
    if not 0 < args.alpha < 1:
        raise ValueError(f"--alpha must lie in (0, 1), got {args.alpha}")
    if not 1 <= args.sample_steps <= PUBLIC_STEPS:
        raise ValueError(f"--sample-steps must lie in [1, {PUBLIC_STEPS}] (the public schedule), got {args.sample_steps}")
    tasks = tasks2d.select_tasks(args.tasks)
    schedule = NoiseSchedule.ddpm_linear(PUBLIC_STEPS)
    classes = sorted({c for t in tasks for c in t.classes})
    nets = train_models(out, classes, args, schedule)
    t_train = time.time() - t_start
    g = torch.Generator().manual_seed(args.seed + 1)
    from tqdm.auto import tqdm
    results = [run_task(nets, schedule, t, args, g) for t in tqdm(tasks, desc="tasks", disable=args.no_progress)]
    methods = METHODS + ([FULL_METHOD] if args.full else [])
    table, summary = demo_report.table(results, methods)
    print(table)
    print(f"\npaper (Yu & Gao 2025, 2-D average): Composable Diffusion {100 * demo_report.PAPER['composable diffusion']:.1f}% -> "
          f"+ CompLift {100 * demo_report.PAPER['+ CompLift']:.1f}%")
    demo_report.plot(results, out / "samples.png", METHODS[1])
    tasks_json = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
    columns = [(f"public: {m}", tasks_json, m) for m in methods]
    if args.compare:
        import json
        other = json.loads(Path(args.compare).read_text())
        names = other["tasks"][0]["methods"]  # sorted by name in the JSON: list them in the demo's order
        names = [m for m in demo_report.METHODS if m in names] + [m for m in names if m not in demo_report.METHODS]
        columns = [(f"compkern: {m}", other["tasks"], m) for m in names] + columns
    md = markdown(columns)
    (out / "results.md").write_text(md)
    seconds = {"train_or_load": t_train, "total": time.time() - t_start}
    payload = {"config": dict(vars(args)), "paper": demo_report.PAPER, "summary": summary,
               "rows_per_decision": {m: demo_report.rows_per_decision(results, m) for m in methods},
               "tasks": tasks_json, "seconds": seconds}
    atomic_write_json(payload, out / "results.json")
    print(f"\nwrote {out / 'samples.png'}, {out / 'results.md'} and {out / 'results.json'} ({seconds['total']:.0f}s)")
    return 0
