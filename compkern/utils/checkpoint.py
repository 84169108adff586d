"""Atomic writes (write to a temp file in the same folder, fsync, then rename over the target) and
safe loading (``torch.load(weights_only=True)``: a file in a run folder can hold tensors, numbers,
strings, None and dicts / lists / tuples of them, and nothing that runs code when unpickled).

What the library saves (every ``atomic_save`` / ``RunFolder.save`` call site): Trainer checkpoints
(module and optimizer state dicts, generator / RNG byte tensors, step, history), rejection shards,
main-job and generate cells, CoInD classifiers, demo component models, detector and position
samples: all plain containers of tensors and JSON-like values, so ``SAFE_GLOBALS`` is empty. A
class that some file must hold goes there (and into the test that round-trips every kind).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch


def _atomic_write(path: str | os.PathLike, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save ``obj`` to ``path`` atomically."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_json(obj: Any, path: str | os.PathLike) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True).encode()))


def atomic_save_pretrained(model, folder: str | os.PathLike) -> Path:
    """``model.save_pretrained(folder)`` (a diffusers ModelMixin: config.json + safetensors) all or
    nothing: written to ``folder.tmp``, then swapped in through ``folder.old``; a crash leaves the
    old folder or the new one (``pretrained_folder`` finds it), never half of one."""
    folder = Path(folder)
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    for d in (tmp, old):
        if d.exists() and folder.exists():
            shutil.rmtree(d)
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def pretrained_folder(folder: str | os.PathLike) -> Path | None:
    """The folder ``atomic_save_pretrained`` last completed: ``folder``, or ``folder.old`` after a
    crash between its two renames; None when neither exists."""
    folder = Path(folder)
    for d in (folder, folder.with_name(folder.name + ".old")):
        if (d / "config.json").exists():
            return d
    return None


#: Non-container, non-tensor types that checkpoint files may hold (allow-listed for unpickling).
SAFE_GLOBALS: list[Any] = []


class UnsafeCheckpointError(pickle.UnpicklingError, ValueError):
    """A file that ``load`` refuses: it is not a torch checkpoint of plain data (it would import or
    call something that is not allow-listed, e.g. a crafted pickle)."""


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True`` (plus ``SAFE_GLOBALS``): never runs code stored in the
    file. A file that needs anything else raises UnsafeCheckpointError (a ValueError) naming it."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()
        detail = next((line.strip() for line in reason if "GLOBAL" in line or "Unsupported" in line),
                      reason[0] if reason else type(e).__name__)
        raise UnsafeCheckpointError(
            f"refusing to load {os.fspath(path)}: it is not a checkpoint of plain tensors and containers "
            f"(the weights-only unpickler refused it: {detail}); a pickle that imports or calls anything "
            "else could run code. Files in a run folder must come from compkern: delete this one or use a "
            "fresh folder") from None


def check_run_folder(out: str | os.PathLike, cfg: dict, keys: tuple[str, ...], *, what: str = "run",
                     write: bool = True) -> None:
    """Refuse a folder whose config.json differs from ``cfg`` in any of ``keys`` (ValueError naming
    --out and the differences), then (``write``) record ``cfg`` there atomically: the check every
    resumable job runs before it reuses a folder."""
    path = Path(out) / "config.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), cfg.get(k)) for k in keys if old.get(k) != cfg.get(k)}
        if diff:
            raise ValueError(f"--out {out} holds a {what} made with other settings {diff} (old, new); use a new folder")
    if write:
        atomic_write_json(cfg, path)
