"""The result table, plot and paper numbers shared by both protocols of `compkern demo`."""
from __future__ import annotations

import math
from pathlib import Path

# the methods of the compkern protocol, in table order
METHODS = ["composable diffusion", "+ CompLift 50 trials", "+ CompLift cached", "+ CompLift adaptive",
           "+ CompLift tempered 50 trials"]
PAPER = {"composable diffusion": 0.450, "+ CompLift": 0.929}  # Yu & Gao 2025, 2-D synthetic average


def table(results: list[dict], methods: list[str]) -> tuple[str, dict]:
    """The per-task accuracy table (text) and its summary rows per algebra and overall."""
    lines = []
    head = f"{'task':12s} {'expression':36s}" + "".join(f" {m:>22s}" for m in methods)
    lines.append(head)
    lines.append("-" * len(head))
    for r in results:
        cells = []
        for m in methods:
            v = r["methods"][m]
            cells.append(f"{100 * v['accuracy']:7.1f}% ({100 * v['acceptance']:5.1f}% kept)")
        lines.append(f"{r['task']:12s} {r['expr']:36s}" + "".join(f" {c:>22s}" for c in cells))
    lines.append("-" * len(head))
    summary = {}
    for group in ["product", "mixture", "negation", "all"]:
        rs = [r for r in results if group == "all" or r["task"].startswith(group)]
        if not rs:
            continue
        row = {}
        for m in methods:
            accs = [r["methods"][m]["accuracy"] for r in rs if not math.isnan(r["methods"][m]["accuracy"])]
            row[m] = sum(accs) / len(accs) if accs else float("nan")
        summary[group] = row
        lines.append(f"{'mean ' + group:49s}" + "".join(f" {100 * row[m]:21.1f}%" for m in methods))
    lines.append("")
    lines.append(f"{'model rows per lift decision':49s}" + "".join(f" {rows_per_decision(results, m):22.1f}" for m in methods))
    lines.append("(the public CompLift code recomputes the null per condition: 100 rows per decision at 50 trials, "
                 "2000 at 1000; adaptive includes its calibration pilot)")
    return "\n".join(lines), summary


def rows_per_decision(results, m) -> float:
    """Model rows spent on lifts / lift decisions (K per sample), over all tasks."""
    rows = sum(r["methods"][m]["lift_rows"] for r in results)
    decisions = sum(r["n"] * len(r["classes"]) for r in results)
    return rows / decisions


def plot(results: list[dict], path: Path, method: str = "+ CompLift adaptive") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.6 * rows), squeeze=False)
    for ax, r in zip(axes.flat, results):
        x, acc = r["_x"].numpy(), r["_accept"].numpy()
        ax.scatter(x[~acc, 0], x[~acc, 1], s=2, c="tab:red", alpha=0.35, label="rejected")
        ax.scatter(x[acc, 0], x[acc, 1], s=2, c="tab:blue", alpha=0.7, label="accepted")
        m = r["methods"]
        ax.set_title(f"{r['task']}: {r['expr']}\nCD {100 * m['composable diffusion']['accuracy']:.0f}% -> "
                     f"CompLift {100 * m[method]['accuracy']:.0f}%", fontsize=8)
        ax.set_xlim(-1.6, 1.6)
        ax.set_ylim(-1.6, 1.6)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(loc="lower left", fontsize=6, markerscale=4)
    fig.suptitle(f"Composable Diffusion samples: accepted (blue) / rejected (red) by {method.lstrip('+ ')}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
