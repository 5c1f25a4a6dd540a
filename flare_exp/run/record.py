"""What a run dir records about each attempt: its config, run info (commit, host, packages, what it started
from), the DONE / FAILED marker, and every earlier attempt, kept in ``attempts/NN/``.

SLURM (through submitit) reports a job whose task raised as "completed", so the marker written here is the
truth about how a run ended. FAILED carries the traceback.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import traceback
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from flare_exp.io import write_json, write_text
from flare_exp.run.layout import ATTEMPTS, CONFIG, DONE, FAILED, FINGERPRINT, HYDRA, LOCK, RUN_INFO
from flare_exp.runtime import abspath, lost_peer, world_size

log = logging.getLogger(__name__)


TRACKED_PACKAGES = ("torch", "torchvision", "transformers", "trl", "peft", "accelerate", "datasets", "unsloth",
                    "unsloth_zoo", "bitsandbytes", "radgraph", "rouge-score", "hydra-core", "omegaconf",
                    "submitit", "hydra-submitit-launcher", "wandb", "openpyxl")


class RunFinishedError(RuntimeError):
    """The run dir already holds a finished run and overwrite is off."""


class RunSettingsChangedError(RuntimeError):
    """A run dir resumed or reused with settings or inputs that decide its outputs changed, or in a state this
    launch's settings refuse (resume=never on checkpoints)."""


def git_commit() -> str | None:
    repo = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def marker(run_dir: Path) -> str | None:
    if (run_dir / DONE).exists():
        return DONE
    if (run_dir / FAILED).exists():
        return FAILED
    return None


def attempt_numbers(run_dir: Path) -> list[int]:
    """The numbers of the attempts/NN dirs there."""
    attempts = run_dir / ATTEMPTS
    return [int(p.name) for p in attempts.glob("[0-9]*") if p.name.isdigit()] if attempts.is_dir() else []


def next_attempt_dir(run_dir: Path) -> Path:
    """attempts/NN numbered after the highest one there (not by count: a user may have deleted an old one)."""
    dest = run_dir / ATTEMPTS / f"{max(attempt_numbers(run_dir), default=0) + 1:02d}"
    dest.mkdir(parents=True)
    return dest


def keep_previous_attempt(run_dir: Path, config_yaml: str) -> Path | None:
    """A run dir used again (a resumed crash or kill -9, a requeued SLURM job, a rerun with other settings):
    the earlier attempt's config.yaml, run_info.json and FAILED traceback move to attempts/NN/ instead of
    being overwritten, so what trained the first steps stays on record (its fingerprint is copied). Only a
    finished run rerun with the same config (a pipeline reusing its steps) keeps nothing new."""
    if not (run_dir / RUN_INFO).exists():
        return None
    config = run_dir / CONFIG
    if (run_dir / DONE).exists() and config.exists() and config.read_text() == config_yaml:
        return None
    dest = next_attempt_dir(run_dir)
    for name in (CONFIG, RUN_INFO, FAILED):
        if (run_dir / name).exists():
            (run_dir / name).rename(dest / name)
    for name in (FINGERPRINT, DONE):  # how it ended, too (a pipeline's new attempt clears its DONE)
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, dest / name)
    copy_hydra_record(run_dir, dest)
    return dest


def write_run_metadata(run_dir: Path, cfg: DictConfig, keep_previous: bool = True, **provenance) -> None:
    """config.yaml and run_info.json of the attempt that starts; the earlier attempt's kept first
    (``keep_previous``: the caller keeps it otherwise, a finished pipeline's record until it knows whether
    anything ran)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    # YAML text, never a pickled DictConfig: torch>=2.6 refuses to load checkpoints holding one.
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    kept = keep_previous_attempt(run_dir, config_yaml) if keep_previous else None
    if kept is not None:
        log.info("%s was used before: its earlier config, run info and any failure are kept in %s", run_dir, kept)
    write_text(run_dir / CONFIG, config_yaml)
    write_json(run_dir / RUN_INFO, {
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "host": platform.node(),
        "argv": sys.argv,
        "launch_dir": str(abspath(".")),  # where its relative paths start (a resume compares them from here)
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),  # a requeue of the same job continues it (this_jobs_attempt)
        "packages": package_versions(),
        **provenance,  # what the run started from (the adapter's path and sha256)
    })


LOST_PEER = "lost another rank of this job"  # FAILED's words (after its rank's) for a survivor of a dead rank
STOPPED = "stopped from outside"  # FAILED's first words (after a rank's) for a run preempted, cancelled, Ctrl-C'd


def was_stopped(failed_line: str | None) -> bool:
    """A FAILED's first line says its run was stopped from outside (write_failed), not that it failed."""
    return re.match(rf"(rank \d+: )?{STOPPED}", failed_line or "") is not None


