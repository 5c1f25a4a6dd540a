"""Finding and describing checkpoints: run dirs, Trainer checkpoint-N dirs, final adapters.

Every adapter we save carries ``flare_exp_checkpoint.json``: the base model path, the resolved config (YAML
text, never a pickled DictConfig) and the data fingerprints, so any stage can load it back from the path alone.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from flare_exp.io import write_json

META = "flare_exp_checkpoint.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")
_RANK_RNG = re.compile(r"^rng_state_\d+\.pth$")


COMPLETE = "flare_exp_complete.json"  # written last into a checkpoint: every file and its size
# What a resume restores besides the weights: without them training goes on with a fresh optimizer or schedule.
TRAINING_STATE = ("trainer_state.json", "optimizer.pt", "scheduler.pt")
log = logging.getLogger(__name__)


def mark_complete(checkpoint: Path) -> None:
    """Record that ``checkpoint`` is whole: called after the Trainer (and our metadata) wrote every file. Each
    file's size and sha256: a resume checks the bytes too (a file damaged in place keeps its size)."""
    from flare_exp.io import file_digest

    # each rank of a data-parallel job writes its own rng_state_<rank>.pth, maybe still while rank 0 marks
    written = [p for p in sorted(checkpoint.rglob("*")) if p.is_file() and p.name != COMPLETE
               and not _RANK_RNG.match(p.name)]
    write_json(checkpoint / COMPLETE, {"files": {str(p.relative_to(checkpoint)): p.stat().st_size for p in written},
                                       "sha256": {str(p.relative_to(checkpoint)): file_digest(p) for p in written}})


def incomplete(checkpoint: Path, verify: bool = False, only: tuple[str, ...] | None = None) -> str | None:
    """Why ``checkpoint`` cannot be used (its marker missing: cut short while saving; a file missing or of
    another size than was written; with ``verify``, one whose bytes changed since: damaged in place), or None when
    it is whole. ``verify`` reads every file: for a checkpoint about to be used, not for listings. ``only``: those
    files alone (a final/ adapter's weights: its config may be edited on purpose, the fingerprint sees that)."""
    from flare_exp.io import file_digest

    try:
        record = json.loads((checkpoint / COMPLETE).read_text())
        files, digests = record["files"], record.get("sha256") or {}  # a marker of before the digests: sizes
    except FileNotFoundError:
        return f"no {COMPLETE} (cut short while saving)"
    except (ValueError, KeyError, OSError, AttributeError, TypeError) as e:
        return f"{COMPLETE} unreadable ({e})"
    for name, size in files.items():
        if only is not None and name not in only:
            continue
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
        if verify and name in digests and file_digest(path) != digests[name]:
            return f"{name} differs from what was saved (its sha256 changed: damaged on disk or edited since)"
    return None


def checkpoint_step(path: Path) -> int | None:
    """N of a Trainer's checkpoint-N, None for any other name."""
    found = _CKPT.match(path.name)
    return int(found.group(1)) if found else None


def numbered_checkpoints(run_dir: Path) -> list[Path]:
    if not run_dir.is_dir():
        return []
    found = [(step, p) for p in run_dir.iterdir() if (step := checkpoint_step(p)) is not None and p.is_dir()]
    return [p for _, p in sorted(found)]


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The complete Trainer checkpoints under ``run_dir``, oldest first."""
    return [p for p in numbered_checkpoints(run_dir) if incomplete(p) is None]


def check_training_state(checkpoint: Path) -> None:
    """A resume restores the optimizer and the schedule too: refuse one that would silently restart them."""
    for name in TRAINING_STATE:
        if not (checkpoint / name).is_file():
            raise FileNotFoundError(
                f"{checkpoint / name} is missing: resuming from {checkpoint.name} would go on with a fresh "
                f"{name.split('.')[0].replace('_state', ' state')} and say nothing. Resume from another checkpoint "
                "(resume=<path>), or start afresh (overwrite=true; the earlier attempt moves to attempts/NN/)")


def checkpoint_choice(run_dir: Path, up_to: int | None = None) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint in ``run_dir`` (None when there is none) and the newer ones passed over on
    the way, each with why, newest first. ``up_to``: a budget (max_steps) lowered since: the checkpoints past it
    are passed over, so the adapter is the budget's, not a longer run's. Every file is read (verify): for a
    resume, not for listings. Nothing is logged or moved: the caller says (and files away) what was skipped."""
    skipped = []
    for checkpoint in reversed(numbered_checkpoints(run_dir)):
        if up_to and up_to > 0 and (checkpoint_step(checkpoint) or 0) > up_to:
            skipped.append((checkpoint, f"past max_steps={up_to} (the budget was lowered since it was saved)"))
            continue
        why = incomplete(checkpoint, verify=True)
        if why is None:
            return checkpoint, skipped
        skipped.append((checkpoint, why))
    return None, skipped


