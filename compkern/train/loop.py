"""A small training loop shared by every trainer: AdamW steps, tqdm, atomic checkpoints, resume,
metrics JSON.

``step_fn(step, generator) -> {"loss": tensor, other: float, ...}``; the loop does the backward
pass and the optimizer step. Checkpoints hold the modules, the optimizer, the step, the loop's
generator, torch's global RNG (and CUDA's, when in use) and the partial sums of the next log row,
so a run resumed after a crash continues exactly where its last checkpoint stopped: the same
weights, optimizer state, random draws and history as an uninterrupted run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from compkern.utils.checkpoint import atomic_save_pretrained, load, pretrained_folder
from compkern.utils.run_folder import RunFolder

@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (one fused foreach lerp)."""
    e, m = list(ema.parameters()), [p.detach() for p in model.parameters()]
    if len(e) != len(m):
        raise ValueError(f"ema and model must have the same parameters, got {len(e)} and {len(m)}")
    torch._foreach_lerp_(e, m, 1 - float(decay))


def warmup_cosine(step: int, *, lr: float, steps: int, warmup: int | None = None, final: float = 0.1) -> float:
    """Learning rate at ``step``: linear warmup over ``warmup`` steps (default steps // 50), then
    cosine decay from ``lr`` to ``final * lr`` at ``steps``."""
    warmup = max(1, steps // 50) if warmup is None else max(1, warmup)
    if step < warmup:
        return lr * (step + 1) / warmup
    u = (step - warmup) / max(1, steps - warmup)
    return lr * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * u)))


StepFn = Callable[[int, torch.Generator], dict[str, Any]]


class Trainer:
    """Trains ``modules`` with ``optimizer`` by calling ``step_fn``; state lives in ``out_dir``
    (checkpoint.pt, metrics.json, config.json). A rerun with the same out_dir resumes; a rerun
    with a different ``config`` refuses with a ValueError. ``export``: a diffusers ModelMixin (the
    trained model, or its EMA) written with every checkpoint to out_dir/model by ``save_pretrained``
    (atomically), which ``load_exported`` reads back."""

    def __init__(self, out_dir: str | Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                 step_fn: StepFn, *, config: dict | None = None, seed: int = 0, save_every: int = 500,
                 log_every: int = 50, grad_clip: float | None = 1.0, desc: str = "train", progress: bool = True,
                 export: torch.nn.Module | None = None):
        self.out_dir = Path(out_dir)
        self.export = export  # a diffusers ModelMixin written to out_dir/model with every checkpoint
        self.modules, self.optimizer, self.step_fn = modules, optimizer, step_fn
        self.config = dict(config or {}, seed=seed)
        self.save_every, self.log_every, self.grad_clip = save_every, log_every, grad_clip
        self.desc, self.progress = desc, progress
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self._running: dict[str, float] = {}  # sums over the steps since the last log row
        self._n_running = 0
        self._resume()

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    def _resume(self) -> None:
        self.folder = RunFolder(self.out_dir, json.loads(json.dumps(self.config)), keys="all", what="training run",
                                write=False)
        if not self.checkpoint_path.exists():
            return
        state = load(self.checkpoint_path)
        for name, module in self.modules.items():
            module.load_state_dict(state["modules"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        cuda_rng = state.get("cuda_rng")
        if cuda_rng is not None and torch.cuda.is_available() and len(cuda_rng) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_rng)
        self.step, self.history = state["step"], state["history"]
        if self.export is not None and pretrained_folder(self.out_dir / "model") is None:
            atomic_save_pretrained(self.export, self.out_dir / "model")  # a folder from before exports
        # checkpoints written before the log sums were saved resume with an empty row
        self._running, self._n_running = dict(state.get("running", {})), int(state.get("n_running", 0))

    def save(self) -> None:
        self.folder.write_json("config.json", self.config)
        state = {"modules": {n: m.state_dict() for n, m in self.modules.items()},
                 "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                 "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
                 "step": self.step, "history": self.history,
                 "running": self._running, "n_running": self._n_running}
        self.folder.save("checkpoint.pt", state)
        if self.export is not None:
            atomic_save_pretrained(self.export, self.out_dir / "model")
        self.folder.write_json("metrics.json", {"step": self.step, "history": self.history})

    def fit(self, num_steps: int) -> list[dict[str, float]]:
        """Train until ``num_steps`` total steps (counting resumed ones); returns the history."""
        for m in self.modules.values():
            m.train()
        bar = tqdm(total=num_steps, initial=self.step, desc=self.desc, disable=not self.progress)
        while self.step < num_steps:
            out = self.step_fn(self.step, self.generator)
            loss = out["loss"]
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError(f"{self.desc}: step_fn must return a scalar tensor 'loss', got "
                                f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__} "
                                f"at step {self.step}")
            if not bool(torch.isfinite(loss)):
                raise FloatingPointError(f"{self.desc}: non-finite loss ({loss.item()}) at step {self.step} "
                                         f"(the checkpoint in {self.out_dir} keeps the last saved step); lower the "
                                         "learning rate or check the data / model there")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.grad_clip is not None:
                params = [p for g in self.optimizer.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            self.optimizer.step()
            self.step += 1
            self._n_running += 1
            for k, v in out.items():
                self._running[k] = self._running.get(k, 0.0) + float(v.detach() if isinstance(v, torch.Tensor) else v)
            if self.step % self.log_every == 0 or self.step == num_steps:
                row = {"step": self.step, **{k: v / self._n_running for k, v in self._running.items()}}
                self.history.append(row)
                self._running, self._n_running = {}, 0
                bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k != "step"})
            if self.step % self.save_every == 0 or self.step == num_steps:
                self.save()
            bar.update(1)
        bar.close()
        for m in self.modules.values():
            m.eval()
        return self.history


def load_exported(run: str | Path, cls) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, the run's config) of a training folder whose Trainer exported its model:
    ``cls.from_pretrained(run / "model")`` (a diffusers ModelMixin class, safetensors weights)."""
    from compkern.models.unet import diffusers_load_kwargs

    run = Path(run)
    if not (run / "config.json").exists():
        raise ValueError(f"{run}: not a training folder (no config.json)")
    folder = pretrained_folder(run / "model")
    if folder is None:
        raise ValueError(f"{run}: no exported model/ folder (a run saved before models were exported: rerun its "
                         "training command once, it resumes and exports)")
    model = cls.from_pretrained(folder, **diffusers_load_kwargs())
    return model.eval(), json.loads((run / "config.json").read_text())

