"""sweep.png: the reward per step of every job of a sweep, and the ranking metric against the swept keys."""
from __future__ import annotations

from pathlib import Path

from flare_exp.reports.sweep_jobs import ranks_by, varying_keys
from flare_exp.reports.tables import short_number


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1] if "/" not in key else key.split("/", 1)[-1]


def _title(text: str) -> str:
    """A panel title wrapped to the panel's width (an official metric's name with its caption ran off the
    figure's right edge)."""
    import textwrap

    return textwrap.fill(text, 60)


def _numeric(values) -> bool:
    try:
        [float(v) for v in values]
    except (TypeError, ValueError):
        return False
    return True


def plot(jobs: list[dict], key: str | None, path: Path) -> None:
    """Left: the reward per step of every job. Right: the ranking metric against the swept keys: a heatmap for
    two numeric keys, a line (mean and 95% interval over the jobs sharing a value) for one, else bars."""
    from flare_exp.plotting import save_png, subplots

    fig, (curves, finals) = subplots(1, 2, figsize=(13, 4.5))
    varying = varying_keys(jobs)

    def label(j):
        return f"#{j['job']} " + ", ".join(f"{_short(k)}={short_number(j['overrides'][k])}" for k in varying
                                           if k in j["overrides"])

    for j in jobs:
        if j["curve"]:
            steps, rewards = zip(*j["curve"])
            status = "" if j["status"] == "DONE" else f" [{j['status']}]"
            curves.plot(steps, rewards, marker=".", label=label(j) + status)
    curves.set(title="reward per step", xlabel="step", ylabel="mean reward")
    if any(j["curve"] for j in jobs):
        curves.legend(fontsize=7)
    done = [j for j in jobs if ranks_by(j, key)]
    swept = [k for k in varying if _numeric(j["overrides"].get(k) for j in done)]
    if key and len(varying) == 2 and len(swept) == 2 and done:
        _heatmap(fig, finals, done, swept, key)
    elif key and len(varying) == 1 and swept and done:
        _line(finals, done, swept[0], key)
    else:
        colors = {"DONE": "tab:green", "FAILED": "tab:red", "unfinished": "tab:gray"}
        values = [j["metrics"][key] if key and ranks_by(j, key) else 0.0 for j in jobs]
        finals.bar([label(j) for j in jobs], values, color=[colors.get(j["status"], "tab:gray") for j in jobs])
        finals.set(title=_title(f"{key or 'no metric'} per job (red = failed, grey = unfinished)"))
        finals.tick_params(axis="x", rotation=30, labelsize=7)
    save_png(fig, path)


def _heatmap(fig, ax, jobs: list[dict], keys: list[str], metric: str) -> None:
    import numpy as np

    xs = sorted({float(j["overrides"][keys[0]]) for j in jobs})
    ys = sorted({float(j["overrides"][keys[1]]) for j in jobs})
    grid = np.full((len(ys), len(xs)), np.nan)
    for j in jobs:
        grid[ys.index(float(j["overrides"][keys[1]])), xs.index(float(j["overrides"][keys[0]]))] = j["metrics"][metric]
    image = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
    for (r, c), v in np.ndenumerate(grid):
        ax.text(c, r, "n/a" if np.isnan(v) else f"{v:.3g}", ha="center", va="center", color="white", fontsize=8)
    ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
    ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
    ax.set(xlabel=_short(keys[0]), ylabel=_short(keys[1]), title=_title(metric))
    fig.colorbar(image, ax=ax)


def _line(ax, jobs: list[dict], key: str, metric: str) -> None:
    import statistics

    by_value: dict[float, list[float]] = {}
    for j in jobs:
        by_value.setdefault(float(j["overrides"][key]), []).append(j["metrics"][metric])
    xs = sorted(by_value)
    means = [statistics.fmean(by_value[x]) for x in xs]
    half = [1.96 * statistics.stdev(by_value[x]) / len(by_value[x]) ** 0.5 if len(by_value[x]) > 1 else 0.0
            for x in xs]
    ax.errorbar(xs, means, yerr=half, marker="o", capsize=3)
    ax.set(xlabel=_short(key), ylabel=metric, title=_title(f"{metric} (mean, 95% interval where jobs repeat a value)"))