def newest_complete(run_dir: Path, up_to: int | None = None) -> Path | None:
    """``checkpoint_choice``'s checkpoint, its training state checked, the ones skipped logged with why (a
    resume files them away too: resume.resume_checkpoint); None when there is none."""
    taken, skipped = checkpoint_choice(run_dir, up_to)
    for checkpoint, why in skipped:
        log.warning("skipping %s: %s", checkpoint, why)
    if taken is not None:
        check_training_state(taken)
    elif skipped:
        log.warning("no complete checkpoint left in %s (%d skipped, said above): training starts again from step 0",
                    run_dir, len(skipped))
    return taken


ALLOW_INTERMEDIATE = "allow_intermediate_checkpoint"  # the key that lets a stage start from a checkpoint-N
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def _is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").exists()


def resolve_adapter(path: str | Path) -> Path:
    """The adapter a path means: an adapter dir itself (final/, a checkpoint-N/, one saved elsewhere); a
    training run dir's finished final/ adapter; a pipeline dir's last training step (rl, else sft). A run that
    did not finish is refused: its checkpoints are intermediate and are taken only when named on purpose."""
    path = Path(path)
    if _is_adapter(path):
        return path
    step = next((path / s for s in ("rl", "sft") if (path / s).is_dir()), None)  # a pipeline: rl runs after sft
    if step is not None:
        return resolve_adapter(step)
    ours = (path / "run_info.json").exists()  # a run dir of ours: DONE says it finished
    if _is_adapter(path / "final") and (not ours or (path / "DONE").exists()):
        return path / "final"
    if ours and (path / "DONE").exists() and not numbered_checkpoints(path):
        raise FileNotFoundError(
            f"{path} is a finished run that trained nothing (no final/ adapter, no checkpoint: an infer, eval or "
            "prepare run?). Point it at an sft or rl run dir, a pipeline dir, or an adapter dir.")
    if ours and (path / "DONE").exists():
        raise FileNotFoundError(
            f"{path} is a finished run whose final/ adapter is missing (deleted or moved since): restore final/, or "
            f"use one of its checkpoints on purpose ({path}/checkpoint-N with {ALLOW_INTERMEDIATE}=true)")
    if ours or numbered_checkpoints(path):
        ckpts = numbered_checkpoints(path)
        raise FileNotFoundError(
            f"{path} is an unfinished run (no DONE marker{', no final/ adapter' if not _is_adapter(path / 'final') else ''}"
            f"{f'; checkpoints: {ckpts[0].name} .. {ckpts[-1].name}' if ckpts else ''}): finish it (rerun it with "
            f"the same run_name), or use one of its checkpoints on purpose: point at {path}/checkpoint-N and pass "
            f"{ALLOW_INTERMEDIATE}=true.")
    raise FileNotFoundError(
        f"{path}: no LoRA adapter here (looked for adapter_config.json, final/, rl/ and sft/ of a pipeline). "
        "Point it at an sft/rl run dir, a pipeline dir, or an adapter dir.")


