"""Hydra callbacks (conf/config.yaml, hydra.callbacks): what a sweep says when it ends."""
from __future__ import annotations

import os

from hydra.experimental.callback import Callback


class SweepSummary(Callback):
    """At the end of every sweep (grid or Optuna, local or SLURM): where its jobs are and the command that
    makes its report."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = os.path.normpath(config.hydra.sweep.dir)  # paths.output_root=/x/ would print /x//sweeps
        print(f"\n[flare-exp] sweep finished: jobs in {sweep_dir}/<job>/ (each with DONE or FAILED).\n"
              f"Report: python launch.py stage=sweep_report sweep_report.sweep_dir={sweep_dir}", flush=True)
