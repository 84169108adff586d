"""Reuse that a deterministic retrain could not fake: rerunning a trainer on a finished folder must
load it without a training step or a save (checked by making both fail) and leave the checkpoint
untouched, returning the same weights and history. (test_models / test_positions check that a
rerun gives the same numbers, which a deterministic retrain also does.)"""
from __future__ import annotations

import pytest
import torch

from compkern.train import loop

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_training(monkeypatch):
    """After ``arm()``, any training step (a backward pass) or checkpoint save fails the test."""

    def arm():
        monkeypatch.setattr(loop.Trainer, "save", lambda self: pytest.fail("reran training and saved a checkpoint"))
        monkeypatch.setattr(torch.Tensor, "backward", lambda *a, **k: pytest.fail("ran a training step"))

    return arm


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))



def _assert_reused(run, checkpoint, no_training) -> None:
    """run(seed_init) -> (model, history): the rerun from another init, with training made to
    fail, loads the finished folder (same weights and history) and leaves its checkpoint alone."""
    m, hist = run(0)
    stamp = checkpoint.stat().st_mtime_ns
    no_training()
    m2, hist2 = run(1)
    assert _same(m, m2) and hist2 == hist
    assert checkpoint.stat().st_mtime_ns == stamp


def test_train_eps_model_reuses_a_finished_folder(tmp_path, no_training):
    from compkern.models import NoiseSchedule
    from compkern.models.mlp import ConditionalMLP
    from compkern.train.denoise import train_eps_model

    sched = NoiseSchedule.ddpm_linear(20)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 2, generator=g), torch.randint(0, 2, (32,), generator=g)

    def run(seed_init):
        torch.manual_seed(seed_init)  # another init: only loading can make the weights equal
        m = ConditionalMLP(2, dim=2, hidden=8, depth=1, num_steps=20)
        return m, train_eps_model(m, x, y, sched, tmp_path / "run", steps=4, batch_size=8, progress=False)

    _assert_reused(run, tmp_path / "run" / "checkpoint.pt", no_training)


def test_position_model_reuses_a_finished_folder(tmp_path, no_training):
    from compkern.models.position_unet import PositionUNet
    from compkern.train.positions import train_position_model

    def run(seed_init):
        torch.manual_seed(seed_init)
        m = PositionUNet(channels=(8, 16))
        return m, train_position_model(m, tmp_path / "eps", size=8, steps=2, batch_size=2, save_every=1,
                                       progress=False)

    _assert_reused(run, tmp_path / "eps" / "checkpoint.pt", no_training)


def test_coind_trainer_reuses_a_finished_folder(tmp_path, no_training):
    from compkern.models import NoiseSchedule
    from compkern.models.attribute_unet import AttributeMLP
    from compkern.train.coind import CoInDTrainer

    def data_fn(b, g):
        z = torch.randint(0, 2, (b, 2), generator=g)
        return z.float() + 0.1 * torch.randn(b, 2, generator=g), z

    def make(seed_init):
        torch.manual_seed(seed_init)
        model = AttributeMLP([2, 2], dim=2, hidden=8, depth=1)
        return CoInDTrainer(model, NoiseSchedule.cosine(20), data_fn, model.null, tmp_path / "c", batch=8, ci_batch=2,
                            save_every=2, log_every=2, ema=0.9, progress=False)

    first = make(0)
    first.fit(3)
    stamp = (tmp_path / "c" / "checkpoint.pt").stat().st_mtime_ns
    no_training()
    again = make(1)
    assert again.step == 3
    assert again.fit(3) == first.trainer.history
    assert _same(first.model, again.model) and _same(first.ema_model, again.ema_model)
    assert (tmp_path / "c" / "checkpoint.pt").stat().st_mtime_ns == stamp
