"""Where a training run continues from: resume=auto's newest complete checkpoint (within the budget), never, or a
checkpoint named on purpose (held to the run that made it); a checkpoint at the budget is the end; a budget
changed since lays the learning-rate schedule out again, said and recorded."""
from __future__ import annotations

import logging
from pathlib import Path

from flare_exp.models.checkpoints import (check_training_state, checkpoint_choice, checkpoint_step, incomplete,
                                          list_checkpoints, newest_complete, numbered_checkpoints)
from flare_exp.runtime import abspath

log = logging.getLogger(__name__)


def at_the_step_budget(trainer, checkpoint: str | None):
    """A checkpoint already at max_steps (the job was stopped after its last save, before final/): its weights
    and trainer state are the training's end (a TrainOutput); None otherwise. The Trainer would resume from it
    and train one step past max_steps (it checks the budget only after a step)."""
    from transformers.trainer_callback import TrainerState
    from transformers.trainer_utils import TrainOutput

    if checkpoint is None or trainer.args.max_steps <= 0:
        return None
    state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    if state.global_step < trainer.args.max_steps:
        return None
    trainer._load_from_checkpoint(checkpoint)  # the adapter's weights, as train(resume_from_checkpoint=) loads them
    trainer.state = state
    for callback in trainer.callback_handler.callbacks:  # a stopped attempt's later rollouts, evals, best/ go
        resumed_from = getattr(callback, "resumed_from", None)  # as at a resume that trains (on_train_begin)
        if callable(resumed_from):
            resumed_from(state.global_step)
    log.info("%s is at max_steps=%d already: its weights are the final ones (nothing left to train)",
             Path(checkpoint).name, trainer.args.max_steps)
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    return TrainOutput(state.global_step, sum(losses) / len(losses) if losses else 0.0, {})


def schedule_change(trainer, checkpoint: str | None) -> dict | None:
    """A resume whose max_steps differs from the one the checkpoint was trained for: the Trainer lays the
    learning-rate schedule out again for the new budget, so from the checkpoint's step on the rate follows
    another curve (a linear decay jumps back up). Said, and returned for the record; None otherwise (a
    constant schedule is not changed by the budget)."""
    from transformers.trainer_callback import TrainerState

    budget = trainer.args.max_steps
    scheduler = str(getattr(trainer.args.lr_scheduler_type, "value", trainer.args.lr_scheduler_type))
    if checkpoint is None or budget <= 0 or scheduler == "constant":
        return None
    state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    if not state.max_steps or state.max_steps == budget:
        return None
    name = Path(checkpoint).name
    if state.global_step >= budget:  # the end already: its steps followed the longer budget's schedule
        log.warning("%s ends this run (max_steps=%d), but its steps followed a learning-rate schedule (%s) laid out "
                    "for max_steps=%d: it is not a %d-step run (recorded as schedule_changed)", name, budget,
                    scheduler, state.max_steps, budget)
    else:
        log.warning("%s was trained for max_steps=%d; continuing it to max_steps=%d lays the learning-rate schedule "
                    "(%s) out again for %d steps, so from step %d the rate follows the new curve (step %d still "
                    "runs at the rate the checkpoint's optimizer holds, the old curve's): the adapter is neither a "
                    "%d- nor a %d-step run (recorded as schedule_changed). For one schedule, start a new run from its "
                    "weights (sft.init_from / rl.init_from=%s, allow_intermediate_checkpoint=true)",
                    name, state.max_steps, budget, scheduler, budget, state.global_step + 2, state.global_step + 1,
                    state.max_steps, budget, checkpoint)
    return {"step": state.global_step, "schedule_changed": {"max_steps_before": state.max_steps,
                                                            "max_steps_after": budget}}


STEP_SHAPE = "step_shape"  # in each checkpoint's flare_exp_checkpoint.json: what one optimizer step held


