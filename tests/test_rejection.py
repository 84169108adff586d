"""RejectionSampler: stops, resumes after an interruption losing and duplicating nothing, refuses a
folder made by another configuration; complift_functions end to end on the exact model."""
import json

import pytest
import torch

from compkern.lift import RejectionSampler, parse
from compkern.lift.exact import GaussianClassesEps
from compkern.lift.rejection import Batch, complift_functions
from compkern.models import NoiseSchedule


def _generate(n, g):
    return Batch(torch.randn(n, 2, generator=g), None, n_evals=10 * n)


def _score(x, record, g):
    return x[:, 0] > 0.3, 3 * x.shape[0]  # accept about 38%


class _Crash(RuntimeError):
    pass


def test_stops_at_n_accepted_and_counts(tmp_path):
    s = RejectionSampler(tmp_path / "a", _generate, _score, config={"task": "t"}, batch_size=16, progress=False)
    res = s.run(40)
    assert res.finished and res.samples.shape == (40, 2)
    assert (res.samples[:, 0] > 0.3).all()
    assert res.n_accepted >= 40 and res.n_generated == 16 * res.batches
    assert res.n_evals == 13 * res.n_generated
    assert 0 < res.acceptance_rate < 1 and res.rows_per_accepted == res.n_evals / res.n_accepted
    # the accepted count stopped the run: one batch less would not have been enough
    assert res.n_accepted - 16 < 40


def test_budget_stops_unfinished(tmp_path):
    s = RejectionSampler(tmp_path / "b", _generate, _score, batch_size=16, progress=False)
    res = s.run(10_000, max_rows=16 * 13 * 3)
    assert not res.finished and res.batches == 3
    res = RejectionSampler(tmp_path / "c", _generate, _score, batch_size=16, progress=False).run(10_000, max_batches=2)
    assert not res.finished and res.batches == 2


def test_resume_after_interruption_loses_and_duplicates_nothing(tmp_path):
    ref = RejectionSampler(tmp_path / "ref", _generate, _score, config={"k": 1}, batch_size=16, progress=False).run(60)

    calls = {"n": 0}

    def crashing(n, g):
        calls["n"] += 1
        if calls["n"] == 4:
            raise _Crash("simulated interruption")
        return _generate(n, g)

    out = tmp_path / "run"
    with pytest.raises(_Crash):
        RejectionSampler(out, crashing, _score, config={"k": 1}, batch_size=16, progress=False).run(60)
    state = json.loads((out / "state.json").read_text())
    assert state["batches"] == 3  # three batches were safely written before the crash
    kept_before = RejectionSampler(out, _generate, _score, config={"k": 1}, batch_size=16, progress=False).result()
    assert kept_before.samples.shape[0] == state["n_accepted"] > 0

    # a crash between a shard and the state that lists it: drop the last entry of state.json
    st = dict(state, batches=2, shards=state["shards"][:2])
    st["n_accepted"] = sum(int(torch.load(out / s)["accepted"].shape[0]) for s in st["shards"])
    st["n_generated"], st["n_evals"] = 32, 32 * 13
    (out / "state.json").write_text(json.dumps(st))
    assert (out / "shard_000002.pt").exists()  # the orphan shard: rewritten, never read twice

    res = RejectionSampler(out, _generate, _score, config={"k": 1}, batch_size=16, progress=False).run(60)
    assert res.finished
    torch.testing.assert_close(res.samples, ref.samples)  # same samples, same order
    assert res.n_generated == ref.n_generated and res.n_evals == ref.n_evals
    assert torch.unique(res.samples, dim=0).shape[0] == res.samples.shape[0]  # no duplicate
    # everything accepted before the crash is still there, first
    torch.testing.assert_close(res.samples[: kept_before.samples.shape[0]], kept_before.samples)
    # a finished folder rerun does no more work: nothing generated or scored, no shard rewritten
    stamps = {f: f.stat().st_mtime_ns for f in out.iterdir()}

    def never(*a):
        pytest.fail("the finished run generated or scored again")

    again = RejectionSampler(out, never, never, config={"k": 1}, batch_size=16, progress=False).run(60)
    assert again.batches == res.batches and torch.equal(again.samples, res.samples)
    assert {f: f.stat().st_mtime_ns for f in out.iterdir()} == stamps


