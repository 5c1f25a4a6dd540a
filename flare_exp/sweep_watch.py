"""What flare-exp's sweep launchers (hydra_plugins/flare_exp_launchers) add to Hydra's submitit launchers:

- every job's settings and dir are checked before any job is launched (flare_exp/sweep_checks.py);
- one line per finished job (its number, overrides, DONE/FAILED, duration, headline metric or an Optuna
  search's objectives) and an ETA; a relaunched sweep's jobs that keep their finished run said as it starts;
- the failed jobs named at the end (the sweep exits non-zero), a job whose worker died without a traceback
  (kill -9, the OOM killer) among them: submitit's error for it would have ended the sweep unreported;
- SIGTERM and SIGINT forwarded to the local workers (flare_exp/sweep_stop.py).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

# job dir -> why it failed, for every job (or Optuna trial) of this sweep process that failed
FAILURES: dict[str, str] = {}


def exit_with(message: str, code: int = 1) -> None:
    """End the sweep with ``message`` and no traceback (Hydra prints one for an error raised in a launcher)."""
    say(message)
    raise SystemExit(code)


def say(text: str) -> None:
    """One line on stderr, never inside a job's progress bar (a local sweep runs its jobs in this process)."""
    from flare_exp.logs import BarSafeStream

    BarSafeStream(sys.stderr).write(f"[flare-exp sweep] {text}\n")
    sys.stderr.flush()


KEPT = "DONE (finished before this launch: kept)"


class Progress:
    """Watches the jobs' dirs for their DONE / FAILED markers (a thread) and prints one line per finished job
    with an ETA from the rate so far. The jobs whose dir holds a run they keep (``kept``: index -> the name to
    show, sweep_checks.kept_name) are said as the launch starts, once: a relaunched sweep does not leave them
    unsaid until its last job ends."""

    def __init__(self, job_dirs: list[Path], names: list[str], poll_s: float = 1.0, kept: dict | None = None,
                 objectives: list[str] | None = None, first: int | None = None):
        self.job_dirs, self.names, self.poll_s = job_dirs, list(names), poll_s
        # each job's number (hydra.job.num): its dir's name, unless a custom hydra.sweep.subdir names it otherwise
        self.numbers = [str(first + i) if first is not None else d.name for i, d in enumerate(job_dirs)]
        self.objectives = objectives  # an Optuna search's: each job's line shows them, not the headline metric
        self.kept = dict(kept or {})
        for i, name in self.kept.items():
            self.names[i] = name
        self.start = time.time()
        self.reported: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "Progress":
        runs = len(self.job_dirs) - len(self.kept)
        kept = f", {len(self.kept)} kept from an earlier launch" if self.kept else ""
        parents = {d.parent for d in self.job_dirs}
        where = f"{parents.pop()}/<job>/" if len(parents) == 1 else \
            f"{os.path.commonpath([str(d) for d in self.job_dirs])}/ (hydra.sweep.subdir names each job's dir)"
        say(f"{runs} job(s) launched{kept}: {where} (a line per finished job follows)")
        for i in self.kept:
            self.finished(i, KEPT)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def poll(self) -> None:
        from flare_exp.run.record import marker

        for i, job_dir in enumerate(self.job_dirs):
            found = marker(job_dir)
            if i not in self.reported and found and (job_dir / found).stat().st_mtime >= self.start - 1:
                self.finished(i, found)

    def finished(self, i: int, status: str, why: str | None = None) -> None:
        from flare_exp.run.record import was_stopped

        if i in self.reported:
            return
        self.reported[i] = status
        row = self.summary(i, status)
        seconds = row["seconds"] if row and row.get("seconds") is not None else time.time() - self.start
        shown = self.objective_values(i) if row and self.objectives else row and row.get("headline")
        headline = f", {shown}" if shown else ""
        reason = why or (row or {}).get("error")
        if not why and row and status == "FAILED":  # the table's 200 characters would cut a stop's what-next
            reason = failed_line(self.job_dirs[i]) or reason
        done, total = len(self.reported), len(self.job_dirs)
        left, ran = total - done, done - len(self.kept)  # the rate: the jobs run in this launch, not the kept
        elapsed = time.time() - self.start
        stopped = was_stopped(reason)
        timed = left and ran > 0 and not stopped  # a stop (the sweep's, mostly) ends the rate's meaning
        ended = "all ended" if stopped else "all finished"  # a stopped job did not finish
        eta = f"{left} left, ETA ~{elapsed / ran * left:.0f} s" if timed else f"{left} left" if left else ended
        shown_status = status
        if status == "DONE":  # the reward-hacking alarm's or the pruner's stop: not all its steps
            from flare_exp.catalog import stopped_early

            early = stopped_early(self.job_dirs[i])
            shown_status = f"DONE ({early})" if early else status
        say(f"{done}/{total} #{self.numbers[i]} ({self.names[i]}) {shown_status} in {seconds:.0f} s{headline}"
            f"{f': {reason}' if status != 'DONE' and reason else ''} | {eta}")

    def objective_values(self, i: int) -> str | None:
        """The search's objectives as the job's own model scored them (what the study records), None without an
        eval's metrics."""
        import json

        from flare_exp.catalog import metrics_file, own_block
        from flare_exp.optuna_study import objective_value
        from flare_exp.reports.tables import fmt

        path = metrics_file(self.job_dirs[i])
        try:
            block = own_block(json.loads(path.read_text()), self.job_dirs[i]) if path else {}
        except (OSError, ValueError):
            return None
        values = {o: objective_value(block, o) for o in self.objectives} if isinstance(block, dict) else {}
        return ", ".join(f"{o}={fmt(v)}" for o, v in values.items()) if values else None

    def written_now(self, i: int, status: str) -> bool:
        """The job's dir holds the ``status`` marker, written during this launch (not an earlier attempt's)."""
        path = self.job_dirs[i] / status
        try:
            return path.stat().st_mtime >= self.start - 1
        except OSError:
            return False

    def summary(self, i: int, status: str) -> dict | None:
        """The job dir's summary (duration, metric, error) when its marker is this launch's ``status``, or the
        run the job keeps; None otherwise: a job refused before it started leaves the dir's earlier run, whose
        metric is not its own."""
        from flare_exp.catalog import run_summary
        from flare_exp.run.record import marker

        own = status == KEPT or marker(self.job_dirs[i]) == status and self.written_now(i, status)
        return run_summary(self.job_dirs[i]) if own else None


