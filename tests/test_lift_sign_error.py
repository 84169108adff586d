"""The adaptive stop keeps its promise: P(a settled sign is wrong) <= alpha = 1 - confidence
(or 1 - Phi(z)), over all its sequential looks, with cached trials and antithetic pairs counted
honestly. Exact eps model (compkern.lift.exact); truth by quadrature; fixed seeds."""
import pytest
import torch

from compkern.lift import estimate_lift
from compkern.lift.estimator import _boundary
from compkern.lift.exact import GaussianClassesEps
from compkern.models import NoiseSchedule
from compkern.samplers import ComposedEps, ddim_sample

MEANS = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]])

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    sched = NoiseSchedule.ddpm_linear(200)
    return sched, GaussianClassesEps(MEANS, torch.full((4,), 0.5), sched)


def _wrong(r, truth):
    return int((r.settled & ((r.lift > 0) != (truth > 0))).sum())


def test_pocock_boundary_matches_published_constants():
    # Pocock (1977): two-sided 0.05 over 5 / 10 equal looks -> 2.413 / 2.555 (0.025 per side)
    assert abs(_boundary((1, 2, 3, 4, 5), 0.025) - 2.413) < 2e-3
    assert abs(_boundary(tuple(range(1, 11)), 0.025) - 2.555) < 2e-3
    assert abs(_boundary((7,), 0.025) - 1.95996) < 1e-4  # one look: the normal quantile


def test_repeated_looks_keep_the_nominal_rate_on_hard_pairs(setup):
    """Pairs with 0.015 < |lift| < 0.07 (the per-trial sd is ~10x that): 50 looks at confidence 0.9. Testing
    |mean| > 1.64 se at every look (no multiplicity correction) settles a wrong sign ~3x too often."""
    sched, model = setup
    xs = torch.linspace(-0.6, 0.6, 121, dtype=torch.float64)
    pts = torch.stack([xs, xs], 1)
    tr = model.true_lift(pts, nodes=10)[0]
    keep = (tr.abs() > 0.015).nonzero().flatten()[tr[tr.abs() > 0.015].abs().argsort()[:6]]
    assert tr[keep].abs().max() < 0.07
    x0, truth = pts[keep].repeat(100, 1), tr[keep].repeat(100)[None]
    r = estimate_lift(model, x0, [0], model.null_id, sched, adaptive=True, confidence=0.9, chunk_trials=2,
                      min_trials=2, n_trials=100, generator=torch.Generator().manual_seed(1))
    assert r.settled.float().mean() > 0.1  # the stop does settle hard pairs: the bound is not vacuous
    assert _wrong(r, truth) <= 0.1 * 600
    assert r.alpha == pytest.approx(0.1) and r.boundary > 2.0  # 50 looks: well above the one-look 1.28


def test_cached_ddim_trials_do_not_settle_signs(setup):
    """DDIM (eta = 0) records: the cached trials are a deterministic function of x0 and biased;
    counted as independent trials they settled ~8% of the signs wrongly (nominal 0.135%)."""
    sched, model = setup
    g = torch.Generator().manual_seed(7)
    eps_fn = ComposedEps(model, [model.null_id, 0, 1, 2, 3], torch.zeros(4), record=True, backend="torch")
    x0 = ddim_sample(eps_fn, torch.randn(100, 2, generator=g, dtype=torch.float64), sched, num_steps=25, eta=0.0)
    truth = model.true_lift(x0, nodes=8)
    r = estimate_lift(model, x0, [0, 1, 2, 3], model.null_id, sched, adaptive=True, record=eps_fn.record,
                      generator=g)
    assert r.settled.float().mean() > 0.5
    assert _wrong(r, truth) <= 2  # 400 decisions at alpha = 0.135%: 0.54 expected
    cached_only = estimate_lift(model, x0, [0, 1, 2, 3], model.null_id, sched, adaptive=True, n_trials=0,
                                record=eps_fn.record)
    assert not cached_only.settled.any() and cached_only.n_evals == 0


class _ScaleModel(torch.nn.Module):
    """eps = x_t * scale[cond] (N, D): with x0 = 0, d(eps) = d(-eps), so an antithetic pair is two
    copies of one draw."""

    def __init__(self):
        super().__init__()
        self.seen_t = []

    def forward(self, x_t, t, cond):
        self.seen_t.append(t.clone())
        return x_t * torch.tensor([0.3, 0.6, 0.9], dtype=x_t.dtype)[cond][:, None]


def test_antithetic_pairs_cover_all_t_and_count_once():
    sched = NoiseSchedule.ddpm_linear(100)
    m = _ScaleModel()
    x0 = torch.zeros(300, 2, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    a = estimate_lift(m, x0, [0], 2, sched, n_trials=16, chunk_trials=16, antithetic=True, generator=g)
    t = torch.cat(m.seen_t)
    assert int(t.max()) >= 50  # the pairs' t are stratified over the whole proposal, not its lower half
    assert (a.n_trials == 16).all()
    # 16 trials = 8 independent pairs: the stderr is that of 8 draws, as a plain 8-trial run
    p = estimate_lift(m, x0, [0], 2, sched, n_trials=8, chunk_trials=8, generator=g)
    ratio = float(a.stderr.square().mean() / p.stderr.square().mean())
    assert 0.8 < ratio < 1.25, ratio
