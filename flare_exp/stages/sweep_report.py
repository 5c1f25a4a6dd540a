"""sweep_report stage: one table (CSV, Markdown and a self-contained HTML page) and one PNG for every job of a
sweep directory.

``python launch.py stage=sweep_report sweep_report.sweep_dir=outputs/sweeps/<run_name>``. Each job is
reported with the overrides that vary across the sweep, its status from its own marker (DONE / FAILED /
unfinished: SLURM's "COMPLETED" is not trusted), and its final numbers (rl_summary.json, sft_summary.json).
The report lands in ``<sweep_dir>/report/`` and is regenerated on every run (it only reads the jobs). A sweep run
by the Optuna sweeper also gets study.md / study.png. The report itself is built by flare_exp/reports/sweep.py
(and reports/study.py); this module checks the setting and runs it.
"""
from __future__ import annotations

from pathlib import Path

from flare_exp.reports.sweep import write_sweep_report
from flare_exp.run.stage import Stage
from flare_exp.runtime import abspath


STAGE = Stage(
    name="sweep_report",
    help="the table, plots and Optuna study of a sweep directory",
    record="view",
    reads=("sweep_report.sweep_dir",),
    reads_doc="`sweep_report.sweep_dir`",
    writes_doc="`<sweep_dir>/report/sweep.{csv,md,html,png}`",
)


def check_settings(cfg) -> None:
    if not cfg.sweep_report.sweep_dir:
        raise ValueError("sweep_report.sweep_dir is not set: pass the sweep's directory, "
                         "e.g. sweep_report.sweep_dir=outputs/sweeps/<run_name>")


def run(cfg, out_dir: Path) -> dict:
    check_settings(cfg)
    sweep_dir = abspath(cfg.sweep_report.sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep_report.sweep_dir={sweep_dir} does not exist")
    return write_sweep_report(sweep_dir, cfg.sweep_report.rank_by)
