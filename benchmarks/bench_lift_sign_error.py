"""Realised sign-error rate of estimate_lift's adaptive stop against its nominal level.

The model: four isotropic Gaussian classes in 2-D (means (+-s, +-s), s = --spread, std 0.5), the null
their mixture, eps in closed form (compkern.lift.exact); a 1000-step linear schedule. x0: --samples
samples of the null drawn by 50-step DDIM (eta = 0, deterministic) with ComposedEps(record=True); the
record feeds the cached rows. The truth: the estimand E_{t~U, eps}[d] by Gauss-Hermite quadrature.

A decision is the sign of one lift (condition k, sample b); each configuration runs --reps times
(fresh generator seeds) on the same x0. A sign is *settled* when the adaptive stop marks it certain
(LiftResult.settled); the nominal level of a run with z (or confidence c) is 1 - Phi(z) (or 1 - c):
the promised bound on P(a settled sign is wrong) for every pair. Reported: realised rate = wrong
settled signs / all decisions, the same among hard decisions (|lift| < --hard), the share settled,
the final sign agreement (settled or not), and model rows per decision.

    python benchmarks/bench_lift_sign_error.py [--samples 250] [--reps 4] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from compkern.lift import calibrate, estimate_lift
from compkern.lift.exact import GaussianClassesEps, cached_true_lift
from compkern.models import NoiseSchedule
from compkern.samplers import ComposedEps, ddim_sample


def settled_of(r) -> torch.Tensor:
    """(K, B) bool: the signs the adaptive stop marked certain."""
    return r.settled


def nominal(kw: dict) -> float:
    if kw.get("confidence") is not None:
        return 1 - kw["confidence"]
    z = 3.0 if kw.get("z") is None else kw["z"]
    return 0.5 * math.erfc(z / math.sqrt(2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=250)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--nodes", type=int, default=10, help="Gauss-Hermite nodes per dimension for the truth")
    ap.add_argument("--spread", type=float, default=1.0)
    ap.add_argument("--hard", type=float, default=0.1, help="|lift| below which a decision counts as hard")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default=None, help="comma-separated substrings of configuration names")
    ap.add_argument("--json", default=None)
    ap.add_argument("--cache", default="runs/bench_cache", help="folder caching the quadrature truth")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sched = NoiseSchedule.ddpm_linear(1000)
    means = args.spread * torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]])
    model = GaussianClassesEps(means, torch.full((4,), 0.5), sched)
    K, B, conds, null = 4, args.samples, [0, 1, 2, 3], model.null_id
    g = torch.Generator().manual_seed(args.seed)
    eps_fn = ComposedEps(model, [null, *conds], torch.zeros(K), record=True, backend="torch")
    x0 = ddim_sample(eps_fn, torch.randn(B, 2, generator=g, dtype=torch.float64), sched, num_steps=50, eta=0.0)
    record = eps_fn.record
    t0 = time.time()
    cache = Path(args.cache) / f"sign_truth_B{B}_seed{args.seed}_nodes{args.nodes}_spread{args.spread}.pt"
    truth = cached_true_lift(model, x0, cache, nodes=args.nodes)
    hard = truth.abs() < args.hard
    print(f"truth by quadrature: {time.time() - t0:.0f}s; {K * B} decisions per rep, {int(hard.sum())} hard "
          f"(|lift| < {args.hard})")
    pilot = ddim_sample(ComposedEps(model, [null, *conds], torch.zeros(K)), torch.randn(64, 2, generator=g, dtype=torch.float64),
                        sched, num_steps=50, eta=1.0, generator=g)
    cal = calibrate(model, pilot, conds, null, sched, n_trials=16, generator=g)

    cfgs = {
        "defaults (z=3, cap 50, chunk 8, min 4)": dict(),
        "defaults + cached (DDIM record)": dict(record=record),
        "confidence=0.99": dict(confidence=0.99),
        "confidence=0.95 + cached": dict(confidence=0.95, record=record),
        "confidence=0.9, chunk 2, min 2, cap 100": dict(confidence=0.9, chunk_trials=2, min_trials=2, n_trials=100),
        "calibrated z=2.5, chunk 2, min 2, cap 200": dict(calibration=cal, z=2.5, chunk_trials=2, min_trials=2, n_trials=200),
        "calibrated z=2, chunk 2, min 2, cap 200, cached": dict(calibration=cal, z=2.0, chunk_trials=2, min_trials=2,
                                                               n_trials=200, record=record),
        "calibrated z=2.5, antithetic, chunk 4, cap 200": dict(calibration=cal, z=2.5, chunk_trials=4, min_trials=4,
                                                              n_trials=200, antithetic=True),
    }
    if args.only:
        keep = args.only.split(",")
        cfgs = {k: v for k, v in cfgs.items() if any(s in k for s in keep)}
    out = []
    print(f"{'configuration':52s} {'nominal':>8s} {'realised':>9s} {'hard':>8s} {'settled':>8s} {'agree':>7s} "
          f"{'rows/dec':>8s} {'time':>6s}")
    for name, kw in cfgs.items():
        wrong = wrong_hard = settled = agree = rows = 0
        t0 = time.time()
        for rep in range(args.reps):
            gr = torch.Generator().manual_seed(1000 * (args.seed + 1) + rep)
            r = estimate_lift(model, x0, conds, null, sched, adaptive=True, generator=gr, **kw)
            s = settled_of(r)
            bad = s & ((r.lift > 0) != (truth > 0))
            wrong += int(bad.sum())
            wrong_hard += int((bad & hard).sum())
            settled += int(s.sum())
            agree += int(((r.lift > 0) == (truth > 0)).sum())
            rows += r.n_evals + (cal.rows if "calibration" in kw else 0)
        n = args.reps * K * B
        row = {"configuration": name, "nominal": nominal(kw), "realised": wrong / n,
               "realised_hard": wrong_hard / max(1, args.reps * int(hard.sum())), "settled": settled / n,
               "agree": agree / n, "rows_per_decision": rows / n, "decisions": n, "wrong": wrong}
        out.append(row)
        print(f"{name:52s} {row['nominal']:8.3%} {row['realised']:9.3%} {row['realised_hard']:8.2%} "
              f"{row['settled']:8.1%} {row['agree']:7.2%} {row['rows_per_decision']:8.1f} {time.time() - t0:5.0f}s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"samples": B, "reps": args.reps, "spread": args.spread, "hard": args.hard,
                       "hard_decisions": int(hard.sum()), "results": out}, fh, indent=2)


if __name__ == "__main__":
    main()
