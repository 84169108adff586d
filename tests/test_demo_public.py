"""`compkern demo --protocol public`: the tempered lift, the per-component models and their
training (resume), the wiring, and bad input."""
import argparse
import json
import math

import pytest
import torch

from compkern.data.toy2d import GaussianMixture
from compkern.experiments import demo
from compkern.lift import tasks2d
from compkern.lift.exact import GaussianClassesEps
from compkern.lift.tempered import tempered_lift
from compkern.models.schedule import NoiseSchedule
from compkern.models.toy_ddpm import ComponentBank, StackedToyDenoiser, ToyDenoiser
from compkern.train.toy_ddpm import _MemberClippedAdam, train_component_denoisers


class _Affine(torch.nn.Module):
    """eps(x, t, c) = (c + 1) * (W x + 0.01 t): a fixed model to check the lift by hand."""

    def __init__(self):
        super().__init__()
        self.W = torch.tensor([[0.7, -0.2], [0.3, 1.1]], dtype=torch.float64)

    def forward(self, x, t, c):
        return (c[:, None] + 1).to(x.dtype) * (x @ self.W.T.to(x.dtype) + 0.01 * t[:, None].to(x.dtype))


def test_tempered_lift_matches_a_hand_computation():
    sched = NoiseSchedule.ddpm_linear(50)
    x0 = torch.tensor([[0.3, -0.4], [1.0, 0.5], [-0.2, 0.0]], dtype=torch.float64)
    model, alpha, n = _Affine(), 0.9, 7
    r = tempered_lift(model, x0, [0, 1], sched, n_trials=n, alpha=alpha, chunk_trials=3,
                      generator=torch.Generator().manual_seed(5))
    # the same draws: n timesteps, then n noise vectors, each shared by the batch
    g = torch.Generator().manual_seed(5)
    ts, eps = torch.randint(0, 50, (n,), generator=g), torch.randn(n, 2, generator=g).double()
    abar = sched.alphas_cumprod
    for k in range(2):
        for b in range(3):
            vals = []
            for i in range(n):
                t = int(ts[i])
                xt = abar[t].sqrt() * x0[b] + (1 - abar[t]).sqrt() * eps[i]
                e = (k + 1) * (model.W @ xt + 0.01 * t)
                # ELBO(eps_c) - ELBO(alpha eps_c), each the mean over the two coordinates
                vals.append(float(((eps[i] - alpha * e) ** 2).mean() - ((eps[i] - e) ** 2).mean()))
                assert math.isclose(vals[-1], float((2 * (1 - alpha) * eps[i] * e - (1 - alpha ** 2) * e ** 2).mean()),
                                    rel_tol=1e-9, abs_tol=1e-12)
            assert r.lift[k, b].item() == pytest.approx(sum(vals) / n, rel=1e-6, abs=1e-9)
    assert r.lift.shape == (2, 3) and r.n_evals == 2 * n * 3
    # t_max = 1: every trial at t = 0
    r0 = tempered_lift(model, x0[:1], [0], sched, n_trials=2, t_max=1, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    torch.randint(0, 1, (2,), generator=g)
    eps = torch.randn(2, 2, generator=g).double()
    xt = abar[0].sqrt() * x0[0] + (1 - abar[0]).sqrt() * eps
    e = xt @ model.W.T
    assert r0.lift[0, 0].item() == pytest.approx(float(((eps - alpha * e) ** 2 - (eps - e) ** 2).mean()), rel=1e-6)


def test_tempered_lift_is_positive_inside_a_gaussian_and_negative_far_out():
    # exact eps of N(0, 0.1^2 I): lift ~ 0.1 log p(x) + const, so the sign follows the density level
    sched = NoiseSchedule.ddpm_linear(50)
    model = GaussianClassesEps(torch.zeros(1, 2), torch.tensor([0.1]), sched)
    x0 = torch.tensor([[0.0, 0.0], [0.05, 0.0], [1.0, 0.0], [0.0, -1.5]], dtype=torch.float64)
    r = tempered_lift(model, x0, [0], sched, n_trials=400, generator=torch.Generator().manual_seed(0))
    assert (r.lift[0, :2] > 0).all() and (r.lift[0, 2:] < 0).all(), r.lift
    assert r.lift[0, 3] < r.lift[0, 2]  # lower density, lower lift


def test_tempered_lift_bad_input():
    sched = NoiseSchedule.ddpm_linear(50)
    x0 = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="alpha"):
        tempered_lift(_Affine(), x0, [0], sched, alpha=1.0)
    with pytest.raises(ValueError, match="n_trials"):
        tempered_lift(_Affine(), x0, [0], sched, n_trials=0)
    with pytest.raises(ValueError, match="x0"):
        tempered_lift(_Affine(), torch.zeros(3), [0], sched)
    with pytest.raises(ValueError, match="t_max"):
        tempered_lift(_Affine(), x0, [0], sched, t_max=51)


def test_component_bank_routes_conditions_and_zero_base():
    torch.manual_seed(0)
    nets = [ToyDenoiser(hidden=8, depth=1, num_steps=10) for _ in range(2)]
    for n in nets:  # non-trivial outputs
        torch.nn.init.normal_(n.out.weight)
    bank = ComponentBank(nets)
    x, t = torch.randn(5, 2), torch.randint(0, 10, (5,))
    c = torch.tensor([0, 1, 2, 1, 0])
    out = bank(x, t, c)
    assert torch.allclose(out[[0, 4]], nets[0](x[[0, 4]], t[[0, 4]]))
    assert torch.allclose(out[[1, 3]], nets[1](x[[1, 3]], t[[1, 3]]))
    assert (out[2] == 0).all() and bank.null_id == 2
    with pytest.raises(ValueError, match="cond"):
        bank(x, t, torch.full((5,), 3))


