"""`compkern positions train|sample|eval`: multi-object positions by composing a one-object model.

    compkern positions train --out runs/positions/eps --steps 2000 --threads 1
    compkern positions train --out runs/positions/energy --energy --steps 1000 --threads 1
    compkern positions sample runs/positions/eps --objects 3 --method reverse --base background --png s.png
    compkern positions eval --eps-run runs/positions/eps --energy-run runs/positions/energy --n 32

The model learns p(x | one object at (x, y)), p(x | empty scene) and p(x). n objects are composed as
log p(x | y_1..y_n) = log p(x | base) + sum_i (log p(x | y_i) - log p(x | base)), the base being the
unconditional null (Composable Diffusion) or the empty background (projective composition,
Bradley et al. 2025). Samplers: reverse diffusion (DDIM / DDPM), annealed ULA / MALA / HMC (energy
model), each optionally followed by CompLift rejection (lift of every y_i against the null > 0).
Accuracy: the training-free detector of compkern.data.clevr. Training and evaluation resume
(eval writes one JSON entry per cell as it finishes).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from compkern.data.clevr import (background_cond, null_cond, position_accuracy, position_cond, render_scenes,
                                 sample_positions, training_batch)
from compkern.models.position_unet import PositionEnergyUNet, PositionUNet, build_position_model
from compkern.models.schedule import NoiseSchedule
from compkern.train.loop import Trainer
from compkern.utils.checkpoint import atomic_write_json, load


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (use 1 on a shared machine)")

    tr = sub.add_parser("train", parents=[common], help="train the one-object position model (resumable)")
    tr.add_argument("--out", required=True)
    tr.add_argument("--energy", action="store_true", help="energy-parameterized (RRR) variant")
    tr.add_argument("--size", type=int, default=24)
    tr.add_argument("--channels", type=int, nargs="+", default=[24, 48])
    tr.add_argument("--attention", action="store_true")
    tr.add_argument("--steps", type=int, default=2000)
    tr.add_argument("--batch", type=int, default=32)
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--p-empty", type=float, default=0.15, help="fraction of empty (background) scenes")
    tr.add_argument("--p-uncond", type=float, default=0.1, help="condition dropped to the null")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--save-every", type=int, default=100)
    tr.add_argument("--no-progress", action="store_true")


# -- training -------------------------------------------------------------------------------------
def schedule() -> NoiseSchedule:
    """The noise schedule of every positions model: cosine, 1000 steps."""
    return NoiseSchedule.cosine(1000)


def train_position_model(model: torch.nn.Module, out_dir: str | Path, *, size: int = 24, steps: int = 2000,
                         batch_size: int = 32, lr: float = 1e-3, p_empty: float = 0.15, p_uncond: float = 0.1,
                         seed: int = 0, save_every: int = 100, progress: bool = True) -> list[dict]:
    """Denoising training on freshly rendered scenes (every batch is new data): |eps - model(x_t, t, c)|^2,
    c = the object's position, BACKGROUND for empty scenes, NULL with probability ``p_uncond``.
    AdamW, warmup then cosine decay to 10% of ``lr``; resumes from ``out_dir``."""
    sch = schedule()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    warmup = max(1, steps // 50)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        u = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * u)))

    def step_fn(step: int, g: torch.Generator) -> dict:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x0, c = training_batch(batch_size, size=size, p_empty=p_empty, generator=g)
        c[torch.rand(batch_size, generator=g) < p_uncond] = null_cond()
        t = torch.randint(0, sch.num_steps, (batch_size,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        loss = (model(sch.add_noise(x0, noise, t), t, c) - noise).pow(2).flatten(1).sum(1).mean()
        return {"loss": loss}

    config = {"model": model.config, "size": size, "steps": steps, "batch_size": batch_size, "lr": lr,
              "p_empty": p_empty, "p_uncond": p_uncond, "schedule": "cosine1000"}
    trainer = Trainer(out_dir, {"model": model}, opt, step_fn, config=config, seed=seed, save_every=save_every,
                      log_every=max(1, min(50, steps // 10)), desc=f"train {Path(out_dir).name}", progress=progress)
    history = trainer.fit(steps)
    model.eval()
    return history


def load_run(run: str | Path) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, config) from a training folder."""
    run = Path(run)
    cfg = json.loads((run / "config.json").read_text())
    model = build_position_model(cfg["model"], schedule())
    model.load_state_dict(load(run / "checkpoint.pt")["modules"]["model"])
    model.eval()
    return model, cfg


def _train(args) -> int:
    kw = dict(channels=tuple(args.channels), attention=args.attention)
    model = PositionEnergyUNet(schedule(), **kw) if args.energy else PositionUNet(**kw)
    t0 = time.time()
    hist = train_position_model(model, args.out, size=args.size, steps=args.steps, batch_size=args.batch, lr=args.lr,
                                p_empty=args.p_empty, p_uncond=args.p_uncond, seed=args.seed,
                                save_every=args.save_every, progress=not args.no_progress)
    print(f"trained {args.out}: step {args.steps}, last loss {hist[-1]['loss']:.4g} ({time.time() - t0:.0f} s this run)")
    return 0


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    return {"train": _train}[args.action](args)
