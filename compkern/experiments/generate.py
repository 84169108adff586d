"""`compkern generate`: composed Stable Diffusion generation with CompLift rejection, streamed
into a resumable output folder, on one process or under ``torchrun --nproc-per-node N``.

    compkern generate --model PATH --prompt "a black car AND a white clock" --n 100 --out DIR
    torchrun --nproc-per-node 8 -m compkern.cli generate --model PATH --prompt "..." --num-images 100 --out DIR

The argument parsing of ``compkern.pipelines.generate.generate`` (batches, seeds, scoring, shards,
resume and the distributed protocol are described there).
"""
from __future__ import annotations

import argparse
import json

from compkern.experiments._args import add_progress, add_sample_steps, set_threads
from compkern.pipelines import early_reject as ER
from compkern.pipelines import lift_maps as LM
from compkern.pipelines.composition import GENERATE_MODES, SCHEDULERS
from compkern.pipelines.generate import LIFTS, GenerateOptions, generate


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local diffusers folder: SD 1.x, 2.x, XL, or a pixel-space "
                   "text-to-image model without vae/ (e.g. `compkern sepen train`'s base/model)")
    p.add_argument("--prompt", required=True, help='expression of component prompts, e.g. "a black car AND a white clock AND NOT a dog"')
    p.add_argument("--n", "--num-images", dest="n", type=int, default=100,
                   help="accepted images wanted (global, over all ranks); under torchrun write --num-images "
                        "(torchrun's own parser takes --n for a prefix of --nnodes / --nproc-per-node)")
    p.add_argument("--out", required=True, help="output folder (resumable)")
    p.add_argument("--batch-size", type=int, default=4, help="images per batch (each rank)")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"], help="model dtype (fp32 on CPU recommended)")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda, cuda:N")
    add_sample_steps(p, 50, "sampling (DDIM / DDPM) steps", dest="steps")
    p.add_argument("--guidance", type=float, default=7.5, help="guidance scale of every component")
    p.add_argument("--negative-prompt", default="", help="base condition (row 0)")
    p.add_argument("--eta", type=float, default=0.0, help="0: DDIM, 1: DDPM")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--generate", default="joint", choices=list(GENERATE_MODES),
                   help="joint: guidance on the joint caption of the required components (\"a cat and a dog\"), the "
                        "other components composed; composed: Composable Diffusion over every component")
    p.add_argument("--negation", default="linear", choices=["linear", "perp"],
                   help="how a NOT term guides: linear (a negative weight, Composable Diffusion) or perp "
                        "(perpendicular negation, Perp-Neg: only the part of its direction off the positive one)")
    p.add_argument("--scheduler", default=None, choices=["folder", *SCHEDULERS],
                   help="sample through a diffusers scheduler built from the folder's scheduler config (dpm++: "
                        "DPM-Solver++ at 20-25 steps, euler, unipc, ...; folder: the folder's own class); default: "
                        "compkern's DDIM / DDPM (--eta), the sampler --early-reject needs")
    p.add_argument("--lift", default="auto", choices=list(LIFTS),
                   help="auto (default): cached where the target is the joint caption (a pure AND), public with "
                        "--trials otherwise; "
                        "cached: the sampling run's predictions (no extra UNet row); fresh: compkern.lift.estimate_lift "
                        "on the final latents (noise target); public: CompLift's public scorer, --trials evenly spaced "
                        "fresh trials with a fixed noise bank; none: accept everything")
    p.add_argument("--target", default="auto", choices=list(LM.TARGETS),
                   help="target of cached / public trials: auto (default: joint for a pure AND of two or more "
                        "components, noise otherwise), term (joint for the components every accepted image needs, "
                        "noise for NOT / OR terms), the joint caption's prediction (recorded as one more condition "
                        "row), the noise (recovered from x_t and the final latents), or the composed prediction "
                        "(comparison only: NOT can never fail)")
    p.add_argument("--record-every", type=int, default=None,
                   help="cached: keep every k-th sampling step as a trial (the component rows are evaluated only "
                        "there); default 2 where the target is the joint caption (as good as every step in "
                        "`compkern main-job`), else 1 (the noise target needs every step)")
    rules = {t: LM.default_rule(t, "cached") for t in LM.DEFAULT_RULES} | {"noise on fresh/public trials": LM.SAMPLED_NOISE_RULE}
    p.add_argument("--threshold", type=float, default=None,
                   help=f"pixel lift threshold (default per target: {', '.join(f'{t} {r[0]:g}' for t, r in rules.items())})")
    p.add_argument("--min-pixels", type=float, default=None,
                   help="latent pixels above threshold for a component to count as present (below 1: a fraction; "
                        f"default per target: {', '.join(f'{t} {r[1]:g}' for t, r in rules.items())})")
    p.add_argument("--trials", type=int, default=LM.FIXED_TRIALS,
                   help="fresh / public trials per image (fresh with --rule mean: the most the adaptive estimator may spend)")
    p.add_argument("--rule", default="pixels", choices=["pixels", "mean"], help="object rule, or the mean-lift sign")
    p.add_argument("--chunk-size", type=lambda v: v if v == "auto" else int(v), default="auto",
                   help="max UNet rows per call; auto (default): all (K+1) x B, halved on out-of-memory")
    p.add_argument("--max-attempts", type=int, default=None, help="stop after this many images (default 20 x n)")
    p.add_argument("--save-rejected", action="store_true", help="also write rejected images and their maps")
    p.add_argument("--early-reject", type=float, default=None, metavar="CONFIDENCE",
                   help="stop sampling an image whose partial lift after --early-check of the steps says it will be rejected; "
                        "a finally-accepted image survives with probability >= CONFIDENCE (in (0.5, 1]), the rule "
                        "calibrated on the first --pilot images (sampled to the end); default off")
    p.add_argument("--pilot", type=int, default=64, help="--early-reject: images sampled in full to calibrate the rule")
    p.add_argument("--early-check", type=float, default=ER.CHECK_AT,
                   help="--early-reject: the check, a fraction of the steps (default %(default)s)")
    p.add_argument("--no-overlays", action="store_true", help="do not write lift-map overlay PNGs")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    add_progress(p)


def run(args: argparse.Namespace) -> int:
    set_threads(args)
    m = generate(GenerateOptions.from_namespace(args))
    if m is not None:
        print(json.dumps({k: m[k] for k in ("n_accepted", "attempted", "acceptance_rate", "unet_rows",
                                            "unet_rows_per_accepted", "complete")}))
    return 0
