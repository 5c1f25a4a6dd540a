"""Every check of the settings, and of what this machine must hold for them, made before any work: all problems
reported in one message (main.run and the sweep launcher call ``validate`` / ``setting_problems``)."""
from __future__ import annotations

import logging
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from flare_exp import setting_checks
from flare_exp.config import Config
from flare_exp.context_checks import length_checks
from flare_exp.data.prepare_inputs import check_prepared_questions
from flare_exp.models.loading import check_model_settings
from flare_exp.reward_config import check_reward_weights
from flare_exp.run.layout import DONE
from flare_exp.run.names import check_run_name
from flare_exp.run.stage import declared_stages, several_ranks, stage
from flare_exp.runtime import SettingProblems, abspath, world_size

log = logging.getLogger(__name__)


def steps_of(cfg: DictConfig) -> set[str]:
    return set(cfg.stage.steps) if cfg.stage.name == "pipeline" else {cfg.stage.name}


def _loading_model(steps: set[str]) -> bool:
    return any(declared.loads_model for name, declared in declared_stages().items() if name in steps)


def validate(cfg: DictConfig, inputs: bool = False) -> None:
    """Every problem with the settings (and, with ``inputs``, what this machine must hold for them: the
    backend's package, the model, every input path) checked before any work and reported in one message: a
    first real run must not fail once per wrong setting."""
    problems = problems_of(cfg, inputs=inputs, preload=inputs)
    if problems:
        raise settings_error(problems)


def problems_of(cfg: DictConfig, inputs: bool = False, preload: bool = False) -> list[Exception]:
    """The settings' problems (``preload``: the backend's package imported too) and, with ``inputs``, the
    missing paths; a path built from a wrong setting is not a second problem (infer.split=tset: no tset.jsonl)."""
    problems = setting_problems(cfg, preload=preload)
    if inputs:
        named = {problem_key(p) for p in problems}
        problems += [p for p in input_problems(cfg) if problem_key(p) not in named]
    return problems


def problem_key(problem: Exception) -> str | None:
    """The setting a problem's message starts with ("infer.split='tset': ..."), if any."""
    found = re.match(r"([\w.]+)=", str(problem))
    return found.group(1) if found else None


def named_with_files(problems: list[Exception], from_files: dict[str, Path]) -> list[Exception]:
    """A value the user's config file set (``from_files``: key -> file, config_dirs.users_files), refused by its
    range: named with the file, not read as the command line's."""
    return [ValueError(f"{p}, set in {from_files[problem_key(p)]}") if isinstance(p, ValueError)
            and problem_key(p) in from_files else p for p in problems]


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
    except SettingProblems as e:  # a stage's check: each of its refusals on its own line
        problems += e.problems
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
        problems.append(e)


def step_list_problems(cfg: DictConfig) -> list[Exception]:
    """A pipeline's stage.steps (known, each once, in order) and stage.compare, before Hydra makes a run dir."""
    problems: list[Exception] = []
    if cfg.stage.name == "pipeline":
        _collect(problems, stage("pipeline").check, cfg)
    return problems


def setting_problems(cfg: DictConfig, preload: bool = False) -> list[Exception]:
    problems: list[Exception] = step_list_problems(cfg)
    if problems:  # the checks below read every step a pipeline names
        return problems
    steps = steps_of(cfg)
    for check in (check_known_keys, check_set_values, check_demo_budget, check_half_precision, check_liger_here):
        _collect(problems, check, cfg)
    _collect(problems, check_run_name, cfg.run_name)
    _collect(problems, check_reward_weights, cfg.reward)
    _collect(problems, check_model_settings, cfg.model)
    # the GPUs this process sees: the job's own process only (a sweep's launcher sees the login node's)
    _collect(problems, check_one_process_per_job, preload and _loading_model(steps), steps, cfg.model.backend,
             cfg.stage.name == "pipeline")
    ranged = setting_checks.problems(cfg, steps, inputs=preload)  # every step's ranges, reward terms, judge paths
    problems += ranged
    _collect_presets(problems, cfg, steps)
    if preload and "infer" in steps:  # the job's own process: the GPU it names is one this machine has
        from flare_exp.models.batch_decoding import check_image_device

        _collect(problems, check_image_device, cfg.infer.image_device, True)
    if preload and not problems:  # Unsloth first (it patches transformers), then the stage modules' own checks
        _collect(problems, preload_backend, cfg)
    named = {problem_key(p) for p in problems} - {None}
    for step in sorted(steps):  # a value named above is not a second problem (sft.card_preset=huge: said once)
        problems += [p for p in _stage_problems(cfg, step, ranged) if problem_key(p) not in named]
    return list({str(p): p for p in problems}.values())  # two steps' checks saying the same words: said once


