"""pipeline stage: run ``stage.steps`` in order, chaining each step's outputs into the next one's inputs.

Each step runs in ``<run dir>/<step>`` (prepare in ``data.prepared_dir``) with its own DONE/FAILED marker.
A step already DONE is reused, not redone (``overwrite=true`` redoes it), so rerunning the pipeline after a
crash continues where it stopped.
"""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from flare_exp import stages
from flare_exp.runtime import DONE, clear_finished_outputs, run_with_markers, write_run_metadata

log = logging.getLogger(__name__)

def _chain(step: str, cfg, done_dirs: dict[str, Path]) -> None:
    with open_dict(cfg):
        if step == "rl" and cfg.rl.init_from is None and "sft" in done_dirs:
            cfg.rl.init_from = str(done_dirs["sft"])
        if step == "infer" and cfg.infer.checkpoint is None:
            for source in ("rl", "sft"):
                if source in done_dirs:
                    cfg.infer.checkpoint = str(done_dirs[source])
                    break
        if step == "eval" and not cfg.eval.predictions and "infer" in done_dirs:
            cfg.eval.predictions = [str(done_dirs["infer"])]


def run(cfg, out_dir: Path) -> dict:
    steps = list(cfg.stage.steps)
    unknown = [s for s in steps if s not in stages.RUNNERS or s in ("pipeline", "sweep_report")]
    if unknown:
        raise ValueError(f"stage.steps has unknown or non-pipeline steps {unknown}; "
                         f"choose from prepare, sft, rl, infer, eval")
    for step in steps:  # every step's own settings check before the first step: a bad rl.* must not wait for sft
        check = getattr(stages.get_runner(step), "check_settings", None)
        if check:
            check(cfg)
    done_dirs: dict[str, Path] = {}
    results = {}
    for step in steps:
        step_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        with open_dict(step_cfg):
            step_cfg.stage.name = step
        _chain(step, step_cfg, done_dirs)
        step_dir = stages.output_dir(step, step_cfg, out_dir / step)
        if (step_dir / DONE).exists() and not cfg.overwrite:
            log.info("[%s] already finished in %s: reusing it (overwrite=true redoes it)", step, step_dir)
            results[step] = {"reused": str(step_dir)}
        else:
            clear_finished_outputs(step_dir)
            log.info("[%s] running in %s", step, step_dir)
            write_run_metadata(step_dir, step_cfg)
            results[step] = run_with_markers(step_dir, stages.get_runner(step).run, step_cfg, step_dir)
        done_dirs[step] = step_dir
    log.info("pipeline finished; outputs:\n%s", "\n".join(f"  {s:<8} {d}" for s, d in done_dirs.items()))
    return {"steps": {s: str(d) for s, d in done_dirs.items()}, "results": results}