def step_shape(args) -> dict:
    """What one optimizer step holds under the Trainer's ``args``: per device, accumulation, ranks."""
    return {"per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps, "world_size": args.world_size}


def _samples(shape: dict) -> int:
    return shape["per_device_train_batch_size"] * shape["gradient_accumulation_steps"] * shape["world_size"]


def check_step_shape(checkpoint: str | None, args, stage: str) -> None:
    """A resume on another number of ranks trains its remaining steps with another number of samples per
    optimizer step (the per-device batch and accumulation are the run's own settings), and the Trainer's data
    skip counts steps, so part of the epoch would be seen twice or never: refused, naming both. A checkpoint
    saved before this was recorded is not compared."""
    from flare_exp.models.checkpoints import read_meta
    from flare_exp.run.record import RunSettingsChangedError

    if checkpoint is None:  # (one at the budget too: its run's summary would name this launch's step)
        return
    before, now = read_meta(Path(checkpoint)).get(STEP_SHAPE), step_shape(args)
    try:
        same = _samples(before) == _samples(now)
    except (TypeError, KeyError):  # no record (an older checkpoint) or an edited one: nothing to compare
        return
    if same:
        return

    def said(shape):
        return (f"{_samples(shape)} samples per optimizer step ({shape['per_device_train_batch_size']} per device x "
                f"{shape['gradient_accumulation_steps']} accumulation x {shape['world_size']} rank(s))")

    raise RunSettingsChangedError(
        f"{checkpoint} was trained with {said(before)}; this launch gives {said(now)}: its remaining steps would be "
        "another recipe, and the Trainer's data skip counts steps, so part of the epoch would be seen twice or "
        f"never. Resume it on {before['world_size']} rank(s), as it started; or start afresh with overwrite=true (the "
        f"earlier attempt moves to attempts/NN/); or train a new run from its weights ({stage}.init_from={checkpoint} "
        "with allow_intermediate_checkpoint=true).")


def file_aside(out_dir: Path, stale: list[tuple[Path, str]]) -> None:
    """Checkpoints a resume does not continue from (damaged, cut short while saving, past a budget lowered since,
    newer than the one it takes) leave the run's checkpoint-N namespace before training goes on: the Trainer
    would save its own step N into a stale checkpoint-N/ (a stray file of the old one then certified as the new
    one's), and the next resume or an init_from= would meet them again. Each moves whole (a rename: nothing lost)
    into the earlier attempt's record, said with where and why. Rank 0; the others pass them over."""
    from flare_exp.runtime import ranks

    if not stale or ranks()[0] != 0:
        return
    import json

    from flare_exp.io import write_json
    from flare_exp.run.layout import FILED_CHECKPOINTS

    dest = _record_for(out_dir, [checkpoint.name for checkpoint, _ in stale])
    dest.mkdir(parents=True, exist_ok=True)
    filed = json.loads((dest / FILED_CHECKPOINTS).read_text()) if (dest / FILED_CHECKPOINTS).is_file() else {}
    for checkpoint, why in stale:
        checkpoint.rename(dest / checkpoint.name)
        filed[checkpoint.name] = why
        write_json(dest / FILED_CHECKPOINTS, filed)  # the listing tells them from an earlier run's outputs
        log.warning("skipping %s: %s; moved to %s with the earlier attempt's record", checkpoint, why,
                    dest / checkpoint.name)


def _record_for(out_dir: Path, names: list[str]) -> Path:
    """Where checkpoints filed away go: the newest attempts/NN (the run's open filed the earlier attempt's config
    there, the one they were trained under); a new attempts/NN when there is none or a name is taken there."""
    from flare_exp.run.layout import ATTEMPTS
    from flare_exp.run.record import attempt_numbers, next_attempt_dir

    numbers = attempt_numbers(out_dir)
    newest = out_dir / ATTEMPTS / f"{max(numbers):02d}" if numbers else None
    if newest is None or any((newest / name).exists() for name in names):
        return next_attempt_dir(out_dir)
    return newest


def _newer_than(out_dir: Path, checkpoint: Path) -> list[tuple[Path, str]]:
    """The checkpoints in ``out_dir`` past the step ``checkpoint`` (named with resume=) continues from: the
    Trainer would save into them."""
    import json

    try:
        step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        step = checkpoint_step(checkpoint.resolve()) or 0
    return [(c, f"newer than {checkpoint} (step {step}), which resume= continues from")
            for c in reversed(numbered_checkpoints(out_dir))
            if (checkpoint_step(c) or 0) > step and c.resolve() != checkpoint.resolve()]


def _resume_auto(out_dir: Path, max_steps: int | None) -> str | None:
    """The newest complete checkpoint within the budget; the newer ones filed away first (file_aside), so an
    unattended requeue goes on, from an earlier checkpoint or step 0, and loses none of them."""
    ckpt, skipped = checkpoint_choice(out_dir, up_to=max_steps)
    if ckpt:
        check_training_state(ckpt)  # before anything moves: a refusal leaves the run dir as it was
    file_aside(out_dir, skipped)
    if ckpt:
        log.info("resume=auto: continuing from %s", ckpt)
    elif skipped:
        log.warning("no complete checkpoint left in %s (%d skipped, each moved aside as said above): training starts "
                    "again from step 0. To go on from one of them instead, repair it and pass resume=<its new path>",
                    out_dir, len(skipped))
    return str(ckpt) if ckpt else None


def resume_checkpoint(resume: str, out_dir: Path, stage: str | None = None, cfg=None,
                      max_steps: int | None = None) -> str | None:
    """resume=auto: the newest complete checkpoint in out_dir, if any; never: none (refuse if some exist);
    anything else: that checkpoint path, if it is complete and (with ``stage`` and ``cfg``) made with this run's
    deciding settings and inputs (``check_resumed_run``). Whatever it takes, the checkpoints of out_dir past the
    step it starts from are filed away first (file_aside): no save of this run lands in one."""
    if resume == "auto":
        return _resume_auto(out_dir, max_steps)
    if resume == "never":
        ckpts = list_checkpoints(out_dir)
        if ckpts:  # the stage's declaration refuses this before the run starts; a later pipeline step lands here
            from flare_exp.run.record import RunSettingsChangedError
            from flare_exp.run.stage import resume_never_refusal

            raise RunSettingsChangedError(resume_never_refusal(out_dir, ckpts))
        file_aside(out_dir, [(c, incomplete(c)) for c in reversed(numbered_checkpoints(out_dir))])  # none whole
        return None
    path = abspath(resume)
    why = incomplete(path, verify=True)
    if why and (path / "adapter_config.json").exists() and not (path / "trainer_state.json").exists():
        raise FileNotFoundError(f"resume={resume}: {path} is an adapter, not a Trainer checkpoint (no optimizer or "
                                f"schedule to continue): to train on from its weights pass {stage or 'sft'}.init_from="
                                f"{path}; resume= takes a checkpoint-N")
    if why:
        raise FileNotFoundError(f"resume={resume}: {path} is not a complete Trainer checkpoint: {why}")
    check_training_state(path)
    if stage is not None and cfg is not None:
        check_resumed_run(resume, path, out_dir, stage, cfg)
    file_aside(out_dir, _newer_than(out_dir, path))
    log.info("resume=%s: continuing from %s", resume, path)
    return str(path)


def check_resumed_run(resume: str, checkpoint: Path, out_dir: Path, stage: str, cfg) -> None:
    """A checkpoint of another run dir continues that run under this one's name: it must have been made with
    this run's deciding settings and inputs (its run dir's fingerprint, else its config.yaml), as a resume=auto
    in this dir is held to (this dir's own checkpoints were checked when the run opened)."""
    from flare_exp.run.fingerprint import (RunSettingsChangedError, config_settings, differences, fingerprint,
                                           listed, recorded_fingerprint, settings_differences, unless_moved)
    from flare_exp.run.layout import CONFIG, FINGERPRINT

    source = checkpoint.parent
    if source.resolve() == out_dir.resolve():
        return
    new = fingerprint(stage, cfg)
    if (source / FINGERPRINT).exists():
        recorded = recorded_fingerprint(source)
        if recorded.get("stage") not in (None, stage):
            raise RunSettingsChangedError(
                f"resume={resume}: {checkpoint} is a checkpoint of the {recorded['stage']} run in {source}, not of "
                f"a {stage} run: a resume continues the same run. To start {stage} from its weights, pass "
                f"{stage}.init_from={checkpoint} with allow_intermediate_checkpoint=true.")
        changed = unless_moved(stage, differences(recorded, new), recorded, new, cfg)
    elif (source / CONFIG).exists():
        changed = unless_moved(stage, settings_differences(config_settings(stage, source), new), None, new, cfg)
    else:
        raise RunSettingsChangedError(
            f"resume={resume}: {source} records neither {FINGERPRINT} nor {CONFIG}, so nothing says the checkpoint "
            f"was made with this run's settings. Start from its weights instead ({stage}.init_from={checkpoint} with "
            "allow_intermediate_checkpoint=true), which trains a new run from them.")
    if changed:
        raise RunSettingsChangedError(
            f"resume={resume}: {checkpoint} belongs to the run in {source}, made with other settings or inputs, "
            f"which this run would continue as its own: {listed(changed)}. Resume it with that run's settings, or "
            f"start a new run from its weights ({stage}.init_from={checkpoint} with "
            "allow_intermediate_checkpoint=true).")


# what the same command does after a stop, by stage (or pipeline step); a training run names its checkpoint
AFTER_A_STOP = {"sft": "resumes from its newest complete checkpoint", "rl": "resumes from its newest complete checkpoint",
                "infer": "resumes after the predictions already written",
                "eval": "scores again, reusing every judgment its report judges already wrote",
                "pipeline": "reuses the finished steps and resumes the stopped one"}


def after_a_stop(cfg, run_dir: Path) -> str:
    """What the same command does after a stop (Ctrl-C, SIGTERM) of the run in ``run_dir``. A training run, or a
    pipeline's training step, says what its resume takes: the checkpoint resume=auto picks (newest_complete, the
    rule the run itself follows), step 0 when none counts (none saved yet, or incomplete, or past the budget),
    a refusal under resume=never when checkpoints are there."""
    from flare_exp.run.stage import stage

    name = cfg.stage.name
    try:
        if name == "pipeline":
            return _pipeline_after_a_stop(cfg, run_dir)
        then = _training_after_a_stop(cfg, name, stage(name).output_dir(cfg, run_dir), "it ")
    except Exception:  # noqa: BLE001  (the wording only: a stop's message never fails on it)
        return AFTER_A_STOP.get(name, "runs it again")
    return then or AFTER_A_STOP.get(name, "runs it again")


def rerun_of_training(cfg, stage: str, out_dir: Path) -> str:
    """What the same command does with the sft/rl run in ``out_dir`` after it failed (the out-of-memory error):
    the words a stop's message uses, never failing on them."""
    try:
        return _training_after_a_stop(cfg, stage, out_dir, "") or "runs again"
    except Exception:  # noqa: BLE001  (the wording only: the error it completes is what matters)
        return "runs again"


def after_a_stop_in(run_dir: Path) -> str | None:
    """``after_a_stop`` for the run in ``run_dir`` with the config it ran with (its config.yaml): for a sweep's
    job, or the FAILED a stop leaves; None when the run wrote no config yet (stopped before it started)."""
    from omegaconf import OmegaConf

    from flare_exp.run.layout import CONFIG

    try:
        cfg = OmegaConf.load(run_dir / CONFIG)
    except FileNotFoundError:
        return None
    except Exception:  # noqa: BLE001  (the wording only: a stop's message never fails on it)
        return "runs it again"
    return after_a_stop(cfg, run_dir)


def _pipeline_after_a_stop(cfg, run_dir: Path) -> str:
    """The steps finished are reused; the first one unfinished (the pipeline runs them in order) is the stopped
    one, named with what it does."""
    from flare_exp.run.layout import DONE
    from flare_exp.run.stage import stage

    finished = []
    for name, step, step_cfg, step_dir in stage("pipeline").runner().planned_steps(cfg, run_dir):
        if (step_dir / DONE).exists():
            finished.append(name)
            continue
        then = _training_after_a_stop(step_cfg, step, step_dir, "") or AFTER_A_STOP.get(step, "runs again")
        head = f"reuses the finished steps ({', '.join(finished)})" if finished else "runs the pipeline again"
        return f"{head}; its stopped {name} step {then}"
    return "reuses the finished steps"  # stopped after the last step had finished


def _training_after_a_stop(cfg, stage: str, out_dir: Path, it: str) -> str | None:
    """What the same command does with the training run in ``out_dir`` (``it``: "it " for a run, "" for a
    pipeline's step): refused (resume=never on checkpoints), resumed from the checkpoint named, or started again
    from step 0 with why; None when it is no training run."""
    if stage not in ("sft", "rl"):
        return None
    budget = cfg[stage].get("max_steps")
    budget = budget if budget and budget > 0 else None
    resume = str(cfg.get("resume", "auto"))
    if resume == "never":  # as Stage.refuse_resume_never and resume_checkpoint do
        left = list_checkpoints(out_dir)
        if left:
            taken = _quietly(newest_complete, out_dir, up_to=budget)
            then = f"continue from {'it' if taken == left[-1] else taken.name}" if taken else "continue"
            there = (f"{left[-1].name} is" if len(left) == 1
                     else f"{len(left)} checkpoints, the newest {left[-1].name}, are")
            return (f"is refused (resume=never and {there} there): pass resume=auto to {then}, or "
                    "overwrite=true to start afresh")
        return f"starts {it}again from step 0 {_why_step_0(cfg, stage, out_dir, budget)}"
    if resume != "auto":  # a checkpoint named on purpose: taken again, whatever the run saved since
        taken = _quietly(newest_complete, out_dir, up_to=budget)
        newer = (f"; pass resume=auto to continue from {taken.name}"
                 if taken and abspath(resume).resolve() != taken.resolve() else "")
        return f"resumes from {resume} again (resume= names it){newer}"
    try:
        taken = _quietly(newest_complete, out_dir, up_to=budget)
    except FileNotFoundError as e:  # its optimizer or schedule missing: the run stops at its start, saying so
        return f"stops at its start: {e}"
    if taken is None:
        return f"starts {it}again from step 0 {_why_step_0(cfg, stage, out_dir, budget)}"
    step = checkpoint_step(taken)
    if budget and step >= budget:
        return f"saves final/ from {taken.name} (step {step} of {budget}: its training had reached max_steps)"
    return f"resumes from {taken.name} (step {step}{f' of {budget}' if budget else ''})"


def _why_step_0(cfg, stage: str, out_dir: Path, budget: int | None) -> str:
    """Why no checkpoint in ``out_dir`` is resumed from: none saved yet, or each one there incomplete or past
    the budget (the newest first)."""
    there = list(reversed(numbered_checkpoints(out_dir)))
    if not there:
        return f"(no checkpoint was saved yet: one is saved every {stage}.save_steps={cfg[stage].save_steps} steps)"
    why = [f"{p.name} is past {stage}.max_steps={budget}" if budget and checkpoint_step(p) > budget else
           f"{p.name} is incomplete: {incomplete(p)}" for p in there[:3]]
    more = f", and {len(there) - 3} more" if len(there) > 3 else ""
    return f"({'; '.join(why)}{more})"


def _quietly(find, *args, **kwargs):
    """``find`` with its 'skipping ...' warnings held back: the stop's message says why in its own words."""
    checkpoints_log = logging.getLogger("flare_exp.models.checkpoints")
    was, checkpoints_log.disabled = checkpoints_log.disabled, True
    try:
        return find(*args, **kwargs)
    finally:
        checkpoints_log.disabled = was