def test_refuses_a_folder_of_another_configuration(tmp_path):
    RejectionSampler(tmp_path / "x", _generate, _score, config={"expr": "A AND B"}, batch_size=8,
                     progress=False).run(4)
    with pytest.raises(ValueError, match=r"rejection run made with other settings \{'expr'"):
        RejectionSampler(tmp_path / "x", _generate, _score, config={"expr": "A AND NOT B"}, batch_size=8, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        RejectionSampler(tmp_path / "x", _generate, _score, config={"expr": "A AND B"}, batch_size=4, progress=False)


def test_bad_generator_and_scorer(tmp_path):
    with pytest.raises(ValueError, match="8 samples"):
        RejectionSampler(tmp_path / "g", lambda n, g: torch.zeros(n - 1, 2), _score, batch_size=8, progress=False).run(1)
    with pytest.raises(ValueError, match="accept"):
        RejectionSampler(tmp_path / "h", _generate, lambda x, r, g: (torch.ones(3, dtype=torch.bool), 0), batch_size=8,
                         progress=False).run(1)
    with pytest.raises(FloatingPointError):
        RejectionSampler(tmp_path / "i", lambda n, g: torch.full((n, 2), float("nan")), _score, batch_size=8,
                         progress=False).run(1)


def test_complift_functions_end_to_end(tmp_path):
    sched = NoiseSchedule.ddpm_linear(100)
    means = torch.tensor([[1.5, 1.5], [-1.5, 1.5], [-1.5, -1.5], [1.5, -1.5]])
    model = GaussianClassesEps(means, torch.full((4,), 0.5), sched)
    expr = parse("c0 OR c1")
    gen, score = complift_functions(model, sched, expr, [0, 1], model.null_id, (2,), num_steps=10, adaptive=True,
                                    n_trials=32, z=2.5)
    res = RejectionSampler(tmp_path / "cl", gen, score, config={"expr": expr.source}, batch_size=32,
                           progress=False).run(20)
    assert res.finished and res.lifts.shape == (2, 20)
    assert ((res.lifts > 0).any(0)).all()  # every kept sample satisfies the OR by its lifts
    # kept samples lie in the upper half (classes 0 and 1 have y = +1.5)
    assert (res.samples[:, 1] > 0).float().mean() > 0.9


# -- early rejection ---------------------------------------------------------------------------------
STEPS, CHECK = 10, 4  # a synthetic generator of 10 "steps" checking after 4


def _early_generate(n, g, rule=None):
    """x (n, 2); the final decision is x0 > 0.3 (``_score``); the partial margin at the check is
    x0 - 0.3 plus noise, known before the last steps. 10 rows per step and candidate."""
    x = torch.randn(n, 2, generator=g)
    if rule is None:
        return Batch(x, None, n_evals=STEPS * n)
    margins = (x[:, 0] - 0.3 + 0.1 * torch.randn(n, generator=g))[None]
    alive = rule.keep(0, margins[0])
    rows = CHECK * n + (STEPS - CHECK) * int(alive.sum())
    return Batch(x[alive], None, n_evals=rows, alive=alive, margins=margins)


def _early(out, conf, gen=_early_generate, **kw):
    return RejectionSampler(out, gen, _score, config={"k": 1}, batch_size=16, progress=False, early_reject=conf,
                            checks=(CHECK,), pilot=48, **kw)


def test_early_rejection_at_confidence_one_decides_as_full_trajectories(tmp_path):
    full = RejectionSampler(tmp_path / "full", _early_generate, _score, config={"k": 1}, batch_size=16,
                            progress=False).run(60)
    res = _early(tmp_path / "early", 1.0).run(60)
    assert res.n_stopped == 0 and res.rule.thresholds == (float("-inf"),)
    assert torch.equal(res.samples, full.samples) and res.batches == full.batches
    assert res.n_evals == full.n_evals


def test_early_rejection_calibrates_on_the_pilot_and_spends_fewer_rows(tmp_path):
    full = RejectionSampler(tmp_path / "full", _early_generate, _score, config={"k": 1}, batch_size=16,
                            progress=False).run(10_000, max_batches=20)
    res = _early(tmp_path / "early", 0.9).run(10_000, max_batches=20)
    # the pilot: the first 3 batches (48 candidates) held >= 9 accepts; the rule is the 2nd smallest accepted margin
    pilot = [torch.load(tmp_path / "early" / f"shard_{i:06d}.pt", weights_only=False) for i in range(3)]
    m = torch.cat([d["margins"] for d in pilot], 1)[0]
    acc = torch.cat([d["decisions"] for d in pilot])
    k1 = int(0.1 * (int(acc.sum()) + 1))
    assert res.rule.thresholds[0] == pytest.approx(float(m[acc].sort().values[k1 - 1]))
    assert all(bool(d["alive"].all()) for d in pilot)  # full trajectories
    assert res.n_stopped > 0 and res.n_generated == full.n_generated
    assert res.rows_per_accepted < full.rows_per_accepted
    # every accepted sample is one the full run accepted from the same seed; few of those were lost
    full_set = {tuple(r.tolist()) for r in full.samples}
    assert all(tuple(r.tolist()) in full_set for r in res.samples)
    assert res.n_accepted >= 0.85 * full.n_accepted


def test_early_rejection_resumes_after_a_crash_past_the_pilot(tmp_path):
    ref = _early(tmp_path / "ref", 0.9).run(10_000, max_batches=8)
    calls = {"n": 0}

    def crashing(n, g, rule=None):
        calls["n"] += 1
        if calls["n"] == 6:
            raise _Crash("simulated interruption")
        return _early_generate(n, g, rule)

    with pytest.raises(_Crash):
        _early(tmp_path / "run", 0.9, gen=crashing).run(10_000, max_batches=8)
    res = _early(tmp_path / "run", 0.9).run(10_000, max_batches=8)
    assert torch.equal(res.samples, ref.samples) and res.n_stopped == ref.n_stopped and res.n_evals == ref.n_evals
    assert res.rule == ref.rule


@pytest.mark.parametrize("conf", [0.5, 1.2, float("nan"), "0.9"])
def test_early_rejection_bad_confidence_is_refused(tmp_path, conf):
    with pytest.raises(ValueError, match=r"confidence .* must lie in \(0.5, 1\]"):
        _early(tmp_path / "bad", conf)


def test_early_rejection_bad_setup_is_refused(tmp_path):
    with pytest.raises(ValueError, match="early_reject needs checks"):
        RejectionSampler(tmp_path / "a", _early_generate, _score, early_reject=0.9, progress=False)
    _early(tmp_path / "b", 0.9).run(4)
    with pytest.raises(ValueError, match="other settings"):
        _early(tmp_path / "b", 0.95)
    with pytest.raises(ValueError, match="alive"):
        _early(tmp_path / "c", 0.9, gen=lambda n, g, rule=None: _generate(n, g)).run(4)


def test_complift_functions_with_early_rejection_on_the_exact_model(tmp_path):
    """Confidence 1 gives the plain sampler's samples (one generator per candidate either way);
    0.9 stops candidates by their partial cached lift and keeps the accepted ones valid."""
    sched = NoiseSchedule.ddpm_linear(100)
    means = torch.tensor([[1.5, 1.5], [-1.5, 1.5], [-1.5, -1.5], [1.5, -1.5]])
    model = GaussianClassesEps(means, torch.full((4,), 0.5), sched)
    expr = parse("c0 AND NOT c1")
    gen, score = complift_functions(model, sched, expr, [0, 1], model.null_id, (2,), num_steps=10, n_trials=8)
    kw = dict(config={"expr": expr.source}, batch_size=32, progress=False)
    plain = RejectionSampler(tmp_path / "plain", gen, score, **kw).run(10_000, max_batches=4)
    one = RejectionSampler(tmp_path / "one", gen, score, early_reject=1.0, checks=(4,), **kw).run(10_000, max_batches=4)
    assert torch.equal(one.samples, plain.samples) and one.n_stopped == 0
    early = RejectionSampler(tmp_path / "e", gen, score, early_reject=0.9, checks=(4,), pilot=32, **kw).run(
        10_000, max_batches=6)
    assert early.rule is not None and early.n_generated == 6 * 32
    assert early.lifts is not None and bool((early.lifts[0] > 0).all() and (early.lifts[1] <= 0).all())
