"""Resume after a real crash: every trainer built on train.loop.Trainer, and the RejectionSampler,
is killed mid-run by an exception (a model forward or a data draw that raises at step k, between
two checkpoints), resumed with fresh objects from its folder (what a new process does), and must
end bit-identical to an uninterrupted run: weights, optimizer state, history, RNG state."""
from __future__ import annotations

import json

import pytest
import torch

from compkern.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread avoids oversubscription


class Crash(RuntimeError):
    """The simulated crash (e.g. the process being killed while the model runs)."""


def crash_on_call(module: torch.nn.Module, k: int) -> dict:
    """Make module's forward raise Crash on its k-th call (1-based); returns the call counter."""
    calls = {"n": 0}
    forward = module.forward

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == k:
            raise Crash(f"simulated crash in forward call {k}")
        return forward(*args, **kwargs)

    module.forward = wrapped
    return calls


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def assert_same_optimizer(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), (i, k)


# -- the loop itself ------------------------------------------------------------------------------
def _loop(out, crash_at=None):
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    if crash_at is not None:
        crash_on_call(net, crash_at)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)

    def step(i, g):
        x = torch.randn(8, 2, generator=g)
        noise = 0.1 * torch.randn(8, 1)  # torch's global RNG (as Dropout uses): restored on resume
        loss = (net(x) - x.sum(1, keepdim=True) - noise).square().mean()
        return {"loss": loss, "aux": float(noise.abs().mean())}

    # log rows every 4 steps, checkpoints every 3: a crash at step 7 loses a half-filled log row
    trainer = Trainer(out, {"net": net}, opt, step, progress=False, save_every=3, log_every=4, seed=5)
    return trainer, net, opt



def _assert_crash_resumes(run, tmp_path, crash_at: int) -> None:
    """run(out, crash_at=None) -> (model, history): a run crashed at call ``crash_at`` and resumed
    ends in the uninterrupted run's state and history."""
    ref, ref_hist = run(tmp_path / "ref")
    with pytest.raises(Crash):
        run(tmp_path / "run", crash_at=crash_at)
    m, hist = run(tmp_path / "run")
    assert_same_state(ref, m)
    assert hist == ref_hist

def test_trainer_resumes_after_a_crash_bit_identical(tmp_path):
    ref, ref_net, ref_opt = _loop(tmp_path / "ref")
    ref.fit(11)
    crashed, _, _ = _loop(tmp_path / "run", crash_at=8)  # forward call 8 is step 7
    with pytest.raises(Crash):
        crashed.fit(11)
    assert crashed.step == 7
    resumed, net, opt = _loop(tmp_path / "run")
    assert resumed.step == 6  # the last checkpoint
    resumed.fit(11)
    assert_same_state(ref_net, net)
    assert_same_optimizer(ref_opt, opt)
    assert resumed.history == ref.history  # the log row that spanned the crash included
    assert torch.equal(resumed.generator.get_state(), ref.generator.get_state())


# -- the trainers in train/ --------------------------------------------------------------------------
def test_train_eps_model_resumes_after_a_crash(tmp_path):
    from compkern.models import NoiseSchedule
    from compkern.models.mlp import ConditionalMLP
    from compkern.train.denoise import train_eps_model

    sched = NoiseSchedule.ddpm_linear(20)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 2, generator=g), torch.randint(0, 2, (64,), generator=g)

    def run(out, crash_at=None):
        torch.manual_seed(0)
        m = ConditionalMLP(2, dim=2, hidden=8, depth=1, num_steps=20)
        if crash_at is not None:
            crash_on_call(m, crash_at)
        return m, train_eps_model(m, x, y, sched, out, steps=9, batch_size=8, save_every=4, progress=False)

    _assert_crash_resumes(run, tmp_path, crash_at=7)  # step 6, after the checkpoint at step 4


