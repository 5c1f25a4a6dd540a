"""The rl stage's watchers as Trainer callbacks, and the GRPOTrainer hook that sees each generation round's
completions, rewards and advantages. Rank 0 decodes, scores and writes; a decision to stop (the alarm with
rl.stop_on_alarm, or Optuna's pruner) is sent to every rank, so all of them stop at the same step."""
from __future__ import annotations

import logging
from pathlib import Path

from flare_exp.callback_base import TrainerCallback

from flare_exp.io import write_json
from flare_exp.runtime import check_each
from flare_exp.rl_monitor.alarm import findings, no_signal
from flare_exp.rl_monitor.heldout import HeldOutEval, higher_is_better
from flare_exp.rl_monitor.heldout_watch import HeldOutWatch, check_metric_spec, write_curves
from flare_exp.rl_monitor.rollouts import RolloutLog, group_entries, wandb_table

log = logging.getLogger(__name__)


def groups_at_cap(ids: list[str], lengths: list[int], cap: int) -> float:
    """The share of prompt groups (consecutive completions of one record) with most completions at the cap."""
    groups, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[start]:
            groups.append(lengths[start:i])
            start = i
    return sum(sum(n >= cap for n in g) > len(g) / 2 for g in groups) / max(len(groups), 1)


def with_rollout_watch(trainer_class, monitor: "GRPOMonitor"):
    """``trainer_class`` whose generation rounds are shown to ``monitor`` (after TRL scored them)."""

    class WatchedGRPOTrainer(trainer_class):
        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            monitor.saw_round(self.state.global_step + 1, inputs, output)
            return output

    return WatchedGRPOTrainer


