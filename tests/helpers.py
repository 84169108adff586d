"""Shared test helpers: the flash-attention tolerance rule, the dtypes under test, the cached lift by hand."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_close_to_reference(out: torch.Tensor, ref: torch.Tensor, naive: torch.Tensor, *,
                              atol: float = 1e-5, factor: float = 2.0, name: str = "output") -> None:
    """``out`` (a kernel's result) may err against ``ref`` (fp64 reference) by at most ``factor``
    times the error of ``naive`` (the same computation in plain torch at the input dtype) plus
    ``atol`` relative to the reference's scale. Scales by dtype and shape by itself."""
    ref = ref.double()
    scale = ref.abs().max().clamp_min(1.0).item()
    err = (out.double() - ref).abs().max().item()
    naive_err = (naive.double() - ref).abs().max().item()
    bound = factor * naive_err + atol * scale
    assert err <= bound, f"{name}: max error {err:.3g} > {factor} x naive error {naive_err:.3g} + {atol:g} x {scale:.3g}"


def assert_lowers_for_cuda(script: str) -> None:
    """Run ``script`` (which compiles a Triton kernel for sm_90 and prints the PTX length) in a
    fresh interpreter without TRITON_INTERPRET: the real compile pipeline, no GPU needed."""
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert int(res.stdout.split()[-1]) > 1000


BACKENDS = ["torch", "cpp", "triton"]


def require_backend(backend: str, device: torch.device = torch.device("cpu")) -> None:
    """Skip the test (with the reason) when ``backend`` cannot run on ``device`` here."""
    from compkern import _dispatch

    reason = _dispatch.unavailable_reason(backend, device)
    if reason:
        pytest.skip(reason)


def cached_noise_lift_by_hand(pipe, out, emb) -> torch.Tensor:
    """The cached noise-target pixel lift (K, B, h, w) of a CompositionOutput written out: per
    recorded step, eps* = (x_t - sqrt(abar) x0) / sqrt(1 - abar) and the channel-mean squared error
    of the null row minus each component's; the recorded preds are checked against ``pipe.predict``
    at the recorded points on the way."""
    K = out.composition.K
    want = 0
    for x_t, t, preds in zip(out.record.x_t, out.record.t, out.record.preds):
        assert preds.shape[:2] == (K + 1, out.latents.shape[0])
        torch.testing.assert_close(preds, pipe.predict(x_t, t, emb), atol=1e-5, rtol=1e-4)
        abar = pipe.schedule.alphas_cumprod_at(t).float()[:, None, None, None]
        eps = (x_t - abar.sqrt() * out.latents) / (1 - abar).sqrt()
        err = ((eps - preds) ** 2).mean(2)  # (K+1, B, h, w), mean over channels
        want = want + (err[0] - err[1:K + 1]) / len(out.record)
    return want
