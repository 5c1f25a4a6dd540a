"""The GRPO reward: per task type, a weighted sum of registered terms, clipped.

``build_reward(cfg.reward)`` returns a TRL-compatible reward function
``f(prompts, completions, task_type, answer, dataset, ...) -> list[float]``; it reads the task type and the
reference answer from the dataset columns TRL passes through, so no guessing from the text. After each call
``last_term_means`` holds the mean of every (task type, term) pair in the batch, for logging.
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict

from omegaconf import OmegaConf

from flare_exp.data.records import TASK_TYPES
from flare_exp.rewards import get_term, term_parameters, wrong_parameter_value

log = logging.getLogger(__name__)


def completion_text(completion) -> str | None:
    """TRL passes plain strings, or for conversational data a list of messages: take the assistant text."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content if isinstance(content, str) else None
    return None


def _plain(reward_cfg) -> dict:
    return OmegaConf.to_container(reward_cfg, resolve=True) if not isinstance(reward_cfg, dict) else reward_cfg


def active_weights(reward_cfg) -> dict[str, dict[str, float]]:
    """task type -> {term: weight} of the terms that are on. A weight of 0 turns its term off (not built, not
    scored, not logged); a task type whose weights are all 0, or that has none, is not rewarded (``__call__``)."""
    cfg = _plain(reward_cfg)
    return {t: {k: float(v) for k, v in ((cfg.get(t) or {}).get("weights") or {}).items() if float(v) != 0}
            for t in TASK_TYPES}


def term_params(reward_cfg) -> dict[str, dict]:
    """term -> its constructor's keyword arguments (reward.terms.<term>; radgraph also reward.radgraph)."""
    cfg = _plain(reward_cfg)
    params = {name: dict(value or {}) for name, value in (cfg.get("terms") or {}).items()}
    # reward.radgraph's settings (their defaults: config.RadGraphConfig); terms.radgraph may override them
    params["radgraph"] = {**(cfg.get("radgraph") or {}), **params.get("radgraph", {})}
    return params


class CombinedReward:
    __name__ = "flare_reward"  # TRL names its reward columns after the function

    def __init__(self, reward_cfg):
        cfg = _plain(reward_cfg)
        self.clip = (cfg.get("clip_min", -math.inf), cfg.get("clip_max", math.inf))
        self.invalid = cfg.get("invalid_completion", -1.0)
        self.weights = active_weights(cfg)
        params = term_params(cfg)
        names = sorted({n for w in self.weights.values() for n in w})
        self.terms = {n: get_term(n)(**params.get(n, {})) for n in names}  # unknown name -> KeyError
        self.last_term_means: dict[str, float] = {}
        # the last batch per completion: its text, raw term scores and clipped total (the rollout log reads it)
        self.last_samples: list[dict] = []
        self._totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        self._warned: set = set()

    def task_types(self) -> list[str]:
        return [t for t, w in self.weights.items() if w]

    def __call__(self, prompts=None, completions=None, task_type=None, answer=None, dataset=None, **kwargs):
        n = len(completions)
        texts = [completion_text(c) for c in completions]
        task_type = list(task_type) if task_type is not None else [None] * n
        answers = list(answer) if answer is not None else [None] * n
        datasets = list(dataset) if dataset is not None else [None] * n
        rewards = [0.0] * n
        by_task = defaultdict(list)
        for i in range(n):
            if texts[i] is None:
                rewards[i] = self.invalid
            elif task_type[i] in self.weights and not self.weights[task_type[i]]:
                rewards[i] = 0.0  # every term of this task type is off: no reward, no signal (not an invalid output)
            elif task_type[i] not in self.weights or answers[i] is None:
                if task_type[i] not in self._warned:
                    log.warning("reward: unknown task_type=%r (or no answer): scoring it %s",
                                task_type[i], self.invalid)
                    self._warned.add(task_type[i])
                rewards[i] = self.invalid
            else:
                by_task[task_type[i]].append(i)
        means, sample_terms = {}, [{} for _ in range(n)]
        for task, idx in by_task.items():
            sub_texts = [texts[i] for i in idx]
            sub_answers = [str(answers[i]) for i in idx]
            rows = [{"task_type": task, "dataset": datasets[i]} for i in idx]
            for name, weight in self.weights[task].items():
                scores = self.terms[name](sub_texts, sub_answers, rows)
                means[f"{task}/{name}"] = sum(scores) / len(scores)
                self._totals[f"{task}/{name}"][0] += sum(scores)
                self._totals[f"{task}/{name}"][1] += len(scores)
                for i, s in zip(idx, scores):
                    rewards[i] += weight * s
                    sample_terms[i][name] = s
        self.last_term_means = means
        lo, hi = self.clip
        totals = [min(max(r, lo), hi) for r in rewards]
        self.last_samples = [{"text": t, "terms": terms, "total": r} for t, terms, r in zip(texts, sample_terms, totals)]
        return totals

    def pop_term_means(self) -> dict[str, float]:
        """Mean of every (task type, term) since the last call: per-term curves for the training log."""
        means = {k: total / count for k, (total, count) in self._totals.items() if count}
        self._totals.clear()
        return means


def build_reward(reward_cfg) -> CombinedReward:
    for task, weights in active_weights(reward_cfg).items():  # allowed (a penalty), but rarely meant: said
        for term, weight in weights.items():
            if weight < 0:
                log.warning("reward.%s.weights.%s=%g is negative: the better a completion scores on %s, the lower "
                            "its reward (a penalty); a positive weight rewards it", task, term, weight, term)
    return CombinedReward(reward_cfg)


def reward_problems(reward_cfg, trained_task_types=()) -> list[str]:
    """Every problem with reward.* that rl would meet only at its start: unknown term names (in weights or in
    reward.terms), parameters a term does not take, no term on at all, a task type in rl.task_types
    (``trained_task_types``) that is unknown or has every term off."""
    from flare_exp.rewards import TERMS

    cfg = _plain(reward_cfg)
    problems, known = [], ", ".join(sorted(TERMS))
    for task in TASK_TYPES:
        for name in ((cfg.get(task) or {}).get("weights") or {}):
            if name not in TERMS:
                problems.append(f"reward.{task}.weights.{name}: unknown reward term; known: {known}")
    for name, params in term_params(cfg).items():
        if name not in TERMS:
            problems.append(f"reward.terms.{name}: unknown reward term; known: {known}")
            continue
        accepted = term_parameters(name)
        for param, value in params.items():
            section = "reward.radgraph" if name == "radgraph" and param in (cfg.get("radgraph") or {}) \
                else f"reward.terms.{name}"
            if param not in accepted:
                problems.append(f"{section}.{param}: the {name} term takes no such parameter; it takes "
                                f"{', '.join(accepted)}")
            elif wrong := wrong_parameter_value(accepted[param], value):
                problems.append(f"{section}.{param}={value!r}: {wrong} (its default: {accepted[param]})")
    weights = active_weights(cfg)
    if not any(weights.values()):
        problems.append(f"reward={cfg.get('name')}: every reward weight is 0 (or none is set): a weight of 0 turns "
                        "its term off, so rl would reward nothing. Give a term of some task type a non-zero weight")
    for task in trained_task_types:
        if task not in weights:
            problems.append(f"rl.task_types: unknown task type {task!r}; choose from {', '.join(TASK_TYPES)}")
        elif not weights[task] and any(weights.values()):
            problems.append(f"rl.task_types names {task}, whose reward weights are all 0 (every term off: its "
                            f"completions would all score 0, no signal). Give reward.{task}.weights a non-zero "
                            "weight or leave it out of rl.task_types")
    return problems
