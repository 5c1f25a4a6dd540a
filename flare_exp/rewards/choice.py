"""choice: multiple-choice answers (dental: one option letter, A..K).

Fixes the seed's defect: it upper-cased the output before searching ``\\b[A-F]\\b``, so the article "a" in
any sentence read as option A, and options past F could never match. Here a letter counts only in forms
that mean an option: ``C``, ``C.``, ``(C)``, ``Answer: C``, ``option C``, ``C) ...`` at the start, or a
standalone capital that is not the article/pronoun starting a phrase ("A small effusion", "I think").
"""
from __future__ import annotations

import re

from flare_exp.rewards import register


def extract_choice(text: str, letters: str = "ABCDEFGHIJK") -> str | None:
    if not isinstance(text, str):
        return None
    s = text.strip()
    cls = f"[{letters}]"
    patterns = [
        rf"^\(?({cls})\)?[.):]?$",                                             # the whole answer: "C", "(C)", "C."
        rf"(?i:\b(?:answer|option|choice)\b(?:\s+is)?\s*[:\-]?\s*)\(?({cls}|{cls.lower()})\)?(?![\w])",
        rf"\(({cls})\)",                                                       # "(C)"
        rf"^({cls})[.):]\s",                                                   # "C. Caries", "C) ..."
    ]
    for pat in patterns:
        m = re.search(pat, s, flags=re.M)
        if m:
            return m.group(1).upper()
    if len(s) == 1 and s.upper() in letters:  # a lone lower-case letter
        return s.upper()
    for m in re.finditer(rf"(?<![\w'-])({cls})(?![\w'-])", s):
        letter = m.group(1)
        following = s[m.end():m.end() + 2]
        if letter in "AI" and re.match(r"\s[a-z]", following):  # "A small ...", "I think ..."
            continue
        return letter
    return None


@register("choice")
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
