"""One writer per run dir: a lock that works on shared filesystems (NFS, Lustre), where ``flock`` may not.

The lock is a directory, ``<run dir>/.lock``, made with ``mkdir`` (atomic on every filesystem, NFS included:
of two launches exactly one creates it) holding ``owner.json`` (host, pid, start time). While the run lives, a
thread touches ``owner.json`` every ``HEARTBEAT_S`` seconds. A second launch stops at once, naming the holder.
A lock whose holder is gone is taken over, and the log says so: on the same host when its pid no longer
exists (kill -9), when it is an earlier attempt of the same SLURM job (a requeue, on any node), and on another
host when its heartbeat is older than ``stale_after_s`` (a node that went away).
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import shutil
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)
LOCK = ".lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class RunLockedError(RuntimeError):
    """Another live process holds the run dir."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class RunLock:
    def __init__(self, run_dir: Path, stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S):
        self.dir = Path(run_dir) / LOCK
        self.owner_file = self.dir / "owner.json"
        self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> dict | None:
        try:
            return {**json.loads(self.owner_file.read_text()), "heartbeat_age_s": time.time() -
                    self.owner_file.stat().st_mtime}
        except (OSError, ValueError):
            return None

    def _stale(self, holder: dict | None) -> str | None:
        """Why the lock's holder is gone, or None while it may live."""
        if holder is None:  # made but never written: its maker died between mkdir and the write, or writes now
            age = time.time() - self.dir.stat().st_mtime if self.dir.exists() else 0.0
            return f"an empty lock {age:.0f} s old" if age > self.heartbeat_s else None
        job = os.environ.get("SLURM_JOB_ID")
        if job and holder.get("slurm_job_id") == job and holder.get("pid") != os.getpid():
            return f"it is an earlier attempt of SLURM job {job} (requeued)"
        if holder.get("host") == platform.node():
            if not _pid_alive(int(holder.get("pid", -1))):
                return f"pid {holder.get('pid')} on this host is gone"
            return None
        if holder["heartbeat_age_s"] > self.stale_after_s:
            return f"its heartbeat is {holder['heartbeat_age_s']:.0f} s old (host {holder.get('host')})"
        return None

    def acquire(self) -> "RunLock":
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                os.mkdir(self.dir)
                break
            except FileExistsError:
                holder = self.holder()
                why = self._stale(holder)
                if why is None:
                    h = holder or {}
                    raise RunLockedError(
                        f"{self.dir.parent} is in use by another run: host {h.get('host', '?')}, pid "
                        f"{h.get('pid', '?')}, started {h.get('started', '?')}. Wait for it, or choose another "
                        "run_name=. (A lock whose holder died is taken over by itself.)") from None
                log.warning("taking over the lock of %s: %s (was %s)", self.dir.parent, why, holder)
                shutil.rmtree(self.dir, ignore_errors=True)
        else:
            raise RunLockedError(f"{self.dir}: could not take the lock (another launch keeps taking it)")
        tmp = self.dir / f".owner.{os.getpid()}"
        tmp.write_text(json.dumps({"host": platform.node(), "pid": os.getpid(),
                                   "started": _dt.datetime.now().isoformat(timespec="seconds"),
                                   "slurm_job_id": os.environ.get("SLURM_JOB_ID")}))
        os.replace(tmp, self.owner_file)
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.owner_file)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        holder = self.holder()
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == platform.node():
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
