"""label_f1: multi-label answers scored as a label-set F1 (the original scripts scored them with RadGraph).

Separators are per dataset (chestdr ``", "``, periapical ``";"`` with its comma-containing label kept
whole); labels compare case- and whitespace-insensitively.
"""
from __future__ import annotations

from flare_exp.metrics.answers import label_set, set_f1
from flare_exp.data.records import label_separator


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
