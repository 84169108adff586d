"""`compkern sepen train|finetune|sample|eval|report|figure`: Separate-and-Enhance on the procedural shapes world.

    compkern sepen train    --out runs/sepen            # base text-to-image model + detector
    compkern sepen finetune --out runs/sepen --name ft  # SepEn: attn2.to_k only, on held-out pairs
    compkern sepen eval     --out runs/sepen --model base|ft:<name>|tta  # success rates (JSON + table)
    compkern sepen report   --out runs/sepen            # every eval of the folder as one markdown table
    compkern sepen sample   --out runs/sepen --model ft:ft --prompt "a red square and a green ring"

Everything lives under --out: world.json (the world's pair fraction, split and naming, written
by `train` and read by every later action), base/ (the Trainer folder of the base model),
base/model/ (its Stable-Diffusion-style save_pretrained folder: unet/ text_encoder/ tokenizer/
scheduler/), detector.pt, finetune-<name>/ (Trainer folder + model/), eval-<model>-seed<seed>.json.

The library side (base training, the run folder's readers, sampling, scoring, finetuning) is
``compkern.train.sepen``; the models are ``compkern.models.shapes`` and ``compkern.models.detector``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from compkern.data import shapes
from compkern.experiments._args import add_progress, add_sample_steps, add_threads, add_train_steps
from compkern.models.detector import OUTCOMES, ShapeDetector, score_samples
from compkern.models.shapes import build_components
from compkern.models.unet import SDComponents
from compkern.train.detector import train_detector
from compkern.train.sepen import (PROMPT_SETS, export_base, finetune, load_detector, load_model, load_world, noun_maps,
                                  sample, success_rates, train_base)
from compkern.utils.run_folder import RunFolder

# -- figures and reports (presentation of a run folder) ----------------------------------------

def figure(out: Path, world: shapes.ShapesWorld, models: dict[str, tuple[SDComponents, dict | None]], path: Path, *,
           n_prompts: int = 4, n_candidates: int = 16, detector: ShapeDetector | None = None, seed: int = 0,
           steps: int = 50, guidance: float = 3.0, backend: str = "auto") -> None:
    """docs PNG: for held-out prompts, one sample per model (the same initial noise for every
    model) and its two noun maps. With a detector, each prompt shows the first of ``n_candidates``
    seeds on which the first model failed (if any), and every sample is titled with its outcome."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompts = world.held_out_prompts()[::max(1, len(world.held_out_prompts()) // n_prompts)][:n_prompts]
    n = n_candidates if detector is not None else 1
    cols, pick = [], None
    for name, (parts, tta) in models.items():
        imgs, rows = sample(parts, world, prompts, n=n, seed=seed, steps=steps, guidance=guidance, tta=tta,
                            backend=backend)
        outcome = [""] * len(rows)
        if detector is not None:
            r = score_samples(detector, imgs, rows)
            outcome = [next(k for k in OUTCOMES if r[k][i]).split("_")[0] for i in range(len(rows))]
        if pick is None:  # per prompt: its first candidate on which the first model failed, else candidate 0
            failed = [o not in ("", "success") for o in outcome]
            pick = [next((i * n + c for c in range(n) if failed[i * n + c]), i * n) for i in range(len(prompts))]
        imgs, rows = imgs[pick], [rows[i] for i in pick]
        cols.append((name, imgs, noun_maps(parts, world, imgs, rows, backend=backend), [outcome[i] for i in pick]))
    fig, axes = plt.subplots(len(prompts), 3 * len(cols), figsize=(1.6 * 3 * len(cols), 1.8 * len(prompts)))
    for i, p in enumerate(prompts):
        words = world.object_tokens(p)
        for j, (name, imgs, maps, outcome) in enumerate(cols):
            ax = axes[i, 3 * j]
            ax.imshow(((imgs[i].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_title((name + "\n" if i == 0 else "") + outcome[i], fontsize=7)
            if j == 0:
                ax.set_ylabel(world.caption(p).replace(" and ", "\nand "), fontsize=7)
            for k in range(2):
                a = axes[i, 3 * j + 1 + k]
                a.imshow(maps[i, k].numpy(), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
                a.set_title(f"'{words[k]}'", fontsize=7)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    which = f"per row the first of {n} seeds on which {next(iter(models))} failed, if any" if detector is not None else "seed 0"
    fig.suptitle(f"SepEn on held-out pairs ({which}; same noise per row): sample (detector verdict), then the "
                 f"cross-attention map (8x8) of each noun", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(out: Path) -> str:
    """Every eval-*.json of a run folder as one markdown table: success on each prompt set, and for
    the pair sets the failure split and the detection rate of the first / second object named."""
    sets = list(PROMPT_SETS)
    head = ["model", "seed"] + [c for name in sets for c in
                                ([name] if name == "single" else [name, f"{name} missing / swapped", f"{name} 1st / 2nd"])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for path in sorted(out.glob("eval-*.json")):
        r = json.loads(path.read_text())
        tta = next((r[k]["settings"]["tta"] for k in sets if "settings" in r.get(k, {})), r.get("tta"))
        row = [r["model"] + (f" (step {tta['step_size']:g})" if tta else ""), str(r["seed"])]
        for name in sets:
            e = r.get(name)
            cells = 1 if name == "single" else 3
            if e is None:
                row += ["-"] * cells
                continue
            row.append(f"{e['success']:.3f} (n={e['n']})")
            if cells == 3:
                row.append(f"{e['missing']:.3f} / {e['swapped_or_duplicated']:.3f}")
                pos = e.get("detected_by_position")
                row.append(" / ".join(f"{v:.2f}" for v in pos) if pos else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def save_grid(images: torch.Tensor, rows: list[tuple[int, ...]], path: Path, *, n_cols: int,
              world: shapes.ShapesWorld) -> None:
    """images (B, 3, 16, 16) -> a PNG grid, one row per prompt (labelled)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows = (len(rows) + n_cols - 1) // n_cols
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(0.9 * n_cols + 1.5, 0.9 * n_rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i < len(rows):
            ax.imshow(((images[i].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy(), interpolation="nearest")
            if i % n_cols == 0:
                ax.set_ylabel(world.caption(rows[i]), fontsize=6, rotation=0, ha="right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- CLI ----------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["train", "finetune", "sample", "eval", "report", "figure"])
    p.add_argument("--out", default="runs/sepen", help="run folder (default runs/sepen)")
    add_threads(p)
    p.add_argument("--seed", type=int, default=0)
    add_train_steps(p, None, "train: base steps (4000); finetune: SepEn steps (200)", dest="steps")
    p.add_argument("--what", choices=["base", "detector", "all", "export"], default="all",
                   help="train: which part (export: write the latest base checkpoint's EMA as base/model)")
    p.add_argument("--pair-fraction", type=float, default=0.1, help="train: share of two-object scenes")
    p.add_argument("--extra-fraction", type=float, default=0.0,
                   help="train: share of single-object scenes that also hold their uncaptioned companion object")
    p.add_argument("--naming", choices=shapes.NAMINGS, default="attributes",
                   help="train: captions 'a red square and a blue ring' (attributes) or 'a red_square and a blue_ring' "
                        "(nouns: one word per object)")
    p.add_argument("--name", default="ft", help="finetune: run name (out/finetune-<name>)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--w-sep", type=float, default=1.0)
    p.add_argument("--w-en", type=float, default=0.5)
    p.add_argument("--w-norm", type=float, default=0.5)
    p.add_argument("--prompt-set", choices=list(PROMPT_SETS), default="heldout", help="finetune: training prompts")
    p.add_argument("--t-min", type=int, default=0, help="finetune: smallest t of the attention-loss inputs (0: all t, "
                                                       "as the public code)")
    p.add_argument("--latents", choices=["random", "samples"], default="random",
                   help="finetune: attention-loss inputs are noised random latents (the public code) or noised "
                        "frozen-model samples of the training prompts")
    p.add_argument("--model", default="base", help="eval/sample: base | tta | ft:<name>")
    p.add_argument("--sets", default="heldout,seen,single", help="eval: prompt sets")
    p.add_argument("--n", type=int, default=16, help="eval/sample: samples per prompt")
    add_sample_steps(p, 50, "eval/sample/figure: sampling steps", old=())
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--eta", type=float, default=1.0, help="1: ancestral DDPM, 0: DDIM")
    p.add_argument("--no-clip", action="store_true", help="do not clip the predicted x0 to [-1, 1]")
    p.add_argument("--tta-step", type=float, default=1.0, help="tta: guidance step size")
    p.add_argument("--tta-t-stop", type=int, default=500, help="tta: guide while t >= this")
    p.add_argument("--prompt", default=None, help="sample: a caption such as 'a red square and a green ring'")
    p.add_argument("--png", default=None, help="sample/figure: output PNG")
    p.add_argument("--backend", default="auto", help="attention op backend (auto, torch, cpp, triton)")
    add_progress(p)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    world = shapes.ShapesWorld(pair_fraction=args.pair_fraction, naming=args.naming, extra_fraction=args.extra_fraction)
    if args.action == "train" and args.what in ("base", "all"):
        saved = load_world(out, world)
        if saved != world:
            raise ValueError(f"{out} holds a run of another world ({saved.to_dict()}); pick another --out")
        folder = RunFolder(out, world.to_dict(), keys=(), config_file="world.json")  # checked above (older world.json lack keys)
    else:
        world = load_world(out, world)
        folder = RunFolder(out)
    progress = not args.no_progress
    clip = None if args.no_clip else 1.0
    tta = {"step_size": args.tta_step, "t_stop": args.tta_t_stop}
    if args.action == "train":
        if args.what == "export":
            print(f"exported {export_base(out, world)}")
            return 0
        if args.what in ("base", "all"):
            parts = build_components(seed=args.seed, naming=world.naming)
            t0 = time.time()
            train_base(parts, world, out / "base", steps=args.steps or 4000, seed=args.seed, progress=progress)
            print(f"base model: {out / 'base' / 'model'} ({time.time() - t0:.0f} s)")
        if args.what in ("detector", "all"):
            t0 = time.time()
            det, acc = train_detector(seed=args.seed, progress=progress)
            folder.save("detector.pt", {"state_dict": det.state_dict(), "accuracy": acc})
            print(f"detector: {out / 'detector.pt'} held-out accuracy {acc} ({time.time() - t0:.0f} s)")
        return 0
    if args.action == "finetune":
        parts = load_model(out, "base")
        t0 = time.time()
        hist = finetune(parts, world, out / f"finetune-{args.name}", steps=args.steps or 200, lr=args.lr,
                        w_sep=args.w_sep, w_en=args.w_en, w_norm=args.w_norm, seed=args.seed,
                        prompt_set=args.prompt_set, t_min=args.t_min, latents=args.latents, backend=args.backend,
                        progress=progress)
        print(f"finetuned ({time.time() - t0:.0f} s): first {hist[0]} last {hist[-1]}")
        return 0
    if args.action == "eval":
        det = load_detector(out)
        parts = load_model(out, args.model)
        sets = args.sets.split(",")
        if not sets or any(name not in PROMPT_SETS for name in sets):
            raise ValueError(f"--sets must be a comma-separated list of {list(PROMPT_SETS)}, got {args.sets!r}")
        settings = {"n_per_prompt": args.n, "sample_steps": args.sample_steps, "guidance": args.guidance,
                    "eta": args.eta, "clip_x0": clip, "tta": tta if args.model == "tta" else None}
        tag = args.model.replace(":", "-") + (f"-s{args.tta_step:g}" if args.model == "tta" else "") + f"-seed{args.seed}"
        results_file = f"eval-{tag}.json"
        # one file per (model, seed): sets evaluated earlier stay, each with the settings it ran with
        results = folder.read_json(results_file, {})
        results.update({"model": args.model, "seed": args.seed})
        for name in sets:
            t0 = time.time()
            imgs, rows = sample(parts, world, PROMPT_SETS[name](world), n=args.n, seed=args.seed, steps=args.sample_steps,
                                guidance=args.guidance, clip_x0=clip, eta=args.eta,
                                tta=settings["tta"], backend=args.backend, progress=progress)
            r = results[name] = {**success_rates(det, world, imgs, rows), "settings": settings}
            folder.write_json(results_file, results)
            print(f"{args.model:>12s} {name:>8s}: success {r['success']:.3f}  missing {r['missing']:.3f}  "
                  f"swapped/dup {r['swapped_or_duplicated']:.3f}  detected by position "
                  f"{[round(v, 3) for v in r['detected_by_position']]}  (n={r['n']}, {time.time() - t0:.0f} s)")
        return 0
    if args.action == "sample":
        parts = load_model(out, args.model)
        prompts = [shapes.parse_caption(args.prompt, world.naming)] if args.prompt else world.held_out_prompts()
        imgs, rows = sample(parts, world, prompts, n=args.n, seed=args.seed, steps=args.sample_steps, guidance=args.guidance,
                            clip_x0=clip, eta=args.eta, tta=tta if args.model == "tta" else None, backend=args.backend)
        if (out / "detector.pt").exists():
            r = success_rates(load_detector(out), world, imgs, rows)
            print(f"success {r['success']:.3f} missing {r['missing']:.3f} swapped/dup {r['swapped_or_duplicated']:.3f}")
        png = Path(args.png or out / f"samples-{args.model.replace(':', '-')}.png")
        save_grid(imgs, rows, png, n_cols=args.n, world=world)
        print(f"wrote {png}")
        return 0
    if args.action == "report":
        print(report(out))
        return 0
    if args.action == "figure":
        models = {"base": (load_model(out, "base"), None), f"SepEn ft ({args.name})": (load_model(out, args.name), None),
                  "SepEn TTA": (load_model(out, "base"), tta)}
        det = load_detector(out) if (out / "detector.pt").exists() else None
        figure(out, world, models, Path(args.png or "docs/sepen.png"), detector=det, seed=args.seed,
               steps=args.sample_steps, guidance=args.guidance, backend=args.backend)
        print(f"wrote {args.png or 'docs/sepen.png'}")
        return 0
    raise ValueError(args.action)
