"""2-D toy distributions with exact log densities, and the compositions of Reduce, Reuse, Recycle.

Every component has ``.sample(n, generator=None) -> (n, 2) float32`` and an exact, normalized
``.log_prob(x (n, 2)) -> (n,)``. Composed targets (``Product``, ``Mixture``, ``Negation``) have a
known unnormalized ``.log_density(x) -> (n,)`` and draw exact samples by inverse-CDF sampling on a
fine grid (exact up to one grid cell, 0.008 by default, much finer than any component's width).

The default components (class id = index, as used by ``make_labeled_dataset``):

    0 ring   8 Gaussians (std 0.08) on a circle of radius 1
    1 bar    vertical soft bar: uniform on [-0.3, 0.3] x [-1.6, 1.6] blurred by N(0, 0.03^2)
    2 left   soft bar on [-0.6, -0.2] x [-1.2, 1.2]
    3 right  soft bar on [0.2, 0.6] x [-1.2, 1.2]
    4 plus   4 Gaussians (std 0.16) at the top/bottom/left/right ring positions

and the compositions (the RRR 2-D figure, scaled up by two, with a plus-shaped negated set so the
exact ratio p_a / p_b^alpha stays normalizable and crisp):

    product   ring AND bar           p_ring * p_bar              -> the two modes at (0, +-1)
    mixture   left OR right          (p_left + p_right) / 2      -> both bars
    negation  ring AND NOT plus      p_ring / p_plus^0.5         -> the four diagonal modes
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = [
    "Distribution2D", "GaussianMixture", "SoftBox", "ring", "grid", "gaussian",
    "ComposedTarget", "Product", "Mixture", "Negation", "CompositionTask",
    "default_components", "composition_tasks", "make_labeled_dataset",
    "energy_distance", "mmd_rbf", "hdr_threshold", "hdr_fraction",
]

_LOG_2PI = math.log(2 * math.pi)


def _check_points(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (n, 2), got {type(x).__name__}"
                        + (f" of dtype {x.dtype}" if isinstance(x, torch.Tensor) else ""))
    if x.dim() != 2 or x.shape[1] != 2:
        raise ValueError(f"{name} must have shape (n, 2), got {tuple(x.shape)}")


class Distribution2D:
    """A 2-D distribution: ``sample(n, generator) -> (n, 2) float32``, ``log_prob(x) -> (n,)``
    (exact, normalized, computed in fp64 and returned in the dtype of x)."""

    name: str = "dist"

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        """Same as log_prob (normalized); lets components and composed targets be used alike."""
        return self.log_prob(x)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class GaussianMixture(Distribution2D):
    """sum_m w_m N(means[m], diag(stds[m]^2)); means (M, 2), stds (M,) or (M, 2), weights (M,)."""

    def __init__(self, means, stds, weights=None, name: str = "gmm"):
        self.means = torch.as_tensor(means, dtype=torch.float64).reshape(-1, 2)
        M = self.means.shape[0]
        s = torch.as_tensor(stds, dtype=torch.float64)
        if s.dim() == 0:
            s = s.expand(M, 2)
        elif s.shape == (M,):
            s = s[:, None].expand(M, 2)
        elif s.numel() == 2 * M:
            s = s.reshape(M, 2)
        else:
            raise ValueError(f"stds must be a scalar, ({M},) or ({M}, 2), got {tuple(s.shape)}")
        self.stds = s.clone()
        if bool((self.stds <= 0).any()):
            raise ValueError("stds must be positive")
        w = torch.ones(M, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (M,) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(f"weights must be a non-negative ({M},) tensor with positive sum")
        self.weights = w / w.sum()
        self.name = name

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.stds[k] * z).float()

    def component_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """(n, M): log w_m + log N(x; mean_m, diag std_m^2)."""
        _check_points(x)
        xd = x.double().unsqueeze(1)
        z = (xd - self.means) / self.stds
        return (-0.5 * (z ** 2).sum(-1) - self.stds.log().sum(-1) - _LOG_2PI) + self.weights.log()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(self.component_log_probs(x), dim=1).to(x.dtype)


class SoftBox(Distribution2D):
    """Uniform on the box [low, high] convolved with N(0, smooth^2 I): exact log density
    sum_d log[(Phi((x_d - low_d)/s) - Phi((x_d - high_d)/s)) / (high_d - low_d)]."""

    def __init__(self, low: Sequence[float], high: Sequence[float], smooth: float = 0.03, name: str = "box"):
        self.low = torch.as_tensor(low, dtype=torch.float64)
        self.high = torch.as_tensor(high, dtype=torch.float64)
        if self.low.shape != (2,) or self.high.shape != (2,) or bool((self.high <= self.low).any()):
            raise ValueError("low and high must be (2,) with high > low")
        if smooth <= 0:
            raise ValueError(f"smooth must be positive, got {smooth}")
        self.smooth, self.name = float(smooth), name

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
        z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (self.low + u * (self.high - self.low) + self.smooth * z).float()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        _check_points(x)
        xd = x.double()
        a = (xd - self.high) / self.smooth
        b = (xd - self.low) / self.smooth  # per axis: log(Phi(b) - Phi(a)), a < b
        upper = a > 0  # both in the upper tail: use Phi(-a) - Phi(-b) instead (same value, no cancellation)
        u, v = torch.where(upper, -b, a), torch.where(upper, -a, b)
        log_v = torch.special.log_ndtr(v)
        diff = log_v + torch.log(-torch.expm1(torch.special.log_ndtr(u) - log_v))
        return (diff - (self.high - self.low).log()).sum(-1).to(x.dtype)


def ring(n: int = 8, radius: float = 1.0, std: float = 0.08, name: str = "ring") -> GaussianMixture:
    """n equal Gaussians of the given std at angles 2 pi k / n on a circle."""
    ang = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
    return GaussianMixture(radius * torch.stack([ang.cos(), ang.sin()], 1), std, name=name)


def grid(n: int = 3, spacing: float = 1.0, std: float = 0.08, name: str = "grid") -> GaussianMixture:
    """n x n equal Gaussians on a centred square grid."""
    c = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) * spacing
    gx, gy = torch.meshgrid(c, c, indexing="ij")
    return GaussianMixture(torch.stack([gx.flatten(), gy.flatten()], 1), std, name=name)


def gaussian(mean=(0.0, 0.0), std=(1.0, 1.0), name: str = "gaussian") -> GaussianMixture:
    """One Gaussian N(mean, diag(std^2))."""
    std = torch.as_tensor(std, dtype=torch.float64)
    return GaussianMixture(torch.as_tensor(mean, dtype=torch.float64).reshape(1, 2),
                           std.reshape(1, 2) if std.numel() == 2 else std.reshape(()), name=name)


# -- composed targets ---------------------------------------------------------------------------
class ComposedTarget:
    """A target with a known unnormalized ``log_density(x (n, 2)) -> (n,)`` and exact ``sample``
    by inverse-CDF sampling of the density on a ``resolution`` x ``resolution`` grid over
    [-extent, extent]^2 (uniform within the chosen cell)."""

    name = "composed"
    extent: float = 2.0
    resolution: int = 500

    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _grid(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        cache = getattr(self, "_grid_cache", None)
        if cache is None:
            r, e = self.resolution, self.extent
            h = 2 * e / r
            c = -e + h * (torch.arange(r, dtype=torch.float64) + 0.5)
            gx, gy = torch.meshgrid(c, c, indexing="ij")
            pts = torch.stack([gx.flatten(), gy.flatten()], 1)
            logd = torch.cat([self.log_density(p) for p in pts.split(1 << 16)]).double()
            if not bool(torch.isfinite(logd).any()):
                raise ValueError(f"{self.name}: the density is zero or not finite everywhere on the grid")
            prob = torch.softmax(logd, 0)
            cache = (pts, prob, h)
            self._grid_cache = cache
        return cache

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        pts, prob, h = self._grid()
        idx = torch.multinomial(prob.float(), n, replacement=True, generator=generator)
        jitter = (torch.rand(n, 2, generator=generator, dtype=torch.float64) - 0.5) * h
        return (pts[idx] + jitter).float()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class Product(ComposedTarget):
    """prod_i p_i(x)^{c_i}: log density sum_i c_i log p_i(x) (c defaults to all ones)."""

    def __init__(self, components: Sequence[Distribution2D], coeffs: Sequence[float] | None = None, name: str = "product"):
        if len(components) < 1:
            raise ValueError("components must hold at least one distribution")
        self.components = list(components)
        self.coeffs = [1.0] * len(components) if coeffs is None else [float(c) for c in coeffs]
        if len(self.coeffs) != len(self.components):
            raise ValueError(f"coeffs must have one entry per component ({len(self.components)}), got {len(self.coeffs)}")
        self.name = name

    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        _check_points(x)
        return sum(c * p.log_prob(x.double()) for c, p in zip(self.coeffs, self.components)).to(x.dtype)


class Negation(Product):
    """p_a(x) / p_b(x)^alpha ("a AND NOT b"), energy E_a - alpha E_b."""

    def __init__(self, a: Distribution2D, b: Distribution2D, alpha: float = 0.5, name: str = "negation"):
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        super().__init__([a, b], [1.0, -float(alpha)], name=name)
        self.alpha = float(alpha)


class Mixture(ComposedTarget):
    """sum_i w_i p_i(x) (normalized); samples are drawn exactly from the components."""

    def __init__(self, components: Sequence[Distribution2D], weights: Sequence[float] | None = None, name: str = "mixture"):
        self.components = list(components)
        w = torch.ones(len(components), dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (len(components),) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(f"weights must be non-negative, one per component ({len(components)}), with positive sum")
        self.weights = w / w.sum()
        self.name = name

    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        _check_points(x)
        lp = torch.stack([p.log_prob(x.double()) for p in self.components], 1) + self.weights.log()
        return torch.logsumexp(lp, 1).to(x.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        out = torch.empty(n, 2)
        for i, p in enumerate(self.components):
            m = k == i
            if bool(m.any()):
                out[m] = p.sample(int(m.sum()), generator=generator)
        return out


# -- the RRR 2-D setting ------------------------------------------------------------------------
def default_components() -> list[Distribution2D]:
    """The five components (class id = index): ring, bar, left, right, plus (see module doc)."""
    ring8 = ring(8, radius=1.0, std=0.08, name="ring")
    plus_means = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    return [
        ring8,
        SoftBox((-0.3, -1.6), (0.3, 1.6), smooth=0.03, name="bar"),
        SoftBox((-0.6, -1.2), (-0.2, 1.2), smooth=0.03, name="left"),
        SoftBox((0.2, -1.2), (0.6, 1.2), smooth=0.03, name="right"),
        GaussianMixture(plus_means, 0.16, name="plus"),
    ]


@dataclass
class CompositionTask:
    """One composition: ``kind`` in {"product", "mixture", "negation"}, ``classes`` the two class
    ids (into the component list) it composes, ``alpha`` the negation weight, ``target`` the exact
    composed target."""

    name: str
    kind: str
    classes: tuple[int, int]
    target: ComposedTarget
    alpha: float = 0.0


def composition_tasks(components: Sequence[Distribution2D] | None = None) -> dict[str, CompositionTask]:
    """The product / mixture / negation tasks over ``default_components()``."""
    c = list(default_components() if components is None else components)
    if len(c) < 5:
        raise ValueError("composition_tasks needs the five default components (ring, bar, left, right, plus)")
    return {
        "product": CompositionTask("product", "product", (0, 1), Product([c[0], c[1]], name="ring AND bar")),
        "mixture": CompositionTask("mixture", "mixture", (2, 3), Mixture([c[2], c[3]], name="left OR right")),
        "negation": CompositionTask("negation", "negation", (0, 4), Negation(c[0], c[4], 0.5, name="ring AND NOT plus"), 0.5),
    }


def make_labeled_dataset(components: Sequence[Distribution2D], n_per_class: int,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Class i = component i: returns x (N, 2) float32 and y (N,) int64, N = len(components) * n_per_class,
    shuffled with ``generator``."""
    if not components:
        raise ValueError("components must be a non-empty list of distributions")
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    xs = [p.sample(n_per_class, generator=generator) for p in components]
    x = torch.cat(xs).float()
    y = torch.arange(len(components)).repeat_interleave(n_per_class)
    perm = torch.randperm(len(y), generator=generator)
    return x[perm].contiguous(), y[perm].contiguous()


