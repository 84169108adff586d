"""Flow matching (rectified flow, as SD3 trains): x_t = (1 - t) x0 + t eps, t in [0, 1], and a
velocity model v(x_t, t, c) ~ E[eps - x0 | x_t] trained with |v - (eps - x0)|^2.

The path is a variance-preserving diffusion rescaled: x_t = c_t (a x0 + s eps) with c_t =
sqrt((1 - t)^2 + t^2), a = (1 - t) / c_t, s = t / c_t, so abar(t) = (1 - t)^2 / c_t^2; and a velocity
is an eps prediction in disguise, eps = x_t + (1 - t) v (``velocity_to_eps``), so
|eps - eps_hat|^2 = (1 - t)^2 |u - v|^2 with u = eps - x0. CompLift's lift carries over through
that identity (``compkern.lift.flow``).
"""
from __future__ import annotations

import torch

from diffusers.configuration_utils import register_to_config

from compkern.models.mlp import ConditionalMLP
from compkern.models.schedule import NoiseSchedule

__all__ = ["FlowMatchSchedule", "FlowVelocityMLP", "VelocityEps", "flow_abar", "flow_interpolate", "flow_scale", "velocity_to_eps"]


def flow_interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise, t (N,) broadcast over x0 (N, *S)."""
    tt = t.to(x0.dtype).reshape(-1, *([1] * (x0.dim() - 1)))
    return (1 - tt) * x0 + tt * noise


def velocity_to_eps(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The eps prediction a velocity makes: eps = x_t + (1 - t) v (x0 = x_t - t v)."""
    tt = t.to(x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))
    return x_t + (1 - tt) * v


def flow_scale(t: torch.Tensor) -> torch.Tensor:
    """c(t) = sqrt((1 - t)^2 + t^2), fp64: x_t = c (a x0 + s eps) is the variance-preserving x_t rescaled."""
    t = t.double()
    return ((1 - t) ** 2 + t ** 2).sqrt()


def flow_abar(t: torch.Tensor) -> torch.Tensor:
    """The variance-preserving level of flow time t: abar = (1 - t)^2 / ((1 - t)^2 + t^2)."""
    t = t.double()
    return (1 - t) ** 2 / ((1 - t) ** 2 + t ** 2)


class FlowMatchSchedule(NoiseSchedule):
    """The variance-preserving view of a flow-matching model whose timestep t in [0, T] means sigma
    = t / T (diffusers' FlowMatchEulerDiscreteScheduler, SD3: T = num_train_timesteps): x_flow =
    (1 - sigma) x0 + sigma eps = c x_vp with c = sqrt((1 - sigma)^2 + sigma^2) and abar(t) =
    ``flow_abar(sigma)``. Integer or float t in [0, T]; the table ``alphas_cumprod`` (T,) holds t
    = 0 .. T - 1 (abar(0) = 1, so betas[0] = 0: a flow model is not sampled by compkern's DDIM;
    it steps its flow-matching scheduler). Everything CompLift reads (add_noise, eps_to_x0,
    sample_t, the evenly spaced trials) works on it as on any NoiseSchedule."""

    def __init__(self, num_train_timesteps: int = 1000):
        T = int(num_train_timesteps)
        if T < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        self.T = T
        self.alphas_cumprod = flow_abar(torch.arange(T, dtype=torch.float64) / T)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.betas = 1 - self.alphas_cumprod / prev

    @classmethod
    def from_diffusers(cls, scheduler) -> "FlowMatchSchedule":
        return cls(scheduler.config.num_train_timesteps)

    def alphas_cumprod_at(self, t: torch.Tensor) -> torch.Tensor:
        """abar at timesteps t (N,) in [0, T], fp64: flow_abar(t / T)."""
        if not isinstance(t, torch.Tensor):
            t = torch.as_tensor(t)
        if not (t.is_floating_point() or t.dtype in (torch.int64, torch.int32)):
            raise TypeError(f"t must be a tensor of timesteps (int64 or float), got {t.dtype}")
        if t.numel() and (float(t.min()) < 0 or float(t.max()) > self.T):
            raise ValueError(f"t must lie in [0, {self.T}], got range [{float(t.min())}, {float(t.max())}]")
        return flow_abar(t.double() / self.T)


class VelocityEps(torch.nn.Module):
    """An EpsModel (variance-preserving x_t, t in [0, T], cond -> eps) over a velocity model
    ``velocity(x_flow, t float timesteps sigma * T, cond) -> v`` of a ``FlowMatchSchedule``: x_flow =
    c x_vp, eps = x_flow + (1 - sigma) v (``velocity_to_eps``), so CompLift's eps-loss difference
    is the flow-matching loss difference weighted by (1 - sigma)^2 at shared (noise, t)."""

    def __init__(self, velocity, schedule: FlowMatchSchedule):
        super().__init__()
        self.velocity, self.schedule = velocity, schedule

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        sigma = t.double() / self.schedule.T
        x_flow = x_t * flow_scale(sigma).to(x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))
        v = self.velocity(x_flow, t.double() if x_t.dtype == torch.float64 else t.float(), cond)
        return velocity_to_eps(x_flow, v.to(x_flow.dtype), sigma.to(x_flow.dtype))


class FlowVelocityMLP(ConditionalMLP):
    """ConditionalMLP as a velocity model: ``model(x_t (N, dim), t (N,) float in [0, 1], cond (N,)
    int64 in [0, num_classes]) -> v (N, dim)``; cond == ``null_id`` is unconditional."""

    ignore_for_config = ["num_steps", "out_dim"]  # fixed here: the flow time t in [0, 1] is embedded as 1000 t

    @register_to_config
    def __init__(self, num_classes: int, dim: int = 2, hidden: int = 128, depth: int = 3):
        super().__init__(num_classes, dim=dim, hidden=hidden, depth=depth, num_steps=1000)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if not isinstance(x_t, torch.Tensor) or not x_t.is_floating_point() or x_t.dim() != 2 or x_t.shape[1] != self.dim:
            raise ValueError(f"x_t must be a floating-point tensor (N, {self.dim})")
        N = x_t.shape[0]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.shape != (N,):
            raise TypeError(f"t must be a float tensor (N,) = ({N},) of flow times in [0, 1]")
        if N and (float(t.min()) < 0 or float(t.max()) > 1):
            raise ValueError(f"t must lie in [0, 1], got range [{float(t.min())}, {float(t.max())}]")
        if not isinstance(cond, torch.Tensor) or cond.dtype != torch.int64 or cond.shape != (N,):
            raise TypeError(f"cond must be an int64 tensor (N,) = ({N},) of class ids in [0, {self.num_classes}]")
        if N and (int(cond.min()) < 0 or int(cond.max()) > self.num_classes):
            raise ValueError(f"cond ids must lie in [0, {self.num_classes}], got [{int(cond.min())}, {int(cond.max())}]")
        return self.trunk(x_t, t * self.num_steps, cond, torch.arange(N, device=x_t.device))
