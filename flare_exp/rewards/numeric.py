"""numeric: regression answers (boneresorption: a percentage such as ``22.9``), read with
``flare_exp.metrics.answers.parse_number`` (the original scripts missed the ``%`` and fell through to the report
reward). The value term is the original scripts' tiers; there is no format or length term here (the original
scripts' 0.3 x format paid a number answer for long text with headings).
"""
from __future__ import annotations

from flare_exp.metrics.answers import parse_number


class Numeric:
    def __init__(self, tiers=((2.0, 1.0), (5.0, 0.5), (10.0, 0.0)), beyond: float = -0.5, missing: float = -0.5,
                 valid_range=(0.0, 100.0), out_of_range: float = -0.3):
        self.tiers = [(float(t), float(v)) for t, v in tiers]
        self.beyond, self.missing = beyond, missing
        self.valid_range, self.out_of_range = valid_range, out_of_range

    def __call__(self, completions, answers, rows=None) -> list[float]:
        out = []
        for completion, answer in zip(completions, answers):
            pred, gold = parse_number(completion), parse_number(answer)
            if pred is None or gold is None:
                out.append(self.missing)
                continue
            err = abs(pred - gold)
            score = next((v for t, v in self.tiers if err <= t), self.beyond)
            if self.valid_range is not None and not (self.valid_range[0] <= pred <= self.valid_range[1]):
                score += self.out_of_range
            out.append(score)
        return out
