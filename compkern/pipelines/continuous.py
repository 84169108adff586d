"""Continuous batching: ``slots`` independent reverse trajectories in one batched UNet call per
step, each at its own step; a slot whose image finishes or is stopped early takes the next seed
at once, so the batch stays full while early rejection (``early_reject``) drops images.

Every image is a function of its seed alone: its generator draws its initial latents and then
its step noise (eta > 0) exactly as ``CompositionPipeline.__call__`` does, the timesteps are per
sample (t (B,)), and the DDIM/DDPM step is the same ``ddim_step`` with per-sample levels; so an
image does not depend on its slot or on which others share its calls (up to the last bits of
batched arithmetic). Per slot the state is (seed, generator, x_t, step, its recorded steps, its
UNet rows, its partial margins). Recording slots (this step is one of their ``record_every``
steps) evaluate every condition row; the others only the rows generation weighs, in a second
call of the same step.

    sampler = ContinuousSampler(pipe, "a cat AND a dog", slots=8, num_inference_steps=50, early_reject=rule)
    for image in sampler.run(range(1000)):   # SlotResult, in the order images finish
        ...
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Iterator

import torch

from compkern.models.base import evaluate_conditions
from compkern.samplers.composed import NEGATIONS, StepRecord, compose_eps, used_rows
from compkern.samplers.diffusion import ddim_step

if TYPE_CHECKING:
    from compkern.pipelines.early_reject import EarlyRejectRule


@dataclass
class SlotResult:
    """One image: latents (C, h, w) fp32 (the final x0, or x where it stopped); stopped: the steps
    it ran (num_inference_steps: to the end); margins (n_checks,) fp32 (NaN: check not reached);
    record: its recorded steps [(x_t (C, h, w), t (), preds (R, C, h, w))]; rows: its UNet rows."""

    seed: int
    latents: torch.Tensor
    stopped: int
    margins: torch.Tensor
    record: list = field(default_factory=list)
    rows: int = 0


def stack_record(results: list[SlotResult]) -> StepRecord:
    """The StepRecord (steps of (R, B, C, h, w)) of images with the same recorded steps."""
    if len({len(r.record) for r in results}) != 1:
        raise ValueError("stack_record needs images with the same number of recorded steps")
    steps = range(len(results[0].record))
    return StepRecord([torch.stack([r.record[i][0] for r in results]) for i in steps],
                      [torch.stack([r.record[i][1] for r in results]) for i in steps],
                      [torch.stack([r.record[i][2] for r in results], 1) for i in steps])


class _Slot:
    def __init__(self, seed: int, gen: torch.Generator, x: torch.Tensor, n_checks: int):
        self.seed, self.gen, self.x, self.step = seed, gen, x, 0
        self.record: list = []
        self.rows = 0
        self.margins = torch.full((n_checks,), float("nan"))

    def result(self) -> SlotResult:
        return SlotResult(self.seed, self.x.float(), self.step, self.margins, self.record, self.rows)


class ContinuousSampler:
    """Images of one composed prompt from a stream of seeds through ``slots`` slots (keywords as
    ``CompositionPipeline.__call__``; record: keep the recorded steps in each result)."""

    def __init__(self, pipe, prompt: str | object, *, slots: int = 8, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 negative_prompt: str = "", eta: float = 0.0, generate: str = "joint", record_joint: bool | None = None,
                 record: bool = True, record_every: int = 1, early_reject: "EarlyRejectRule | None" = None,
                 clip_x0: float | str | None = "auto",
                 height: int | None = None, width: int | None = None, chunk_size: int | None = None,
                 negation: str = "linear"):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if record_every < 1:
            raise ValueError(f"record_every must be >= 1, got {record_every}")
        if negation not in NEGATIONS:
            raise ValueError(f"negation must be one of {NEGATIONS}, got {negation!r}")
        self.comp, emb, self.weights, self.generate, self.clip_x0 = pipe.sampling_setup(
            prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            negative_prompt=negative_prompt, generate=generate, record_joint=record_joint, clip_x0=clip_x0,
            height=height, width=width, early_reject=early_reject)
        self.negation, self.rule = negation, early_reject
        self.pipe, self.slots, self.S, self.eta = pipe, int(slots), int(num_inference_steps), float(eta)
        self.model = pipe.eps_model(emb)
        self.R = len(emb)
        self.used = used_rows(self.weights).cpu()
        self.record_every = int(record_every)
        self.record_until = None if record or early_reject is None else early_reject.checks[-1]
        self.keep_record = record
        self.recording = record or early_reject is not None
        self.height, self.width, self.chunk_size = height, width, chunk_size
        self.ts = pipe.schedule.timesteps(self.S)
        self.n_evals = 0

    def _records_now(self, s: _Slot) -> bool:
        return self.recording and s.step % self.record_every == 0 and \
            (self.record_until is None or s.step < self.record_until)

    def _eps(self, active: list[_Slot], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps (B, *S) of the active slots: recording slots with every row, the others with the used rows."""
        eps = torch.empty_like(x)
        rec = torch.tensor([self._records_now(s) for s in active])
        for group, rows in ((rec, torch.arange(self.R)), (~rec, self.used)):
            idx = group.nonzero().flatten()
            if not len(idx):
                continue
            ids = rows.to(x.device)[:, None].expand(len(rows), len(idx))
            preds = evaluate_conditions(self.model, x[idx], t[idx], ids, chunk_size=self.chunk_size)
            w = self.weights if len(rows) == self.R else self.weights[rows[1:] - 1]
            eps[idx] = compose_eps(preds, w, self.negation).to(x.dtype)
            self.n_evals += preds.shape[0] * preds.shape[1]
            for j, i in enumerate(idx.tolist()):
                active[i].rows += preds.shape[0]
                if rec[i]:
                    active[i].record.append((x[i].detach(), t[i].detach(), preds[:, j].detach()))
        if not bool(torch.isfinite(eps).all()):
            raise FloatingPointError("ContinuousSampler: the eps model returned NaN or inf; check the model and weights")
        return eps

    def _check(self, done_now: list[_Slot]) -> list[_Slot]:
        """Early rejection for the slots that just finished a check step; returns those it stops."""
        from compkern.pipelines.early_reject import partial_margins

        stopped = []
        for i, s_check in enumerate(self.rule.checks):
            group = [s for s in done_now if s.step == s_check]
            if not group:
                continue
            rec = stack_record([g.result() for g in group])
            m = partial_margins(self.comp, rec, (s_check,), record_every=self.record_every, schedule=self.pipe.schedule,
                                weights=self.weights, clip_x0=self.clip_x0, negation=self.negation)[0].cpu()
            keep = self.rule.keep(i, m)
            for g, mi, k in zip(group, m.tolist(), keep.tolist()):
                g.margins[i] = mi
                if not k:
                    stopped.append(g)
        return stopped

    def output(self, results: list[SlotResult]):
        """A CompositionOutput of ``results`` (in that order), as the batch pipeline returns it with
        early rejection: latents (B, ...), alive / stopped / margins, the record of the images
        sampled to the end (None without record), n_evals: their UNet rows."""
        from compkern.pipelines.composition import CompositionOutput

        alive = torch.tensor([r.stopped == self.S for r in results])
        live = [r for r in results if r.stopped == self.S]
        return CompositionOutput(None, torch.stack([r.latents for r in results]),
                                 stack_record(live) if live and self.keep_record else None, sum(r.rows for r in results),
                                 self.comp, self.weights, [r.seed for r in results], [], self.generate, alive,
                                 torch.tensor([r.stopped for r in results]), torch.stack([r.margins for r in results], 1))

    @torch.no_grad()
    def run(self, seeds: Iterable[int]) -> Iterator[SlotResult]:
        """SlotResult of every seed, yielded as each image finishes or stops."""
        abar = self.pipe.schedule.alphas_cumprod
        it = iter(seeds)
        active: list[_Slot] = []
        exhausted = False
        while True:
            while not exhausted and len(active) < self.slots:
                try:
                    seed = int(next(it))
                except StopIteration:
                    exhausted = True
                    break
                gen = torch.Generator().manual_seed(seed)
                x = self.pipe.initial_latents([gen], height=self.height, width=self.width)[0]
                active.append(_Slot(seed, gen, x, 0 if self.rule is None else len(self.rule.checks)))
            if not active:
                return
            x = torch.stack([s.x for s in active])
            steps = torch.tensor([s.step for s in active])
            t = self.ts[steps].to(x.device)
            eps = self._eps(active, x, t)
            nxt = torch.where(steps + 1 < self.S, self.ts[(steps + 1).clamp(max=self.S - 1)], -1)
            a_prev = torch.where(nxt >= 0, abar[nxt.clamp(min=0)], torch.ones((), dtype=abar.dtype))
            x = ddim_step(x, eps, abar[t.cpu()], a_prev, eta=self.eta, clip_x0=self.clip_x0,
                          generator=[s.gen for s in active] if self.eta > 0 else None)
            for s, xi in zip(active, x):
                s.x, s.step = xi, s.step + 1
            gone = set()
            if self.rule is not None:
                gone = {id(s) for s in self._check(active)}
            still = []
            for s in active:
                if id(s) in gone or s.step == self.S:
                    r = s.result()
                    if not self.keep_record:
                        r.record = []
                    yield r
                else:
                    still.append(s)
            active = still
