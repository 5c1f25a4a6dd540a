"""The in-training held-out eval as a Trainer callback, one piece of code for both training stages: every
``<stage>.eval_steps`` steps (and the last) rank 0 decodes and scores the subset (:class:`.heldout.HeldOutEval`),
the numbers go to the next log line as ``heldout/<task>/<metric>`` and to heldout_evals.jsonl, and the adapter
of the best eval so far by ``<stage>.metric_for_best_model`` is kept in best/. The rl stage's monitor extends it
(rollouts, the alarm, pruning); the sft stage uses it as it is."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from flare_exp.callback_base import TrainerCallback

from flare_exp.io import atomic_dir, torn_line_step, write_text
from flare_exp.rl_monitor.heldout import (OFFICIAL_MEAN, HeldOutEval, flat_metrics, higher_is_better,
                                          monitored_value)
from flare_exp.run.lock import check_still_held
from flare_exp.runtime import ranks

log = logging.getLogger(__name__)
EVALS = "heldout_evals.jsonl"


def check_metric_spec(stage: str, spec: str) -> None:
    """``<stage>.metric_for_best_model``, checked before any work."""
    from flare_exp.optuna_study import check_objective, parse_objective

    if spec == OFFICIAL_MEAN:
        return
    try:
        parse_objective(spec)
    except ValueError:
        raise ValueError(f"{stage}.metric_for_best_model={spec!r}: give '<task>.<metric>' as in eval's "
                         f"metrics.json (e.g. classification.balanced_accuracy) or {OFFICIAL_MEAN}") from None
    check_objective(spec, f"{stage}.metric_for_best_model")  # a known task and metric: a typo kept no best/


class HeldOutWatch(TrainerCallback):
    """Held-out eval at its steps, the best/ adapter, the numbers added to the next log line (any line: sft's
    train, eval or final one); ``stage`` names the config section in the log and the summary."""

    def __init__(self, stage: str, section, out_dir: Path, heldout: HeldOutEval | None, meta):
        self.stage, self.section, self.out_dir, self.heldout, self.meta = stage, section, out_dir, heldout, meta
        self.lead = ranks()[0] == 0
        self.pending: dict = {}  # added to the next log line
        self.key = f"heldout/{section.metric_for_best_model}"
        self.best = self._best_so_far()

    def _best_so_far(self) -> dict | None:
        path = self.out_dir / "best" / "flare_exp_checkpoint.json"
        if not path.exists():  # a resumed run keeps the best of its earlier evals
            return None
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError):  # cut by a kill or a hand: the next eval's adapter takes its place
            return None
        return {"step": meta.get("step"), "value": meta.get("metric_value")} if isinstance(meta, dict) else None

    def on_train_begin(self, args, state, control, **kwargs):
        self.resumed_from(state.global_step)

    def resumed_from(self, resume_step: int) -> None:
        """A resume from the checkpoint at ``resume_step`` (resume.at_the_step_budget calls it too where that
        checkpoint is at the step budget and nothing trains): the evals of later steps are the stopped attempt's (the resume
        trains and evaluates those steps again); they go, as a torn last line does, and so does a best/ of such a
        step (filed with the attempt's record): the resumed run's best is its own."""
        if self.lead:
            self._file_a_later_best(resume_step)
        path = self.out_dir / EVALS
        if not self.lead or not path.exists():
            return
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        steps = [_step_of(line) for line in lines]
        kept = [line for line, step in zip(lines, steps) if step is not None and step <= resume_step]
        torn = [torn_line_step(line) for line, step in zip(lines, steps) if step is None]
        for step in (s for s in torn if s is not None and s <= resume_step):  # the resume starts after it
            log.warning("%s: %s: step %d's held-out eval was cut by the kill and is lost (the resume starts after "
                        "it, at %d; log_history.json keeps its numbers where its log line was written)", self.stage,
                        path.name, step, resume_step)
        if len(kept) < len(lines):
            check_still_held()
            write_text(path, "".join(f"{line}\n" for line in kept))
            log.info("%s: %s: %d eval(s) of steps after %d (the stopped attempt's) dropped: the resumed run "
                     "evaluates those steps again", self.stage, path.name, len(lines) - len(kept), resume_step)

    def _file_a_later_best(self, step: int) -> None:
        best_step = (self.best or {}).get("step")
        if not isinstance(best_step, int) or best_step <= step:
            return
        from flare_exp.resume import file_aside

        check_still_held()
        file_aside(self.out_dir, [(self.out_dir / "best", f"best/ is step {best_step}'s adapter, of the stopped "
                                                          f"attempt past the resume's step {step}")])
        log.warning("%s: the best/ of the stopped attempt (step %d) filed away; best/ is chosen again from this "
                    "run's evals after step %d (the adapters of the evals up to it are not kept)", self.stage,
                    best_step, step)
        self.best = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.heldout is None or not self.heldout.due(state.global_step, state.max_steps) or not self.lead:
            return
        spec = self.section.metric_for_best_model
        result, seconds = self.heldout.run(model, state.global_step)
        value = monitored_value(result, spec)
        numbers = {**flat_metrics(result), "heldout/eval_seconds": round(seconds, 2)}
        if value is not None:
            numbers[self.key] = round(value, 4)
        self.pending.update(numbers)
        check_still_held()  # stopped past the takeover wait: the run dir is another's now
        with open(self.out_dir / EVALS, "a") as f:
            f.write(json.dumps({"step": state.global_step, "value": value, **numbers}) + "\n")
        log.info("%s step %d: held-out %s = %s (%d records, %.1f s)", self.stage, state.global_step, spec,
                 "n/a" if value is None else f"{value:.4g}", len(self.heldout.records), seconds)
        if value is not None and self._better(value):
            self._save_best(model, state.global_step, value)

    def _better(self, value: float) -> bool:
        if self.best is None or self.best["value"] is None:
            return True
        higher = higher_is_better(self.section.metric_for_best_model)
        return value > self.best["value"] if higher else value < self.best["value"]

    def _save_best(self, model, step: int, value: float) -> None:
        spec = self.section.metric_for_best_model
        with atomic_dir(self.out_dir / "best") as tmp:
            model.save_pretrained(str(tmp))
            self.meta.write(tmp, step=step, metric=spec, metric_value=value)
        self.best = {"step": step, "value": value}
        log.info("%s: best/ is now step %d (%s = %.4g)", self.stage, step, spec, value)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.pending:
            from flare_exp.training import add_to_log

            add_to_log(state, logs, self.pending)
            self.pending = {}

    def summary(self) -> dict:
        """The held-out fields of the stage's summary (none when the eval is off)."""
        if self.heldout is None:
            return {}
        return {"heldout_metric": self.section.metric_for_best_model, "heldout_records": len(self.heldout.records),
                "best_checkpoint": str(self.out_dir / "best") if self.best else None,
                "best_step": self.best and self.best["step"], "best_value": self.best and self.best["value"]}


def _step_of(line: str) -> int | None:
    """A heldout_evals.jsonl line's step; None for a torn or foreign line."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def reporting_last(trainer) -> None:
    """The trackers' callbacks (W&B, TensorBoard) after ours, so the values ours add to a log line (reward
    terms, held-out metrics) reach them too."""
    trainer.callback_handler.callbacks.sort(key=lambda c: type(c).__module__.startswith("transformers.integrations"))


def write_curves(history: list[dict], series: list[str], key: str, path: Path, title: str, off: str) -> None:
    """<stage>_curves.png: the training curves (``series``: log keys, e.g. the reward and its terms, or the loss
    and the eval loss) beside the held-out metric ``key``, by step; ``off`` says why a run has no held-out
    points."""
    from flare_exp.plotting import save_png, subplots

    fig, (left, right) = subplots(1, 2, figsize=(12, 4))
    logged = [h for h in history if isinstance(h.get(series[0]), (int, float))] if series else []
    for i, name in enumerate(series):
        points = [(h["step"], h[name]) for h in history if isinstance(h.get(name), (int, float))]
        if not points:
            continue
        if i and len(points) < len(logged):  # a term whose task had no prompt at some logged steps: the line
            # breaks there (NaN) and each measured step is a dot, not a straight line drawn across the gap
            points = [(h["step"], h[name] if isinstance(h.get(name), (int, float)) else math.nan) for h in logged]
        gaps = any(math.isnan(v) for _, v in points)
        left.plot(*zip(*points), "o-" if len(points) == 1 or gaps else "-", ms=3, label=name.split("/", 1)[-1],
                  lw=2 if i == 0 else 1, alpha=1 if i == 0 else 0.7)  # one point: a dot
    left.set(title=title, xlabel="step")
    left.legend(fontsize=7)
    evals = [(h["step"], h[key]) for h in history if h.get(key) is not None]
    if evals:
        right.plot(*zip(*evals), "o-")
    right.set(title=f"held-out {key.split('/', 1)[1]}" + ("" if evals else f" ({off}: none)"), xlabel="step")
    save_png(fig, path)
