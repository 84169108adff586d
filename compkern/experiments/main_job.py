"""`compkern main-job` (also `compkern bench main-job`): the main job measured end to end.

Batch rejection sampling of composed prompts on a trained text-to-image world, the shapes world
of `compkern sepen train` trained with uncaptioned companions (``--extra-fraction 0.5``), whose
detector judges what every image holds. It runs the real path: `CompositionPipeline` on the
saved diffusers folder (pixel space, no VAE) and the lift maps of `compkern generate`.

    compkern sepen train --naming nouns --pair-fraction 0.02 --extra-fraction 0.5 --out runs/world
    compkern main-job run --world runs/world --out runs/main_job      # resumable, one shard per cell
    compkern main-job report --out runs/main_job                     # table.md, results.json, grid.png

Suites (expressions over the world's one-word objects): AND of a seen pair, AND of a held-out
pair, A AND NOT companion(A) (A's caption often draws its companion) generated with the NOT
guiding away (and as "not_perp" with perpendicular negation, Perp-Neg) and, as "not_filter",
generated from A alone (weight 0*: the NOT only filters),
A OR B, and A AND B AND NOT companion(A). A cell is (suite, prompt): ``--n`` candidates (seeds 0..n-1)
generated once, with the generation of `compkern generate` (guidance on the joint caption, the
other terms composed; OR: composed), every method scoring the same candidates:

- none: accept everything;
- public: CompLift's public text-to-image scorer made faithful: 200 evenly spaced fresh trials
  with one noise bank, the full prompt (joint caption) as target for AND prompts (the noise
  elsewhere: the public code defines no target for NOT / OR), one image at a time;
- default: the default of `compkern generate` (``--lift auto``: the joint caption for a pure AND,
  cached from every other step; the noise elsewhere, on ``lift_maps.FIXED_TRIALS`` (100) fixed
  evenly spaced trials);
- fixed-50 / fixed-100: the public scorer's trials at 50 / 100 instead of 200, every image of a
  cell in one batch;
- cached-auto: target 'auto' on cached trials only (the noise scored on every step);
- cached-term / cached-joint / cached-noise / cached-composed: the sampling run's own steps,
  targets of ``cached_lift_maps`` (term: joint for the required components, noise for the
  others, each with its own rule; composed: the old default, for comparison); *-every2:
  every other step of the same record, as `--record-every 2` keeps it (its rows are counted as
  that run evaluates them; its wall time is the plain run's plus half the record's extra);
- fresh-32: 32 uniform-t fresh trials, noise target; fresh-adaptive: compkern.lift.estimate_lift
  adaptive on the expression (mean-lift sign, at most 64 trials);
- reference: 1000 fresh trials (noise target) on the first ``--ref-n`` candidates of a cell.

Pixel-rule methods are reported at the library's default rule and at a rule calibrated per
method (best F1 over a grid, one rule across all suites; for a term method the noise terms' rule,
its joint rows at the joint method's calibrated rule) on the even seeds; every row of the
table is measured on the odd seeds only, so nothing is reported on the data a rule (the
library's default included, chosen with this benchmark) was tuned on. UNet rows per candidate count each
method's own generation (with the record when it scores from it) plus its scoring rows.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import time
from pathlib import Path

import torch

from compkern.data import shapes
from compkern.experiments._args import add_progress, add_sample_steps, add_threads
from compkern.models.detector import DETECTION_THRESHOLD
from compkern.pipelines import lift_maps as LM
from compkern.utils.checkpoint import load
from compkern.utils.run_folder import RunFolder

SUITES = ("and_seen", "and_heldout", "not", "not_perp", "not_filter", "or", "and_not")
# suites generated with another negation than the linear one (CompositionPipeline negation=)
SUITE_NEGATION = {"not_perp": "perp"}
METHODS = ("none", "public", "default", "fixed-50", "fixed-100", "cached-auto", "cached-term", "cached-term-every2", "cached-joint", "cached-joint-every2", "cached-noise",
           "cached-noise-every2", "cached-composed", "fresh-32", "fresh-adaptive")
PIXEL_METHODS = ("public", "default", "fixed-50", "fixed-100", "cached-auto", "cached-term", "cached-term-every2", "cached-joint", "cached-joint-every2", "cached-noise",
                 "cached-noise-every2", "cached-composed", "fresh-32", "reference")
# the 'term' target (lift_maps.per_term) from a cell's stored maps: (joint maps, noise maps)
# target 'auto' (lift_maps.resolve_target): (its maps for a joint target, its maps otherwise); 'default'
# is `compkern generate`'s (--lift auto: cached joint every other step / FIXED_TRIALS fixed trials, noise)
AUTO_METHODS = {"default": ("cached-joint-every2", f"fixed-{LM.FIXED_TRIALS}"), "cached-auto": ("cached-joint-every2", "cached-noise")}
# maps drawn on trials of their own (x_t from q(x_t | x_0)), not the sampling run's steps
SAMPLED_METHODS = ("public", "fixed-50", "fixed-100", "fresh-32", "fresh-adaptive", "reference")
TERM_METHODS = {"cached-term": ("cached-joint", "cached-noise"),
                "cached-term-every2": ("cached-joint-every2", "cached-noise-every2")}
THRESHOLDS = (0.0, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2)
MIN_FRACTIONS = (1 / 256, 2 / 256, 3 / 256, 5 / 256, 8 / 256, 12 / 256, 16 / 256, 24 / 256, 32 / 256, 48 / 256)
# settings that change the numbers: a folder made with other settings is refused
_FROZEN = ("world", "prompts", "n", "ref_n", "ref_trials", "steps", "guidance", "eta", "public_trials", "seed")


def suite_prompts(world: shapes.ShapesWorld, suite: str, n_prompts: int) -> list[tuple[str, list[int]]]:
    """(expression, object id of each component in order) for the first ``n_prompts`` prompts."""
    cap = lambda o: world.caption((o,))  # noqa: E731
    comp = shapes.companion
    seen = [p for p in world.seen_pairs if comp(p[0]) != p[1] and comp(p[1]) != p[0]]
    if suite == "and_seen":
        out = [(f"{cap(a)} AND {cap(b)}", [a, b]) for a, b in seen]
    elif suite == "and_heldout":
        out = [(f"{cap(a)} AND {cap(b)}", [a, b]) for a, b in world.held_out_pairs]
    elif suite in ("not", "not_perp"):  # not_perp: the same prompts, generated with perpendicular negation
        out = [(f"{cap(a)} AND NOT {cap(comp(a))}", [a, comp(a)]) for a in range(len(shapes.OBJECTS))]
    elif suite == "not_filter":  # the same NOT, generated from A alone (weight 0: filtered, not guided away)
        out = [(f"{cap(a)} AND NOT 0*{cap(comp(a))}", [a, comp(a)]) for a in range(len(shapes.OBJECTS))][::-1]
    elif suite == "or":
        out = [(f"{cap(a)} OR {cap(b)}", [a, b]) for a, b in seen[::-1]]
    elif suite == "and_not":
        out = [(f"{cap(a)} AND {cap(b)} AND NOT {cap(comp(a))}", [a, b, comp(a)]) for a, b in seen
               if comp(a) != b and comp(b) != a]
    else:
        raise ValueError(f"suite must be one of {SUITES}, got {suite!r}")
    return out[:n_prompts]


def judge(detector, images: torch.Tensor, objs: list[int], expression) -> tuple[torch.Tensor, torch.Tensor]:
    """images (B, 3, 16, 16) in [-1, 1] -> (satisfied (B,) bool, present (K, B) bool): the
    detector's presence at DETECTION_THRESHOLD, combined by the expression."""
    with torch.no_grad():
        prob = detector(images.clamp(-1, 1).float())[0].sigmoid()
    present = prob[:, objs].T > DETECTION_THRESHOLD
    return expression.accept(present.float() - 0.5), present


