"""One writer per run dir: a lock that works on shared filesystems (NFS, Lustre), where ``flock`` may not.

The lock is a directory, ``<run dir>/.lock``, holding numbered owner files ``owner.<N>.json`` (host, pid, start
time); the holder is the highest N. An owner file is written whole under a temporary name, then put in place
with ``os.link``, which fails if the name exists (atomic on every filesystem, NFS included): of any number of
launches that claim number N, exactly one gets it. Taking over a dead holder's lock claims the next number, so
two relaunches after a crash cannot both take it: the loser stops, naming the winner. While the run lives, a
thread touches its owner file every ``HEARTBEAT_S`` seconds. A holder is gone, and its lock taken over (the
log says so), on the same host when its pid no longer exists (kill -9) or belongs to another process now (a
restarted container or a reboot reuses pids: the process started after the lock was taken, it is this very
process, or the heartbeat has been silent for SAME_HOST_STALE_FACTOR x ``stale_after_s``), when it is an earlier
attempt of the same SLURM job (a requeue, on any node), and on another host when its heartbeat is older than
``stale_after_s`` (a node that went away). A lock directory with no owner file yet is free: its maker, if
alive, loses the claim to number 1 and stops like any other loser. A holder that was only stopped (SIGSTOP, a
suspended SLURM job, a frozen node) past the takeover wait finds, once it goes on, that the lock is another's
(its owner file gone, or another one above it or in its place, told by its token): its heartbeat thread, whose
wait ran out while it was stopped, sees it first and ends the process at once (exit 75), before a save it was in
can go on; ``check_still_held`` (called before every checkpoint, journal batch, summary and marker) stops the
main thread likewise. Either way nothing more is written there, its own log file there included, so the dir
keeps one writer.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import re
import shlex
import shutil
import threading
import time
import uuid
from pathlib import Path

from flare_exp.io import BEFORE_LANDING
from flare_exp.run.layout import LOCK

log = logging.getLogger(__name__)
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
_OWNER = re.compile(r"^owner\.(\d+)\.json$")
# on the same host a live pid counts, unless the heartbeat has been silent this many times stale_after_s
SAME_HOST_STALE_FACTOR = 12
_HELD_HERE: set[str] = set()  # the tokens of the locks this process holds
_LOCKS_HERE: list["RunLock"] = []  # the locks this process took and has not released
LOST_EXIT_CODE = 75  # EX_TEMPFAIL: the run goes on in the process that took the lock over
HARD_STOP = [True]  # the heartbeat ends the process when its lock was taken over (the tests look at it instead)


class RunLockedError(RuntimeError):
    """Another live process holds the run dir."""


class RunLockLostError(RunLockedError):
    """This process's lock was taken over while it was stopped: it must not write into the run dir any more."""


def check_still_held() -> None:
    """Raise RunLockLostError if a lock this process took has been taken over meanwhile (it was stopped longer
    than the takeover wait): called before each write that a second writer would spoil."""
    for lock in list(_LOCKS_HERE):
        lock.check_held()


def check_held_for(path: Path) -> None:
    """``check_still_held`` for a write into ``path``: only the locks of run dirs that hold it (io's
    BEFORE_LANDING; a write elsewhere, a shared cache's, is no run dir's)."""
    for lock in list(_LOCKS_HERE):
        if lock.guards(path):
            lock.check_held()


BEFORE_LANDING.append(check_held_for)


def lock_lost() -> bool:
    """Whether a lock this process took is another's now (then it leaves no marker either)."""
    try:
        check_still_held()
    except RunLockLostError:
        return True
    return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _gone_here(holder: dict, silent_after_s: float) -> str | None:
    """Why a holder on this host is gone, or None while it may live. A live pid is not enough: a restarted
    container or a reboot hands the dead holder's pid to another process (pid 1 of a container, even this one)."""
    pid = holder.get("pid", -1)
    if not isinstance(pid, int) or isinstance(pid, bool):  # edited by hand: names no process that could hold it
        return f"its owner file names no process (pid {pid!r})"
    if not _pid_alive(pid):
        return f"pid {pid} on this host is gone"
    if pid == os.getpid() and holder.get("token") not in _HELD_HERE:
        return f"it names pid {pid}, this very process, which does not hold it (a reused pid)"
    started, since = _process_start(pid), _lock_started(holder)
    if started is not None and since is not None and started > since + 2:
        return f"pid {pid} is another process now (started after the lock was taken: a reused pid)"
    if _stopped(pid):  # silent because it is stopped (SIGSTOP, a suspended job): it goes on when continued
        return None
    if holder["heartbeat_age_s"] > silent_after_s:
        return (f"pid {pid} is alive but the lock's heartbeat is {holder['heartbeat_age_s']:.0f} s old (the holder "
                f"beats every {HEARTBEAT_S:.0f} s: another process has its pid)")
    return None


