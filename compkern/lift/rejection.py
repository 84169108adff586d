"""A streaming batch rejection sampler: generate, score, accept, refill, until N samples are
accepted or a budget of model rows is spent. Accepted samples and the sampler state live in
atomic shards in ``out_dir``; a rerun with the same folder resumes where it stopped.

Batch i always draws from a generator seeded with (seed, i), so a resumed run produces exactly
the batches an uninterrupted one would: nothing accepted is lost or duplicated (a shard written
just before a crash, but not yet listed in state.json, is simply rewritten with the same content).

Early rejection (``early_reject=CONFIDENCE``, ``checks``): the generator is called as
``generate(B, g, rule=...)`` and stops, after ``rule.checks[i]`` of its steps, the candidates whose
partial margin is below ``rule.thresholds[i]`` (``compkern.lift.early_reject``); it returns the
survivors, their ``alive`` mask and every candidate's ``margins`` at the checks. The first batches
are the pilot (full trajectories, margins recorded) until they hold ``pilot`` candidates and
enough accepted ones for the confidence; the rule is then calibrated on them, the same rule on a
resumed run (it is a function of the committed pilot shards).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
import math
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from compkern.lift.early_reject import EarlyRejectRule, check_confidence, min_pilot_accepts, partial_lift_margins
from compkern.utils.checkpoint import load
from compkern.utils.run_folder import RunFolder


@dataclass
class Batch:
    """What a generator returns: x (B, *S), the sampling record (for cached lift trials) or None,
    and the model rows it spent. With early rejection: x (B', *S) and the record of the B'
    candidates sampled to the end, ``alive`` (B,) bool saying which they are, ``margins``
    (n_checks, B) fp32 every candidate's partial margin at each check (NaN where it had stopped)."""

    x: torch.Tensor
    record: Any = None
    n_evals: int = 0
    alive: torch.Tensor | None = None
    margins: torch.Tensor | None = None


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
    n_stopped: int = 0  # candidates stopped early (counted in n_generated, never accepted)
    rule: EarlyRejectRule | None = None  # the calibrated early-rejection rule (None: none, or the pilot runs)

    @property
    def acceptance_rate(self) -> float:
        return self.n_accepted / max(self.n_generated, 1)

    @property
    def rows_per_accepted(self) -> float:
        return self.n_evals / max(self.n_accepted, 1)


GenerateFn = Callable[..., "Batch | torch.Tensor"]  # (B, generator[, rule=EarlyRejectRule]) -> Batch | x
ScoreFn = Callable[[torch.Tensor, Any, torch.Generator], Any]


class RejectionSampler:
    """generate(batch_size, generator) -> Batch | x; score(x, record, generator) -> a LiftResult
    with ``.accept`` (B,) bool (and ``.n_evals``, ``.lift``), or a tuple (accept (B,) bool, n_evals).

    ``config``: everything that defines the run (task, expression, model checkpoint, lift options);
    saved in out_dir/config.json with batch_size and seed, and compared on every rerun: a folder
    made by another configuration is refused with a ValueError.

    ``early_reject``: a confidence in (0.5, 1] (module docstring; 1 keeps every decision as it is
    without it), ``checks``: the generator's step counts after which it checks (increasing),
    ``pilot``: the fewest full-trajectory candidates the rule is calibrated on."""

    def __init__(self, out_dir: str | Path, generate: GenerateFn, score: ScoreFn, *, config: dict | None = None,
                 batch_size: int = 256, seed: int = 0, keep_rejected: bool = False, progress: bool = True,
                 desc: str = "rejection", early_reject: float | None = None, checks: Sequence[int] | None = None,
                 pilot: int = 64):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        early = {}
        if early_reject is not None:
            check_confidence(early_reject)
            if not checks or any(int(c) < 1 for c in checks) or list(checks) != sorted(set(int(c) for c in checks)):
                raise ValueError(f"early_reject needs checks: increasing step counts >= 1, got {checks}")
            if pilot < 1:
                raise ValueError(f"pilot must be >= 1, got {pilot}")
            early = dict(early_reject=float(early_reject), checks=[int(c) for c in checks], pilot=int(pilot))
        self.out_dir = Path(out_dir)
        self.generate, self.score = generate, score
        self.config = json.loads(json.dumps(dict(config or {}, batch_size=batch_size, seed=seed,
                                                 keep_rejected=keep_rejected, **early)))
        self.batch_size, self.seed, self.keep_rejected = batch_size, seed, keep_rejected
        self.early = early or None
        self.progress, self.desc = progress, desc
        self.state = {"batches": 0, "n_generated": 0, "n_accepted": 0, "n_evals": 0, "shards": []}
        self._rule: EarlyRejectRule | None = None  # calibrated once the pilot is complete
        self._pilot: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # shard -> (margins, decisions) read so far
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
            rule = self.rule()
            out = self.generate(self.batch_size, g) if rule is None else self.generate(self.batch_size, g, rule=rule)
            batch = out if isinstance(out, Batch) else Batch(out)
            x, alive = batch.x, self._check_batch(batch, rule)
            if not torch.isfinite(x).all():
                raise FloatingPointError(f"batch {i}: generated samples hold NaN or inf")
            accept, rows, lift = self._score(x, batch.record, g)
            shard = {"batch": i, "accepted": x[accept].detach().cpu(),
                     "lift": None if lift is None else lift[:, accept].detach().cpu()}
            if rule is not None:  # every candidate's margins and final decision (the pilot's calibration data)
                decided = torch.zeros(self.batch_size, dtype=torch.bool)
                decided[alive] = accept.cpu()
                shard.update(margins=batch.margins.detach().float().cpu(), decisions=decided, alive=alive.clone())
            if self.keep_rejected:
                shard["rejected"] = x[~accept].detach().cpu()
                shard["rejected_lift"] = None if lift is None else lift[:, ~accept].detach().cpu()
            n_acc = int(accept.sum())
            self.state = dict(st, batches=i + 1, n_generated=st["n_generated"] + self.batch_size,
                              n_accepted=st["n_accepted"] + n_acc, n_evals=st["n_evals"] + batch.n_evals + rows,
                              n_stopped=st.get("n_stopped", 0) + int((~alive).sum()))
            self.state["shards"] = st["shards"]
            self._commit(i, shard)
            st = self.state
            bar.update(max(0, min(n_acc, n_accept - bar.n)))
            bar.set_postfix(accept=f"{st['n_accepted'] / st['n_generated']:.1%}",
                            rows_per_acc=f"{st['n_evals'] / max(st['n_accepted'], 1):.0f}")
        bar.close()
        return self.result(n_accept)

    def _check_batch(self, batch: Batch, rule: EarlyRejectRule | None) -> torch.Tensor:
        """The (B,) bool alive mask of a generated batch, its shapes checked."""
        x, B = batch.x, self.batch_size
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise ValueError(f"generate must return samples (B, *S), got {type(x).__name__}")
        if rule is None:
            if x.shape[0] != B:
                raise ValueError(f"generate must return {B} samples (B, *S), got {tuple(x.shape)}")
            return torch.ones(B, dtype=torch.bool)
        alive, margins = batch.alive, batch.margins
        if not isinstance(alive, torch.Tensor) or alive.dtype != torch.bool or alive.shape != (B,):
            raise ValueError(f"with early rejection generate must return alive, a ({B},) bool mask of the candidates "
                             f"it sampled to the end, got {None if alive is None else tuple(alive.shape)}")
        if x.shape[0] != int(alive.sum()):
            raise ValueError(f"generate returned {x.shape[0]} samples for {int(alive.sum())} alive candidates")
        if not isinstance(margins, torch.Tensor) or margins.shape != (len(rule.checks), B):
            raise ValueError(f"with early rejection generate must return margins (n_checks, B) = "
                             f"({len(rule.checks)}, {B}), got {None if margins is None else tuple(margins.shape)}")
        return alive.cpu()

    def _score(self, x: torch.Tensor, record, g: torch.Generator) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        """(accept (B',) bool, model rows, lift (K, B') or None) of the samples x (B', *S)."""
        if x.shape[0] == 0:
            return torch.zeros(0, dtype=torch.bool), 0, None
        scored = self.score(x, record, g)
        if isinstance(scored, tuple):
            accept, rows, lift = scored[0], int(scored[1]), None
        else:
            accept, rows, lift = scored.accept, int(scored.n_evals), getattr(scored, "lift", None)
        accept = torch.as_tensor(accept, device=x.device).bool()
        if accept.shape != (x.shape[0],):
            raise ValueError(f"score must give accept (B,) = ({x.shape[0]},), got {tuple(accept.shape)}")
        return accept, rows, lift

    def rule(self) -> EarlyRejectRule | None:
        """The early-rejection rule for the next batch: None without early rejection; every check
        off while the pilot runs (the committed batches 0, 1, ... until they hold ``pilot``
        candidates and ``min_pilot_accepts`` accepted ones); then the rule calibrated on them."""
        if self.early is None:
            return None
        if self._rule is not None:
            return self._rule
        conf, checks = self.early["early_reject"], tuple(self.early["checks"])
        need = min_pilot_accepts(conf, len(checks))
        margins, decisions = [], []
        for name in self.state["shards"]:
            if name not in self._pilot:  # each committed shard is read once
                d = load(self.out_dir / name)
                self._pilot[name] = (d["margins"], d["decisions"])
            margins.append(self._pilot[name][0])
            decisions.append(self._pilot[name][1])
            n = sum(len(x) for x in decisions)
            if n >= self.early["pilot"] and int(sum(x.sum() for x in decisions)) >= need:
                self._rule = EarlyRejectRule.calibrate(torch.cat(margins, 1), torch.cat(decisions), checks, conf)
                return self._rule
        return EarlyRejectRule(checks, (-math.inf,) * len(checks), conf)

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
                               torch.cat(rej) if rej else None, st.get("n_stopped", 0),
                               self.rule() if self.early else None)


