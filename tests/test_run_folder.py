"""RunFolder: config check naming the differing settings, cells keyed with their settings,
atomic writes, resume."""
import json

import pytest
import torch

from compkern.utils.run_folder import RunFolder, settings_diff


def test_config_check_refuses_other_settings_and_resumes(tmp_path):
    RunFolder(tmp_path / "r", {"steps": 50, "seed": 0, "note": "a"}, keys=("steps", "seed"), what="benchmark")
    assert json.loads((tmp_path / "r" / "config.json").read_text()) == {"steps": 50, "seed": 0, "note": "a"}
    RunFolder(tmp_path / "r", {"steps": 50, "seed": 0, "note": "b"}, keys=("steps", "seed"))  # note is not frozen
    with pytest.raises(ValueError, match=r"--out .* benchmark made with other settings \{'steps': \(50, 60\)\}"):
        RunFolder(tmp_path / "r", {"steps": 60, "seed": 0}, keys=("steps", "seed"), what="benchmark")
    with pytest.raises(ValueError, match="'seed': \\(0, 1\\)"):  # default keys: every key of the config
        RunFolder(tmp_path / "r", {"steps": 50, "seed": 1, "note": "b"})
    assert RunFolder(tmp_path / "r").config["note"] == "b"  # opened without a check: the stored config
    with pytest.raises(ValueError, match="steps"):
        RunFolder(tmp_path / "r", {"steps": 70}, keys=("steps",), write=False)


def test_files_are_atomic_and_read_back(tmp_path):
    f = RunFolder(tmp_path, {"k": 1})
    assert not f.exists("cells/a.pt")
    f.save("cells/a.pt", {"x": torch.arange(3)})
    assert torch.equal(f.load("cells/a.pt")["x"], torch.arange(3))
    f.write_json("results.json", {"a": 1})
    assert f.read_json("results.json") == {"a": 1} and f.read_json("missing.json", {}) == {}
    assert not list(tmp_path.rglob("*.tmp"))  # no temp files left behind


def test_cells_are_keyed_with_their_settings(tmp_path):
    f = RunFolder(tmp_path)
    results = {"c": {"n": 32, "threshold": 0.1, "accuracy": 0.5}}
    assert f.cell(results, "c", {"n": 32, "threshold": 0.1})["accuracy"] == 0.5
    assert f.cell(results, "d", {"n": 32}) is None  # missing: compute it
    with pytest.raises(ValueError, match=r"--out .* cell c made with other settings \{'threshold': \(0.1, 0.2\)\}"):
        f.cell(results, "c", {"n": 32, "threshold": 0.2})
    with pytest.raises(ValueError, match="'seed': \\(None, 0\\)"):  # a setting the cell never stored
        f.cell(results, "c", {"seed": 0})
    assert settings_diff({"a": 1, "b": 2}, {"a": 1, "b": 3}) == {"b": (2, 3)}


def test_bad_arguments_name_themselves(tmp_path):
    with pytest.raises(TypeError, match="path"):
        RunFolder(3)
    with pytest.raises(TypeError, match="config"):
        RunFolder(tmp_path, [("a", 1)])


def test_all_keys_refuse_a_setting_the_new_config_dropped(tmp_path):
    from compkern.utils.run_folder import RunFolder

    RunFolder(tmp_path / "r", {"lr": 1e-3, "ema": 0.99})
    RunFolder(tmp_path / "r", {"lr": 1e-3})  # default: only the new config's keys are compared
    with pytest.raises(ValueError, match="'ema': \\(0.99, None\\)"):
        RunFolder(tmp_path / "r2", {"lr": 1e-3, "ema": 0.99}) and RunFolder(tmp_path / "r2", {"lr": 1e-3}, keys="all")
