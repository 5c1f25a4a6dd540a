"""choice: multiple-choice answers (dental: one option letter, A..K), read with
``flare_exp.metrics.answers.extract_choice`` (which fixes the original scripts' "a" read as option A and its A..F
limit).
"""
from __future__ import annotations

from flare_exp.metrics.answers import extract_choice


class Choice:
    def __init__(self, correct: float = 1.0, wrong: float = -0.2, missing: float = -0.2,
                 letters: str = "ABCDEFGHIJK"):
        self.correct, self.wrong, self.missing, self.letters = correct, wrong, missing, letters

    def __call__(self, completions, answers, rows=None) -> list[float]:
        out = []
        for completion, answer in zip(completions, answers):
            gold = extract_choice(str(answer), self.letters)
            pred = extract_choice(completion, self.letters)
            if pred is None:
                out.append(self.missing)
            else:
                out.append(self.correct if pred == gold else self.wrong)
        return out