def write_failed(run_dir: Path, error: BaseException, rank: int | None = None, after_a_stop=None) -> None:
    """FAILED with the error and its traceback (call it in the except block); ``rank`` names the rank of a
    data-parallel job that failed; ``after_a_stop(run_dir)``: what a rerun does after a stop (resume.py's
    wording, passed in by the run's lifecycle: run/ does not import the resume rules built on it)."""
    stopped = isinstance(error, (SystemExit, KeyboardInterrupt))  # preempted, timed out, cancelled, Ctrl-C
    named = f"{type(error).__name__}{f': {error}' if str(error) else ''}"
    first = named.splitlines()[0][:300]
    why = (f"{STOPPED} ({named}): preempted, timed out or cancelled; a requeued job or a rerun with "
           f"the same run_name {_wording_after_a_stop(run_dir, after_a_stop)}") if stopped \
        else (f"{LOST_PEER} ({first}): one was killed or crashed without a word (out of memory, SIGKILL, a node "
              f"lost); a rerun with the same run_name {_wording_after_a_stop(run_dir, after_a_stop)}"
              ) if lost_peer(error) else f"{type(error).__name__}: {error}"
    if rank is None and world_size() > 1:
        rank = int(os.environ.get("RANK", "0") or 0)
    where = f"rank {rank}: " if rank is not None else ""
    text = f"{where}{why}\n\n{traceback.format_exc()}"
    earlier = run_dir / FAILED
    if rank is not None and earlier.exists() and earlier.read_text().startswith("rank "):
        # the rank that failed first wrote its cause; the others then fail on the broken process group
        text = f"{earlier.read_text()}\n--- then {text}"
    write_text(run_dir / FAILED, text)


def _wording_after_a_stop(run_dir: Path, wording) -> str:
    """What the same command does after this stop (``wording(run_dir)``, for the config the run wrote)."""
    try:
        return (wording and wording(run_dir)) or "runs it again"
    except Exception:  # noqa: BLE001  (the wording only: writing FAILED never fails on it)
        return "runs it again"


# Hydra writes its record of a launch (.hydra/*.yaml) into the run dir before any check of ours, so a launch
# refused there (a finished run, other settings, another writer) would leave the run dir's record describing the
# refused launch. A copy of the record of the launch the run dir accepted is kept beside it and put back.
ACCEPTED_HYDRA = "accepted"


# This launch's own record as Hydra wrote it at the job's start, kept in memory (remember_launch): a second
# launch of the same run dir a few ms later overwrites .hydra/ on disk before this one is accepted
_LAUNCH_RECORD: dict = {}


def remember_launch(cfg: DictConfig) -> None:
    """At the job's start (before anything changes ``cfg``): the texts Hydra wrote into .hydra/ for this launch
    (its config.yaml, hydra.yaml and overrides.yaml are OmegaConf's YAML of these very objects)."""
    from hydra.core.hydra_config import HydraConfig

    _LAUNCH_RECORD.clear()
    if not HydraConfig.initialized() or HydraConfig.get().output_subdir is None:
        return
    hydra = HydraConfig.instance().cfg
    _LAUNCH_RECORD.update({"dir": Path(HydraConfig.get().runtime.output_dir), "config.yaml": OmegaConf.to_yaml(cfg),
                           "hydra.yaml": OmegaConf.to_yaml(hydra),
                           "overrides.yaml": OmegaConf.to_yaml(hydra.hydra.overrides.task)})


