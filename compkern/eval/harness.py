"""The evaluation harness: every (suite row, method) cell generated on the same seeds, scored,
committed atomically to a resumable ``RunFolder``, and summarized.

A cell generates ``n`` images of one row (seeds ``seed .. seed + n - 1``, batches of
``batch_size``) with one method (``METHODS``):

- none: the row's plain prompt (for NOT / OR rows its positive part), classifier-free guidance;
- composable: Composable Diffusion over the expression's terms (``generate='composed'``);
- complift: `compkern generate`'s generation and CompLift rejection (``pipelines.generate
  .sample_batch`` + ``score``, its defaults): every candidate is scored by the rules, and the
  method's accuracy is that of the accepted ones (its acceptance rate reported beside it);
- perp: the expression with perpendicular negation (Perp-Neg; rows with a NOT only).

The scorer (``compkern.eval.scorers``) detects the row's classes, the rules
(``compkern.eval.rules.evaluate``) decide each image; UNet rows and wall time (generation plus
CompLift scoring, not the judge) are counted per image. ``cells/KEY.pt`` is written last, after
the images' PNGs, so a rerun skips exactly the committed cells. Under torchrun the pending cells
are dealt round-robin to the ranks (``pipelines.generate.Distributed``) and rank 0 writes the
report: results.json, table.md, images.jsonl (one line per image) and sheets/SUITE-METHOD.png.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from compkern.eval.rules import evaluate
from compkern.eval.scorers import Detection, Scorer
from compkern.utils.run_folder import RunFolder

__all__ = ["METHODS", "EvalOptions", "applicable", "cell_key", "check_methods", "generate_cell", "report", "run",
           "run_cell", "wilson"]

METHODS = ("none", "composable", "complift", "perp")


def check_methods(methods: Sequence[str] | str) -> list[str]:
    """Names of ``METHODS`` (a list or one comma-separated string); ValueError on unknown ones."""
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    bad = [m for m in names if m not in METHODS]
    if not names or bad:
        raise ValueError(f"methods: unknown {bad or names}; choose from {list(METHODS)}")
    return list(dict.fromkeys(names))


@dataclass
class EvalOptions:
    """Generation settings shared by every cell (frozen in the run folder's config)."""

    model: str
    n: int = 16
    seed: int = 0
    steps: int = 50
    guidance: float = 7.5
    eta: float = 0.0
    batch_size: int = 8

    def __post_init__(self):
        for name in ("n", "steps", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        for name in ("guidance", "eta"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.n)]


def _has_not(row: dict) -> bool:
    from compkern.pipelines.composition import parse_composition

    return any(s < 0 for s in parse_composition(row["expression"]).signs)


def applicable(row: dict, method: str) -> bool:
    """Whether ``method`` runs on ``row`` (perp needs a NOT)."""
    return method != "perp" or _has_not(row)


def cell_key(row: dict, method: str) -> str:
    return f"{row['suite']}-{row['tag']}-{int(row['index']):03d}-{method}"


def generate_cell(pipe, row: dict, method: str, opts: EvalOptions) -> dict:
    """Generate ``opts.n`` images of ``row`` with ``method``: {"images": (n, 3, H, W) fp32 in [0, 1],
    "accepted": (n,) bool (complift) or None, "rows": UNet rows, "wall": seconds}."""
    from compkern.pipelines import generate as G
    from compkern.pipelines.composition import parse_composition

    seeds = opts.seeds
    common = dict(num_inference_steps=opts.steps, guidance_scale=opts.guidance, eta=opts.eta, record=False,
                  output_type="pt")
    images, accepted, rows = [], [], 0
    t0 = time.perf_counter()
    for j, s in enumerate(range(0, len(seeds), opts.batch_size)):
        batch = seeds[s:s + opts.batch_size]
        if method == "none":
            res = pipe(row["prompt"], seeds=batch, **common)
        elif method == "composable":
            res = pipe(row["expression"], seeds=batch, generate="composed", **common)
        elif method == "perp":
            res = pipe(row["expression"], seeds=batch, negation="perp", **common)
        elif method == "complift":
            gopts = G.GenerateOptions(model=opts.model, prompt=row["expression"], out="", n=opts.n,
                                      batch_size=opts.batch_size, steps=opts.steps, guidance=opts.guidance, eta=opts.eta,
                                      seed=opts.seed, progress=False)
            comp = parse_composition(row["expression"])
            res = G.sample_batch(pipe, comp, batch, gopts)
            maps, ok = G.score(pipe, comp, res, gopts, seed=opts.seed + j)
            rows += 0 if maps is None else maps.n_evals
            accepted.append(ok.cpu())
        else:
            check_methods([method])
        rows += res.n_evals
        images.append((pipe.decode(res.latents, output_type="pt") if res.images is None else res.images).float().cpu())
    return {"images": torch.cat(images), "accepted": torch.cat(accepted) if accepted else None, "rows": rows,
            "wall": time.perf_counter() - t0}


def row_labels(row: dict) -> list[str]:
    """The classes a row's clauses name, in order."""
    return list(dict.fromkeys(c["class"] for k in ("include", "exclude", "any") for c in row.get(k, [])))


def run_cell(pipe, scorer: Scorer, row: dict, method: str, opts: EvalOptions, folder: RunFolder | None = None) -> dict:
    """Generate, score and judge one cell; with ``folder`` its images are written as
    images/KEY/SEED.png. Returns the cell (records per image, rows and wall per image)."""
    gen = generate_cell(pipe, row, method, opts)
    x = gen["images"]
    dets: list[list[Detection]] = []
    for s in range(0, len(x), opts.batch_size):
        dets += scorer(x[s:s + opts.batch_size], row_labels(row))
    key = cell_key(row, method)
    records = []
    for b, seed in enumerate(opts.seeds):
        ok, why = evaluate(row, dets[b], threshold=scorer.threshold, counting_threshold=scorer.counting_threshold)
        rec = {"seed": seed, "correct": bool(ok), "reason": why, "detections": [d.to_dict() for d in dets[b]],
               "accepted": None if gen["accepted"] is None else bool(gen["accepted"][b]), "image": None}
        records.append(rec)
    u8 = (x * 255).round().to(torch.uint8)
    if folder is not None:
        from PIL import Image

        for rec, img in zip(records, u8):
            rec["image"] = f"images/{key}/{rec['seed']:06d}.png"
            folder.file(rec["image"]).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder.file(rec["image"]))
    return {"key": key, "row": row, "method": method, "records": records, "images": u8,
            "rows_per_image": gen["rows"] / opts.n, "wall_per_image": gen["wall"] / opts.n}


