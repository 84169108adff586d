"""`compkern demo`: the task definitions and accuracy rule, and a tiny end-to-end run."""
import argparse
import json
import math

import pytest
import torch

from compkern.experiments import demo, demo_report
from compkern.lift import tasks2d
from compkern.train import loop


def test_accuracy_rule_on_exact_composed_samples():
    tasks = {t.name: t for t in tasks2d.complift_tasks()}
    comps = tasks2d.complift_components()
    g = torch.Generator().manual_seed(0)
    # mixture b: exact samples of either box are all inside; a point between them is not
    x = torch.cat([comps[4].sample(200, g), comps[5].sample(200, g)]).clamp(-1, 1)
    x = x[(x[:, 0] <= -0.5) | (x[:, 0] >= 0.5)]
    assert tasks2d.accuracy(tasks["mixture_b"], x, len(x)) == 1.0
    assert tasks2d.accuracy(tasks["mixture_b"], torch.zeros(3, 2), 3) == 0.0
    # product a: the two target modes count, the rest of the ring does not
    assert tasks2d.accuracy(tasks["product_a"], torch.tensor([[0.0, 0.5], [0.05, -0.47], [0.5, 0.0]]), 3) == 2 / 3
    # empty target: the fraction rejected
    assert tasks2d.accuracy(tasks["product_c"], torch.zeros(25, 2), 100) == 0.75
    # expressions name the right classes, in order
    names = [c.name for c in comps]
    for t in tasks.values():
        assert [names[i] for i in t.classes] == t.expr.names


def _mean_row(out: str, group: str) -> list[float]:
    """The percentages printed on the table's 'mean <group>' line."""
    line = next(ln for ln in out.splitlines() if ln.startswith(f"mean {group}"))
    return [float(v.rstrip("%")) for v in line[len(f"mean {group}"):].split()]


def test_demo_runs_end_to_end(tmp_path, capsys, monkeypatch):
    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    args = p.parse_args(["--out", str(tmp_path / "d"), "--n", "24", "--train-steps", "20", "--n-per-class", "64",
                         "--batch-size", "64", "--sample-steps", "5", "--tasks", "product_c,negation_a",
                         "--max-trials", "8", "--no-progress"])
    assert demo.run(args) == 0
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "d" / "results.json").read_text())
    assert [t["task"] for t in res["tasks"]] == ["product_c", "negation_a"]
    for t in res["tasks"]:
        assert set(t["methods"]) == set(demo_report.METHODS)
        assert t["methods"]["composable diffusion"]["acceptance"] == 1.0
        for m in t["methods"].values():
            assert math.isnan(m["accuracy"]) or 0.0 <= m["accuracy"] <= 1.0  # NaN: nothing accepted to score
    # the printed 'mean all' row is the mean over tasks of each method's accuracy, as computed here
    expected = {}
    for m in demo_report.METHODS:
        accs = [t["methods"][m]["accuracy"] for t in res["tasks"] if not math.isnan(t["methods"][m]["accuracy"])]
        expected[m] = sum(accs) / len(accs) if accs else float("nan")
        assert res["summary"]["all"][m] == pytest.approx(expected[m], abs=1e-12, nan_ok=True)
    assert _mean_row(out, "all") == pytest.approx([round(100 * expected[m], 1) for m in demo_report.METHODS], abs=0.051,
                                                  nan_ok=True)
    assert res["rows_per_decision"]["+ CompLift 50 trials"] == 75.0  # 50 trials x (K+1 = 3) / K = 2
    assert (tmp_path / "d" / "samples.png").stat().st_size > 1000
    # a rerun reuses the trained checkpoint (same configuration): nothing is trained or saved again
    ckpt = tmp_path / "d" / "model" / "checkpoint.pt"
    stamp = ckpt.stat().st_mtime_ns
    monkeypatch.setattr(loop.Trainer, "save", lambda self: pytest.fail("the rerun trained instead of reusing"))
    monkeypatch.setattr(torch.Tensor, "backward", lambda *a, **k: pytest.fail("the rerun ran a training step"))
    assert demo.run(args) == 0
    assert ckpt.stat().st_mtime_ns == stamp
    again = json.loads((tmp_path / "d" / "results.json").read_text())
    assert again["summary"] == res["summary"]
