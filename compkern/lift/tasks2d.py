"""The nine 2-D tasks of CompLift (Yu & Gao, ICML 2025): eleven component distributions, a uniform
background, each task's expression over them and the public code's accuracy (the share of kept
samples inside the task's target region; for an empty target, the share rejected).

    product   a: ring of 8 AND vertical strip     b: circle AND circle     c: two disjoint boxes
    mixture   a: 3 left OR 3 right clusters       b: left OR right box     c: circle OR circle
    negation  a: square AND NOT inner square      b: square AND NOT strip  c: inner AND NOT square

Used by `compkern demo` (both protocols) and benchmarks/demo_exact_lift_bound.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from compkern.data.toy2d import Circle, Distribution2D, GaussianMixture, SoftBox
from compkern.lift.expr import Expr, parse

BACKGROUND_ID = 11  # the background's class id after the eleven components


def complift_components() -> list[Distribution2D]:
    """The eleven distinct component distributions of the nine tasks (class id = index)."""
    ring = 0.5 * torch.stack([torch.tensor([math.cos(2 * math.pi * i / 8), math.sin(2 * math.pi * i / 8)])
                              for i in range(8)])
    cl = torch.tensor([[-0.25, 0.5], [-0.25, 0.0], [-0.25, -0.5]])
    box = lambda lo, hi, name: SoftBox(lo, hi, smooth=0.01, name=name)  # noqa: E731
    return [
        GaussianMixture(ring, 0.03, name="ring8"),                       # 0
        box((-0.1, -1.0), (0.1, 1.0), "strip_thin"),                     # 1
        Circle((-0.5, 0.0), 1.0, 0.02, name="circle_left"),              # 2
        Circle((0.5, 0.0), 1.0, 0.02, name="circle_right"),              # 3
        box((-1.0, -1.0), (-0.5, 1.0), "box_left"),                      # 4
        box((0.5, -1.0), (1.0, 1.0), "box_right"),                       # 5
        GaussianMixture(cl, 0.03, name="clusters_left"),                 # 6
        GaussianMixture(cl * torch.tensor([-1.0, 1.0]), 0.03, name="clusters_right"),  # 7
        box((-1.0, -1.0), (1.0, 1.0), "square"),                         # 8
        box((-0.5, -0.5), (0.5, 0.5), "inner_square"),                   # 9
        box((-0.5, -2.0), (0.5, 2.0), "strip_wide"),                     # 10
    ]


def background() -> Distribution2D:
    """The base condition of every composition: uniform on [-2, 2]^2 (class id 11 in the demo)."""
    return SoftBox((-2.0, -2.0), (2.0, 2.0), smooth=0.01, name="background")


def _in_boxes(x: torch.Tensor, boxes) -> torch.Tensor:
    m = torch.zeros(len(x), dtype=torch.bool)
    for (x0, y0), (x1, y1) in boxes:
        m |= (x[:, 0] >= x0) & (x[:, 0] <= x1) & (x[:, 1] >= y0) & (x[:, 1] <= y1)
    return m


def _near_centers(x: torch.Tensor, centers, half: float) -> torch.Tensor:
    return _in_boxes(x, [((cx - half, cy - half), (cx + half, cy + half)) for cx, cy in centers])


@dataclass
class Task:
    """``expr`` over component names; ``classes`` the class ids in the expression's order;
    ``inside(x) -> (n,) bool`` the target region (None: the target is empty)."""

    name: str
    algebra: str
    expr: Expr
    classes: list[int]
    inside: Callable[[torch.Tensor], torch.Tensor] | None


def complift_tasks() -> list[Task]:
    """The nine tasks; target regions as in the public code's accuracy functions."""
    s3 = math.sqrt(3) / 2
    t = [
        ("product_a", "ring8 AND strip_thin", lambda x: _near_centers(x, [(0, 0.5), (0, -0.5)], 0.09)),
        ("product_b", "circle_left AND circle_right",
         lambda x: ((x - torch.tensor([0.0, s3])).norm(dim=1) <= 0.1) | ((x - torch.tensor([0.0, -s3])).norm(dim=1) <= 0.1)),
        ("product_c", "box_left AND box_right", None),
        ("mixture_a", "clusters_left OR clusters_right",
         lambda x: _near_centers(x, [(sx * 0.25, y) for sx in (-1, 1) for y in (0.5, 0.0, -0.5)], 0.09)),
        ("mixture_b", "box_left OR box_right", lambda x: _in_boxes(x, [((-1, -1), (-0.5, 1)), ((0.5, -1), (1, 1))])),
        ("mixture_c", "circle_left OR circle_right",
         lambda x: (((x - torch.tensor([-0.5, 0.0])).norm(dim=1) - 1).abs() <= 0.1)
         | (((x - torch.tensor([0.5, 0.0])).norm(dim=1) - 1).abs() <= 0.1)),
        ("negation_a", "square AND NOT 0.5*inner_square",
         lambda x: _in_boxes(x, [((-1, -1), (-0.5, 0.5)), ((-0.5, -1), (1, -0.5)), ((-1, 0.5), (0.5, 1)), ((0.5, -0.5), (1, 1))])),
        ("negation_b", "square AND NOT 0.5*strip_wide", lambda x: _in_boxes(x, [((-1, -1), (-0.5, 1)), ((0.5, -1), (1, 1))])),
        ("negation_c", "inner_square AND NOT 0.5*square", None),
    ]
    names = [c.name for c in complift_components()]
    tasks = []
    for name, src, inside in t:
        e = parse(src)
        tasks.append(Task(name, name.split("_")[0], e, [names.index(n) for n in e.names], inside))
    return tasks


def accuracy(task: Task, kept: torch.Tensor, n_generated: int) -> float:
    """The public code's accuracy: fraction of kept samples in the target region; for an empty
    target, the fraction of generated samples that were rejected."""
    if task.inside is None:
        return 1.0 - kept.shape[0] / n_generated
    if kept.shape[0] == 0:
        return float("nan")
    return float(task.inside(kept.float()).double().mean())


def select_tasks(names: str | None) -> list[Task]:
    """The tasks named in a comma-separated ``--tasks`` value (None: all nine)."""
    tasks = complift_tasks()
    if not names:
        return tasks
    keep = set(names.split(","))
    unknown = keep - {t.name for t in tasks}
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {sorted(unknown)}; choose from {[t.name for t in tasks]}")
    return [t for t in tasks if t.name in keep]
