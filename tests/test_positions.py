"""Multi-object positions: renderer/detector agreement, the position UNet, every sampling path."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from compkern.data.clevr import (BACKGROUND, NULL, OBJECT, background_cond, detect_objects, null_cond, position_accuracy,
                                 position_cond, render_scenes, sample_positions, training_batch)
from compkern.experiments import positions as P
from compkern.lift.fixed_t import fixed_t_lift
from compkern.lift.positions import accept_positions
from compkern.models.base import config_dict
from compkern.models.position_unet import (PositionEnergyUNet, PositionUNet, build_position_model, position_map,
                                           position_schedule)
from compkern.samplers.compositions import compose_positions, position_conditions
from compkern.train.positions import heldout_loss, load_run, train_position_model
from compkern.utils.checkpoint import load


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread avoids oversubscription


# -- renderer and detector ------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 3, 5])
def test_detector_agrees_with_renderer(n):
    g = torch.Generator().manual_seed(n)
    pos = sample_positions(40, n, generator=g)
    x = render_scenes(pos, size=24, generator=g)
    assert x.shape == (40, 3, 24, 24) and float(x.min()) >= -1 and float(x.max()) <= 1
    det = detect_objects(x)
    counts = torch.tensor([len(c) for c in det.centers])
    assert float((counts == n).float().mean()) >= 0.97
    assert float(position_accuracy(x, pos, detection=det).float().mean()) >= 0.97
    if n:  # centroids close to the truth, not just within the threshold
        d = [min(float(torch.tensor(c - p.numpy()[None]).norm(dim=1).min()) for p in [q]) for c, pp in zip(det.centers, pos)
             if len(c) for q in pp]
        assert sum(d) / len(d) < 0.03


def test_detector_rejects_wrong_scenes():
    g = torch.Generator().manual_seed(0)
    pos = sample_positions(16, 3, generator=g)
    x = render_scenes(pos, size=24, generator=g)
    shifted = (pos + torch.tensor([0.2, 0.0])).clamp(0, 1)
    assert not position_accuracy(x, shifted).any()
    empty = render_scenes(pos, size=24, valid=torch.zeros(16, 3, dtype=torch.bool), generator=g)
    assert not position_accuracy(empty, pos).any()
    assert all(len(c) == 0 for c in detect_objects(empty).centers)
    # one object cannot stand for two requested positions (one-to-one matching)
    one = render_scenes(pos[:, :1], size=24, generator=g)
    assert not position_accuracy(one, pos[:, :1].repeat(1, 2, 1)).any()
    assert position_accuracy(one, pos[:, :1]).all()
    # extra objects do not hurt: the requested ones are present
    assert float(position_accuracy(x, pos[:, :2]).float().mean()) >= 0.9


def test_positions_are_separated_and_conditions():
    pos = sample_positions(8, 5, generator=torch.Generator().manual_seed(1))
    assert pos.shape == (8, 5, 2)
    assert all(float(torch.pdist(p).min()) >= 0.3 for p in pos)
    x, c = training_batch(64, size=16, p_empty=0.5, generator=torch.Generator().manual_seed(2))
    assert x.shape == (64, 3, 16, 16) and c.shape == (64, 3)
    assert set(c[:, 2].tolist()) == {float(OBJECT), float(BACKGROUND)}
    assert position_cond(torch.tensor([0.2, 0.3])).tolist() == pytest.approx([0.2, 0.3, OBJECT])
    assert background_cond()[2] == BACKGROUND and null_cond()[2] == NULL
    with pytest.raises(ValueError, match="xy"):
        position_cond(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="positions"):
        render_scenes(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="images"):
        detect_objects(torch.zeros(2, 1, 8, 8))


# -- the model ------------------------------------------------------------------------------------
def test_position_unet_shapes_and_errors():
    torch.manual_seed(0)
    m = PositionUNet(channels=(8, 16))
    for p in m.parameters():  # break the zero init so the output depends on the condition
        p.data.add_(0.05 * torch.randn_like(p))
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([1, 500, 999])
    c = torch.stack([position_cond(torch.tensor([0.3, 0.6])), background_cond(), null_cond()])
    out = m(x, t, c)
    assert out.shape == x.shape and torch.isfinite(out).all()
    moved = m(x, t, c + torch.tensor([0.2, 0.0, 0.0]))
    assert not torch.allclose(out[0], moved[0]) and torch.allclose(out[1:], moved[1:])
    bump = position_map(c, 16, 16)
    assert bump[1:].abs().max() == 0 and bump[0].flatten().argmax() == 9 * 16 + 4
    with pytest.raises(ValueError, match="cond"):
        m(x, t, c[:2])
    with pytest.raises(ValueError, match="mode"):
        m(x, t, c + torch.tensor([0.0, 0.0, 5.0]))
    with pytest.raises(ValueError, match="x_t"):
        m(torch.randn(3, 1, 16, 16), t, c)
    same = build_position_model(config_dict(m), position_schedule())
    assert isinstance(same, PositionUNet) and config_dict(same) == config_dict(m)


def test_energy_unet_eps_is_gradient():
    sch = position_schedule()
    torch.manual_seed(0)
    m = PositionEnergyUNet(sch, channels=(8, 16))
    for p in m.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([100, 700])
    c = torch.stack([position_cond(torch.tensor([0.3, 0.6])), background_cond()])
    E, eps = m.energy_and_eps(x, t, c)
    assert E.shape == (2,)
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(m.energy(xr, t, c).sum(), xr)
    sigma = (1 - sch.alphas_cumprod[t]).sqrt().view(2, 1, 1, 1)
    torch.testing.assert_close(eps, (sigma * g).float(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(eps, x)  # not the untrained identity
    assert config_dict(build_position_model(m.config, sch)) == config_dict(m)


# -- sampling paths on tiny untrained models -----------------------------------------------------------
def _perturbed(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.data.add_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_composition_conds_layout():
    pos = torch.rand(4, 3, 2)
    c = position_conditions(pos, "background")
    assert c.shape == (4, 4, 3)
    assert torch.equal(c[0], background_cond().expand(4, 3))
    assert torch.equal(c[2, :, :2], pos[:, 1]) and (c[1:, :, 2] == OBJECT).all()
    assert torch.equal(position_conditions(pos, "null")[0], null_cond().expand(4, 3))
    with pytest.raises(ValueError, match="base"):
        position_conditions(pos, "empty")


@pytest.mark.parametrize("method,energy", [("reverse", False), ("ula", False), ("reverse", True), ("ula", True),
                                           ("mala", True), ("hmc", True)])
def test_every_sampler_runs(method, energy):
    sch = position_schedule()
    model = _perturbed(PositionEnergyUNet(sch, channels=(8, 16)) if energy else PositionUNet(channels=(8, 16)))
    B, n, steps = 2, 2, 3
    pos = sample_positions(B, n, generator=torch.Generator().manual_seed(0))
    r = compose_positions(model, pos, method=method, base="background", steps=steps, mcmc_steps=1, leapfrog=2,
                         size=8, generator=torch.Generator().manual_seed(1))
    assert r["x"].shape == (B, 3, 8, 8) and torch.isfinite(r["x"]).all()
    rows = (n + 1) * B
    expect = {"reverse": steps * rows, "ula": steps * 2 * rows, "mala": steps * 2 * rows, "hmc": steps * 3 * rows}[method]
    assert r["n_evals"] == expect
    assert (r["accept"] is None) == (method in ("reverse", "ula"))
    if method in ("mala", "hmc"):
        assert 0 <= r["accept"] <= 1


def test_mala_needs_energy():
    pos = torch.rand(1, 1, 2)
    with pytest.raises(ValueError, match="energ"):
        compose_positions(PositionUNet(channels=(8, 16)), pos, method="mala", steps=2, size=8)


def test_complift_fixed_adaptive_public():
    model = _perturbed(PositionUNet(channels=(8, 16)))
    pos = sample_positions(3, 2, generator=torch.Generator().manual_seed(0))
    x = render_scenes(pos, size=8, generator=torch.Generator().manual_seed(0))
    fixed = accept_positions(model, x, pos, mode="fixed", n_trials=4, generator=torch.Generator().manual_seed(0))
    assert fixed["accept"].shape == (3,) and fixed["accept"].dtype == torch.bool
    assert fixed["n_evals"] == 4 * 3 * 3  # trials x (null + 2 objects) x samples
    ad = accept_positions(model, x, pos, mode="adaptive", n_trials=8, generator=torch.Generator().manual_seed(0))
    assert ad["accept"].shape == (3,) and 0 < ad["n_evals"] <= 8 * 3 * 3
    bg = accept_positions(model, x, pos, mode="fixed", n_trials=4, lift_base="background",
                           generator=torch.Generator().manual_seed(0))
    assert bg["n_evals"] == fixed["n_evals"]
    pub = accept_positions(model, x, pos, mode="public", lift_t=[928], generator=torch.Generator().manual_seed(5))
    assert pub["n_evals"] == 1 * 3 * 3
    ref = fixed_t_lift(model, x, position_cond(pos).transpose(0, 1), null_cond(), position_schedule(), timesteps=[928],
                       generator=torch.Generator().manual_seed(5))
    assert torch.equal(pub["accept"], (ref.lift > 0).all(0))  # reject when any component's lift <= 0
    with pytest.raises(ValueError, match="lift_base"):
        accept_positions(model, x, pos, mode="fixed", n_trials=4, lift_base="empty")
    with pytest.raises(ValueError, match="mode"):
        accept_positions(model, x, pos, mode="cached")


# -- the public one-trial scorer -----------------------------------------------------------------------
def _hand_lift(model, x0, conds, null, t, eps):
    """sum_S (eps - eps(x_t, null))^2 - (eps - eps(x_t, c_k))^2 at one t with the given noise (K, B)."""
    sch = position_schedule()
    B = x0.shape[0]
    ab = sch.alphas_cumprod[t].float()
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps.expand_as(x0)
    tv = torch.full((B,), t, dtype=torch.long)
    with torch.no_grad():
        e0 = model(x_t, tv, null.expand(B, 3))
        return torch.stack([((eps - e0) ** 2 - (eps - model(x_t, tv, c)) ** 2).flatten(1).sum(1) for c in conds])


def test_fixed_t_lift_matches_hand_computation():
    model = _perturbed(PositionUNet(channels=(8, 16)))
    pos = sample_positions(4, 2, generator=torch.Generator().manual_seed(1))
    x0 = render_scenes(pos, size=8, generator=torch.Generator().manual_seed(1))
    conds = position_cond(pos).transpose(0, 1).contiguous()  # (K=2, B=4, 3)
    eps = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(3))  # ONE noise for every sample and row
    for ref in (null_cond(), background_cond()):
        res = fixed_t_lift(model, x0, conds, ref, position_schedule(), generator=torch.Generator().manual_seed(3))
        assert res.lift.shape == (2, 4) and res.n_evals == 3 * 4 and (res.n_trials == 1).all()
        assert torch.isinf(res.stderr).all()
        torch.testing.assert_close(res.lift, _hand_lift(model, x0, conds, ref, 928, eps), rtol=1e-4, atol=1e-4)
    two = fixed_t_lift(model, x0, conds, null_cond(), position_schedule(), timesteps=[100, 928],
                       generator=torch.Generator().manual_seed(3))  # the same noise at both trials
    want = (_hand_lift(model, x0, conds, null_cond(), 100, eps) + _hand_lift(model, x0, conds, null_cond(), 928, eps)) / 2
    torch.testing.assert_close(two.lift, want, rtol=1e-4, atol=1e-4)
    assert two.n_evals == 2 * 3 * 4
    # the noise does not depend on the batch: one sample alone scores as inside the batch
    one = fixed_t_lift(model, x0[2:3], conds[:, 2:3], null_cond(), position_schedule(), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(one.lift[:, 0], _hand_lift(model, x0, conds, null_cond(), 928, eps)[:, 2], rtol=1e-4, atol=1e-4)


def test_fixed_t_lift_rejects_bad_input():
    model = _perturbed(PositionUNet(channels=(8, 16)))
    x0 = torch.zeros(2, 3, 8, 8)
    conds = position_cond(torch.rand(1, 2, 2))
    sch = position_schedule()
    for bad in ([1000], [-1], [], 928, [928.0], [True]):
        with pytest.raises(ValueError, match="timesteps"):
            fixed_t_lift(model, x0, conds, null_cond(), sch, timesteps=bad)
    with pytest.raises(ValueError, match="x0"):
        fixed_t_lift(model, torch.zeros(2, 3, 8, 8, dtype=torch.long), conds, null_cond(), sch)
    with pytest.raises(ValueError, match="x0"):
        fixed_t_lift(model, torch.full((2, 3, 8, 8), float("nan")), conds, null_cond(), sch)
    with pytest.raises(ValueError, match="conds"):
        fixed_t_lift(model, x0, position_cond(torch.rand(1, 3, 2)), null_cond(), sch)  # B = 3 for 2 samples


def test_format_table_standard_errors():
    row = {"model": "eps", "method": "reverse", "base": "background", "objects": 5, "samples": 64, "accuracy": 56 / 64,
           "evals_per_sample": 300.0,
           "lift_public": {"t": [928], "accepted": 50, "accept_rate": 50 / 64, "accuracy": 0.9,
                           "evals_per_accepted": 400.0}}
    table = P.format_table({"eps:reverse:background:5": row})
    assert "87.5 ± 4.1" in table  # sqrt(0.875 * 0.125 / 64) = 4.13%
    assert "90.0 ± 4.2 (78% kept)" in table  # sqrt(0.9 * 0.1 / 50) = 4.24%
    assert "public one-trial" in table


def test_train_resume_and_eval_cli(tmp_path):
    kw = dict(channels=(8, 16))
    run = tmp_path / "eps"
    hist = train_position_model(PositionUNet(**kw), run, size=8, steps=2, batch_size=4, save_every=1, progress=False)
    assert len(hist) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    model, cfg = load_run(run)
    again = PositionUNet(**kw)
    train_position_model(again, run, size=8, steps=2, batch_size=4, save_every=1, progress=False)  # finished: loads
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    out = tmp_path / "eval.json"
    parser = argparse.ArgumentParser()
    P.add_arguments(parser)
    argv = ["eval", "--eps-run", str(run), "--methods", "eps:reverse:background", "eps:ula:null", "--objects", "1", "2",
            "--n", "2", "--steps", "2", "--mcmc-steps", "1", "--lift-trials", "2", "--lift-max-trials", "4",
            "--out", str(out), "--png", str(tmp_path / "grid.png"), "--no-progress"]
    assert P.run(parser.parse_args(argv)) == 0
    res = json.loads(out.read_text())
    assert set(res) == {"eps:reverse:background:1", "eps:reverse:background:2", "eps:ula:null:1", "eps:ula:null:2"}
    row = res["eps:reverse:background:2"]
    assert row["evals_per_sample"] == 2 * 3 and 0 <= row["accuracy"] <= 1
    assert row["lift_fixed"]["lift_evals_per_sample"] == 2 * 3
    assert row["lift_fixed_bg"]["lift_evals_per_sample"] == 2 * 3 and "lift_adaptive_bg" in row
    assert (tmp_path / "grid.png").stat().st_size > 0
    stamp = out.read_text()
    assert P.run(parser.parse_args(argv)) == 0  # resumes: nothing recomputed
    assert out.read_text() == stamp
    samples = tmp_path / "eval_samples" / "eps_reverse_background_2.pt"
    x_before = load(samples)["x"]
    assert P.run(parser.parse_args(argv + ["--lift", "fixed", "public", "--lift-t", "928"])) == 0  # adds a scorer
    res2 = json.loads(out.read_text())
    row2 = res2["eps:reverse:background:2"]
    assert row2["lift_public"]["t"] == [928] and row2["lift_public"]["lift_evals_per_sample"] == 1 * 3
    assert "lift_public_bg" in row2 and row2["lift_fixed"] == row["lift_fixed"]  # old variants kept as they were
    assert row2["lift_public"]["rejected_correct"] + row2["lift_public"]["rejected_wrong"] + \
        row2["lift_public"]["accepted"] == 2
    assert torch.equal(load(samples)["x"], x_before) and row2["accuracy"] == row["accuracy"]  # not regenerated
    other_steps = list(argv)
    other_steps[other_steps.index("--steps") + 1] = "3"
    with pytest.raises(ValueError, match="--out"):  # other generation settings into the same file
        P.run(parser.parse_args(other_steps))
    with pytest.raises(ValueError, match="--out"):  # another public t into the same file
        P.run(parser.parse_args(argv + ["--lift", "public", "--lift-t", "500"]))
    with pytest.raises(ValueError, match="threshold"):  # cells keyed with every setting: no stale reuse
        P.run(parser.parse_args(argv + ["--threshold", "0.2"]))
    folder = tmp_path / "eval_dir"  # --out a folder: eval.json and eval_samples/ inside it
    assert P.run(parser.parse_args([a if a != str(out) else str(folder) for a in argv[:-3]] + ["--no-progress"])) == 0
    assert (folder / "eval.json").exists() and (folder / "eval_samples" / "eps_ula_null_1.pt").exists()
    assert json.loads((folder / "eval.json").read_text())["eps:ula:null:1"]["model_run"]["size"] == 8
    assert "reverse diffusion" in P.format_table(res)
    assert P.run(parser.parse_args(["grid", str(out), "--png", str(tmp_path / "g2.png")])) == 0
    assert (tmp_path / "g2.png").stat().st_size > 0
    with pytest.raises(ValueError, match="MODEL:METHOD:BASE"):
        P._parse_cell("eps:foo:null")
    with pytest.raises(ValueError, match="energies"):
        P._parse_cell("eps:hmc:null")


def test_heldout_loss_fixed_and_exact_for_zero_output(tmp_path, capsys):
    m = PositionUNet(channels=(8, 16))  # zero-initialized output conv: eps = 0, loss = mean |noise|^2
    a = heldout_loss(m, size=8)
    assert a == heldout_loss(m, size=8)  # fixed scenes, t and noise
    assert abs(a - 3 * 8 * 8) < 0.05 * 3 * 8 * 8  # E|noise|^2 = 192 (chi-square, sd of the mean over 256: 1.2)
    assert heldout_loss(_perturbed(PositionUNet(channels=(8, 16))), size=8) != a
    parser = argparse.ArgumentParser()
    P.add_arguments(parser)
    argv = ["train", "--out", str(tmp_path / "r"), "--steps", "2", "--batch", "4", "--size", "8", "--channels", "8", "16",
            "--no-progress"]
    assert P.run(parser.parse_args(argv)) == 0
    assert "held-out loss" in capsys.readouterr().out


def test_load_run_reads_the_exported_model_energy_ones_too(tmp_path):
    """The Trainer exports the trained PositionUNet (the energy model's inner one) with every
    checkpoint; load_run rebuilds the same model from model/ (a crash between the export's two
    renames leaves model.old, which is read); a folder without an export is refused clearly."""
    import shutil

    sch = position_schedule()
    trained = PositionEnergyUNet(sch, channels=(8, 16))
    train_position_model(trained, tmp_path / "e", size=8, steps=2, batch_size=4, save_every=1, progress=False)
    model, cfg = load_run(tmp_path / "e")
    assert isinstance(model, PositionEnergyUNet) and cfg["model"]["energy"]
    want = load(tmp_path / "e" / "checkpoint.pt")["modules"]["model"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in want.items())
    shutil.move(tmp_path / "e" / "model", tmp_path / "e" / "model.old")  # as after a crash mid-swap
    assert all(torch.equal(v, load_run(tmp_path / "e")[0].state_dict()[k]) for k, v in want.items())
    shutil.rmtree(tmp_path / "e" / "model.old")
    with pytest.raises(ValueError, match="no exported model/"):
        load_run(tmp_path / "e")
    with pytest.raises(ValueError, match="not a training folder"):
        load_run(tmp_path / "nothing")
    # resuming the run (its Trainer rebuilt) exports again
    train_position_model(PositionEnergyUNet(sch, channels=(8, 16)), tmp_path / "e", size=8, steps=2, batch_size=4,
                         save_every=1, progress=False)
    assert all(torch.equal(v, load_run(tmp_path / "e")[0].state_dict()[k]) for k, v in want.items())