def holder_stopped(holder: dict) -> bool:
    """Whether a lock's holder is a stopped process on this host (elsewhere it cannot be told)."""
    pid = holder.get("pid")
    return holder.get("host") == platform.node() and isinstance(pid, int) and _stopped(pid)


def _stopped(pid: int) -> bool:
    """Whether a process on this host is stopped (its state T or t in Linux's /proc: SIGSTOP, Ctrl-Z, a suspended
    job, a debugger): its silence is no death, and taking its lock over would leave it a writer when continued."""
    fields = _proc_stat(pid)
    return bool(fields) and fields[0] in ("T", "t")


def _process_start(pid: int) -> float | None:
    """When a process started (seconds since the epoch; Linux's /proc), None where unknown."""
    fields = _proc_stat(pid)
    try:
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration, TypeError):
        return None


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command's name (state first), None where unreadable."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def being_made(path: Path) -> str:
    """For a path that is missing: the live run that holds the run dir it would be in (its writer, not yet
    there), said as what to do; "" when none does."""
    for folder in (path, *path.parents):
        holder = RunLock(folder).live_holder() if (folder / LOCK).is_dir() else None
        if holder is not None and holder.get("token") not in _HELD_HERE:  # not a lock this process holds
            return (f"{folder} is being written by a run that has not finished (host {holder.get('host')}, pid "
                    f"{holder.get('pid')}, started {holder.get('started')}): wait for it to finish, then launch "
                    "again")
    return ""


def _lock_started(holder: dict) -> float | None:
    """When the lock was taken, in seconds since the epoch; None for an owner file without it (its ``started`` is
    local time of the holder's own zone, which another launch's TZ may read hours off)."""
    value = holder.get("started_epoch")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _unreadable(path: Path) -> str | None:
    """Why an owner file names no holder (torn by a copy, written by hand); None when it does, or is gone."""
    try:
        fields = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # a file gone was released meanwhile
        return None if isinstance(e, FileNotFoundError) else f"{type(e).__name__}: {e}"
    return None if isinstance(fields, dict) else f"a JSON {type(fields).__name__}, not an object"