# -- the standard CompLift setup ---------------------------------------------------------------------
def complift_functions(model, schedule, expr, conds: list, null_cond, sample_shape: tuple[int, ...], *,
                       num_steps: int = 50, eta: float = 1.0, cached: bool = True, chunk_size: int | None = None,
                       **lift_options) -> tuple[GenerateFn, ScoreFn]:
    """(generate, score) for RejectionSampler: Composable Diffusion with the expression's weights
    (``compkern.samplers.ComposedEps`` + DDIM with ``eta``; eta = 1 is DDPM; one generator per
    candidate, seeded from the batch's, so a candidate's trajectory does not depend on who else
    stops), scored by ``estimate_lift`` with the expression (adaptive stopping and cached trials
    if asked). ``generate(B, g, rule=...)`` stops candidates early (``partial_lift_margins`` of the
    steps so far at each of the rule's checks)."""
    from compkern.lift.estimator import estimate_lift
    from compkern.models.base import stack_conditions
    from compkern.samplers import ComposedEps, ddim_sample

    if expr.num_components != len(conds):
        raise ValueError(f"expr has {expr.num_components} components {expr.names} but {len(conds)} conds were given")
    weights = expr.weights()

    def generate(n: int, g: torch.Generator, rule: EarlyRejectRule | None = None) -> Batch:
        rows = [null_cond, *conds] if rule is None else stack_conditions([null_cond, *conds], n)  # per sample: select
        eps_fn = ComposedEps(model, rows, weights, chunk_size=chunk_size, record=cached or rule is not None)
        gens = [torch.Generator().manual_seed(int(s)) for s in torch.randint(0, 2 ** 62, (n,), generator=g)]
        x_T = torch.stack([torch.randn(*sample_shape, generator=gi) for gi in gens])
        if rule is None:
            x = ddim_sample(eps_fn, x_T, schedule, num_steps=num_steps, eta=eta, generator=gens)
            return Batch(x, eps_fn.record, eps_fn.n_evals)
        alive = torch.ones(n, dtype=torch.bool)
        margins = torch.full((len(rule.checks), n), float("nan"))

        def on_step(s: int, x: torch.Tensor) -> torch.Tensor | None:
            if s not in rule.checks:
                return None
            i, idx = rule.checks.index(s), alive.nonzero().flatten()
            m = partial_lift_margins(expr, eps_fn.record, schedule, weights, conds, null_cond).cpu()
            margins[i, idx] = m
            keep = rule.keep(i, m)
            alive[idx[~keep]] = False
            if not bool(keep.all()):
                eps_fn.select(keep)
            return keep

        x = ddim_sample(eps_fn, x_T, schedule, num_steps=num_steps, eta=eta, generator=gens, on_step=on_step)
        return Batch(x, eps_fn.record if cached else None, eps_fn.n_evals, alive=alive, margins=margins)

    def score(x: torch.Tensor, record, g: torch.Generator):
        return estimate_lift(model, x, conds, null_cond, schedule, expr=expr, record=record if cached else None,
                             generator=g, chunk_size=chunk_size, **lift_options)

    return generate, score
