"""`compkern demo`: CompLift on the 2-D tasks of Yu & Gao (ICML 2025), end to end on the CPU.

One class-conditional MLP learns the eleven component distributions of the nine CompLift 2-D
tasks plus a background class, uniform on [-2, 2]^2. The background is the base row of every
composition and the "p(x)" of the lift: lift(x | c) > 0 then means "x lies where c is denser than
the background", i.e. in c's support, which is what CompLift's AND / OR / NOT need. (The mixture
of all classes, what classifier-free dropout learns, would make a broad class such as the square
look negative wherever narrower classes pile up.)
For each task, Composable Diffusion generates samples from the composed eps; CompLift then keeps
a sample only if its lift scores satisfy the composition. Accuracy follows the public CompLift
code: the fraction of (accepted) samples inside the task's target region, and for the two tasks
whose target is empty, the fraction of samples rejected.

    product   a: ring of 8 AND vertical strip     b: circle AND circle     c: two disjoint boxes
    mixture   a: 3 left OR 3 right clusters       b: left OR right box     c: circle OR circle
    negation  a: square AND NOT inner square      b: square AND NOT strip  c: inner AND NOT square

"+ CompLift tempered" scores the same samples with the public code's lift instead (each condition
against its own 0.9-tempered copy, lift = ELBO(eps_c) - ELBO(0.9 eps_c), 50 trials; see
compkern.lift.tempered), on this one model. ``--protocol public`` (compkern.experiments.demo_public)
runs the public protocol itself: separate per-component models, 50-step schedule, tempered lift.

Deviations from the public code (which trains 18 separate unconditional models with a 50-step
schedule and estimates log p(x) as the ELBO of 0.9 * eps): one model with a real null class, the
1000-step linear schedule sampled with 50 ancestral steps, thin circles of width 0.02 and box
edges blurred by 0.01 (so every component has a density), and far shorter training.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from compkern.lift.tasks2d import BACKGROUND_ID, Task, accuracy, background, complift_components, select_tasks
from compkern.experiments import demo_report
from compkern.lift import calibrate, estimate_lift
from compkern.lift.tempered import tempered_lift
from compkern.models import NoiseSchedule
from compkern.samplers import ComposedEps, ddim_sample
from compkern.utils.checkpoint import atomic_write_json



# -- the run ----------------------------------------------------------------------------------------


PROTOCOLS = ("compkern", "public")
# defaults of the options whose value depends on --protocol (public: compkern.experiments.demo_public)
DEFAULTS = {"out": "compkern_demo", "n": 1000, "train_steps": 8000, "batch_size": 512, "hidden": 64, "depth": 3}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from compkern.experiments import demo_public

    p.add_argument("--protocol", default="compkern",
                   help="compkern: one model with a background class and compkern's lift estimators; public: the "
                        "public CompLift code's separate per-component models and tempered lift (see demo_public)")
    p.add_argument("--out", default=None, help="output folder (model cache, PNG, JSON); default compkern_demo, "
                                               "compkern_demo_public with --protocol public")
    p.add_argument("--n", type=int, default=None, help="samples generated per task (default 1000; public 2000)")
    p.add_argument("--train-steps", type=int, default=None, help="training steps (default 8000; public 6000 per model)")
    p.add_argument("--batch-size", type=int, default=None, help="default 512; public 128")
    p.add_argument("--hidden", type=int, default=None, help="default 64; public 64 (the public code: 128)")
    p.add_argument("--depth", type=int, default=None, help="default 3; public 4")
    p.add_argument("--n-per-class", type=int, default=4000)
    p.add_argument("--sample-steps", type=int, default=50, help="ancestral (DDPM) sampling steps")
    p.add_argument("--z", type=float, default=2.5, help="adaptive CompLift: certainty of a sign, in standard errors")
    p.add_argument("--max-trials", type=int, default=48, help="adaptive CompLift: cap on fresh trials per lift")
    p.add_argument("--full", action="store_true", help="also run the 1000-trial estimator (slow)")
    p.add_argument("--tasks", default=None, help="comma-separated subset of task names")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: these tensors are small; more threads only add overhead)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tempered-t-max", type=int, default=None,
                   help="'+ CompLift tempered': draw t uniform in [0, T) (default: the whole schedule; 219 keeps "
                        "abar_t >= 0.60, the noise range of the public 50-step schedule)")
    p.add_argument("--no-progress", action="store_true")
    demo_public.add_arguments(p)


def train_model(out: Path, *, steps: int, batch_size: int, hidden: int, depth: int, n_per_class: int,
                seed: int, progress: bool):
    """Train (or load the cached checkpoint of) the 11-class model; returns (model, schedule)."""
    from compkern.data.toy2d import make_labeled_dataset
    from compkern.models.mlp import ConditionalMLP
    from compkern.train.denoise import train_eps_model

    schedule = NoiseSchedule.ddpm_linear(1000)
    comps = complift_components() + [background()]
    x, y = make_labeled_dataset(comps, n_per_class, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    model = ConditionalMLP(len(comps), dim=2, hidden=hidden, depth=depth, num_steps=schedule.num_steps)
    # p_uncond = 0: the base condition is the background class, not the model's null id.
    train_eps_model(model, x, y, schedule, out / "model", steps=steps, batch_size=batch_size, lr=2e-3,
                    p_uncond=0.0, seed=seed, progress=progress)
    model.eval()
    return model, schedule


@torch.no_grad()
def run_task(model, schedule, task: Task, args, g: torch.Generator, g_tempered: torch.Generator) -> dict:
    """Generate ``args.n`` samples of ``task``, score them with every method. ``g_tempered`` draws
    the tempered lift's trials (its own stream, so the other methods' numbers do not depend on it)."""
    null = BACKGROUND_ID
    conds = task.classes
    K = len(conds)
    weights = task.expr.sample_weights(args.n, g)
    eps_fn = ComposedEps(model, [null, *conds], weights, record=True)
    x = ddim_sample(eps_fn, torch.randn(args.n, 2, generator=g), schedule, num_steps=args.sample_steps, eta=1.0,
                    generator=g)
    gen_rows = eps_fn.n_evals
    res = {"task": task.name, "expr": task.expr.source, "classes": conds, "n": args.n, "generation_rows": gen_rows, "methods": {}}

    def record(name, keep, rows, extra=None):
        kept = x[keep]
        res["methods"][name] = {"accuracy": accuracy(task, kept, args.n), "accepted": int(keep.sum()),
                                "acceptance": float(keep.float().mean()), "lift_rows": int(rows),
                                "rows_per_decision": rows / (K * args.n), **(extra or {})}

    record("composable diffusion", torch.ones(args.n, dtype=torch.bool), 0)
    r50 = estimate_lift(model, x, conds, null, schedule, n_trials=50, chunk_trials=50, stratified=False,
                        expr=task.expr, generator=g)
    record("+ CompLift 50 trials", r50.accept, r50.n_evals)
    rc = estimate_lift(model, x, conds, null, schedule, n_trials=0, record=eps_fn.record, expr=task.expr, generator=g)
    record("+ CompLift cached", rc.accept, rc.n_evals)
    pilot = x[torch.randperm(args.n, generator=g)[:64]]
    cal = calibrate(model, pilot, conds, null, schedule, n_trials=16, generator=g)
    ra = estimate_lift(model, x, conds, null, schedule, adaptive=True, calibration=cal, expr=task.expr, z=args.z,
                       n_trials=args.max_trials, chunk_trials=2, min_trials=2, generator=g)
    record("+ CompLift adaptive", ra.accept, ra.n_evals + cal.rows, {"pilot_rows": cal.rows})
    # the public code's lift on this model: each condition against its own alpha-tempered copy
    rt = tempered_lift(model, x, conds, schedule, n_trials=50, alpha=args.alpha, t_max=args.tempered_t_max,
                       generator=g_tempered)
    record("+ CompLift tempered 50 trials", task.expr.accept(rt.lift), rt.n_evals)
    if args.full:
        r1k = estimate_lift(model, x, conds, null, schedule, n_trials=1000, chunk_trials=250, stratified=False,
                            expr=task.expr, generator=g)
        record("+ CompLift 1000 trials", r1k.accept, r1k.n_evals)
        agree = lambda r: float((r.accept == r1k.accept).float().mean())  # noqa: E731
        for name, r in [("+ CompLift 50 trials", r50), ("+ CompLift cached", rc), ("+ CompLift adaptive", ra)]:
            res["methods"][name]["decision_agreement_with_1000"] = agree(r)
    res["_x"], res["_accept"] = x, ra.accept
    return res


def run(args: argparse.Namespace) -> int:
    """Run the demo under ``args.protocol``; options left at None take that protocol's defaults."""
    from compkern.experiments import demo_public

    if args.protocol not in PROTOCOLS:
        raise ValueError(f"--protocol: unknown protocol {args.protocol!r}; choose from {list(PROTOCOLS)}")
    defaults = demo_public.DEFAULTS if args.protocol == "public" else DEFAULTS
    args = argparse.Namespace(**{**vars(args), **{k: v for k, v in defaults.items() if getattr(args, k, None) is None}})
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return demo_public.run(args) if args.protocol == "public" else _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    model, schedule = train_model(out, steps=args.train_steps, batch_size=args.batch_size, hidden=args.hidden,
                                  depth=args.depth, n_per_class=args.n_per_class, seed=args.seed, progress=progress)
    t_train = time.time() - t_start
    tasks = select_tasks(args.tasks)
    g, g_tempered = torch.Generator().manual_seed(args.seed + 1), torch.Generator().manual_seed(args.seed + 2)
    results = []
    from tqdm.auto import tqdm
    for task in tqdm(tasks, desc="tasks", disable=not progress):
        results.append(run_task(model, schedule, task, args, g, g_tempered))
    methods = demo_report.METHODS + (["+ CompLift 1000 trials"] if args.full else [])
    table, summary = demo_report.table(results, methods)
    print(table)
    print(f"\npaper (Yu & Gao 2025, 2-D average): Composable Diffusion {100 * demo_report.PAPER['composable diffusion']:.1f}% -> "
          f"+ CompLift {100 * demo_report.PAPER['+ CompLift']:.1f}%")
    demo_report.plot(results, out / "samples.png")
    payload = {"config": {k: v for k, v in vars(args).items()}, "paper": demo_report.PAPER, "summary": summary,
               "rows_per_decision": {m: demo_report.rows_per_decision(results, m) for m in methods},
               "tasks": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results],
               "seconds": {"train_or_load": t_train, "total": time.time() - t_start}}
    atomic_write_json(payload, out / "results.json")
    print(f"\nwrote {out / 'samples.png'} and {out / 'results.json'} ({time.time() - t_start:.0f}s)")
    return 0
