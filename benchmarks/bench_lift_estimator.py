"""Lift estimators on a model whose lift is known exactly: sign agreement vs model rows.

The model: four isotropic Gaussian classes in 2-D (means (+-s, +-s), s = --spread, std 0.5), the null being
their mixture, eps in closed form (compkern.lift.exact). x0: 1000 samples drawn from the null by
50-step DDPM with ComposedEps(record=True) (the record feeds the cached estimator). The truth: the
estimand E_{t~U[0,1000), eps}[d] of every estimator, by Gauss-Hermite quadrature over eps at every
t; also reported, agreement with the density ratio log p(x|k) - log p(x).

A decision = the sign of one lift (condition k, sample b). rows/decision = model rows / (K B);
importance proposals are calibrated on a separate pilot batch whose rows are added in.

    python benchmarks/bench_lift_estimator.py [--samples 1000] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from compkern.lift import calibrate, estimate_lift
from compkern.lift.exact import GaussianClassesEps, cached_true_lift
from compkern.models import NoiseSchedule
from compkern.samplers import ComposedEps, ddpm_sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--nodes", type=int, default=10, help="Gauss-Hermite nodes per dimension for the truth")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spread", type=float, default=1.0, help="class means at (+-spread, +-spread), std 0.5")
    ap.add_argument("--json", default=None)
    ap.add_argument("--cache", default="runs/bench_cache", help="folder caching the quadrature truth")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default=None, help="comma-separated method names")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    sched = NoiseSchedule.ddpm_linear(1000)
    means = args.spread * torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]])
    model = GaussianClassesEps(means, torch.full((4,), 0.5), sched)
    K, B = 4, args.samples
    conds, null = [0, 1, 2, 3], model.null_id
    g = torch.Generator().manual_seed(args.seed)

    eps_fn = ComposedEps(model, [null, *conds], torch.zeros(K), record=True, backend="torch")
    x0 = ddpm_sample(eps_fn, torch.randn(B, 2, generator=g), sched, num_steps=50, generator=g)
    record = eps_fn.record
    t0 = time.time()
    cache = Path(args.cache) / f"lift_truth_B{B}_seed{args.seed}_nodes{args.nodes}_spread{args.spread}.pt"
    truth = cached_true_lift(model, x0, cache, nodes=args.nodes).float()
    ratio = model.log_density_ratio(x0).float()
    print(f"truth by quadrature: {time.time() - t0:.0f}s; sign(estimand) == sign(density ratio) on "
          f"{((truth > 0) == (ratio > 0)).float().mean():.2%} of decisions")

    pilot_x = ddpm_sample(ComposedEps(model, [null, *conds], torch.zeros(K)), torch.randn(64, 2, generator=g),
                          sched, num_steps=50, generator=g)
    cal = calibrate(model, pilot_x, conds, null, sched, n_trials=16, generator=g)
    pilot_rows = cal.rows
    print(f"pilot: {pilot_rows} rows on 64 samples = {pilot_rows / (K * B):.2f} rows per decision of this batch")

    def public(n):  # the public code: per condition, the null recomputed on its own rows
        lifts, rows = [], 0
        for k in conds:
            r = estimate_lift(model, x0, [k], null, sched, n_trials=n, chunk_trials=50, stratified=False, generator=g)
            lifts.append(r.lift[0])
            rows += r.n_evals
        return torch.stack(lifts), rows

    def run(extra_rows=0, **kw):
        def f():
            r = estimate_lift(model, x0, conds, null, sched, generator=g, **kw)
            return r.lift, r.n_evals + extra_rows
        return f

    ad = dict(adaptive=True, calibration=cal, chunk_trials=2, min_trials=2)
    methods = {
        "public 50 trials (null per condition)": lambda: public(50),
        "fixed 50, shared null": run(n_trials=50, stratified=False, chunk_trials=50),
        "fixed 1000, shared null": run(n_trials=1000, stratified=False, chunk_trials=250),
        "cached (50 sampler steps, free)": run(n_trials=0, record=record),
        "plain sequential (z=3, uniform t, shared null)": run(n_trials=200, adaptive=True, z=3, chunk_trials=4, stratified=False),
        "adaptive z=2.5, cap 200": run(pilot_rows, n_trials=200, z=2.5, **ad),
        "adaptive z=2.5, cap 48": run(pilot_rows, n_trials=48, z=2.5, **ad),
        "adaptive z=2, cap 200": run(pilot_rows, n_trials=200, z=2.0, **ad),
        "adaptive z=2, cap 32": run(pilot_rows, n_trials=32, z=2.0, **ad),
        "ablation: z=2.5 cap 200, importance t only (no moderation)": run(pilot_rows, n_trials=200, adaptive=True, z=2.5, chunk_trials=2, min_trials=4, t_probs=cal.t_probs),
        "ablation: z=2.5 cap 200, moderated, antithetic eps": run(pilot_rows, n_trials=200, z=2.5, antithetic=True, **ad),
        "ablation: z=2.5 cap 200, moderated, iid t (not stratified)": run(pilot_rows, n_trials=200, z=2.5, stratified=False, **ad),
        "cached + adaptive fresh (z=2.5, cap 48)": run(pilot_rows, n_trials=48, z=2.5, record=record, **ad),
    }
    if args.only:
        keep = args.only.split(",")
        methods = {k: v for k, v in methods.items() if any(s in k for s in keep)}
    rows_out = []
    print(f"{'estimator':55s} {'agree(estimand)':>15s} {'agree(ratio)':>12s} {'rows/decision':>13s} {'time':>6s}")
    for name, f in methods.items():
        t0 = time.time()
        lift, rows = f()
        dt = time.time() - t0
        a_true = ((lift > 0) == (truth > 0)).float().mean().item()
        a_ratio = ((lift > 0) == (ratio > 0)).float().mean().item()
        rpd = rows / (K * B)
        print(f"{name:55s} {a_true:15.2%} {a_ratio:12.2%} {rpd:13.1f} {dt:5.1f}s")
        rows_out.append({"estimator": name, "agree_estimand": a_true, "agree_density_ratio": a_ratio,
                         "rows_per_decision": rpd})
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"samples": B, "spread": args.spread, "K": K, "decisions": K * B, "pilot_rows": pilot_rows, "results": rows_out}, fh, indent=2)


if __name__ == "__main__":
    main()
