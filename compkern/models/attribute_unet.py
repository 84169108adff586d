"""Multi-attribute conditional eps-models: a small UNet for images and an MLP for vectors.

Both follow the EpsModel protocol ``model(x_t, t, cond) -> eps`` with ``cond`` (N, A) int64: one
value id per attribute, where id ``n_values[a]`` is attribute a's own null token (attribute
dropped). The condition embedding is the sum of one learned embedding per attribute, added to the
timestep embedding (the way diffusers feeds a class embedding), so any subset of attributes can be
conditioned on: the per-attribute marginals that compositional sampling needs.
"""
from __future__ import annotations

from typing import Sequence

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn
from torch.nn import functional as F


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t (N,) -> sinusoidal features (N, dim), [cos, sin]: diffusers' ``get_timestep_embedding``."""
    return get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)


class AttributeEmbedding(nn.Module):
    """cond (N, A) int64 -> (N, dim): sum over attributes of a per-attribute table of
    n_values[a] + 1 rows (the last row is attribute a's null token)."""

    def __init__(self, n_values: Sequence[int], dim: int):
        super().__init__()
        if not n_values or any(int(n) < 1 for n in n_values):
            raise ValueError(f"n_values must be a non-empty list of positive attribute sizes, got {n_values}")
        self.n_values = [int(n) for n in n_values]
        self.tables = nn.ModuleList(nn.Embedding(n + 1, dim) for n in self.n_values)

    @property
    def null(self) -> torch.Tensor:
        """(A,) int64: the null id of every attribute."""
        return torch.tensor(self.n_values, dtype=torch.long)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        A = len(self.n_values)
        if not isinstance(cond, torch.Tensor) or cond.dtype not in (torch.int64, torch.int32):
            raise TypeError("cond must be an integer tensor (N, A) of attribute ids")
        if cond.dim() != 2 or cond.shape[1] != A:
            raise ValueError(f"cond must have shape (N, A={A}), got {tuple(cond.shape)}")
        cond = cond.long()
        if bool((cond < 0).any()) or bool((cond > self.null.to(cond.device)).any()):
            raise ValueError(f"cond ids must lie in [0, n_values[a]] (n_values[a] = null), n_values={self.n_values}")
        return sum(table(cond[:, a]) for a, table in enumerate(self.tables))


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(min(groups, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return h + self.skip(x)


class _AttnBlock(nn.Module):
    def __init__(self, ch: int, heads: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(min(groups, ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        self.heads = heads

    def forward(self, x, emb=None):
        N, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(N, 3, self.heads, C // self.heads, H * W).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)  # (N, heads, HW, C/heads)
        return x + self.proj(h.transpose(-1, -2).reshape(N, C, H, W))


class AttributeUNet(ModelMixin, ConfigMixin):
    """Small UNet eps-model: x_t (N, C, H, W), t (N,) int64, cond (N, A) int64 -> eps (N, C, H, W).

    ``channels`` per resolution level (H and W must be divisible by 2 ** (levels - 1));
    ``attention`` adds self-attention at the lowest resolution (and in the middle block). A
    diffusers ModelMixin: ``save_pretrained`` / ``from_pretrained``, ``.config`` its arguments."""

    @register_to_config
    def __init__(self, n_values: Sequence[int], in_channels: int = 3, channels: Sequence[int] = (32, 64, 64),
                 blocks_per_level: int = 1, attention: bool = True, heads: int = 4, groups: int = 8):
        super().__init__()
        ch0 = channels[0]
        emb_dim = 4 * ch0
        self.time_dim = ch0
        self.time_mlp = nn.Sequential(nn.Linear(ch0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.cond = AttributeEmbedding(n_values, emb_dim)
        self.conv_in = nn.Conv2d(in_channels, ch0, 3, padding=1)
        self.down = nn.ModuleList()
        skips = [ch0]
        c = ch0
        for i, ch in enumerate(channels):
            for _ in range(blocks_per_level):
                self.down.append(_ResBlock(c, ch, emb_dim, groups))
                c = ch
                skips.append(c)
            if i + 1 < len(channels):
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid = nn.ModuleList([_ResBlock(c, c, emb_dim, groups)] + ([_AttnBlock(c, heads, groups)] if attention else [])
                                 + [_ResBlock(c, c, emb_dim, groups)])
        self.up = nn.ModuleList()
        for i, ch in reversed(list(enumerate(channels))):
            for _ in range(blocks_per_level + 1):
                self.up.append(_ResBlock(c + skips.pop(), ch, emb_dim, groups))
                c = ch
            if attention and i == len(channels) - 1:
                self.up.append(_AttnBlock(c, heads, groups))
            if i > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.norm_out = nn.GroupNorm(min(groups, c), c)
        self.conv_out = nn.Conv2d(c, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.levels = len(channels)

    @property
    def null(self) -> torch.Tensor:
        return self.cond.null

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if x_t.dim() != 4:
            raise ValueError(f"x_t must be (N, C, H, W), got {tuple(x_t.shape)}")
        f = 2 ** (self.levels - 1)
        if x_t.shape[-1] % f or x_t.shape[-2] % f:
            raise ValueError(f"x_t height and width must be divisible by {f}, got {tuple(x_t.shape[-2:])}")
        if t.shape != (x_t.shape[0],):
            raise ValueError(f"t must have shape (N,) = ({x_t.shape[0]},), got {tuple(t.shape)}")
        emb = self.time_mlp(timestep_embedding(t, self.time_dim)) + self.cond(cond)
        h = self.conv_in(x_t)
        hs = [h]
        for m in self.down:
            h = m(h, emb) if isinstance(m, _ResBlock) else m(h)
            hs.append(h)
        for m in self.mid:
            h = m(h, emb)
        for m in self.up:
            if isinstance(m, _ResBlock):
                h = m(torch.cat([h, hs.pop()], dim=1), emb)
            elif isinstance(m, _AttnBlock):
                h = m(h)
            else:
                h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AttributeMLP(ModelMixin, ConfigMixin):
    """MLP eps-model for vectors: x_t (N, D), t (N,) int64, cond (N, A) int64 -> eps (N, D)."""

    @register_to_config
    def __init__(self, n_values: Sequence[int], dim: int = 2, hidden: int = 128, depth: int = 3):
        super().__init__()
        self.time_dim = hidden
        self.time_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.cond = AttributeEmbedding(n_values, hidden)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
                                    for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    @property
    def null(self) -> torch.Tensor:
        return self.cond.null

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if x_t.dim() != 2:
            raise ValueError(f"x_t must be (N, D), got {tuple(x_t.shape)}")
        emb = self.time_mlp(timestep_embedding(t, self.time_dim)) + self.cond(cond)
        h = self.inp(x_t)
        for blk in self.blocks:
            h = h + blk(h + emb)
        return self.out(h)
