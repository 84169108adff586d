"""Argument checks shared by the ops: each raises TypeError/ValueError naming the argument."""
from __future__ import annotations

from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, x, *, ndim_min: int | None = None, ndim: int | None = None,
                 float_dtype: bool = True, expected: str = "") -> None:
    """``x`` is a tensor of a floating dtype (fp32/fp16/bf16/fp64) with the required rank."""
    hint = f" (expected {expected})" if expected else ""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{hint}, got {type(x).__name__}")
    if float_dtype and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64{hint}, got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions{hint}, got shape {tuple(x.shape)}")
    if ndim_min is not None and x.dim() < ndim_min:
        raise ValueError(f"{name} must have at least {ndim_min} dimensions{hint}, got shape {tuple(x.shape)}")


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        desc = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {desc}")
    return first


def check_shape(name: str, x: torch.Tensor, shape: Sequence[int], what: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {what} = {tuple(shape)}, got {tuple(x.shape)}")


def _byte_span(x: torch.Tensor) -> tuple[int, int]:
    """[first, last) byte addresses of the elements of ``x`` (any strides)."""
    if x.numel() == 0:
        return 0, 0
    lo = hi = x.data_ptr()
    for size, stride in zip(x.shape, x.stride()):
        reach = (size - 1) * stride * x.element_size()
        lo, hi = (lo + reach, hi) if reach < 0 else (lo, hi + reach)
    return lo, hi + x.element_size()


def check_out(out, shape: Sequence[int], dtype: torch.dtype, device: torch.device, what: str,
              **inputs: torch.Tensor) -> None:
    """``out`` is a contiguous tensor of ``shape``, ``dtype`` and ``device`` whose memory does not
    overlap any of ``inputs`` (a kernel writing it would read clobbered inputs)."""
    shape = tuple(shape)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor of shape {what} = {shape} and dtype {dtype}, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"out must have dtype {dtype} (the dtype of preds), got {out.dtype}")
    if tuple(out.shape) != shape:
        raise ValueError(f"out must have shape {what} = {shape}, got {tuple(out.shape)}")
    if out.device != device:
        raise ValueError(f"out must be on {device} (the device of the inputs), got {out.device}")
    if not out.is_contiguous():
        raise ValueError(f"out must be contiguous (shape {what} = {shape}), got strides {out.stride()}")
    if device.type == "meta":
        return
    lo, hi = _byte_span(out)
    for name, x in inputs.items():
        if x is None or x.device != device or hi == lo:
            continue
        xlo, xhi = _byte_span(x)
        if xlo < hi and lo < xhi:
            raise ValueError(f"out must not overlap {name} in memory (its kernel reads {name} while writing out)")
