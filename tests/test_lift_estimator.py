"""estimate_lift on a model whose eps is exact (Gaussian classes, compkern.lift.exact)."""
import pytest
import torch

from compkern.lift import calibrate, estimate_lift, parse
from compkern.lift.exact import GaussianClassesEps
from compkern.models import NoiseSchedule
from compkern.samplers import ComposedEps, ddim_sample

MEANS = torch.tensor([[1.5, 1.5], [-1.5, 1.5], [-1.5, -1.5], [1.5, -1.5]])


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread avoids oversubscription


@pytest.fixture(scope="module")
def setup():
    sched = NoiseSchedule.ddpm_linear(200)  # fewer steps: a cheap exact quadrature
    model = GaussianClassesEps(MEANS, torch.full((4,), 0.5), sched)
    return sched, model


def _x0(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, 4, (n,), generator=g)
    return (MEANS[k] + 0.5 * torch.randn(n, 2, generator=g)).double()


def test_exact_model_is_the_closed_form(setup):
    sched, model = setup
    # class eps: sqrt(1 - abar)(x - sqrt(abar) mu) / v, v = abar s^2 + 1 - abar; null = posterior mix
    x = torch.randn(5, 2, dtype=torch.float64)
    t = torch.tensor([0, 10, 50, 120, 199])
    ab = sched.alphas_cumprod[t][:, None]
    v = ab * 0.25 + 1 - ab
    want = (1 - ab).sqrt() * (x - ab.sqrt() * MEANS[1].double()) / v
    torch.testing.assert_close(model(x, t, torch.ones(5, dtype=torch.long)), want)
    # the null is the exact eps of the mixture: -sqrt(1 - abar) * grad log p_t
    xr = x.clone().requires_grad_(True)
    logp = torch.logsumexp(torch.stack([-(xr - ab.sqrt() * m.double()).square().sum(1) / (2 * v[:, 0]) - torch.log(v[:, 0])
                                        for m in MEANS]), 0)
    grad, = torch.autograd.grad(logp.sum(), xr)
    torch.testing.assert_close(model(x, t, torch.full((5,), 4)), -(1 - ab).sqrt() * grad)


@pytest.mark.parametrize("importance", [False, True])
def test_unbiased_against_quadrature(setup, importance):
    """The mean over many trials matches the same expectation computed by quadrature."""
    sched, model = setup
    x0 = _x0(6)
    truth = model.true_lift(x0, nodes=12)[:2]  # conditions 0 and 1
    g = torch.Generator().manual_seed(1)
    kw = {}
    if importance:
        kw["calibration"] = calibrate(model, _x0(32, seed=3), [0, 1], model.null_id, sched, n_trials=16, generator=g)
    r = estimate_lift(model, x0, [0, 1], model.null_id, sched, n_trials=2000, chunk_trials=500, generator=g, **kw)
    assert r.lift.shape == (2, 6) and r.stderr.shape == (2, 6) and r.pixel_lift is None
    assert r.n_evals == 2000 * 3 * 6  # one null row shared by the two conditions
    z = (r.lift - truth) / r.stderr
    assert z.abs().max() < 4.5, z
    assert (r.stderr < 0.25).all()  # the z-test above is not vacuous


def test_importance_sampling_cuts_the_variance(setup):
    sched, model = setup
    x0 = _x0(16)
    g = torch.Generator().manual_seed(2)
    cal = calibrate(model, _x0(32, seed=4), [0, 1, 2, 3], model.null_id, sched, n_trials=16, generator=g)
    assert cal.t_probs.shape == (200,) and abs(float(cal.t_probs.sum()) - 1) < 1e-4
    u = estimate_lift(model, x0, [0, 1, 2, 3], model.null_id, sched, n_trials=400, chunk_trials=400, generator=g)
    i = estimate_lift(model, x0, [0, 1, 2, 3], model.null_id, sched, n_trials=400, chunk_trials=400, generator=g,
                      calibration=cal)
    assert (i.stderr.square().mean() / u.stderr.square().mean()) < 0.6