# -- metrics against exact samples ---------------------------------------------------------------
def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Energy distance 2 E|X-Y| - E|X-X'| - E|Y-Y'| (V-statistic, >= 0; 0 iff same law) between
    samples x (n, d) and y (m, d)."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must be (n, d) and (m, d), got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.double(), y.double()
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidth: float = 0.1) -> float:
    """Squared MMD (biased V-statistic) with the Gaussian kernel exp(-|a-b|^2 / (2 bandwidth^2))."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must be (n, d) and (m, d), got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.double(), y.double()
    k = lambda a, b: torch.exp(-torch.cdist(a, b) ** 2 / (2 * bandwidth ** 2)).mean()  # noqa: E731
    return float(k(x, x) + k(y, y) - 2 * k(x, y))


def hdr_threshold(target, exact_samples: torch.Tensor, mass: float = 0.95) -> float:
    """The log-density level whose super-level set holds ``mass`` of the target, estimated from
    exact samples (the (1 - mass) quantile of their log density)."""
    if not 0 < mass < 1:
        raise ValueError(f"mass must lie in (0, 1), got {mass}")
    return float(torch.quantile(target.log_density(exact_samples.double()), 1 - mass))


def hdr_fraction(target, samples: torch.Tensor, threshold: float) -> float:
    """Fraction of samples inside the target's high-density region {log_density >= threshold}
    (an exact sampler scores the region's mass; non-finite samples count as outside)."""
    _check_points(samples, "samples")
    ld = target.log_density(samples.double())
    return float(((ld >= threshold) & torch.isfinite(samples).all(1)).double().mean())


# -- added for CompLift's 2-D tasks (issue 7) ----------------------------------------------------
class Circle(Distribution2D):
    """A thin circle: angle uniform, radius ``radius + std * N(0, 1)`` around ``center``. Exact
    density N(rho; radius, std^2) / (2 pi rho), rho = |x - center| (the mass of rho < 0, about
    Phi(-radius / std), is negligible for thin circles)."""

    def __init__(self, center=(0.0, 0.0), radius: float = 1.0, std: float = 0.02, name: str = "circle"):
        self.center = torch.as_tensor(center, dtype=torch.float64).reshape(2)
        if radius <= 0 or std <= 0:
            raise ValueError(f"radius and std must be positive, got {radius}, {std}")
        self.radius, self.std, self.name = float(radius), float(std), name

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        th = torch.rand(n, generator=generator, dtype=torch.float64) * (2 * math.pi)
        rho = self.radius + self.std * torch.randn(n, generator=generator, dtype=torch.float64)
        return (self.center + rho[:, None] * torch.stack([th.cos(), th.sin()], 1)).float()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        _check_points(x)
        rho = (x.double() - self.center).norm(dim=1).clamp_min(1e-12)
        z = (rho - self.radius) / self.std
        return (-0.5 * z.square() - 0.5 * _LOG_2PI - math.log(self.std) - math.log(2 * math.pi) - rho.log()).to(x.dtype)
