"""Training of unconditional 2-D denoisers, one per component, as the public CompLift 2-D code does.

Each model m: loss = mean over its batch and the two coordinates of (eps - net_m(sqrt(abar_t) x0
+ sqrt(1 - abar_t) eps, t))^2, t uniform over the schedule, x0 drawn fresh from component m at
every step (the public code redraws its 8000 points every epoch). Adam at a constant ``lr``,
gradients clipped to norm 1 per model, and an exponential moving average of the weights (decay
``ema``) that is what gets used, as in the public runs.

The M models train together as one StackedToyDenoiser (independent weights, losses, clipping and
Adam moments: the same updates as M separate runs, for the price of one batched step). The EMA is
torch's ``AveragedModel`` with ``get_ema_multi_avg_fn``; its inner module is what the checkpoint
holds under "ema" (the same keys as before, so older folders load). The shared Trainer gives the
progress bar, atomic checkpoints (weights, EMA, optimizer, RNG) and resume: a rerun on a finished
folder loads it and returns at once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from compkern.data.toy2d import Distribution2D
from compkern.models.schedule import NoiseSchedule
from compkern.models.toy_ddpm import StackedToyDenoiser, ToyDenoiser
from compkern.train.loop import Trainer

__all__ = ["train_component_denoisers"]


class _MemberClippedAdam(torch.optim.Adam):
    """Adam on stacked weights (M, ...) that first clips each model's gradient to norm ``max_norm``
    (the per-run clip_grad_norm_ of the public code)."""

    def __init__(self, params, *, lr: float, max_norm: float):
        super().__init__(params, lr=lr)
        self.max_norm = max_norm

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.stack([g.flatten(1).square().sum(1) for g in grads]).sum(0).sqrt()  # (M,)
        scale = (self.max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.view(-1, *([1] * (g.dim() - 1))))
        return super().step(closure)


def train_component_denoisers(components: Sequence[Distribution2D], schedule: NoiseSchedule, out_dir: str | Path, *,
                              steps: int, hidden: int = 128, depth: int = 4, batch_size: int = 128, lr: float = 1e-3,
                              ema: float = 0.999, seed: int = 0, save_every: int = 500,
                              progress: bool = True) -> list[ToyDenoiser]:
    """Train one denoiser per component for ``steps`` steps (resuming from ``out_dir``); returns
    their EMA weights as ToyDenoisers ``(x_t (N, 2), t (N,)) -> eps (N, 2)``, in eval mode."""
    if not components:
        raise ValueError("components must hold at least one distribution")
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"steps, batch_size and lr must be positive, got {steps}, {batch_size}, {lr}")
    if not 0 <= ema < 1:
        raise ValueError(f"ema must lie in [0, 1), got {ema}")
    M = len(components)
    torch.manual_seed(seed)
    net = StackedToyDenoiser(M, hidden=hidden, depth=depth, num_steps=schedule.num_steps)
    ema_net = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(ema), use_buffers=False)
    ema_net.update_parameters(net)  # the first update copies: from here on every update is an EMA step
    ema_net.module.requires_grad_(False)
    sqrt_abar = schedule.alphas_cumprod.sqrt().float()
    sqrt_1m = (1 - schedule.alphas_cumprod).sqrt().float()
    opt = _MemberClippedAdam(net.parameters(), lr=lr, max_norm=1.0)

    def fold_ema() -> None:
        ema_net.update_parameters(net)

    def step_fn(step: int, g: torch.Generator) -> dict:
        if step > 0:  # fold in the weights after the previous optimizer step
            fold_ema()
        x0 = torch.stack([c.sample(batch_size, g) for c in components])  # (M, batch, 2)
        t = torch.randint(0, schedule.num_steps, (M, batch_size), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = sqrt_abar[t, None] * x0 + sqrt_1m[t, None] * noise
        per_model = (net(x_t, t) - noise).pow(2).mean(dim=(1, 2))  # (M,)
        return {"loss": per_model.sum(), "mean_mse": float(per_model.detach().mean())}

    g0 = torch.Generator()
    config = {"model": dict(net.config), "components": [repr(c) for c in components],
              "data_checksums": [round(float(c.sample(256, g0.manual_seed(0)).double().sum()), 6) for c in components],
              "schedule": {"num_steps": schedule.num_steps, "abar_end": round(float(schedule.alphas_cumprod[-1]), 9)},
              "steps": steps, "batch_size": batch_size, "lr": lr, "ema": ema, "grad_clip_per_model": 1.0}
    trainer = Trainer(out_dir, {"net": net, "ema": ema_net.module}, opt, step_fn, config=config, seed=seed,
                      save_every=save_every, log_every=max(1, min(100, steps // 10)), grad_clip=None,
                      desc=f"train {M} component models", progress=progress)
    trainer.fit(steps)
    fold_ema()  # the last step's weights (not in the checkpoint's EMA, so the same on every rerun)
    return [ema_net.module.member(m) for m in range(M)]