def test_adaptive_agrees_with_truth_for_fewer_rows(setup):
    sched, model = setup
    x0 = _x0(64, seed=5)
    truth = model.true_lift(x0, nodes=10)
    g = torch.Generator().manual_seed(3)
    cal = calibrate(model, _x0(32, seed=6), [0, 1, 2, 3], model.null_id, sched, n_trials=16, generator=g)
    r = estimate_lift(model, x0, [0, 1, 2, 3], model.null_id, sched, adaptive=True, calibration=cal, z=2.5,
                      n_trials=200, chunk_trials=2, min_trials=2, generator=g)
    clear = truth.abs() > 0.2
    assert ((r.lift > 0) == (truth > 0))[clear].all()
    # settled pairs left the batch: trial counts differ, and far fewer rows than a fixed 50-trial run
    assert r.n_trials.min() < r.n_trials.max()
    assert r.n_evals < 0.85 * 50 * 5 * 64


def test_expression_stops_once_the_decision_is_certain(setup):
    sched, model = setup
    x0 = MEANS[[0, 0, 2]].double() + 0.05  # at class 0, class 0, class 2
    g = torch.Generator().manual_seed(4)
    e = parse("c1 AND c0")  # c1 is surely negative at these points: AND is decided by it alone
    r = estimate_lift(model, x0, [1, 0], model.null_id, sched, adaptive=True, expr=e, z=3, n_trials=500,
                      chunk_trials=4, min_trials=4, generator=g)
    assert r.accept.tolist() == [False, False, False]
    assert r.decided.all()
    assert r.n_trials.max() < 500
    e2 = parse("c0 AND NOT c1")
    r2 = estimate_lift(model, x0, [0, 1], model.null_id, sched, adaptive=True, expr=e2, z=3, n_trials=500,
                       chunk_trials=4, min_trials=4, generator=g)
    assert r2.accept.tolist() == [True, True, False]


def test_cached_trials_from_a_sampling_record(setup):
    sched, model = setup
    g = torch.Generator().manual_seed(5)
    eps_fn = ComposedEps(model, [model.null_id, 0, 2], torch.zeros(2), record=True, backend="torch")
    x0 = ddim_sample(eps_fn, torch.randn(64, 2, generator=g, dtype=torch.float64), sched, num_steps=25, eta=1.0,
                     generator=g)
    r = estimate_lift(model, x0, [0, 2], model.null_id, sched, n_trials=0, record=eps_fn.record, adaptive=True)
    assert r.n_evals == 0 and (r.n_trials == 0).all() and r.n_cached == 25
    # cached trials carry no error bar and settle nothing: only fresh trials do
    assert torch.isinf(r.stderr).all() and not r.settled.any()
    torch.testing.assert_close(r.cached_lift, r.lift)
    # the cached estimate recomputed by hand from the record: noise recovered from x_t and x0
    rec = eps_fn.record
    d = 0
    for x_t, t, p in zip(rec.x_t, rec.t, rec.preds):
        ab = sched.alphas_cumprod[t][:, None]
        n = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        d = d + ((n - p[0]).square().sum(-1) - (n - p[1:]).square().sum(-1))
    torch.testing.assert_close(r.lift, d / len(rec), rtol=1e-6, atol=1e-8)
    truth = model.true_lift(x0, nodes=8)[[0, 2]]
    clear = truth.abs() > 0.5
    assert ((r.lift > 0) == (truth > 0))[clear].float().mean() > 0.9
    # with an expression the cached signs pick the component to test first: fewer rows than the
    # same adaptive run without the record; every settled sign rests on fresh trials
    e = parse("c0 AND c2")
    a = estimate_lift(model, x0, [0, 2], model.null_id, sched, adaptive=True, record=rec, expr=e, z=2.5,
                      n_trials=64, generator=g)
    b = estimate_lift(model, x0, [0, 2], model.null_id, sched, adaptive=True, expr=e, z=2.5, n_trials=64, generator=g)
    assert a.n_evals < b.n_evals
    assert (a.n_trials[a.settled] >= 4).all() and a.decided.float().mean() > 0.8


