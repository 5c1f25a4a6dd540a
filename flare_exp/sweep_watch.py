"""What flare-exp's sweep launchers (hydra_plugins/flare_exp_launchers) add to Hydra's submitit launchers:

- every job's settings and dir are checked before any job is launched (flare_exp/sweep_checks.py);
- one line per finished job (its number, overrides, DONE/FAILED, duration, headline metric) and an ETA;
- the failed jobs named at the end (the sweep exits non-zero);
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
from pathlib import Path

# job dir -> why it failed, for every job (or Optuna trial) of this sweep process that failed
FAILURES: dict[str, str] = {}


def exit_with(message: str, code: int = 1) -> None:
    """End the sweep with ``message`` and no traceback (Hydra prints one for an error raised in a launcher)."""
    say(message)
    raise SystemExit(code)


def say(text: str) -> None:
    print(f"[flare-exp sweep] {text}", file=sys.stderr, flush=True)


class Progress:
    """Watches the jobs' dirs for their DONE / FAILED markers (a thread) and prints one line per finished job
    with an ETA from the rate so far."""

    def __init__(self, job_dirs: list[Path], names: list[str], poll_s: float = 1.0):
        self.job_dirs, self.names, self.poll_s = job_dirs, names, poll_s
        self.start = time.time()
        self.reported: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "Progress":
        say(f"{len(self.job_dirs)} job(s) launched: {self.job_dirs[0].parent}/<job>/ "
            "(a line per finished job follows)")
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
        if i in self.reported:
            return
        self.reported[i] = status
        row = self.summary(i, status)
        seconds = row["seconds"] if row and row.get("seconds") is not None else time.time() - self.start
        headline = f", {row['headline']}" if row and row.get("headline") else ""
        reason = why or (row or {}).get("error")
        done, total = len(self.reported), len(self.job_dirs)
        left = total - done
        elapsed = time.time() - self.start
        eta = f"{left} left, ETA ~{elapsed / done * left:.0f} s" if left else "all finished"
        say(f"{done}/{total} #{self.job_dirs[i].name} ({self.names[i]}) {status} in {seconds:.0f} s{headline}"
            f"{f': {reason}' if status != 'DONE' and reason else ''} | {eta}")

    def written_now(self, i: int, status: str) -> bool:
        """The job's dir holds the ``status`` marker, written during this launch (not an earlier attempt's)."""
        path = self.job_dirs[i] / status
        try:
            return path.stat().st_mtime >= self.start - 1
        except OSError:
            return False

    def summary(self, i: int, status: str) -> dict | None:
        """The job dir's summary (duration, metric, error) when its marker is this launch's ``status``; None
        otherwise: a job refused before it started leaves the dir's earlier run, whose metric is not its own."""
        from flare_exp.catalog import run_summary
        from flare_exp.run.record import marker

        return run_summary(self.job_dirs[i]) if marker(self.job_dirs[i]) == status and \
            self.written_now(i, status) else None


def first_line(error) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def record_results(progress: Progress, returns) -> list[str]:
    """After the launcher's wait: a line for any job whose marker the watcher did not see, the failures kept in
    FAILURES and named together (returned), each with where its traceback is (a job refused before it touched
    its dir wrote no FAILED there: its line is all there is)."""
    from hydra.core.utils import JobStatus

    from flare_exp.run.layout import FAILED

    failed = []
    for i, ret in enumerate(returns):
        ok = ret.status == JobStatus.COMPLETED
        why = None if ok else first_line(ret._return_value)
        progress.finished(i, "DONE" if ok else "FAILED", why)
        if not ok:
            FAILURES[str(progress.job_dirs[i])] = f"job #{progress.job_dirs[i].name} ({progress.names[i]}): {why}"
            where = f"traceback in {progress.job_dirs[i] / FAILED}" if progress.written_now(i, FAILED) else \
                "no FAILED file: stopped before touching its dir, which holds what it held"
            failed.append(f"{FAILURES[str(progress.job_dirs[i])]} ({where})")
    if failed:
        say(f"{len(failed)} of {len(returns)} job(s) FAILED:\n  " + "\n  ".join(failed))
    return failed


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (Linux /proc), children first."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
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
    """SIGINT to the jobs first (the leaves of this process's tree: each leaves FAILED saying it was stopped
    from outside), up to ``grace_s`` for them to end; then SIGINT to what is left (submitit's local
    controllers), and SIGKILL to whatever still lives 2 s later. The controllers are not signalled first: they
    would SIGKILL their job one second after passing the SIGINT on, before it has written its marker."""
    workers = descendants(os.getpid())
    leaves = [pid for pid in workers if not descendants(pid)]
    _signal(leaves, signal.SIGINT)
    _wait_gone(leaves, grace_s)
    _wait_gone(workers, 2.0)  # a controller whose job ended exits by itself
    _signal(_alive(workers), signal.SIGINT)
    _wait_gone(workers, 2.0)
    _signal(_alive(workers + descendants(os.getpid())), signal.SIGKILL)
    return len(workers)


class ForwardStops:
    """While the sweep waits for its local jobs: SIGTERM / SIGINT stop the workers, then this process (exit
    status 128 + the signal's number, as a shell reports it)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, grace_s: float = 10.0, job_dirs: list[Path] | None = None):
        self.grace_s, self.job_dirs = grace_s, job_dirs or []

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
        say(f"{name}: {count} worker process(es) stopped; {jobs_after_stop(self.job_dirs)}")
        raise SystemExit(128 + signum)


class StopInProcess:
    """The watched launcher runs its jobs in this process: SIGTERM stops the running job as Ctrl-C does (its dir
    gets FAILED, stopped from outside, as a single run's does: launch.py's stop_on_sigterm), then the sweep says
    what the stop left and exits 128 + the signal's number, instead of vanishing without a word or a marker."""

    def __init__(self, job_dirs: list[Path]):
        self.job_dirs = job_dirs

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
            say(f"{by.name}: the sweep stopped; {jobs_after_stop(self.job_dirs)}")
            raise SystemExit(128 + by) from None


def jobs_after_stop(job_dirs: list[Path]) -> str:
    """What a stop left, from the job dirs' markers: a job that had finished says DONE (a stop just after the
    last job ended stopped nothing), the others FAILED (stopped from outside) or nothing yet (never started)."""
    from flare_exp.run.record import DONE, marker

    if not job_dirs:
        return "the stopped jobs' dirs say FAILED (stopped from outside); rerunning the same command resumes them"
    unfinished = [d.name for d in job_dirs if marker(d) != DONE]
    done = len(job_dirs) - len(unfinished)
    if not unfinished:
        return f"all {done} job(s) had finished (DONE) before the stop: nothing was cut short"
    return (f"{len(unfinished)} job(s) not finished (#{', #'.join(unfinished)}: FAILED, stopped from outside, or "
            f"never started), {done} finished (DONE); rerunning the same command resumes the unfinished ones")
