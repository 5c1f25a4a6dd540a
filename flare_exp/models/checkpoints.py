"""Finding and describing checkpoints: run dirs, Trainer checkpoint-N dirs, final adapters.

Every adapter we save carries ``flare_exp_checkpoint.json``: the base model path, the resolved config (YAML
text, never a pickled DictConfig) and the data fingerprints, so any stage can load it back from the path alone.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from flare_exp.io import write_json

META = "flare_exp_checkpoint.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Trainer checkpoints under ``run_dir``, oldest first; half-written ones (no trainer_state.json) skipped."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir()
             if (m := _CKPT.match(p.name)) and p.is_dir() and (p / "trainer_state.json").exists()]
    return [p for _, p in sorted(found)]


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