def _stage_problems(cfg: DictConfig, step: str, ranged: list) -> list[Exception]:
    """A stage's own checks (all of them: they no longer wait for the ranges to pass, so a problem there does
    not hide one here). One that trips over a value its range refused (divides by a batch of 0) is left to that
    range's line."""
    found: list[Exception] = []
    try:
        _collect(found, stage(step).check, cfg)
    except (ArithmeticError, TypeError):
        if not ranged:
            raise
    return found


def _collect_presets(problems: list, cfg: DictConfig, steps: set[str]) -> None:
    """The card presets' names, with the other problems (the stages check the rest of them later)."""
    from flare_exp.card import RL_CARD_PRESETS, SFT_CARD_PRESETS
    from flare_exp.runtime import check_choice

    if "sft" in steps:
        _collect(problems, check_choice, "sft.card_preset", cfg.sft.card_preset, SFT_CARD_PRESETS)
    if "rl" in steps:
        _collect(problems, check_choice, "rl.card_preset", cfg.rl.card_preset, RL_CARD_PRESETS)


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
    steps = steps_of(cfg) if not step_list_problems(cfg) else set()
    if steps and "prepare" not in steps and not _loading_model(steps):  # eval, runs, ...: no image is read
        missing = [k for k in missing if k != "data.root"]
    if missing:
        raise ValueError("; ".join(f"{k} must be set" + (f" ({MANDATORY_HINTS[k]})" if k in MANDATORY_HINTS else "")
                                   for k in missing) + f": python launch.py {missing[0]}=...")


def check_demo_budget(cfg: DictConfig) -> None:
    if cfg.experiment_name == "demo" and (cfg.model.name != "tiny" or cfg.data.name != "demo"):
        raise ValueError(
            f"experiment=demo runs demo-sized budgets (a few steps), but model={cfg.model.name} "
            f"data={cfg.data.name} were chosen. For real runs pass experiment=flare (or ~experiment) "
            "so the full training settings apply.")


def _trains(cfg: DictConfig) -> bool:
    return any(s.trains for name, s in declared_stages().items() if name in steps_of(cfg))


def check_half_precision(cfg: DictConfig) -> None:
    if _trains(cfg) and cfg.model.dtype in ("bfloat16", "float16"):
        import torch

        if not torch.cuda.is_available():  # before minutes of model loading, not transformers' "bf16/gpu" error
            raise ValueError(f"model.dtype={cfg.model.dtype}: training in half precision needs a GPU and this "
                             "machine has none; pass model.dtype=float32 (or auto) to train on the CPU")


def check_liger_here(cfg: DictConfig) -> None:
    """Liger's kernels train only (inference loads without them), and only on a GPU: said before any step runs."""
    if _trains(cfg) and cfg.model.liger_kernel and cfg.model.backend == "hf":
        import torch

        from flare_exp.models.liger import GPU_ONLY

        if not torch.cuda.is_available():
            raise ValueError(GPU_ONLY)


def input_problems(cfg: DictConfig) -> list[Exception]:
    """The paths a run reads that must exist before it starts (those an earlier step of a pipeline writes
    are left to that step)."""
    from flare_exp.models.loading import check_model_path

    problems: list[Exception] = []
    if step_list_problems(cfg):  # said by setting_problems; the paths below depend on the steps
        return problems
    steps = steps_of(cfg)
    if any(stage(name).record != "none" for name in steps if name in declared_stages()):  # it makes a run dir
        run_dir = abspath(cfg.paths.output_root) / "runs" / str(OmegaConf.select(cfg, "run_name", default=""))
        _collect(problems, check_writable, "paths.output_root", cfg.paths.output_root, run_dir)
    made = (abspath(cfg.data.prepared_dir) / DONE).exists()
    finished = made and not cfg.overwrite
    if "prepare" in steps and not finished:  # a finished prepare is reused, read-only mount or not
        _collect(problems, check_writable, "data.prepared_dir", cfg.data.prepared_dir)
    if _loading_model(steps):
        _collect(problems, check_model_path, cfg.model)
    for check, *args in length_checks(cfg, steps, _loading_model(steps)):
        _collect(problems, check, *args)
    root = OmegaConf.select(cfg, "data.root", throw_on_missing=False)  # unset: check_set_values names it
    if "prepare" in steps:
        _collect(problems, _check_exists, "data.root", root, cfg.data.demo is None, MANDATORY_HINTS["data.root"])
        return problems
    if _loading_model(steps):  # the prepared records name their images relative to it (the demo's too, once made)
        _collect(problems, _check_exists, "data.root", root, cfg.data.demo is None or made,
                 "Point it at the folder stage=prepare read (the prepared records' images are under it)")
        before = len(problems)
        _collect(problems, check_prepared_images, cfg)
        if len(problems) == before:  # the images differing is said already: one data.root line
            _collect(problems, check_prepared_questions, cfg, _record_files(cfg))
    for declared in (s for name, s in declared_stages().items() if name in steps):
        if not steps & declared.written_by():  # else an earlier step of this pipeline writes them
            for key in declared.reads:
                _collect_missing(problems, declared, key, cfg)
                _collect(problems, _check_window, declared.path_of(cfg, key), cfg.data.image_window)
        _collect(problems, _check_start, cfg, declared.starts_from)
    return problems


