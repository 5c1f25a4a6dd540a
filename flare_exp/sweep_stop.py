"""A stopped sweep (SIGTERM, SIGINT: ``timeout``, ``kill``, Ctrl-C): the local workers' jobs stopped so that each
leaves FAILED (stopped from outside), the workers waited for and killed if they linger (submitit's workers ignore
SIGTERM, a SLURM pre-emption warning), and one line saying what the stop left and what a rerun does with it."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from flare_exp.sweep_watch import say


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


def hear_the_sweeps_stop() -> bool:
    """In a local sweep's job process: SIGINT raises KeyboardInterrupt again where the job was handed it ignored
    (a sweep started in the background from a script, ``python launch.py -m ... &``, whose shell ignores SIGINT
    for it). stop_workers stops the jobs with SIGINT; ignoring it, a job would run on through the grace and be
    killed without its FAILED marker. True when it was restored."""
    if not os.environ.get("SUBMITIT_LOCAL_JOB_ID") or signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        return False
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return True


class ForwardStops:
    """While the sweep waits for its local jobs: SIGTERM / SIGINT / SIGHUP (its terminal closed) stop the
    workers, then this process (exit status 128 + the signal's number, as a shell reports it)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

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
    """The watched launcher runs its jobs in this process: SIGTERM or SIGHUP stops the running job as Ctrl-C does
    (its dir gets FAILED, stopped from outside, as a single run's does: launch.py's stop_on_sigterm), then the sweep
    says what the stop left and exits 128 + the signal's number, instead of vanishing without a word or a marker."""

    def __init__(self, job_dirs: list[Path], trials: bool = False):
        self.job_dirs, self.trials = job_dirs, trials

    SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # SIGHUP: its terminal closed

    def __enter__(self) -> "StopInProcess":
        self.previous = {s: signal.signal(s, self._interrupt) for s in self.SIGNALS}
        return self

    @staticmethod
    def _interrupt(signum, frame) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    def __exit__(self, exc_type, exc, tb) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if exc_type is KeyboardInterrupt:
            by = {s.name: s for s in self.SIGNALS}.get(str(exc), signal.SIGINT)
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
    label = lambda d: f"#{d.name}" if d.name.isdigit() else f"{d.name}/"  # noqa: E731  (a custom subdir's name)
    then = "; ".join(f"{label(d)}: {job_after_stop(d)}" for d in unfinished) if not trials else (
        "the study keeps the finished trials and retries the stopped ones as new trials, each in a dir of its own "
        "from its first step (the stopped trials' dirs stay as they are)")
    return (f"{len(unfinished)} job(s) not finished ({', '.join(map(label, unfinished))}: FAILED, stopped "
            f"from outside, or never started), {done} finished (DONE); rerunning the same command, per job: {then}")


def job_after_stop(job_dir: Path) -> str:
    """What rerunning the sweep does with a job it stopped: a single run's stop message (resume.after_a_stop),
    for the job's own run dir and the config it ran with; a job that never started runs."""
    from flare_exp.resume import after_a_stop_in

    return after_a_stop_in(job_dir) or "runs it (it had not started)"
