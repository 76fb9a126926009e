"""The results of `lorafit sweep` and `lorafit tune`, written one way: results.csv, results.md and pareto.png.

A row is a dict with at least ``trainable`` and ``eval_loss`` (None when there is none); ``state`` ("complete",
"pruned", "failed"; absent: complete), ``mark`` ("suggested", "probed"), ``pareto`` (on the front) and ``mean`` /
``std`` (seeded re-runs) are used where present. The caller names its CSV columns and its Markdown ``Column``s;
the order (best eval loss first, complete rows before the others), the atomic writes and the plot are the same
for both commands.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..files import write_figure, write_text

# marker, face color, size of a marked configuration in pareto.png
MARKS = {"suggested": ("*", "#ff7f0e", 260), "probed": ("D", "#2ca02c", 110), "best": ("o", "none", 300)}
# color and legend label of the plain points, by row state (sweep's rows have none)
STATES = {None: ("#2a7ab0", "grid point"), "complete": ("#2a7ab0", "complete"),
          "pruned": ("#bbbbbb", "pruned (last eval)")}


@dataclass(frozen=True)
class Column:
    """One column of results.md: its header, its cell text for a row, and its alignment ("---", "---:", ":---:")."""

    header: str
    cell: Callable[[dict], str]
    align: str = "---"


def number(value, fmt: str = ".4f") -> str:
    """A table cell for a number that may be missing ("-")."""
    return "-" if value is None else format(value, fmt)


def with_mark(name: str, row: dict) -> str:
    """``name`` followed by the row's mark, e.g. "r8-qv-lora (suggested)"."""
    return name + (f" ({row['mark']})" if row.get("mark") else "")


def pareto_front(rows: list[dict], key: str = "name") -> set:
    """``key`` of the rows no other row beats on both trainable parameters (fewer) and eval loss (lower)."""
    front, best = set(), float("inf")
    for row in sorted((r for r in rows if r["eval_loss"] is not None), key=lambda r: (r["trainable"], r["eval_loss"])):
        if row["eval_loss"] < best:
            front.add(row[key])
            best = row["eval_loss"]
    return front


def _order(row: dict) -> tuple:
    """Complete rows first, then by eval loss (missing last)."""
    loss = row.get("eval_loss")
    return row.get("state", "complete") != "complete", loss is None, loss or 0.0


def markdown(rows: list[dict], table: Sequence[Column]) -> str:
    """The rows as a Markdown table of ``table``'s columns, best eval loss first ('|' in a cell becomes '/')."""
    lines = ["| " + " | ".join(c.header for c in table) + " |", "|" + "|".join(c.align for c in table) + "|"]
    for row in sorted(rows, key=_order):
        lines.append("| " + " | ".join(c.cell(row).replace("|", "/") for c in table) + " |")
    return "\n".join(lines)