def chosen_adapter(key: str, path: str | Path, allow_intermediate: bool) -> Path:
    """The adapter ``key`` names (resolve_adapter), an intermediate checkpoint-N only with ``allow_intermediate``
    and only when whole."""
    adapter = resolve_adapter(path)
    intermediate = bool(_CKPT.match(adapter.name) or _CKPT.match(adapter.resolve().name))  # a link to one is one
    if intermediate:
        if not allow_intermediate:
            raise ValueError(f"{key}={path} is an intermediate checkpoint ({adapter.resolve().name}) of a training "
                             f"run, not its final adapter: pass {ALLOW_INTERMEDIATE}=true to use it on purpose, or "
                             "point at the finished run dir")
        why = incomplete(adapter, verify=True)
        if why:
            raise FileNotFoundError(f"{key}={path}: {adapter} is not a complete checkpoint: {why}")
    run_dir = adapter.resolve().parent
    if adapter.resolve().name in ("final", "best") and (run_dir / "run_info.json").exists() and not (
            run_dir / "DONE").exists() and not allow_intermediate:  # as its run dir named whole is refused
        raise ValueError(f"{key}={path} is the {adapter.resolve().name}/ adapter of an unfinished run ({run_dir}: no "
                         "DONE marker; the resume may still change it): finish it (rerun it with the same run_name), "
                         f"or pass {ALLOW_INTERMEDIATE}=true to use it as it is")
    from flare_exp.models.checkpoint_files import torn_side_file

    damaged = unreadable_weights(adapter) or torn_side_file(adapter)
    if damaged:
        raise ValueError(f"{key}={path}: {damaged}")
    # a training's final/ records its files' digests too (a checkpoint's were all read above): weights damaged in
    # place since (same size, still read)
    why = incomplete(adapter, verify=True, only=WEIGHTS) if not intermediate and (adapter / COMPLETE).is_file() \
        else None
    if why:
        raise ValueError(f"{key}={path}: {adapter} is not as its training saved it: {why}. Copy it again from "
                         "where it was trained (or train it again)")
    return adapter


def unreadable_weights(adapter: Path) -> str | None:
    """Why an adapter's safetensors weights cannot be read (cut short by a copy, damaged), found from the file's
    header and size before any model is loaded; None when they can (or are in another format)."""
    weights = adapter / WEIGHTS[0]
    if not weights.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="numpy") as f:  # the header and size only: no torch to import
            f.keys()
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types for a bad file)
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        return (f"the LoRA adapter's weights {weights} cannot be read ({first}): cut short or damaged; copy them "
                "again from where they were trained")
    return None


def checkpoint_label(checkpoint: str | None) -> str:
    """The predictions' label: the adapter's run (a pipeline's step: pipeline/step), "base" without one."""
    if not checkpoint:
        return "base"
    path = Path(checkpoint)
    parts = [p for p in path.parts[-3:] if p not in ("final",)]
    return "/".join(parts[-2:]) if parts else path.name


def adapter_identity(adapter: Path | None) -> dict | None:
    """What names an adapter in every output: its path and the sha256 of its weights file."""
    if adapter is None:
        return None
    from flare_exp.io import file_fingerprint

    weights = next((adapter / n for n in WEIGHTS if (adapter / n).exists()), None)
    return {"path": str(adapter), "sha256": file_fingerprint(weights)["sha256"] if weights else None}


def read_meta(adapter_dir: Path) -> dict:
    meta = adapter_dir / META
    if meta.exists():
        return json.loads(meta.read_text())
    cfg = adapter_dir / "adapter_config.json"
    base = json.loads(cfg.read_text()).get("base_model_name_or_path") if cfg.exists() else None
    return {"base_model_path": base}


def write_meta(adapter_dir: Path, base_model_path: str, config_yaml: str, **extra) -> None:
    write_json(adapter_dir / META, {"base_model_path": base_model_path, "config_yaml": config_yaml, **extra})


# PEFT writes these sets as lists in a Python set's order, which follows the process's hash seed: the same
# adapter's adapter_config.json would differ byte for byte between two runs, and so would its sha256 in the
# fingerprint of every stage that starts from it (a reuse refused for nothing)
UNORDERED_ADAPTER_KEYS = ("target_modules", "exclude_modules", "modules_to_save")


def sort_adapter_config(adapter_dir: Path) -> None:
    """Rewrite ``adapter_dir``'s adapter_config.json with its unordered lists sorted (PEFT reads them as sets):
    an adapter trained twice the same way has the same config bytes."""
    import json

    from flare_exp.io import write_text

    path = Path(adapter_dir) / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # none, or not PEFT's: left as it is
    if not isinstance(config, dict):
        return
    changed = False
    for key in UNORDERED_ADAPTER_KEYS:
        value = config.get(key)
        if isinstance(value, list) and all(isinstance(v, str) for v in value) and value != sorted(value):
            config[key], changed = sorted(value), True
    if changed:
        write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")