def agreed(flag: bool) -> bool:
    """Rank 0's decision on every rank (a rank that stops alone would leave the others waiting)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


class GRPOMonitor(HeldOutWatch):
    """Rollout log, held-out eval with the best/ checkpoint (:class:`HeldOutWatch`), the alarm and Optuna's
    pruning."""

    def __init__(self, cfg, out_dir: Path, reward, rollouts: RolloutLog | None, heldout: HeldOutEval | None,
                 meta, pruner=None):
        super().__init__("rl", cfg.rl, out_dir, heldout, meta)
        self.rl, self.reward = cfg.rl, reward
        self.rollouts, self.pruner = rollouts, pruner
        self.cap_shares: list[float] = []
        self.alarms: list[dict] = []
        self.no_signal: dict | None = None  # the first window in which GRPO's advantages were all 0 (once a run)
        self.pruned_at: int | None = None
        self.stopped_by: dict | None = None  # {step, why}: the alarm (rl.stop_on_alarm) or the pruner stopped it

    def resumed_from(self, step: int) -> None:
        if self.lead and self.rollouts is not None:  # a resume: the checkpoint's step, loaded by now
            self.rollouts.continue_from(step)
        super().resumed_from(step)

    def saw_round(self, step: int, inputs: list[dict], output: dict) -> None:
        lengths = [int(n) for n in output["completion_mask"].sum(1).tolist()]
        cap = self.rl.max_completion_length
        self.cap_shares.append(groups_at_cap([r["id"] for r in inputs], lengths, cap))
        if self.lead and self.rollouts is not None and self.rollouts.wants(step) and self.reward.last_samples:
            advantages = [float(a) for a in output["advantages"].tolist()]
            self.rollouts.append(group_entries(step, inputs, self.reward.last_samples, advantages, lengths, cap,
                                               self.reward.weights, self.rollouts.groups_per_step))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "reward" not in logs:
            return
        from flare_exp.training import add_to_log

        if self.cap_shares:
            self.pending["completions/groups_at_cap"] = round(sum(self.cap_shares) / len(self.cap_shares), 4)
            self.cap_shares = []
        add_to_log(state, logs, self.pending)
        self.pending = {}
        if self.lead:
            self._to_wandb(args)
        stop = False
        if self.lead:
            stop = self._alarm(state)
            stop = self._prune(state, logs) or stop
        if agreed(stop):
            control.should_training_stop = True

    def _to_wandb(self, args) -> None:
        if self.rollouts is None or not self.rollouts.new_entries or "wandb" not in (args.report_to or []):
            return
        import wandb

        if wandb.run is not None:
            wandb.log({"rollouts": wandb_table(self.rollouts.new_entries, self.rollouts.image_root)}, commit=False)
        self.rollouts.new_entries = []

    def _alarm(self, state) -> bool:
        rl = self.rl
        said = {a["kind"] for a in self.alarms}  # each condition (and term) once per run
        new = [(kind, finding) for kind, finding in findings(
            state.log_history, rl.alarm_window, rl.alarm_min_rise, rl.alarm_length_collapse,
            self.key if self.heldout else None, higher_is_better(rl.metric_for_best_model)) if kind not in said]
        for kind, finding in new:
            self.alarms.append({"step": state.global_step, "kind": kind, "finding": finding})
            log.warning("rl reward-hacking alarm at step %d: %s%s", state.global_step, finding,
                        " -- stopping (rl.stop_on_alarm=true)" if rl.stop_on_alarm else
                        " (rl.stop_on_alarm=true would stop the run)")
        for _kind, finding in no_signal(state.log_history, rl.alarm_window) if self.no_signal is None else []:
            self.no_signal = {"step": state.global_step, "finding": finding}  # no alarm (no gaming): its own field
            log.warning("rl: no learning signal at step %d: %s", state.global_step, finding)
        if new and rl.stop_on_alarm:
            self.stopped_by = {"step": state.global_step,
                               "why": f"the reward-hacking alarm ({', '.join(kind for kind, _ in new)})",
                               "findings": [finding for _, finding in new]}
        return bool(new) and rl.stop_on_alarm

    def _prune(self, state, logs: dict) -> bool:
        value = logs.get(self.key)
        if self.pruner is None or value is None or self.pruned_at is not None:
            return False
        if self.pruner(state.global_step, value):
            self.pruned_at = state.global_step
            self.stopped_by = {"step": state.global_step, "why": "Optuna's pruner"}
            log.warning("rl: Optuna's pruner stops this trial at step %d (%s = %.4g)", state.global_step,
                        self.rl.metric_for_best_model, value)
            return True
        return False

    def rl_summary(self, max_steps: int) -> dict:
        out = {"alarms": self.alarms, "alarm_count": len(self.alarms), **self.summary()}  # the count: a sweep column
        if self.no_signal is not None:
            out["no_learning_signal"] = self.no_signal
        if self.stopped_by is not None and self.stopped_by["step"] < max_steps:  # else it ended where it would
            out["stopped_early"] = {"step": self.stopped_by["step"], "max_steps": max_steps, **self.stopped_by}
        if self.pruner is not None:
            out["pruned_at_step"] = self.pruned_at
            out["steps_saved"] = max_steps - self.pruned_at if self.pruned_at else 0
        return out


def write_alarms(out_dir: Path, alarms: list[dict]) -> None:
    if alarms:
        write_json(out_dir / "alarms.json", alarms)


def check_monitor_settings(rl) -> None:
    """The watchers' settings, checked before any work: each refusal with the others."""
    check_each((check_metric_spec, "rl", rl.metric_for_best_model), (_check_pruning, rl), (_check_alarm_window, rl),
               (_check_length_collapse, rl), (_check_min_rise, rl), (_check_heldout_size, rl))


def _check_heldout_size(rl) -> None:
    if rl.eval_steps and not rl.eval_per_task:  # else, once the model loaded: "no records" of rl.eval_file
        raise ValueError(f"rl.eval_steps={rl.eval_steps} evaluates held-out records but rl.eval_per_task=0 takes none "
                         "of them: pass rl.eval_per_task=N (records per task type), or rl.eval_steps=0")


def _check_pruning(rl) -> None:
    if rl.optuna_trial is not None and not rl.eval_steps:
        raise ValueError("rl.optuna_trial is set (the Optuna sweeper prunes this trial) but rl.eval_steps=0: the "
                         "pruner needs the in-training eval; pass rl.eval_steps=N")


def _check_alarm_window(rl) -> None:
    if rl.alarm_window < 4:
        raise ValueError(f"rl.alarm_window={rl.alarm_window}: the alarm compares two halves of at least 4 steps; "
                         "pass rl.alarm_window=4 or more")