@functools.lru_cache(maxsize=None)
def _composition(expression: str):
    """parse_composition, once per expression (the report decides every cell for every rule)."""
    from compkern.pipelines.composition import parse_composition

    return parse_composition(expression)


def _public_target(comp) -> str:
    """The public scorer's target: the full prompt (joint) for a pure AND, else the noise (the
    public code defines no target for NOT / OR): lift_maps' 'auto'."""
    return LM.resolve_target("auto", comp.expression.required(), comp.K)


def _auto_source(cell: dict, method: str) -> tuple[str, str]:
    """(stored maps, target) that an AUTO_METHODS method reads in this cell."""
    target = _public_target(_composition(cell["expression"]))
    j, nz = AUTO_METHODS[method]
    return (j if target == "joint" else nz), target


# -- one cell -----------------------------------------------------------------------------------
def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_cell(pipe, detector, expression_text: str, objs: list[int], cfg: dict, negation: str = "linear") -> dict:
    """Generate cfg['n'] candidates of one prompt (``negation``: how its NOT terms guide) and score
    them with every method: a dict of tensors and numbers (the shard of the cell)."""
    from compkern.pipelines.composition import parse_composition

    comp = parse_composition(expression_text)
    n, K = cfg["n"], comp.K
    seeds = [cfg["seed"] + i for i in range(n)]
    gen = dict(num_inference_steps=cfg["steps"], guidance_scale=cfg["guidance"], eta=cfg["eta"], output_type="latent",
               negation=negation)
    rec, wall_rec = _timed(lambda: pipe(comp, seeds=seeds, **gen))
    plain, wall_plain = _timed(lambda: pipe(comp, seeds=seeds, record=False, **gen))
    if not torch.allclose(plain.latents, rec.latents, atol=1e-4, rtol=1e-4):
        raise RuntimeError("the record changed the samples: generation must not depend on the extra rows")
    x0 = rec.latents
    sat, present = judge(detector, x0, objs, comp.expression)
    signs = torch.tensor(comp.signs)
    cell = {"expression": expression_text, "objs": objs, "K": K, "seeds": seeds, "images": x0.half(),
            "satisfied": sat, "present": present, "generate": rec.generate,
            "gen": {"record": {"rows": rec.n_evals / n, "wall": wall_rec / n},
                    "plain": {"rows": plain.n_evals / n, "wall": wall_plain / n}},
            "maps": {}, "decisions": {}, "score": {}}

    def put(name, maps, wall, gen_kind):
        cell["maps"][name] = maps.pixel_lift.half()
        cell["score"][name] = {"rows": maps.n_evals / n, "wall": wall / n, "gen": gen_kind}

    for target in ("joint", "noise", "composed"):
        if target == "joint" and comp.joint is None:
            continue
        maps, wall = _timed(lambda: LM.cached_lift_maps(rec.record, signs, target=target, joint_row=comp.joint_row,
                                                        latents=x0, schedule=pipe.schedule))
        put(f"cached-{target}", maps, wall, "record")
    if comp.joint is not None:  # record_every=2: the same trajectory, every other step kept (steps 0, 2, ...)
        maps, wall = _timed(lambda: LM.cached_lift_maps(rec.record, signs, target="joint", joint_row=comp.joint_row,
                                                        steps=slice(0, None, 2)))
        put("cached-joint-every2", maps, wall, "record_every2")
        maps, wall = _timed(lambda: LM.cached_lift_maps(rec.record, signs, target="noise", latents=x0,
                                                        schedule=pipe.schedule, steps=slice(0, None, 2)))
        put("cached-noise-every2", maps, wall, "record_every2")
        extra = rec.n_evals - plain.n_evals  # rows the record added: they cost half with record_every=2
        cell["gen"]["record_every2"] = {"rows": (plain.n_evals + extra * math.ceil(cfg["steps"] / 2) / cfg["steps"]) / n,
                                        "wall": (wall_plain + (wall_rec - wall_plain) / 2) / n}
    p_target = _public_target(comp)
    emb_pub = pipe.encode(comp.condition_prompts(with_joint=p_target == "joint"))
    ones = []
    t0 = time.perf_counter()
    for b in range(n):  # the public code scores one image at a time
        ones.append(LM.fixed_lift_maps(pipe, x0[b:b + 1], emb_pub, signs, n_trials=cfg["public_trials"], seed=0,
                                       target=p_target, joint_row=comp.joint_row if p_target == "joint" else None))
    put("public", LM.LiftMaps(torch.cat([m.pixel_lift for m in ones], 1), ones[0].n_trials,
                              sum(m.n_evals for m in ones)), time.perf_counter() - t0, "plain")
    for trials in (50, 100):
        maps, wall = _timed(lambda: LM.fixed_lift_maps(pipe, x0, emb_pub, signs, n_trials=trials, seed=0, target=p_target,
                                                       joint_row=comp.joint_row if p_target == "joint" else None))
        put(f"fixed-{trials}", maps, wall, "plain")
    emb = pipe.encode(comp.condition_prompts(with_joint=False))
    maps, wall = _timed(lambda: LM.fresh_lift_maps(pipe, x0, emb, n_trials=32, seed=cfg["seed"] + 1))
    put("fresh-32", maps, wall, "plain")
    maps, wall = _timed(lambda: LM.fresh_lift_maps(pipe, x0, emb, n_trials=64, adaptive=True, expr=comp.expression,
                                                   seed=cfg["seed"] + 2))
    put("fresh-adaptive", maps, wall, "plain")
    cell["decisions"]["fresh-adaptive"] = LM.accept(comp, maps, rule="mean")
    r = cfg["ref_n"]
    if r:
        maps, wall = _timed(lambda: LM.fresh_lift_maps(pipe, x0[:r], emb, n_trials=cfg["ref_trials"], seed=cfg["seed"] + 3))
        cell["maps"]["reference"] = maps.pixel_lift.half()
        cell["score"]["reference"] = {"rows": maps.n_evals / r, "wall": wall / r, "gen": "plain"}
    return cell


