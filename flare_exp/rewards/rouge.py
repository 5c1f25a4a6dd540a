"""rouge_l: ROUGE-L F-measure from rouge-score (stemmer on, as the original scripts)."""
from __future__ import annotations

from flare_exp.rewards import register


@register("rouge_l")
class RougeL:
    def __init__(self, use_stemmer: bool = True):
        from rouge_score import rouge_scorer

        self.scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)

    def __call__(self, completions, answers, rows=None) -> list[float]:
        return [self.scorer.score(str(a), c)["rougeL"].fmeasure if isinstance(c, str) and c.strip() else 0.0
                for c, a in zip(completions, answers)]
