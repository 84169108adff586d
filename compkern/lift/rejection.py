"""A streaming batch rejection sampler: generate, score, accept, refill, until N samples are
accepted or a budget of model rows is spent. Accepted samples and the sampler state live in
atomic shards in ``out_dir``; a rerun with the same folder resumes where it stopped.

Batch i always draws from a generator seeded with (seed, i), so a resumed run produces exactly
the batches an uninterrupted one would: nothing accepted is lost or duplicated (a shard written
just before a crash, but not yet listed in state.json, is simply rewritten with the same content).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from compkern.utils.checkpoint import load
from compkern.utils.run_folder import RunFolder


@dataclass
class Batch:
    """What a generator returns: x (B, *S), the sampling record (for cached lift trials) or None,
    and the model rows it spent."""

    x: torch.Tensor
    record: Any = None
    n_evals: int = 0


@dataclass
class RejectionResult:
    """samples (N, *S) accepted (in generation order); counts over the whole run."""

    samples: torch.Tensor
    n_generated: int
    n_accepted: int
    n_evals: int
    batches: int
    finished: bool
    lifts: torch.Tensor | None = None
    rejected: torch.Tensor | None = None

    @property
    def acceptance_rate(self) -> float:
        return self.n_accepted / max(self.n_generated, 1)

    @property
    def rows_per_accepted(self) -> float:
        return self.n_evals / max(self.n_accepted, 1)


GenerateFn = Callable[[int, torch.Generator], "Batch | torch.Tensor"]
ScoreFn = Callable[[torch.Tensor, Any, torch.Generator], Any]


class RejectionSampler:
    """generate(batch_size, generator) -> Batch | x; score(x, record, generator) -> a LiftResult
    with ``.accept`` (B,) bool (and ``.n_evals``, ``.lift``), or a tuple (accept (B,) bool, n_evals).

    ``config``: everything that defines the run (task, expression, model checkpoint, lift options);
    saved in out_dir/config.json with batch_size and seed, and compared on every rerun: a folder
    made by another configuration is refused with a ValueError."""

    def __init__(self, out_dir: str | Path, generate: GenerateFn, score: ScoreFn, *, config: dict | None = None,
                 batch_size: int = 256, seed: int = 0, keep_rejected: bool = False, progress: bool = True,
                 desc: str = "rejection"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.out_dir = Path(out_dir)
        self.generate, self.score = generate, score
        self.config = json.loads(json.dumps(dict(config or {}, batch_size=batch_size, seed=seed,
                                                 keep_rejected=keep_rejected)))
        self.batch_size, self.seed, self.keep_rejected = batch_size, seed, keep_rejected
        self.progress, self.desc = progress, desc
        self.state = {"batches": 0, "n_generated": 0, "n_accepted": 0, "n_evals": 0, "shards": []}
        self._open()

    # -- folder ---------------------------------------------------------------------------------
    def _open(self) -> None:
        self.folder = RunFolder(self.out_dir, self.config, keys="all", what="rejection run", write=False)
        state = self.folder.read_json("state.json")
        if state is not None:
            self.state = state
            for s in self.state["shards"]:
                if not (self.out_dir / s).exists():
                    raise ValueError(f"{self.out_dir}: state.json lists shard {s}, which is missing; the folder is damaged")

    def _commit(self, i: int, shard: dict) -> None:
        name = f"shard_{i:06d}.pt"
        self.folder.write_json("config.json", self.config)
        self.folder.save(name, shard)  # first the shard, then the state that lists it
        st = dict(self.state)
        st["shards"] = [*self.state["shards"], name]
        self.folder.write_json("state.json", st)
        self.state = st

    # -- run ------------------------------------------------------------------------------------
    def run(self, n_accept: int, *, max_rows: int | None = None, max_batches: int | None = None) -> RejectionResult:
        """Until ``n_accept`` samples are accepted, or the model rows spent reach ``max_rows``, or
        ``max_batches`` batches were generated (all counted over resumed runs too)."""
        if n_accept < 1:
            raise ValueError(f"n_accept must be >= 1, got {n_accept}")
        st = self.state
        bar = tqdm(total=n_accept, initial=min(st["n_accepted"], n_accept), desc=self.desc, disable=not self.progress)
        while not self._done(n_accept, max_rows, max_batches):
            i = st["batches"]
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            out = self.generate(self.batch_size, g)
            batch = out if isinstance(out, Batch) else Batch(out)
            x = batch.x
            if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] != self.batch_size:
                raise ValueError(f"generate must return {self.batch_size} samples (B, *S), got "
                                 f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
            if not torch.isfinite(x).all():
                raise FloatingPointError(f"batch {i}: generated samples hold NaN or inf")
            scored = self.score(x, batch.record, g)
            if isinstance(scored, tuple):
                accept, rows, lift = scored[0], int(scored[1]), None
            else:
                accept, rows, lift = scored.accept, int(scored.n_evals), getattr(scored, "lift", None)
            accept = torch.as_tensor(accept, device=x.device).bool()
            if accept.shape != (x.shape[0],):
                raise ValueError(f"score must give accept (B,) = ({x.shape[0]},), got {tuple(accept.shape)}")
            shard = {"batch": i, "accepted": x[accept].detach().cpu(),
                     "lift": None if lift is None else lift[:, accept].detach().cpu()}
            if self.keep_rejected:
                shard["rejected"] = x[~accept].detach().cpu()
                shard["rejected_lift"] = None if lift is None else lift[:, ~accept].detach().cpu()
            n_acc = int(accept.sum())
            self.state = dict(st, batches=i + 1, n_generated=st["n_generated"] + x.shape[0],
                              n_accepted=st["n_accepted"] + n_acc, n_evals=st["n_evals"] + batch.n_evals + rows)
            self.state["shards"] = st["shards"]
            self._commit(i, shard)
            st = self.state
            bar.update(max(0, min(n_acc, n_accept - bar.n)))
            bar.set_postfix(accept=f"{st['n_accepted'] / st['n_generated']:.1%}",
                            rows_per_acc=f"{st['n_evals'] / max(st['n_accepted'], 1):.0f}")
        bar.close()
        return self.result(n_accept)

    def _done(self, n_accept, max_rows, max_batches) -> bool:
        st = self.state
        return (st["n_accepted"] >= n_accept or (max_rows is not None and st["n_evals"] >= max_rows)
                or (max_batches is not None and st["batches"] >= max_batches))

    def result(self, n_accept: int | None = None) -> RejectionResult:
        """Everything accepted so far (the first ``n_accept`` if given), read from the shards."""
        st = self.state
        acc, lifts, rej = [], [], []
        for s in st["shards"]:
            d = load(self.out_dir / s)
            acc.append(d["accepted"])
            if d.get("lift") is not None:
                lifts.append(d["lift"])
            if d.get("rejected") is not None:
                rej.append(d["rejected"])
        samples = torch.cat(acc) if acc else torch.empty(0)
        lift = torch.cat(lifts, 1) if lifts and len(lifts) == len(acc) else None
        if n_accept is not None:
            samples = samples[:n_accept]
            lift = None if lift is None else lift[:, :n_accept]
        return RejectionResult(samples, st["n_generated"], st["n_accepted"], st["n_evals"], st["batches"],
                               n_accept is not None and st["n_accepted"] >= n_accept, lift,
                               torch.cat(rej) if rej else None)


# -- the standard CompLift setup ---------------------------------------------------------------------
def complift_functions(model, schedule, expr, conds: list, null_cond, sample_shape: tuple[int, ...], *,
                       num_steps: int = 50, eta: float = 1.0, cached: bool = True, chunk_size: int | None = None,
                       **lift_options) -> tuple[GenerateFn, ScoreFn]:
    """(generate, score) for RejectionSampler: Composable Diffusion with the expression's weights
    (``compkern.samplers.ComposedEps`` + DDIM with ``eta``; eta = 1 is DDPM), scored by
    ``estimate_lift`` with the expression (adaptive stopping and cached trials if asked)."""
    from compkern.lift.estimator import estimate_lift
    from compkern.samplers import ComposedEps, ddim_sample

    if expr.num_components != len(conds):
        raise ValueError(f"expr has {expr.num_components} components {expr.names} but {len(conds)} conds were given")
    weights = expr.weights()

    def generate(n: int, g: torch.Generator) -> Batch:
        eps_fn = ComposedEps(model, [null_cond, *conds], weights, chunk_size=chunk_size, record=cached)
        x_T = torch.randn(n, *sample_shape, generator=g)
        x = ddim_sample(eps_fn, x_T, schedule, num_steps=num_steps, eta=eta, generator=g)
        return Batch(x, eps_fn.record, eps_fn.n_evals)

    def score(x: torch.Tensor, record, g: torch.Generator):
        return estimate_lift(model, x, conds, null_cond, schedule, expr=expr, record=record if cached else None,
                             generator=g, chunk_size=chunk_size, **lift_options)

    return generate, score
