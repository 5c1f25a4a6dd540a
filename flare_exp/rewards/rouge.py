"""rouge_l: ROUGE-L F-measure of a completion against the reference (stemmer on, as the original scripts), scored
by :func:`flare_exp.metrics.text.rouge_l_per_pair`."""
from __future__ import annotations

from flare_exp.metrics.text import rouge_l_per_pair, rouge_scorer_of


class RougeL:
    def __init__(self, use_stemmer: bool = True):
        self.use_stemmer = use_stemmer
        rouge_scorer_of(("rougeL",), use_stemmer)  # rouge-score missing fails here, before training starts

    def __call__(self, completions, answers, rows=None) -> list[float]:
        return rouge_l_per_pair(completions, answers, self.use_stemmer)
