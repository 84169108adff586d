"""2-D toy distributions, exact composed targets, metrics, and the `compkern toy2d` plumbing."""
import json
import math

import pytest
import torch

from compkern.data.toy2d import (GaussianMixture, Mixture, Negation, Product, SoftBox, composition_tasks,
                                 default_components, energy_distance, gaussian, grid, hdr_fraction, hdr_threshold,
                                 make_labeled_dataset, mmd_rbf, ring)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread avoids oversubscription


def _grid_mass(f, e=3.0, r=300):
    h = 2 * e / r
    c = -e + h * (torch.arange(r, dtype=torch.float64) + 0.5)
    gx, gy = torch.meshgrid(c, c, indexing="ij")
    return float(f(torch.stack([gx.flatten(), gy.flatten()], 1)).exp().sum() * h * h)


@pytest.mark.parametrize("dist", default_components() + [grid(3), gaussian((0.3, -0.2), (0.5, 0.8))],
                         ids=lambda d: d.name)
def test_components_normalized_and_match_samples(dist):
    assert abs(_grid_mass(dist.log_prob) - 1) < 2e-3
    g = torch.Generator().manual_seed(0)
    x = dist.sample(4000, generator=g)
    assert x.shape == (4000, 2) and x.dtype == torch.float32
    # samples and density agree: the sample mean of x equals the density-weighted mean on a grid
    e, r = 3.0, 250
    h = 2 * e / r
    c = -e + h * (torch.arange(r, dtype=torch.float64) + 0.5)
    gx, gy = torch.meshgrid(c, c, indexing="ij")
    pts = torch.stack([gx.flatten(), gy.flatten()], 1)
    w = dist.log_prob(pts).exp() * h * h
    mean = (w[:, None] * pts).sum(0)
    second = (w[:, None] * pts ** 2).sum(0)
    assert torch.allclose(x.double().mean(0), mean, atol=0.05)
    assert torch.allclose((x.double() ** 2).mean(0), second, atol=0.06)


def test_gaussian_mixture_matches_torch_distributions():
    gm = GaussianMixture([[0.0, 1.0], [2.0, -1.0]], [[0.5, 0.3], [1.0, 0.2]], weights=[1.0, 3.0])
    ref = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(torch.tensor([0.25, 0.75], dtype=torch.float64)),
        torch.distributions.Independent(torch.distributions.Normal(gm.means, gm.stds), 1))
    x = torch.randn(50, 2, dtype=torch.float64) * 2
    torch.testing.assert_close(gm.log_prob(x), ref.log_prob(x))


def test_softbox_far_tails_are_finite_and_exact():
    box = SoftBox((-0.3, -1.0), (0.3, 1.0), smooth=0.03)
    x = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    lp = box.log_prob(x)
    assert bool(torch.isfinite(lp).all())
    # deep in the tail: log Phi(-(x - hi)/s) - log(hi - lo) + the y-axis term, both computed exactly
    y_term = math.log(1.0 / 2.0)
    expect = float(torch.special.log_ndtr(torch.tensor(-(3.0 - 0.3) / 0.03, dtype=torch.float64))) - math.log(0.6) + y_term
    assert abs(float(lp[0]) - expect) < 1e-6 and abs(float(lp[1]) - expect) < 1e-6
    assert abs(float(lp[2]) - (-math.log(0.6) + y_term)) < 1e-6


def test_product_of_gaussians_exact_sampler():
    a, b = gaussian((1.0, 0.0), (0.5, 1.0)), gaussian((0.0, 1.0), (1.0, 0.5))
    target = Product([a, b])
    x = target.sample(20000, generator=torch.Generator().manual_seed(0)).double()
    prec = torch.tensor([1 / 0.25 + 1, 1 + 1 / 0.25], dtype=torch.float64)
    mean = torch.tensor([1 / 0.25, 1 / 0.25], dtype=torch.float64) / prec
    assert torch.allclose(x.mean(0), mean, atol=0.02)
    assert torch.allclose(x.var(0), 1 / prec, rtol=0.05)
    assert torch.allclose(target.log_density(x[:5]), a.log_prob(x[:5]) + b.log_prob(x[:5]))


