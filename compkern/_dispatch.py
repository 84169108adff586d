"""Backend selection shared by every op (xformers-style: each backend says why it cannot run).

``backend="auto"`` picks ``triton`` for CUDA tensors and ``cpp`` for CPU tensors. If the C++
extension is not built, CPU inputs fall back to the torch reference with one warning. An explicit
backend that cannot take the inputs raises a ValueError listing every backend and its reason.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings
from typing import Callable

import torch

BACKENDS = ("torch", "cpp", "triton")


@functools.lru_cache(maxsize=None)
def _cpp_import_error() -> str | None:
    try:
        importlib.import_module("compkern._C")
    except ImportError as e:  # not built
        return f"C++ extension compkern._C is not built ({e}); run `pip install --no-build-isolation -e .`"
    return None


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        importlib.import_module("triton")
    except ImportError as e:
        return f"triton is not installed ({e})"
    return None


def cpp_module():
    """The compiled extension module ``compkern._C``."""
    return importlib.import_module("compkern._C")


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on tensors of ``device`` (None when it can)."""
    if backend == "torch":
        return None
    if backend == "cpp":
        if device.type != "cpu":
            return f"cpp runs on CPU tensors only, got {device.type}"
        return _cpp_import_error()
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return err
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpret():
            return None
        return f"triton needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU), got {device.type}"
    return f"unknown backend {backend!r}; expected one of {BACKENDS} or 'auto'"


_warned_fallback: set[str] = set()


def resolve(op: str, backend: str, device: torch.device, impls: dict[str, Callable]) -> Callable:
    """Return the implementation of ``op`` for ``backend`` ("auto", "torch", "cpp", "triton")."""
    if not isinstance(backend, str):
        raise TypeError(f"{op}: backend must be a str, got {type(backend).__name__}")
    if backend == "auto":
        preferred = {"cuda": "triton", "cpu": "cpp"}.get(device.type, "torch")
        reason = unavailable_reason(preferred, device) if preferred in impls else "not implemented"
        if reason is None:
            return impls[preferred]
        if preferred == "cpp" and op not in _warned_fallback:
            _warned_fallback.add(op)
            warnings.warn(f"{op}: falling back to the torch reference: {reason}", RuntimeWarning, stacklevel=3)
        elif preferred != "cpp" and device.type == "cuda" and op not in _warned_fallback:
            _warned_fallback.add(op)
            warnings.warn(f"{op}: falling back to the torch reference: {reason}", RuntimeWarning, stacklevel=3)
        return impls["torch"]
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS} or 'auto', got {backend!r}")
    reason = unavailable_reason(backend, device) if backend in impls else f"{op} has no {backend} implementation"
    if reason is None:
        return impls[backend]
    lines = [f"{op}: backend={backend!r} cannot run on these inputs. Backends:"]
    for name in BACKENDS:
        r = unavailable_reason(name, device) if name in impls else "not implemented"
        lines.append(f"  {name}: {r or 'available'}")
    raise ValueError("\n".join(lines))
