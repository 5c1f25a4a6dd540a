"""Format terms.

format_seed: the seed's format reward, kept for reproducing it: +0.3 for 20-400 words, -0.3 under
10, +0.7 for both Findings and Impression headings (+0.3 for one), +0.6 x (1 - Jaccard of the two sections'
sentence sets), -1.0 for artefacts. FLARE IU_XRay answers are one section of ~6 words with no headings, so
this term pushes away from the target; reward=flare does not use it.

format_flare: pays for answers in the reference's style: concise (length close to the reference's), a single
section (no Findings/Impression headings), no artefacts or chat residue.
"""
from __future__ import annotations

import re


ARTEFACTS = ("<REASONING>", "addCriterion")
_FINDINGS = re.compile(r"findings\s*:", re.I)
_IMPRESSION = re.compile(r"impression\s*:", re.I)


def _sentences(text: str) -> set[str]:
    return {s.strip().lower() for s in re.split(r"[.\n]+", text) if s.strip()}


class FormatSeed:
    def __call__(self, completions, answers=None, rows=None) -> list[float]:
        out = []
        for text in completions:
            if not isinstance(text, str):
                out.append(0.0)
                continue
            score, words = 0.0, len(text.split())
            if 20 <= words <= 400:
                score += 0.3
            elif words < 10:
                score -= 0.3
            f, i = _FINDINGS.search(text), _IMPRESSION.search(text)
            if f and i:
                score += 0.7
                a, b = sorted([f, i], key=lambda m: m.start())
                first, second = _sentences(text[a.end():b.start()]), _sentences(text[b.end():])
                union = first | second
                score += 0.6 * (1 - (len(first & second) / len(union) if union else 1.0))
            elif f or i:
                score += 0.3
            if any(a in text for a in ARTEFACTS):
                score -= 1.0
            out.append(score)
        return out


class FormatFlare:
    def __init__(self, length_tolerance: float = 1.0, heading_penalty: float = 0.5, artefact_penalty: float = 1.0):
        self.length_tolerance = length_tolerance
        self.heading_penalty, self.artefact_penalty = heading_penalty, artefact_penalty

    def __call__(self, completions, answers, rows=None) -> list[float]:
        out = []
        for text, answer in zip(completions, answers):
            if not isinstance(text, str) or not text.strip():
                out.append(-1.0)
                continue
            n, ref = len(text.split()), max(len(str(answer).split()), 1)
            # 1.0 at the reference's length, falling linearly to 0 at (1 + tolerance) x or half of it.
            ratio = n / ref
            score = max(0.0, 1.0 - abs(ratio - 1.0) / self.length_tolerance) if ratio >= 1 else max(0.0, 2 * ratio - 1)
            if _FINDINGS.search(text) or _IMPRESSION.search(text):
                score -= self.heading_penalty
            if any(a in text for a in ARTEFACTS) or text.lstrip().startswith("assistant"):
                score -= self.artefact_penalty
            out.append(score)
        return out