def run(pipe, scorer: Scorer, rows: Sequence[dict], methods: Sequence[str], opts: EvalOptions, folder: RunFolder, *,
        dist=None, progress: bool = True, on_cell: Callable[[str], None] | None = None) -> list[str]:
    """Compute every pending cell of ``rows`` x ``methods`` into ``folder`` (cells/KEY.pt; committed
    cells are skipped: a rerun resumes). ``dist``: a ``pipelines.generate.Distributed`` (rank r
    takes every world-th pending cell). on_cell(key): after each commit. Returns the keys done here."""
    from tqdm.auto import tqdm

    methods = check_methods(methods)
    rank, world = (0, 1) if dist is None else (dist.rank, dist.world)
    cells = [(r, m) for r in rows for m in methods if applicable(r, m)]
    todo = [(r, m) for r, m in cells if not folder.exists(f"cells/{cell_key(r, m)}.pt")][rank::world]
    if dist is not None:
        dist.barrier()  # every rank has listed the same pending cells before any commits one
    done = []
    for row, method in tqdm(todo, desc=f"eval cells (rank {rank})" if world > 1 else "eval cells",
                            disable=not progress or (rank != 0)):
        cell = run_cell(pipe, scorer, row, method, opts, folder)
        key = cell["key"]
        folder.save(f"cells/{key}.pt", cell)
        done.append(key)
        if on_cell is not None:
            on_cell(key)
    if dist is not None:
        dist.barrier()
    return done


# -- the report -------------------------------------------------------------------------------------
def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% at z = 1.96) of k successes in n trials; (nan, nan) for n = 0."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def _load_cells(folder: RunFolder) -> list[dict]:
    from compkern.utils.checkpoint import load

    files = sorted(folder.file("cells").glob("*.pt"))
    if not files:
        raise ValueError(f"--out {folder.path} holds no cells yet: run `compkern eval` first")
    return [load(f) for f in files]


def _summary(cells: list[dict], suite: str, tag: str, method: str) -> dict | None:
    recs = [r for c in cells for r in c["records"]]
    if not recs:
        return None
    n = len(recs)
    k_all = sum(r["correct"] for r in recs)
    judged = [r for r in recs if r["accepted"] is not False]  # complift: the accepted ones
    k = sum(r["correct"] for r in judged)
    rows = sum(c["rows_per_image"] * len(c["records"]) for c in cells)
    wall = sum(c["wall_per_image"] * len(c["records"]) for c in cells)
    lo, hi = wilson(k, len(judged))
    out = {"suite": suite, "tag": tag, "method": method, "prompts": len(cells), "images": n, "judged": len(judged),
           "correct": k, "accuracy": k / len(judged) if judged else math.nan, "ci95": [lo, hi],
           "acceptance": len(judged) / n, "accuracy_all": k_all / n, "ci95_all": list(wilson(k_all, n)),
           "rows_per_image": rows / n, "wall_per_image": wall / n,
           "rows_per_judged": rows / len(judged) if judged else math.nan}
    return out


def _fmt(x: float, f: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, f)


