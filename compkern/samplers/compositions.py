"""Compositions of one conditional model's conditions, for reverse diffusion and annealed MCMC.

    product   E = sum_k c_k E_k          eps = sum_k c_k eps_k           (c = 1: "a AND b")
    negation  E = E_a - alpha E_b        eps = eps_a - alpha eps_b       ("a AND NOT b")
    mixture   E = -logsumexp_k(-E_k + log w_k)
              eps = sum_k pi_k eps_k, pi = softmax_k(-E_k + log w_k)     ("a OR b"; energies needed)

Every composition is an eps callable ``comp(x_t (B, *S), t (B,)) -> (B, *S)`` (what ddim_sample /
ddpm_sample take) and, when the model is energy-parameterized (compkern.models.energy),
``comp.energy_and_eps(x_t, t) -> (E (B,), eps (B, *S))`` (what MALA and HMC need). The K
conditions are evaluated as one condition-major batch of K x B rows; the linear combinations go
through ops.combine_eps (base row = the first condition, total weight S = sum c_k factored out:
sum_k c_k p_k = S * combine_eps(p, c[1:] / S)); the mixture's per-sample softmax weights go in
as combine_eps's (B, K) weights. ``n_evals`` counts model rows evaluated.

The energies E_k of a trained model are unnormalized: each carries an unknown constant per
condition and noise level, which for a mixture shifts the mixture weights (a product or a
negation only shifts E by a constant, which no sampler sees).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from compkern.data.clevr import background_cond, null_cond, position_cond
from compkern.models.base import EpsModel, stack_conditions
from compkern.models.energy import is_energy_model
from compkern.models.position_unet import position_sampling_schedule
from compkern.ops import combine_eps
from compkern.samplers.composed import ComposedEps

__all__ = ["Composition", "LinearComposition", "MixtureComposition", "POSITION_METHODS", "POSITION_MCMC_STEP",
           "compose_positions", "mixture", "negation", "position_conditions", "product"]


def _t_vec(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, device=x.device)
    return t.expand(x.shape[0]) if t.dim() == 0 else t


class Composition:
    """Base: holds the model, the K conditions and the evaluation counter."""

    def __init__(self, model: EpsModel, conds: Sequence[Any] | torch.Tensor, *, chunk_size: int | None = None,
                 backend: str = "auto"):
        if isinstance(conds, torch.Tensor):
            K = conds.shape[0]
        elif isinstance(conds, (list, tuple)):
            K = len(conds)
        else:
            raise TypeError(f"conds must be a list of K conditions or a (K, B, *C) tensor, got {type(conds).__name__}")
        if K < 1:
            raise ValueError("conds must hold at least one condition")
        self.model, self.conds, self.K = model, conds, K
        self.chunk_size, self.backend = chunk_size, backend
        self.n_evals = 0

    @property
    def has_energy(self) -> bool:
        return is_energy_model(self.model)

    def _energies_and_eps(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(E (K, B), eps (K, B, *S)) from one stacked energy_and_eps call (in chunks)."""
        if not self.has_energy:
            raise ValueError("this needs energies: the model must be energy-parameterized (e.g. compkern.models.EnergyMLP)")
        B = x_t.shape[0]
        t = _t_vec(t, x_t)
        if t.shape != (B,):
            raise ValueError(f"t must have shape () or (B,) = ({B},), got {tuple(t.shape)}")
        c = stack_conditions(self.conds, B).to(x_t.device)
        if c.shape[0] != self.K:
            raise ValueError(f"conds must stack to (K={self.K}, B, *C), got {tuple(c.shape)}")
        rows = self.K * B
        xr = x_t.unsqueeze(0).expand(self.K, *x_t.shape).reshape(rows, *x_t.shape[1:])
        tr, cr = t.repeat(self.K), c.reshape(rows, *c.shape[2:])
        step = rows if self.chunk_size is None else self.chunk_size
        Es, eps = [], []
        for s in range(0, rows, step):
            e, g = self.model.energy_and_eps(xr[s:s + step], tr[s:s + step], cr[s:s + step])
            Es.append(e)
            eps.append(g)
        self.n_evals += rows
        return torch.cat(Es).view(self.K, B), torch.cat(eps).view(self.K, *x_t.shape)


