"""Discrete noise schedules: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t in [0, num_steps)."""
from __future__ import annotations

import math

import torch


class NoiseSchedule:
    """Holds ``betas`` and ``alphas_cumprod`` (num_steps,) in fp64 and converts between x0, eps,
    v and the score. Timesteps are int64 tensors (float ones interpolate: ``alphas_cumprod_at``)
    broadcast against the batch axis."""

    def __init__(self, betas: torch.Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1 or len(betas) < 2:
            raise ValueError(f"betas must be a 1-D tensor of at least 2 steps, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must lie in (0, 1)")
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def ddpm_linear(cls, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        """Ho et al. 2020: betas linear in [beta_start, beta_end]."""
        return cls(torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64))

    @classmethod
    def scaled_linear(cls, num_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> "NoiseSchedule":
        """Stable Diffusion's: sqrt(beta) linear."""
        return cls(torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=torch.float64) ** 2)

    @classmethod
    def cosine(cls, num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "NoiseSchedule":
        """Nichol & Dhariwal 2021: abar(t) = cos^2((t/T + s)/(1 + s) * pi/2) / abar(0)."""
        f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        betas = [min(1 - f((i + 1) / num_steps) / f(i / num_steps), max_beta) for i in range(num_steps)]
        return cls(torch.tensor(betas, dtype=torch.float64))

    @classmethod
    def from_diffusers(cls, scheduler) -> "NoiseSchedule":
        """From any diffusers scheduler that holds ``betas``."""
        return cls(scheduler.betas.to(torch.float64))

    # -- basics -------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return len(self.betas)

    def alphas_cumprod_at(self, t: torch.Tensor) -> torch.Tensor:
        """abar at timesteps t (N,), fp64: int64 t index the table; float t (the fractional
        timesteps of sigma-space samplers such as diffusers' Euler) interpolate sigma = sqrt((1 -
        abar) / abar) linearly between the neighbouring steps, as those schedulers do."""
        if not isinstance(t, torch.Tensor):
            t = torch.as_tensor(t)
        if not (t.is_floating_point() or t.dtype in (torch.int64, torch.int32)):
            raise TypeError(f"t must be a tensor of timesteps (int64, or float for fractional ones), got {t.dtype}")
        if t.numel() and (float(t.min()) < 0 or float(t.max()) > self.num_steps - 1):
            raise ValueError(f"t must lie in [0, {self.num_steps - 1}], got range [{float(t.min())}, {float(t.max())}]")
        abar = self.alphas_cumprod.to(t.device)
        if not t.is_floating_point():
            return abar[t]
        t = t.double()
        lo = t.floor().long().clamp(max=self.num_steps - 2)
        sig = ((1 - abar) / abar).sqrt()
        s = torch.lerp(sig[lo], sig[lo + 1], t - lo)
        return 1 / (1 + s * s)

    def _at(self, values, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """values(abar_t) shaped (N, 1, ..., 1) to broadcast against ``like`` (N, *S)."""
        v = values(self.alphas_cumprod_at(t)).to(like.device)
        v = v.to(like.dtype if like.is_floating_point() else torch.float32)
        return v.reshape(*v.shape, *([1] * (like.dim() - v.dim())))

    def sqrt_abar(self, t, like):
        return self._at(torch.sqrt, t, like)

    def sqrt_one_minus_abar(self, t, like):
        return self._at(lambda a: (1 - a).sqrt(), t, like)

    # -- conversions --------------------------------------------------------------------------
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        return self.sqrt_abar(t, x0) * x0 + self.sqrt_one_minus_abar(t, x0) * noise

    def eps_to_x0(self, x_t, eps, t):
        return (x_t - self.sqrt_one_minus_abar(t, x_t) * eps) / self.sqrt_abar(t, x_t)

    def x0_to_eps(self, x_t, x0, t):
        return (x_t - self.sqrt_abar(t, x_t) * x0) / self.sqrt_one_minus_abar(t, x_t)

    def eps_to_score(self, eps, t):
        """score = grad_x log p_t(x) = -eps / sqrt(1 - abar_t)."""
        return -eps / self.sqrt_one_minus_abar(t, eps)

    def score_to_eps(self, score, t):
        return -score * self.sqrt_one_minus_abar(t, score)

    def v_to_eps(self, x_t, v, t):
        """v = sqrt(abar) eps - sqrt(1 - abar) x0  =>  eps = sqrt(abar) v + sqrt(1 - abar) x_t."""
        return self.sqrt_abar(t, x_t) * v + self.sqrt_one_minus_abar(t, x_t) * x_t

    def v_target(self, x0, noise, t):
        return self.sqrt_abar(t, x0) * noise - self.sqrt_one_minus_abar(t, x0) * x0

    # -- timestep sampling --------------------------------------------------------------------
    def sample_t(self, n: int, *, probs: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Draw n timesteps, uniform or from ``probs`` (num_steps,). Returns (t (n,) int64,
        w (n,) fp32), w = (1/num_steps) / probs[t]: the importance weight that keeps
        E[w f(t)] equal to the uniform average of f."""
        if probs is None:
            t = torch.randint(0, self.num_steps, (n,), generator=generator)
            w = torch.ones(n)
        else:
            probs = torch.as_tensor(probs, dtype=torch.float64)
            if probs.shape != (self.num_steps,) or bool((probs < 0).any()) or float(probs.sum()) <= 0:
                raise ValueError(f"probs must be a non-negative (num_steps,) = ({self.num_steps},) tensor with positive sum")
            probs = probs / probs.sum()
            t = torch.multinomial(probs, n, replacement=True, generator=generator)
            w = ((1.0 / self.num_steps) / probs[t]).float()
        return t.to(device), w.to(device)

    def timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """Evenly spaced descending timesteps ("trailing" spacing: the first is num_steps - 1)."""
        if not 1 <= num_inference_steps <= self.num_steps:
            raise ValueError(f"num_inference_steps must lie in [1, {self.num_steps}], got {num_inference_steps}")
        # Exactly num_inference_steps levels (a float arange could add one, t = -1, when
        # num_steps is not a multiple of num_inference_steps).
        ts = torch.round(self.num_steps - torch.arange(num_inference_steps, dtype=torch.float64)
                         * (self.num_steps / num_inference_steps)).long() - 1
        return ts
