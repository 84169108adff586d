"""Upper bound for `compkern demo`: the same Composable Diffusion samples filtered by the EXACT
density-ratio lift log p_c(x) - log p_background(x) (true component densities) instead of the
model's diffusion lift. Separates the lift estimate's limits from the generator's.

    python benchmarks/demo_exact_lift_bound.py compkern_demo    # a folder made by `compkern demo`
"""
from __future__ import annotations

import math
import sys

import torch

from compkern.lift import tasks2d
from compkern.models import NoiseSchedule
from compkern.models.mlp import ConditionalMLP
from compkern.samplers import ComposedEps, ddim_sample
from compkern.utils.checkpoint import load


def main(folder: str, n: int = 1000, hidden: int = 64, depth: int = 3) -> None:
    torch.set_num_threads(1)
    model = ConditionalMLP(12, hidden=hidden, depth=depth)
    model.load_state_dict(load(f"{folder}/model/checkpoint.pt")["modules"]["model"])
    model.eval()
    sched = NoiseSchedule.ddpm_linear(1000)
    comps, bg = tasks2d.complift_components(), tasks2d.background()
    g = torch.Generator().manual_seed(1)
    cd, ex = [], []
    for task in tasks2d.complift_tasks():
        with torch.no_grad():
            w = task.expr.sample_weights(n, g)
            x = ddim_sample(ComposedEps(model, [tasks2d.BACKGROUND_ID, *task.classes], w), torch.randn(n, 2, generator=g),
                            sched, num_steps=50, eta=1.0, generator=g)
        lift = torch.stack([comps[c].log_prob(x.double()) - bg.log_prob(x.double()) for c in task.classes]).float()
        keep = task.expr.accept(lift)
        cd.append(tasks2d.accuracy(task, x, n))
        ex.append(tasks2d.accuracy(task, x[keep], n))
        print(f"{task.name:12s} Composable Diffusion {100 * cd[-1]:5.1f}%   + exact-lift rejection {100 * ex[-1]:5.1f}% "
              f"(kept {100 * keep.float().mean():.0f}%)")
    ok = [v for v in ex if not math.isnan(v)]
    print(f"mean: Composable Diffusion {100 * sum(cd) / len(cd):.1f}%   + exact-lift rejection {100 * sum(ok) / len(ok):.1f}%")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "compkern_demo")
