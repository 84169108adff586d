"""The `compkern` CLI: one line per subcommand in --help, every subcommand's --help, a clear error
for an unknown one, the shared vocabulary (old spellings as hidden aliases), and tiny end-to-end
runs of the subcommands no other test runs (coind toy / train / eval / sample)."""
import argparse
import json

import pytest
import torch

from compkern.cli import COMMANDS, main
from compkern.models.base import config_dict

pytestmark = pytest.mark.usefixtures("one_thread")

NESTED = {"positions": ["train", "sample", "eval", "grid"], "coind": ["toy", "train", "eval", "sample"]}


def test_top_level_help_lists_every_subcommand_on_one_line(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, (_, text) in COMMANDS.items():
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(name + " ") or ln.strip() == name)
        assert text.split()[0] in line, (name, line)  # the help text starts on the command's own line
    assert main([]) == 0


@pytest.mark.parametrize("argv", [[c] for c in COMMANDS] + [[c, a] for c, acts in NESTED.items() for a in acts])
def test_every_subcommand_has_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: compkern " + argv[0])
    # one vocabulary: no bare --steps / --batch / --ddim-steps in any help
    for old in ("--steps ", "--batch ", "--ddim-steps"):
        assert old not in out.replace("--mcmc-steps", "").replace("--sample-steps", "").replace("--train-steps", ""), old


def test_unknown_subcommand_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown command 'frobnicate'" in err and "usage: compkern" in err


def _parse(command: str, argv: list[str]) -> argparse.Namespace:
    import importlib

    p = argparse.ArgumentParser()
    importlib.import_module(COMMANDS[command][0]).add_arguments(p)
    return p.parse_args(argv)


@pytest.mark.parametrize("command, new, old, dest, value", [
    ("positions", ["train", "--out", "o", "--train-steps", "7"], ["train", "--out", "o", "--steps", "7"], "steps", 7),
    ("positions", ["train", "--out", "o", "--batch-size", "5"], ["train", "--out", "o", "--batch", "5"], "batch", 5),
    ("positions", ["sample", "r", "--sample-steps", "9"], ["sample", "r", "--steps", "9"], "steps", 9),
    ("positions", ["eval", "--sample-steps", "9"], ["eval", "--steps", "9"], "steps", 9),
    ("coind", ["train", "--out", "o", "--train-steps", "7"], ["train", "--out", "o", "--steps", "7"], "steps", 7),
    ("coind", ["toy", "--batch-size", "5"], ["toy", "--batch", "5"], "batch", 5),
    ("coind", ["eval", "r", "--sample-steps", "9"], ["eval", "r", "--ddim-steps", "9"], "ddim_steps", 9),
    ("sepen", ["train", "--train-steps", "7"], ["train", "--steps", "7"], "steps", 7),
    ("generate", ["--model", "m", "--prompt", "p", "--out", "o", "--sample-steps", "9"],
     ["--model", "m", "--prompt", "p", "--out", "o", "--steps", "9"], "steps", 9),
    ("main-job", ["--sample-steps", "9"], ["--steps", "9"], "steps", 9),
    ("bench", ["--results", "t.md"], ["--out", "t.md"], "out", "t.md"),
])
def test_old_spellings_are_hidden_aliases(command, new, old, dest, value):
    assert getattr(_parse(command, new), dest) == value
    assert getattr(_parse(command, old), dest) == value


def test_defaults_survive_the_aliases():
    assert _parse("positions", ["train", "--out", "o"]).steps == 2000
    assert _parse("positions", ["sample", "r"]).steps == 50
    assert _parse("generate", ["--model", "m", "--prompt", "p", "--out", "o"]).steps == 50
    assert _parse("coind", ["eval", "r"]).ddim_steps == 50
    assert _parse("sepen", ["eval"]).steps is None and _parse("sepen", ["eval"]).sample_steps == 50


def test_coind_end_to_end_tiny(tmp_path, capsys):
    """coind toy, then train / eval / sample on 8x8 digits with a tiny model (seconds)."""
    from compkern.models import AttributeClassifier
    from compkern.utils.checkpoint import atomic_save

    toy = tmp_path / "toy"
    assert main(["coind", "toy", "--train-steps", "3", "--seeds", "0", "--lam", "1", "--weights", "1", "--n", "8",
                 "--batch-size", "16", "--out", str(toy), "--threads", "1"]) == 0
    summary = json.loads((toy / "toy.json").read_text())["summary"]
    assert set(summary) == {"lam1_w1"} and 0 <= summary["lam1_w1"]["mean"] <= 1
    run = tmp_path / "run"
    assert main(["coind", "train", "--out", str(run), "--train-steps", "2", "--batch-size", "4", "--ci-batch", "2",
                 "--digits", "2", "--colors", "2", "--channels", "8", "16", "--no-attention", "--save-every", "1",
                 "--no-progress"]) == 0
    assert (run / "checkpoint.pt").exists()
    clf = AttributeClassifier([2, 2])
    atomic_save({"config": config_dict(clf), "state": clf.state_dict(), "test_acc": {"cs": 0.0, "acc": [0.0, 0.0]}},
                tmp_path / "clf_s8.pt")
    assert main(["coind", "eval", str(run), "--weights", "1", "--n-per", "1", "--jsd-per", "1", "--sample-steps", "2",
                 "--classifier", str(tmp_path / "clf_s{size}.pt")]) == 0
    res = json.loads((run / "eval.json").read_text())
    assert res["step"] == 2 and res["sweep"][0]["w"] == 1.0 and "unseen" in res["jsd"]
    png = tmp_path / "s.png"
    assert main(["coind", "sample", str(run), "--digit", "1", "--color", "0", "--n", "2", "--png", str(png)]) == 0
    assert png.stat().st_size > 0
    assert torch.isfinite(torch.tensor(res["best"]["cs_unseen"]))


def test_benchmark_rows_are_json_lines(tmp_path):
    """`compkern bench ops --jsonl F` appends one structured row per timing."""
    import json

    import torch

    from compkern.experiments.bench import HEADER, append_jsonl, configs, record, table_from_rows

    cfg = configs(full=False)[0]
    rows = [record(cfg, impl, 2e-3, 1e-3, device="cpu") for impl in ("eager", "cpp")]
    append_jsonl(str(tmp_path / "b.jsonl"), rows[:1])
    append_jsonl(str(tmp_path / "b.jsonl"), rows[1:])
    back = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert [r["impl"] for r in back] == ["eager", "cpp"]
    assert back[0]["op"] == cfg.op and back[0]["x_floor"] == 2.0 and back[0]["threads"] == torch.get_num_threads()
    assert {"config", "dtype", "bytes", "device", "commit", "time_s", "floor_s", "peak_mem_bytes"} <= set(back[0])
    rows = [record(cfg, "compile", 4e-3, 1e-3, device="cpu"), *back]
    table = table_from_rows(rows)
    lines = table.splitlines()
    assert lines[0] == HEADER and len(lines) == 2 + 3
    assert "| cpp |" in lines[4] and "2.00x" in lines[4] and "x" not in lines[3].split("|")[-3]  # eager: no vs-compile
    append_jsonl(str(tmp_path / "b.jsonl"), rows[:1])
    from compkern.cli import main

    assert main(["bench", "table", "--jsonl", str(tmp_path / "b.jsonl")]) == 0
    with pytest.raises(ValueError, match="--jsonl"):
        main(["bench", "table"])
