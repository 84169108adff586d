"""`compkern generate`: composed Stable Diffusion generation with CompLift rejection, streamed
into a resumable output folder, on one process or under ``torchrun --nproc-per-node N``.

    compkern generate --model PATH --prompt "a black car AND a white clock" --n 100 --out DIR
    torchrun --nproc-per-node 8 -m compkern.cli generate --model PATH --prompt "..." --num-images 100 --out DIR

Work is cut into batches of ``--batch-size`` images; image i has seed ``--seed + i`` and batch j
holds images [j * batch_size, (j + 1) * batch_size). Each batch is generated (one batched UNet
call per step for all condition rows: by default guidance on the joint caption, the other terms
composed), scored (by default CompLift lift maps cached from every other sampling step, each
component against its own target: the joint caption's prediction for the required components,
the noise for NOT / OR terms, each with its pixel rule, ``lift_maps.DEFAULT_RULES``: the settings
`compkern main-job` measured best) and accepted or rejected, then committed as one atomic shard ``shards/batch-JJJJJJ.pt``
(accepted images and their lift-map overlays are written first). A rerun with the same settings
skips committed batches, so an interrupted run resumes where it stopped.

Under torchrun the ranks take the pending batches round-robin (rank r takes every world-th);
after each round one all_reduce (NCCL on GPUs, gloo on CPUs) sums the accepted counts, so every
rank stops together once the global target ``--n`` is met. Each rank writes its own shards; rank 0
merges all shards into ``manifest.json`` after every round. The accepted images are the first n
accepted by image index, so the result does not depend on the number of processes. Resuming needs
the output folder on a filesystem every rank sees.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

from compkern.pipelines import lift_maps as LM
from compkern.pipelines.composition import GENERATE_MODES
from compkern.utils.checkpoint import atomic_save, atomic_write_json, check_run_folder, load

# settings that change which images are accepted: a resumed run must match them
_FROZEN = ("model", "prompt", "negative_prompt", "seed", "batch_size", "steps", "guidance", "eta", "generate", "lift", "record_every",
           "trials", "target", "threshold", "min_pixels", "rule", "height", "width", "dtype")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local diffusers folder: SD 1.x, 2.x, XL, or a pixel-space "
                   "text-to-image model without vae/ (e.g. `compkern sepen train`'s base/model)")
    p.add_argument("--prompt", required=True, help='expression of component prompts, e.g. "a black car AND a white clock AND NOT a dog"')
    p.add_argument("--n", "--num-images", dest="n", type=int, default=100,
                   help="accepted images wanted (global, over all ranks); under torchrun write --num-images "
                        "(torchrun's own parser takes --n for a prefix of --nnodes / --nproc-per-node)")
    p.add_argument("--out", required=True, help="output folder (resumable)")
    p.add_argument("--batch-size", type=int, default=4, help="images per batch (each rank)")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"], help="model dtype (fp32 on CPU recommended)")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=7.5, help="guidance scale of every component")
    p.add_argument("--negative-prompt", default="", help="base condition (row 0)")
    p.add_argument("--eta", type=float, default=0.0, help="0: DDIM, 1: DDPM")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--generate", default="joint", choices=list(GENERATE_MODES),
                   help="joint: guidance on the joint caption of the required components (\"a cat and a dog\"), the "
                        "other components composed; composed: Composable Diffusion over every component")
    p.add_argument("--lift", default="cached", choices=["cached", "fresh", "public", "none"],
                   help="cached: the sampling run's predictions (no extra UNet row); fresh: compkern.lift.estimate_lift "
                        "on the final latents (noise target); public: CompLift's public scorer, --trials evenly spaced "
                        "fresh trials with a fixed noise bank; none: accept everything")
    p.add_argument("--target", default="term", choices=list(LM.TARGETS),
                   help="target of cached / public trials: term (default: joint for the components every accepted "
                        "image needs, noise for NOT / OR terms), the joint caption's prediction (recorded as one more "
                        "condition row), the noise (recovered from x_t and the final latents), or the composed "
                        "prediction (comparison only: NOT can never fail)")
    p.add_argument("--record-every", type=int, default=2,
                   help="cached: keep every k-th sampling step as a trial (the component rows are evaluated only "
                        "there; 2, the default, scored as well as every step in `compkern main-job` for fewer rows)")
    rules = ", ".join(f"{t} {r[0]:g}" for t, r in LM.DEFAULT_RULES.items())
    p.add_argument("--threshold", type=float, default=None, help=f"pixel lift threshold (default per target: {rules})")
    rules = ", ".join(f"{t} {r[1]:g}" for t, r in LM.DEFAULT_RULES.items())
    p.add_argument("--min-pixels", type=float, default=None,
                   help="latent pixels above threshold for a component to count as present (below 1: a fraction; "
                        f"default per target: {rules})")
    p.add_argument("--trials", type=int, default=50,
                   help="fresh / public trials per image (fresh with --rule mean: the most the adaptive estimator may spend)")
    p.add_argument("--rule", default="pixels", choices=["pixels", "mean"], help="object rule, or the mean-lift sign")
    p.add_argument("--chunk-size", type=lambda v: v if v == "auto" else int(v), default="auto",
                   help="max UNet rows per call; auto (default): all (K+1) x B, halved on out-of-memory")
    p.add_argument("--max-attempts", type=int, default=None, help="stop after this many images (default 20 x n)")
    p.add_argument("--save-rejected", action="store_true", help="also write rejected images and their maps")
    p.add_argument("--no-overlays", action="store_true", help="do not write lift-map overlay PNGs")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")


def _device(spec: str, local_rank: int) -> torch.device:
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


class _Dist:
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
    cfg = json.loads((out / "config.json").read_text())
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
        "wall_s": sum(s["wall_s"] for s in shards.values()),
        "batches": len(shards), "complete": len(accepted) >= n, "config": cfg,
    }
    atomic_write_json(manifest, out / "manifest.json")
    return manifest


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from compkern.pipelines.composition import CompositionPipeline, parse_composition

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.record_every < 1:
        raise ValueError(f"--record-every must be >= 1, got {args.record_every}")
    if args.trials < 1 and args.lift in ("fresh", "public"):
        raise ValueError(f"--trials must be >= 1 with --lift {args.lift}, got {args.trials}")
    model = Path(args.model)
    if not (model / "unet").is_dir():
        raise ValueError(f"--model {args.model}: not a diffusers folder with a unet/ subfolder")
    if args.threads:
        torch.set_num_threads(args.threads)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(args.device, local_rank)
    dtype = "fp32" if device.type == "cpu" and args.dtype == "fp16" else args.dtype
    dist = _Dist(device)
    out = Path(args.out)
    try:
        comp = parse_composition(args.prompt)
        if args.target == "joint" and args.lift in ("cached", "public") and comp.joint is None:
            raise ValueError(f"--target joint: {args.prompt!r} has no component every accepted image needs (a pure OR "
                             "or NOT), so no joint caption; use --target noise")
        cfg = {k: getattr(args, k) for k in _FROZEN if k not in ("model", "dtype")}
        cfg.update(model=str(Path(args.model).resolve()), dtype=dtype, n=args.n, components=list(comp.components),
                   signs=list(comp.signs), world_size=dist.world)
        if dist.rank == 0:
            check_run_folder(out, cfg, _FROZEN)
            (out / "shards").mkdir(parents=True, exist_ok=True)
        dist.barrier()
        if dist.rank != 0:
            check_run_folder(out, cfg, _FROZEN, write=False)
        pipe = CompositionPipeline.from_pretrained(args.model, dtype=dtype, device=device)
        done = _committed(out)
        dist.barrier()  # everyone has read the same committed set before anyone writes
        accepted_total = sum(r["accepted"] for s in done.values() for r in s["records"])
        max_attempts = args.max_attempts or 20 * args.n
        pending = [j for j in range(math.ceil(max_attempts / args.batch_size)) if j not in done]
        bar = tqdm(total=args.n, initial=min(accepted_total, args.n), desc="accepted", disable=dist.rank != 0)
        seen: dict = {}  # rank 0's shard cache for the per-round manifest merge
        rnd = 0
        while accepted_total < args.n and rnd * dist.world < len(pending):
            slot = rnd * dist.world + dist.rank
            n_acc = 0
            if slot < len(pending):
                n_acc = _run_batch(pipe, comp, pending[slot], args, out, dist.rank)
            accepted_total += int(dist.sum([n_acc])[0])
            rnd += 1
            if dist.rank == 0:
                m = merge_manifest(out, args.n, cache=seen)
                bar.n = min(accepted_total, args.n)
                bar.set_postfix(attempted=m["attempted"], rate=f"{m['acceptance_rate']:.2f}")
                bar.refresh()
        dist.barrier()
        if dist.rank == 0:
            bar.close()
            m = merge_manifest(out, args.n, cache=seen)
            print(json.dumps({k: m[k] for k in ("n_accepted", "attempted", "acceptance_rate", "unet_rows",
                                                "unet_rows_per_accepted", "complete")}))
        return 0
    finally:
        dist.close()


def score(pipe, comp, res, args, *, seed: int) -> tuple[LM.LiftMaps | None, torch.Tensor]:
    """Lift maps of a generated batch ``res`` (CompositionOutput) by ``args.lift`` / ``args.target``
    and the (B,) bool decisions of ``args.rule``; (None, all True) for --lift none."""
    B = res.latents.shape[0]
    if args.lift == "none":
        return None, torch.ones(B, dtype=torch.bool)
    signs = torch.tensor(comp.signs)
    uses_joint = _uses_joint(comp, args.target)
    joint_row = comp.joint_row if uses_joint else None
    required = comp.expression.required()
    if args.lift == "cached":
        maps = LM.cached_lift_maps(res.record, signs, target=args.target, joint_row=joint_row, required=required,
                                   latents=res.latents, schedule=pipe.schedule)
    elif args.lift == "public":
        emb = pipe.encode(comp.condition_prompts(args.negative_prompt, with_joint=uses_joint),
                          height=args.height, width=args.width)
        maps = LM.fixed_lift_maps(pipe, res.latents, emb, signs, n_trials=args.trials, seed=seed, target=args.target,
                                  joint_row=joint_row, required=required, chunk_size=pipe.last_chunk_size)
    else:
        emb = pipe.encode(comp.condition_prompts(args.negative_prompt, with_joint=False), height=args.height,
                          width=args.width)
        maps = LM.fresh_lift_maps(pipe, res.latents, emb, n_trials=args.trials, adaptive=args.rule == "mean",
                                  expr=comp.expression if args.rule == "mean" else None, seed=seed,
                                  chunk_size=pipe.last_chunk_size)
    ok = LM.accept(comp, maps, threshold=args.threshold, min_pixels=args.min_pixels, rule=args.rule).cpu()
    return maps, ok


def _uses_joint(comp, target: str) -> bool:
    """Whether scoring with ``target`` needs the joint caption's prediction."""
    return target == "joint" or (target == "term" and comp.joint is not None)


