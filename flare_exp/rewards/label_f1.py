"""label_f1: multi-label answers scored as a label-set F1 (the seed scored them with RadGraph).

Separators are per dataset (chestdr ``", "``, periapical ``";"`` with its comma-containing label kept
whole); labels compare case- and whitespace-insensitively.
"""
from __future__ import annotations

import re

from flare_exp.data.records import label_separator
from flare_exp.rewards import register


def label_set(text, separator: str) -> set[str]:
    if not isinstance(text, str):
        return set()
    parts = text.split(separator)
    return {re.sub(r"\s+", " ", p).strip(" .\n\t").lower() for p in parts} - {""}


def set_f1(pred: set, gold: set) -> float:
    if not pred and not gold:
        return 1.0
    if not pred or not gold:
        return 0.0
    return 2 * len(pred & gold) / (len(pred) + len(gold))


@register("label_f1")
class LabelF1:
    def __init__(self, separators: dict | None = None):
        self.separators = dict(separators or {})

    def separator(self, row: dict, answer: str) -> str:
        dataset = (row or {}).get("dataset", "")
        return self.separators.get(dataset) or label_separator(dataset, answer)

    def __call__(self, completions, answers, rows=None) -> list[float]:
        rows = rows or [{}] * len(answers)
        out = []
        for completion, answer, row in zip(completions, answers, rows):
            sep = self.separator(row, answer)
            out.append(set_f1(label_set(completion, sep), label_set(answer, sep)))
        return out
