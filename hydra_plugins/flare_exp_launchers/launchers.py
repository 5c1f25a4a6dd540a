"""``hydra/launcher=watched`` (the default: jobs one after another in this process), ``local`` and ``slurm``
(conf/hydra/launcher/): Hydra's basic and submitit launchers with flare-exp's sweep checks and watch around them
(flare_exp/sweep_checks.py, sweep_dir.py, sweep_watch.py, sweep_stop.py): every job's settings checked before any
is launched, a line per finished job with an ETA, the failed jobs named (a submitit job whose worker was killed among
them); locally, SIGTERM / SIGINT stop the workers too, and SIGTERM stops the watched launcher's in-process job as
Ctrl-C does (its dir says FAILED).
Hydra imports this module at startup: the work is imported when a sweep launches."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher, LocalLauncher, SlurmLauncher


class _Watched:
    def setup(self, *, hydra_context, task_function, config) -> None:
        from flare_exp.sweep_dir import SweepRecord, lock_sweep

        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        # before the lock and the sweeper's multirun.yaml: put back if the sweep is refused unlaunched
        self._record, self._launched, self._recorded = SweepRecord(config), False, False
        lock_sweep(config)  # another live sweep into this dir: refused here, before Hydra writes in it

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        from contextlib import nullcontext

        from flare_exp.optuna_study import objective_list
        from flare_exp.sweep_checks import SweepSettingsError, check_jobs
        from flare_exp.sweep_launch import job_names, record_launch
        from flare_exp.sweep_dir import job_dirs as dirs_of
        from flare_exp.sweep_stop import ForwardStops, StopInProcess
        from flare_exp.sweep_watch import Progress, exit_with, record_results, results_per_job

        try:
            # the basic launcher numbers its jobs' ids itself; submitit's come with the submission
            job_dirs = dirs_of(self.hydra_context, self.config, job_overrides, initial_job_idx,
                               ids_known=isinstance(self, BasicLauncher))
            kept = check_jobs(self.hydra_context, self.config, job_overrides, initial_job_idx, job_dirs)
        except (SweepSettingsError, SystemExit) as e:
            if not getattr(self, "_launched", True):  # nothing of this sweep ran: its record was never true
                self._record.restore()
            if isinstance(e, SystemExit):
                raise
            exit_with(str(e), 2)
        self._launched = True
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        search = "optuna" in str(self.config.hydra.sweeper.get("_target_", ""))
        if not search:  # which jobs this launch made: the sweep report tells an earlier launch's others apart
            record_launch(sweep_dir, job_overrides, initial_job_idx, first=not getattr(self, "_recorded", False),
                          kept=set(kept), job_dirs=job_dirs)
            self._recorded = True
        objectives = objective_list(self.config.hydra.sweeper.get("objectives")) if search else None
        with Progress(job_dirs, job_names(job_overrides), kept=kept, objectives=objectives,
                      first=initial_job_idx) as progress:
            stops = ForwardStops(job_dirs=job_dirs, trials=search) if getattr(self, "_EXECUTOR", "") == "local" \
                else StopInProcess(job_dirs, trials=search) if isinstance(self, BasicLauncher) else nullcontext()
            # submitit's jobs: one whose worker died (kill -9, the OOM killer) is a failed job, not the sweep's end
            per_job = results_per_job() if isinstance(self, BaseSubmititLauncher) else nullcontext()
            with stops, per_job:
                returns = super().launch(job_overrides, initial_job_idx)
        failed = record_results(progress, returns)
        if failed and not search:
            # a grid sweep ends here, non-zero (Hydra's own sweeper would raise the first failure's traceback);
            # an Optuna search tells the study and names its failed trials at its end
            exit_with(f"sweep {sweep_dir}: {len(failed)} of {len(returns)} job(s) failed. Report: python launch.py "
                      f"stage=sweep_report sweep_report.sweep_dir={sweep_dir}")
        return returns


class WatchedBasicLauncher(_Watched, BasicLauncher):
    pass


class WatchedLocalLauncher(_Watched, LocalLauncher):
    pass


class WatchedSlurmLauncher(_Watched, SlurmLauncher):
    pass
