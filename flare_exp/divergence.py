"""Training that diverged, stopped where it happens: trained weights gone inf/NaN (a learning rate far too high,
a damaged checkpoint resumed) are checked after every optimizer step, and a rollout that samples from inf/NaN
probabilities is named as the same failure. The Trainer itself went on logging loss 0 (its NaN filter) and
grad_norm nan, saved NaN adapters and ended DONE."""
from __future__ import annotations

import logging
from pathlib import Path

from flare_exp.callback_base import TrainerCallback

log = logging.getLogger(__name__)


class TrainingDivergedError(ValueError):
    """The trained weights stopped being numbers: said in one line, the run FAILED, no adapter of them saved."""


def diverged(stage: str, step: int, args, out_dir: Path, what: str) -> TrainingDivergedError:
    from flare_exp.models.checkpoints import list_checkpoints

    saved = list_checkpoints(out_dir)
    kept = (f"The newest checkpoint, {saved[-1].name}, was saved before it (the same command resumes from it and "
            "would diverge again)" if saved else "No checkpoint was saved before it")
    return TrainingDivergedError(
        f"{stage} diverged at step {step}: {what}, so the loss and grad_norm it would log are not numbers and its "
        f"adapter would predict nothing. {kept}. Lower {stage}.learning_rate (now {args.learning_rate:g}) and run "
        "again under another run_name (or with overwrite=true: this attempt moves to attempts/)")


class StopWhenDiverged(TrainerCallback):
    """The trainable weights checked finite as training starts (a resumed checkpoint) and after every optimizer
    step (one multi-tensor reduction and one wait a step, where the Trainer's own NaN filter of the loss already
    waits for each step): a learning rate far too high turns them to inf/NaN,
    and the Trainer went on logging loss 0 (its NaN filter) and grad_norm nan, saved NaN adapters and ended DONE.
    Raised at the step's end, before that step's save."""

    def __init__(self, stage: str, out_dir: Path):
        self.stage, self.out_dir = stage, out_dir

    def _check(self, args, state, model, what: str) -> None:
        from flare_exp.models.loading import non_finite_weight

        bad = non_finite_weight((n, p) for n, p in model.named_parameters() if p.requires_grad) if model else None
        if bad:
            raise diverged(self.stage, state.global_step, args, self.out_dir, f"{what} ({bad}) is inf or NaN")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._check(args, state, model, "a trained weight it starts from")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._check(args, state, model, "a trained weight after the optimizer step")


class WarnWhenStuck(TrainerCallback):
    """Finite weights that no longer move: every one of ``window`` logged steps in a row had a gradient norm of
    exactly 0 while the loss stayed well above 0 (a learning rate far too high saturates the model: lr 300-1000
    logged "loss 6.389 | grad_norm 0" from step 12 to the end and ended DONE). Said once, kept as ``finding``
    (the stage's summary: no_learning_signal); not stopped: the run's numbers are finite and the user decides."""

    def __init__(self, stage: str, window: int = 5):
        self.stage, self.window, self.run, self.finding = stage, window, [], None

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs or self.finding is not None:
            return
        stuck = logs.get("grad_norm") == 0 and isinstance(logs["loss"], (int, float)) and logs["loss"] > 1e-3
        self.run = [*self.run, (state.global_step, logs["loss"])] if stuck else []
        if len(self.run) < self.window:
            return
        (first, loss), last = self.run[0], self.run[-1][0]
        self.finding = {"since_step": first, "step": last, "finding": (
            f"grad_norm 0 with the loss at {loss:.4g} in every logged step {first}-{last}: the weights stopped "
            f"moving at step {first} and the adapter learns nothing more. A learning rate far too high saturates the "
            f"model: lower {self.stage}.learning_rate (now {args.learning_rate:g}) and run again under another "
            "run_name (or with overwrite=true)")}
        log.warning("%s: no learning signal at step %d: %s", self.stage, last, self.finding["finding"])


# torch.multinomial's words when a policy's logits are inf/NaN (its rollouts sample from them)
SAMPLED_NAN = "probability tensor contains either"
