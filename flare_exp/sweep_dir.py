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


DEFAULT_SUBDIR = "${hydra.job.num}"  # conf/config.yaml's: a job's dir is its number
_ID_AT_LAUNCH = "flare-exp-job-id-known-only-at-submission"


def job_dirs(hydra_context, config, job_overrides, initial_job_idx: int, ids_known: bool) -> list[Path]:
    """Each job's dir as Hydra's run_job names it: hydra.sweep.dir / hydra.sweep.subdir, a custom subdir resolved
    with the job's own overrides and number (``${hydra.job.override_dirname}``, ...): the checks look at the
    dirs the jobs will write, the watch at the markers they will leave. Refused (exit 2, nothing launched) where
    the subdir names what only the submission decides (submitit's ``${hydra.job.id}``: ``ids_known`` False) or
    gives several jobs one dir."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    sweep_dir = Path(str(config.hydra.sweep.dir))
    numbers = range(initial_job_idx, initial_job_idx + len(job_overrides))
    subdir = OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir")
    if subdir == DEFAULT_SUBDIR:
        return [sweep_dir / str(n) for n in numbers]
    dirs, saved = [], HydraConfig.instance().cfg
    try:
        for n, overrides in zip(numbers, job_overrides):
            cfg = hydra_context.config_loader.load_sweep_config(config, list(overrides))
            with open_dict(cfg):
                cfg.hydra.job.num, cfg.hydra.job.id = n, n if ids_known else _ID_AT_LAUNCH
            HydraConfig.instance().set_config(cfg)  # what a ${hydra:...} in the subdir reads
            try:
                named = str(OmegaConf.select(cfg, "hydra.sweep.subdir", throw_on_missing=True))
            except Exception as e:  # noqa: BLE001  (an interpolation to nothing: Hydra would fail each job on it)
                exit_with(f"hydra.sweep.subdir={subdir} does not resolve for job #{n} ({type(e).__name__}: {e}); "
                          "nothing was launched", 2)
            if _ID_AT_LAUNCH in named:
                exit_with(f"hydra.sweep.subdir={subdir} names each job's dir by its submitit job id, which only the "
                          "submission decides: the checks could not look at the dirs before launching, and a "
                          "relaunch would start every job afresh in new dirs instead of resuming. Name the dirs by "
                          f"what the job is: {DEFAULT_SUBDIR} (the default) or the swept values (e.g. "
                          "seed_${seed}); nothing was launched", 2)
            dirs.append(sweep_dir / named)
            inside = os.path.normpath(os.path.abspath(dirs[-1]))
            if not inside.startswith(os.path.abspath(sweep_dir) + os.sep):
                exit_with(f"hydra.sweep.subdir={subdir} puts job #{n}'s dir at {inside}, outside the sweep dir "
                          f"{os.path.abspath(sweep_dir)}: its report and stage=runs would not find it there, and it "
                          "could land in another sweep's or run's dir. Keep the subdir inside (no '..', no absolute "
                          "path); nothing was launched", 2)
    finally:
        HydraConfig.instance().cfg = saved
    _refuse_shared_dirs(dirs, subdir, initial_job_idx)
    return dirs


def _refuse_shared_dirs(dirs: list[Path], subdir: str, initial_job_idx: int) -> None:
    where: dict[str, list[int]] = {}
    for n, job_dir in enumerate(dirs, start=initial_job_idx):
        where.setdefault(os.path.normpath(os.path.abspath(job_dir)), []).append(n)
    shared = {d: jobs for d, jobs in where.items() if len(jobs) > 1}
    if shared:
        lines = [f"  {d}: jobs {', '.join(f'#{n}' for n in jobs)}" for d, jobs in shared.items()]
        exit_with(f"hydra.sweep.subdir={subdir} gives several jobs one dir, where each would refuse or take over "
                  f"the other's run:\n" + "\n".join(lines) + f"\nName each job's dir apart ({DEFAULT_SUBDIR}, the "
                  "default, or by the swept values, e.g. seed_${seed}); nothing was launched", 2)

