"""Reward terms for GRPO, each a small class in its own module, found by name in a registry.

A term scores a batch: ``term(completions, answers, rows) -> list[float]``, where ``rows`` are the dataset
columns of each sample (task_type, dataset, ...). Terms are combined per task type by
:mod:`flare_exp.rewards.combine` with weights from ``conf/reward/*.yaml``.
"""
from __future__ import annotations

import importlib

REGISTRY: dict[str, type] = {}
# term name -> module that registers it; imported on first use (radgraph pulls in allennlp, keep it lazy).
MODULES = {
    "choice": "flare_exp.rewards.choice",
    "numeric": "flare_exp.rewards.numeric",
    "label_f1": "flare_exp.rewards.label_f1",
    "radgraph": "flare_exp.rewards.radgraph_term",
    "rouge_l": "flare_exp.rewards.rouge",
    "format_seed": "flare_exp.rewards.format",
    "format_flare": "flare_exp.rewards.format",
}


def register(name: str):
    def wrap(cls):
        REGISTRY[name] = cls
        cls.name = name
        return cls

    return wrap


def get_term(name: str) -> type:
    if name not in MODULES:
        raise KeyError(f"unknown reward term {name!r}; known terms: {', '.join(sorted(MODULES))}")
    importlib.import_module(MODULES[name])
    return REGISTRY[name]
