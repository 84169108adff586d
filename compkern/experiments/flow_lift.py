"""`compkern flow-lift`: CompLift for a flow-matching (rectified-flow) model, checked against the
exact density ratio on 2-D Gaussian classes.

Data: K isotropic Gaussian classes (compkern.lift.exact.GaussianClassesEps, where log p(x | k) -
log p(x) has a closed form). Trains a class-conditional velocity MLP by conditional flow matching
and, as the reference, an eps MLP by the DDPM loss (same data, steps, seed; both resumable in
--out), then scores points drawn from the mixture on two test seeds (the second one never looked
at while choosing settings) with:

    exact-velocity / elbo      compkern.lift.flow on the exact velocity (the estimator alone)
    flow / elbo, flow / uniform  the trained velocity model, likelihood or uniform t weighting
    diffusion / CompLift       the trained eps model, compkern.lift.estimate_lift (uniform t)

reporting the sign agreement with the exact ratio (all pairs, and pairs with |ratio| > 1) and
the mean absolute error of the elbo rows (whose scale is the log ratio). Writes results.json.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from compkern.experiments._args import add_progress, add_seed, add_threads, set_threads
from compkern.lift import estimate_lift
from compkern.lift.exact import GaussianClassesEps
from compkern.lift.flow import GaussianClassesVelocity, flow_lift, sign_agreement
from compkern.models import ConditionalMLP, NoiseSchedule
from compkern.models.flow import FlowVelocityMLP
from compkern.train.denoise import train_eps_model, train_flow_model
from compkern.utils.checkpoint import atomic_write_json


def gaussian_classes(k: int = 4, radius: float = 1.2, std: float = 0.45) -> GaussianClassesEps:
    """K overlapping classes on a ring (their ratios change sign between neighbours)."""
    ang = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
    means = radius * torch.stack([ang.cos(), ang.sin()], 1)
    return GaussianClassesEps(means, torch.full((k,), std, dtype=torch.float64), NoiseSchedule.ddpm_linear())


def sample_classes(classes: GaussianClassesEps, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n points (n, D) fp32 and their class ids (n,) int64."""
    y = torch.multinomial(classes.priors.float(), n, replacement=True, generator=generator)
    x = classes.means[y] + classes.stds[y, None] * torch.randn(n, classes.means.shape[1], generator=generator,
                                                               dtype=torch.float64)
    return x.float(), y


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/flow_lift", help="folder for the two models and results.json")
    p.add_argument("--train-steps", type=int, default=3000)
    p.add_argument("--trials", type=int, default=200, help="lift trials per point and condition")
    p.add_argument("--n", type=int, default=512, help="test points per test seed")
    p.add_argument("--test-seeds", default="1,2", help="comma-separated seeds of the test sets")
    add_seed(p)
    add_threads(p)
    add_progress(p)


def run(args: argparse.Namespace) -> int:
    set_threads(args)
    out = Path(args.out)
    classes = gaussian_classes()
    K = classes.num_classes
    x, y = sample_classes(classes, 20000, torch.Generator().manual_seed(args.seed))
    kw = dict(steps=args.train_steps, seed=args.seed, progress=not args.no_progress)
    flow = FlowVelocityMLP(K)
    train_flow_model(flow, x, y, out / "flow", **kw)
    eps = ConditionalMLP(K)
    schedule = NoiseSchedule.ddpm_linear()
    train_eps_model(eps, x, y, schedule, out / "eps", **kw)
    exact = GaussianClassesVelocity(classes)
    rows = []
    for test_seed in [int(s) for s in args.test_seeds.split(",")]:
        g = torch.Generator().manual_seed(test_seed)
        pts, _ = sample_classes(classes, args.n, g)
        truth = classes.log_density_ratio(pts)
        scorers = {
            "exact-velocity / elbo": lambda: flow_lift(exact, pts, range(K), K, n_trials=args.trials, generator=g).lift,
            "flow / elbo": lambda: flow_lift(flow, pts, range(K), K, n_trials=args.trials, generator=g).lift,
            "flow / uniform": lambda: flow_lift(flow, pts, range(K), K, n_trials=args.trials, weighting="uniform",
                                                generator=g).lift,
            "diffusion / CompLift": lambda: estimate_lift(eps, pts, list(range(K)), K, schedule, n_trials=args.trials,
                                                          generator=g).lift,
        }
        for name, score in scorers.items():
            t0 = time.perf_counter()
            est = score().double()
            row = {"test_seed": test_seed, "scorer": name, "sign_agreement": sign_agreement(est, truth),
                   "sign_agreement_clear": sign_agreement(est, truth, margin=1.0),
                   "mae": float((est - truth).abs().mean()) if "elbo" in name else None,
                   "seconds": time.perf_counter() - t0}
            rows.append(row)
    atomic_write_json({"trials": args.trials, "n": args.n, "train_steps": args.train_steps, "rows": rows},
                      out / "results.json")
    print(f"{'test seed':>9}  {'scorer':<24} {'sign agree':>10} {'|ratio|>1':>9} {'MAE':>7} {'s':>6}")
    for r in rows:
        mae = "" if r["mae"] is None else f"{r['mae']:.3f}"
        print(f"{r['test_seed']:>9}  {r['scorer']:<24} {r['sign_agreement']:>10.3f} {r['sign_agreement_clear']:>9.3f} "
              f"{mae:>7} {r['seconds']:>6.1f}")
    return 0