def failed_line(job_dir: Path, limit: int = 600) -> str | None:
    """The first line of a job's FAILED (why it failed, a stop's what-next with it), up to ``limit`` characters."""
    from flare_exp.run.layout import FAILED

    try:
        text = (job_dir / FAILED).read_text(errors="replace")
    except OSError:
        return None
    return next((line.strip() for line in text.splitlines() if line.strip()), "")[:limit] or None


def first_line(error) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


WORKER_DIED = ("its worker died without a traceback (killed: kill -9 or out of memory); rerunning the sweep "
               "resumes it")


class WorkerDiedError(RuntimeError):
    """A submitit job whose worker ended without a result or a traceback (SIGKILL, the OOM killer, a lost node):
    submitit's UncompletedJobError put in one line, with where the worker's own log is."""

    def __init__(self, state: str = "", log: str = ""):
        super().__init__(WORKER_DIED)
        self.state, self.log = state, log


def job_return(job, overrides=None):
    """One submitit job's JobReturn, as Hydra's submitit launch collects it (``job.results()[0]``); a job whose
    worker died without producing one (submitit's UncompletedJobError, whose text is the worker's whole stderr)
    gets a failed JobReturn saying so (``WorkerDiedError``), so the other jobs' results are still reported. A job
    whose worker failed in Python outside Hydra's run_job (FailedJobError: its traceback) still raises."""
    from hydra.core.utils import JobReturn, JobStatus
    from submitit.core.utils import FailedJobError, UncompletedJobError

    try:
        return job.results()[0]
    except FailedJobError:
        raise
    except UncompletedJobError:
        from submitit.local.local import LocalJob

        paths = getattr(job, "paths", None)
        # SLURM's state says why (OUT_OF_MEMORY, TIMEOUT, CANCELLED, NODE_FAIL); a local job's says nothing more
        state = "" if isinstance(job, LocalJob) else str(getattr(job, "state", "") or "")
        ret = JobReturn(overrides=list(overrides) if overrides is not None else None, status=JobStatus.FAILED)
        ret._return_value = WorkerDiedError(state, str(paths.stderr) if paths is not None else "")
        return ret