class _ImageModel(torch.nn.Module):
    """eps = x_t * scale[cond] on (C, H, W) images: enough to check the pixel map's bookkeeping."""

    def forward(self, x_t, t, cond):
        scale = torch.tensor([0.3, 0.6, 0.9])[cond]
        return x_t * scale[:, None, None, None]


def test_pixel_map_sums_to_the_lift():
    sched = NoiseSchedule.ddpm_linear(100)
    x0 = torch.randn(3, 2, 5, 4)
    g = torch.Generator().manual_seed(0)
    r = estimate_lift(_ImageModel(), x0, [0, 1], 2, sched, n_trials=6, chunk_trials=4, pixel_map=True, generator=g)
    assert r.pixel_lift.shape == (2, 3, 5, 4)
    torch.testing.assert_close(r.pixel_lift.sum((-1, -2)), r.lift, rtol=1e-5, atol=1e-5)
    # the packed path (some pairs settled) keeps the same bookkeeping
    r2 = estimate_lift(_ImageModel(), x0, [0, 1], 2, sched, adaptive=True, n_trials=12, chunk_trials=2, z=0.5,
                       pixel_map=True, generator=g)
    torch.testing.assert_close(r2.pixel_lift.sum((-1, -2)), r2.lift, rtol=1e-5, atol=1e-5)


def test_bad_inputs(setup):
    sched, model = setup
    x0 = _x0(4)
    with pytest.raises(TypeError, match="x0"):
        estimate_lift(model, x0[0], [0], 4, sched)
    with pytest.raises(ValueError, match="NaN"):
        estimate_lift(model, torch.full((2, 2), float("nan")), [0], 4, sched)
    with pytest.raises(ValueError, match="t_probs"):
        estimate_lift(model, x0, [0], 4, sched, t_probs=torch.ones(7))
    with pytest.raises(ValueError, match="chunk_trials and n_trials must be even"):
        estimate_lift(model, x0, [0], 4, sched, antithetic=True, chunk_trials=3)
    with pytest.raises(ValueError, match="z must be"):
        estimate_lift(model, x0, [0], 4, sched, z=-1.0)
    with pytest.raises(ValueError, match="pixel_map"):
        estimate_lift(model, x0, [0], 4, sched, pixel_map=True)
    with pytest.raises(ValueError, match="2 components"):
        estimate_lift(model, x0, [0], 4, sched, expr=parse("A AND B"))
    with pytest.raises(ValueError, match="confidence"):
        estimate_lift(model, x0, [0], 4, sched, confidence=1.5)
    with pytest.raises(TypeError, match="conds"):
        estimate_lift(model, x0, 0, 4, sched)
    nan_model = lambda x_t, t, c: torch.full_like(x_t, float("nan"))  # noqa: E731
    with pytest.raises(FloatingPointError, match="NaN"):
        estimate_lift(nan_model, x0, [0], 4, sched, n_trials=4)
    with pytest.raises(FloatingPointError, match="NaN"):
        estimate_lift(nan_model, x0, [0, 1], 4, sched, adaptive=True, n_trials=8, z=0.01, chunk_trials=2)


def test_cached_true_lift_reuses_its_file_and_recomputes_for_other_samples(tmp_path, monkeypatch):
    from compkern.lift.exact import cached_true_lift

    model = GaussianClassesEps(MEANS, torch.full((4,), 0.5), NoiseSchedule.cosine(1000))
    x0 = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "truth.pt"
    first = cached_true_lift(model, x0, path, nodes=4)
    monkeypatch.setattr(model, "true_lift", lambda *a, **k: pytest.fail("the cached truth was computed again"))
    torch.testing.assert_close(cached_true_lift(model, x0, path, nodes=4), first)
    monkeypatch.undo()
    other = cached_true_lift(model, x0 + 1, path, nodes=4)
    assert other.shape == first.shape and not torch.equal(other, first)
