"""The sweep dir a launch writes into: one sweep at a time in it (its lock, taken before Hydra writes there),
and put back as it was when the sweep is refused before any job (``SweepRecord``; flare_exp/sweep_checks.py
refuses it)."""
from __future__ import annotations

import os
import platform
from pathlib import Path

from flare_exp.sweep_watch import exit_with


SWEEP_LOCK = ".sweep.lock"
_SWEEP_LOCKS: dict[str, object] = {}  # sweep dir -> the lock this process took for it


def lock_sweep(config) -> None:
    """One sweep at a time in a sweep dir (one run_name): a second launch of a sweep into it while the first one
    lives is refused (exit 2) before Hydra writes its multirun.yaml or any job starts; each would otherwise run
    the jobs the other holds, fail on their locks and end non-zero. Released when the process ends (a crashed
    sweep's lock is taken over as a run's is); an earlier sweep of this very process into the same dir (one
    Python session, sweeps one after another) hands its lock on. A sweep whose jobs a live process still holds (a
    killed local launcher's workers live on) is refused too, naming them: each job would fail on its lock."""
    import atexit

    from flare_exp.run.lock import RunLock, RunLockedError
    from flare_exp.run.names import hydra_dir_setting

    try:
        sweep_dir = Path(os.path.abspath(str(config.hydra.sweep.dir)))  # as SweepRecord names it
    except Exception:  # noqa: BLE001  (a sweep dir that does not resolve: Hydra says so itself)
        return
    earlier = _SWEEP_LOCKS.pop(str(sweep_dir), None)
    if earlier is not None:
        earlier.release()
    lock = RunLock(sweep_dir, name=SWEEP_LOCK, placed_by=hydra_dir_setting(config.hydra, sweep=True))
    try:
        lock.acquire()
    except RunLockedError as e:
        exit_with(f"another sweep is running in this sweep dir; nothing was launched: {e}", 2)
    running = jobs_still_running(sweep_dir)
    if running:
        lock.release()
        here = platform.node()
        pids = sorted({str(h.get("pid")) if h.get("host") == here else f"{h.get('pid')} on {h.get('host')}"
                       for _, h in running})
        exit_with(f"sweep {sweep_dir}: {len(running)} of its job(s) are still being run by an earlier launch "
                  f"(pids {', '.join(pids)}; e.g. {running[0][0]}): a local launcher killed with kill -9, or "
                  "whose terminal closed, leaves its workers running, a SLURM sweep its jobs. Wait for them to "
                  "finish (or stop them: kill / scancel), then launch the same command again; nothing was "
                  "launched", 2)
    _SWEEP_LOCKS[str(sweep_dir)] = lock
    atexit.register(lock.release)


def jobs_still_running(sweep_dir: Path) -> list[tuple[Path, dict]]:
    """(run dir, its lock's holder) of every run under a sweep dir that a live process holds (a job, or a
    pipeline's step)."""
    from flare_exp.run.layout import LOCK
    from flare_exp.run.lock import RunLock

    found = []
    for lock_dir in sorted(sweep_dir.glob(f"**/{LOCK}")):
        holder = RunLock(lock_dir.parent).live_holder() if lock_dir.is_dir() else None
        if holder is not None:
            found.append((lock_dir.parent, holder))
    return found


def unlock_sweep(sweep_dir: Path) -> None:
    """The sweep lock this process took on ``sweep_dir`` (``lock_sweep``) let go now, not at exit."""
    lock = _SWEEP_LOCKS.pop(str(sweep_dir), None)
    if lock is not None:
        lock.release()


class SweepRecord:
    """The sweep dir as it was before this sweep (taken before the sweep's lock): Hydra's sweeper writes the new
    multirun.yaml before the launcher checks the jobs, so a sweep refused there puts the old one back (none:
    removed), and the sweep dir's record keeps matching the jobs in it; a sweep dir (or folder above it) this
    launch made goes again while it is empty."""

    def __init__(self, config):
        try:
            self.dir: Path | None = Path(os.path.abspath(str(config.hydra.sweep.dir)))
        except Exception:  # noqa: BLE001  (a sweep dir that does not resolve yet: nothing to keep)
            self.dir = None
        self.path = self.dir / "multirun.yaml" if self.dir else None
        held = self.path is not None and self.path.is_file()
        self.text = self.path.read_bytes() if held else None
        self.times = (self.path.stat().st_atime_ns, self.path.stat().st_mtime_ns) if held else None
        self.made = [] if self.dir is None else [d for d in (self.dir, *self.dir.parents) if not d.exists()]

    def restore(self) -> None:
        """The sweep was refused before any job: the dir put back as it was (Hydra's sweeper wrote in it)."""
        if self.path is None:
            return
        if self.text is None:
            self.path.unlink(missing_ok=True)
        else:
            self.path.write_bytes(self.text)
            os.utime(self.path, ns=self.times)  # when the sweep of the jobs in it began (pipeline.sweep_started)
        unlock_sweep(self.dir)  # its .sweep.lock goes now, not at exit: the dir is left as it was
        for folder in self.made:  # a refused sweep leaves no empty dir it made; the deepest first, and one that
            try:  # holds anything (or was there before: not in made) stays
                folder.rmdir()
            except OSError:
                break
