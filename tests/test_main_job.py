"""`compkern main-job`: the end-to-end benchmark's mechanics on an untrained tiny shapes world
(resume without recomputation, the settings check, bad input, row accounting, the judge). The
numbers themselves come from a trained world (benchmarks/RESULTS.md)."""
from __future__ import annotations

import json

import pytest
import torch

from compkern.cli import main
from compkern.data import shapes
from compkern.experiments import main_job as MJ
from compkern.models.detector import ShapeDetector
from compkern.utils.checkpoint import atomic_save, atomic_write_json

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--prompts", "1", "--n", "2", "--ref-n", "1", "--ref-trials", "2", "--public-trials", "2", "--steps", "2",
        "--suites", "not,or"]


def _world(path, extra: float = 0.5):
    from compkern.models.shapes import build_components

    build_components(naming="nouns").save_pretrained(path / "base" / "model")
    atomic_write_json(shapes.ShapesWorld(pair_fraction=0.02, naming="nouns", extra_fraction=extra).to_dict(),
                      path / "world.json")
    atomic_save({"state_dict": ShapeDetector().state_dict()}, path / "detector.pt")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return _world(tmp_path_factory.mktemp("mj") / "world")


def test_runs_resumes_and_refuses_other_settings(world, tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["main-job", "run", "--world", str(world), "--out", str(out), *TINY]
    assert main(args) == 0
    cells = sorted((out / "cells").glob("*.pt"))
    assert [c.name for c in cells] == ["not-00.pt", "or-00.pt"]
    res = json.loads((out / "results.json").read_text())
    rows = {(r["suite"], r["method"], r["rule"]): r for r in res["rows"]}
    # "a red_square AND NOT a green_cross": 3 condition rows (the joint is the first component) x 2 steps
    assert rows[("not", "none", "-")]["rows_per_candidate"] == 6
    assert rows[("not", "cached-joint", "default")]["rows_per_candidate"] == 6  # the record is free to score
    assert rows[("not", "public", "default")]["rows_per_candidate"] == 6 + 2 * 3  # + 2 trials x 3 rows
    assert ("or", "cached-joint", "default") not in rows  # an OR has no joint caption
    # the default target: the joint for the required component, the noise for the NOT; an OR scores the noise
    assert rows[("not", "cached-term", "default")]["rows_per_candidate"] == 6
    assert rows[("not", "cached-auto", "default")]["rows_per_candidate"] == 6  # generate's default: the noise here
    assert rows[("not", "cached-auto", "default")]["accepted"] == rows[("not", "cached-noise", "default")]["accepted"]
    assert ("or", "cached-term", "default") in rows and ("or", "cached-term-every2", "default") not in rows
    assert len(res["rules"]["cached-term"]) == 4 and res["rules"]["cached-term"][:2] == res["rules"]["cached-joint"]
    assert (out / "table.md").exists() and (out / "grid.png").exists()
    # an interrupted run: the missing cell is computed again, the finished one is not touched
    stamp = cells[0].stat().st_mtime_ns
    cells[1].unlink()
    assert main(args) == 0
    assert cells[0].stat().st_mtime_ns == stamp and cells[1].exists()
    # the report alone (bench alias)
    capsys.readouterr()
    assert main(["bench", "main-job", "report", "--out", str(out)]) == 0
    assert "| not | public |" in capsys.readouterr().out
    # a replication: another folder's rules, every seed of this one
    assert main(["main-job", "report", "--out", str(out), "--rules-from", str(out)]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["rules"] == res["rules"] and {r["n"] for r in again["rows"]} == {2}  # both seeds counted
    with pytest.raises(ValueError, match="--rules-from"):
        main(["main-job", "report", "--out", str(out), "--rules-from", str(tmp_path / "nowhere")])
    with pytest.raises(ValueError, match="other settings"):
        main([*args[:-2], "--suites", "not", "--n", "3"])


def test_bad_input(world, tmp_path):
    run = ["main-job", "run", "--out", str(tmp_path / "b")]
    with pytest.raises(ValueError, match="--suites"):
        main([*run, "--world", str(world), *TINY[:-1], "not,bogus"])
    with pytest.raises(ValueError, match="--n"):
        main([*run, "--world", str(world), "--n", "0"])
    with pytest.raises(ValueError, match="--ref-n"):
        main([*run, "--world", str(world), "--n", "2", "--ref-n", "3"])
    with pytest.raises(ValueError, match="no trained model"):
        main([*run, "--world", str(tmp_path / "nowhere")])
    plain = _world(tmp_path / "plain", extra=0.0)
    with pytest.raises(ValueError, match="extra-fraction"):
        main([*run, "--world", str(plain)])
    with pytest.raises(ValueError, match="no cells"):
        main(["main-job", "report", "--out", str(tmp_path / "empty")])


def test_judge_combines_detections_by_the_expression():
    from compkern.lift import parse

    class Fixed(torch.nn.Module):  # presence probabilities per image, as the detector's logits
        def forward(self, images):
            p = torch.tensor([[0.9, 0.1, 0.8], [0.9, 0.95, 0.1], [0.2, 0.1, 0.1]])
            return p.logit(), torch.zeros(3, 4)

    sat, present = MJ.judge(Fixed(), torch.zeros(3, 3, 16, 16), [0, 1], parse("A AND NOT B"))
    assert present.tolist() == [[True, True, False], [False, True, False]]
    assert sat.tolist() == [True, False, False]
    sat, _ = MJ.judge(Fixed(), torch.zeros(3, 3, 16, 16), [2, 1], parse("A OR B"))
    assert sat.tolist() == [True, True, False]


def test_suites_name_what_they_test():
    w = shapes.ShapesWorld(pair_fraction=0.02, naming="nouns", extra_fraction=0.5)
    for expr, objs in MJ.suite_prompts(w, "not", 9):
        assert objs[1] == shapes.companion(objs[0]) and " AND NOT " in expr
    held = MJ.suite_prompts(w, "and_heldout", 6)
    assert [tuple(sorted(o)) for _, o in held] == [tuple(sorted(p)) for p in w.held_out_pairs]
    for _, objs in MJ.suite_prompts(w, "and_not", 4):
        assert len(objs) == 3 and objs[2] == shapes.companion(objs[0]) and objs[2] != objs[1]
    with pytest.raises(ValueError, match="suite"):
        MJ.suite_prompts(w, "xor", 1)


def test_early_reject_benchmark_runs_resumes_and_counts(world, tmp_path):
    """`compkern early-reject`: the full and the early run on the same seeds, the pilot apart;
    confidence 1 stops nothing and decides as the full run; resume skips a finished cell."""
    out = tmp_path / "er"
    args = ["early-reject", "run", "--world", str(world), "--out", str(out), "--prompts", "1", "--n", "2", "--pilot", "3",
            "--steps", "3", "--batch-size", "2", "--suites", "and_heldout,not_filter", "--no-progress"]
    assert main([*args, "--confidence", "1.0"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["suite"] for r in res["rows"]] == ["and_heldout", "not_filter"]
    for r in res["rows"]:
        assert r["stopped"] == 0 and r["decisions_equal"] == 1.0 and r["accepted_lost"] == 0
        assert r["continuous_equal_early"] == 1.0
        assert r["candidates"] == 2 and r["pilot_rows_per_prompt"] > 0
    cells = sorted((out / "cells").glob("*.pt"))
    stamp = cells[0].stat().st_mtime_ns
    cells[1].unlink()
    assert main([*args, "--confidence", "1.0"]) == 0
    assert cells[0].stat().st_mtime_ns == stamp and cells[1].exists()
    with pytest.raises(ValueError, match="other settings"):
        main([*args, "--confidence", "0.9"])
    with pytest.raises(ValueError, match="early-reject"):
        main([*args[:4], "--out", str(tmp_path / "bad"), "--confidence", "0.4"])


def test_not_perp_is_the_not_suite_generated_with_perpendicular_negation():
    world = shapes.ShapesWorld(pair_fraction=0.02, naming="nouns", extra_fraction=0.5)
    assert MJ.suite_prompts(world, "not_perp", 9) == MJ.suite_prompts(world, "not", 9)
    assert MJ.SUITE_NEGATION == {"not_perp": "perp"}
