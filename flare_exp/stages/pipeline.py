"""pipeline stage: run ``stage.steps`` in order, chaining each step's outputs into the next one's inputs.

Each step runs in ``<run dir>/<step>`` (prepare in ``data.prepared_dir``) with its own DONE/FAILED marker.
A step already DONE with the same fingerprint (deciding settings, input sha256, starting adapter) is reused, not
redone, so rerunning the pipeline after a crash continues where it stopped; DONE with another one stops, naming
what changed (``overwrite=true`` redoes it). A step whose dir lies outside the pipeline's (prepare's, shared by
the jobs of a sweep) runs under that dir's own lock: a job that finds another one preparing waits for it, then
reuses what it made; with overwrite=true the sweep's first job redoes it and the others reuse that.
"""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from flare_exp.optuna_pruning import pruned_summary
from flare_exp.run.layout import DONE
from flare_exp.run.lifecycle import Run, reusable
from flare_exp.run.lock import RunLock
from flare_exp.run.stage import Stage, declared_stages, stage
from flare_exp.runtime import abspath, barrier, ranks


STAGE = Stage(
    name="pipeline",
    help="stage.steps in order, each step in its own sub-directory (the default: the demo)",
    record="view",
)

log = logging.getLogger(__name__)

def _chain(step: str, cfg, done_dirs: dict[str, Path]) -> None:
    """Fill each unset input of ``step`` from the earlier steps its declaration names (``feeds_from``): the
    first of them that ran; a list takes every one of their dirs, in the order they ran (eval's predictions: the
    models of stage.compare first, then the last one, so the report reads left to right)."""
    for key, sources in stage(step).feeds_from.items():
        if OmegaConf.select(cfg, key):
            continue
        if OmegaConf.is_list(OmegaConf.select(cfg, key)):
            value = [str(d) for s, d in done_dirs.items() if s.split("-")[0] in sources]
        else:
            value = next((str(done_dirs[s]) for s in sources if s in done_dirs), None)
        if value:
            with open_dict(cfg):
                OmegaConf.update(cfg, key, value, merge=False)


def _trained_before_infer(cfg) -> dict[str, str | None]:
    """The trained models a pipeline's infer could compare: each sft/rl step before infer (None: its dir in this
    pipeline) and, for an rl step that starts from an sft run given in rl.init_from, that run."""
    steps = list(cfg.stage.steps)
    before = {s: None for s in steps[:steps.index("infer")] if s in ("sft", "rl")}
    if "rl" in before and "sft" not in before and cfg.rl.init_from:
        before = {"sft": str(cfg.rl.init_from), **before}
    return before


def _predicting(cfg, before: list[str]) -> str:
    """The model the pipeline's infer predicts with: the adapter infer.checkpoint names, else the last trained
    model before it, else base."""
    return "infer.checkpoint" if cfg.infer.checkpoint else before[-1] if before else "base"


def compared_sources(cfg) -> list[str]:
    """stage.compare as this pipeline can honour it: the trained models before infer (``_trained_before_infer``)
    and base, each once, other than the one infer predicts with (compared with itself it would only add tests to
    the correction's family); none where the pipeline does not evaluate."""
    steps = list(cfg.stage.steps)
    if "infer" not in steps or "eval" not in steps[steps.index("infer"):]:
        return []
    before = list(_trained_before_infer(cfg))
    predicting = _predicting(cfg, before)
    return [s for s in dict.fromkeys(cfg.stage.compare) if s in (*before, "base") and s != predicting]


def say_what_is_compared(cfg) -> None:
    """Once per pipeline: the entries of stage.compare it cannot honour, and why."""
    steps, honoured = list(cfg.stage.steps), compared_sources(cfg)
    left_out = [s for s in dict.fromkeys(cfg.stage.compare) if s not in honoured]
    if not left_out:
        return
    if "infer" not in steps or "eval" not in steps[steps.index("infer"):]:
        log.warning("stage.compare=%s: not compared, this pipeline does not run infer then eval", left_out)
        return
    before = list(_trained_before_infer(cfg))
    given = _stage_of_adapter(cfg.infer.checkpoint) if cfg.infer.checkpoint else None
    for source in left_out:
        if source in (_predicting(cfg, before), given):
            why = (f" (infer.checkpoint={cfg.infer.checkpoint} is an {given} run)" if source == given else
                   "" if before else " (nothing is trained before it)")
            log.info("stage.compare: %s is the model infer predicts with in this pipeline%s: not compared with "
                     "itself", source, why)
        else:
            log.warning("stage.compare: %s is not compared: this pipeline does not run it before infer%s", source,
                        " (nor does rl.init_from name its run)" if source == "sft" and "rl" in before else
                        "; add it to stage.steps, or infer its run on its own and give both to eval.predictions")