def csv_text(rows: list[dict], columns: Sequence[str]) -> str:
    """The rows as CSV with a header of ``columns`` (other keys are left out), in the rows' order."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_results(rows: list[dict], out: Path, *, columns: Sequence[str], table: Sequence[Column], title: str,
                  best: Optional[dict] = None, label: Optional[Callable[[dict], str]] = None) -> list[Path]:
    """results.csv (``columns``), results.md (``table``) and pareto.png (see ``plot_pareto``) in ``out``, each
    replaced atomically; returns their paths."""
    out = Path(out)
    write_text(out / "results.csv", csv_text(rows, columns))
    write_text(out / "results.md", markdown(rows, table) + "\n")
    plot_pareto(rows, out / "pareto.png", title=title, best=best, label=label)
    return [out / "results.csv", out / "results.md", out / "pareto.png"]


def pyplot():
    """matplotlib.pyplot without a display (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_pareto(rows: list[dict], path: Path, *, title: str, best: Optional[dict] = None,
                label: Optional[Callable[[dict], str]] = None) -> Path:
    """Eval loss against trainable parameters (log x): the points by state, the Pareto front (rows with
    ``pareto``) as a step line, seeded means with ±std bars, the suggested / probed rows and ``best`` marked, and
    ``label(row)`` beside each point when given. Written atomically."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    try:
        shown = [r for r in rows if r.get("eval_loss") is not None and r.get("trainable")]
        _points(ax, shown, label)
        for r in (r for r in rows if r.get("std") is not None and math.isfinite(r["std"])):
            ax.errorbar([r["trainable"]], [r["mean"]], yerr=[r["std"]], fmt="_", color="k", capsize=4, zorder=4)
        _marks(ax, shown, best)
        _clip_losses(ax, shown)
        if shown:
            ax.set_xscale("log")
        else:
            ax.text(0.5, 0.5, "nothing has an eval loss yet", ha="center", va="center", transform=ax.transAxes)
        ax.set(xlabel="trainable parameters", ylabel="eval loss", title=title)
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        write_figure(path, fig)
    finally:
        plt.close(fig)
    return Path(path)


def _points(ax, shown: list[dict], label: Optional[Callable[[dict], str]]) -> None:
    """The plain points, one color per state, the Pareto front's step line and the labels."""
    for state, (color, name) in STATES.items():
        pts = [r for r in shown if r.get("state") == state]
        if pts:
            ax.scatter([r["trainable"] for r in pts], [r["eval_loss"] for r in pts], s=26, color=color, zorder=3,
                       label=name)
    front = sorted((r for r in shown if r.get("pareto")), key=lambda r: r["trainable"])
    if front:
        ax.step([r["trainable"] for r in front], [r["eval_loss"] for r in front], where="post", color="#d62728",
                lw=1.5, label="Pareto front", zorder=2)
    for r in shown if label is not None else ():
        ax.annotate(label(r), (r["trainable"], r["eval_loss"]), fontsize=7, xytext=(4, 3), textcoords="offset points")


def loss_limits(shown: list[dict]) -> Optional[tuple[float, float, list[dict]]]:
    """(low, high, the rows above high) of the loss axis: the completed rows' range with a margin, when a trial
    pruned at a far higher loss would squeeze them into less than half of the axis; else None (matplotlib's own)."""
    done = [r["eval_loss"] for r in shown if r.get("state") in (None, "complete")]
    if not done:
        return None
    low, high = min(r["eval_loss"] for r in shown), max(done)
    if max(r["eval_loss"] for r in shown) - low <= 2 * (high - low) + 1e-12:
        return None
    margin = 0.15 * (high - low) or 0.05 * abs(high) or 0.05
    top = high + 2 * margin
    return low - margin, top, [r for r in shown if r["eval_loss"] > top]


def _clip_losses(ax, shown: list[dict]) -> None:
    """The loss axis clipped to the completed rows (``loss_limits``); the rows beyond it drawn at the top edge as
    upward triangles, each with its loss."""
    limits = loss_limits(shown)
    if limits is None:
        return
    low, high, above = limits
    ax.set_ylim(low, high)
    edge = high - 0.02 * (high - low)
    ax.scatter([r["trainable"] for r in above], [edge] * len(above), marker="^", s=40, color="#888888", zorder=4,
               label="beyond the axis (loss shown)")
    for r in above:
        ax.annotate(f"{r['eval_loss']:.3g}", (r["trainable"], edge), fontsize=7, xytext=(4, -10),
                    textcoords="offset points", color="#555555")


def _marks(ax, shown: list[dict], best: Optional[dict]) -> None:
    """The suggested / probed rows and the best one (at its seeded mean where it has one)."""
    marked = [(r, r["mark"]) for r in shown if r.get("mark") in MARKS]
    if best is not None:
        marked.append((best, "best"))
    for r, mark in marked:
        marker, color, size = MARKS[mark]
        y = r["mean"] if mark == "best" and r.get("mean") is not None else r["eval_loss"]
        ax.scatter([r["trainable"]], [y], marker=marker, s=size, color=color, zorder=5,
                   edgecolor="#d62728" if mark == "best" else "k", linewidths=2 if mark == "best" else 1, label=mark)