def test_train_component_denoisers_resumes_after_a_crash_in_forward(tmp_path, monkeypatch):
    from compkern.data.toy2d import GaussianMixture
    from compkern.models import NoiseSchedule
    from compkern.models.toy_ddpm import StackedToyDenoiser
    from compkern.train.toy_ddpm import train_component_denoisers

    comps = [GaussianMixture([[1.0, 0.0]], 0.3, name="a"), GaussianMixture([[0.0, -1.0]], 0.5, name="b")]

    def run(out):
        return train_component_denoisers(comps, NoiseSchedule.ddpm_linear(10), out, steps=9, hidden=8, depth=1,
                                         batch_size=8, ema=0.8, save_every=4, progress=False)

    ref = run(tmp_path / "ref")
    forward = StackedToyDenoiser.forward
    calls = {"n": 0}

    def crashing(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            raise Crash("simulated crash in forward")
        return forward(self, *a, **k)

    monkeypatch.setattr(StackedToyDenoiser, "forward", crashing)
    with pytest.raises(Crash):
        run(tmp_path / "run")
    monkeypatch.setattr(StackedToyDenoiser, "forward", forward)
    got = run(tmp_path / "run")
    for a, b in zip(ref, got):
        assert_same_state(a, b)  # the EMA weights that get used
    # the checkpoint keeps the EMA as a plain StackedToyDenoiser state (the layout older folders have)
    from compkern.utils.checkpoint import load
    saved = load(tmp_path / "run" / "checkpoint.pt")["modules"]
    assert saved["ema"].keys() == saved["net"].keys() == StackedToyDenoiser(2, hidden=8, depth=1, num_steps=10).state_dict().keys()


def test_coind_trainer_resumes_after_a_crash_in_the_data(tmp_path):
    from compkern.models import NoiseSchedule
    from compkern.models.attribute_unet import AttributeMLP
    from compkern.train.coind import CoInDTrainer

    seen = torch.tensor([[0, 0], [0, 1], [1, 0]])
    draws = {"n": 0, "crash_at": None}

    def data_fn(b, g):
        draws["n"] += 1
        if draws["n"] == draws["crash_at"]:
            raise Crash("simulated crash while drawing data")
        z = seen[torch.randint(0, 3, (b,), generator=g)]
        return z.float() + 0.1 * torch.randn(b, 2, generator=g), z

    def make(out):
        torch.manual_seed(0)
        model = AttributeMLP([2, 2], dim=2, hidden=16, depth=1)
        return CoInDTrainer(model, NoiseSchedule.cosine(50), data_fn, model.null, out, lam=1.0, batch=16, ci_batch=4,
                            save_every=3, log_every=2, ema=0.9, progress=False)

    full = make(tmp_path / "a")
    full.fit(8)
    draws.update(n=0, crash_at=6)  # step 5, after the checkpoint at step 3
    with pytest.raises(Crash):
        make(tmp_path / "b").fit(8)
    draws["crash_at"] = None
    resumed = make(tmp_path / "b")
    assert resumed.step == 3
    resumed.fit(8)
    assert_same_state(full.model, resumed.model)
    assert_same_state(full.ema_model, resumed.ema_model)
    assert full.trainer.history == resumed.trainer.history


def test_position_model_resumes_after_a_crash(tmp_path):
    from compkern.models.position_unet import PositionUNet
    from compkern.train.positions import train_position_model

    def run(out, crash_at=None):
        torch.manual_seed(0)
        m = PositionUNet(channels=(8, 16))
        if crash_at is not None:
            crash_on_call(m, crash_at)
        return m, train_position_model(m, out, size=8, steps=5, batch_size=2, save_every=2, progress=False)

    _assert_crash_resumes(run, tmp_path, crash_at=4)  # step 3, after the checkpoint at step 2


def test_sepen_finetuner_resumes_after_a_crash(tmp_path):
    from test_sepen import TINY_UNET, _finetuner

    from compkern.models.shapes import build_components

    ref_parts = build_components(TINY_UNET, seed=0)
    ref = _finetuner(ref_parts, tmp_path / "ref", steps=4)
    ref.fit()
    parts = build_components(TINY_UNET, seed=0)
    crash_on_call(parts.unet, 4)  # step 3 (one UNet call per step without w_norm), after the checkpoint at 2
    with pytest.raises(Crash):
        _finetuner(parts, tmp_path / "run", steps=4).fit()
    parts = build_components(TINY_UNET, seed=0)  # a fresh process
    ft = _finetuner(parts, tmp_path / "run", steps=4)
    assert ft.step == 2
    ft.fit()
    assert_same_state(ref_parts.unet, parts.unet)
    assert ft.trainer.history == ref.trainer.history


# -- the rejection sampler ------------------------------------------------------------------------
def test_rejection_sampler_resumes_after_a_crash_in_scoring(tmp_path):
    from compkern.lift import RejectionSampler, parse
    from compkern.lift.exact import GaussianClassesEps
    from compkern.lift.rejection import complift_functions
    from compkern.models import NoiseSchedule

    sched = NoiseSchedule.ddpm_linear(50)
    means = torch.tensor([[1.5, 1.5], [-1.5, 1.5], [-1.5, -1.5], [1.5, -1.5]])
    expr = parse("c0 OR c1")

    def run(out, crash_at=None):
        model = GaussianClassesEps(means, torch.full((4,), 0.5), sched)
        calls = {"n": 0}
        if crash_at is not None:  # the model's k-th call: inside the lift estimate of a later batch
            inner = model.__call__

            def crashing(*a, **k):
                calls["n"] += 1
                if calls["n"] == crash_at:
                    raise Crash("simulated crash while scoring")
                return inner(*a, **k)

            model = crashing
            model.null_id = 4
        gen, score = complift_functions(model, sched, expr, [0, 1], 4, (2,), num_steps=5, adaptive=True,
                                        n_trials=16, z=2.0, cached=False)
        return RejectionSampler(out, gen, score, config={"expr": expr.source}, batch_size=8, keep_rejected=True,
                                progress=False).run(12)

    ref = run(tmp_path / "ref")
    with pytest.raises(Crash):
        run(tmp_path / "run", crash_at=14)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert 0 < state["batches"] < ref.batches  # it crashed mid-run, with some batches written
    got = run(tmp_path / "run")
    assert got.finished and got.batches == ref.batches
    assert torch.equal(got.samples, ref.samples) and torch.equal(got.rejected, ref.rejected)
    assert torch.equal(got.lifts, ref.lifts)
    assert (got.n_generated, got.n_accepted, got.n_evals) == (ref.n_generated, ref.n_accepted, ref.n_evals)
