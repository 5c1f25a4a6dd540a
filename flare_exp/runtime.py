"""What every run leaves in its run dir: resolved config, git commit, package versions, DONE/FAILED marker.

SLURM (through submitit) reports a job whose task raised as "completed", so the marker written here is the
truth about how a run ended. FAILED carries the traceback.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from flare_exp.io import write_json, write_text

log = logging.getLogger(__name__)

DONE = "DONE"
FAILED = "FAILED"
FINGERPRINT = "fingerprint.json"  # what decides a resumable stage's outputs (flare_exp/resume.py)
TRACKED_PACKAGES = ("torch", "torchvision", "transformers", "trl", "peft", "accelerate", "datasets", "unsloth",
                    "unsloth_zoo", "bitsandbytes", "radgraph", "rouge-score", "hydra-core", "omegaconf",
                    "submitit", "hydra-submitit-launcher", "wandb", "openpyxl")


class RunFinishedError(RuntimeError):
    """The run dir already holds a finished run and overwrite is off."""


def world_size() -> int:
    """How many ranks this job has (torchrun / accelerate / a SLURM job's tasks set WORLD_SIZE); 1 alone."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def ranks() -> tuple[int, int]:
    """(rank, world size) of a data-parallel job whose process group is up (main.run_distributed), else (0, 1)."""
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a one-process job)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def follow_rank_0(run_dir: Path, rank: int, fn=None, *args):
    """A rank > 0 of a data-parallel job: wait until rank 0 has checked the run dir (and moved an earlier
    attempt away), run ``fn(*args)`` (None: nothing, rank 0 alone works), leave FAILED naming this rank if it
    fails, then wait until every rank is done."""
    barrier()
    try:
        result = fn(*args) if fn is not None else None
    except BaseException as e:
        write_failed(run_dir, e, rank=rank)
        raise
    barrier()
    return result


def infer_input_file(cfg) -> str:
    """What infer reads: infer.input_file, else the prepared split (``${data.prepared_dir}/<infer.split>.jsonl``)."""
    return cfg.infer.input_file or f"{cfg.data.prepared_dir}/{cfg.infer.split}.jsonl"


def abspath(path: str | Path) -> Path:
    """Resolve a config path against the directory launch.py was started from."""
    return Path(to_absolute_path(str(path)))


def is_compilation_error(error: BaseException) -> bool:
    """An error raised by torch.compile (dynamo tracing or inductor code generation), not by the model."""
    return type(error).__module__.startswith(("torch._dynamo", "torch._inductor"))


def check_choice(key: str, value, choices) -> None:
    """A setting that takes one of a few names: a clear error naming the key and the names."""
    if value not in choices:
        names = [str(c) for c in choices]
        raise ValueError(f"{key}={value!r}: choose {', '.join(names[:-1])} or {names[-1]}")


def retry_uncompiled(call, turn_compilation_off, what: str, then: str):
    """``call()``; if torch.compile fails inside it (another GPU, another torch), warn once, turn compilation
    off and call again, so a run goes on uncompiled instead of dying."""
    try:
        return call()
    except Exception as e:
        if not is_compilation_error(e):
            raise
        first_line = str(e).splitlines()[0][:200] if str(e) else ""
        log.warning("compiling %s failed (%s: %s); %s", what, type(e).__name__, first_line, then)
        turn_compilation_off()
        return call()


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


def next_attempt_dir(run_dir: Path) -> Path:
    """attempts/NN numbered after the highest one there (not by count: a user may have deleted an old one)."""
    attempts = run_dir / "attempts"
    numbers = [int(p.name) for p in attempts.glob("[0-9]*") if p.name.isdigit()] if attempts.is_dir() else []
    dest = attempts / f"{max(numbers, default=0) + 1:02d}"
    dest.mkdir(parents=True)
    return dest


def keep_previous_attempt(run_dir: Path, config_yaml: str) -> Path | None:
    """A run dir used again (a resumed crash or kill -9, a requeued SLURM job, a rerun with other settings):
    the earlier attempt's config.yaml, run_info.json and FAILED traceback move to attempts/NN/ instead of
    being overwritten, so what trained the first steps stays on record (its fingerprint is copied). Only a
    finished run rerun with the same config (a pipeline reusing its steps) keeps nothing new."""
    if not (run_dir / "run_info.json").exists():
        return None
    config = run_dir / "config.yaml"
    if (run_dir / DONE).exists() and config.exists() and config.read_text() == config_yaml:
        return None
    dest = next_attempt_dir(run_dir)
    for name in ("config.yaml", "run_info.json", FAILED):
        if (run_dir / name).exists():
            (run_dir / name).rename(dest / name)
    if (run_dir / FINGERPRINT).exists():
        shutil.copy2(run_dir / FINGERPRINT, dest / FINGERPRINT)
    return dest


def write_run_metadata(run_dir: Path, cfg: DictConfig, **provenance) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    # YAML text, never a pickled DictConfig: torch>=2.6 refuses to load checkpoints holding one.
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    kept = keep_previous_attempt(run_dir, config_yaml)
    if kept is not None:
        log.info("%s was used before: its earlier config, run info and any failure are kept in %s", run_dir, kept)
    write_text(run_dir / "config.yaml", config_yaml)
    write_json(run_dir / "run_info.json", {
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "host": platform.node(),
        "argv": sys.argv,
        "packages": package_versions(),
        **provenance,  # what the run started from (the adapter's path and sha256)
    })


def write_failed(run_dir: Path, error: BaseException, rank: int | None = None) -> None:
    """FAILED with the error and its traceback (call it in the except block); ``rank`` names the rank of a
    data-parallel job that failed."""
    stopped = isinstance(error, (SystemExit, KeyboardInterrupt))  # preempted, timed out, cancelled, Ctrl-C
    why = (f"stopped from outside ({type(error).__name__} {error}): preempted, timed out or cancelled; a "
           "requeued job or a rerun with the same run_name resumes") if stopped else f"{type(error).__name__}: {error}"
    if rank is None and world_size() > 1:
        rank = int(os.environ.get("RANK", "0") or 0)
    where = f"rank {rank}: " if rank is not None else ""
    text = f"{where}{why}\n\n{traceback.format_exc()}"
    earlier = run_dir / FAILED
    if rank is not None and earlier.exists() and earlier.read_text().startswith("rank "):
        # the rank that failed first wrote its cause; the others then fail on the broken process group
        text = f"{earlier.read_text()}\n--- then {text}"
    write_text(run_dir / FAILED, text)


def run_with_markers(run_dir: Path, fn, *args, after_clearing=None, **kwargs):
    """Run ``fn`` and leave DONE (with its result summary) or FAILED (with the traceback) in ``run_dir``.
    ``after_clearing`` runs once the old markers are gone (a data-parallel job's ranks start there)."""
    for name in (DONE, FAILED):
        (run_dir / name).unlink(missing_ok=True)
    if after_clearing is not None:
        after_clearing()
    start = time.time()
    try:
        result = fn(*args, **kwargs)
    except BaseException as e:
        write_failed(run_dir, e)
        raise
    write_json(run_dir / DONE, {"seconds": round(time.time() - start, 2),
                                "finished": _dt.datetime.now().isoformat(timespec="seconds"),
                                "result": result if isinstance(result, (dict, list, str, int, float)) else None})
    return result
