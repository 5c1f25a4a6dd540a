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


COMPLETE = "flare_exp_complete.json"  # written last into a checkpoint: every file and its size
# What a resume restores besides the weights: without them training goes on with a fresh optimizer or schedule.
TRAINING_STATE = ("trainer_state.json", "optimizer.pt", "scheduler.pt")
log = logging.getLogger(__name__)


def mark_complete(checkpoint: Path) -> None:
    """Record that ``checkpoint`` is whole: called after the Trainer (and our metadata) wrote every file."""
    files = {str(p.relative_to(checkpoint)): p.stat().st_size for p in sorted(checkpoint.rglob("*"))
             if p.is_file() and p.name != COMPLETE}
    write_json(checkpoint / COMPLETE, {"files": files})


def incomplete(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be used (its marker missing: cut short while saving; a file missing or of
    another size than was written), or None when it is whole."""
    try:
        files = json.loads((checkpoint / COMPLETE).read_text())["files"]
    except FileNotFoundError:
        return f"no {COMPLETE} (cut short while saving)"
    except (ValueError, KeyError, OSError) as e:
        return f"{COMPLETE} unreadable ({e})"
    for name, size in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    return None


def _numbered(run_dir: Path) -> list[Path]:
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _CKPT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The complete Trainer checkpoints under ``run_dir``, oldest first."""
    return [p for p in _numbered(run_dir) if incomplete(p) is None]


def check_training_state(checkpoint: Path) -> None:
    """A resume restores the optimizer and the schedule too: refuse one that would silently restart them."""
    for name in TRAINING_STATE:
        if not (checkpoint / name).is_file():
            raise FileNotFoundError(
                f"{checkpoint / name} is missing: resuming from {checkpoint.name} would go on with a fresh "
                f"{name.split('.')[0].replace('_state', ' state')} and say nothing. Resume from another checkpoint "
                "(resume=<path>), or start afresh (overwrite=true; the earlier attempt moves to attempts/NN/)")


def newest_complete(run_dir: Path) -> Path | None:
    """The newest complete checkpoint in ``run_dir`` (newer ones that are not are logged with why), its
    training state checked; None when there is none."""
    for checkpoint in reversed(_numbered(run_dir)):
        why = incomplete(checkpoint)
        if why is None:
            check_training_state(checkpoint)
            return checkpoint
        log.warning("skipping %s: %s", checkpoint, why)
    return None


def resolve_adapter(path: str | Path) -> Path:
    """An adapter dir from a checkpoint dir or a run dir (its final/ adapter, else the best, else the last)."""
    path = Path(path)
    if (path / "adapter_config.json").exists():
        return path
    if (path / "final" / "adapter_config.json").exists():
        return path / "final"
    for sub in ("sft", "rl"):  # a pipeline run dir
        if (path / sub / "final" / "adapter_config.json").exists():
            return path / sub / "final"
    ckpts = list_checkpoints(path)
    if ckpts:
        state = json.loads((ckpts[-1] / "trainer_state.json").read_text())
        best = state.get("best_model_checkpoint")
        if best and (Path(best) / "adapter_config.json").exists():
            return Path(best)
        return ckpts[-1]
    raise FileNotFoundError(
        f"{path}: no LoRA adapter here (looked for adapter_config.json, final/, checkpoint-N/). "
        "Point it at an sft/rl run dir or one of its checkpoint dirs.")


def read_meta(adapter_dir: Path) -> dict:
    meta = adapter_dir / META
    if meta.exists():
        return json.loads(meta.read_text())
    cfg = adapter_dir / "adapter_config.json"
    base = json.loads(cfg.read_text()).get("base_model_name_or_path") if cfg.exists() else None
    return {"base_model_path": base}


def write_meta(adapter_dir: Path, base_model_path: str, config_yaml: str, **extra) -> None:
    write_json(adapter_dir / META, {"base_model_path": base_model_path, "config_yaml": config_yaml, **extra})