class LinearComposition(Composition):
    """E = sum_k coeffs[k] E_k, eps = sum_k coeffs[k] eps_k (product: all ones; negation: [1, -alpha]).
    Needs sum(coeffs) != 0."""

    def __init__(self, model: EpsModel, conds, coeffs: Sequence[float] | torch.Tensor, **kw):
        super().__init__(model, conds, **kw)
        self.coeffs = torch.as_tensor(coeffs, dtype=torch.float32).flatten()
        if self.coeffs.shape != (self.K,):
            raise ValueError(f"coeffs must have one entry per condition: ({self.K},), got {tuple(self.coeffs.shape)}")
        if not bool(torch.isfinite(self.coeffs).all()):
            raise ValueError("coeffs must be finite")
        self.total = float(self.coeffs.sum())
        if abs(self.total) < 1e-8:
            raise ValueError(f"coeffs must not sum to zero (got {self.coeffs.tolist()}): the composed score would "
                             "not depend on the base condition's scale")
        # eps = S * combine_eps(preds, c[1:] / S), preds[0] = the first condition (base row).
        w = self.coeffs[1:] / self.total
        self._combine_weights = w if self.K > 1 else None
        self._eps = ComposedEps(model, conds, w, chunk_size=self.chunk_size, backend=self.backend) if self.K > 1 else None

    def _combine(self, preds: torch.Tensor) -> torch.Tensor:
        if self.K == 1:
            return self.total * preds[0]
        return self.total * combine_eps(preds, self._combine_weights.to(preds.device), backend=self.backend)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Composed eps (B, *S) through ComposedEps (no energies needed)."""
        if self._eps is None:
            self.n_evals += x_t.shape[0]
            c = stack_conditions(self.conds, x_t.shape[0]).to(x_t.device)[0]
            return self.total * self.model(x_t, _t_vec(t, x_t), c)
        before = self._eps.n_evals
        out = self.total * self._eps(x_t, _t_vec(t, x_t))
        self.n_evals += self._eps.n_evals - before
        return out

    def energy_and_eps(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(E (B,), eps (B, *S)) of the composition."""
        E, eps = self._energies_and_eps(x_t, t)
        return (self.coeffs.to(E)[:, None] * E).sum(0), self._combine(eps)


