"""Aggregate a grid of runs into the paper's table (mean ± std per method and LR) and bar plot.

Each run contributes its ``results.json`` (method, lr, seed, test_accuracy). Per (method, lr):
mean and sample standard deviation (``ddof=1``; 0 for a single seed) of the final test accuracy
in percent. A method's *best LR* is the one with the highest mean (the paper's bold entry); the
bar plot (like Figure 3) shows each method at its best LR with ±1 std error bars.
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from seed_stats import format_mean_std, mean_std

__all__ = ["Cell", "aggregate", "best_lrs", "format_table", "plot_bars", "write_sweep_outputs"]


@dataclass(frozen=True)
class Cell:
    """Mean ± std test accuracy (percent) of one (method, lr) over its seeds (std ``None`` for one
    seed)."""

    method: str
    lr: float
    mean: float
    std: float | None
    seeds: tuple[int, ...]
    values: tuple[float, ...]

    def format(self) -> str:
        return format_mean_std(self.mean, self.std)


def aggregate(results: Iterable[dict[str, Any]]) -> list[Cell]:
    """One :class:`Cell` per (method, lr), in first-seen order of methods and ascending LR."""
    groups: dict[tuple[str, float], list[tuple[int, float]]] = {}
    order: list[str] = []
    for run in results:
        key = (run["method"], float(run["lr"]))
        if run["method"] not in order:
            order.append(run["method"])
        groups.setdefault(key, []).append((int(run["seed"]), 100.0 * float(run["test_accuracy"])))
    cells = []
    for (method, lr), runs in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        values = [v for _, v in runs]
        mean, std = mean_std(values)
        cells.append(Cell(method, lr, mean, std, tuple(s for s, _ in runs), tuple(values)))
    return cells


def best_lrs(cells: Sequence[Cell]) -> dict[str, Cell]:
    """The cell with the highest mean accuracy for each method (ties: the smaller LR), among the
    method's cells with the most seeds: in a partial grid, a cell of fewer seeds is not compared
    with complete ones."""
    best: dict[str, Cell] = {}
    for method in dict.fromkeys(c.method for c in cells):
        mine = [c for c in cells if c.method == method]
        most = max(len(c.values) for c in mine)
        # max() keeps the first of equal means: cells come in ascending LR
        best[method] = max((c for c in mine if len(c.values) == most), key=lambda c: c.mean)
    return best


def format_table(cells: Sequence[Cell]) -> str:
    """Markdown table: one row per method, one column per LR, best LR per method in bold."""
    lrs = sorted({c.lr for c in cells})
    best = best_lrs(cells)
    by_key = {(c.method, c.lr): c for c in cells}
    header = ["method"] + [f"lr={lr:g}" for lr in lrs] + ["best", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, top in best.items():
        row = [method]
        for lr in lrs:
            cell = by_key.get((method, lr))
            text = "" if cell is None else cell.format()
            row.append(f"**{text}**" if cell is top else text)
        row += [f"{top.format()} (lr={top.lr:g})", str(len(top.seeds))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_bars(cells: Sequence[Cell], path: str | os.PathLike, title: str = "") -> str:
    """Bar plot of each method at its best LR (mean ± std test accuracy), saved as PNG."""
    from matplotlib.figure import Figure

    best = list(best_lrs(cells).values())
    fig = Figure(figsize=(1.2 + 1.1 * len(best), 3.4), layout="constrained")
    ax = fig.add_subplot()
    means = [c.mean for c in best]
    errors = [c.std or 0.0 for c in best]  # no bar for one seed
    ax.bar(range(len(best)), means, yerr=errors, capsize=4, color=[f"C{i}" for i in range(len(best))])
    ax.set_xticks(range(len(best)), [f"{c.method}\nlr={c.lr:g}" for c in best])
    top = max(m + e for m, e in zip(means, errors))
    bottom = min(m - e for m, e in zip(means, errors))
    low = bottom - max(0.5, top - bottom)
    ax.set_ylim(max(0.0, low), min(100.0, top + max(0.3, (top - bottom) / 2)))
    ax.set_ylabel("test accuracy (%)")
    width_chars = int(12 + 11 * len(best))  # the title wraps to the figure's width
    ax.set_title(textwrap.fill(title or "best LR per method, mean ± std over seeds", width_chars),
                 fontsize=8)
    for i, (c, e) in enumerate(zip(best, errors)):
        ax.annotate(f"{c.mean:.2f}", (i, c.mean + e), xytext=(0, 3), textcoords="offset points",
                    ha="center", va="bottom", fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return os.fspath(path)


def write_sweep_outputs(results: Sequence[dict[str, Any]], output_dir: str | os.PathLike,
                        title: str = "") -> dict[str, str]:
    """Write ``sweep_table.md``, ``sweep_summary.json`` and ``sweep_bars.png``; return the paths."""
    cells = aggregate(results)
    os.makedirs(output_dir, exist_ok=True)
    table = format_table(cells)
    paths = {"table": os.path.join(output_dir, "sweep_table.md"),
             "summary": os.path.join(output_dir, "sweep_summary.json"),
             "plot": os.path.join(output_dir, "sweep_bars.png")}
    with open(paths["table"], "w", encoding="utf-8") as fh:
        fh.write((f"{title}\n\n" if title else "") + table + "\n")
    best = best_lrs(cells)
    summary = {"cells": [{"method": c.method, "lr": c.lr, "mean": c.mean, "std": c.std,
                          "seeds": list(c.seeds), "values": list(c.values),
                          "best": best[c.method] is c} for c in cells],
               "runs": [{k: r.get(k) for k in ("method", "lr", "seed", "test_accuracy",
                                               "output_dir")} for r in results]}
    with open(paths["summary"], "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
    plot_bars(cells, paths["plot"], title)
    return paths
