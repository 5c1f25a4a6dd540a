"""The process a stage runs in: its rank among a data-parallel job's processes, their process group and
barriers; and the small helpers every stage shares (config paths, a choice check, compilation fallback).
What a run dir holds (lock, attempts, markers, fingerprint) is flare_exp/run/."""
from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

from hydra.utils import to_absolute_path

log = logging.getLogger(__name__)
RANK_WAIT_HOURS = 6


def world_size() -> int:
    """How many ranks this job has (torchrun / accelerate / a SLURM job's tasks set WORLD_SIZE); 1 alone."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _process_group():
    """torch.distributed where a process group is up, else None. A group is only ever started through it: a
    process that never imported it has none (and an eval scoring a file pays no seconds importing torch)."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def ranks() -> tuple[int, int]:
    """(rank, world size) of a data-parallel job whose process group is up (start_process_group), else (0, 1)."""
    dist = _process_group()
    return (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)


def usable_cores() -> int:
    """The CPU cores this process may run on (a SLURM job's cpus-per-task, taskset), else the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a one-process job)."""
    dist = _process_group()
    if dist is not None:
        dist.barrier()


def abspath(path: str | Path) -> Path:
    """Resolve a config path against the directory launch.py was started from."""
    return Path(to_absolute_path(str(path)))


def inside_cache(cfg, path) -> bool:
    """Whether ``path`` lies under paths.cache_dir: the only place a tiny random model or scorer is built on
    demand (a folder the user names elsewhere is never written into)."""
    from omegaconf import OmegaConf

    cache_dir = OmegaConf.select(cfg, "paths.cache_dir", default=None)
    return cache_dir is not None and abspath(path).resolve().is_relative_to(abspath(cache_dir).resolve())


# how gloo and NCCL say that a peer process went away (its socket closed, its ranks aborted)
_LOST_PEER = re.compile(r"Connection (reset|closed) by peer|gloo/transport|Broken pipe|remote process exited|"
                        r"ncclRemoteError|NCCL communicator was aborted|socket .*closed", re.IGNORECASE)


def lost_peer(error: BaseException) -> bool:
    """An error a rank of a data-parallel job gets when another rank died (killed, out of memory, a node lost)
    without a word: the survivor's collective fails on the broken connection."""
    return world_size() > 1 and (type(error).__name__ == "DistBackendError" or (
        isinstance(error, RuntimeError) and _LOST_PEER.search(str(error)) is not None))


def is_compilation_error(error: BaseException) -> bool:
    """An error raised by torch.compile (dynamo tracing or inductor code generation), not by the model."""
    return type(error).__module__.startswith(("torch._dynamo", "torch._inductor"))


def check_choice(key: str, value, choices) -> None:
    """A setting that takes one of a few names: a clear error naming the key and the names."""
    if value not in choices:
        names = [str(c) for c in choices]
        raise ValueError(f"{key}={value!r}: choose {', '.join(names[:-1])} or {names[-1]}")


class SettingProblems(ValueError):
    """Several refusals of one check (a stage's check_settings): checks.setting_problems lists each of them
    with the other problems; raised alone (a stage's own call), it reads as that list."""

    def __init__(self, problems: list[ValueError]):
        self.problems = problems
        super().__init__(f"{len(problems)} problems with the settings:\n"
                         + "\n".join(f"  {i}. {p}" for i, p in enumerate(problems, 1)))


def check_each(*checks) -> None:
    """Every check (a callable, or (callable, *args)) run and its refusal kept: one ValueError raised as itself,
    several as SettingProblems. A stage's checks raising in turn hid each refusal behind the first one."""
    found: list[ValueError] = []
    for check in checks:
        call, *args = check if isinstance(check, tuple) else (check,)
        try:
            call(*args)
        except SettingProblems as e:
            found += e.problems
        except ValueError as e:
            found.append(e)
    if len(found) == 1:
        raise found[0]
    if found:
        raise SettingProblems(found)


@contextmanager
def cpu_rng_kept(seed: int | None = None):
    """torch's CPU random state as it was, once the block ends (seeded with ``seed`` inside it, if given): what
    the block draws (a scorer's weights initialised and then loaded, a tiny model built on first use) leaves
    what a stage draws next (a LoRA's weights, GRPO's samples) unchanged, so a first run that builds or loads
    something in-process draws what a rerun draws. The CUDA generators are left alone (these blocks draw on CPU)."""
    import torch

    generator = torch.random.default_generator
    saved = generator.get_state()
    if seed is not None:
        generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(saved)


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


def start_process_group() -> int:
    """This rank's process group (NCCL on GPUs, gloo on the CPU), once per process; returns the rank."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():  # accelerate (inside the Trainer) reuses this group
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0") or 0))
        # rank 0 alone prepares (in a pipeline) and computes eval's metrics while the others wait at a barrier:
        # a longer wait than the backends' 10-30 minute default
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=_dt.timedelta(hours=RANK_WAIT_HOURS))
    return dist.get_rank()
