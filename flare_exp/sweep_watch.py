"""What flare-exp's sweep launchers (hydra_plugins/flare_exp_launchers) add to Hydra's submitit launchers:

- every job's settings and dir are checked before any job is launched (flare_exp/sweep_checks.py);
- one line per finished job (its number, overrides, DONE/FAILED, duration, headline metric or an Optuna
  search's objectives) and an ETA; a relaunched sweep's jobs that keep their finished run said as it starts;
- the failed jobs named at the end (the sweep exits non-zero), a job whose worker died without a traceback
  (kill -9, the OOM killer) among them: submitit's error for it would have ended the sweep unreported;
- SIGTERM and SIGINT (``timeout``, ``kill``, Ctrl-C) forwarded to the local workers, which are waited for and
  killed if they linger: submitit's workers ignore SIGTERM (a SLURM pre-emption warning), so without this a
  stopped sweep leaves them running.
  Jobs run in this process (the watched launcher) are stopped by SIGTERM as by Ctrl-C. Either way a job whose
  run had started leaves FAILED (stopped from outside), and the sweep says in one line what the stop left.
"""
from __future__ import annotations

import os
import signal
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
                 objectives: list[str] | None = None):
        self.job_dirs, self.names, self.poll_s = job_dirs, list(names), poll_s
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
        say(f"{runs} job(s) launched{kept}: {self.job_dirs[0].parent}/<job>/ (a line per finished job follows)")
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
        say(f"{done}/{total} #{self.job_dirs[i].name} ({self.names[i]}) {status} in {seconds:.0f} s{headline}"
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
            FAILURES[str(progress.job_dirs[i])] = f"job #{progress.job_dirs[i].name} ({progress.names[i]}): {why}"
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


def _children_of() -> dict[int, list[int]]:
    """Each live process's children (Linux /proc)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return parents


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (Linux /proc), children first."""
    parents = _children_of()
    found, queue = [], list(parents.get(pid, []))
    while queue:
        child = queue.pop(0)
        found.append(child)
        queue += parents.get(child, [])
    return found


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z":
                alive.append(pid)
        except (OSError, IndexError):
            pass
    return alive


def _signal(pids: list[int], sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def _wait_gone(pids: list[int], seconds: float) -> None:
    deadline = time.time() + seconds
    while _alive(pids) and time.time() < deadline:
        time.sleep(0.2)


def stop_workers(grace_s: float = 10.0) -> int:
    """SIGINT to the jobs first (each child's children: the job processes submitit's local controllers started,
    or a child itself where it has none; each job leaves FAILED saying it was stopped from outside), up to
    ``grace_s`` for them to end; then SIGINT to what is left (the controllers), and SIGKILL to whatever still
    lives 2 s later. The controllers are not signalled first: they would SIGKILL their job one second after
    passing the SIGINT on, before it has written its marker. Not the tree's leaves: a job that had a child of
    its own at that moment (a DataLoader worker) was passed over and finished DONE after the stop."""
    workers, tree = descendants(os.getpid()), _children_of()
    jobs = [job for child in tree.get(os.getpid(), []) for job in (tree.get(child) or [child])]
    _signal(jobs, signal.SIGINT)
    _wait_gone(jobs, grace_s)
    _wait_gone(workers, 2.0)  # a controller whose job ended exits by itself
    _signal(_alive(workers), signal.SIGINT)
    _wait_gone(workers, 2.0)
    _signal(_alive(workers + descendants(os.getpid())), signal.SIGKILL)
    return len(workers)


class ForwardStops:
    """While the sweep waits for its local jobs: SIGTERM / SIGINT stop the workers, then this process (exit
    status 128 + the signal's number, as a shell reports it)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, grace_s: float = 10.0, job_dirs: list[Path] | None = None, trials: bool = False):
        self.grace_s, self.job_dirs, self.trials = grace_s, job_dirs or [], trials  # trials: an Optuna search's

    def __enter__(self) -> "ForwardStops":
        self.previous = {s: signal.signal(s, self._stop) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _stop(self, signum, frame) -> None:
        for s in self.SIGNALS:
            signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C does not cut the clean-up short
        name = signal.Signals(signum).name
        say(f"{name}: stopping the sweep's workers")
        count = stop_workers(self.grace_s)
        say(f"{name}: {count} worker process(es) stopped; {jobs_after_stop(self.job_dirs, self.trials)}")
        raise SystemExit(128 + signum)


class StopInProcess:
    """The watched launcher runs its jobs in this process: SIGTERM stops the running job as Ctrl-C does (its dir
    gets FAILED, stopped from outside, as a single run's does: launch.py's stop_on_sigterm), then the sweep says
    what the stop left and exits 128 + the signal's number, instead of vanishing without a word or a marker."""

    def __init__(self, job_dirs: list[Path], trials: bool = False):
        self.job_dirs, self.trials = job_dirs, trials

    def __enter__(self) -> "StopInProcess":
        self.previous = signal.signal(signal.SIGTERM, self._interrupt)
        return self

    @staticmethod
    def _interrupt(signum, frame) -> None:
        raise KeyboardInterrupt("SIGTERM")

    def __exit__(self, exc_type, exc, tb) -> None:
        signal.signal(signal.SIGTERM, self.previous)
        if exc_type is KeyboardInterrupt:
            by = signal.SIGTERM if str(exc) == "SIGTERM" else signal.SIGINT
            say(f"{by.name}: the sweep stopped; {jobs_after_stop(self.job_dirs, self.trials)}")
            raise SystemExit(128 + by) from None


def jobs_after_stop(job_dirs: list[Path], trials: bool = False) -> str:
    """What a stop left, from the job dirs' markers: a job that had finished says DONE (a stop just after the
    last job ended stopped nothing), the others FAILED (stopped from outside) or nothing yet (never started).
    ``trials``: an Optuna search's jobs, which a rerun retries as new trials rather than resuming them."""
    from flare_exp.run.record import DONE, marker

    if not job_dirs:
        return "the stopped jobs' dirs say FAILED (stopped from outside); rerunning the same command resumes them"
    unfinished = [d for d in job_dirs if marker(d) != DONE]
    done = len(job_dirs) - len(unfinished)
    if not unfinished:
        return f"all {done} job(s) had finished (DONE) before the stop: nothing was cut short"
    then = "; ".join(f"#{d.name}: {job_after_stop(d)}" for d in unfinished) if not trials else (
        "the study keeps the finished trials and retries the stopped ones as new trials, each in a dir of its own "
        "from its first step (the stopped trials' dirs stay as they are)")
    return (f"{len(unfinished)} job(s) not finished (#{', #'.join(d.name for d in unfinished)}: FAILED, stopped "
            f"from outside, or never started), {done} finished (DONE); rerunning the same command, per job: {then}")


def job_after_stop(job_dir: Path) -> str:
    """What rerunning the sweep does with a job it stopped: a single run's stop message (resume.after_a_stop),
    for the job's own run dir and the config it ran with; a job that never started runs."""
    from flare_exp.resume import after_a_stop_in

    return after_a_stop_in(job_dir) or "runs it (it had not started)"
