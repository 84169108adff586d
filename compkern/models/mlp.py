"""A small class-conditional eps-model for low-dimensional data (the 2-D toy compositions).

``ConditionalMLP(num_classes)`` is an EpsModel: ``model(x_t (N, dim), t (N,) int64, cond (N,) int64)
-> eps (N, dim)``, cond in [0, num_classes]; ``model.null_id == num_classes`` is the unconditional
id (trained by classifier-free dropout, see compkern.train.denoise).
"""
from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn

__all__ = ["ConditionalMLP", "timestep_embedding", "check_eps_inputs"]


def timestep_embedding(t: torch.Tensor, dim: int, num_steps: int) -> torch.Tensor:
    """Sinusoidal embedding (N, dim), [sin, cos], of t rescaled to 1000 steps (t (N,) integer or
    float timesteps): diffusers' ``get_timestep_embedding``."""
    return get_timestep_embedding(t.float() * (1000.0 / num_steps), dim, flip_sin_to_cos=False, downscale_freq_shift=0)


def check_eps_inputs(x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, *, dim: int, num_classes: int,
                     num_steps: int) -> None:
    """ValueError/TypeError naming the argument when x_t (N, dim), t (N,) int, cond (N,) int in
    [0, num_classes] do not fit."""
    if not isinstance(x_t, torch.Tensor) or not x_t.is_floating_point():
        raise TypeError("x_t must be a floating-point tensor (N, dim)")
    if x_t.dim() != 2 or x_t.shape[1] != dim:
        raise ValueError(f"x_t must have shape (N, {dim}), got {tuple(x_t.shape)}")
    N = x_t.shape[0]
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"t must be an int64 tensor (N,) = ({N},) of timesteps")
    if t.shape != (N,):
        raise ValueError(f"t must have shape (N,) = ({N},), got {tuple(t.shape)}")
    if not isinstance(cond, torch.Tensor) or cond.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"cond must be an int64 tensor (N,) = ({N},) of class ids in [0, {num_classes}]")
    if cond.shape != (N,):
        raise ValueError(f"cond must have shape (N,) = ({N},), got {tuple(cond.shape)}")
    if N and (int(cond.min()) < 0 or int(cond.max()) > num_classes):
        raise ValueError(f"cond ids must lie in [0, {num_classes}] ({num_classes} = null id), "
                         f"got range [{int(cond.min())}, {int(cond.max())}]")
    if N and (int(t.min()) < 0 or int(t.max()) >= num_steps):
        raise ValueError(f"t must lie in [0, {num_steps}), got range [{int(t.min())}, {int(t.max())}]")


class _Block(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, 2 * hidden)
        self.emb = nn.Linear(hidden, 2 * hidden)
        self.fc2 = nn.Linear(2 * hidden, hidden)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """h (N, hidden), emb (U, hidden) per distinct (t, cond) pair, index (N,) row -> pair."""
        return h + self.fc2(nn.functional.silu(self.fc1(nn.functional.silu(self.norm(h))) + self.emb(emb)[index]))


class ConditionalMLP(ModelMixin, ConfigMixin):
    """Residual MLP eps-model: input projection, ``depth`` residual blocks each adding a
    (time + class) embedding, zero-initialized output projection. Smooth (SiLU) throughout, so
    it can also serve as the vector field under an energy (see compkern.models.energy). A diffusers
    ModelMixin: ``save_pretrained`` / ``from_pretrained``, ``.config`` holds the arguments."""

    @register_to_config
    def __init__(self, num_classes: int, dim: int = 2, hidden: int = 128, depth: int = 3, num_steps: int = 1000,
                 out_dim: int | None = None):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.dim, self.hidden, self.depth, self.num_steps = num_classes, dim, hidden, depth, num_steps
        self.null_id = num_classes
        self.out_dim = dim if out_dim is None else out_dim
        self.inp = nn.Linear(dim, hidden)
        self.t_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.c_emb = nn.Embedding(num_classes + 1, hidden)
        self.blocks = nn.ModuleList(_Block(hidden) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, self.out_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x_t (N, dim), t (N,) int64, cond (N,) int64 in [0, num_classes] -> (N, out_dim)."""
        check_eps_inputs(x_t, t, cond, dim=self.dim, num_classes=self.num_classes, num_steps=self.num_steps)
        # the (time, class) embeddings depend on the pair only: compute them once per distinct pair
        # (a batched multi-condition call has few), then gather per row
        keys, inverse = torch.unique(t.long() * (self.num_classes + 1) + cond.long(), return_inverse=True)
        return self.trunk(x_t, keys // (self.num_classes + 1), keys % (self.num_classes + 1), inverse)

    def trunk(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The network on checked inputs: x_t (N, dim), the (time, class) pairs t (U,), cond (U,)
        (U distinct ones, t on the 0..num_steps scale, integer or not), index (N,) row -> pair."""
        temb = timestep_embedding(t, self.hidden, self.num_steps).to(x_t.dtype)
        emb = nn.functional.silu(self.t_mlp(temb) + self.c_emb(cond))
        h = self.inp(x_t)
        for blk in self.blocks:
            h = blk(h, emb, index)
        return self.out(nn.functional.silu(self.out_norm(h)))