class RunLock:
    def __init__(self, run_dir: Path, stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S,
                 name: str = LOCK, placed_by: str = "run_name"):
        self.dir = Path(run_dir) / name
        self.placed_by = placed_by  # the setting whose other value is another dir: a refusal's way round
        self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
        self.owner_file: Path | None = None
        self._token: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _highest(self) -> tuple[int, Path | None]:
        try:
            found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _OWNER.match(p.name))]
        except FileNotFoundError:
            return 0, None
        return max(found, default=(0, None))

    def holder(self) -> dict | None:
        """The lock's holder (its owner file, with the heartbeat's age and its number), None when free."""
        number, path = self._highest()
        try:
            return {**json.loads(path.read_text()), "heartbeat_age_s": time.time() - path.stat().st_mtime,
                    "number": number} if path else None
        except (OSError, ValueError, TypeError):  # released meanwhile, or torn or hand-written (no JSON object):
            return None  # no holder (acquire says so: _unreadable); a run puts its owner file in place whole

    def _stale(self, holder: dict) -> str | None:
        """Why the lock's holder is gone, or None while it may live."""
        job = os.environ.get("SLURM_JOB_ID")
        here = holder.get("host") == platform.node()
        silent_after_s = self.stale_after_s * SAME_HOST_STALE_FACTOR
        if job and holder.get("slurm_job_id") == job and holder.get("pid") != os.getpid() and (
                not here or _gone_here(holder, silent_after_s)):  # on this node: only once its process is gone
            return f"it is an earlier attempt of SLURM job {job} (requeued)"
        if here:
            return _gone_here(holder, silent_after_s)
        if holder["heartbeat_age_s"] > self.stale_after_s:
            return f"its heartbeat is {holder['heartbeat_age_s']:.0f} s old (host {holder.get('host')})"
        return None

    def _claim(self, number: int) -> bool:
        """Put this process's owner file in place as number ``number``: True if it was free."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".claim.{uuid.uuid4().hex}"
        tmp.write_text(json.dumps({"host": platform.node(), "pid": os.getpid(), "token": tmp.name,
                                   "started": _dt.datetime.now().isoformat(timespec="seconds"),
                                   "started_epoch": time.time(),  # compared with a process's start: no time zone
                                   "slurm_job_id": os.environ.get("SLURM_JOB_ID")}))
        target = self.dir / f"owner.{number}.json"
        try:
            os.link(tmp, target)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        self.owner_file, self._token = target, tmp.name
        _HELD_HERE.add(tmp.name)
        return True

    def _refuse(self, holder: dict | None) -> RunLockedError:
        from flare_exp.run.names import placed_by

        h = holder or {}
        # Hydra's dir ("run_name"): hydra.run.dir= / hydra.sweep.dir= where the launch placed it itself
        setting = placed_by(self.dir.parent) if self.placed_by == "run_name" else self.placed_by
        pid = h.get("pid", "?")
        stopped = holder_stopped(h)
        return RunLockedError(
            f"{self.dir.parent} is in use by another run: host {h.get('host', '?')}, pid {pid}, started "
            f"{h.get('started', '?')}" + (f", stopped now (SIGSTOP, Ctrl-Z or a suspended job): continue it (kill "
                                         f"-CONT {pid}) or end it (kill {pid}; kill -CONT {pid}: a stopped process "
                                         "takes the signal once continued), then launch again" if stopped else "")
            + f". Wait for it, or choose another {setting}=. (A lock whose holder died is taken over by "
            f"itself.) If pid {pid} on host {h.get('host', '?')} is no flare-exp run (a run dir copied by hand with "
            f"its lock, or a pid another program has now: `ps -o args= -p {pid}` there says which), remove the lock "
            f"directory {self.dir} (rm -r {shlex.quote(str(self.dir))}) once sure no run writes into "
            f"{self.dir.parent}, and launch again.")

    def acquire(self) -> "RunLock":
        for _ in range(5):  # a lock released while we looked at it: look again
            holder = self.holder()
            if holder is None:
                number, path = self._highest()
                if path is not None and (unreadable := _unreadable(path)):
                    log.warning("taking over the lock of %s: its owner file %s cannot be read (%s), so it names no "
                                "run (torn or written by hand: a run puts it in place whole)", self.dir.parent, path,
                                unreadable)
                number += 1
            else:
                why = self._stale(holder)
                if why is None:
                    raise self._refuse(holder)
                log.warning("taking over the lock of %s: %s (was %s)", self.dir.parent, why, holder)
                number = holder["number"] + 1
            try:
                if self._claim(number):
                    break
            except FileNotFoundError:  # the lock dir was released between our mkdir and our claim
                continue
            raise self._refuse(self.holder())  # another launch claimed the same number first: it holds the run
        else:
            raise RunLockedError(f"{self.dir}: could not take the lock (other launches keep taking and releasing it)")
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        _LOCKS_HERE.append(self)
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if self._taken_over():  # stopped past the takeover wait: end here, before the main thread writes more
                if self._stop.is_set():  # released meanwhile by this process (its own rename): nothing lost
                    return
                self._leave_the_dir()
                log.error("%s", self._lost())
                if HARD_STOP[0]:
                    for handler in logging.getLogger().handlers:
                        handler.flush()
                    os._exit(LOST_EXIT_CODE)
                return
            try:
                os.utime(self.owner_file)
            except OSError:
                return

    def _lost(self) -> str:
        h = self.holder() or {}
        now = (f"host {h.get('host', '?')}, pid {h.get('pid', '?')}, started {h.get('started', '?')} holds it now"
               if h else "it has been released since")
        return (f"{self.dir.parent}: this process's lock was taken over while it was stopped or silent (a suspended "
                f"job, a frozen node): {now}. This process stops here without writing more into it, so the run dir "
                "keeps one writer; the run goes on in the process that took it over (or rerun the same command to "
                "resume it).")

    def guards(self, path: Path) -> bool:
        """Whether ``path`` is in this lock's run dir (the lock dir itself aside: its files are the lock's)."""
        try:  # links followed: the run dir reached by another spelling is the same dir
            path = Path(path)
            path = path.parent.resolve() / path.name
            return path.is_relative_to(self.dir.parent.resolve()) and not path.is_relative_to(self.dir.resolve())
        except (OSError, RuntimeError):  # a loop of links: no run dir's
            return False

    def check_held(self) -> None:
        """Raise RunLockLostError when this lock is no longer this process's (see ``check_still_held``)."""
        if self.owner_file is not None and not self._stop.is_set() and self._taken_over():
            self._leave_the_dir()
            raise RunLockLostError(self._lost())

    def _taken_over(self) -> bool:
        """The lock is another's: the owner file in force (the highest) is not this process's, by its name or by
        its token (the lock dir released and claimed again by a third launch reuses the name). A read that fails
        for another reason (a filesystem's hiccup) is no proof: False."""
        try:
            _, path = self._highest()
            if path != self.owner_file:
                return True
            owner = json.loads(path.read_text())
            return not isinstance(owner, dict) or owner.get("token") != self._token  # rewritten: not ours
        except (OSError, ValueError):
            return False

    def _leave_the_dir(self) -> None:
        """No more lines into the run dir's own log files (launch.log): the dir is another run's now."""
        root = logging.getLogger()
        for handler in list(root.handlers):
            name = getattr(handler, "baseFilename", None)
            if name and Path(name).resolve().is_relative_to(self.dir.parent.resolve()):
                root.removeHandler(handler)
                handler.close()

    def live_holder(self) -> dict | None:
        """The lock's holder while it lives; None when the lock is free or its holder is gone (taken over next)."""
        holder = self.holder()
        return holder if holder is not None and self._stale(holder) is None else None

    def wait_while_held(self, what: str, poll_s: float = 2.0, say_every_s: float = 60.0) -> None:
        """Return once no live run holds the lock (a dead holder's lock is free: ``acquire`` takes it over);
        says what it waits for, then again every ``say_every_s``."""
        said = None
        while (holder := self.live_holder()) is not None:
            if said is None or time.monotonic() - said > say_every_s:
                log.info("%s: waiting for the run that holds %s (host %s, pid %s, started %s)", what,
                         self.dir.parent, holder.get("host"), holder.get("pid"), holder.get("started"))
                said = time.monotonic()
            time.sleep(poll_s)

    def acquire_when_free(self, what: str, unless=None) -> "RunLock | None":
        """The lock, taken once no live run holds it (another launch claiming it first is waited for too); None,
        not taken, when ``unless()`` is true after a wait (what the holder made is there: nothing to do)."""
        while True:
            self.wait_while_held(what)
            if unless is not None and unless():
                return None
            try:
                return self.acquire()
            except RunLockedError:
                continue

    def held(self) -> bool:
        holder = self.holder()
        return bool(holder and self.owner_file and holder.get("token") == self._token)

    def release(self) -> None:
        """Stop the heartbeat; if this process still holds the lock, move the lock dir aside (one rename: a
        launch looking at it sees it whole or not at all), then delete it."""
        self._stop.set()
        _HELD_HERE.discard(self._token)
        if self in _LOCKS_HERE:
            _LOCKS_HERE.remove(self)
        if not self.held():
            return
        aside = self.dir.with_name(f"{self.dir.name}.released.{uuid.uuid4().hex}")
        try:
            os.rename(self.dir, aside)
        except OSError:
            return
        shutil.rmtree(aside, ignore_errors=True)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