def _check_length_collapse(rl) -> None:
    """A share of the first steps' mean completion length (alarm.length_findings): at 1 or more any length
    (a rising one too) reads as a collapse, at 0 or less none ever does."""
    share = rl.alarm_length_collapse
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share < 1:
        raise ValueError(f"rl.alarm_length_collapse={share!r}: a share of the first steps' mean completion length, "
                         "above 0 and below 1 (0.5: the alarm fires when completions shrink under half that length); "
                         "pass e.g. rl.alarm_length_collapse=0.5")


def _check_min_rise(rl) -> None:
    """How much the reward must rise over the window for an alarm (rising reward is part of every condition):
    a negative one, or NaN, made a falling reward read as a rise ("rose by -0.26") and stopped such runs."""
    import math

    rise = rl.alarm_min_rise
    if isinstance(rise, bool) or not isinstance(rise, (int, float)) or not math.isfinite(rise) or rise < 0:
        raise ValueError(f"rl.alarm_min_rise={rise!r}: the reward's rise over rl.alarm_window steps that every alarm "
                         "needs, a finite number of 0 or more; pass e.g. rl.alarm_min_rise=0.1")


def build_monitor(cfg, out_dir: Path, reward, task_types: list[str], chat, meta) -> GRPOMonitor:
    rl = cfg.rl
    rollouts = RolloutLog(out_dir, rl.log_rollouts_steps, rl.rollouts_groups_per_step, rl.rollouts_max_mb,
                          chat.image_root) if rl.log_rollouts_steps else None
    heldout = HeldOutEval(cfg, "rl", out_dir, task_types, chat) if rl.eval_steps else None
    pruner = None
    if rl.optuna_trial is not None:
        from flare_exp.optuna_pruning import trial_pruner

        pruner = trial_pruner(Path(rl.optuna_study), rl.optuna_trial)
    return GRPOMonitor(cfg, out_dir, reward, rollouts, heldout, meta, pruner)


def finish_monitor(monitor: GRPOMonitor, history: list[dict], out_dir: Path, max_steps: int) -> dict:
    """After training (rank 0): the curves beside the held-out metric, alarms.json; the summary's fields."""
    terms = sorted({k for h in history if "reward" in h for k in h if k.startswith("reward_term/")})
    write_curves(history, ["reward", *terms], monitor.key, out_dir / "rl_curves.png", "reward and its terms",
                 "rl.eval_steps=0")
    write_alarms(out_dir, monitor.alarms)
    return monitor.rl_summary(max_steps)


class RolloutWeightsLog(TrainerCallback):
    """Each logged step's rollout weights (adapter | merged), in log_history only (a word, not a wandb value),
    and an attempt's first log line also the first step it sampled: a checkpoint keeps them, so after a resume
    that changed rl.rollout_weights the summary says from which step each was used (``rollout_weights_from_step``)."""

    def __init__(self, trainer):
        self.trainer, self.said_first = trainer, False

    def on_log(self, args, state, control, logs=None, **kwargs):
        used = getattr(self.trainer.rollout_weights, "used", None)
        if used and state.log_history and "reward" in state.log_history[-1]:
            state.log_history[-1]["rollout_weights"] = used
            first = getattr(self.trainer, "first_rollout_step", None)  # this attempt's first sampled step
            if first is not None and not self.said_first:
                state.log_history[-1]["rollout_weights_first_step"] = first
                self.said_first = True


def rollout_weights_spans(history: list[dict], used: str | None) -> dict:
    """{"rollout_weights_from_step": {first step: weights}} when the run's attempts sampled with different
    rollout weights (a resume that changed rl.rollout_weights), else {}."""
    spans: dict[str, str] = {}
    for h in history:
        value = h.get("rollout_weights")
        if value and (not spans or list(spans.values())[-1] != value):
            spans[str(h.get("rollout_weights_first_step", h.get("step")))] = value
    return {"rollout_weights_from_step": spans} if len(set(spans.values()) | {used} - {None}) > 1 else {}


class RewardTermLog(TrainerCallback):
    """Adds the per-term reward means since the last log line to the log (and wandb)."""

    def __init__(self, reward):
        self.reward = reward

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        from flare_exp.training import add_to_log

        add_to_log(state, logs, {f"reward_term/{k}": round(v, 4) for k, v in self.reward.pop_term_means().items()})
