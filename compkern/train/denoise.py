"""Denoising training of class-conditional eps-models (plain or energy-parameterized), and flow
matching of velocity models (``train_flow_model``).

Loss: |eps - model(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, c)|^2 with t uniform, and the class
replaced by the model's null id with probability ``p_uncond`` (classifier-free dropout). AdamW
with a short warmup and cosine decay to 10% of ``lr``; the shared Trainer does the progress bar,
atomic checkpoints, resume and metrics.json in ``out_dir``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from compkern.models.base import config_dict
from compkern.models.schedule import NoiseSchedule
from compkern.train.loop import Trainer, warmup_cosine

__all__ = ["train_eps_model", "train_flow_model"]


def _check_data(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, p_uncond: float, steps: int, batch_size: int,
                lr: float) -> int:
    """The checks every denoising trainer makes; returns the model's null id."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise TypeError("x must be a floating-point tensor (N, *S)")
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.shape != (x.shape[0],):
        raise ValueError(f"y must be an int64 tensor (N,) = ({x.shape[0]},), got "
                         f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    null_id = getattr(model, "null_id", None)
    if null_id is None:
        raise TypeError("model must have a null_id (the unconditional class id)")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= null_id):
        raise ValueError(f"y must hold class ids in [0, {null_id}), got range [{int(y.min())}, {int(y.max())}]")
    if not 0 <= p_uncond <= 1:
        raise ValueError(f"p_uncond must lie in [0, 1], got {p_uncond}")
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"steps, batch_size and lr must be positive, got {steps}, {batch_size}, {lr}")
    return int(null_id)


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, out_dir: str | Path, loss_fn, objective: dict, *,
         steps: int, batch_size: int, lr: float, p_uncond: float, seed: int, weight_decay: float, save_every: int,
         progress: bool) -> list[dict[str, float]]:
    """The shared loop: loss_fn(x0 (b, *S), c (b,) with the null id dropped in, g) -> scalar loss."""
    null_id = _check_data(model, x, y, p_uncond=p_uncond, steps=steps, batch_size=batch_size, lr=lr)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def step_fn(step: int, g: torch.Generator) -> dict:
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, lr=lr, steps=steps)
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=g)
        x0, c = x[idx], y[idx].clone()
        c[torch.rand(batch_size, generator=g) < p_uncond] = null_id
        return {"loss": loss_fn(x0, c, g)}

    config = {"model": config_dict(model) if hasattr(model, "config") else type(model).__name__,
              "data": {"n": int(x.shape[0]), "checksum": round(float(x.double().sum()), 6),
                       "classes": int(y.max()) + 1 if len(y) else 0},
              **objective, "steps": steps, "batch_size": batch_size, "lr": lr, "p_uncond": p_uncond,
              "weight_decay": weight_decay}
    trainer = Trainer(out_dir, {"model": model}, opt, step_fn, config=config, seed=seed, save_every=save_every,
                      log_every=max(1, min(100, steps // 10)), desc=f"train {Path(out_dir).name}", progress=progress)
    history = trainer.fit(steps)
    model.eval()
    return history


def train_eps_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, schedule: NoiseSchedule,
                    out_dir: str | Path, *, steps: int = 4000, batch_size: int = 512, lr: float = 2e-3,
                    p_uncond: float = 0.1, seed: int = 0, weight_decay: float = 0.0, save_every: int = 500,
                    progress: bool = True) -> list[dict[str, float]]:
    """Train ``model`` (an EpsModel with ``null_id``) on x (N, *S) float with labels y (N,) int64 in
    [0, null_id). Resumes from ``out_dir`` when it holds a checkpoint of the same configuration
    (a finished run returns at once, weights loaded). Returns the history [{"step", "loss"}, ...]."""
    sqrt_abar = schedule.alphas_cumprod.sqrt().float()
    sqrt_1m = (1 - schedule.alphas_cumprod).sqrt().float()

    def loss_fn(x0: torch.Tensor, c: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        t = torch.randint(0, schedule.num_steps, (x0.shape[0],), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        shape = (x0.shape[0],) + (1,) * (x0.dim() - 1)
        x_t = sqrt_abar[t].view(shape) * x0 + sqrt_1m[t].view(shape) * noise
        return (model(x_t, t, c) - noise).pow(2).flatten(1).sum(1).mean()

    schedule_cfg = {"num_steps": schedule.num_steps, "abar_end": round(float(schedule.alphas_cumprod[-1]), 9)}
    return _fit(model, x, y, out_dir, loss_fn, {"schedule": schedule_cfg}, steps=steps, batch_size=batch_size, lr=lr,
                p_uncond=p_uncond, seed=seed, weight_decay=weight_decay, save_every=save_every, progress=progress)


def train_flow_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, out_dir: str | Path, *, steps: int = 4000,
                     batch_size: int = 512, lr: float = 2e-3, p_uncond: float = 0.1, seed: int = 0,
                     weight_decay: float = 0.0, save_every: int = 500, progress: bool = True) -> list[dict[str, float]]:
    """Conditional flow matching (rectified flow, compkern.models.flow): |v(x_t, t, c) - (eps - x0)|^2
    with x_t = (1 - t) x0 + t eps, t ~ U[0, 1]; otherwise as ``train_eps_model`` (classifier-free
    dropout, resumable run folder)."""
    from compkern.models.flow import flow_interpolate

    def loss_fn(x0: torch.Tensor, c: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        t = torch.rand(x0.shape[0], generator=g)
        noise = torch.randn(x0.shape, generator=g)
        return (model(flow_interpolate(x0, noise, t), t, c) - (noise - x0)).pow(2).flatten(1).sum(1).mean()

    return _fit(model, x, y, out_dir, loss_fn, {"objective": "flow"}, steps=steps, batch_size=batch_size, lr=lr,
                p_uncond=p_uncond, seed=seed, weight_decay=weight_decay, save_every=save_every, progress=progress)
