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
from flare_exp.rewards import get_term

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


class CombinedReward:
    __name__ = "flare_reward"  # TRL names its reward columns after the function

    def __init__(self, reward_cfg):
        cfg = OmegaConf.to_container(reward_cfg, resolve=True) if not isinstance(reward_cfg, dict) else reward_cfg
        self.clip = (cfg.get("clip_min", -math.inf), cfg.get("clip_max", math.inf))
        self.invalid = cfg.get("invalid_completion", -1.0)
        self.weights = {t: {k: float(v) for k, v in (cfg.get(t) or {}).get("weights", {}).items() if float(v) != 0}
                        for t in TASK_TYPES}
        term_params = dict(cfg.get("terms") or {})
        # reward.radgraph's settings (their defaults: config.RadGraphConfig); terms.radgraph may override them
        term_params["radgraph"] = {**(cfg.get("radgraph") or {}), **term_params.get("radgraph", {})}
        names = sorted({n for w in self.weights.values() for n in w})
        self.terms = {n: get_term(n)(**(term_params.get(n) or {})) for n in names}  # unknown name -> KeyError
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
            elif task_type[i] not in self.weights or not self.weights[task_type[i]] or answers[i] is None:
                if task_type[i] not in self._warned:
                    log.warning("reward: no weights for task_type=%r (or no answer): scoring it %s",
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
    return CombinedReward(reward_cfg)
