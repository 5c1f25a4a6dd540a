"""sweep_report stage: one table (CSV, Markdown and a self-contained HTML page) and one PNG for every job of a
sweep directory.

``python launch.py stage=sweep_report sweep_report.sweep_dir=outputs/sweeps/<run_name>``. Each job is
reported with the overrides that vary across the sweep, its status from its own marker (DONE / FAILED /
unfinished: SLURM's "COMPLETED" is not trusted), and its final numbers (rl_summary.json, sft_summary.json).
The report lands in ``<sweep_dir>/report/`` and is regenerated on every run (it only reads the jobs). A sweep run
by the Optuna sweeper also gets study.md / study.png (flare_exp/optuna_report.py).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import yaml

from flare_exp.cells import csv_text
from flare_exp.io import NON_FINITE, write_text
from flare_exp.run.layout import FAILED, HYDRA, LOG_HISTORY, METRICS, OVERRIDES, own_or_step, summary_name
from flare_exp.run.record import marker
from flare_exp.run.stage import Stage, declared_stages
from flare_exp.runtime import abspath


STAGE = Stage(
    name="sweep_report",
    help="the table, plots and Optuna study of a sweep directory",
    record="view",
    reads_doc="`sweep_report.sweep_dir`",
    writes_doc="`<sweep_dir>/report/sweep.{csv,md,html,png}`",
)

log = logging.getLogger(__name__)
TRAINED = tuple(name for name, s in declared_stages().items() if s.trains)  # their summaries hold a job's numbers
LOWER_IS_BETTER = ("mean_absolute_error", "loss", "mae", "rmse", "seconds")


def collect(sweep_dir: Path) -> list[dict]:
    jobs = []
    for job_dir in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and (p / HYDRA).is_dir()),
                          key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else p.name)):
        overrides_file = job_dir / HYDRA / OVERRIDES
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
        job = {"job": job_dir.name, "dir": str(job_dir), "status": marker(job_dir) or "unfinished",
               "overrides": dict(o.split("=", 1) for o in overrides if "=" in o), "metrics": {}, "curve": []}
        for sub in ("", *TRAINED):  # a stage's job, or a pipeline job's steps
            for name in map(summary_name, TRAINED):
                if (job_dir / sub / name).exists():
                    job["metrics"].update(json.loads((job_dir / sub / name).read_text()))
        job["metrics"].update(official_metrics(job_dir))
        history = own_or_step(job_dir, LOG_HISTORY, steps=("rl",))
        if history is not None:
            logged = json.loads(history.read_text())
            job["curve"] = [(h["step"], h["reward"]) for h in logged if "reward" in h]
            job["metrics"].update(run_term_means(logged))
        job["metrics"] = {k: NON_FINITE.get(v, v) if isinstance(v, str) else v for k, v in job["metrics"].items()}
        if job["status"] == "FAILED":
            job["error"] = (job_dir / FAILED).read_text().splitlines()[0][:200]
        jobs.append(job)
    return jobs


def official_metrics(job_dir: Path) -> dict:
    """FLARE's official numbers of the job's eval (its first evaluated run), as official/<task>/<metric>."""
    path = own_or_step(job_dir, METRICS)
    if path is None:
        return {}
    results = json.loads(path.read_text())
    first = next(iter(results.values()), {})
    return {f"official/{task}/{k}": v for task, block in first.get("official", {}).items() for k, v in block.items()
            if (isinstance(v, (int, float)) or v in NON_FINITE) and k not in ("num_examples",)}


def run_term_means(history: list[dict]) -> dict:
    """Each reward term's mean over every logged step of the run (the summary's last-quarter mean misses a term
    whose task had no prompt in the last batches)."""
    sums: dict[str, list[float]] = {}
    for h in history:
        for k, v in h.items():
            if k.startswith("reward_term/") and isinstance(v, (int, float)):
                sums.setdefault(k, []).append(v)
    return {k: round(sum(v) / len(v), 4) for k, v in sums.items()}


def varying_keys(jobs: list[dict]) -> list[str]:
    return sorted({k for j in jobs for k in j["overrides"] if len({jj["overrides"].get(k) for jj in jobs}) > 1})


def rank_key(jobs: list[dict], setting: str | None) -> str | None:
    """The metric the jobs are ranked by: sweep_report.rank_by, else the first official metric, else reward_last."""
    known = {k for j in jobs for k in j["metrics"]}
    if setting:
        if setting not in known:
            raise ValueError(f"sweep_report.rank_by={setting}: no job has it; choose one of {', '.join(sorted(known))}")
        return setting
    return next((k for k in sorted(known) if k.startswith("official/")), "reward_last" if "reward_last" in known
                else None)


def lower_is_better(key: str) -> bool:
    return any(part in key for part in LOWER_IS_BETTER)


def reward_caveat(jobs: list[dict], key: str | None) -> str:
    """Said under the ranking when jobs with other reward weights are ranked by their own reward."""
    reward_keys = {k for j in jobs for k in j["overrides"] if k.startswith("reward.")}
    if key != "reward_last" or not any(len({j["overrides"].get(k) for j in jobs}) > 1 for k in reward_keys):
        return ""
    return (" Each job's reward is computed with its own reward weights, so jobs whose weights differ are not "
            "comparable by it: evaluate each job (stage.steps=[rl,infer,eval]) and rank by an official metric.")


def ranks_by(job: dict, key: str | None) -> bool:
    """A finished job with a finite ``key``: a NaN or infinite value (a diverged run) is no score to rank by."""
    value = job["metrics"].get(key)
    return job["status"] == "DONE" and isinstance(value, (int, float)) and math.isfinite(value)


def ranked(jobs: list[dict], key: str | None) -> list[dict]:
    """Finished jobs with a finite ``key`` best first (lowest first for errors), then the others in job order
    (NaN and infinite values among them, shown as they are)."""
    if key is None:
        return jobs
    lower = lower_is_better(key)
    scored = sorted((j for j in jobs if ranks_by(j, key)), key=lambda j: j["metrics"][key] if lower else -j["metrics"][key])
    return scored + [j for j in jobs if j not in scored]


def table(jobs: list[dict], key: str | None = None) -> tuple[list[str], list[list]]:
    varying = varying_keys(jobs)
    metric_keys = sorted({k for j in jobs for k, v in j["metrics"].items() if isinstance(v, (int, float))},
                         key=lambda k: (k != key, not k.startswith("official/"), k != "reward_last", k))
    header = ["rank", "job", "status", *varying, *metric_keys, "error"]
    rows = [[i + 1 if key and ranks_by(j, key) else "", j["job"], j["status"],
             *(j["overrides"].get(k, "") for k in varying), *(j["metrics"].get(k, "") for k in metric_keys),
             j.get("error", "")] for i, j in enumerate(ranked(jobs, key))]
    return header, rows


def markdown(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1] if "/" not in key else key.split("/", 1)[-1]


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
        return f"#{j['job']} " + ", ".join(f"{_short(k)}={j['overrides'][k]}" for k in varying if k in j["overrides"])

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
        finals.set(title=f"{key or 'no metric'} per job (red = failed, grey = unfinished)")
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
    ax.set(xlabel=_short(keys[0]), ylabel=_short(keys[1]), title=metric)
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
    ax.set(xlabel=_short(key), ylabel=metric, title=f"{metric} (mean, 95% interval where jobs repeat a value)")


def write_html(path: Path, title: str, ranking: str, header: list[str], rows: list[list], figure: Path) -> None:
    """sweep.html: the table (numbers with four decimals, right-aligned) and the figure, in one self-contained
    page like the eval report."""
    from flare_exp.metrics.report_page import Block, to_html

    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    blocks = [Block("table", header=header, items=[[cell(v) for v in row] for row in rows]),
              Block("figure", "the sweep's rewards and ranking metric", png=figure.read_bytes())]
    write_text(path, to_html(title, ranking or "unranked (no common metric)", blocks))


def run(cfg, out_dir: Path) -> dict:
    if not cfg.sweep_report.sweep_dir:
        raise ValueError("sweep_report.sweep_dir is not set: pass the sweep's directory, "
                         "e.g. sweep_report.sweep_dir=outputs/sweeps/<run_name>")
    sweep_dir = abspath(cfg.sweep_report.sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep_report.sweep_dir={sweep_dir} does not exist")
    jobs = collect(sweep_dir)
    if not jobs:
        raise ValueError(f"{sweep_dir}: no job directories (with .hydra/) found")
    key = rank_key(jobs, cfg.sweep_report.rank_by)
    header, rows = table(jobs, key)
    report = sweep_dir / "report"
    write_text(report / "sweep.csv", csv_text(header, rows))  # no cell a spreadsheet would run
    ranking = (f"Ranked by {key} ({'lowest' if lower_is_better(key) else 'highest'} first; sweep_report.rank_by "
               f"chooses).{reward_caveat(jobs, key)}\n\n") if key else ""
    write_text(report / "sweep.md", f"# Sweep {sweep_dir.name}\n\n{ranking}" + markdown(header, rows))
    plot(jobs, key, report / "sweep.png")
    write_html(report / "sweep.html", f"Sweep {sweep_dir.name}", ranking.strip(), header, rows, report / "sweep.png")
    counts = {s: sum(j["status"] == s for j in jobs) for s in ("DONE", "FAILED", "unfinished")}
    log.info("sweep report for %d jobs (%s) in %s\n%s", len(jobs), counts, report, markdown(header, rows))
    summary = {"report_dir": str(report), "jobs": len(jobs), **counts}
    from flare_exp.optuna_search import STUDY_FILE

    if (sweep_dir / STUDY_FILE).exists():  # an Optuna search: the study's own view beside the job table
        from flare_exp.optuna_report import write_study_report

        summary["study"] = write_study_report(sweep_dir, report)
    return summary
