"""CompLift for flow-matching models (compkern.lift.flow): the likelihood-weighted estimator on the
exact velocity of Gaussian classes is unbiased for the closed-form log density ratio at its
defaults; a velocity MLP trained by flow matching gets the ratio's sign on points it never saw;
the flow <-> diffusion identities; bad input."""
from __future__ import annotations

import json

import pytest
import torch

from compkern.experiments.flow_lift import gaussian_classes, sample_classes
from compkern.lift.flow import GaussianClassesVelocity, flow_lift, flow_times, sign_agreement
from compkern.models.flow import FlowVelocityMLP, flow_abar, flow_interpolate, velocity_to_eps
from compkern.train.denoise import train_flow_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_flow_path_is_a_rescaled_variance_preserving_diffusion():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 2, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([0.01, 0.2, 0.5, 0.8, 0.99], dtype=torch.float64)
    x_t = flow_interpolate(x0, eps, t)
    c = ((1 - t) ** 2 + t ** 2).sqrt()[:, None]
    a = flow_abar(t)[:, None]
    torch.testing.assert_close(x_t / c, a.sqrt() * x0 + (1 - a).sqrt() * eps)
    torch.testing.assert_close(velocity_to_eps(x_t, eps - x0, t), eps)  # the true velocity gives the true eps


def test_elbo_weighted_flow_lift_is_unbiased_for_the_exact_log_ratio():
    classes = gaussian_classes()
    g = torch.Generator().manual_seed(1)
    x, _ = sample_classes(classes, 24, g)
    truth = classes.log_density_ratio(x)
    res = flow_lift(GaussianClassesVelocity(classes), x, range(classes.num_classes), classes.null_id,
                    n_trials=1500, generator=g)  # defaults: weighting='elbo', lambda_max=10
    z = (res.lift - truth).abs() / res.stderr
    assert float(z.max()) < 5.0, float(z.max())
    assert float((res.lift - truth).abs().mean()) < 0.4
    assert sign_agreement(res.lift, truth, margin=1.0) == 1.0
    # the unweighted loss difference is not the ratio (its sign is what it keeps)
    uni = flow_lift(GaussianClassesVelocity(classes), x, range(4), 4, n_trials=400, weighting="uniform", generator=g)
    assert float((uni.lift - truth).abs().mean()) > 1.0
    assert sign_agreement(uni.lift, truth, margin=1.0) > 0.9


def test_a_trained_velocity_model_gets_the_sign_of_the_ratio(tmp_path):
    classes = gaussian_classes()
    x, y = sample_classes(classes, 4000, torch.Generator().manual_seed(0))
    model = FlowVelocityMLP(4, hidden=64, depth=2)
    hist = train_flow_model(model, x, y, tmp_path / "flow", steps=500, batch_size=256, progress=False)
    assert hist[-1]["loss"] < hist[0]["loss"]
    pts, _ = sample_classes(classes, 96, torch.Generator().manual_seed(7))  # held-out points
    res = flow_lift(model, pts, range(4), 4, n_trials=64, generator=torch.Generator().manual_seed(3))
    truth = classes.log_density_ratio(pts)
    assert sign_agreement(res.lift, truth, margin=1.0) > 0.95
    assert sign_agreement(res.lift, truth) > 0.9
    # a finished run folder is reused, not retrained
    again = FlowVelocityMLP(4, hidden=64, depth=2)
    train_flow_model(again, x, y, tmp_path / "flow", steps=500, batch_size=256, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_flow_lift_cli_writes_its_table(tmp_path, capsys):
    from compkern.cli import main

    assert main(["flow-lift", "--out", str(tmp_path / "fl"), "--train-steps", "20", "--trials", "4", "--n", "16",
                 "--test-seeds", "1", "--no-progress"]) == 0
    rows = json.loads((tmp_path / "fl" / "results.json").read_text())["rows"]
    assert [r["scorer"] for r in rows] == ["exact-velocity / elbo", "flow / elbo", "flow / uniform", "diffusion / CompLift"]
    assert "sign agree" in capsys.readouterr().out


def test_bad_input_is_refused():
    classes = gaussian_classes()
    vel = GaussianClassesVelocity(classes)
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="weighting"):
        flow_times(4, "logit")
    with pytest.raises(ValueError, match="n_trials"):
        flow_lift(vel, x, [0], 4, n_trials=0)
    with pytest.raises(ValueError, match="NaN"):
        flow_lift(vel, torch.full((3, 2), float("nan")), [0], 4)
    with pytest.raises(ValueError, match="conds"):
        flow_lift(vel, x, [], 4)
    model = FlowVelocityMLP(4)
    with pytest.raises(TypeError, match="t must be a float"):
        model(x, torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        model(x, torch.full((3,), 1.5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="cond ids"):
        model(x, torch.full((3,), 0.5), torch.full((3,), 9, dtype=torch.long))