def _stage_of_adapter(path) -> str | None:
    """The stage (sft, rl) whose run the adapter ``path`` names belongs to; None where no run of ours says."""
    from flare_exp.catalog import stage_of
    from flare_exp.models.checkpoints import resolve_adapter

    try:
        adapter = resolve_adapter(abspath(path))
    except (FileNotFoundError, OSError):
        return None
    return next((s for s in (stage_of(d) for d in (adapter, adapter.parent)) if s in ("sft", "rl")), None)


def _run_or_reuse(step: str, step_cfg, step_dir: Path, results: dict, name: str, out_dir: Path) -> None:
    reuse, lock = _decide(step, step_cfg, step_dir, name, shared=not step_dir.resolve().is_relative_to(
        out_dir.resolve()))
    try:
        if reuse:
            if not step_cfg.overwrite:  # with overwrite, _reusable_shared said why it is reused
                log.info("[%s] already finished in %s with the same settings and inputs: reusing it "
                         "(overwrite=true redoes it)", name, step_dir)
            results[name] = {"reused": str(step_dir)}
        else:
            log.info("[%s] running in %s", name, step_dir)
            results[name] = run_step(step, step_cfg, step_dir)
    finally:
        if lock is not None:
            lock.release()


def sweep_started() -> float | None:
    """When this job's sweep began (its multirun.yaml, written by Hydra before any job), None outside a sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    started = Path(HydraConfig.get().sweep.dir) / "multirun.yaml"
    return started.stat().st_mtime if started.exists() else None


def redone_in_this_sweep(step_dir: Path, step_cfg) -> bool:
    """overwrite=true in the jobs of a sweep redoes a shared step once, not once per job: a step another job of
    this sweep finished (DONE written after the sweep began) is kept."""
    start = sweep_started() if step_cfg.overwrite else None
    done = step_dir / DONE
    return start is not None and done.exists() and done.stat().st_mtime >= start


def _reusable_shared(step: str, step_cfg, step_dir: Path, name: str) -> bool:
    """``reusable``, where overwrite=true does not redo what another job of this sweep has just redone (asked
    again while waiting for that job)."""
    if redone_in_this_sweep(step_dir, step_cfg):
        if reusable(step, OmegaConf.merge(step_cfg, {"overwrite": False}), step_dir):
            log.info("[%s] overwrite=true: another job of this sweep has redone %s; reusing it", name, step_dir)
            return True
        return False
    return reusable(step, step_cfg, step_dir)


def _decide(step: str, step_cfg, step_dir: Path, name: str, shared: bool):
    """(reuse the step?, the lock this process took on a shared step's dir). Inside the pipeline's dir its lock
    covers the step. A shared dir is decided by rank 0 once no other live run holds it: it reuses the finished
    step or takes the dir's lock to run it (another job claiming it first: wait for that one, decide again); the
    other ranks then decide as it did (the dir cannot change while rank 0 holds it or it is finished)."""
    lock, rank = None, ranks()[0]
    if shared and rank == 0:
        lock = RunLock(step_dir).acquire_when_free(f"[{name}]", unless=lambda: _reusable_shared(
            step, step_cfg, step_dir, name))
    if shared:
        barrier()  # rank 0 has decided
    reuse = lock is None if shared and rank == 0 else _reusable_shared(step, step_cfg, step_dir, name)
    barrier()  # several ranks: each has decided before rank 0 touches the step's dir
    return reuse, lock


def run_step(step: str, step_cfg, step_dir: Path):
    """One step in its own run (attempt, markers; run.lifecycle). On several ranks the data-parallel stages
    run on every rank, prepare on rank 0 while the others wait."""
    rank, _ = ranks()
    with Run(step_cfg, step, step_dir, rank=rank, locked=False) as step_run:  # inside the pipeline's lock
        return step_run.execute(None if rank and stage(step).ranks == "rank 0" else stage(step).runner().run)


def planned_steps(cfg, out_dir: Path):
    """(name, step, its config, its dir) in the order they run, each step's inputs filled from the earlier
    steps' dirs (``_chain``); stage.compare's infers of the base model or earlier adapters (``infer-<source>/``)
    come right before infer, so that eval compares them with the last model (base -> sft -> rl)."""
    done_dirs: dict[str, Path] = {}
    for step in cfg.stage.steps:
        if step == "infer":
            for source in compared_sources(cfg):
                step_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
                with open_dict(step_cfg):
                    step_cfg.stage.name = "infer"
                    step_cfg.infer.checkpoint = None if source == "base" else str(
                        done_dirs.get(source) or _trained_before_infer(cfg)[source])
                name = f"infer-{source}"
                yield name, "infer", step_cfg, out_dir / name
                done_dirs[name] = out_dir / name
        step_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        with open_dict(step_cfg):
            step_cfg.stage.name = step
        _chain(step, step_cfg, done_dirs)
        step_dir = stage(step).output_dir(step_cfg, out_dir / step)
        yield step, step, step_cfg, step_dir
        done_dirs[step] = step_dir


def check_settings(cfg) -> None:  # the stage registry's hook: checks.setting_problems, before the steps' own
    check_steps(cfg)


def check_steps(cfg) -> None:
    """stage.steps: known steps, each once, in the order each reads the one before it; stage.compare's names."""
    steps = list(cfg.stage.steps)
    known = [name for name, s in declared_stages().items() if s.pipeline_step]
    unknown = [s for s in steps if s not in known]
    if unknown:
        raise ValueError(f"stage.steps has unknown or non-pipeline steps {unknown}; choose from {', '.join(known)}")
    if not steps:
        raise ValueError(f"stage.steps is empty: name the steps to run, in order, from {', '.join(known)}")
    twice = sorted({s for s in steps if steps.count(s) > 1})
    if twice:
        raise ValueError(f"stage.steps names {', '.join(twice)} more than once: each step runs once per pipeline")
    ordered = sorted(steps, key=known.index)
    if steps != ordered:
        raise ValueError(f"stage.steps=[{','.join(steps)}] is out of order: each step reads what the ones before it "
                         f"wrote; write stage.steps=[{','.join(ordered)}]")
    unknown = [s for s in cfg.stage.compare if s not in ("base", "sft", "rl")]
    if unknown:
        raise ValueError(f"stage.compare has {unknown}: each entry is base, sft or rl")
    twice = sorted({s for s in cfg.stage.compare if list(cfg.stage.compare).count(s) > 1})
    if twice:
        raise ValueError(f"stage.compare names {', '.join(twice)} more than once: each model is compared once")


def refuse_before_start(cfg, out_dir: Path) -> None:
    """Before the pipeline's run dir is touched: a finished step that these settings would have to redo stops
    the rerun here, so a refused rerun leaves the finished pipeline as it was (its DONE, its config). Steps are
    checked in order up to the first that will run (those after it get new inputs and are checked then)."""
    check_steps(cfg)
    for name, step, step_cfg, step_dir in planned_steps(cfg, out_dir):
        if not reusable(step, step_cfg, step_dir):
            stage(step).refuse_resume_never(step_cfg, step_dir)
            return


def file_earlier_steps(cfg, out_dir: Path) -> None:
    """overwrite=true: every step in the pipeline's own dir moves its earlier attempt to its attempts/NN/ before
    the first step runs (rank 0; the others wait), not as each is reached: a pipeline stopped in sft would leave
    the earlier attempt's finished rl, infer and eval beside it, listed with their metric and taken as its
    predictions. What this SLURM job made before its requeue stays (this_jobs_attempt); a shared step (prepare's
    dir outside) is decided by its own rule."""
    from flare_exp.run.record import archive_attempt, attempt_files, this_jobs_attempt

    if not cfg.overwrite:
        return
    if ranks()[0] == 0:
        for name, _, _, step_dir in planned_steps(cfg, out_dir):
            inside = step_dir.resolve().is_relative_to(out_dir.resolve())
            if inside and attempt_files(step_dir) and not this_jobs_attempt(step_dir):
                log.info("[%s] overwrite=true: the earlier attempt moved to %s", name, archive_attempt(step_dir))
    barrier()


def run(cfg, out_dir: Path) -> dict:
    check_steps(cfg)
    say_what_is_compared(cfg)
    # every step's own settings were checked before the first (checks.validate): a bad rl.* does not wait for sft
    file_earlier_steps(cfg, out_dir)
    done_dirs: dict[str, Path] = {}
    results = {}
    for name, step, step_cfg, step_dir in planned_steps(cfg, out_dir):
        _run_or_reuse(step, step_cfg, step_dir, results, name, out_dir)
        done_dirs[name] = step_dir
        if step == "rl" and pruned_summary(step_dir):  # an Optuna trial stopped early: its infer/eval are moot
            log.info("[rl] pruned by the Optuna search: the steps after it are not run")
            break
    log.info("pipeline finished; outputs:\n%s", "\n".join(f"  {s:<8} {d}" for s, d in done_dirs.items()))
    return {"steps": {s: str(d) for s, d in done_dirs.items()}, "results": results}
