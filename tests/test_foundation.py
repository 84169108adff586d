"""Schedules, batched condition evaluation, DDIM and the training loop."""
import math

import pytest
import torch

from compkern.models import NoiseSchedule, evaluate_conditions
from compkern.samplers import ComposedEps, ddim_sample, ddpm_sample
from compkern.train import Trainer


def test_schedules_match_closed_forms():
    s = NoiseSchedule.ddpm_linear(1000, 1e-4, 0.02)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(s.alphas_cumprod, torch.cumprod(1 - betas, 0))
    sl = NoiseSchedule.scaled_linear(1000)
    assert math.isclose(float(sl.betas[0]), 0.00085, rel_tol=1e-9) and math.isclose(float(sl.betas[-1]), 0.012, rel_tol=1e-9)
    c = NoiseSchedule.cosine(1000)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert math.isclose(float(c.alphas_cumprod[499]), f(0.5) / f(0), rel_tol=1e-6)


def test_conversions_roundtrip():
    s = NoiseSchedule.cosine(100)
    x0, eps = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    t = torch.tensor([0, 10, 50, 90, 99])
    xt = s.add_noise(x0, eps, t)
    torch.testing.assert_close(s.eps_to_x0(xt, eps, t), x0)
    torch.testing.assert_close(s.x0_to_eps(xt, x0, t), eps)
    torch.testing.assert_close(s.score_to_eps(s.eps_to_score(eps, t), t), eps)
    torch.testing.assert_close(s.v_to_eps(xt, s.v_target(x0, eps, t), t), eps)
    with pytest.raises(ValueError, match="t must lie in"):
        s.add_noise(x0, eps, torch.full((5,), 100))


def test_importance_weights_are_unbiased():
    s = NoiseSchedule.ddpm_linear(10)
    probs = torch.arange(1, 11, dtype=torch.float64)
    t, w = s.sample_t(200_000, probs=probs, generator=torch.Generator().manual_seed(0))
    f = torch.arange(10, dtype=torch.float64) ** 2
    assert abs(float((w.double() * f[t]).mean()) - float(f.mean())) < 0.5


def test_evaluate_conditions_is_condition_major_and_chunked():
    calls = []

    def model(x, t, c):
        calls.append(len(x))
        return x + c[:, None].float() + t[:, None].float()

    x = torch.randn(4, 2)
    out = evaluate_conditions(model, x, torch.tensor(3), [0, 10, 20], chunk_size=5)
    assert out.shape == (3, 4, 2) and calls == [5, 5, 2]
    torch.testing.assert_close(out[2], x + 23)
    with pytest.raises(ValueError, match="condition-major"):
        evaluate_conditions(model, x, torch.tensor(3), torch.zeros(3, 5, dtype=torch.long))


def test_ddim_with_exact_eps_recovers_gaussian():
    # Data N(mu, diag(sd^2)): the exact eps of x_t is (x_t - sqrt(a) mu) sqrt(1-a) / (a sd^2 + 1 - a).
    s = NoiseSchedule.ddpm_linear(1000)
    mu, sd = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.5])

    def eps_fn(x, t):
        a = s.alphas_cumprod[t].float()[:, None]
        return (x - a.sqrt() * mu) * (1 - a).sqrt() / (a * sd ** 2 + 1 - a)

    g = torch.Generator().manual_seed(0)
    for sampler, steps in ((ddim_sample, 50), (ddpm_sample, 1000)):  # ancestral needs fine steps
        x = sampler(eps_fn, torch.randn(5000, 2, generator=g), s, num_steps=steps, generator=g)
        assert torch.allclose(x.mean(0), mu, atol=0.08), (sampler.__name__, x.mean(0))
        assert torch.allclose(x.std(0), sd, atol=0.08), (sampler.__name__, x.std(0))


def test_composed_eps_records_and_counts():
    model = lambda x, t, c: x * 0 + c[:, None].float()  # noqa: E731
    f = ComposedEps(model, [0, 1, 3], torch.tensor([1.0, -0.5]), record=True, backend="torch")
    out = f(torch.zeros(6, 2), torch.full((6,), 7))
    torch.testing.assert_close(out, torch.full((6, 2), 1.0 - 1.5))
    assert f.n_evals == 18 and len(f.record) == 1 and f.record.preds[0].shape == (3, 6, 2)


def test_trainer_resume_equals_uninterrupted(tmp_path):
    def make():
        torch.manual_seed(1)
        net = torch.nn.Linear(2, 1)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)

        def step(i, g):
            x = torch.randn(8, 2, generator=g)
            return {"loss": (net(x) - x.sum(1, keepdim=True)).square().mean()}

        return net, opt, step

    net, opt, step = make()
    Trainer(tmp_path / "a", {"net": net}, opt, step, progress=False, save_every=3).fit(10)
    net2, opt2, step2 = make()
    Trainer(tmp_path / "b", {"net": net2}, opt2, step2, progress=False, save_every=3).fit(6)
    net3, opt3, step3 = make()  # a new process: fresh objects, state from disk
    t3 = Trainer(tmp_path / "b", {"net": net3}, opt3, step3, progress=False, save_every=3)
    assert t3.step == 6
    t3.fit(10)
    torch.testing.assert_close(net3.weight, net.weight)
    with pytest.raises(ValueError, match="made with other settings"):
        Trainer(tmp_path / "b", {"net": net3}, opt3, step3, config={"lr": 5}, progress=False)


def test_ema_update_is_the_lerp_of_every_parameter():
    from compkern.train.loop import ema_update

    torch.manual_seed(0)
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    ema_update(ema, model, 0.9)
    for e, b, m in zip(ema.parameters(), before, model.parameters()):
        assert torch.allclose(e, 0.9 * b + 0.1 * m)
    with pytest.raises(ValueError, match="same parameters"):
        ema_update(ema, torch.nn.Linear(3, 2, bias=False), 0.9)
