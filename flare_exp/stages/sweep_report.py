"""sweep_report stage: one table (CSV + Markdown) and one PNG for every job of a sweep directory.

``python launch.py stage=sweep_report sweep_report.sweep_dir=outputs/sweeps/<run_name>``. Each job is
reported with the overrides that vary across the sweep, its status from its own marker (DONE / FAILED /
unfinished: SLURM's "COMPLETED" is not trusted), and its final numbers (rl_summary.json, sft_summary.json).
The report lands in ``<sweep_dir>/report/`` and is regenerated on every run (it only reads the jobs). A sweep run
by the Optuna sweeper also gets study.md / study.png (flare_exp/optuna_report.py).
"""
from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import yaml

from flare_exp.io import write_text
from flare_exp.runtime import abspath, marker

log = logging.getLogger(__name__)
SUMMARIES = ("rl_summary.json", "sft_summary.json", "metrics_summary.json")


def collect(sweep_dir: Path) -> list[dict]:
    jobs = []
    for job_dir in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()),
                          key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else p.name)):
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
        job = {"job": job_dir.name, "dir": str(job_dir), "status": marker(job_dir) or "unfinished",
               "overrides": dict(o.split("=", 1) for o in overrides if "=" in o), "metrics": {}, "curve": []}
        for sub in ("", "sft", "rl", "eval"):  # a stage's job, or a pipeline job's steps
            for name in SUMMARIES:
                if (job_dir / sub / name).exists():
                    job["metrics"].update(json.loads((job_dir / sub / name).read_text()))
        history = next((p for p in (job_dir / "log_history.json", job_dir / "rl" / "log_history.json") if p.exists()),
                       job_dir / "log_history.json")
        if history.exists():
            job["curve"] = [(h["step"], h["reward"]) for h in json.loads(history.read_text()) if "reward" in h]
        if job["status"] == "FAILED":
            job["error"] = (job_dir / "FAILED").read_text().splitlines()[0][:200]
        jobs.append(job)
    return jobs


def table(jobs: list[dict]) -> tuple[list[str], list[list]]:
    varying = sorted({k for j in jobs for k in j["overrides"]
                      if len({jj["overrides"].get(k) for jj in jobs}) > 1})
    metric_keys = sorted({k for j in jobs for k, v in j["metrics"].items() if isinstance(v, (int, float))},
                         key=lambda k: (k != "reward_last", k))
    header = ["job", "status", *varying, *metric_keys, "error"]
    rows = [[j["job"], j["status"], *(j["overrides"].get(k, "") for k in varying),
             *(j["metrics"].get(k, "") for k in metric_keys), j.get("error", "")] for j in jobs]
    return header, rows


def markdown(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot(jobs: list[dict], header: list[str], path: Path) -> None:
    from flare_exp.plotting import save_png, subplots

    fig, (curves, finals) = subplots(1, 2, figsize=(13, 4.5))
    varying = [h for h in header[2:] if any(h in j["overrides"] for j in jobs)]

    def label(j):
        return f"#{j['job']} " + ", ".join(f"{k.rsplit('.', 1)[-1]}={j['overrides'][k]}" for k in varying
                                         if k in j["overrides"])

    for j in jobs:
        if j["curve"]:
            steps, rewards = zip(*j["curve"])
            status = "" if j["status"] == "DONE" else f" [{j['status']}]"
            curves.plot(steps, rewards, marker=".", label=label(j) + status)
    curves.set(title="reward per step", xlabel="step", ylabel="mean reward")
    if any(j["curve"] for j in jobs):
        curves.legend(fontsize=7)
    colors = {"DONE": "tab:green", "FAILED": "tab:red", "unfinished": "tab:gray"}
    values = [j["metrics"].get("reward_last", 0.0) if j["status"] == "DONE" else 0.0 for j in jobs]
    finals.bar([label(j) for j in jobs], values, color=[colors.get(j["status"], "tab:gray") for j in jobs])
    finals.set(title="final reward (mean of the last quarter; red = failed, grey = unfinished)")
    finals.tick_params(axis="x", rotation=30, labelsize=7)
    save_png(fig, path)


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
    header, rows = table(jobs)
    report = sweep_dir / "report"
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
    write_text(report / "sweep.csv", buf.getvalue())
    write_text(report / "sweep.md", f"# Sweep {sweep_dir.name}\n\n" + markdown(header, rows))
    plot(jobs, header, report / "sweep.png")
    counts = {s: sum(j["status"] == s for j in jobs) for s in ("DONE", "FAILED", "unfinished")}
    log.info("sweep report for %d jobs (%s) in %s\n%s", len(jobs), counts, report, markdown(header, rows))
    summary = {"report_dir": str(report), "jobs": len(jobs), **counts}
    from flare_exp.optuna_search import STUDY_FILE

    if (sweep_dir / STUDY_FILE).exists():  # an Optuna search: the study's own view beside the job table
        from flare_exp.optuna_report import write_study_report

        summary["study"] = write_study_report(sweep_dir, report)
    return summary
