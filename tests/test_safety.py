"""Safe loading: a crafted pickle in a run folder is refused (naming the file) before it can run
anything; every kind of file the library writes still loads."""
import json
import pickle

import pytest
import torch

from compkern.lift.rejection import Batch, RejectionSampler
from compkern.train import Trainer
from compkern.utils.checkpoint import UnsafeCheckpointError, atomic_save, load
from compkern.utils.run_folder import RunFolder


class _Payload:
    """Unpickling this creates ``marker`` (an ``open(marker, "w")`` call): the stand-in for any
    code a hostile file could run (os.system, exec, ...)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path, marker, *, plain_pickle=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {"modules": {}, "evil": _Payload(marker)}
    if plain_pickle:
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    else:
        torch.save(obj, path)


def test_the_payload_is_real(tmp_path):
    """Guard: the crafted file does run code when loaded the unsafe way, so the refusals below
    are refusals of something that would have run."""
    marker = tmp_path / "pwned"
    _plant(tmp_path / "c.pt", marker)
    torch.load(tmp_path / "c.pt", weights_only=False)["evil"].close()
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("plain_pickle", [False, True])
def test_load_refuses_a_crafted_pickle_naming_the_file(tmp_path, plain_pickle):
    marker, path = tmp_path / "pwned", tmp_path / "run" / "checkpoint.pt"
    _plant(path, marker, plain_pickle=plain_pickle)
    with pytest.raises(UnsafeCheckpointError, match=f"refusing to load {path}") as info:
        load(path)
    assert isinstance(info.value, ValueError) and isinstance(info.value, pickle.UnpicklingError)
    assert not marker.exists()


def _trainer(out):
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)

    def step(i, g):
        x = torch.randn(4, 2, generator=g)
        return {"loss": net(x).square().mean()}

    return Trainer(out, {"net": net}, opt, step, progress=False, save_every=2)


def test_trainer_refuses_a_planted_checkpoint(tmp_path):
    out, marker = tmp_path / "train", tmp_path / "pwned"
    _trainer(out).fit(2)  # a real checkpoint loads
    assert _trainer(out).step == 2
    _plant(out / "checkpoint.pt", marker)
    with pytest.raises(UnsafeCheckpointError, match="checkpoint.pt"):
        _trainer(out)
    assert not marker.exists()


def test_rejection_sampler_and_run_folder_refuse_planted_shards(tmp_path):
    def gen(n, g):
        return Batch(torch.randn(n, 2, generator=g), None, n)

    def score(x, r, g):
        return x[:, 0] > 0, x.shape[0]

    out, marker = tmp_path / "rej", tmp_path / "pwned"
    RejectionSampler(out, gen, score, batch_size=8, progress=False).run(100, max_batches=2)
    s = RejectionSampler(out, gen, score, batch_size=8, progress=False)
    assert s.state["shards"] == ["shard_000000.pt", "shard_000001.pt"] and s.result().samples.shape[1] == 2
    _plant(out / "shard_000001.pt", marker)
    with pytest.raises(UnsafeCheckpointError, match="shard_000001.pt"):
        s.result()
    folder = RunFolder(tmp_path / "folder", {"a": 1})
    folder.save("cells/ok.pt", {"x": torch.ones(2), "rows": 3.5, "name": "c", "t": (1, None)})
    assert folder.load("cells/ok.pt")["t"] == (1, None)
    _plant(folder.file("cells/bad.pt"), marker)
    with pytest.raises(UnsafeCheckpointError, match="bad.pt"):
        folder.load("cells/bad.pt")
    assert not marker.exists()


def test_every_saved_kind_round_trips(tmp_path):
    """What the library's call sites store (module / optimizer state, generator state, nested
    containers of tensors, numbers, str, bool, None, half tensors) loads with weights_only."""
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.LayerNorm(3))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.99))
    net(torch.randn(4, 2)).sum().backward()
    opt.step()
    obj = {"modules": {"net": net.state_dict()}, "optimizer": opt.state_dict(),
           "generator": torch.Generator().get_state(), "torch_rng": torch.get_rng_state(),
           "history": [{"step": 1, "loss": 0.5}], "images": torch.randn(2, 3).half(),
           "config": json.loads(json.dumps({"hidden": [8, 8], "name": "m", "p": 0.1, "flag": True, "none": None}))}
    atomic_save(obj, tmp_path / "c.pt")
    back = load(tmp_path / "c.pt")
    torch.testing.assert_close(back["modules"]["net"]["0.weight"], net[0].weight.detach())
    opt2 = torch.optim.AdamW(net.parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])
    assert opt2.param_groups[0]["betas"] == (0.9, 0.99)
    torch.Generator().set_state(back["generator"])
    assert back["config"] == obj["config"] and back["history"] == obj["history"]
