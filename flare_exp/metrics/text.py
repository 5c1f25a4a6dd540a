"""Report-text metrics, each named for exactly what it computes.

- ``bleu_1`` .. ``bleu_4``: corpus BLEU (Papineni et al.): clipped n-gram counts pooled over the corpus,
  cumulative geometric mean over n = 1..N with uniform weights, corpus brevity penalty, no smoothing, on
  lower-cased whitespace tokens. (pycocoevalcap, used by the R2Gen literature, tokenises differently:
  compare with published numbers only knowing that.)
- ``seed_bleu``: the seed's / FLARE25 baseline's BLEU: per-sample clipped n-gram precision averaged over the
  samples, geometric mean over n = 1..4, corpus brevity penalty, no smoothing.
- ``rouge_1`` / ``rouge_2`` / ``rouge_l``: rouge-score ROUGE-1, ROUGE-2 and ROUGE-L F-measures (stemmer on),
  means over samples; an empty prediction scores 0. ``rouge_l_per_pair``: ROUGE-L per pair (the rouge_l reward
  term, the scored sheet's rows).
"""
from __future__ import annotations

import functools
import math
from collections import Counter


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _tokens(text) -> list[str]:
    return str(text or "").lower().split()


def corpus_bleu(hyps: list[str], refs: list[str], max_n: int = 4) -> dict[str, float]:
    hyp_tok, ref_tok = [_tokens(h) for h in hyps], [_tokens(r) for r in refs]
    matches, totals = [0] * max_n, [0] * max_n
    for h, r in zip(hyp_tok, ref_tok):
        for n in range(1, max_n + 1):
            hc, rc = _ngrams(h, n), _ngrams(r, n)
            matches[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
            totals[n - 1] += max(len(h) - n + 1, 0)
    hyp_len, ref_len = sum(map(len, hyp_tok)), sum(map(len, ref_tok))
    bp = 1.0 if hyp_len > ref_len else (math.exp(1 - ref_len / hyp_len) if hyp_len else 0.0)
    out = {}
    for n in range(1, max_n + 1):
        precisions = [matches[k] / totals[k] if totals[k] else 0.0 for k in range(n)]
        out[f"bleu_{n}"] = bp * math.exp(sum(math.log(p) for p in precisions) / n) if min(precisions) > 0 else 0.0
    return out


def seed_bleu(hyps: list[str], refs: list[str], max_n: int = 4) -> float:
    hyp_tok, ref_tok = [_tokens(h) for h in hyps], [_tokens(r) for r in refs]
    mean_precisions = []
    for n in range(1, max_n + 1):
        per_sample = []
        for h, r in zip(hyp_tok, ref_tok):
            hc, rc = _ngrams(h, n), _ngrams(r, n)
            total = sum(hc.values())
            per_sample.append(sum(min(c, rc[g]) for g, c in hc.items()) / total if total else 0.0)
        mean_precisions.append(sum(per_sample) / len(per_sample) if per_sample else 0.0)
    if min(mean_precisions) <= 0:
        return 0.0
    hyp_len, ref_len = sum(map(len, hyp_tok)), sum(map(len, ref_tok))
    bp = 1.0 if hyp_len > ref_len else (math.exp(1 - ref_len / hyp_len) if hyp_len else 0.0)
    return bp * math.exp(sum(math.log(p) for p in mean_precisions) / max_n)


@functools.lru_cache(maxsize=None)
def rouge_scorer_of(kinds: tuple[str, ...], use_stemmer: bool = True):
    """rouge-score's scorer for ``kinds`` (built once per process: its stemmer is not free)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(kinds), use_stemmer=use_stemmer)


def rouge_l_per_pair(hyps: list, refs: list, use_stemmer: bool = True) -> list[float]:
    """The ROUGE-L F-measure of each (prediction, reference) pair; a prediction that is empty or not text scores 0."""
    scorer = rouge_scorer_of(("rougeL",), use_stemmer)
    return [scorer.score(str(r), h)["rougeL"].fmeasure if isinstance(h, str) and h.strip() else 0.0
            for h, r in zip(hyps, refs)]


def rouge(hyps: list[str], refs: list[str]) -> dict[str, float]:
    scorer = rouge_scorer_of(("rouge1", "rouge2", "rougeL"))
    totals = {"rouge_1": 0.0, "rouge_2": 0.0, "rouge_l": 0.0}
    for h, r in zip(hyps, refs):
        if isinstance(h, str) and h.strip():
            scores = scorer.score(str(r), h)
            for name, key in (("rouge_1", "rouge1"), ("rouge_2", "rouge2"), ("rouge_l", "rougeL")):
                totals[name] += scores[key].fmeasure
    return {k: v / len(hyps) if hyps else float("nan") for k, v in totals.items()}


def rouge_l(hyps: list[str], refs: list[str]) -> float:
    return rouge(hyps, refs)["rouge_l"]