class MixtureComposition(Composition):
    """E = -logsumexp_k(-E_k + log w_k); eps = sum_k softmax_k(-E_k + log w_k) eps_k. Needs an
    energy-parameterized model (ValueError otherwise)."""

    def __init__(self, model: EpsModel, conds, weights: Sequence[float] | torch.Tensor | None = None, **kw):
        super().__init__(model, conds, **kw)
        if not is_energy_model(model):
            raise ValueError("a mixture needs energies (logsumexp of -E_k): pass an energy-parameterized model "
                             "(compkern.models.EnergyMLP / EnergyEps), not a plain eps model")
        if self.K < 2:
            raise ValueError("a mixture needs at least two conditions")
        w = torch.ones(self.K) if weights is None else torch.as_tensor(weights, dtype=torch.float32).flatten()
        if w.shape != (self.K,) or bool((w <= 0).any()):
            raise ValueError(f"weights must be positive, one per condition ({self.K},)")
        self.log_w = (w / w.sum()).log()

    def energy_and_eps(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        E, eps = self._energies_and_eps(x_t, t)
        logits = -E + self.log_w.to(E)[:, None]  # (K, B)
        pi = torch.softmax(logits, 0)
        out = combine_eps(eps, pi[1:].T.contiguous().to(eps.dtype), backend=self.backend)
        return -torch.logsumexp(logits, 0), out

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.energy_and_eps(x_t, t)[1]


def product(model: EpsModel, conds, weights: Sequence[float] | None = None, **kw) -> LinearComposition:
    """"AND": E = sum_k w_k E_k (w = 1 by default), the product of the conditionals."""
    K = conds.shape[0] if isinstance(conds, torch.Tensor) else len(conds)
    return LinearComposition(model, conds, [1.0] * K if weights is None else weights, **kw)


def negation(model: EpsModel, cond_a, cond_b, alpha: float = 0.5, **kw) -> LinearComposition:
    """"a AND NOT b": E = E_a - alpha E_b, target p_a / p_b^alpha (alpha in (0, 1) keeps the
    score's total weight positive)."""
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    return LinearComposition(model, [cond_a, cond_b], [1.0, -float(alpha)], **kw)


def mixture(model: EpsModel, conds, weights: Sequence[float] | None = None, **kw) -> MixtureComposition:
    """"OR": p proportional to sum_k w_k exp(-E_k); needs an energy-parameterized model."""
    return MixtureComposition(model, conds, weights, **kw)


# -- multi-object positions: n objects composed from a one-object model (compkern.data.clevr) ----
POSITION_METHODS = {"reverse": "reverse diffusion", "ula": "annealed ULA", "mala": "annealed MALA", "hmc": "annealed HMC"}
POSITION_MCMC_STEP = {"ula": 0.1, "mala": 0.1, "hmc": 0.3}  # MALA / HMC acceptance ~0.9-1 at half these (tuning log)


def position_conditions(positions: torch.Tensor, base: str) -> torch.Tensor:
    """positions (B, n, 2) -> condition-major (n + 1, B, 3): the base row (null or background),
    then one object row per position."""
    if base not in ("null", "background"):
        raise ValueError(f"base must be 'null' or 'background', got {base!r}")
    positions = torch.as_tensor(positions, dtype=torch.float32)
    if positions.dim() != 3 or positions.shape[-1] != 2:
        raise ValueError(f"positions must have shape (B, n, 2), got {tuple(positions.shape)}")
    B = positions.shape[0]
    b = (null_cond() if base == "null" else background_cond()).expand(1, B, 3)
    return torch.cat([b, position_cond(positions).transpose(0, 1)])


def compose_positions(model, positions: torch.Tensor, *, method: str = "reverse", base: str = "background",
                   scale: float = 1.0, steps: int = 50, eta: float = 1.0, mcmc_steps: int = 2,
                   step_size: float | None = None, leapfrog: int = 3, size: int = 24, clip_x0: float | None = None,
                   chunk_size: int | None = None, progress: bool = False,
                   generator: torch.Generator | None = None) -> dict:
    """Sample B scenes, scene b with objects at positions[b] (B, n, 2), by composing the
    one-object model. Returns {"x": (B, 3, size, size), "n_evals": model rows, "accept": mean
    Metropolis acceptance or None, "step_sizes": the MCMC step per level (list) or None}. n = 0
    samples the base condition alone. ``chunk_size`` caps the rows per model call (on a CPU ~128
    rows run faster per row than one large call); ``clip_x0`` clamps the predicted x0."""
    from compkern.samplers.diffusion import ddim_sample
    from compkern.samplers.mcmc import annealed_mcmc

    if method not in POSITION_METHODS:
        raise ValueError(f"method must be one of {list(POSITION_METHODS)}, got {method!r}")
    conds = position_conditions(positions, base)
    B, n = positions.shape[0], positions.shape[1]
    sch = position_sampling_schedule()
    x_T = torch.randn(B, 3, size, size, generator=generator)
    with torch.no_grad():
        if method == "reverse":
            fn = ComposedEps(model, conds, torch.full((n,), float(scale)), chunk_size=chunk_size)
            x = ddim_sample(fn, x_T, sch, num_steps=steps, eta=eta, clip_x0=clip_x0, generator=generator,
                            progress=progress)
            return {"x": x, "n_evals": fn.n_evals, "accept": None, "step_sizes": None}
        comp = LinearComposition(model, conds, [1.0 - n * scale] + [float(scale)] * n, chunk_size=chunk_size)
        res = annealed_mcmc(comp, x_T, sch, kind=method, num_levels=steps, steps_per_level=mcmc_steps,
                            step_size=POSITION_MCMC_STEP[method] if step_size is None else step_size,
                            leapfrog_steps=leapfrog, clip_x0=clip_x0, generator=generator, progress=progress)
        return {"x": res.x, "n_evals": res.n_evals, "accept": res.mean_accept,
                "step_sizes": res.step_sizes.tolist()}
