"""metrics.png: one panel per official FLARE metric (one per task type, what the leaderboard shows), the runs
side by side with their 95% bootstrap intervals. Every run gets a visible bar and a value label, also at 0, at
infinity and where there is no number, so that a reader never wonders whether a run is missing."""
from __future__ import annotations

import math
from pathlib import Path

from flare_exp.metrics.official import FLARE_TASK_TYPE, LOWER_IS_BETTER, OFFICIAL_METRIC

STUB = 0.012  # a bar at 0 (or with no number) is drawn this fraction of the axis high, so it shows
FONT = 11  # points: read at 100% next to the report's text


def grid(panels: int) -> tuple[int, int]:
    """(rows, columns) with no empty slot for up to four panels; a 2 x 2 square for four."""
    if panels <= 3:
        return 1, max(panels, 1)
    columns = 2 if panels == 4 else 3
    return math.ceil(panels / columns), columns


def value_label(metric: str, value) -> str:
    if value is None:
        return "no number"
    if not math.isfinite(value):
        return "infinite" if metric in LOWER_IS_BETTER else "n/a"
    return f"{value:.4f}"


def missing_note(metric: str, values: list) -> str | None:
    """Why no run has a number to draw, and where to look (a judge not configured)."""
    if all(v is None for v in values):
        return "not computed" + ("\nno GREEN judge\n(eval.green.model_path)" if metric == "green_score" else "")
    return None  # an infinite error has its own hatched bar and label


def panel(ax, title: str, metric: str, labels: list[str], values: list, errors: list | None) -> None:
    """One metric, one bar per run; bounded metrics on a fixed 0-1 axis, errors (lower is better) from 0."""
    lower = metric in LOWER_IS_BETTER
    finite = [v for v in values if v is not None and math.isfinite(v)]
    top = 1.0 if not lower else max([*finite, *(e[1] for e in errors or [] if e)], default=0.0) or 1.0
    ax.set_ylim(0, top * 1.18)
    ax.set_xlim(-0.8, len(labels) - 0.2)
    for i, (label, value) in enumerate(zip(labels, values)):
        real = value is not None and math.isfinite(value)
        infinite = value is not None and not real and lower  # as bad as it gets: a hatched bar to the top
        height = top * 1.05 if infinite else max(value if real else 0.0, STUB * top)
        ax.bar(i, height, width=0.6, color=f"C{i % 10}" if real else "white", edgecolor=f"C{i % 10}", linewidth=1.2,
               hatch=None if real else "///")
        error = (errors or [None] * len(values))[i]
        if error and real:
            ax.errorbar(i, value, yerr=[[max(value - error[0], 0)], [max(error[1] - value, 0)]], color="black",
                        capsize=4, lw=1)
        ax.annotate(value_label(metric, value), (i, max(height, error[1] if error and real else 0)),
                    xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=FONT - 1)
    note = missing_note(metric, values)
    if note:
        ax.text(0.5, 0.55, note, ha="center", va="center", fontsize=FONT - 1, color="#555", transform=ax.transAxes)
    ax.set_title(f"{title}\n{metric}" + (" (lower is better)" if lower else ""), fontsize=FONT)
    ax.set_xticks(range(len(labels)), [wrapped(label) for label in labels], rotation=15 if len(labels) > 2 else 0,
                  ha="right" if len(labels) > 2 else "center", fontsize=FONT - 1)
    ax.tick_params(axis="y", labelsize=FONT - 1)
    ax.spines[["top", "right"]].set_visible(False)


def wrapped(label: str, width: int = 22) -> str:
    """A run's label in lines of about ``width`` characters, broken after a space or a "/" (two long labels side by
    side under a panel overlapped)."""
    import re

    lines = [""]
    for piece in re.findall(r"[^ /]*[ /]?", label):
        if lines[-1] and len(lines[-1]) + len(piece.rstrip()) > width:
            lines.append("")
        lines[-1] += piece
    return "\n".join(line.rstrip() for line in lines if line.strip())


def plot(path: Path, results: dict, intervals: dict) -> None:
    """``results``: label -> eval result (its ``official`` blocks); ``intervals``: label -> task -> 95% interval."""
    from flare_exp.plotting import save_png, subplots

    labels = list(results)
    tasks = sorted({t for r in results.values() for t in r["official"]})
    rows, columns = grid(len(tasks))
    fig, axes = subplots(rows, columns, figsize=(8.7, 2.9 * rows + 0.6), squeeze=False)
    for ax in axes.flat[len(tasks):]:
        fig.delaxes(ax)  # no empty slot
    for ax, task in zip(axes.flat, tasks):
        metric = OFFICIAL_METRIC[task]
        panel(ax, FLARE_TASK_TYPE[task], metric, labels,
              [results[lab]["official"].get(task, {}).get(metric) for lab in labels],
              [intervals.get(lab, {}).get(task) for lab in labels])
    sizes = sorted({r.get("n") for r in results.values() if r.get("n")})
    fig.suptitle("FLARE official metrics" + (f" (n = {', '.join(map(str, sizes))})" if sizes else "") +
                 ", error bars: 95% bootstrap intervals", fontsize=FONT + 2)
    save_png(fig, path)
