"""Probe behind `--early-reject`: how well does the partial margin after s of 50 steps predict the
final decision of `compkern generate`'s default scorer, on the main job's trained shapes world?

For each prompt of a main-job suite, 24 candidates are generated with every step recorded; the
final decision is the default scorer's (a pure AND: the joint caption's cached maps, every other
step; otherwise 100 fixed noise trials); the partial margin at s is ``early_reject.partial_maps``
at s (the steps before s), for s = 10, 20, 30, 40. Printed per s: the AUC of the margin for the
final decision and for the detector's truth, and, at the threshold that keeps 95% of the finally
accepted candidates (in-sample, so optimistic), the share of finally rejected ones it would stop.

    python benchmarks/probe_early_reject.py --world runs/world --suite not_filter --seed 8000
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from compkern.experiments.main_job import judge, open_world, suite_prompts
from compkern.pipelines import lift_maps as LM
from compkern.pipelines.composition import CompositionPipeline, parse_composition
from compkern.pipelines.early_reject import partial_margins
from compkern.train.sepen import load_detector

CHECKS = (10, 20, 30, 40)


def auc(score: torch.Tensor, y: torch.Tensor) -> float:
    pos, neg = score[y], score[~y]
    if not len(pos) or not len(neg):
        return float("nan")
    return float((pos[:, None] > neg[None]).float().mean() + 0.5 * (pos[:, None] == neg[None]).float().mean())


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", default="runs/world")
    p.add_argument("--suite", default="not_filter")
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--seed", type=int, default=8000)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    world_dir, model, world = open_world(args.world)
    pipe = CompositionPipeline.from_pretrained(model)
    detector = load_detector(Path(world_dir))
    margins, final, truth = [], [], []
    for expr, objs in suite_prompts(world, args.suite, args.prompts):
        comp = parse_composition(expr)
        res = pipe(comp, seeds=list(range(args.seed, args.seed + args.n)), num_inference_steps=50, guidance_scale=3.0,
                   eta=1.0, output_type="latent", record=True, record_joint=comp.joint is not None)
        signs = torch.tensor(comp.signs)
        if LM.resolve_target("auto", comp.expression.required(), comp.K) == "joint":
            maps = LM.cached_lift_maps(res.record, signs, target="joint", joint_row=comp.joint_row, steps=slice(0, None, 2))
        else:
            maps = LM.fixed_lift_maps(pipe, res.latents, pipe.encode(comp.condition_prompts(with_joint=False)), signs,
                                      n_trials=LM.FIXED_TRIALS, seed=0, target="noise")
        final.append(LM.accept(comp, maps))
        truth.append(judge(detector, res.latents, objs, comp.expression)[0])
        margins.append(partial_margins(comp, res.record, CHECKS, schedule=pipe.schedule, weights=res.weights,
                                       clip_x0=1.0 if pipe.vae is None else None))
        print(f"{expr}: accepted {int(final[-1].sum())}/{args.n}, satisfied {int(truth[-1].sum())}", flush=True)
    m, f, y = torch.cat(margins, 1), torch.cat(final), torch.cat(truth)
    print(f"\n{args.suite}, seeds {args.seed}..: finally accepted {int(f.sum())} of {len(f)}")
    print("| step s of 50 | AUC (final decision) | AUC (detector truth) | rejects stopped at 95% of accepts kept |")
    print("|---|---|---|---|")
    for i, s in enumerate(CHECKS):
        tau = torch.quantile(m[i, f], 0.05) if f.any() else float("nan")
        stop = m[i] < tau
        print(f"| {s} | {auc(m[i], f):.3f} | {auc(m[i], y):.3f} | {int((stop & ~f).sum())}/{int((~f).sum())} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
