"""The sweep report: one table of every job of a sweep dir (sweep.csv, sweep.md, a self-contained sweep.html)
and sweep.png in <sweep_dir>/report/, with the study's own view beside it for an Optuna search."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from flare_exp.cells import csv_text
from flare_exp.io import write_text
from flare_exp.reports.study import RETRIED, retried_trials
from flare_exp.reports.sweep_figure import plot
from flare_exp.reports.sweep_jobs import collect, lower_is_better, rank_key, ranked, ranks_by, reward_caveat, \
    tie_breakers, varying_keys
from flare_exp.reports.tables import md_table, short_number

log = logging.getLogger(__name__)
WINDOWS = ("reward_last, reward_std, rewards/* and reward_term/*: means over the last quarter of each job's logged "
           "steps (as its rl_summary.json; a term whose task had no prompt there is empty); reward_term_all/*: means "
           "over all its logged steps.")


def table(jobs: list[dict], key: str | None = None) -> tuple[list[str], list[list]]:
    varying = varying_keys(jobs)
    # a reward term null in every job's last quarter keeps its (empty) column: WINDOWS says why it is empty
    metric_keys = sorted({k for j in jobs for k, v in j["metrics"].items()
                          if isinstance(v, (int, float)) or (v is None and k.startswith("reward_term/"))},
                         key=lambda k: (k != key, not k.startswith("official/"), k != "reward_last", k))
    header = ["rank", "job", "status", *varying, *metric_keys, "error"]
    rows = [[i + 1 if key and ranks_by(j, key) else "", j["job"],
             j["status"] + (f" ({j['stopped_early']})" if j.get("stopped_early") else ""),
             *(j["overrides"].get(k, "") for k in varying),
             *("" if j["metrics"].get(k) is None else j["metrics"][k] for k in metric_keys),
             j.get("error", "")] for i, j in enumerate(ranked(jobs, key))]
    return header, rows


def write_html(path: Path, title: str, ranking: str, header: list[str], rows: list[list], figure: Path) -> None:
    """sweep.html: the table (numbers with four decimals, right-aligned) and the figure, in one self-contained
    page like the eval report."""
    from flare_exp.reports.page import Block, to_html

    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else short_number(v)  # noqa: E731
    blocks = [Block("table", header=header, items=[[cell(v) for v in row] for row in rows]),
              Block("figure", "the sweep's rewards and ranking metric", png=figure.read_bytes())]
    write_text(path, to_html(title, ranking or "unranked (no common metric)", blocks))


def markdown(header: list[str], rows: list[list]) -> str:
    return "\n".join(md_table(header, rows, cell=short_number))


def mark_search_trials(sweep_dir: Path, jobs: list[dict]) -> str | None:
    """An Optuna search's job dirs as its study knows them: a trial a killed search left running is retried
    under a new number by the rerun, so its dir, never resumed, says so instead of 'unfinished'. Returns the
    search's first objective that the jobs report (official/<task>/<metric>), which ranks them."""
    from flare_exp.optuna_study import STUDY_FILE

    retried = retried_trials(sweep_dir)
    for job in jobs:
        if job["job"] in retried and job["status"] != "DONE":
            job["status"] = RETRIED
    try:
        info = json.loads((sweep_dir / STUDY_FILE).read_text())
    except (OSError, ValueError):  # a study file cut or edited: the job table alone, as for a grid
        return None
    objectives = info.get("objectives") if isinstance(info, dict) else None
    known = {k for j in jobs for k in j["metrics"]}
    return next((key for name in objectives or [] if isinstance(name, str)
                 and (key := "official/" + name.replace(".", "/", 1)) in known), None)


def write_sweep_report(sweep_dir: Path, rank_by: str | None) -> dict:
    """Every job of ``sweep_dir`` ranked by ``rank_by`` (else the first official metric, else reward_last), written
    to <sweep_dir>/report/ (regenerated on every call: it only reads the jobs); the summary of what was found."""
    from flare_exp.optuna_study import STUDY_FILE

    jobs = collect(sweep_dir)
    if not jobs:
        one_run = (sweep_dir / ".hydra").is_dir() or (sweep_dir / "run_info.json").is_file()
        raise ValueError(f"sweep_report.sweep_dir={sweep_dir}: " + (
            "that is one run's dir, not a sweep's" if one_run else "no job directories (0/, 1/, ... or those a custom hydra.sweep.subdir named, with .hydra/)")
            + ": a sweep (python launch.py -m ...) writes its jobs into <paths.output_root>/sweeps/<run_name>/; "
            "pass that dir")
    search = (sweep_dir / STUDY_FILE).exists()  # an Optuna search: its objective ranks, its retried trials said
    objective = mark_search_trials(sweep_dir, jobs) if search else None
    key = rank_key(jobs, rank_by or objective)
    header, rows = table(jobs, key)
    report = sweep_dir / "report"
    write_text(report / "sweep.csv", csv_text(header, rows))  # no cell a spreadsheet would run
    ties = ", ".join(tie_breakers(jobs, key))
    chooser = ("the search's objective; sweep_report.rank_by chooses another" if objective and key == objective
               and not rank_by else "sweep_report.rank_by chooses")
    ranking = (f"Ranked by {key} ({'lowest' if lower_is_better(key) else 'highest'} first; {chooser})"
               f"{f'; equal ones by {ties} in turn' if ties else ''}."
               f"{reward_caveat(jobs, key)}\n\n") if key else ""
    if any(k.startswith(("reward_term/", "reward_term_all/")) for k in header):  # two windows: said which is which
        ranking += (f"{WINDOWS}\n\n")
    earlier = [j["job"] for j in jobs if j.get("earlier_launch")]
    if earlier:
        ranking += (f"Job(s) {', '.join(earlier)}: made by an earlier launch into this sweep dir, not by the latest "
                    "(its .launch.json): listed, not ranked.\n\n")
    write_text(report / "sweep.md", f"# Sweep {sweep_dir.name}\n\n{ranking}" + markdown(header, rows))
    plot(jobs, key, report / "sweep.png")
    write_html(report / "sweep.html", f"Sweep {sweep_dir.name}", ranking.strip(), header, rows, report / "sweep.png")
    counts = {s: sum(j["status"] == s for j in jobs) for s in ("DONE", "FAILED", "unfinished", RETRIED)}
    counts["earlier launch"] = len(earlier)
    log.info("sweep report for %d jobs (%s) in %s\n%s", len(jobs), counts, report, markdown(header, rows))
    summary = {"report_dir": str(report), "jobs": len(jobs), **counts}
    if search:  # the study's own view beside the job table
        from flare_exp.reports.study import write_study_report

        summary["study"] = write_study_report(sweep_dir, report)
    return summary