def _check_start(cfg: DictConfig, key: str | None) -> None:
    """The adapter a stage starts from, where the user named one that exists: an adapter, a finished training
    run or a pipeline (an infer or eval run, an unfinished run, an intermediate checkpoint not allowed: refused
    at its load, after the run dir was made)."""
    from flare_exp.models.checkpoints import chosen_adapter

    value = OmegaConf.select(cfg, key) if key else None
    if value and abspath(value).exists():  # a missing path is named by the reads' check
        try:
            chosen_adapter(key, abspath(value), cfg.allow_intermediate_checkpoint)
        except FileNotFoundError as e:  # resolve_adapter's words name the path; the key comes first
            raise FileNotFoundError(f"{key}: {e}") from None


COMPARED_ROOTS: dict[tuple, str | None] = {}  # (prepared dir, record time, data.root, record files) -> why not


def check_prepared_images(cfg: DictConfig) -> None:
    """The images the prepare in data.prepared_dir recorded (inputs.json) are under this data.root with the same
    bytes: a stat each, the bytes read where size or a time differ (once per launch). A stage started on another
    root, or on the same one with an image changed since (a same-size edit too), would train on or predict for
    pictures prepare never checked and its answers were not matched to. Without a readable record nothing can
    be compared: another root than prepare's is then said in the log, as a reuse of such a dir says it."""
    from flare_exp.data.prepare_inputs import INPUTS, images_named, moved_here, prepared_summary, recorded_inputs

    prepared, value = abspath(cfg.data.prepared_dir), OmegaConf.select(cfg, "data.root", throw_on_missing=False)
    summary = prepared_summary(prepared)
    if value is None or not abspath(value).is_dir() or not summary:
        return  # no root (named by its own check) or no finished prepare there (named by the missing split)
    root, read, record = abspath(value), summary.get("data_root"), prepared / INPUTS
    files = _record_files(cfg)  # only their images matter: a root holding just the test split serves a test infer
    key = (str(prepared), record.stat().st_mtime_ns if record.is_file() else None, str(root),
           tuple((str(f), f.stat().st_mtime_ns) for f in files))
    if key not in COMPARED_ROOTS:
        recorded = recorded_inputs(prepared)
        COMPARED_ROOTS[key] = None if recorded is None else moved_here(
            prepared, root, recorded, images_named(files))
        if recorded is None and read != str(root):
            log.warning("data.root=%s is not the folder the prepare in %s read (%s), and %s is missing or unreadable, "
                        "so its images were not compared: make sure they are the same files (or prepare this "
                        "data.root again)", value, prepared, read, record)
    why = COMPARED_ROOTS[key]
    if why:
        fix = ("they changed since prepare read them: prepare again (overwrite=true, or another "
               "data.prepared_dir)" if read == str(root) else f"point data.root at the folder prepare read "
               f"({read}), or prepare this data.root into another data.prepared_dir")
        raise ValueError(f"data.root={value}: {why} (against {record}). The prepared records' images must be the "
                         f"ones prepare read: {fix}")


def _record_files(cfg: DictConfig) -> list[Path]:
    """The record files (.jsonl) the launched steps read."""
    return sorted({f for name, s in declared_stages().items() if name in steps_of(cfg) for f in s.record_files(cfg)})


