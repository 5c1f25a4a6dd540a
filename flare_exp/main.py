"""The entry point's body: the process's environment, the checks (flare_exp/checks.py), then the stage's run."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from flare_exp.checks import validate
from flare_exp.logs import quiet_known_messages, quiet_other_ranks
from flare_exp.run.layout import RUN_INFO
from flare_exp.run.lifecycle import Run
from flare_exp.run.record import remember_launch, restore_hydra_record, write_failed
from flare_exp.run.stage import stage as stage_named
from flare_exp.runtime import abspath, start_process_group, world_size

log = logging.getLogger(__name__)


def adopt_slurm_ranks() -> None:
    """A SLURM job with several tasks (hydra.launcher.tasks_per_node, nodes): each task is one rank; the
    process group's address, port, rank and world size come from submitit's job environment (the same port on
    every task, derived from the job id)."""
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) <= 1 or "WORLD_SIZE" in os.environ:
        return
    from submitit.helpers import TorchDistributedEnvironment

    env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    log.info("SLURM task %d of %d (local rank %d): process group at %s:%d", env.rank, env.world_size,
             env.local_rank, env.master_addr, env.master_port)


def limit_cpu_threads(threads: int | None) -> None:
    """model.cpu_threads: torch's intra-op threads in this process (None: torch's default)."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"model.cpu_threads={threads}: give a positive number of threads, or null for torch's "
                         "default")
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
    else:  # torch takes them from here as it starts: a stage that never needs it (eval scoring a file) skips it
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)


def run(cfg: DictConfig, run_dir: Path | None = None):
    remember_launch(cfg)  # Hydra's record of this launch, as it wrote it: put back once the run dir accepts it
    # Offline first: nothing here ever asks a model hub (compute nodes have none); every model is a local path.
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Compiled rollouts/decoding cost ~1 min per job; kernels cached beside our other caches (not in a node's
    # /tmp) let the next job of a sweep reuse them.
    cache_dir = abspath(cfg.paths.cache_dir)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir / "torch_compile"))
    # Unsloth writes its generated modules to ./unsloth_compiled_cache otherwise: into whatever directory a
    # job was submitted from, shared by every job of a sweep.
    os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", str(cache_dir / "unsloth_compiled_cache"))
    adopt_slurm_ranks()
    quiet_other_ranks()
    quiet_known_messages()
    try:
        validate(cfg, inputs=True)
    except Exception as e:
        refused = Path(HydraConfig.get().runtime.output_dir) if run_dir is None else None
        # the dir Hydra made for this launch says why it stopped (the sweep report and stage=runs show it),
        # unless it holds an earlier run, whose record stays as it was
        if refused and (HydraConfig.get().mode == RunMode.MULTIRUN or not (refused / RUN_INFO).exists()):
            write_failed(refused, e)
        elif refused:
            restore_hydra_record(refused)
        raise
    stage = stage_named(cfg.stage.name)
    if stage.record == "none":  # a view of the output root (stage=runs): no run dir of its own
        return stage.runner().run(cfg)
    limit_cpu_threads(OmegaConf.select(cfg, "model.cpu_threads"))
    if run_dir is None:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        outside_the_output_root(run_dir, abspath(cfg.paths.output_root))
    out_dir = stage.output_dir(cfg, run_dir)
    rank = start_process_group() if world_size() > 1 else 0
    # one writer per run dir, from the first check to the last marker; the stage only does its work
    with Run(cfg, stage.name, out_dir, run_dir, rank=rank) as this_run:
        return this_run.execute(stage.runner().run)


def outside_the_output_root(run_dir: Path, output_root: Path) -> None:
    """A run dir placed by hand (hydra.run.dir, hydra.sweep.dir) where the catalog does not look (stage=runs lists
    <paths.output_root>/runs/<name> and sweeps/<sweep>/<job>) runs there, said once, with the root that would list
    it where there is one."""
    from flare_exp.catalog import listed_under

    run_dir = run_dir.resolve()
    if listed_under(run_dir, output_root.resolve()):
        return
    root = next((r for r in (run_dir.parent.parent, run_dir.parent.parent.parent) if listed_under(run_dir, r)), None)
    log.warning("the run dir %s is not where stage=runs looks (<paths.output_root>/runs/<name>, or a job dir under "
                "sweeps/<sweep>/ as hydra.sweep.subdir names it, with paths.output_root=%s; hydra.run.dir or "
                "hydra.sweep.dir set by hand): it runs there, but is not listed%s", run_dir, output_root,
                f" (paths.output_root={root} lists it)" if root else "")
