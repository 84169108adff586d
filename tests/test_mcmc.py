"""Annealed MCMC (ULA, MALA, HMC) and the energy compositions, on exactly known Gaussian energies."""
import pytest
import torch

from compkern.models import NoiseSchedule
from compkern.samplers import annealed_mcmc, ddpm_sample, mixture, negation, product


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread avoids oversubscription


class GaussianEnergyModel:
    """Exact class-conditional model: class k is N(mu_k, diag s_k^2); at level t the marginal is
    N(a mu_k, a^2 s_k^2 + sigma^2) (a^2 = abar_t), E_t its exact -log density (up to a constant),
    eps = sigma grad E."""

    def __init__(self, mus, stds, schedule):
        self.mus = torch.as_tensor(mus, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)
        self.abar = schedule.alphas_cumprod
        self.num_classes = self.null_id = len(self.mus)

    def _moments(self, t, cond):
        a2 = self.abar[t][:, None]
        return a2.sqrt() * self.mus[cond], a2 * self.stds[cond] ** 2 + (1 - a2), (1 - a2).sqrt()

    def energy_and_eps(self, x, t, cond):
        m, v, sig = self._moments(t, cond)
        xd = x.double()
        E = 0.5 * ((xd - m) ** 2 / v).sum(1) + 0.5 * v.log().sum(1)
        return E.to(x.dtype), (sig * (xd - m) / v).to(x.dtype)

    def __call__(self, x, t, cond):
        return self.energy_and_eps(x, t, cond)[1]


class EpsOnly:
    """The same model without energies (a plain eps model)."""

    def __init__(self, m):
        self.m, self.null_id = m, m.null_id

    def __call__(self, x, t, cond):
        return self.m(x, t, cond)


SCHED = NoiseSchedule.cosine(100)
MUS, STDS = [[1.0, 0.0], [0.0, 1.0]], [[0.5, 1.0], [1.0, 0.5]]


def product_moments(t=0):
    a2 = float(SCHED.alphas_cumprod[t])
    mus, stds = torch.tensor(MUS, dtype=torch.float64), torch.tensor(STDS, dtype=torch.float64)
    v = a2 * stds ** 2 + (1 - a2)
    prec = (1 / v).sum(0)
    return (a2 ** 0.5 * mus / v).sum(0) / prec, 1 / prec


def _run(kind, step, n=3000, steps=150, **kw):
    comp = product(GaussianEnergyModel(MUS, STDS, SCHED), [0, 1])
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(n, 2, generator=g)
    return annealed_mcmc(comp, x0, SCHED, kind=kind, timesteps=torch.tensor([0]), steps_per_level=steps,
                         step_size=step, step_scale="constant", adapt=False, final_denoise=False, generator=g, **kw), comp


@pytest.mark.parametrize("kind,step,kw", [("mala", 0.15, {}), ("hmc", 0.35, {"leapfrog_steps": 3}),
                                          ("hmc", 0.35, {"leapfrog_steps": 2, "damping": 0.5})])
def test_metropolis_samplers_recover_gaussian_product(kind, step, kw):
    res, comp = _run(kind, step, **kw)
    mean, var = product_moments()
    x = res.x.double()
    assert torch.allclose(x.mean(0), mean, atol=0.04), (x.mean(0), mean)
    assert torch.allclose(x.var(0), var, rtol=0.1), (x.var(0), var)
    assert abs(float(torch.corrcoef(x.T)[0, 1])) < 0.06
    assert res.accept_rates.shape == (1,) and 0.0 < res.mean_accept < 1.0
    per_step = 1 if kind == "mala" else kw["leapfrog_steps"]
    assert res.n_grad_calls == 1 + 150 * per_step
    assert res.n_evals == comp.n_evals == 2 * 3000 * res.n_grad_calls  # K = 2 rows per chain per call


def test_ula_bias_shrinks_with_step_size():
    _, var = product_moments()
    errs = []
    for step in (0.12, 0.03):
        res, _ = _run("ula", step, n=4000, steps=200)
        errs.append(float((res.x.double().var(0) - var).abs().max()))
        assert res.accept_rates is None
    # stationary ULA variance of N(m, s^2): s^2 / (1 - eta / (2 s^2)); bias ~ eta
    assert errs[1] < 0.5 * errs[0], errs
    assert errs[0] > 0.02, errs


def test_mala_acceptance_falls_with_step_size():
    small, _ = _run("mala", 0.02, n=500, steps=20)
    big, _ = _run("mala", 0.8, n=500, steps=20)
    assert 0 < big.mean_accept < small.mean_accept < 1


