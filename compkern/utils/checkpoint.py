"""Atomic writes: write to a temp file in the same folder, fsync, then rename over the target."""
from __future__ import annotations

import json
import os
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


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    return torch.load(path, map_location=map_location, weights_only=False)


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
