"""Energy-parameterized eps-models in the style of Reduce, Reuse, Recycle (Du et al. 2023).

A network outputs a scalar potential h(x_t, t, cond) (N,); the eps prediction is its gradient,
eps = grad_x h, and the energy at noise level t is E_t = h / sqrt(1 - abar_t), so that

    eps = sqrt(1 - abar_t) * grad_x E_t,     score = grad_x log p_t = -grad_x E_t,

i.e. E_t is the model's unnormalized -log p_t (up to a constant per t and condition). Samplers
ask for it with ``.energy`` / ``.energy_and_eps`` (Metropolis corrections, logsumexp mixtures).

``EnergyMLP`` uses RRR's potential h = 0.5 |g(x, t, c) - x|^2 with g a ConditionalMLP (g = 0 at
init, so eps = x_t: the exact eps of N(0, I) data).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from compkern.models.base import config_dict
from compkern.models.mlp import ConditionalMLP
from compkern.models.schedule import NoiseSchedule

__all__ = ["EnergyEps", "EnergyMLP", "is_energy_model"]


def is_energy_model(model) -> bool:
    """True when ``model`` exposes energies (``energy_and_eps``), as MALA, HMC and mixtures need."""
    return callable(getattr(model, "energy_and_eps", None))


class EnergyEps(nn.Module):
    """Wraps a scalar potential network ``potential(x_t (N, *S), t (N,), cond) -> (N,)`` into an
    EpsModel with energies. ``forward`` returns eps (N, *S); with autograd enabled on entry the
    gradient keeps its graph (create_graph) so the denoising loss trains the potential; under
    ``torch.no_grad()`` the outputs are detached."""

    def __init__(self, potential: nn.Module | Callable, schedule: NoiseSchedule):
        super().__init__()
        self.potential = potential
        self.register_buffer("sigmas", (1 - schedule.alphas_cumprod).sqrt().float(), persistent=False)
        for name in ("num_classes", "null_id", "dim", "num_steps"):
            if hasattr(potential, name):
                setattr(self, name, getattr(potential, name))

    def _sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.sigmas.to(like.device)[t.to(like.device)].to(like.dtype)

    def energy_and_eps(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t (N, *S), t (N,) int64, cond -> (E_t (N,), eps (N, *S)) from one forward and one
        backward pass."""
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            x = x_t if x_t.requires_grad else x_t.detach().requires_grad_(True)
            h = self.potential(x, t, cond)
            if h.shape != (x.shape[0],):
                raise ValueError(f"potential must return (N,) = ({x.shape[0]},) energies, got {tuple(h.shape)}")
            (eps,) = torch.autograd.grad(h.sum(), x, create_graph=create_graph)
        sigma = self._sigma(t, h)
        if not create_graph:
            h, eps = h.detach(), eps.detach()
        return h / sigma, eps

    def energy(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """E_t(x_t) (N,) = h / sqrt(1 - abar_t): the unnormalized -log p_t (up to a constant)."""
        h = self.potential(x_t, t, cond)
        if h.shape != (x_t.shape[0],):
            raise ValueError(f"potential must return (N,) = ({x_t.shape[0]},) energies, got {tuple(h.shape)}")
        return h / self._sigma(t, h)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """eps (N, *S) = sqrt(1 - abar_t) grad_x E_t = grad_x h."""
        return self.energy_and_eps(x_t, t, cond)[1]


class _RRRPotential(nn.Module):
    """h = 0.5 |g(x, t, c) - x|^2, g a ConditionalMLP."""

    def __init__(self, net: ConditionalMLP):
        super().__init__()
        self.net = net
        for name in ("num_classes", "null_id", "dim", "num_steps"):
            setattr(self, name, getattr(net, name))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.net(x_t, t, cond) - x_t).pow(2).flatten(1).sum(1)


class EnergyMLP(EnergyEps):
    """Class-conditional energy model for 2-D data: ``EnergyMLP(num_classes, schedule, dim=2,
    hidden=128, depth=3)``; an EpsModel ``(x_t (N, dim), t (N,), cond (N,)) -> eps (N, dim)``
    with ``.energy`` (N,), ``.energy_and_eps`` and ``null_id == num_classes``."""

    def __init__(self, num_classes: int, schedule: NoiseSchedule, dim: int = 2, hidden: int = 128, depth: int = 3):
        super().__init__(_RRRPotential(ConditionalMLP(num_classes, dim=dim, hidden=hidden, depth=depth,
                                                      num_steps=schedule.num_steps)), schedule)

    @property
    def config(self) -> dict:
        return {"energy": True, **config_dict(self.potential.net)}
