"""`compkern eval`: score composition methods on generated suites with a local detector.

    compkern eval --model runs/world/base/model --scorer shapes:runs/world --suites geneval,not,or,three \\
        --methods none,composable,complift,perp --out runs/eval --threads 1
    compkern eval --model SD_FOLDER --scorer owl:OWLV2_FOLDER --color-scorer clip:CLIP_FOLDER --suites geneval,not
    torchrun --nproc-per-node 4 -m compkern.cli eval --num-images 16 ...   # cells dealt round-robin to the ranks

The suites are written to OUT/suites.jsonl (or read from --prompts FILE); a rerun with the same
settings resumes, other settings are refused. Library: ``compkern.eval`` (suites, scorers,
rules, harness).
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from compkern.experiments._args import add_batch_size, add_progress, add_sample_steps, add_seed, add_threads, set_threads

SCORERS = ("shapes", "owl")


def build_scorer(spec: str, model: Path, *, threshold: float | None, counting_threshold: float | None,
                 color: str | None, device):
    """--scorer 'shapes[:DIR]' (DIR/detector.pt; default the `compkern sepen train` folder two
    levels above --model) or 'owl:DIR' (OWLv2 / OWL-ViT); --color-scorer 'clip:DIR'."""
    from compkern.eval import scorers as S

    kind, _, path = spec.partition(":")
    if kind not in SCORERS:
        raise ValueError(f"--scorer must be 'shapes[:DIR]' or 'owl:DIR', got {spec!r}")
    if kind == "shapes":
        scorer = S.ShapesScorer.from_folder(path or model.parent.parent, threshold)
    else:
        if not path:
            raise ValueError("--scorer owl:DIR needs the folder of an OWLv2 / OWL-ViT model and its processor")
        kw = {} if threshold is None else {"threshold": threshold}
        scorer = S.OwlScorer(path, counting_threshold=counting_threshold, device=device, **kw)
    if color:
        ckind, _, cpath = color.partition(":")
        if ckind != "clip" or not cpath:
            raise ValueError(f"--color-scorer must be 'clip:DIR', got {color!r}")
        scorer = S.ClipColorScorer(scorer, cpath, device=device)
    return scorer


def vocabulary(args: argparse.Namespace):
    from compkern.eval import suites as SU

    if args.classes:
        p = Path(args.classes)
        names = [x.strip() for x in (p.read_text().splitlines() if p.is_file() else args.classes.split(","))]
        return SU.Vocabulary(tuple(x for x in names if x))
    return SU.shapes_vocabulary() if args.scorer.partition(":")[0] == "shapes" else SU.Vocabulary(SU.COCO_CLASSES)


def run(args: argparse.Namespace) -> int:
    import torch

    from compkern.eval import harness as H
    from compkern.eval import suites as SU
    from compkern.pipelines.generate import Distributed, resolve_device
    from compkern.utils.run_folder import RunFolder

    set_threads(args)
    methods = H.check_methods(args.methods)
    model = Path(args.model)
    if not ((model / "unet").is_dir() or (model / "transformer").is_dir()):
        raise ValueError(f"--model {args.model}: not a diffusers folder with a unet/ or transformer/ subfolder")
    vocab = vocabulary(args)
    rows = SU.load_prompts(args.prompts, vocab) if args.prompts else SU.make_suites(args.suites, vocab, args.n_prompts,
                                                                                  args.seed)
    opts = H.EvalOptions(model=str(model.resolve()), n=args.n, seed=args.seed, steps=args.sample_steps,
                         guidance=args.guidance, eta=args.eta, batch_size=args.batch_size)
    import os

    device = resolve_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
    scorer = build_scorer(args.scorer, model, threshold=args.threshold, counting_threshold=args.counting_threshold,
                          color=args.color_scorer, device=device)
    text = SU.dumps_jsonl(rows)
    cfg = {**{k: getattr(opts, k) for k in ("model", "n", "seed", "steps", "guidance", "eta", "batch_size")},
           "scorer": args.scorer, "color_scorer": args.color_scorer, "threshold": scorer.threshold,
           "counting_threshold": scorer.counting_threshold, "suites_sha256": hashlib.sha256(text.encode()).hexdigest()}
    dist = Distributed(device)
    try:
        if dist.rank == 0:
            folder = RunFolder(args.out, cfg, what="evaluation")
            SU.write_jsonl(rows, folder.file("suites.jsonl"))
        dist.barrier()
        folder = RunFolder(args.out, cfg, what="evaluation", write=False)
        from compkern.pipelines.composition import CompositionPipeline

        dtype = "fp32" if device.type == "cpu" else args.dtype
        pipe = CompositionPipeline.from_pretrained(model, dtype=dtype, device=device)
        with torch.no_grad():
            H.run(pipe, scorer, rows, methods, opts, folder, dist=dist, progress=not args.no_progress)
        if dist.rank == 0:
            print(H.report(folder))
    finally:
        dist.close()
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    from compkern.eval.harness import METHODS
    from compkern.eval.suites import SUITES

    p.add_argument("--model", required=True, help="diffusers text-to-image folder (e.g. runs/world/base/model)")
    p.add_argument("--suites", default="geneval,not,or",
                   help=f"comma-separated suites: {','.join(SUITES)} (geneval: the tasks the vocabulary can write)")
    p.add_argument("--prompts", default=None, help="a prompt file instead of --suites: JSONL rows (GenEval's "
                   "evaluation_metadata.jsonl works) or one expression a line ('a photo of a dog AND NOT a photo of a cat')")
    p.add_argument("--methods", default="none,composable,complift,perp", help=f"comma-separated: {','.join(METHODS)}")
    p.add_argument("--scorer", default="shapes", help="shapes[:DIR] (the shapes world's detector) or owl:DIR "
                   "(OWLv2 / OWL-ViT, local folder)")
    p.add_argument("--color-scorer", default=None, help="clip:DIR: CLIP zero-shot colors of the detections")
    p.add_argument("--classes", default=None, help="object classes: a file (one a line) or a comma list "
                   "(default: the shapes world's objects for --scorer shapes, GenEval's 80 COCO classes otherwise)")
    p.add_argument("--threshold", type=float, default=None, help="detection score threshold (default: the scorer's)")
    p.add_argument("--counting-threshold", type=float, default=None, help="threshold on counting prompts")
    p.add_argument("--n-prompts", type=int, default=4, help="prompts per task of each suite")
    p.add_argument("--n", "--num-images", dest="n", type=int, default=16,
                   help="images per prompt and method (seeds --seed .. --seed + n - 1); under torchrun write --num-images "
                   "(torchrun reads --n as its own --nnodes)")
    add_sample_steps(p, 50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--eta", type=float, default=0.0, help="0: DDIM, 1: ancestral DDPM")
    add_batch_size(p, 8, "images per generation batch")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="fp16", help="on an accelerator (fp32 on the CPU)")
    p.add_argument("--out", default="runs/eval", help="run folder (resumable)")
    add_seed(p)
    add_threads(p)
    add_progress(p)