def test_stacked_members_are_independent_toy_denoisers():
    torch.manual_seed(0)
    stack = StackedToyDenoiser(3, hidden=16, depth=2, num_steps=10)
    for w in stack.weights:  # non-trivial weights everywhere
        torch.nn.init.normal_(w, std=0.3)
    x, t = torch.randn(3, 5, 2), torch.randint(0, 10, (3, 5))
    y = stack(x, t)
    for m in range(3):
        assert torch.allclose(y[m], stack.member(m)(x[m], t[m]), atol=1e-5)
    with pytest.raises(ValueError, match="x_t must be"):
        stack(x[:2], t[:2])


def test_gradients_are_clipped_per_model():
    w = torch.nn.Parameter(torch.zeros(2, 3))
    opt = _MemberClippedAdam([w], lr=1e-3, max_norm=1.0)
    w.grad = torch.tensor([[6.0, 8.0, 0.0], [0.03, 0.04, 0.0]])  # norms 10 and 0.05
    opt.step()
    assert torch.allclose(w.grad.norm(dim=1), torch.tensor([1.0, 0.05]), atol=1e-5)


class _Flaky(GaussianMixture):
    """A component whose ``fail_at``-th call to sample raises (a crash in the middle of training)."""

    def __init__(self, fail_at=None):
        super().__init__([[0.3, -0.2]], 0.1, name="blob")
        self.calls, self.fail_at = 0, fail_at

    def sample(self, n, generator=None):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return super().sample(n, generator)


def _train(out, comps, steps=20):
    return train_component_denoisers(comps, NoiseSchedule.ddpm_linear(10), out, steps=steps, hidden=8, depth=1,
                                     batch_size=16, ema=0.9, save_every=5, progress=False)


def _same(a, b):
    return all(torch.equal(x, y) for m, n in zip(a, b) for x, y in zip(m.state_dict().values(), n.state_dict().values()))


def test_training_resumes_after_a_crash_and_skips_when_finished(tmp_path):
    ring = tasks2d.complift_components()[0]
    ref = _train(tmp_path / "ref", [_Flaky(), ring])
    assert len(ref) == 2 and not _same(ref[:1], ref[1:])
    with pytest.raises(KeyboardInterrupt):  # call 1 is the config checksum, call s + 2 step s: dies in step 12
        _train(tmp_path / "run", [_Flaky(fail_at=14), ring])
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["step"] == 10
    assert _same(ref, _train(tmp_path / "run", [_Flaky(), ring]))  # resumed from step 10: the same weights
    # finished: a rerun trains nothing (one sample call, the checksum) and returns the same EMA weights
    data = _Flaky()
    mtime = (tmp_path / "run" / "checkpoint.pt").stat().st_mtime_ns
    assert _same(ref, _train(tmp_path / "run", [data, ring]))
    assert data.calls == 1 and (tmp_path / "run" / "checkpoint.pt").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="made with other settings"):
        _train(tmp_path / "run", [_Flaky(), ring], steps=30)


def _args(argv):
    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    return p.parse_args(argv)


def test_public_protocol_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "pub"
    cmp_json = tmp_path / "cmp.json"
    cmp_json.write_text(json.dumps({"tasks": [{"task": "product_c", "expr": "box_left AND box_right",
                                               "methods": {"m": {"accuracy": 0.5, "acceptance": 1.0}}}]}))
    argv = ["--protocol", "public", "--out", str(out), "--n", "16", "--train-steps", "6", "--hidden", "8",
            "--depth", "1", "--sample-steps", "5", "--trials", "4", "--tasks", "product_c,mixture_b", "--no-progress",
            "--compare", str(cmp_json)]
    assert demo.run(_args(argv)) == 0
    assert "mean all" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert [t["task"] for t in res["tasks"]] == ["product_c", "mixture_b"]
    assert res["config"]["batch_size"] == 128  # the public default, not the compkern one
    for t in res["tasks"]:
        assert t["methods"]["composable diffusion"]["acceptance"] == 1.0
        assert t["methods"]["+ CompLift public (tempered, 50 trials)"]["rows_per_decision"] == 4.0
    md = (out / "results.md").read_text()
    assert "| product_c | `box_left AND box_right` | 50.0% (100% kept) |" in md and "| mixture_b |" in md
    assert sorted(p.name for p in (out / "models").iterdir()) == ["box_left.pt", "box_right.pt"]
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "models").iterdir()}
    assert demo.run(_args(argv)) == 0  # the rerun loads the finished models and gives the same numbers
    assert {p: p.stat().st_mtime_ns for p in (out / "models").iterdir()} == mtimes
    assert json.loads((out / "results.json").read_text())["summary"] == res["summary"]


@pytest.mark.parametrize("argv, match", [
    (["--protocol", "publik"], "--protocol"),
    (["--protocol", "public", "--trials", "0"], "--trials"),
    (["--protocol", "public", "--alpha", "1.5"], "--alpha"),
    (["--protocol", "public", "--sample-steps", "100"], "--sample-steps"),
    (["--protocol", "public", "--tasks", "product_z"], "--tasks"),
])
def test_bad_arguments_raise_value_errors_naming_them(tmp_path, argv, match):
    with pytest.raises(ValueError, match=match):
        demo.run(_args(argv + ["--out", str(tmp_path / "x"), "--no-progress"]))
    assert not (tmp_path / "x" / "models").exists()  # refused before any training
