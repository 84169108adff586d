"""An eps model with a closed form: isotropic Gaussian classes, the null condition being their
mixture. Used to test and benchmark lift estimators against the exact answer.

Class k: x0 ~ N(mu_k, s_k^2 I). Under x_t = a x0 + sqrt(1 - a^2) eps (a = sqrt(abar_t)),
x_t | k ~ N(a mu_k, v_k I) with v_k = a^2 s_k^2 + 1 - a^2, so the exact eps prediction is
eps_k(x_t) = sqrt(1 - a^2) (x_t - a mu_k) / v_k, and the null's is the posterior-weighted average.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from compkern.models.schedule import NoiseSchedule


class GaussianClassesEps(torch.nn.Module):
    """EpsModel ``forward(x_t (N, D), t (N,) int64, cond (N,) int64) -> eps (N, D)``, exact.

    means (K, D), stds (K,), priors (K,) or None (uniform); cond == K (``null_id``) is the mixture."""

    def __init__(self, means: torch.Tensor, stds: torch.Tensor, schedule: NoiseSchedule,
                 priors: torch.Tensor | None = None):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        stds = torch.as_tensor(stds, dtype=torch.float64)
        if means.dim() != 2 or stds.shape != (means.shape[0],):
            raise ValueError(f"means must be (K, D) and stds (K,), got {tuple(means.shape)} and {tuple(stds.shape)}")
        priors = torch.full((means.shape[0],), 1.0 / means.shape[0], dtype=torch.float64) if priors is None \
            else torch.as_tensor(priors, dtype=torch.float64) / float(torch.as_tensor(priors).sum())
        self.register_buffer("means", means)
        self.register_buffer("stds", stds)
        self.register_buffer("priors", priors)
        self.register_buffer("abar", schedule.alphas_cumprod.clone())
        self.schedule = schedule

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    @property
    def null_id(self) -> int:
        return self.num_classes

    def _class_terms(self, x: torch.Tensor, abar: torch.Tensor):
        """x (N, D) fp64, abar (N,) -> eps per class (N, K, D) and log N(x; a mu_k, v_k) (N, K)."""
        a = abar.sqrt()[:, None]  # (N, 1)
        v = a.square() * self.stds.square()[None] + (1 - a.square())  # (N, K)
        diff = x[:, None, :] - a[:, :, None] * self.means[None]  # (N, K, D)
        eps = (1 - a.square()).sqrt()[:, :, None] * diff / v[:, :, None]
        D = x.shape[1]
        logp = -0.5 * diff.square().sum(-1) / v - 0.5 * D * torch.log(2 * math.pi * v)
        return eps, logp

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.eps_at(x_t, self.abar[t], cond)

    def eps_at(self, x_t: torch.Tensor, abar: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The exact eps at any level: x_t (N, D), abar (N,) in (0, 1), cond (N,) -> (N, D)."""
        x = x_t.double()
        eps_k, logp = self._class_terms(x, abar.double().to(x.device))
        cond = torch.as_tensor(cond, device=x.device).long()
        post = torch.softmax(logp + self.priors.log()[None], dim=1)  # (N, K)
        eps_null = (post[:, :, None] * eps_k).sum(1)
        k = cond.clamp(max=self.num_classes - 1)
        eps_c = eps_k[torch.arange(len(x), device=x.device), k]
        out = torch.where((cond == self.null_id)[:, None], eps_null, eps_c)
        return out.to(x_t.dtype)

    # -- exact references -----------------------------------------------------------------------
    def log_density_ratio(self, x0: torch.Tensor) -> torch.Tensor:
        """(K, B): log p(x0 | k) - log p(x0), the lift as a density ratio."""
        x = x0.double()
        D = x.shape[1]
        v = self.stds.square()
        diff = x[:, None, :] - self.means[None]
        logp = -0.5 * diff.square().sum(-1) / v - 0.5 * D * torch.log(2 * math.pi * v)  # (B, K)
        logmix = torch.logsumexp(logp + self.priors.log()[None], dim=1)
        return (logp - logmix[:, None]).t()

    @torch.no_grad()
    def lift_profile(self, x0: torch.Tensor, *, nodes: int = 16, t_stride: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact E_eps[d | t] and E_eps[d^2 | t] by Gauss-Hermite quadrature over eps (D = 2 or less).

        x0 (B, D) -> (mean (T', K, B), second moment (T', K, B)) on t = 0, t_stride, ..., where
        d = |eps - eps_null|^2 - |eps - eps_k|^2 (the CompLift trial value)."""
        B, D = x0.shape
        if D > 2:
            raise ValueError(f"lift_profile uses a tensor quadrature grid: D <= 2, got D = {D}")
        g, w = np.polynomial.hermite_e.hermegauss(nodes)  # weight exp(-x^2/2)
        g = torch.tensor(g, dtype=torch.float64)
        w = torch.tensor(w / w.sum(), dtype=torch.float64)
        if D == 2:
            e = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
            we = (w[:, None] * w[None, :]).reshape(-1)
        else:
            e, we = g[:, None], w
        ts = torch.arange(0, self.abar.shape[0], t_stride)
        K = self.num_classes
        x0d = x0.double()
        means, seconds = [], []
        for t in ts.tolist():
            ab = self.abar[t]
            xt = ab.sqrt() * x0d[:, None, :] + (1 - ab).sqrt() * e[None]  # (B, E, D)
            flat = xt.reshape(-1, D)
            abv = ab.expand(flat.shape[0])
            eps_k, logp = self._class_terms(flat, abv)
            post = torch.softmax(logp + self.priors.log()[None], dim=1)
            eps_null = (post[:, :, None] * eps_k).sum(1)  # (B*E, D)
            ee = e[None].expand(B, -1, -1).reshape(-1, D)
            dn = (ee - eps_null).square().sum(-1)  # (B*E,)
            dk = (ee[:, None] - eps_k).square().sum(-1)  # (B*E, K)
            d = (dn[:, None] - dk).reshape(B, -1, K)  # (B, E, K)
            means.append((we[None, :, None] * d).sum(1).t())
            seconds.append((we[None, :, None] * d.square()).sum(1).t())
        return torch.stack(means), torch.stack(seconds)

    def true_lift(self, x0: torch.Tensor, *, nodes: int = 16) -> torch.Tensor:
        """(K, B): the exact estimand E_{t ~ U[0, T), eps}[d] of every CompLift estimator."""
        return self.lift_profile(x0, nodes=nodes)[0].mean(0)


def cached_true_lift(model: GaussianClassesEps, x0: torch.Tensor, path, *, nodes: int = 10) -> torch.Tensor:
    """model.true_lift(x0, nodes=nodes) (K, B), kept in the torch file ``path`` and reused while the
    file holds the same x0 (the quadrature costs minutes for a few thousand samples)."""
    from pathlib import Path

    from compkern.utils.checkpoint import atomic_save, load

    path = Path(path)
    if path.exists():
        saved = load(path)
        if torch.equal(saved["x0"], x0):
            return saved["truth"]
    truth = model.true_lift(x0, nodes=nodes)
    atomic_save({"x0": x0, "truth": truth}, path)
    return truth
