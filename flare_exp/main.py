"""The entry point's body: validate the composed config, prepare the run dir, dispatch to the stage."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from flare_exp import stages
from flare_exp.config import unknown_keys
from flare_exp.models.loading import check_model_settings
from flare_exp.runlock import RunLock
from flare_exp.runtime import (abspath, check_not_finished, clear_finished_outputs, run_with_markers,
                               write_run_metadata)

log = logging.getLogger(__name__)


def steps_of(cfg: DictConfig) -> set[str]:
    return set(cfg.stage.steps) if cfg.stage.name == "pipeline" else {cfg.stage.name}


def validate(cfg: DictConfig) -> None:
    unknown = unknown_keys(cfg)
    if unknown:
        raise ValueError(f"unknown config key(s): {'; '.join(unknown)}. `+key=value` adds a key the stages never "
                         "read; set an existing key without the +")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"these config values must be set: {', '.join(missing)} "
                         f"(e.g. python launch.py {missing[0]}=...)")
    check_reward_weights(cfg.reward)
    if cfg.experiment_name == "demo" and (cfg.model.name != "tiny" or cfg.data.name != "demo"):
        raise ValueError(
            f"experiment=demo runs demo-sized budgets (a few steps), but model={cfg.model.name} "
            f"data={cfg.data.name} were chosen. For real runs pass experiment=flare (or ~experiment) "
            "so the full training settings apply.")
    check_model_settings(cfg.model)
    steps = steps_of(cfg)
    check_one_process_per_job(uses_gpu=bool(steps & {"sft", "rl", "infer"}))
    if steps & {"sft", "rl"} and cfg.model.dtype in ("bfloat16", "float16"):
        import torch

        if not torch.cuda.is_available():  # before minutes of model loading, not transformers' "bf16/gpu" error
            raise ValueError(f"model.dtype={cfg.model.dtype}: training in half precision needs a GPU and this "
                             "machine has none; pass model.dtype=float32 (or auto) to train on the CPU")


def check_reward_weights(reward: DictConfig) -> None:
    """A NaN or infinite weight stops here, naming the key (it would poison every GRPO advantage); a negative
    one is allowed (a penalty) and said."""
    import math

    for task in ("report_generation", "classification", "multi_label", "regression"):
        for term, weight in (reward[task].weights or {}).items():
            key = f"reward.{task}.weights.{term}"
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
                raise ValueError(f"{key}={weight!r}: a reward weight must be a finite number")
            if weight < 0:
                log.warning("%s=%s is negative: the term is a penalty", key, weight)


def check_one_process_per_job(uses_gpu: bool = True) -> None:
    """A job is one process on one GPU (sweeps spread jobs over GPUs). torchrun / srun with several tasks
    would have every rank write the same markers and predictions: refuse it instead of corrupting a run, and
    say when GPUs given to the job would sit idle."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        raise ValueError(f"WORLD_SIZE={world}: flare-exp runs one process per job (one GPU). Launch "
                         "`python launch.py ...` without torchrun, keep hydra.launcher.tasks_per_node=1, and "
                         "spread work over GPUs with a sweep (-m) instead")
    if not uses_gpu:
        return
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 1:
        log.warning("this job sees %d GPUs but uses one (cuda:0); ask for one GPU per job "
                    "(hydra.launcher.gpus_per_node=1) and run a sweep to use the others",
                    torch.cuda.device_count())


def preload_backend(cfg: DictConfig) -> None:
    """Unsloth must be imported before transformers / peft / trl to patch them all: do it before any stage
    module is imported. Only for model.backend=unsloth, and only for stages that load the model."""
    if cfg.model.backend != "unsloth" or not steps_of(cfg) & {"sft", "rl", "infer"}:
        return
    from flare_exp.models.loading import require_unsloth

    require_unsloth()


def run(cfg: DictConfig, run_dir: Path | None = None):
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
    validate(cfg)
    if run_dir is None:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
    stage = cfg.stage.name
    preload_backend(cfg)
    runner = stages.get_runner(stage)
    out_dir = stages.output_dir(stage, cfg, run_dir)
    with RunLock(out_dir):  # one writer per run dir, from the first check to the last marker
        return run_locked(cfg, stage, runner, run_dir, out_dir)


def run_locked(cfg: DictConfig, stage: str, runner, run_dir: Path, out_dir: Path):
    # The pipeline reuses finished steps instead of refusing; a sweep report is only a view, regenerated.
    if stage not in ("pipeline", "sweep_report"):
        check_not_finished(out_dir, cfg.overwrite, what=f"{stage} run")
        if cfg.overwrite:
            clear_finished_outputs(out_dir)
    write_run_metadata(run_dir, cfg)
    if out_dir != run_dir:
        write_run_metadata(out_dir, cfg)
    log.info("stage=%s model=%s (%s) data=%s -> %s", stage, cfg.model.name, cfg.model.backend, cfg.data.name,
             out_dir)
    result = run_with_markers(out_dir, runner.run, cfg, out_dir)
    if out_dir != run_dir:
        run_with_markers(run_dir, lambda: result)
    print(f"\n[flare-exp] stage={stage} finished. Outputs: {out_dir}")
    return result
