"""A training run's mean loss, from what it logged and what its last process trained, and the line that says it.
transformers' train_loss divides the last process's loss sum by the global step: after a resume it understated
the run's loss (1.03 in the model card where the run's was 3.29)."""
from __future__ import annotations


def run_loss(history: list[dict], session_mean: float | None, global_step: int | None = None,
             start_step: int = 0) -> tuple[float | None, int]:
    """(the training loss averaged over the run's steps whose loss is known, how many those are): the logged
    windows (each logged loss is the mean over the steps since the one before, or since the checkpoint a resume
    started from: the history's ``resumed_at`` entries), and the steps after the last one logged from what the
    last process trained (transformers' training_loss is its loss sum over the global step; ``start_step``: the
    step it resumed from). The steps trained after the last logged step before a resume's checkpoint are known
    to none (their losses died with the process that trained them)."""
    resumes = {h["resumed_at"] for h in history if isinstance(h.get("resumed_at"), int)} | {start_step}
    previous, total, steps, in_session = 0, 0.0, 0, 0.0
    for h in history:
        step = h.get("step")
        if "loss" in h and isinstance(step, int) and step > previous:
            begin = max([previous, *(r for r in resumes if r < step)])  # a window since a resume's checkpoint
            n = step - begin
            total, steps, previous = total + h["loss"] * n, steps + n, step
            in_session += h["loss"] * n if step > start_step else 0.0
    tail = (global_step or 0) - max(previous, start_step)
    if tail > 0 and session_mean is not None:
        total, steps = total + session_mean * global_step - in_session, steps + tail
    return (total / steps, steps) if steps else (session_mean, 0)


def loss_fields(history: list[dict], session_mean: float | None, global_step: int, start_step: int = 0) -> dict:
    """train_loss (the run's mean, run_loss), the steps it covers and, where that is fewer than the run's, why."""
    mean, covered = run_loss(history, session_mean, global_step, start_step)
    out = {"train_loss": mean, "train_loss_steps": covered}
    if mean is not None and 0 < covered < global_step:
        out["train_loss_note"] = (f"over {covered} of {global_step} steps: the others were trained after the "
                                  "last loss logged before a checkpoint this run resumed from, and their losses are "
                                  "not known")
    return out


def trainer_loss(trainer, session_mean: float | None) -> dict:
    """loss_fields of a trainer after train() (``session_mean``: its TrainOutput's training_loss), from the step it
    resumed at (train_and_save sets ``resumed_step``)."""
    return loss_fields(trainer.state.log_history, session_mean, trainer.state.global_step,
                       getattr(trainer, "resumed_step", 0))


def said(fields: dict) -> str:
    """'3.2931' or '3.1552 over 18 of 20 steps: ...'."""
    mean = fields.get("train_loss")
    if mean is None:
        return "none"
    return f"{mean:.4f}" + (f" {fields['train_loss_note']}" if fields.get("train_loss_note") else "")


def loss_line(history: list[dict], fields: dict, logging_steps: int) -> str:
    """The first and last logged loss, or the one logged (a run shorter than sft.logging_steps logs its first
    step only: saying "-> the same loss at the same step" would read as if training did nothing), and the mean
    (loss_fields)."""
    if not history:
        return f"no loss logged (sft.logging_steps={logging_steps})"
    first, last = history[0], history[-1]
    if first is last:
        return (f"loss {first['loss']} at step {first.get('step')}, the only one logged (sft.logging_steps="
                f"{logging_steps}); mean {said(fields)}")
    return (f"loss {first['loss']} at step {first.get('step')} -> {last['loss']} at step {last.get('step')}, "
            f"mean {said(fields)}")