def _run_batch(pipe, comp, j: int, args, out: Path, rank: int) -> int:
    """Generate, score and commit batch j; returns its accepted count."""
    t0 = time.perf_counter()
    B = args.batch_size
    indices = list(range(j * B, (j + 1) * B))
    seeds = [args.seed + i for i in indices]
    res = pipe(comp, seeds=seeds, num_inference_steps=args.steps, guidance_scale=args.guidance,
               negative_prompt=args.negative_prompt, eta=args.eta, generate=args.generate,
               record_joint=(args.lift == "cached" and _uses_joint(comp, args.target)) or None, height=args.height, width=args.width,
               chunk_size=args.chunk_size, record=args.lift == "cached", record_every=args.record_every,
               output_type="latent")
    maps, ok = score(pipe, comp, res, args, seed=args.seed + j)
    rows = res.n_evals + (0 if maps is None else maps.n_evals)
    keep = [b for b in range(B) if ok[b] or args.save_rejected]
    images = pipe.decode(res.latents[keep]) if keep else []
    records = []
    for b, i in enumerate(indices):
        rec = {"index": i, "seed": seeds[b], "accepted": bool(ok[b]), "rank": rank, "image": None, "maps": []}
        if maps is not None:
            rec["lift"] = maps.lift[:, b].tolist()
            rec["pixels_above"] = maps.counts(args.threshold)[:, b].tolist()
        records.append(rec)
    (out / "images").mkdir(exist_ok=True)
    for img, b in zip(images, keep):
        rec = records[b]
        rec["image"] = f"images/{rec['index']:06d}.png"
        img.save(out / rec["image"])
        if maps is not None and not args.no_overlays:
            sub = LM.LiftMaps(maps.pixel_lift[:, b:b + 1], maps.n_trials, 0, maps.targets)
            names = LM.save_overlays([img], sub, out / "maps", [f"{rec['index']:06d}"])[0]
            rec["maps"] = [f"maps/{f}" for f in names]
    atomic_save({"batch": j, "rank": rank, "records": records, "unet_rows": rows,
                 "wall_s": time.perf_counter() - t0}, _shard_path(out, j))
    return int(ok.sum())
