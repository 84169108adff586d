"""annealed_mcmc with its default (adaptive) steps on compositions of isotropic Gaussians, whose
annealed targets are known exactly at every level; the per-level state reset; adaptation inputs."""
import math

import pytest
import torch

from compkern.models import NoiseSchedule
from compkern.samplers import annealed_mcmc, mixture, negation, product
from compkern.samplers.mcmc import TARGET_ACCEPT


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread avoids oversubscription

SCHED = NoiseSchedule.cosine(100)
N_CHAINS = 4000


class IsotropicGaussianEnergy:
    """Exact energy model: class k is N(mu_k, s_k^2 I) in D dims; at level t its marginal is
    N(a mu_k, v_k I), a^2 = abar_t, v_k = a^2 s_k^2 + 1 - a^2, and E_t = |x - a mu_k|^2 / (2 v_k)
    + (D / 2) log v_k is its exact -log density up to a constant shared by all classes (so mixture
    weights come out right); eps = sigma_t grad E_t. Computed in float64."""

    def __init__(self, mus, stds, schedule: NoiseSchedule):
        self.mus = torch.as_tensor(mus, dtype=torch.float64)  # (K, D)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)  # (K,)
        self.abar = schedule.alphas_cumprod
        self.null_id = len(self.mus)

    def level(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Means (K, D) and variances (K,) of the class marginals at level t."""
        a2 = float(self.abar[t])
        return math.sqrt(a2) * self.mus, a2 * self.stds ** 2 + 1 - a2

    def energy_and_eps(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor):
        """x (N, D), t (N,), cond (N,) -> (E (N,), eps (N, D)) in x's dtype."""
        a2 = self.abar[t][:, None]
        m, v = a2.sqrt() * self.mus[cond], a2 * self.stds[cond][:, None] ** 2 + 1 - a2
        xd = x.double()
        E = 0.5 * ((xd - m) ** 2).sum(1) / v[:, 0] + 0.5 * x.shape[1] * v[:, 0].log()
        return E.to(x.dtype), ((1 - a2).sqrt() * (xd - m) / v).to(x.dtype)

    def __call__(self, x, t, cond):
        return self.energy_and_eps(x, t, cond)[1]


def linear_target(model: IsotropicGaussianEnergy, coeffs, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (mean (D,), std (D,)) of prod_k p_k,t^coeffs[k] (product: [1, 1]; negation: [1, -alpha])."""
    m, v = model.level(t)
    c = torch.as_tensor(coeffs, dtype=torch.float64)
    prec = float((c / v).sum())
    assert prec > 0, "the composition must be normalizable"
    mean = (c[:, None] * m / v[:, None]).sum(0) / prec
    return mean, torch.full_like(mean, prec ** -0.5)


def mixture_target(model: IsotropicGaussianEnergy, weights, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (mean (D,), std (D,)) of sum_k w_k p_k,t (w normalized)."""
    m, v = model.level(t)
    w = torch.as_tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    mean = (w[:, None] * m).sum(0)
    second = (w[:, None] * (v[:, None] + m ** 2)).sum(0)
    return mean, (second - mean ** 2).sqrt()


LIN = IsotropicGaussianEnergy([[1.0, 0.0], [0.0, 1.0]], [0.5, 0.8], SCHED)
MIX = IsotropicGaussianEnergy([[-1.0, 0.5], [1.0, -0.5]], [0.3, 0.5], SCHED)
COMPOSITIONS = {
    "product": (lambda: product(LIN, [0, 1]), lambda t: linear_target(LIN, [1.0, 1.0], t)),
    "negation": (lambda: negation(LIN, 0, 1, alpha=0.5), lambda t: linear_target(LIN, [1.0, -0.5], t)),
    "mixture": (lambda: mixture(MIX, [0, 1], weights=[1.0, 3.0]), lambda t: mixture_target(MIX, [1.0, 3.0], t)),
}
# Bands: std within 3.5% for MALA/HMC (3 standard errors at 4000 chains); 5% for ULA, which keeps
# a discretization bias of about +2% in std at its target acceptance 0.99. Mean within 0.06 std.
STD_TOL = {"ula": 0.05, "mala": 0.035, "hmc": 0.035}
ACCEPT_BAND = {"mala": (0.50, 0.65), "hmc": (0.68, 0.82)}  # mean acceptance over the levels


@pytest.mark.parametrize("kind", ["ula", "mala", "hmc"])
@pytest.mark.parametrize("name", list(COMPOSITIONS))
def test_defaults_match_exact_level_target(name, kind):
    make, target = COMPOSITIONS[name]
    g = torch.Generator().manual_seed(3)
    res = annealed_mcmc(make(), torch.randn(N_CHAINS, 2, generator=g), SCHED, kind=kind, final_denoise=False,
                        generator=g)
    mean, std = target(int(res.timesteps[-1]))
    x = res.x.double()
    mean_err = ((x.mean(0) - mean) / std).abs().max()
    std_err = (x.std(0) / std - 1).abs().max()
    assert mean_err < 0.06, (x.mean(0), mean)
    assert std_err < STD_TOL[kind], (x.std(0), std)
    assert res.step_sizes.shape == (50,) and bool((res.step_sizes > 0).all())
    assert res.target_accept == TARGET_ACCEPT[kind]
    if kind == "ula":
        assert res.accept_rates is None
    else:
        lo, hi = ACCEPT_BAND[kind]
        assert lo < res.mean_accept < hi, res.accept_rates
        # after the first levels (the start from step_size) every level sits near the target
        assert float((res.accept_rates[3:] - res.target_accept).abs().max()) < 0.1, res.accept_rates


def test_fixed_noise_scaled_steps_are_too_small_at_low_noise():
    """The failure adaptation fixes: without it the default steps barely move the chains at low noise."""
    make, target = COMPOSITIONS["product"]
    g = torch.Generator().manual_seed(3)
    res = annealed_mcmc(make(), torch.randn(N_CHAINS, 2, generator=g), SCHED, kind="mala", adapt=False,
                        final_denoise=False, generator=g)
    _, std = target(int(res.timesteps[-1]))
    assert float((res.x.double().std(0) / std).max()) < 0.95  # too narrow: reverse diffusion's bias kept
    assert res.target_accept is None and res.mean_accept > 0.95
    sig2 = 1 - SCHED.alphas_cumprod[res.timesteps]
    torch.testing.assert_close(res.step_sizes, 0.05 * sig2)


def test_custom_target_accept_is_reached():
    g = torch.Generator().manual_seed(0)
    res = annealed_mcmc(COMPOSITIONS["product"][0](), torch.randn(1000, 2, generator=g), SCHED, kind="mala",
                        num_levels=20, target_accept=0.9, adapt_steps=10, generator=g)
    assert res.target_accept == 0.9
    assert float((res.accept_rates[3:] - 0.9).abs().max()) < 0.05, res.accept_rates


class RecordingComposition:
    """Wraps a composition and records the level t of every energy/eps call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    @property
    def n_evals(self) -> int:
        return self.inner.n_evals

    def energy_and_eps(self, x, t):
        self.calls.append(int(t[0]))
        return self.inner.energy_and_eps(x, t)

    def __call__(self, x, t):
        self.calls.append(int(t[0]))
        return self.inner(x, t)


@pytest.mark.parametrize("diffusion_step", [False, True])
@pytest.mark.parametrize("kind,per_step", [("ula", 1), ("mala", 1), ("hmc", 3)])
def test_every_level_starts_with_its_own_energy_and_eps(kind, per_step, diffusion_step):
    comp = RecordingComposition(product(LIN, [0, 1]))
    res = annealed_mcmc(comp, torch.randn(16, 2), SCHED, kind=kind, num_levels=4, steps_per_level=3,
                        diffusion_step=diffusion_step, generator=torch.Generator().manual_seed(0))
    levels = res.timesteps.tolist()
    # one evaluation at the level's own t before its first proposal, then per_step per MCMC step
    assert [comp.calls.count(t) for t in levels] == [1 + 3 * per_step] * 4, comp.calls
    assert comp.calls == [t for t in levels for _ in range(1 + 3 * per_step)]
    assert res.n_grad_calls == len(comp.calls) and res.n_evals == 2 * 16 * len(comp.calls)


class RejectAllComposition:
    """Finite energies that grow with every call (eps 0): every MALA proposal is rejected, so the
    adapted step shrinks until it underflows to 0. (NaN energies raise at once: test_nonfinite.)"""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, t):
        return torch.zeros_like(x)

    def energy_and_eps(self, x, t):
        self.calls += 1
        return torch.full((x.shape[0],), 1e30 * self.calls, dtype=x.dtype), self(x, t)


def test_bad_adaptation_inputs():
    comp = product(LIN, [0, 1])
    x = torch.randn(4, 2)
    for bad in (0.0, 1.0, 1.5, -0.2, float("nan")):
        with pytest.raises(ValueError, match="target_accept"):
            annealed_mcmc(comp, x, SCHED, kind="mala", num_levels=2, target_accept=bad)
    for bad in (True, "0.6"):
        with pytest.raises(TypeError, match="target_accept"):
            annealed_mcmc(comp, x, SCHED, kind="mala", num_levels=2, target_accept=bad)
    with pytest.raises(TypeError, match="adapt"):
        annealed_mcmc(comp, x, SCHED, num_levels=2, adapt="yes")
    for bad in (0, 11, 2.0):
        with pytest.raises(ValueError, match="adapt_steps"):
            annealed_mcmc(comp, x, SCHED, num_levels=2, steps_per_level=10, adapt_steps=bad)
    with pytest.raises(ValueError, match="step_size: a per-level tensor"):
        annealed_mcmc(comp, x, SCHED, num_levels=2, step_size=torch.tensor([0.1, 0.1]))
    with pytest.raises(ValueError, match="composition has no energies"):
        annealed_mcmc(lambda x, t: x, x, SCHED, kind="hmc", num_levels=2)
    with pytest.raises(ValueError, match="step_size: the adapted step left the positive finite range"):
        annealed_mcmc(RejectAllComposition(), x, SCHED, kind="mala", num_levels=1, steps_per_level=2500,
                      adapt_steps=2500, final_denoise=False)
