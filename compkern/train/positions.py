"""Training of the one-object position models of the multi-object positions benchmark
(``compkern.models.position_unet``) on freshly rendered scenes (``compkern.data.clevr``), their
held-out loss, and the reading of a training folder (``load_run``)."""
from __future__ import annotations

from pathlib import Path

import torch

from compkern.data.clevr import null_cond, training_batch
from compkern.models.base import config_dict
from compkern.models.position_unet import PositionEnergyUNet, PositionUNet, position_schedule
from compkern.train.loop import Trainer, load_exported, warmup_cosine

__all__ = ["heldout_loss", "load_run", "train_position_model"]


def train_position_model(model: torch.nn.Module, out_dir: str | Path, *, size: int = 24, steps: int = 2000,
                         batch_size: int = 32, lr: float = 1e-3, p_empty: float = 0.15, p_uncond: float = 0.1,
                         seed: int = 0, save_every: int = 100, progress: bool = True) -> list[dict]:
    """Denoising training on freshly rendered scenes (every batch is new data): |eps - model(x_t, t, c)|^2,
    c = the object's position, BACKGROUND for empty scenes, NULL with probability ``p_uncond``.
    AdamW, warmup then cosine decay to 10% of ``lr``; resumes from ``out_dir``."""
    sch = position_schedule()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    def step_fn(step: int, g: torch.Generator) -> dict:
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, lr=lr, steps=steps)
        x0, c = training_batch(batch_size, size=size, p_empty=p_empty, generator=g)
        c[torch.rand(batch_size, generator=g) < p_uncond] = null_cond()
        t = torch.randint(0, sch.num_steps, (batch_size,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        loss = (model(sch.add_noise(x0, noise, t), t, c) - noise).pow(2).flatten(1).sum(1).mean()
        return {"loss": loss}

    config = {"model": config_dict(model), "size": size, "steps": steps, "batch_size": batch_size, "lr": lr,
              "p_empty": p_empty, "p_uncond": p_uncond, "schedule": "cosine1000"}
    net = model.potential.net if isinstance(model, PositionEnergyUNet) else model
    trainer = Trainer(out_dir, {"model": model}, opt, step_fn, config=config, seed=seed, save_every=save_every,
                      log_every=max(1, min(50, steps // 10)), desc=f"train {Path(out_dir).name}", progress=progress,
                      export=net)
    history = trainer.fit(steps)
    model.eval()
    return history


def heldout_loss(model: torch.nn.Module, *, size: int = 24, n: int = 256, seed: int = 12345,
                 chunk_size: int = 128) -> float:
    """The training loss mean |eps - model(x_t, t, c)|^2 (summed over pixels) on n fixed scenes with
    fixed t and noise (``seed``), the same for every model: losses of runs compare directly."""
    g = torch.Generator().manual_seed(seed)
    x0, c = training_batch(n, size=size, p_empty=0.15, generator=g)
    sch = position_schedule()
    t = torch.randint(0, sch.num_steps, (n,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    x_t = sch.add_noise(x0, noise, t)
    total = 0.0
    for s in range(0, n, chunk_size):
        with torch.no_grad():
            eps = model(x_t[s:s + chunk_size], t[s:s + chunk_size], c[s:s + chunk_size])
        total += float((eps.detach() - noise[s:s + chunk_size]).pow(2).flatten(1).sum(1).sum())
    return total / n


def load_run(run: str | Path) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, config) from a training folder (its exported PositionUNet, wrapped as
    an energy model where the run trained one)."""
    net, cfg = load_exported(run, PositionUNet)
    model = PositionEnergyUNet(position_schedule(), net=net) if cfg["model"].get("energy") else net
    return model.eval(), cfg
