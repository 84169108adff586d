"""Composed generation with CompLift rejection, streamed into a resumable output folder, on one
process or under ``torchrun --nproc-per-node N``: the library behind `compkern generate`
(``compkern.experiments.generate`` parses its arguments and calls ``generate``).

    from compkern.pipelines.generate import GenerateOptions, generate
    generate(GenerateOptions(model="PATH", prompt="a black car AND a white clock", n=100, out="DIR"))

Work is cut into batches of ``batch_size`` images; image i has seed ``seed + i`` and batch j
holds images [j * batch_size, (j + 1) * batch_size). Each batch is generated (one batched UNet
call per step for all condition rows: by default guidance on the joint caption, the other terms
composed), scored (``score``: by default, ``--lift auto``, CompLift lift maps against the 'auto'
target, ``lift_maps.resolve_target``: for a pure AND the joint caption's prediction, cached
from every other sampling step (no extra trial); for anything with a NOT / OR term the noise,
on ``FIXED_TRIALS`` (100) fixed evenly spaced trials (``resolve_lift``); each with its pixel rule, ``lift_maps.default_rule``:
the settings `compkern main-job` measured best) and accepted or rejected, then committed as one
atomic shard ``shards/batch-JJJJJJ.pt`` (``run_batch``; accepted images and their lift-map
overlays are written first). The folder is a ``compkern.utils.run_folder.RunFolder``: a rerun
with the same settings skips committed batches, so an interrupted run resumes where it stopped;
other settings are refused.

Early rejection (``--early-reject CONFIDENCE``, ``compkern.pipelines.early_reject``): the first
batches are sampled to the end with their partial margins recorded after ``--early-check`` (0.4)
of the steps, until
they hold at least ``--pilot`` images and enough accepted ones for the confidence
(``early_reject.min_pilot_accepts``: 19 at 0.95); the rule calibrated on them then stops, in every later batch, the images
whose partial margin says they will be rejected (a finally-accepted image survives with
probability >= CONFIDENCE); a stopped image is rejected and unscored. Each record keeps
``stopped`` (steps run) and ``margins``; the manifest counts ``stopped_early``. The rule is
recomputed from the committed pilot shards on resume, so a resumed run decides as an
uninterrupted one. On one process the batches after the pilot run through a
``continuous.ContinuousSampler`` of --batch-size slots (``run_continuous``): a stopped image's
slot takes the next seed at once, and batch j is committed once all its seeds are done; under
torchrun each batch runs on its own and shrinks as its images stop (the same decisions; the
batches of the round that completes the pilot are sampled in full).

Under torchrun the ranks take the pending batches round-robin (rank r takes every world-th);
after each round one all_reduce (NCCL on GPUs, gloo on CPUs) sums the accepted counts, so every
rank stops together once the global target ``n`` is met. Each rank writes its own shards; rank 0
merges all shards into ``manifest.json`` (``merge_manifest``) after every round. The accepted
images are the first n accepted by image index, so the result does not depend on the number of
processes. Resuming needs the output folder on a filesystem every rank sees.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from compkern.pipelines import early_reject as ER
from compkern.pipelines import lift_maps as LM
from compkern.pipelines.composition import SCHEDULERS
from compkern.utils.checkpoint import load
from compkern.utils.run_folder import RunFolder

# settings that change which images are accepted: a resumed run must match them
_FROZEN = ("model", "prompt", "negative_prompt", "seed", "batch_size", "steps", "guidance", "eta", "generate", "lift", "record_every",
           "trials", "target", "threshold", "min_pixels", "rule", "height", "width", "dtype", "early_reject", "pilot",
           "early_check", "negation", "scheduler")


@dataclass
class GenerateOptions:
    """The settings of one generation (the options of `compkern generate`, same names and defaults)."""
    model: str
    prompt: str
    out: str
    n: int = 100
    batch_size: int = 4
    dtype: str = "fp16"
    device: str = "auto"
    steps: int = 50
    guidance: float = 7.5
    negative_prompt: str = ""
    eta: float = 0.0
    seed: int = 0
    height: int | None = None
    width: int | None = None
    generate: str = "joint"
    negation: str = "linear"
    scheduler: str | None = None  # None: compkern's DDIM / DDPM; a CompositionPipeline.SCHEDULERS name or 'folder'
    lift: str = "auto"
    target: str = "auto"
    record_every: int | None = None  # None: record_every_default
    threshold: float | None = None
    min_pixels: float | None = None
    trials: int = LM.FIXED_TRIALS
    rule: str = "pixels"
    chunk_size: int | str = "auto"
    max_attempts: int | None = None
    early_reject: float | None = None  # confidence; None: every image sampled to the end
    pilot: int = 64
    early_check: float = ER.CHECK_AT
    save_rejected: bool = False
    no_overlays: bool = False
    progress: bool = True

    @classmethod
    def from_namespace(cls, ns: Any) -> "GenerateOptions":
        """The options of an argparse Namespace (extra attributes such as ``threads`` ignored)."""
        kw = {f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)}
        if hasattr(ns, "no_progress"):
            kw["progress"] = not ns.no_progress
        return cls(**kw)


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """auto -> cuda:LOCAL_RANK if CUDA is available, else cpu; "cuda" -> cuda:LOCAL_RANK; else as given."""
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


class Distributed:
    """torch.distributed when launched by torchrun (WORLD_SIZE > 1), else a single process."""

    def __init__(self, device: torch.device):
        import torch.distributed as dist

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device
        self.dist = dist if self.world > 1 else None
        if self.dist is not None and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")

    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.dist is not None:
            self.dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.dist is not None:
            self.dist.barrier()

    def close(self) -> None:
        if self.dist is not None and self.dist.is_initialized():
            self.dist.destroy_process_group()


def _shard_path(out: Path, j: int) -> Path:
    return out / "shards" / f"batch-{j:06d}.pt"


def _committed(out: Path, cache: dict | None = None) -> dict[int, dict]:
    """Every committed shard by batch id; ``cache`` (a dict kept by the caller) skips files read before."""
    shards = {}
    for f in sorted((out / "shards").glob("batch-*.pt")):
        if cache is not None and f.name in cache:
            s = cache[f.name]
        else:
            s = load(f)
            if cache is not None:
                cache[f.name] = s
        shards[int(s["batch"])] = s
    return shards


def merge_manifest(out: str | os.PathLike, n: int | None = None, *, cache: dict | None = None) -> dict:
    """Merge every shard of an output folder into manifest.json (atomic) and return it."""
    out = Path(out)
    cfg = RunFolder(out).config
    n = cfg["n"] if n is None else n
    shards = _committed(out, cache)
    records = sorted((r for s in shards.values() for r in s["records"]), key=lambda r: r["index"])
    accepted = [r for r in records if r["accepted"]]
    rows = sum(s["unet_rows"] for s in shards.values())
    manifest = {
        "prompt": cfg["prompt"], "components": cfg["components"], "signs": cfg["signs"], "n": n,
        "accepted": accepted[:n], "surplus": accepted[n:], "n_accepted": min(len(accepted), n),
        "attempted": len(records), "acceptance_rate": len(accepted) / max(len(records), 1),
        "unet_rows": rows, "unet_rows_per_accepted": rows / len(accepted) if accepted else None,
        "stopped_early": sum(r.get("stopped", cfg["steps"]) < cfg["steps"] for r in records),
        "wall_s": sum(s["wall_s"] for s in shards.values()),
        "batches": len(shards), "complete": len(accepted) >= n, "config": cfg,
    }
    RunFolder(out).write_json("manifest.json", manifest)
    return manifest


def generate(args: GenerateOptions) -> dict | None:
    """Run (or resume) a generation into ``args.out`` until ``args.n`` images are accepted or
    ``args.max_attempts`` images were tried; returns the merged manifest on rank 0 (None on the
    other ranks). ``args``: a GenerateOptions, or any object with its attributes (an argparse
    Namespace of `compkern generate`)."""
    from tqdm.auto import tqdm

    from compkern.pipelines.composition import CompositionPipeline, parse_composition

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.record_every is not None and args.record_every < 1:
        raise ValueError(f"--record-every must be >= 1, got {args.record_every}")
    if args.lift not in LIFTS:
        raise ValueError(f"--lift must be one of {LIFTS}, got {args.lift!r}")
    if args.trials < 1 and args.lift in ("auto", "fresh", "public"):
        raise ValueError(f"--trials must be >= 1 with --lift {args.lift}, got {args.trials}")
    if args.scheduler not in (None, "folder", *SCHEDULERS):
        raise ValueError(f"--scheduler must be 'folder' or one of {sorted(SCHEDULERS)}, got {args.scheduler!r}")
    if args.early_reject is not None:
        ER.check_confidence(args.early_reject)
        if args.pilot < 1:
            raise ValueError(f"--pilot must be >= 1 with --early-reject, got {args.pilot}")
        if args.lift == "none":
            raise ValueError("--early-reject needs a lift to predict (not --lift none)")
        if args.scheduler is not None:
            raise ValueError(f"--early-reject runs on compkern's DDIM sampler: drop --scheduler {args.scheduler}")
        if args.steps < 2:
            raise ValueError(f"--early-reject needs --steps >= 2 (a check between the first and the last), got {args.steps}")
        ER.default_checks(args.steps, args.early_check)
    model = Path(args.model)
    if not ((model / "unet").is_dir() or (model / "transformer").is_dir()):
        raise ValueError(f"--model {args.model}: not a diffusers folder with a unet/ (SD 1.x, 2.x, XL) or transformer/ "
                         "(SD3) subfolder")
    if (model / "transformer").is_dir() and (args.early_reject is not None or args.scheduler not in (None, "folder")):
        raise ValueError(f"--model {args.model} is an SD3 folder: it samples with its flow-matching scheduler "
                         "(no --scheduler name, no --early-reject)")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(args.device, local_rank)
    dtype = "fp32" if device.type == "cpu" and args.dtype == "fp16" else args.dtype
    dist = Distributed(device)
    out = Path(args.out)
    try:
        comp = parse_composition(args.prompt)
        if args.target == "joint" and args.lift in ("auto", "cached", "public") and comp.joint is None:
            raise ValueError(f"--target joint: {args.prompt!r} has no component every accepted image needs (a pure OR "
                             "or NOT), so no joint caption; use --target noise")
        cfg = {k: getattr(args, k) for k in _FROZEN if k not in ("model", "dtype")}
        cfg.update(model=str(Path(args.model).resolve()), dtype=dtype, n=args.n, components=list(comp.components),
                   signs=list(comp.signs), world_size=dist.world,
                   **{k: getattr(args, k) if args.early_reject is not None else None for k in ("pilot", "early_check")},
                   negation=None if args.negation == "linear" else args.negation)  # None: folders made before the option
        if dist.rank == 0:
            RunFolder(out, cfg, keys=_FROZEN)
            (out / "shards").mkdir(parents=True, exist_ok=True)
        dist.barrier()
        if dist.rank != 0:
            RunFolder(out, cfg, keys=_FROZEN, write=False)
        pipe = CompositionPipeline.from_pretrained(args.model, dtype=dtype, device=device)
        done = _committed(out)
        dist.barrier()  # everyone has read the same committed set before anyone writes
        accepted_total = sum(r["accepted"] for s in done.values() for r in s["records"])
        max_attempts = args.max_attempts or 20 * args.n
        pending = [j for j in range(math.ceil(max_attempts / args.batch_size)) if j not in done]
        checks = ER.default_checks(args.steps, args.early_check)
        bar = tqdm(total=args.n, initial=min(accepted_total, args.n), desc="accepted", disable=dist.rank != 0 or not getattr(args, "progress", True))
        seen: dict = {}  # rank 0's shard cache for the per-round manifest merge

        def progress() -> None:  # rank 0: merge the manifest, move the bar
            m = merge_manifest(out, args.n, cache=seen)
            bar.n = m["n_accepted"]
            bar.set_postfix(attempted=m["attempted"], rate=f"{m['acceptance_rate']:.2f}")
            bar.refresh()

        # with --early-reject the first batches are the pilot (sampled in full, partial margins
        # recorded) until it is complete (``pilot_batches``); every later batch uses the rule
        # calibrated on it, on one process through continuous batching
        off = ER.EarlyRejectRule(checks, (-math.inf,) * len(checks), 1.0)
        rule = None
        pilot_seen: dict = {}  # this rank's shard cache while the pilot is read after every round
        rnd = 0
        while accepted_total < args.n and rnd * dist.world < len(pending):
            if args.early_reject is not None and rule in (None, off):
                n_pilot = pilot_batches(out, args.pilot, ER.min_pilot_accepts(args.early_reject, len(checks)), pilot_seen)
                rule = off if n_pilot is None else calibrate_from_pilot(out, n_pilot, checks, args.early_reject, pilot_seen)
                if rule is not off and dist.world == 1:
                    accepted_total = run_continuous(pipe, comp, pending[rnd:], args, out, rule, accepted_total, progress)
                    break
            slot = rnd * dist.world + dist.rank
            n_acc = 0
            if slot < len(pending):
                n_acc = run_batch(pipe, comp, pending[slot], args, out, dist.rank, early_reject=rule)
            accepted_total += int(dist.sum([n_acc])[0])  # also a barrier: the round's shards are committed
            rnd += 1
            if dist.rank == 0:
                progress()
        dist.barrier()
        if dist.rank == 0:
            bar.close()
            return merge_manifest(out, args.n, cache=seen)
        return None
    finally:
        dist.close()


def pilot_batches(out: Path, pilot: int, need: int, cache: dict | None = None) -> int | None:
    """The pilot's length in batches: the shortest run of committed batches 0, 1, ... that holds
    at least ``pilot`` images and ``need`` accepted ones (``ER.min_pilot_accepts``: fewer would
    leave the rule's checks off); None while the committed batches hold no such run. ``cache``:
    as ``_committed``'s (shards read before are not read again)."""
    shards = _committed(out, cache)
    images = accepted = 0
    for j in range(len(shards)):
        if j not in shards:
            return None
        images += len(shards[j]["records"])
        accepted += sum(r["accepted"] for r in shards[j]["records"])
        if images >= pilot and accepted >= need:
            return j + 1
    return None


def calibrate_from_pilot(out: Path, n_pilot: int, checks: tuple[int, ...], confidence: float,
                         cache: dict | None = None) -> "ER.EarlyRejectRule":
    """The early-rejection rule from the committed pilot batches 0..n_pilot-1 (their records'
    partial margins and decisions)."""
    records = [r for j, s in _committed(out, cache).items() if j < n_pilot for r in s["records"]]
    if not records or any(len(r.get("margins") or []) != len(checks) for r in records):
        raise ValueError(f"--out {out}: the pilot batches hold no partial margins at the checks {checks}")
    margins = torch.tensor([r["margins"] for r in records], dtype=torch.float32).T
    return ER.EarlyRejectRule.calibrate(margins, torch.tensor([r["accepted"] for r in records]), checks, confidence)


def score(pipe, comp, res, args, *, seed: int) -> tuple[LM.LiftMaps | None, torch.Tensor]:
    """Lift maps of a generated batch ``res`` (CompositionOutput) by ``args.lift`` / ``args.target``
    and the (B,) bool decisions of ``args.rule``; (None, all True) for --lift none. With early
    rejection (``res.alive``) only the images sampled to the end are scored (the maps' rows, in
    order); the others are rejected."""
    B = res.latents.shape[0]
    alive = torch.ones(B, dtype=torch.bool) if res.alive is None else res.alive
    lift = resolve_lift(comp, args.lift, args.target)
    if lift == "none":
        return None, alive.clone()
    if not alive.any():
        return None, alive.clone()
    latents = res.latents[alive.to(res.latents.device)]
    signs = torch.tensor(comp.signs)
    uses_joint = _uses_joint(comp, args.target)
    joint_row = comp.joint_row if uses_joint else None
    required = comp.expression.required()
    if lift == "cached":
        maps = LM.cached_lift_maps(res.record, signs, target=args.target, joint_row=joint_row, required=required,
                                   latents=latents, schedule=pipe.schedule)
    elif lift == "public":  # one noise bank for every image (seeded by --seed), as the public code
        emb = pipe.encode(comp.condition_prompts(args.negative_prompt, with_joint=uses_joint),
                          height=args.height, width=args.width)
        maps = LM.fixed_lift_maps(pipe, latents, emb, signs, n_trials=args.trials, seed=args.seed, target=args.target,
                                  joint_row=joint_row, required=required, chunk_size=pipe.last_chunk_size)
    else:
        emb = pipe.encode(comp.condition_prompts(args.negative_prompt, with_joint=False), height=args.height,
                          width=args.width)
        maps = LM.fresh_lift_maps(pipe, latents, emb, n_trials=args.trials, adaptive=args.rule == "mean",
                                  expr=comp.expression if args.rule == "mean" else None, seed=seed,
                                  chunk_size=pipe.last_chunk_size)
    ok = torch.zeros(B, dtype=torch.bool)
    ok[alive] = LM.accept(comp, maps, threshold=args.threshold, min_pixels=args.min_pixels, rule=args.rule).cpu()
    return maps, ok


LIFTS = ("auto", "cached", "public", "fresh", "none")


def resolve_lift(comp, lift: str, target: str) -> str:
    """'auto' -> 'cached' where ``target`` resolves to the joint caption (a pure AND: its cached
    trials, every other step, scored as well as 200 fresh ones), else 'public' (--trials fixed,
    evenly spaced trials, ``lift_maps.FIXED_TRIALS`` by default: on NOT the cached noise trials were
    3-16 points less precise on a held-out seed set of `compkern main-job`); any other value is
    returned as it is."""
    if lift != "auto":
        return lift
    return "cached" if LM.resolve_target(target, comp.expression.required(), comp.K) == "joint" else "public"


def _uses_joint(comp, target: str) -> bool:
    """Whether scoring with ``target`` needs the joint caption's prediction."""
    target = LM.resolve_target(target, comp.expression.required(), comp.K)
    return target == "joint" or (target == "term" and comp.joint is not None)


def record_every_default(comp, target: str) -> int:
    """Steps between cached trials when not given: 2 where every component is scored against
    the joint caption (it scored as well on half the steps), else 1 (the noise target lost 9-11
    points of NOT precision on half the steps; `compkern main-job`, benchmarks/RESULTS.md)."""
    return 2 if LM.resolve_target(target, comp.expression.required(), comp.K) == "joint" else 1


def _sample_kwargs(comp, args) -> dict:
    """The sampling keywords of ``args`` (GenerateOptions), recorded where ``args.lift`` scores
    from the record: one definition for the batch pipeline and the continuous sampler."""
    cached = resolve_lift(comp, args.lift, args.target) == "cached"
    return dict(num_inference_steps=args.steps, guidance_scale=args.guidance, negative_prompt=args.negative_prompt,
                eta=args.eta, generate=args.generate, negation=args.negation, record_joint=(cached and _uses_joint(comp, args.target)) or None,
                height=args.height, width=args.width, record=cached,
                record_every=args.record_every or record_every_default(comp, args.target),
                **({} if args.scheduler is None else {"scheduler": args.scheduler}))


def sample_batch(pipe, comp, seeds: list[int], args, *, early_reject: "ER.EarlyRejectRule | None" = None):
    """The CompositionOutput (latents) of ``seeds`` sampled as ``args`` (GenerateOptions) says."""
    return pipe(comp, seeds=seeds, chunk_size=args.chunk_size, output_type="latent", early_reject=early_reject,
                **_sample_kwargs(comp, args))


def batch_indices(j: int, args) -> list[int]:
    """The image indices of batch j (image i has seed ``args.seed + i``)."""
    return list(range(j * args.batch_size, (j + 1) * args.batch_size))


def run_batch(pipe, comp, j: int, args, out: Path, rank: int, early_reject: "ER.EarlyRejectRule | None" = None) -> int:
    """Generate, score and commit batch j of ``args`` (GenerateOptions) into ``out`` (stopping
    images early by ``early_reject``); returns its accepted count."""
    t0 = time.perf_counter()
    res = sample_batch(pipe, comp, [args.seed + i for i in batch_indices(j, args)], args, early_reject=early_reject)
    return commit_batch(pipe, comp, j, res, args, out, rank, t0)


def run_continuous(pipe, comp, batches: list[int], args, out: Path, rule: "ER.EarlyRejectRule", accepted: int,
                   on_commit) -> int:
    """Batches ``batches`` through one ContinuousSampler of --batch-size slots (a stopped image's
    slot takes the next seed at once); batch j is committed, as ``run_batch`` commits it, once all
    its seeds are done, in order. Stops feeding seeds once ``args.n`` are accepted; returns the
    accepted total (``accepted`` before). on_commit(): after each commit."""
    from compkern.pipelines.continuous import ContinuousSampler

    seeds_of = {j: [args.seed + i for i in batch_indices(j, args)] for j in batches}
    todo = list(batches)
    chunk = None if args.chunk_size == "auto" else int(args.chunk_size)
    sampler = ContinuousSampler(pipe, comp, slots=args.batch_size, early_reject=rule, chunk_size=chunk,
                                **_sample_kwargs(comp, args))
    done: dict[int, object] = {}
    t0 = time.perf_counter()
    for r in sampler.run(s for j in batches for s in seeds_of[j]):
        done[r.seed] = r
        while todo and all(s in done for s in seeds_of[todo[0]]):
            j = todo.pop(0)
            accepted += commit_batch(pipe, comp, j, sampler.output([done.pop(s) for s in seeds_of[j]]), args, out, 0, t0)
            t0 = time.perf_counter()
            on_commit()
        if accepted >= args.n:
            break  # the images still in flight belong to uncommitted batches: a rerun with a larger n redoes them
    return accepted


def commit_batch(pipe, comp, j: int, res, args, out: Path, rank: int, t0: float) -> int:
    """Score batch j's CompositionOutput ``res`` and commit it (accepted images and overlays first,
    then the atomic shard); returns its accepted count."""
    B = args.batch_size
    indices = batch_indices(j, args)
    seeds = [args.seed + i for i in indices]
    maps, ok = score(pipe, comp, res, args, seed=args.seed + j)
    rows = res.n_evals + (0 if maps is None else maps.n_evals)
    alive = torch.ones(B, dtype=torch.bool) if res.alive is None else res.alive
    row = (alive.cumsum(0) - 1).tolist()  # image b's row in the maps (of the images sampled to the end)
    keep = [b for b in range(B) if ok[b] or (args.save_rejected and alive[b])]
    images = pipe.decode(res.latents[keep]) if keep else []
    records = []
    for b, i in enumerate(indices):
        rec = {"index": i, "seed": seeds[b], "accepted": bool(ok[b]), "rank": rank, "image": None, "maps": []}
        if res.alive is not None:
            rec["stopped"] = int(res.stopped[b])
            rec["margins"] = [None if math.isnan(v) else v for v in res.margins[:, b].tolist()]
        if maps is not None and alive[b]:
            rec["lift"] = maps.lift[:, row[b]].tolist()
            rec["pixels_above"] = maps.counts(args.threshold)[:, row[b]].tolist()
        records.append(rec)
    (out / "images").mkdir(exist_ok=True)
    for img, b in zip(images, keep):
        rec = records[b]
        rec["image"] = f"images/{rec['index']:06d}.png"
        img.save(out / rec["image"])
        if maps is not None and not args.no_overlays:
            sub = LM.LiftMaps(maps.pixel_lift[:, row[b]:row[b] + 1], maps.n_trials, 0, maps.targets, maps.source)
            names = LM.save_overlays([img], sub, out / "maps", [f"{rec['index']:06d}"])[0]
            rec["maps"] = [f"maps/{f}" for f in names]
    RunFolder(out).save(_shard_path(out, j).relative_to(out), {"batch": j, "rank": rank, "records": records,
                                                               "unet_rows": rows, "wall_s": time.perf_counter() - t0})
    return int(ok.sum())
