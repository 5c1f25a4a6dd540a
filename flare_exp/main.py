"""The entry point's body: validate the composed config, prepare the run dir, dispatch to the stage."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from flare_exp import setting_checks, stages
from flare_exp.config import Config
from flare_exp.logs import quiet_known_messages
from flare_exp.models.loading import check_model_settings
from flare_exp.run.lifecycle import Run
from flare_exp.run.names import check_run_name
from flare_exp.run.record import write_failed
from flare_exp.runtime import abspath, infer_input_file, start_process_group, world_size

log = logging.getLogger(__name__)


def steps_of(cfg: DictConfig) -> set[str]:
    return set(cfg.stage.steps) if cfg.stage.name == "pipeline" else {cfg.stage.name}


GPU_STAGES = {"sft", "rl", "infer"}


def validate(cfg: DictConfig, inputs: bool = False) -> None:
    """Every problem with the settings (and, with ``inputs``, what this machine must hold for them: the
    backend's package, the model, every input path) checked before any work and reported in one message: a
    first real run must not fail once per wrong setting."""
    problems = setting_problems(cfg, preload=inputs) + (input_problems(cfg) if inputs else [])
    if problems:
        raise settings_error(problems)


def settings_error(problems: list[Exception]) -> Exception:
    """One problem as itself; several as one ValueError listing them all."""
    if len(problems) == 1:
        return problems[0]
    return ValueError(f"{len(problems)} problems with the settings; nothing was run:\n"
                      + "\n".join(f"  {i}. {p}" for i, p in enumerate(problems, 1)))


def _collect(problems: list, check, *args) -> None:
    from omegaconf.errors import MissingMandatoryValue

    try:
        check(*args)
    except MissingMandatoryValue:
        pass  # named once, with every other unset value
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
        problems.append(e)


def setting_problems(cfg: DictConfig, preload: bool = False) -> list[Exception]:
    problems: list[Exception] = []
    steps = steps_of(cfg)
    for check in (check_known_keys, check_set_values, check_demo_budget, check_half_precision):
        _collect(problems, check, cfg)
    _collect(problems, check_run_name, cfg.run_name)
    _collect(problems, check_reward_weights, cfg.reward)
    _collect(problems, check_model_settings, cfg.model)
    _collect(problems, check_one_process_per_job, bool(steps & GPU_STAGES), steps, cfg.model.backend,
             cfg.stage.name == "pipeline")
    ranged = setting_checks.problems(cfg, steps, inputs=preload)  # every step's ranges, reward terms, judge paths
    problems += ranged
    if preload and not problems:  # Unsloth first (it patches transformers), then the stage modules' own checks
        _collect(problems, preload_backend, cfg)
    for step in sorted(steps - {"pipeline", "sweep_report"}) if not ranged else ():  # they divide by those settings
        _collect(problems, _stage_check, step, cfg)
    return problems


def _stage_check(step: str, cfg: DictConfig) -> None:
    check = getattr(stages.get_runner(step), "check_settings", None)
    if check:
        check(cfg)


def check_known_keys(cfg: DictConfig) -> None:
    from flare_exp.config_keys import unknown_keys

    unknown = unknown_keys(cfg, Config)
    if unknown:
        raise ValueError(f"unknown config key(s): {'; '.join(unknown)}. `+key=value` adds a key the stages never "
                         "read; set an existing key without the +")


# what to put in a mandatory value (???) the user has not set
MANDATORY_HINTS = {"data.root": "Download FLARE-Task5-MLLM-2D (Xray) and point data.root at the folder holding "
                                "training/ ..."}


def check_set_values(cfg: DictConfig) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError("; ".join(f"{k} must be set" + (f" ({MANDATORY_HINTS[k]})" if k in MANDATORY_HINTS else "")
                                   for k in missing) + f": python launch.py {missing[0]}=...")


def check_demo_budget(cfg: DictConfig) -> None:
    if cfg.experiment_name == "demo" and (cfg.model.name != "tiny" or cfg.data.name != "demo"):
        raise ValueError(
            f"experiment=demo runs demo-sized budgets (a few steps), but model={cfg.model.name} "
            f"data={cfg.data.name} were chosen. For real runs pass experiment=flare (or ~experiment) "
            "so the full training settings apply.")


def check_half_precision(cfg: DictConfig) -> None:
    if steps_of(cfg) & {"sft", "rl"} and cfg.model.dtype in ("bfloat16", "float16"):
        import torch

        if not torch.cuda.is_available():  # before minutes of model loading, not transformers' "bf16/gpu" error
            raise ValueError(f"model.dtype={cfg.model.dtype}: training in half precision needs a GPU and this "
                             "machine has none; pass model.dtype=float32 (or auto) to train on the CPU")


def input_problems(cfg: DictConfig) -> list[Exception]:
    """The paths a run reads that must exist before it starts (those an earlier step of a pipeline writes
    are left to that step)."""
    from flare_exp.models.loading import check_model_path

    problems: list[Exception] = []
    steps = steps_of(cfg)
    if steps & GPU_STAGES:
        _collect(problems, check_model_path, cfg.model)
    root = OmegaConf.select(cfg, "data.root", throw_on_missing=False)  # unset: check_set_values names it
    if "prepare" in steps:
        _collect(problems, _check_exists, "data.root", root, cfg.data.demo is None, MANDATORY_HINTS["data.root"])
        return problems
    if steps & GPU_STAGES:  # the prepared records name their images relative to it
        _collect(problems, _check_exists, "data.root", root, cfg.data.demo is None,
                 "Point it at the folder stage=prepare read (the prepared records' images are under it)")
    written_before = {"rl": {"sft"}, "infer": {"sft", "rl"}, "eval": {"infer"}}  # by an earlier pipeline step
    for step, keys in STAGE_INPUTS.items():
        if step in steps and not steps & written_before.get(step, set()):
            for key in keys:
                value = OmegaConf.select(cfg, key)
                for one in (value if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) else [value]):
                    hint = "stage=prepare writes it" if key.endswith(("train_file", "val_file")) else ""
                    _collect(problems, _check_exists, key, one, True, hint)
    if "infer" in steps and not steps & written_before["infer"] and not cfg.infer.input_file:
        _collect(problems, _check_exists, f"infer.split={cfg.infer.split}", infer_input_file(cfg), True,
                 "Run stage=prepare first, or set infer.input_file")
    return problems


# the paths each stage reads, by the key that names them
STAGE_INPUTS = {"sft": ("sft.train_file", "sft.val_file", "sft.init_from"), "rl": ("rl.train_file", "rl.init_from"),
                "infer": ("infer.input_file", "infer.checkpoint"), "eval": ("eval.predictions",)}


def _check_exists(key: str, value, required: bool, hint: str) -> None:
    if value is not None and required and not abspath(value).exists():
        raise FileNotFoundError(f"{key}={value}: no such file or directory ({abspath(value)}). {hint}".strip())


def check_reward_weights(reward: DictConfig) -> None:
    """A NaN or infinite weight stops here, naming the key (it would poison every GRPO advantage); a negative
    one is allowed (a penalty) and said."""
    import math

    from flare_exp.data.records import TASK_TYPES

    for task in TASK_TYPES:
        for term, weight in (reward[task].weights or {}).items():
            key = f"reward.{task}.weights.{term}"
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
                raise ValueError(f"{key}={weight!r}: a reward weight must be a finite number")
            if weight < 0:
                log.warning("%s=%s is negative: the term is a penalty", key, weight)


def check_one_process_per_job(uses_gpu: bool = True, steps: set[str] | None = None,
                              backend: str = "hf", in_pipeline: bool = False) -> None:
    """Several ranks (torchrun / accelerate launch / srun with several tasks) run the data-parallel stages
    (stages.DISTRIBUTED); the others run one process per job and refuse several, instead of having every rank
    write the same markers and predictions. Say when GPUs given to a one-process job would sit idle."""
    world = world_size()
    if world > 1:
        others = sorted((steps or set()) - stages.DISTRIBUTED - (stages.RANK_0_STEPS if in_pipeline else set()))
        if others:
            raise ValueError(f"WORLD_SIZE={world}: {', '.join(others)} run(s) one process per job; only "
                             f"{', '.join(sorted(stages.DISTRIBUTED))} (and stage=pipeline, whose prepare runs on "
                             "rank 0) run on several ranks. Launch the others with `python launch.py ...`")
        if backend != "hf":
            raise ValueError(f"WORLD_SIZE={world}: model.backend={backend} is not supported on several ranks "
                             "(not measured); pass model.backend=hf")
        return
    if not uses_gpu:
        return
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 1:
        log.warning("this job sees %d GPUs but uses one (cuda:0); run `torchrun --nproc_per_node=%d launch.py "
                    "...` to use all of them, or ask for one GPU per job and run a sweep",
                    torch.cuda.device_count(), torch.cuda.device_count())


def preload_backend(cfg: DictConfig) -> None:
    """Unsloth must be imported before transformers / peft / trl to patch them all: do it before any stage
    module is imported. Only for model.backend=unsloth, and only for stages that load the model."""
    if cfg.model.backend != "unsloth" or not steps_of(cfg) & {"sft", "rl", "infer"}:
        return
    from flare_exp.models.loading import require_unsloth

    require_unsloth()


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
    import torch

    torch.set_num_threads(threads)


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
    adopt_slurm_ranks()
    quiet_known_messages()
    try:
        validate(cfg, inputs=True)
    except Exception as e:
        refused = Path(HydraConfig.get().runtime.output_dir) if run_dir is None else None
        # the dir Hydra made for this launch says why it stopped (the sweep report and stage=runs show it),
        # unless it holds an earlier run, whose record stays as it was
        if refused and (HydraConfig.get().mode == RunMode.MULTIRUN or not (refused / "run_info.json").exists()):
            write_failed(refused, e)
        raise
    if cfg.stage.name == "runs":  # a view of the output root: no run dir of its own
        return stages.get_runner("runs").run(cfg)
    limit_cpu_threads(OmegaConf.select(cfg, "model.cpu_threads"))
    if run_dir is None:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
    stage = cfg.stage.name
    runner = stages.get_runner(stage)
    out_dir = stages.output_dir(stage, cfg, run_dir)
    rank = start_process_group() if world_size() > 1 else 0
    # one writer per run dir, from the first check to the last marker; the stage only does its work
    with Run(cfg, stage, out_dir, run_dir, rank=rank) as this_run:
        return this_run.execute(runner.run)