def check_writable(key: str, value, where: Path | None = None) -> None:
    """A folder a run writes in (``where``: the run's own dir under it): it, or the nearest folder above it that
    exists, takes new files."""
    import os

    path = where or abspath(value)
    link = next((p for p in (path, *path.parents) if p.is_symlink() and not p.exists()), None)
    if link is not None:  # a run dir on scratch storage that was purged, an unmounted disk
        raise ValueError(f"{key}={value}: {link} is a symbolic link to {os.readlink(link)}, which does not exist, "
                         f"and this run writes {path}: mount or recreate its target, or remove the link")
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing == path and path.is_dir():  # a pipeline's step dirs inside it are written too
        existing = next((p for p in (path, *sorted(path.iterdir())) if p.is_dir() and not p.name.startswith(".")
                         and p.name != "attempts" and not os.access(p, os.W_OK | os.X_OK)), path)
    if existing is not None and not existing.is_dir():
        raise ValueError(f"{key}={value}: {existing} is a file, not a folder, and this run writes {path}; point "
                         f"{key} at a folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{key}={value}: {existing} cannot be written (a read-only mount, or no permission), and "
                         f"this run writes {path}; point {key} at a writable folder"
                         + (" or choose another run_name=" if where is not None and existing != where.parent else "")
                         + " (stage=runs only reads and works on a read-only one)")


def _check_window(path, window) -> None:
    """A set data.image_window against the window the prepared records at ``path`` were decoded with."""
    from flare_exp.data.decoding import check_records_window
    from flare_exp.io import read_jsonl

    if window is not None and isinstance(path, str) and path.endswith(".jsonl") and abspath(path).is_file():
        check_records_window(read_jsonl(abspath(path)), window, path)


def _collect_missing(problems: list, declared, key: str, cfg: DictConfig) -> None:
    """Each path ``key`` names (or, unset, the one the stage reads instead) that does not exist."""
    from flare_exp.data.prepare_inputs import check_prepare_finished

    value = declared.path_of(cfg, key)
    if key in declared.defaults and not OmegaConf.select(cfg, key):
        used = re.findall(r"\{([\w.]+)\}", declared.defaults[key])
        name = ", ".join(f"{k}={OmegaConf.select(cfg, k)}" for k in used if k != "data.prepared_dir")
        _collect(problems, _check_exists, name, value, True, f"Run stage=prepare first, or set {key}")
        _collect(problems, check_prepare_finished, key, value)
        return
    hint = "stage=prepare writes it" if key.endswith(("train_file", "val_file")) else ""
    for one in (value if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) else [value]):
        _collect(problems, _check_exists, key, one, True, hint)
        _collect(problems, check_prepare_finished, key, one)


def _check_exists(key: str, value, required: bool, hint: str) -> None:
    from flare_exp.run.lock import being_made

    if value is not None and required and not abspath(value).exists():
        path = abspath(value)
        raise FileNotFoundError(f"{key}={value}: {why_missing(path)} ({path}). {being_made(path) or hint}".strip())


def why_missing(path: Path) -> str:
    """Why a path that does not exist is not there: a link that loops, a link to nothing, or no such file."""
    import errno
    import os

    if not path.is_symlink():
        return "no such file or directory"
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13 says a loop this way
        return "a symbolic link that loops"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic link that loops"
    return f"a symbolic link to {os.readlink(path)}, which does not exist"


def check_one_process_per_job(uses_gpu: bool = True, steps: set[str] | None = None,
                              backend: str = "hf", in_pipeline: bool = False) -> None:
    """Several ranks (torchrun / accelerate launch / srun with several tasks) run the data-parallel stages
    (their declarations say ``ranks="several"``); the others run one process per job and refuse several, instead of having every rank
    write the same markers and predictions. Say when GPUs given to a one-process job would sit idle."""
    world = world_size()
    if world > 1:
        ranks = {name: s.ranks for name, s in declared_stages().items()}
        others = sorted(s for s in steps or () if ranks.get(s) != "several" and not (in_pipeline and
                                                                                   ranks.get(s) == "rank 0"))
        if others:
            raise ValueError(f"WORLD_SIZE={world}: {', '.join(others)} run(s) one process per job; only "
                             f"{', '.join(sorted(several_ranks()))} (and stage=pipeline, whose prepare runs on "
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
    if cfg.model.backend != "unsloth" or not _loading_model(steps_of(cfg)):
        return
    from flare_exp.models.loading import require_unsloth

    require_unsloth()
