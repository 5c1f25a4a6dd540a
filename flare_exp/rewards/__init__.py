"""Reward terms for GRPO, each a small class in its own module, found by name in one registry (``TERMS``).

A term scores a batch: ``term(completions, answers, rows) -> list[float]``, where ``rows`` are the dataset
columns of each sample (task_type, dataset, ...). Terms are combined per task type by
:mod:`flare_exp.rewards.combine` with weights from ``conf/reward/*.yaml``.
"""
from __future__ import annotations

import importlib

# term name -> "module:class", the one registry of reward terms; a term's module is imported on first use
# (radgraph pulls in allennlp: keep it lazy).
TERMS = {
    "choice": "flare_exp.rewards.choice:Choice",
    "numeric": "flare_exp.rewards.numeric:Numeric",
    "label_f1": "flare_exp.rewards.label_f1:LabelF1",
    "radgraph": "flare_exp.rewards.radgraph_term:RadGraphTerm",
    "rouge_l": "flare_exp.rewards.rouge:RougeL",
    "format_seed": "flare_exp.rewards.format:FormatSeed",
    "format_flare": "flare_exp.rewards.format:FormatFlare",
}


def get_term(name: str) -> type:
    if name not in TERMS:
        raise KeyError(f"unknown reward term {name!r}; known terms: {', '.join(sorted(TERMS))}")
    module, _, cls = TERMS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def term_parameters(name: str) -> dict:
    """The parameters a term's constructor takes (what reward.terms.<name>.* may set), with their defaults
    (inspect's ``empty`` where there is none)."""
    import inspect

    return {p: v.default for p, v in inspect.signature(get_term(name).__init__).parameters.items() if p != "self"}


def wrong_parameter_value(default, value) -> str | None:
    """Why ``value`` cannot stand where the term's default is a number (a word would fail inside the first GRPO
    step's arithmetic); None when it can, or when the default says nothing."""
    if isinstance(default, bool) or not isinstance(default, (int, float)) or value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            float(value)
        except (TypeError, ValueError):
            return "must be a number"
    return None