def report(folder: RunFolder | str | Path, *, sheets: bool = True) -> str:
    """Summarize every committed cell of a run folder: results.json (per suite, task and method:
    accuracy with its Wilson 95% interval, acceptance, rows and wall per image, and the method
    pairs whose intervals do not overlap), table.md, images.jsonl and the contact sheets; returns
    the table. Rows of a suite with several tasks are also pooled under tag "all"."""
    folder = folder if isinstance(folder, RunFolder) else RunFolder(folder)
    cells = _load_cells(folder)
    methods = [m for m in METHODS if any(c["method"] == m for c in cells)]
    suites = list(dict.fromkeys(c["row"]["suite"] for c in cells))
    rows = []
    for suite in suites:
        tags = list(dict.fromkeys(c["row"]["tag"] for c in cells if c["row"]["suite"] == suite))
        for tag in tags + (["all"] if len(tags) > 1 else []):
            for m in methods:
                sel = [c for c in cells if c["row"]["suite"] == suite and c["method"] == m
                       and (tag == "all" or c["row"]["tag"] == tag)]
                s = _summary(sel, suite, tag, m)
                if s is not None:
                    rows.append(s)
    diffs = []
    for (suite, tag), grp in itertools.groupby(rows, key=lambda r: (r["suite"], r["tag"])):
        for a, b in itertools.combinations(list(grp), 2):
            if a["ci95"][0] > b["ci95"][1] or b["ci95"][0] > a["ci95"][1]:
                hi, lo = (a, b) if a["accuracy"] > b["accuracy"] else (b, a)
                diffs.append({"suite": suite, "tag": tag, "higher": hi["method"], "lower": lo["method"],
                              "difference": hi["accuracy"] - lo["accuracy"]})
    folder.write_json("results.json", {"rows": rows, "separated": diffs, "config": folder.stored_config()})
    lines = ["| suite | task | method | prompts | images | accuracy [95% CI] | acceptance | accuracy of all "
             "| UNet rows / image | wall s / image |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['suite']} | {r['tag']} | {r['method']} | {r['prompts']} | {r['images']} | "
                     f"{_fmt(r['accuracy'])} [{_fmt(r['ci95'][0])}, {_fmt(r['ci95'][1])}] "
                     f"({r['correct']}/{r['judged']}) | {_fmt(r['acceptance'])} | {_fmt(r['accuracy_all'])} | "
                     f"{r['rows_per_image']:.0f} | {_fmt(r['wall_per_image'], '.3f')} |")
    lines.append("")
    lines.append("Differences whose 95% intervals do not overlap: " + (
        "; ".join(f"{d['suite']}/{d['tag']}: {d['higher']} > {d['lower']} (+{d['difference']:.2f})" for d in diffs)
        or "none"))
    table = "\n".join(lines)
    folder.file("table.md").write_text(table + "\n")
    per_image = [{"key": c["key"], "suite": c["row"]["suite"], "tag": c["row"]["tag"], "prompt": c["row"]["prompt"],
                  "expression": c["row"]["expression"], "method": c["method"], **r} for c in cells for r in c["records"]]
    from compkern.eval.suites import write_jsonl

    write_jsonl(per_image, folder.file("images.jsonl"))
    if sheets:
        for suite in suites:
            for m in methods:
                sel = [c for c in cells if c["row"]["suite"] == suite and c["method"] == m]
                if sel:
                    contact_sheet(sel, folder.file(f"sheets/{suite}-{m}.png"), folder.stored_config() or {})
    return table


def contact_sheet(cells: list[dict], path: Path, config: dict, max_prompts: int = 8, max_images: int = 8) -> Path:
    """A PNG: one row per prompt (at most ``max_prompts``), its first ``max_images`` images framed
    green (correct) or red (wrong), titled acc/rej for CompLift, with the detections that count
    (score above the threshold) drawn as labelled boxes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    cells = cells[:max_prompts]
    cols = min(max_images, max(len(c["records"]) for c in cells))
    thr = config.get("threshold")
    fig, axes = plt.subplots(len(cells), cols, figsize=(1.6 * cols, 1.8 * len(cells)), squeeze=False)
    for i, c in enumerate(cells):
        for j in range(cols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(c["records"]):
                ax.axis("off")
                continue
            rec = c["records"][j]
            ax.imshow(c["images"][j].permute(1, 2, 0).numpy(), interpolation="nearest")
            for d in rec["detections"]:
                if thr is None or d["score"] > thr:
                    x0, y0, x1, y1 = d["box"]
                    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, lw=0.8, ec="yellow"))
                    ax.text(x0 - 0.5, y0 - 0.5, f"{d['label']} {d['score']:.2f}", fontsize=4, color="yellow", va="bottom")
            ok = rec["correct"]
            for s in ax.spines.values():
                s.set_edgecolor("green" if ok else "red")
                s.set_linewidth(2.5)
            verdict = "" if rec["accepted"] is None else ("acc / " if rec["accepted"] else "rej / ")
            ax.set_title(f"{verdict}{'ok' if ok else 'wrong'}", fontsize=5, color="green" if ok else "red")
            if j == 0:
                ax.set_ylabel(c["row"]["expression"].replace(" AND ", "\n& ").replace(" OR ", "\n| "), fontsize=4)
    fig.suptitle(f"{cells[0]['row']['suite']} / {cells[0]['method']}: frame green = correct, red = wrong", fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=150)
    plt.close(fig)
    tmp.replace(path)
    return path
