"""Stage registry: stage name -> runner module. Modules are imported only when their stage runs, so a
prepare job never pays for importing torch/transformers and Unsloth is never imported by accident.

A runner module defines ``run(cfg, out_dir) -> dict`` (a small JSON-able summary) and may define
``output_dir(cfg, run_dir) -> Path`` when its outputs live outside the Hydra run dir (prepare does), and
``check_settings(cfg)``, which a pipeline runs for every step before its first.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

RUNNERS = {
    "prepare": "flare_exp.stages.prepare",
    "sft": "flare_exp.stages.sft",
    "rl": "flare_exp.stages.rl",
    "infer": "flare_exp.stages.infer",
    "eval": "flare_exp.stages.evaluate",
    "sweep_report": "flare_exp.stages.sweep_report",
    "pipeline": "flare_exp.stages.pipeline",
    "runs": "flare_exp.catalog",
}

# Several ranks (torchrun, a SLURM job's tasks): these run data-parallel (sft and rl through the Trainer's DDP,
# infer and the GREEN judge sharding the records); a pipeline also runs prepare, on rank 0 while the others wait.
DISTRIBUTED = {"sft", "rl", "infer", "eval"}
RANK_0_STEPS = {"prepare"}


def get_runner(name: str) -> ModuleType:
    if name not in RUNNERS:
        raise ValueError(f"unknown stage {name!r}; known stages: {', '.join(RUNNERS)}")
    return importlib.import_module(RUNNERS[name])


def output_dir(name: str, cfg, run_dir: Path) -> Path:
    runner = get_runner(name)
    return runner.output_dir(cfg, run_dir) if hasattr(runner, "output_dir") else run_dir
