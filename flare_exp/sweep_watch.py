"""What flare-exp's sweep launchers (hydra_plugins/flare_exp_launchers) add to Hydra's submitit launchers:

- every job's settings are checked before any job is launched (the same checks a single run makes,
  flare_exp.checks.setting_problems / input_problems), all problems reported together, nothing launched;
- one line per finished job (its number, overrides, DONE/FAILED, duration, headline metric) and an ETA;
- the failed jobs named at the end (the sweep exits non-zero);
- SIGTERM and SIGINT (``timeout``, ``kill``, Ctrl-C) forwarded to the local workers, which are waited for and
  killed if they linger: submitit's workers ignore SIGTERM (a SLURM pre-emption warning), so without this a
  stopped sweep leaves them running.
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


class SweepSettingsError(ValueError):
    """Some job of a sweep has settings a run would refuse; no job was launched."""


def job_config(hydra_context, master_config, overrides):
    """The config one job's task function gets (the sweep's config with the job's overrides, without the hydra
    node), composed the way the job will compose it."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    cfg = hydra_context.config_loader.load_sweep_config(master_config, list(overrides))
    HydraConfig.instance().set_config(cfg)  # what ${hydra:...} interpolations read while the checks resolve keys
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def job_problems(hydra_context, master_config, overrides, prepares: list | None = None) -> list[str]:
    """The problems a run with these overrides would stop on (settings and input paths), as text. ``prepares``:
    where this job prepares data and with what settings (``prepare_target``; None when it does not compose) is
    appended to it, once per call."""
    from hydra.core.hydra_config import HydraConfig

    from flare_exp.checks import input_problems, setting_problems

    saved, target = HydraConfig.instance().cfg, None
    try:
        cfg = job_config(hydra_context, master_config, overrides)
        target = prepare_target(cfg)
        return [str(p) for p in setting_problems(cfg) + input_problems(cfg)]
    except Exception as e:  # an override Hydra cannot compose (a wrong key or value)
        return [f"{type(e).__name__}: {e}"]
    finally:
        HydraConfig.instance().cfg = saved
        if prepares is not None:
            prepares.append(target)


def prepare_target(cfg) -> tuple | None:
    """(the data.prepared_dir a job's prepare step writes, its deciding settings), None when it prepares none."""
    from omegaconf import OmegaConf

    from flare_exp.checks import steps_of
    from flare_exp.run.fingerprint import settings_of
    from flare_exp.runtime import abspath

    if "prepare" not in steps_of(cfg):
        return None
    return abspath(cfg.data.prepared_dir).resolve(), settings_of("prepare", OmegaConf.to_container(cfg, resolve=True))


def shared_prepare_conflicts(targets: list, first_idx: int) -> list[str]:
    """Jobs that would prepare different data into one data.prepared_dir: the later one would stop at its start
    (the dir holds the first one's data, made with other settings), after the sweep launched."""
    from flare_exp.run.fingerprint import differences

    seen, out = {}, []
    for idx, target in enumerate(targets):
        if target is None:
            continue
        where, settings = target
        if where not in seen:
            seen[where] = (idx, settings)
            continue
        changed = differences({"settings": seen[where][1]}, {"settings": settings})
        if changed:
            out.append(f"  jobs #{first_idx + seen[where][0]} and #{first_idx + idx} would prepare different data "
                       f"into one data.prepared_dir={where} ({'; '.join(changed[:4])}): give each of them its own "
                       "data.prepared_dir (sweep it alongside)")
    return out


def job_names(job_overrides) -> list[str]:
    """Each job named by the overrides that tell it from the others (the swept keys), else by its last few."""
    from hydra.core.utils import filter_overrides

    pairs = [dict(o.split("=", 1) for o in filter_overrides(list(job)) if "=" in o) for job in job_overrides]
    keys = list(dict.fromkeys(k for p in pairs for k in p))
    varying = [k for k in keys if len({p.get(k) for p in pairs}) > 1] if len(pairs) > 1 else []
    return [" ".join(f"{k}={p[k]}" for k in (varying or [k for k in p if "/" not in p[k]][-4:]) if k in p)
            or "(no overrides)" for p in pairs]


def check_jobs(hydra_context, master_config, job_overrides, initial_job_idx: int) -> None:
    """Every job's problems, or a SweepSettingsError naming each job and its problems."""
    say(f"checking the settings of {len(job_overrides)} job(s) before launching any")
    bad, prepares = [], []
    names = job_names(job_overrides)
    for idx, overrides in enumerate(job_overrides):
        problems = job_problems(hydra_context, master_config, overrides, prepares)
        if problems:
            bad.append(f"  job #{initial_job_idx + idx} ({names[idx]}):\n"
                       + "\n".join(f"    - {p}" for p in problems))
    clashes = shared_prepare_conflicts(prepares, initial_job_idx)
    if bad or clashes:
        said = [f"{len(bad)} of {len(job_overrides)} jobs of the sweep have settings a run would refuse"] if bad \
            else []
        said += ["jobs of the sweep would write over each other's prepared data"] if clashes else []
        raise SweepSettingsError(" and ".join(said) + "; no job was launched:\n" + "\n".join(bad + clashes))


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
        from flare_exp.catalog import run_summary

        if i in self.reported:
            return
        self.reported[i] = status
        row = run_summary(self.job_dirs[i])
        seconds = row["seconds"] if row and row.get("seconds") is not None else time.time() - self.start
        headline = f", {row['headline']}" if row and row.get("headline") else ""
        reason = why or (row or {}).get("error")
        done, total = len(self.reported), len(self.job_dirs)
        left = total - done
        elapsed = time.time() - self.start
        eta = f"{left} left, ETA ~{elapsed / done * left:.0f} s" if left else "all finished"
        say(f"{done}/{total} #{self.job_dirs[i].name} ({self.names[i]}) {status} in {seconds:.0f} s{headline}"
            f"{f': {reason}' if status != 'DONE' and reason else ''} | {eta}")


def first_line(error) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def record_results(progress: Progress, returns) -> list[str]:
    """After the launcher's wait: a line for any job whose marker the watcher did not see, the failures kept in
    FAILURES and named together (returned)."""
    from hydra.core.utils import JobStatus

    failed = []
    for i, ret in enumerate(returns):
        ok = ret.status == JobStatus.COMPLETED
        why = None if ok else first_line(ret._return_value)
        progress.finished(i, "DONE" if ok else "FAILED", why)
        if not ok:
            FAILURES[str(progress.job_dirs[i])] = f"job #{progress.job_dirs[i].name} ({progress.names[i]}): {why}"
            failed.append(FAILURES[str(progress.job_dirs[i])])
    if failed:
        say(f"{len(failed)} of {len(returns)} job(s) FAILED (traceback in each job's FAILED file):\n  "
            + "\n  ".join(failed))
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