def test_negation_and_mixture_targets():
    c = default_components()
    neg = Negation(c[0], c[4], alpha=0.5)
    x = neg.sample(4000, generator=torch.Generator().manual_seed(0))
    # ring AND NOT plus: the diagonal modes (|x| = |y| ~ 0.707) carry almost all the mass
    diag = ((x.abs() - 0.707).abs() < 0.3).all(1)
    assert float(diag.double().mean()) > 0.97
    mix = Mixture([c[2], c[3]])
    xm = mix.sample(4000, generator=torch.Generator().manual_seed(0))
    assert abs(float((xm[:, 0] < 0).double().mean()) - 0.5) < 0.03
    assert abs(_grid_mass(mix.log_density) - 1) < 2e-3
    with pytest.raises(ValueError, match="alpha"):
        Negation(c[0], c[4], alpha=-1.0)
    with pytest.raises(ValueError, match="coeffs"):
        Product([c[0], c[1]], coeffs=[1.0])


def test_tasks_and_metrics():
    tasks = composition_tasks()
    assert set(tasks) == {"product", "mixture", "negation"}
    t = tasks["product"].target
    g = torch.Generator().manual_seed(0)
    thr = hdr_threshold(t, t.sample(10000, generator=g))
    exact = t.sample(2000, generator=g)
    assert abs(hdr_fraction(t, exact, thr) - 0.95) < 0.02
    ring_only = ring().sample(2000, generator=g)  # 3/4 of the ring's modes lie outside the product
    assert hdr_fraction(t, ring_only, thr) < 0.4
    ref = t.sample(2000, generator=g)
    assert energy_distance(exact, ref) < 0.01 < energy_distance(ring_only, ref)
    assert mmd_rbf(exact, ref) < mmd_rbf(ring_only, ref)
    bad = exact.clone()
    bad[:100] = float("nan")
    inside_first = hdr_fraction(t, exact[:100], thr) * 100
    assert abs(hdr_fraction(t, bad, thr) - (hdr_fraction(t, exact, thr) - inside_first / 2000)) < 1e-9  # NaN = outside


def test_make_labeled_dataset():
    comps = default_components()
    x, y = make_labeled_dataset(comps, 30, torch.Generator().manual_seed(0))
    assert x.shape == (150, 2) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.bincount(y).tolist() == [30] * 5
    x2, y2 = make_labeled_dataset(comps, 30, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    # class i comes from component i: ring points lie near radius 1
    assert float((x[y == 0].norm(dim=1) - 1).abs().mean()) < 0.15
    with pytest.raises(ValueError, match="n_per_class"):
        make_labeled_dataset(comps, 0)


def test_bad_points():
    r = ring()
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        r.log_prob(torch.randn(4, 3))
    with pytest.raises(TypeError, match="floating-point"):
        r.log_prob(torch.ones(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="stds"):
        GaussianMixture([[0.0, 0.0]], -1.0)


def test_toy2d_command_quick(tmp_path):
    from compkern.cli import main
    out = tmp_path / "run"
    rc = main(["toy2d", "--out", str(out), "--train-steps", "20", "--n-per-class", "100", "--hidden", "16",
               "--depth", "1", "--levels", "4", "--mcmc-steps", "2", "--n-samples", "100", "--no-progress"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["tasks"]) == {"product", "mixture", "negation"}
    prod = res["tasks"]["product"]["methods"]
    assert set(prod) == {"exact", "ddpm-eps", "ddpm-energy", "ula", "mala", "hmc"}
    assert res["tasks"]["mixture"]["methods"]["ddpm-eps"] is None  # a mixture needs energies
    for m in ("mala", "hmc"):
        assert 0.0 <= prod[m]["accept_mean"] <= 1.0 and len(prod[m]["accept_by_level"]) == 4
    for m in ("ula", "mala", "hmc"):  # the adapted steps, one per level
        assert len(prod[m]["step_by_level"]) == 4 and all(v > 0 for v in prod[m]["step_by_level"])
    # evals per sample: K=2 rows per call; MALA: 4 levels x (1 + 2 steps); HMC: 4 x (1 + 2 x 3 leapfrog)
    assert prod["mala"]["evals_per_sample"] == 2 * 4 * 3 and prod["hmc"]["evals_per_sample"] == 2 * 4 * 7
    assert prod["ddpm-eps"]["evals_per_sample"] == 2 * 4
    assert (out / "toy2d.png").stat().st_size > 1000
    assert (out / "eps_model" / "checkpoint.pt").exists() and (out / "energy_model" / "checkpoint.pt").exists()
