"""Training of one unconditional 2-D denoiser on one component, as the public CompLift 2-D code does.

Loss: mean over the batch and the two coordinates of (eps - net(sqrt(abar_t) x0 + sqrt(1 - abar_t)
eps, t))^2, t uniform over the schedule, x0 drawn fresh from the component at every step (the
public code redraws its 8000 points every epoch). Adam at a constant ``lr``, gradients clipped to
norm 1, and an exponential moving average of the weights (decay ``ema``) that is what gets used,
as in the public runs. The shared Trainer gives the progress bar, atomic checkpoints (net, EMA,
optimizer, RNG) and resume: a rerun on a finished folder loads it and returns at once.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from compkern.data.toy2d import Distribution2D
from compkern.models.schedule import NoiseSchedule
from compkern.train.loop import Trainer

__all__ = ["train_component_denoiser"]


@torch.no_grad()
def _ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    for pe, p in zip(ema.parameters(), net.parameters()):
        pe.mul_(decay).add_(p.detach(), alpha=1 - decay)


def train_component_denoiser(net: nn.Module, data: Distribution2D, schedule: NoiseSchedule, out_dir: str | Path, *,
                             steps: int, batch_size: int = 128, lr: float = 1e-3, ema: float = 0.999, seed: int = 0,
                             save_every: int = 1000, progress: bool = True) -> nn.Module:
    """Train ``net(x_t (N, 2), t (N,)) -> eps (N, 2)`` on samples of ``data`` for ``steps`` steps
    (resuming from ``out_dir``); returns the EMA copy of the weights, in eval mode."""
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"steps, batch_size and lr must be positive, got {steps}, {batch_size}, {lr}")
    if not 0 <= ema < 1:
        raise ValueError(f"ema must lie in [0, 1), got {ema}")
    if getattr(net, "num_steps", schedule.num_steps) != schedule.num_steps:
        raise ValueError(f"net has {net.num_steps} timesteps but the schedule {schedule.num_steps}")
    ema_net = copy.deepcopy(net)
    for p in ema_net.parameters():
        p.requires_grad_(False)
    sqrt_abar = schedule.alphas_cumprod.sqrt().float()
    sqrt_1m = (1 - schedule.alphas_cumprod).sqrt().float()
    opt = torch.optim.Adam(net.parameters(), lr=lr)

    def step_fn(step: int, g: torch.Generator) -> dict:
        if step > 0:  # fold in the weights after the previous optimizer step
            _ema_update(ema_net, net, ema)
        x0 = data.sample(batch_size, g)
        t = torch.randint(0, schedule.num_steps, (batch_size,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = sqrt_abar[t, None] * x0 + sqrt_1m[t, None] * noise
        return {"loss": (net(x_t, t) - noise).pow(2).mean()}

    config = {"model": net.config() if hasattr(net, "config") else type(net).__name__, "data": repr(data),
              "data_checksum": round(float(data.sample(256, torch.Generator().manual_seed(0)).double().sum()), 6),
              "schedule": {"num_steps": schedule.num_steps, "abar_end": round(float(schedule.alphas_cumprod[-1]), 9)},
              "steps": steps, "batch_size": batch_size, "lr": lr, "ema": ema}
    trainer = Trainer(out_dir, {"net": net, "ema": ema_net}, opt, step_fn, config=config, seed=seed,
                      save_every=save_every, log_every=max(1, min(100, steps // 10)),
                      desc=f"train {Path(out_dir).name}", progress=progress)
    trainer.fit(steps)
    _ema_update(ema_net, net, ema)  # the last step's weights (not in the checkpoint's EMA: same on every rerun)
    net.eval()
    return ema_net.eval()
