"""GenEval's correctness rules (djghosh13/geneval, evaluation/evaluate_images.py), on
``Detection`` lists, plus compkern's OR clauses.

- Detections count when their score exceeds the threshold (GenEval: 0.3, and 0.9 on counting
  prompts, for Mask2Former; each scorer states its own), per class sorted by score, at most
  ``max_objects`` (16) per class.
- ``include`` (AND): clause {class, count} holds when at least ``count`` objects of the class are
  detected; with ``color``, at least ``count`` of the ``count`` most confident ones have that color;
  with ``position: [relation, j]``, every one of those objects stands in ``relation`` to every
  object matched by include clause j (which must itself have held).
- ``exclude`` (OR of exclusions): the row fails when some clause finds ``count`` or more objects.
  Counting "exactly n" is include n plus exclude n + 1; NOT B is exclude {B, count 1}: B is not
  detected above the threshold.
- ``any`` (compkern's OR): at least one of its clauses holds (checked as an include clause,
  without position).
- Position (``relative_position``): with centers c and sizes d (width, height) of the boxes of A and
  B, offset = c_A - c_B; each axis' offset shrinks by ``margin`` x (d_A + d_B) (0.1) towards 0;
  if both shrunk offsets are ~0 there is no relation; otherwise, divided by |offset| (the
  unshrunk length), dx < -0.5: "left of", dx > 0.5: "right of", dy < -0.5: "above", dy > 0.5:
  "below" (image y grows downwards).
"""
from __future__ import annotations

import math
from typing import Sequence

from compkern.eval.scorers import Detection

__all__ = ["MAX_OBJECTS", "POSITION_MARGIN", "compute_iou", "evaluate", "group_detections", "nms", "relative_position"]

MAX_OBJECTS = 16
POSITION_MARGIN = 0.1


def compute_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (x0, y0, x1, y1) boxes, GenEval's pixel-inclusive areas ((x1 - x0 + 1) ...)."""
    area = lambda x: max(x[2] - x[0] + 1, 0) * max(x[3] - x[1] + 1, 0)  # noqa: E731
    inter = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def nms(dets: Sequence[Detection], iou: float = 1.0, max_objects: int = MAX_OBJECTS) -> list[Detection]:
    """Per label, greedy by score: drop a detection overlapping a kept one at IoU >= ``iou`` (1:
    keep all, GenEval's default); at most ``max_objects`` per label. Sorted by score, descending."""
    kept: list[Detection] = []
    per: dict[str, int] = {}
    for d in sorted(dets, key=lambda d: -d.score):
        if per.get(d.label, 0) >= max_objects:
            continue
        if iou < 1 and any(k.label == d.label and compute_iou(k.box, d.box) >= iou for k in kept):
            continue
        kept.append(d)
        per[d.label] = per.get(d.label, 0) + 1
    return kept


def group_detections(dets: Sequence[Detection], threshold: float, max_objects: int = MAX_OBJECTS
                     ) -> dict[str, list[Detection]]:
    """{label: its detections with score > threshold, most confident first, at most max_objects}."""
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    out: dict[str, list[Detection]] = {}
    for d in sorted(dets, key=lambda d: -d.score):
        if d.score > threshold and len(out.setdefault(d.label, [])) < max_objects:
            out[d.label].append(d)
    return {k: v for k, v in out.items() if v}


def relative_position(a: Detection, b: Detection, margin: float = POSITION_MARGIN) -> set[str]:
    """The relations of A to B ("left of", "right of", "above", "below"; GenEval's rule, module
    docstring): a subset, empty when the centers are within the margin on both axes."""
    ca = ((a.box[0] + a.box[2]) / 2, (a.box[1] + a.box[3]) / 2)
    cb = ((b.box[0] + b.box[2]) / 2, (b.box[1] + b.box[3]) / 2)
    da = (abs(a.box[2] - a.box[0]), abs(a.box[3] - a.box[1]))
    db = (abs(b.box[2] - b.box[0]), abs(b.box[3] - b.box[1]))
    off = [ca[i] - cb[i] for i in range(2)]
    rev = [max(abs(off[i]) - margin * (da[i] + db[i]), 0.0) * math.copysign(1.0, off[i]) if off[i] else 0.0
           for i in range(2)]
    if all(abs(r) < 1e-3 for r in rev):
        return set()
    norm = math.hypot(*off)
    dx, dy = rev[0] / norm, rev[1] / norm
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


def _colors(found: list[Detection], cls: str) -> list[str | None]:
    cols = [d.color for d in found]
    if any(c is None for c in cols):
        raise ValueError(f"a color clause for {cls!r} needs detections with colors: wrap the scorer in ClipColorScorer")
    return cols


def _clause(req: dict, objects: dict[str, list[Detection]], reason: list[str]) -> list[Detection] | None:
    """The matched objects of an include-style clause (count and color), or None (reason appended)."""
    cls, count = req["class"], req.get("count", 1)
    found = objects.get(cls, [])[:count]
    if len(found) < count:
        reason.append(f"expected {cls}>={count}, found {len(found)}")
        return None
    if "color" in req:
        cols = _colors(found, cls)
        if cols.count(req["color"]) < count:
            reason.append(f"expected {req['color']} {cls}>={count}, found {cols.count(req['color'])} {req['color']}; "
                          + ", ".join(f"{cols.count(c)} {c}" for c in dict.fromkeys(cols)))
            return None
    return found


def evaluate(row: dict, detections: Sequence[Detection], *, threshold: float,
             counting_threshold: float | None = None, margin: float = POSITION_MARGIN,
             max_objects: int = MAX_OBJECTS) -> tuple[bool, str]:
    """(correct, reason) of one image's ``detections`` for a suite ``row`` (include / exclude /
    any, module docstring); ``counting_threshold`` replaces ``threshold`` on rows tagged
    "counting" (None: the same)."""
    if not isinstance(row, dict):
        raise TypeError(f"row must be a dict (a suite row), got {type(row).__name__}")
    thr = counting_threshold if row.get("tag") == "counting" and counting_threshold is not None else threshold
    objects = group_detections(detections, thr, max_objects)
    correct, reason = True, []
    matched: list[list[Detection] | None] = []
    for req in row.get("include", []):
        found = _clause(req, objects, reason)
        if found is not None and "position" in req:
            rel, j = req["position"]
            if not 0 <= j < len(matched):
                raise ValueError(f"position clause of {req['class']!r} refers to include clause {j}, which comes later")
            target = matched[j]
            if target is None:
                reason.append(f"no target for {req['class']} to be {rel}")
                found = None
            else:
                for obj in found:
                    bad = [t for t in target if rel not in relative_position(obj, t, margin)]
                    if bad:
                        got = relative_position(obj, bad[0], margin)
                        reason.append(f"expected {req['class']} {rel} target, found {' and '.join(sorted(got)) or 'no relation'}")
                        found = None
                        break
        correct &= found is not None
        matched.append(found)
    if row.get("any"):
        why: list[str] = []
        if not any(_clause(req, objects, why) is not None for req in row["any"]):
            correct = False
            reason.append("none of: " + "; ".join(why))
    for req in row.get("exclude", []):
        n = len(objects.get(req["class"], []))
        if n >= req.get("count", 1):
            correct = False
            reason.append(f"expected {req['class']}<{req.get('count', 1)}, found {n}")
    return correct, "\n".join(reason)
