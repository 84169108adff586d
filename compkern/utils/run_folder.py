"""RunFolder: the one output folder of every resumable job (config check, atomic writes, resume).

    folder = RunFolder(out, {"steps": 50, "seed": 0}, what="benchmark")   # refuses other settings
    if not folder.exists("cells/a.pt"):
        folder.save("cells/a.pt", compute())                               # atomic: all or nothing
    row = folder.cell(results, "a", {"n": 32, "threshold": 0.1})           # a cell keyed with its settings

Two checks, one rule: a folder (its ``config.json``) or a cell (a dict in a results file) made
with other settings is refused with a ``ValueError`` that names every differing setting as
(stored, requested); a rerun with the same settings resumes from what is already there. Every
write goes through ``compkern.utils.checkpoint.atomic_save`` / ``atomic_write_json``, so an
interrupted job leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from compkern.utils.checkpoint import atomic_save, atomic_write_json, load

__all__ = ["RunFolder", "settings_diff"]


def settings_diff(stored: Mapping[str, Any], wanted: Mapping[str, Any],
                  keys: Iterable[str] | None = None) -> dict[str, tuple[Any, Any]]:
    """{key: (stored value, wanted value)} for every key of ``keys`` (default: the keys of
    ``wanted``) whose values differ; a key absent from ``stored`` reads as None."""
    keys = list(wanted) if keys is None else list(keys)
    return {k: (stored.get(k), wanted.get(k)) for k in keys if stored.get(k) != wanted.get(k)}


class RunFolder:
    """A resumable job's folder ``path``.

    ``config`` (JSON-able dict) is checked against ``path/config_file`` when that exists: any
    difference in ``keys`` (default: every key of ``config``; "all": every key of either) raises ValueError naming ``--out``,
    ``what`` and the differences; then (``write``) ``config`` is recorded there atomically.
    ``config=None`` opens the folder without a check (readers such as reports)."""

    def __init__(self, path: str | os.PathLike, config: Mapping[str, Any] | None = None, *,
                 keys: Iterable[str] | str | None = None, what: str = "run", config_file: str = "config.json",
                 write: bool = True):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        if config is not None and not isinstance(config, Mapping):
            raise TypeError(f"config must be a dict of settings or None, got {type(config).__name__}")
        self.path = Path(path)
        self.what = what
        self.config_file = config_file
        self.config: dict[str, Any] = dict(config) if config is not None else self.stored_config() or {}
        if config is not None:
            stored = self.stored_config()
            if stored is not None:
                if keys == "all":
                    keys = sorted(set(stored) | set(self.config))
                diff = settings_diff(stored, self.config, keys)
                if diff:
                    raise ValueError(f"--out {self.path} holds a {what} made with other settings {diff} (old, new); "
                                     "use a new folder")
            if write:
                atomic_write_json(self.config, self.path / config_file)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r}, what={self.what!r})"

    # -- files -------------------------------------------------------------------------------
    def file(self, name: str | os.PathLike) -> Path:
        """The path of ``name`` inside the folder."""
        return self.path / name

    def exists(self, name: str | os.PathLike) -> bool:
        return self.file(name).exists()

    def save(self, name: str | os.PathLike, obj: Any) -> Path:
        """torch.save ``obj`` to ``name`` atomically; returns its path."""
        path = self.file(name)
        atomic_save(obj, path)
        return path

    def load(self, name: str | os.PathLike) -> Any:
        return load(self.file(name))

    def write_json(self, name: str | os.PathLike, obj: Any) -> Path:
        """Write ``obj`` as JSON to ``name`` atomically; returns its path."""
        path = self.file(name)
        atomic_write_json(obj, path)
        return path

    def read_json(self, name: str | os.PathLike, default: Any = None) -> Any:
        """The JSON at ``name``, or ``default`` when it does not exist (a fresh folder)."""
        path = self.file(name)
        return json.loads(path.read_text()) if path.exists() else default

    def stored_config(self) -> dict[str, Any] | None:
        """The folder's recorded config, or None for a new folder."""
        return self.read_json(self.config_file)

    # -- cells keyed with their settings ----------------------------------------------------------
    def check_cell(self, stored: Mapping[str, Any], settings: Mapping[str, Any], what: str) -> None:
        """Refuse a stored cell made with other ``settings`` (ValueError naming them)."""
        diff = settings_diff(stored, settings)
        if diff:
            raise ValueError(f"--out {self.path} holds {what} made with other settings {diff} (stored, requested); "
                             "pass another --out")

    def cell(self, results: Mapping[str, Any], key: str, settings: Mapping[str, Any], *,
             what: str | None = None) -> Any:
        """``results[key]`` when it exists and was made with ``settings`` (stored in the cell),
        None when it does not exist (compute it); a cell made with other settings raises."""
        row = results.get(key)
        if row is not None:
            self.check_cell(row, settings, what or f"cell {key}")
        return row
