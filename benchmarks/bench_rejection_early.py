"""Early rejection in the generic RejectionSampler on the exact 2-D model (benchmarks/RESULTS.md,
"Early rejection in the generic RejectionSampler"): rows per accepted sample, full trajectories vs
early rejection at 0.95 and 0.90, on 4 Gaussian classes whose eps is exact.

    python benchmarks/bench_rejection_early.py [--batches 24] [--batch-size 64]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from compkern.lift import RejectionSampler, parse
from compkern.lift.exact import GaussianClassesEps
from compkern.lift.rejection import complift_functions
from compkern.models import NoiseSchedule


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--check", type=int, default=20)
    ap.add_argument("--pilot", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(1)
    sched = NoiseSchedule.ddpm_linear(1000)
    means = torch.tensor([[1.5, 1.5], [-1.5, 1.5], [-1.5, -1.5], [1.5, -1.5]])
    model = GaussianClassesEps(means, torch.full((4,), 0.7), sched)
    print("| expression | setting | accepted / generated | stopped early | rows per accepted | s |")
    print("|---|---|---|---|---|---|")
    for src in ["c0 AND NOT c1", "c0 OR c1"]:
        expr = parse(src)
        gen, score = complift_functions(model, sched, expr, [0, 1], model.null_id, (2,), num_steps=args.steps, n_trials=32)
        out = tempfile.mkdtemp()
        for name, early in [("full", {}), ("0.95", {"early_reject": 0.95}), ("0.90", {"early_reject": 0.9})]:
            if early:
                early.update(checks=(args.check,), pilot=args.pilot)
            t0 = time.time()
            r = RejectionSampler(f"{out}/{name}", gen, score, config={"expr": src}, batch_size=args.batch_size,
                                 progress=False, **early).run(10 ** 9, max_batches=args.batches)
            print(f"| {src} | {name} | {r.n_accepted} / {r.n_generated} | {r.n_stopped} | {r.rows_per_accepted:.1f} | "
                  f"{time.time() - t0:.1f} |")


if __name__ == "__main__":
    main()
