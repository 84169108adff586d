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
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from compkern.data import shapes
from compkern.models.schedule import NoiseSchedule
from compkern.models.unet import SDComponents, UNetEps
from compkern.train.loop import Trainer
from compkern.utils.checkpoint import atomic_save, atomic_write_json, load

UNET_CONFIG = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                   cross_attention_dim=64, attention_head_dim=2, norm_num_groups=8)
"""1.0M parameters; cross-attention only at 8x8 (down, mid, up: 4 attn2 layers), 2 heads of 32."""


def build_components(unet_config: dict | None = None, *, seed: int = 0, prediction_type: str = "v_prediction",
                     text_dim: int | None = None, naming: str = "attributes") -> SDComponents:
    """A fresh (random) tiny text-to-image model of the shapes world, in Stable Diffusion layout."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    cfg = dict(UNET_CONFIG if unet_config is None else unet_config)
    tokenizer = shapes.build_tokenizer(naming=naming)
    text_encoder = shapes.build_text_encoder(tokenizer, hidden_size=text_dim or cfg["cross_attention_dim"], seed=seed + 1)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type,
                              clip_sample=False)
    return SDComponents(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)


class CaptionCache:
    """Encoder states of a fixed set of captions, computed once (the text encoder is frozen)."""

    def __init__(self, parts: SDComponents, captions: list[str]):
        self.index = {c: i for i, c in enumerate(dict.fromkeys(captions))}
        self.states = parts.encode(list(self.index))

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in captions if c not in self.index]
        if missing:
            raise KeyError(f"captions not in the cache: {missing[:3]}")
        return self.states[torch.tensor([self.index[c] for c in captions])]


def train_base(parts: SDComponents, world: shapes.ShapesWorld, out_dir: Path, *, steps: int, batch: int = 32,
               lr: float = 1e-3, cond_drop: float = 0.1, ema_decay: float = 0.999, seed: int = 0,
               save_every: int = 250, progress: bool = True) -> SDComponents:
    """Denoising training of parts.unet on world.sample_batch (caption dropout ``cond_drop``); keeps
    an EMA copy, resumes from out_dir, and writes the EMA model with save_pretrained to out_dir/model."""
    import copy

    unet = parts.unet
    unet.requires_grad_(True)
    ema = copy.deepcopy(unet).requires_grad_(False)
    eps_model = parts.eps_model()
    schedule = eps_model.schedule
    cache = CaptionCache(parts, world.all_captions())
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)

    def step_fn(step: int, g: torch.Generator) -> dict:
        x0, objs = world.sample_batch(batch, g)
        caps = [world.caption(o) if float(torch.rand((), generator=g)) >= cond_drop else "" for o in objs]
        cond = cache(caps)
        t, _ = schedule.sample_t(batch, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = schedule.add_noise(x0, noise, t)
        pred = eps_model.raw(x_t, t, cond)
        loss = torch.nn.functional.mse_loss(pred, eps_model.target(x0, noise, t))
        if step > 0:
            with torch.no_grad():
                d = min(ema_decay, (1 + step) / (10 + step))
                for pe, p in zip(ema.parameters(), unet.parameters()):
                    pe.lerp_(p.detach(), 1 - d)
        return {"loss": loss}

    config = {"kind": "sepen-base", "batch": batch, "lr": lr, "cond_drop": cond_drop,
              "ema_decay": ema_decay, "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in unet.config.items()
                                                if k in UNET_CONFIG},
              **world.to_dict()}
    trainer = Trainer(out_dir, {"unet": unet, "ema": ema}, opt, step_fn, config=config, seed=seed,
                      save_every=save_every, log_every=50, desc="sepen base", progress=progress)
    trainer.fit(steps)
    out = SDComponents(unet=ema, scheduler=parts.scheduler, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer)
    out.save_pretrained(out_dir / "model")
    return out


def export_base(out: Path, world: shapes.ShapesWorld) -> Path:
    """Writes the EMA weights of the latest base checkpoint (out/base/checkpoint.pt) as the
    Stable-Diffusion-style folder out/base/model; returns its path."""
    parts = build_components(naming=world.naming)
    state = load(out / "base" / "checkpoint.pt")
    parts.unet.load_state_dict(state["modules"]["ema"])
    SDComponents(unet=parts.unet, scheduler=parts.scheduler, text_encoder=parts.text_encoder,
                 tokenizer=parts.tokenizer).save_pretrained(out / "base" / "model")
    atomic_write_json({"step": state["step"]}, out / "base" / "model" / "step.json")
    return out / "base" / "model"


# -- sampling, scoring, finetuning -------------------------------------------------------------

def load_model(out: Path, model: str) -> SDComponents:
    """'base' -> out/base/model; 'ft:<name>' (or a bare name) -> out/finetune-<name>/model."""
    if model in ("base", "tta"):
        path = out / "base" / "model"
    else:
        path = out / f"finetune-{model.split(':', 1)[-1]}" / "model"
    if not path.exists():
        raise ValueError(f"model {model!r}: {path} does not exist (run `compkern sepen train` / `finetune` first)")
    return SDComponents.from_pretrained(path)


def load_detector(out: Path) -> shapes.ShapeDetector:
    path = out / "detector.pt"
    if not path.exists():
        raise ValueError(f"{path} does not exist: run `compkern sepen train --what detector`")
    det = shapes.ShapeDetector()
    det.load_state_dict(load(path)["state_dict"])
    return det.eval()


def load_world(out: Path, default: shapes.ShapesWorld) -> shapes.ShapesWorld:
    """The world a run folder was trained on (out/world.json), else ``default`` (older runs)."""
    path = out / "world.json"
    return shapes.ShapesWorld(**json.loads(path.read_text())) if path.exists() else default


def prompt_specs(parts: SDComponents, world: shapes.ShapesWorld, prompts: list[tuple[int, ...]]):
    from compkern.train.sepen import PromptSpec
    return [PromptSpec.build(world.caption(p), world.object_tokens(p), parts.tokenizer, parts.encode) for p in prompts]


@torch.no_grad()
def sample(parts: SDComponents, world: shapes.ShapesWorld, prompts: list[tuple[int, ...]], *, n: int, seed: int, steps: int = 50,
           guidance: float = 3.0, clip_x0: float | None = 1.0, eta: float = 1.0, tta: dict | None = None,
           chunk: int = 256, backend: str = "auto", progress: bool = False) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """n samples per prompt with classifier-free guidance and ancestral DDPM (eta = 1) or DDIM
    (eta = 0); ``tta``: SepEnGuidance options (step_size, t_stop, w_sep, w_en) to guide with the
    attention losses. Returns (images (len(prompts) * n, 3, 16, 16), prompt of each row)."""
    from compkern.samplers import ddim_sample
    from compkern.train.sepen import SepEnGuidance

    model = parts.eps_model()
    rows = [p for p in prompts for _ in range(n)]
    cache = CaptionCache(parts, [""] + [world.caption(p) for p in prompts])
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(len(rows), 3, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, generator=g)
    out = []
    for s in range(0, len(rows), chunk):
        part = rows[s:s + chunk]
        cond = cache([world.caption(p) for p in part])
        uncond = cache([""] * len(part))
        if tta is None:
            def eps_fn(x, t, cond=cond, uncond=uncond):
                e = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond]))
                return e[:len(x)] + guidance * (e[len(x):] - e[:len(x)])
        else:
            eps_fn = SepEnGuidance(model, cond, uncond, prompt_specs(parts, world, part), guidance_scale=guidance,
                                   resolution=8, backend=backend, **tta)
        out.append(ddim_sample(eps_fn, x_T[s:s + chunk], model.schedule, num_steps=steps, eta=eta, clip_x0=clip_x0,
                               generator=g, progress=progress))
    return torch.cat(out).clamp(-1, 1), rows


def score(det: shapes.ShapeDetector, world: shapes.ShapesWorld, images: torch.Tensor, rows: list[tuple[int, ...]]) -> dict:
    r = shapes.score_samples(det, images, rows)
    res = {k: float(r[k].float().mean()) for k in shapes.OUTCOMES}
    res["n"] = len(rows)
    # which prompt object was drawn: detection rate of the 1st, 2nd, ... object named (over the
    # rows whose prompt names that many objects)
    named = torch.tensor([len(p) for p in rows]).unsqueeze(1) > torch.arange(r["detected"].shape[1])
    res["detected_by_position"] = (r["detected"].sum(0) / named.sum(0)).tolist()
    per = {}
    for i, p in enumerate(rows):
        per.setdefault(world.caption(p), []).append(bool(r["success"][i]))
    res["per_prompt"] = {k: sum(v) / len(v) for k, v in per.items()}
    return res


PROMPT_SETS = {"heldout": lambda w: w.held_out_prompts(), "seen": lambda w: w.seen_prompts(),
               "single": lambda w: w.singles()}


def frozen_samples(parts: SDComponents, world: shapes.ShapesWorld, prompts: list[tuple[int, ...]], path: Path, *,
                   n: int = 8, seed: int, steps: int = 50) -> tuple[torch.Tensor, list[str]]:
    """n samples of each prompt from the model as it is now (len(prompts) * n, 3, H, W), prompt-major,
    and their captions; computed once and cached at ``path``."""
    if not path.exists():
        imgs, rows = sample(parts, world, prompts, n=n, seed=seed, steps=steps)
        atomic_save({"x0": imgs, "captions": [world.caption(r) for r in rows]}, path)
    d = load(path)
    return d["x0"], d["captions"]


def finetune(parts: SDComponents, world: shapes.ShapesWorld, out_dir: Path, *, steps: int, lr: float, w_sep: float,
             w_en: float, w_norm: float, batch: int = 8, seed: int = 0, prompt_set: str = "heldout", t_min: int = 0,
             latents: str = "random", backend: str = "auto", progress: bool = True) -> list[dict]:
    """SepEn finetuning of parts.unet (attn2.to_k) on the prompts of ``prompt_set``; the
    normalization data are 8 frozen-model samples of each single-object prompt (cached in
    out_dir/norm.pt). ``latents``: the attention losses see noised random latents ("random", the
    public code) or 8 frozen-model samples of each training prompt ("samples", cached in
    out_dir/prompt_x0.pt). Saves the SD folder with the finetuned UNet to out_dir/model."""
    from compkern.train.sepen import SepEnConfig, SepEnFinetuner

    if latents not in ("random", "samples"):
        raise ValueError(f"latents must be 'random' or 'samples', got {latents!r}")
    prompts = PROMPT_SETS[prompt_set](world)
    specs = prompt_specs(parts, world, prompts)
    norm_x0 = norm_states = None
    if w_norm > 0:
        norm_x0, captions = frozen_samples(parts, world, world.singles(), out_dir / "norm.pt", seed=seed + 777)
        norm_states = CaptionCache(parts, captions)(captions)
    prompt_x0 = None
    if latents == "samples":
        x0, _ = frozen_samples(parts, world, prompts, out_dir / "prompt_x0.pt", seed=seed + 778)
        prompt_x0 = x0.view(len(prompts), -1, *x0.shape[1:])
    cfg = SepEnConfig(steps=steps, batch=batch, lr=lr, w_sep=w_sep, w_en=w_en, w_norm=w_norm, resolution=8, t_min=t_min,
                      save_every=50, backend=backend, extra={"prompt_set": prompt_set})
    ft = SepEnFinetuner(parts.eps_model(), specs, out_dir, cfg, norm_x0=norm_x0, norm_states=norm_states,
                        prompt_x0=prompt_x0, seed=seed, progress=progress)
    hist = ft.fit()
    SDComponents(unet=parts.unet, scheduler=parts.scheduler, text_encoder=parts.text_encoder,
                 tokenizer=parts.tokenizer).save_pretrained(out_dir / "model")
    return hist


@torch.no_grad()
def noun_maps(parts: SDComponents, world: shapes.ShapesWorld, images: torch.Tensor, rows: list[tuple[int, ...]], *, t: int = 300, seed: int = 0,
              backend: str = "auto") -> torch.Tensor:
    """Cross-attention maps (B, K, 8, 8) of each prompt's nouns on its own samples noised to t
    (softmax-normalized over the text tokens as attention_losses sees them)."""
    from compkern.train.sepen import capture_cross_attention

    model = parts.eps_model()
    specs = prompt_specs(parts, world, rows)
    g = torch.Generator().manual_seed(seed)
    tt = torch.full((len(rows),), t, dtype=torch.long)
    x_t = model.schedule.add_noise(images, torch.randn(images.shape, generator=g), tt)
    states = torch.stack([s.states for s in specs])
    with capture_cross_attention(model.unet, 8, backend=backend) as store:
        model(x_t, tt, states)
        maps = store.maps()  # (B, 64, N)
    out = []
    for b, s in enumerate(specs):
        a = torch.softmax(100 * maps[b, :, 1:s.text_end], -1)
        out.append(a[:, s.tokens - 1].T.reshape(-1, 8, 8))
    return torch.stack(out)


def figure(out: Path, world: shapes.ShapesWorld, models: dict[str, tuple[SDComponents, dict | None]], path: Path, *,
           n_prompts: int = 4, n_candidates: int = 16, detector: shapes.ShapeDetector | None = None, seed: int = 0,
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
            r = shapes.score_samples(detector, imgs, rows)
            outcome = [next(k for k in shapes.OUTCOMES if r[k][i]).split("_")[0] for i in range(len(rows))]
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
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for this run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="train: base steps (4000); finetune: SepEn steps (200)")
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
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--eta", type=float, default=1.0, help="1: ancestral DDPM, 0: DDIM")
    p.add_argument("--no-clip", action="store_true", help="do not clip the predicted x0 to [-1, 1]")
    p.add_argument("--tta-step", type=float, default=1.0, help="tta: guidance step size")
    p.add_argument("--tta-t-stop", type=int, default=500, help="tta: guide while t >= this")
    p.add_argument("--prompt", default=None, help="sample: a caption such as 'a red square and a green ring'")
    p.add_argument("--png", default=None, help="sample/figure: output PNG")
    p.add_argument("--backend", default="auto", help="attention op backend (auto, torch, cpp, triton)")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    world = shapes.ShapesWorld(pair_fraction=args.pair_fraction, naming=args.naming, extra_fraction=args.extra_fraction)
    if args.action == "train" and args.what in ("base", "all"):
        saved = load_world(out, world)
        if saved != world:
            raise ValueError(f"{out} holds a run of another world ({saved.to_dict()}); pick another --out")
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(world.to_dict(), out / "world.json")
    else:
        world = load_world(out, world)
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
            det, acc = shapes.train_detector(seed=args.seed, progress=progress)
            atomic_save({"state_dict": det.state_dict(), "accuracy": acc}, out / "detector.pt")
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
        path = out / f"eval-{tag}.json"
        # one file per (model, seed): sets evaluated earlier stay, each with the settings it ran with
        results = json.loads(path.read_text()) if path.exists() else {}
        results.update({"model": args.model, "seed": args.seed})
        for name in sets:
            t0 = time.time()
            imgs, rows = sample(parts, world, PROMPT_SETS[name](world), n=args.n, seed=args.seed, steps=args.sample_steps,
                                guidance=args.guidance, clip_x0=clip, eta=args.eta,
                                tta=settings["tta"], backend=args.backend, progress=progress)
            r = results[name] = {**score(det, world, imgs, rows), "settings": settings}
            atomic_write_json(results, path)
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
            r = score(load_detector(out), world, imgs, rows)
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