# -- the run ------------------------------------------------------------------------------------
def _cells(world: shapes.ShapesWorld, n_prompts: int) -> list[tuple[str, int, str, list[int]]]:
    return [(s, i, e, o) for s in SUITES for i, (e, o) in enumerate(suite_prompts(world, s, n_prompts))]


def check_at_least_one(args: argparse.Namespace, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def open_world(path: str) -> tuple[Path, Path, shapes.ShapesWorld]:
    """--world: (folder, its trained diffusers model folder, the world), or a ValueError naming --world."""
    from compkern.train.sepen import load_world

    world_dir = Path(path)
    model = world_dir / "base" / "model"
    if not (model / "unet").is_dir():
        raise ValueError(f"--world {world_dir}: no trained model at {model} (run `compkern sepen train` first)")
    world = load_world(world_dir, shapes.ShapesWorld())
    if not world.extra_fraction:
        raise ValueError(f"--world {world_dir} was trained without uncaptioned companions (--extra-fraction): "
                         "its NOT suites would have nothing to reject")
    return world_dir, model, world


def parse_suites(text: str | None) -> list[str]:
    """--suites: comma-separated names of SUITES (None or empty: all)."""
    suites = text.split(",") if text else list(SUITES)
    bad = [x for x in suites if x not in SUITES]
    if bad:
        raise ValueError(f"--suites: unknown {bad}; choose from {SUITES}")
    return suites


def run(args: argparse.Namespace) -> int:
    if args.action == "report":
        print(report(Path(args.out), rules_from=Path(args.rules_from) if args.rules_from else None))
        return 0
    from tqdm.auto import tqdm

    from compkern.pipelines.composition import CompositionPipeline
    from compkern.train.sepen import load_detector

    check_at_least_one(args, ("n", "prompts", "steps", "public_trials", "ref_trials"))
    if not 0 <= args.ref_n <= args.n:
        raise ValueError(f"--ref-n must lie in [0, --n = {args.n}], got {args.ref_n}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    world_dir, model, world = open_world(args.world)
    cfg = {k: getattr(args, k) for k in _FROZEN if k != "world"}
    cfg["world"] = world.to_dict()
    cfg["model"] = str(model.resolve())
    folder = RunFolder(out, cfg, keys=_FROZEN, what="benchmark")
    pipe = CompositionPipeline.from_pretrained(model)
    detector = load_detector(world_dir)
    suites = parse_suites(args.suites)
    cells = [c for c in _cells(world, args.prompts) if c[0] in suites]
    todo = [c for c in cells if not folder.exists(f"cells/{c[0]}-{c[1]:02d}.pt")]
    for suite, i, expr, objs in tqdm(todo, desc="main-job cells", initial=len(cells) - len(todo), total=len(cells),
                                     disable=getattr(args, "no_progress", False)):
        cell = run_cell(pipe, detector, expr, objs, cfg, SUITE_NEGATION.get(suite, "linear"))
        cell["suite"] = suite
        folder.save(f"cells/{suite}-{i:02d}.pt", cell)
    print(report(out))
    return 0


# -- the report ---------------------------------------------------------------------------------
def _maps(cell: dict, method: str) -> LM.LiftMaps | None:
    """A pixel method's lift maps of a cell (None where the cell has none, e.g. no joint for an OR)."""
    comp = _composition(cell["expression"])
    one = lambda m, t: LM.LiftMaps(cell["maps"][m].float(), 1, 0, (t,) * cell["K"],  # noqa: E731
                                   "sampled" if m in SAMPLED_METHODS else "cached")
    if method in AUTO_METHODS:
        src, target = _auto_source(cell, method)
        return one(src, target) if src in cell["maps"] else None
    if method in TERM_METHODS:
        j, nz = TERM_METHODS[method]
        if nz not in cell["maps"]:
            return None
        req = comp.expression.required()
        return LM.per_term(one(j, "joint") if req else None, one(nz, "noise"), req)
    if method not in cell["maps"]:
        return None
    if method == "public":
        return one(method, _public_target(comp))
    return one(method, "joint" if method.startswith("cached-joint") else "composed" if method == "cached-composed"
               else "noise")


def _score(cell: dict, method: str) -> dict:
    """rows / wall per candidate of a method's scoring and the generation it scores ('gen')."""
    if method in AUTO_METHODS:
        return cell["score"][_auto_source(cell, method)[0]]
    if method in TERM_METHODS:
        parts = [cell["score"][m] for m in TERM_METHODS[method] if m in cell["score"]]
        return {"rows": sum(p["rows"] for p in parts), "wall": sum(p["wall"] for p in parts), "gen": parts[-1]["gen"]}
    return cell["score"].get(method, {"rows": 0.0, "wall": 0.0, "gen": "plain"})


def _decide(cell: dict, method: str, rule: tuple[float, ...] | None) -> torch.Tensor:
    """(B,) bool decisions. rule: (threshold, min fraction) for every row, or for a term method
    (joint threshold, joint fraction, noise threshold, noise fraction); None: the library default."""
    if method == "none":
        return torch.ones(len(cell["seeds"]), dtype=torch.bool)
    if method in cell["decisions"]:
        return cell["decisions"][method]
    maps = _maps(cell, method)
    thr = frac = None
    if rule is not None and len(rule) == 4:
        by = {"joint": rule[:2], "noise": rule[2:]}
        thr, frac = ([by[t][i] for t in maps.targets] for i in (0, 1))
    elif rule is not None:
        thr, frac = rule
    return LM.accept(_composition(cell["expression"]), maps, threshold=thr, min_pixels=frac)


def _stats(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """pairs of (decision, truth) -> precision, recall, acceptance, F1, counts."""
    d = torch.cat([p[0] for p in pairs])
    y = torch.cat([p[1] for p in pairs])
    tp, acc, pos = int((d & y).sum()), int(d.sum()), int(y.sum())
    prec = tp / acc if acc else float("nan")
    rec = tp / pos if pos else float("nan")
    f1 = 2 * tp / (acc + pos) if acc + pos else 0.0
    return {"precision": prec, "recall": rec, "acceptance": acc / len(d), "f1": f1, "accepted": acc, "n": len(d),
            "base_rate": pos / len(d)}


def _split(cell: dict, part: str) -> torch.Tensor:
    idx = torch.tensor(cell["seeds"]) - cell["seeds"][0]
    return idx % 2 == (0 if part == "cal" else 1)


def calibrate_rule(cells: list[dict], method: str, joint_rule: tuple[float, float] | None = None
                   ) -> tuple[float, ...] | None:
    """The (threshold, min fraction) of the grid with the best F1 over every suite's calibration
    (even) seeds; for a term method (joint_rule given) the noise rows' rule, returned after it.
    None when no cell has the method."""
    best, arg = -1.0, None
    for thr, frac in itertools.product(THRESHOLDS, MIN_FRACTIONS):
        rule = (thr, frac) if joint_rule is None else (*joint_rule, thr, frac)
        pairs = []
        for c in cells:
            maps = _maps(c, method)
            if maps is None:
                continue
            m = _split(c, "cal")[:maps.pixel_lift.shape[1]]
            pairs.append((_decide(c, method, rule)[m], c["satisfied"][:len(m)][m]))
        if pairs:
            f1 = _stats(pairs)["f1"]
            if f1 > best:
                best, arg = f1, rule
    return arg


def report(out: Path, rules_from: Path | None = None) -> str:
    """Aggregate every cell of a benchmark folder: table.md, results.json and grid.png; returns the table.
    rules_from: another benchmark folder whose calibrated rules are applied unchanged, every seed
    of this one evaluated (a replication on candidates no rule was chosen on)."""
    files = sorted((out / "cells").glob("*.pt"))
    if not files:
        raise ValueError(f"--out {out} holds no cells yet: run `compkern main-job run` first")
    cells = [load(f) for f in files]
    present = {m for m in PIXEL_METHODS if any(_maps(c, m) is not None for c in cells)}
    if rules_from is None:
        two = {**TERM_METHODS, **AUTO_METHODS}  # a rule per target: the joint rows' rule fixed, the noise rows' chosen
        rules = {m: calibrate_rule(cells, m) for m in PIXEL_METHODS if m in present and m not in two}
        for m, (j, _) in two.items():
            if m in present and rules.get(j):
                rules[m] = calibrate_rule(cells, m, rules[j])
    else:
        path = rules_from / "results.json"
        if not path.exists():
            raise ValueError(f"--rules-from {rules_from}: no results.json (run its report first)")
        rules = {m: tuple(r) for m, r in json.loads(path.read_text())["rules"].items() if m in present}
    rows = []
    variants = [("none", None, "-")] + [(m, None, "default") for m in METHODS if m in PIXEL_METHODS] + \
        [(m, rules[m], "calibrated") for m in METHODS if m in rules] + [("fresh-adaptive", None, "mean sign")]
    for suite in SUITES:
        sc = [c for c in cells if c["suite"] == suite]
        if not sc:
            continue
        for method, rule, kind in variants:
            pairs, ref_pairs, rows_sum, wall_sum, n_sum = [], [], 0.0, 0.0, 0
            for c in sc:
                if method in PIXEL_METHODS and _maps(c, method) is None:
                    continue  # e.g. no joint caption for an OR
                # the odd seeds only when the rules were chosen on this folder's even ones
                m = _split(c, "eval") if rules_from is None else torch.ones(len(c["seeds"]), dtype=torch.bool)
                dec = _decide(c, method, rule)
                pairs.append((dec[m], c["satisfied"][m]))
                if "reference" in c["maps"] and method != "reference":
                    r = c["maps"]["reference"].shape[1]
                    ref = _decide({**c, "seeds": c["seeds"][:r]}, "reference", rules["reference"])
                    ref_pairs.append((dec[:r][m[:r]], ref[m[:r]]))
                s = _score(c, method)
                g = c["gen"][s["gen"]]
                k = int(m.sum())
                rows_sum += (g["rows"] + s["rows"]) * k
                wall_sum += (g["wall"] + s["wall"]) * k
                n_sum += k
            if not pairs:
                continue
            st = _stats(pairs)
            agree = float(torch.cat([a == b for a, b in ref_pairs]).float().mean()) if ref_pairs else float("nan")
            acc = st["accepted"] or float("nan")
            rows.append({"suite": suite, "method": method, "rule": kind, "rule_values": None if rule is None else list(rule),
                         **st, "rows_per_candidate": rows_sum / max(n_sum, 1), "rows_per_accepted": rows_sum / acc,
                         "wall_per_accepted": wall_sum / acc, "agreement_with_reference": agree})
    folder = RunFolder(out)
    folder.write_json("results.json", {"rules": {m: list(r) for m, r in rules.items()}, "rows": rows,
                                       "config": folder.stored_config()})
    lines = ["| suite | method | rule | base rate | precision | recall | accepted | rows / candidate | rows / accepted "
             "| wall s / accepted | agrees with 1000-trial ref |", "|" + "---|" * 11]
    for r in rows:
        rule = r["rule"] if r["rule_values"] is None else f"{r['rule']} {_rule_text(r['rule_values'])}"
        lines.append(f"| {r['suite']} | {r['method']} | {rule} | {r['base_rate']:.2f} | {_f(r['precision'])} | "
                     f"{_f(r['recall'])} | {r['accepted']}/{r['n']} | {r['rows_per_candidate']:.0f} | "
                     f"{_f(r['rows_per_accepted'], '.0f')} | {_f(r['wall_per_accepted'])} | "
                     f"{_f(r['agreement_with_reference'])} |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    if "default" in present:
        grid(cells, None, out / "grid.png")
    return table


def _rule_text(rule) -> str:
    """(thr, frac) -> '(thr, n/256)'; a term rule -> 'joint (..) noise (..)'."""
    one = lambda t, f: f"({t:g}, {f * 256:.0f}/256)"  # noqa: E731
    return one(*rule) if len(rule) == 2 else f"joint {one(*rule[:2])} noise {one(*rule[2:])}"


def _f(x: float, fmt: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def grid(cells: list[dict], rule: tuple[float, ...] | None, path: Path, method: str = "default",
         per_suite: int = 4) -> None:
    """A PNG: per suite, candidates with the method's verdict (green accepted / red rejected), the
    detector's truth, and each component's lift map below the image."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = []
    for suite in SUITES:
        sc = [c for c in cells if c["suite"] == suite and _maps(c, method) is not None]
        if sc:
            c = sc[0]
            shown.append((suite, c, _decide(c, method, rule)))
    if not shown:
        return
    K = max(c["K"] for _, c, _ in shown)
    per_suite = min(per_suite, min(len(c["seeds"]) for _, c, _ in shown))
    fig, axes = plt.subplots(len(shown) * (K + 1), per_suite, figsize=(1.3 * per_suite, 1.3 * len(shown) * (K + 1)),
                             squeeze=False)
    for r, (suite, c, dec) in enumerate(shown):
        names = c["expression"].replace(" AND ", " & ").replace("NOT ", "!")
        for j in range(per_suite):
            ax = axes[r * (K + 1), j]
            ax.imshow(((c["images"][j].float().permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
            ok, truth = bool(dec[j]), bool(c["satisfied"][j])
            ax.set_title(f"{'acc' if ok else 'rej'} / {'ok' if truth else 'bad'}", fontsize=6,
                         color="green" if ok == truth else "red")
            for k in range(K):
                axm = axes[r * (K + 1) + 1 + k, j]
                if k < c["K"]:
                    m = _maps(c, method).pixel_lift[k, j]
                    s = float(m.abs().max()) or 1.0
                    axm.imshow(m.numpy(), cmap="coolwarm", vmin=-s, vmax=s)
            if j == 0:
                ax.set_ylabel(f"{suite}\n{names}", fontsize=5)
        for a in axes[r * (K + 1):(r + 1) * (K + 1)].flat:
            a.set_xticks([])
            a.set_yticks([])
    fig.suptitle(f"{method}: accepted/rejected (title) vs detector truth; lift map per component below", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", default="run", choices=["run", "report"])
    p.add_argument("--rules-from", default=None, help="report: apply the calibrated rules of another benchmark "
                   "folder and evaluate every seed of this one")
    p.add_argument("--world", default="runs/world", help="a `compkern sepen train` folder trained with --extra-fraction")
    p.add_argument("--out", default="runs/main_job", help="benchmark folder (resumable: one shard per cell)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per suite")
    p.add_argument("--n", type=int, default=12, help="candidates per prompt (seeds --seed ... --seed + n - 1)")
    p.add_argument("--ref-n", type=int, default=4, help="candidates per prompt scored by the 1000-trial reference")
    p.add_argument("--ref-trials", type=int, default=1000)
    p.add_argument("--public-trials", type=int, default=200)
    add_sample_steps(p, 50, dest="steps")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--eta", type=float, default=1.0, help="1: ancestral DDPM (the world's sampler), 0: DDIM")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--suites", default=None, help=f"comma-separated subset of {','.join(SUITES)} (default all; "
                   "processes running disjoint subsets may share one folder)")
    add_threads(p)
    add_progress(p)