class _CollectedAlone:
    """A submitit job whose ``results()`` is ``[job_return(job)]``: Hydra's launch calls it for each job."""

    def __init__(self, job, overrides):
        self.job, self.overrides = job, overrides

    def results(self) -> list:
        return [job_return(self.job, self.overrides)]

    def __getattr__(self, name):
        return getattr(self.job, name)


@contextmanager
def results_per_job():
    """While Hydra's submitit launch runs: it collects ``[j.results()[0] for j in executor.map_array(...)]``,
    so one job whose worker died (kill -9, the OOM killer) raised submitit's UncompletedJobError there and
    ended the sweep in the worker's stderr, the other jobs' results unreported. Here map_array's jobs give
    theirs one by one (``job_return``): the dead one a failed JobReturn, the sweep its lines and summary."""
    import submitit

    submit = submitit.AutoExecutor.map_array

    def map_array(executor, fn, *iterable):
        jobs = submit(executor, fn, *iterable)
        overrides = list(iterable[0]) if iterable else [None] * len(jobs)
        return [_CollectedAlone(job, o) for job, o in zip(jobs, overrides)]

    submitit.AutoExecutor.map_array = map_array  # submitit's own submission, its jobs' results taken one by one
    try:
        yield
    finally:
        submitit.AutoExecutor.map_array = submit


def record_results(progress: Progress, returns) -> list[str]:
    """After the launcher's wait: a line for any job whose marker the watcher did not see, the failures kept in
    FAILURES and named together (returned), each with where its traceback is (a job refused before it touched
    its dir wrote no FAILED there: its line is all there is; a job whose worker was killed wrote none either:
    its worker's log is named)."""
    from hydra.core.utils import JobStatus

    from flare_exp.run.layout import DONE, FAILED
    from flare_exp.run.record import RunFinishedError

    failed = []
    for i, ret in enumerate(returns):
        ok = ret.status == JobStatus.COMPLETED
        if not ok and isinstance(ret._return_value, RunFinishedError) and (progress.job_dirs[i] / DONE).exists():
            # a sweep launched again (after a kill, a node's end): a job its dir holds finished, with these very
            # settings (the checks before launch refuse other ones), is done, not failed
            progress.finished(i, KEPT)  # said at the launch's start when the checks saw it kept
            # completed (Hydra's sweeper raises a failed job's error after the launch), its metrics where a search
            # reads them (optuna_search.job_metrics)
            job = progress.job_dirs[i]
            metrics = next((p for p in (job / "metrics.json", job / "eval" / "metrics.json") if p.is_file()), None)
            ret.status = JobStatus.COMPLETED
            ret._return_value = {"kept": str(job), **({"metrics": str(metrics)} if metrics else {})}
            continue
        died = isinstance(ret._return_value, WorkerDiedError)
        why = None if ok else str(ret._return_value) if died else first_line(ret._return_value)
        progress.finished(i, "DONE" if ok else "FAILED", why)
        if not ok:
            FAILURES[str(progress.job_dirs[i])] = f"job #{progress.numbers[i]} ({progress.names[i]}): {why}"
            earlier = (progress.job_dirs[i] / FAILED).exists()  # an earlier attempt's, not this launch's
            none = "its FAILED is an earlier attempt's" if earlier else "no FAILED file"
            if progress.written_now(i, FAILED):
                where = f"traceback in {progress.job_dirs[i] / FAILED}"
            elif died:
                error = ret._return_value
                where = f"{none}: killed mid-run, its dir holds the run as far as it got" + \
                    (f"; its job's state: {error.state}" if error.state else "") + \
                    (f"; its worker's log: {error.log}" if error.log else "")
            else:
                where = f"{none}: stopped before touching its dir, which holds what it held"
            failed.append(f"{FAILURES[str(progress.job_dirs[i])]} ({where})")
    if failed:
        say(f"{len(failed)} of {len(returns)} job(s) FAILED:\n  " + "\n  ".join(failed))
    return failed
