"""Position-conditioned image eps-models for the multi-object positions benchmark.

``PositionUNet`` is compkern's small UNet (``AttributeUNet``) with its condition embedding replaced
by ``PositionEmbedding``: cond (N, 3) float rows (x, y, mode) with mode OBJECT (Fourier features of
the continuous (x, y) through an MLP), BACKGROUND or NULL (learned vectors); the embedding is
added to the timestep embedding, the way diffusers feeds a class embedding. With ``spatial=True``
(default) the position also enters as one extra input channel, a Gaussian bump at (x, y)
(``position_map``), which lets a small CPU-trained network learn placement in minutes.

``PositionEnergyUNet`` is its energy-parameterized twin (Reduce, Reuse, Recycle): the potential
h = 0.5 |g(x_t, t, c) - x_t|^2 with g a PositionUNet, wrapped by ``EnergyEps`` so that
eps = grad_x h and E_t = h / sqrt(1 - abar_t) (what MALA and HMC need).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from diffusers.configuration_utils import register_to_config
from torch import nn

from compkern.models.attribute_unet import AttributeUNet
from compkern.models.base import config_dict
from compkern.models.energy import EnergyEps
from compkern.models.schedule import NoiseSchedule

__all__ = ["SAMPLE_T_MAX", "PositionEmbedding", "PositionUNet", "PositionEnergyUNet", "build_position_model",
           "position_sampling_schedule", "position_schedule"]

_MODES = 3  # OBJECT, BACKGROUND, NULL (compkern.data.clevr)


def position_schedule() -> NoiseSchedule:
    """The noise schedule of every positions model: cosine, 1000 steps."""
    return NoiseSchedule.cosine(1000)


SAMPLE_T_MAX = 970


def position_sampling_schedule() -> NoiseSchedule:
    """The training schedule cut at t < SAMPLE_T_MAX (abar_max = 2.2e-3 instead of 2.4e-9): at
    the cosine schedule's last step x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) multiplies the eps
    error by 2e4, which without x0 clipping throws samples far outside [-1, 1]. Every sampler
    (reverse diffusion and the annealed MCMC levels) starts from N(0, I) at t = SAMPLE_T_MAX - 1."""
    return NoiseSchedule(position_schedule().betas[:SAMPLE_T_MAX])


class PositionEmbedding(nn.Module):
    """cond (N, 3) float (x, y, mode) -> (N, dim): mode embedding + [mode == OBJECT] * MLP(Fourier(x, y))."""

    def __init__(self, dim: int, n_freqs: int = 6):
        super().__init__()
        self.n_freqs = n_freqs
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_freqs, dtype=torch.float32), persistent=False)
        self.mode = nn.Embedding(_MODES, dim)
        self.mlp = nn.Sequential(nn.Linear(4 * n_freqs + 2, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        if not isinstance(cond, torch.Tensor) or not cond.is_floating_point():
            raise TypeError("cond must be a float tensor (N, 3) of (x, y, mode) rows")
        if cond.dim() != 2 or cond.shape[1] != 3:
            raise ValueError(f"cond must have shape (N, 3), got {tuple(cond.shape)}")
        mode = cond[:, 2].round().long()
        if bool((mode < 0).any()) or bool((mode >= _MODES).any()):
            raise ValueError("cond[:, 2] (mode) must be 0 (object), 1 (background) or 2 (null)")
        xy = cond[:, :2].float()
        a = xy[:, :, None] * self.freqs  # (N, 2, F)
        feats = torch.cat([xy, a.sin().flatten(1), a.cos().flatten(1)], 1)
        is_obj = (mode == 0).to(feats.dtype)[:, None]
        return self.mode(mode) + is_obj * self.mlp(feats)


def position_map(cond: torch.Tensor, height: int, width: int, sigma: float = 0.08) -> torch.Tensor:
    """cond (N, 3) -> (N, 1, H, W): a Gaussian bump of width ``sigma`` (normalized) at (x, y) for
    OBJECT rows, zeros for BACKGROUND / NULL rows."""
    ys = (torch.arange(height, dtype=torch.float32, device=cond.device) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32, device=cond.device) + 0.5) / width
    c = cond.float()
    d2 = (xs[None, None, :] - c[:, 0, None, None]) ** 2 + (ys[None, :, None] - c[:, 1, None, None]) ** 2
    is_obj = (c[:, 2].round() == 0).float()[:, None, None]
    return (torch.exp(-0.5 * d2 / sigma ** 2) * is_obj).unsqueeze(1)


class PositionUNet(AttributeUNet):
    """x_t (N, C, H, W), t (N,) int64, cond (N, 3) float -> eps (N, C, H, W); H, W divisible by
    2 ** (len(channels) - 1).

    The condition enters twice: globally (``PositionEmbedding`` added to the timestep embedding)
    and, with ``spatial=True``, as one extra input channel holding a Gaussian bump at (x, y)
    (``position_map``), which lets a small CPU-trained network learn placement in minutes."""

    ignore_for_config = ["n_values"]  # the base UNet's, fixed here

    @register_to_config
    def __init__(self, in_channels: int = 3, channels: Sequence[int] = (32, 64), blocks_per_level: int = 1,
                 attention: bool = True, heads: int = 4, groups: int = 8, spatial: bool = True):
        # The bump is one more input channel of the base UNet; its output conv maps to in_channels.
        super().__init__(n_values=[1], in_channels=in_channels + int(spatial), channels=channels,
                         blocks_per_level=blocks_per_level, attention=attention, heads=heads, groups=groups)
        self.register_to_config(in_channels=in_channels)  # the base UNet's registration (in_channels + 1) ran last
        self.cond = PositionEmbedding(4 * channels[0])
        self.spatial, self.out_channels = spatial, in_channels
        if spatial:
            self.conv_out = nn.Conv2d(self.conv_out.in_channels, in_channels, 3, padding=1)
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)

    @property
    def null(self) -> torch.Tensor:
        """(3,): the unconditional condition row."""
        return torch.tensor([0.0, 0.0, 2.0])

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if not isinstance(x_t, torch.Tensor) or x_t.dim() != 4 or x_t.shape[1] != self.out_channels:
            raise ValueError(f"x_t must be a tensor (N, {self.out_channels}, H, W), got "
                             f"{tuple(x_t.shape) if isinstance(x_t, torch.Tensor) else type(x_t).__name__}")
        if not isinstance(cond, torch.Tensor) or cond.shape != (x_t.shape[0], 3):
            raise ValueError(f"cond must be a float tensor (N, 3) = ({x_t.shape[0]}, 3), got "
                             f"{tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__}")
        if self.spatial:
            x_t = torch.cat([x_t, position_map(cond, x_t.shape[-2], x_t.shape[-1]).to(x_t.dtype)], 1)
        return super().forward(x_t, t, cond)


class _ImageRRRPotential(nn.Module):
    """h = 0.5 |g(x, t, c) - x|^2 summed over pixels, g any image eps-shaped network."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.net(x_t, t, cond) - x_t).pow(2).flatten(1).sum(1)


class PositionEnergyUNet(EnergyEps):
    """Energy-parameterized PositionUNet: an EpsModel with ``.energy`` (N,) and ``.energy_and_eps``."""

    def __init__(self, schedule: NoiseSchedule, net: PositionUNet | None = None, **unet_kw):
        """Around ``net`` (a trained PositionUNet), or a new PositionUNet(**unet_kw)."""
        if net is not None and unet_kw:
            raise TypeError(f"pass net or the PositionUNet arguments, not both (got {sorted(unet_kw)})")
        net = PositionUNet(**unet_kw) if net is None else net
        super().__init__(_ImageRRRPotential(net), schedule)
        self.config = dict(config_dict(net), energy=True)

    @property
    def null(self) -> torch.Tensor:
        return self.potential.net.null


def build_position_model(config: dict, schedule: NoiseSchedule) -> nn.Module:
    """Rebuild a PositionUNet / PositionEnergyUNet from its ``.config``."""
    kw = {k: v for k, v in config.items() if k not in ("kind", "energy")}
    return PositionEnergyUNet(schedule, **kw) if config.get("energy") else PositionUNet(**kw)