def test_annealed_levels_with_diffusion_steps_and_mixture():
    m = GaussianEnergyModel([[-1.0, 0.0], [1.0, 0.0]], [[0.2, 0.2], [0.2, 0.2]], SCHED)
    comp = mixture(m, [0, 1])
    g = torch.Generator().manual_seed(0)
    res = annealed_mcmc(comp, torch.randn(2000, 2, generator=g), SCHED, kind="hmc", num_levels=20,
                        steps_per_level=4, step_size=0.3, adapt=False, generator=g)
    assert res.accept_rates.shape == (20,) and bool(((res.accept_rates > 0) & (res.accept_rates < 1)).all())
    assert res.timesteps.tolist() == sorted(res.timesteps.tolist(), reverse=True)
    frac_right = float((res.x[:, 0] > 0).double().mean())
    assert 0.4 < frac_right < 0.6
    assert torch.allclose(res.x[:, 0].abs().mean().double(), torch.tensor(1.0, dtype=torch.float64), atol=0.08)


def test_summed_scores_reverse_diffusion_matches_gaussian_product():
    # for Gaussians the product of the diffused marginals is not the diffused product, but at the
    # end (t = 0) reverse diffusion with summed scores still lands close to the product mean
    comp = product(EpsOnly(GaussianEnergyModel(MUS, STDS, SCHED)), [0, 1])
    x = ddpm_sample(comp, torch.randn(2000, 2), SCHED, num_steps=100)
    mean, _ = product_moments()
    assert torch.allclose(x.double().mean(0), mean, atol=0.15)
    assert comp.n_evals == 2 * 2000 * 100


def test_negation_energy_and_eps_combine():
    m = GaussianEnergyModel(MUS, STDS, SCHED)
    comp = negation(m, 0, 1, alpha=0.3)
    x, t = torch.randn(7, 2), torch.full((7,), 10)
    E, eps = comp.energy_and_eps(x, t)
    Ea, ea = m.energy_and_eps(x, t, torch.zeros(7, dtype=torch.long))
    Eb, eb = m.energy_and_eps(x, t, torch.ones(7, dtype=torch.long))
    torch.testing.assert_close(E, Ea - 0.3 * Eb)
    torch.testing.assert_close(eps, ea - 0.3 * eb)
    torch.testing.assert_close(comp(x, t), ea - 0.3 * eb)  # the eps path through ComposedEps


def test_bad_inputs():
    m = GaussianEnergyModel(MUS, STDS, SCHED)
    eps_only = EpsOnly(m)
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="needs energies"):
        annealed_mcmc(product(eps_only, [0, 1]), x, SCHED, kind="mala", num_levels=2)
    with pytest.raises(ValueError, match="needs energies"):
        annealed_mcmc(negation(eps_only, 0, 1, 0.5), x, SCHED, kind="hmc", num_levels=2)
    with pytest.raises(ValueError, match="mixture needs energies"):
        mixture(eps_only, [0, 1])
    for bad in (0.0, -0.1, float("nan"), torch.tensor([0.1, 0.0])):
        with pytest.raises(ValueError, match="step_size"):
            annealed_mcmc(product(m, [0, 1]), x, SCHED, kind="ula", num_levels=2, step_size=bad, adapt=False)
    with pytest.raises(ValueError, match="step_size"):
        annealed_mcmc(product(m, [0, 1]), x, SCHED, kind="ula", num_levels=3, step_size=torch.tensor([0.1, 0.1]),
                      adapt=False)
    with pytest.raises(ValueError, match="kind"):
        annealed_mcmc(product(m, [0, 1]), x, SCHED, kind="nuts", num_levels=2)
    with pytest.raises(ValueError, match="coeffs"):
        product(m, [0, 1], weights=[1.0])
    with pytest.raises(ValueError, match="alpha"):
        negation(m, 0, 1, alpha=0.0)
    with pytest.raises(ValueError, match="timesteps"):
        annealed_mcmc(product(m, [0, 1]), x, SCHED, timesteps=torch.tensor([3, 5]))
    with pytest.raises(ValueError, match="steps_per_level"):
        annealed_mcmc(product(m, [0, 1]), x, SCHED, steps_per_level=0)
    with pytest.raises(TypeError, match="x_T"):
        annealed_mcmc(product(m, [0, 1]), x.long(), SCHED)


def test_mixture_eps_is_scaled_gradient_of_its_energy():
    m = GaussianEnergyModel([[-1.0, 0.0], [1.0, 0.5]], [[0.3, 0.3], [0.5, 0.2]], SCHED)
    comp = mixture(m, [0, 1], weights=[1.0, 3.0])
    x = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    t = torch.full((6,), 30)
    E, eps = comp.energy_and_eps(x, t)
    (g,) = torch.autograd.grad(E.sum(), x)
    sigma = float((1 - SCHED.alphas_cumprod[30]).sqrt())
    torch.testing.assert_close(eps, sigma * g)


def test_mismatched_conditions():
    m = GaussianEnergyModel(MUS, STDS, SCHED)
    comp = product(m, torch.zeros(2, 3, dtype=torch.long))  # per-sample conds for B = 3
    with pytest.raises(ValueError, match="condition-major"):
        comp.energy_and_eps(torch.randn(4, 2), torch.full((4,), 5))
    with pytest.raises(ValueError, match="t must have shape"):
        product(m, [0, 1]).energy_and_eps(torch.randn(4, 2), torch.full((3,), 5))