def keep_hydra_record(run_dir: Path) -> None:
    """After this launch is accepted into run_dir: its own record put in .hydra/ (from memory: another launch
    refused a moment later may have written its own there) and a copy kept in .hydra/accepted/."""
    if _LAUNCH_RECORD.get("dir") == run_dir:
        for name, text in _LAUNCH_RECORD.items():
            if name != "dir":
                write_text(run_dir / HYDRA / name, text)
    _copy_yaml_files(run_dir / HYDRA, run_dir / HYDRA / ACCEPTED_HYDRA)


def restore_hydra_record(run_dir: Path) -> None:
    """A launch into run_dir was refused: Hydra's record of the launch the run dir accepted, put back (the
    refused launch's record goes; nothing of it ran). A run dir from before these copies keeps what it has."""
    _copy_yaml_files(run_dir / HYDRA / ACCEPTED_HYDRA, run_dir / HYDRA)


def _copy_yaml_files(source: Path, dest: Path) -> None:
    for yaml in source.glob("*.yaml") if source.is_dir() else []:
        write_text(dest / yaml.name, yaml.read_text())


# Kept in place when an attempt moves to attempts/NN: the lock, the record of earlier attempts, Hydra's own
# files and the job's log (open for writing by this very process).
_STAYS = {LOCK, ATTEMPTS, HYDRA, ".submitit"}


def this_jobs_attempt(run_dir: Path) -> bool:
    """Whether the attempt recorded in ``run_dir`` was started by this very SLURM job (its run_info.json): the
    job was preempted and requeued, and under overwrite=true the requeue continues what it started instead of
    moving its own work to attempts/ (or redoing a step it finished) at every requeue."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    try:
        return json.loads((run_dir / RUN_INFO).read_text(encoding="utf-8")).get("slurm_job_id") == job
    except (OSError, ValueError, AttributeError):
        return False


def attempt_files(run_dir: Path) -> list[Path]:
    """What an earlier attempt left in run_dir (all but what stays in place)."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir()
                  if p.name not in _STAYS and not p.name.startswith(LOCK) and not p.name.endswith(".log"))


def archive_attempt(run_dir: Path) -> Path:
    """Move everything an earlier attempt left in run_dir (outputs, checkpoints, markers, metadata) to
    attempts/NN/: a rename, so it is instant and nothing is deleted."""
    files = attempt_files(run_dir)  # before attempts/NN is made
    dest = next_attempt_dir(run_dir)
    write_json(dest / MOVING, [p.name for p in files])  # the plan first: a kill mid-move is finished by the next
    _move_in(run_dir, dest, [p.name for p in files])   # launch (finish_interrupted_move), not left split
    return dest


MOVING = ".moving.json"  # in attempts/NN/ while an attempt moves there: the names still to move


def _move_in(run_dir: Path, dest: Path, names: list[str]) -> None:
    for name in names:
        if (run_dir / name).exists() or (run_dir / name).is_symlink():
            shutil.move(str(run_dir / name), str(dest / name))
    copy_hydra_record(run_dir, dest)
    (dest / MOVING).unlink(missing_ok=True)


def finish_interrupted_move(run_dir: Path) -> list[Path]:
    """An earlier attempt's move into attempts/NN/ a kill cut short (overwrite=true's): the rest moved there too,
    so its files are not split between the run dir and its record (a rerun took the rest for a run to resume).
    The dirs one level down too: a pipeline's steps, whose earlier attempts its overwrite=true moves (under the
    pipeline's lock). Under the run's lock; the attempt dirs finished."""
    import json

    done = []
    for plan in sorted([*run_dir.glob(f"{ATTEMPTS}/*/{MOVING}"), *run_dir.glob(f"*/{ATTEMPTS}/*/{MOVING}")]):
        try:
            names = [n for n in json.loads(plan.read_text()) if isinstance(n, str) and "/" not in n]
        except (OSError, ValueError, TypeError):  # cut while written: nothing had moved yet
            plan.unlink(missing_ok=True)
            continue
        _move_in(plan.parent.parent.parent, plan.parent, names)
        done.append(plan.parent)
    return done


def copy_hydra_record(run_dir: Path, dest: Path) -> None:
    """Hydra's record of the launch an earlier attempt ran under (.hydra/ itself stays), into attempts/NN/."""
    accepted = run_dir / HYDRA / ACCEPTED_HYDRA
    if accepted.is_dir() and not (dest / HYDRA).exists():
        shutil.copytree(accepted, dest / HYDRA)
