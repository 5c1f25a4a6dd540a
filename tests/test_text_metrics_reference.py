"""BLEU and ROUGE values against the reference implementations (sacrebleu; rouge-score called directly), on
texts with repeated tokens (n-gram clipping), empty predictions and empty references; the seed's BLEU and one
ROUGE case worked out by hand."""
import math

import pytest

from flare_exp.metrics import text

sacrebleu = pytest.importorskip("sacrebleu")

# repeats: "the the the" is clipped to the reference's two "the"; an empty prediction; an empty reference
CORPORA = {
    "repeats": (["the the the cat sat on the mat", "no no no effusion", "heart size is normal normal"],
                ["the cat sat on the the mat", "no pleural effusion no pneumothorax", "heart size is normal"]),
    "empty_prediction": (["the lungs are clear", "", "mild cardiomegaly is seen today"],
                         ["the lungs are clear bilaterally", "no acute disease", "mild cardiomegaly is seen"]),
    "empty_reference": (["the lungs are clear and the heart is normal", "stable small effusion"],
                        ["the lungs are clear and the heart is normal in size", ""]),
    "short_prediction": (["Heart Normal heart", "lungs"], ["heart is normal and heart size stable", "lungs clear"]),
}


def sacrebleu_scores(hyps, refs, max_n=4):
    out = {}
    for n in range(1, max_n + 1):
        bleu = sacrebleu.metrics.BLEU(tokenize="none", lowercase=True, smooth_method="none", max_ngram_order=n,
                                      effective_order=False)
        out[f"bleu_{n}"] = bleu.corpus_score(hyps, [refs]).score / 100
    return out


@pytest.mark.parametrize("name", list(CORPORA))
def test_corpus_bleu_equals_sacrebleu(name):
    hyps, refs = CORPORA[name]
    ours, reference = text.corpus_bleu(hyps, refs), sacrebleu_scores(hyps, refs)
    assert ours == pytest.approx(reference, abs=1e-9)
    assert any(0 < v < 1 for v in ours.values())  # not a trivial all-zero or all-one case


def test_corpus_bleu_clips_repeats_by_hand():
    """One pair: "the the the" against "the cat": clipped unigram matches 1 of 3; BLEU-1 = BP * 1/3 with
    BP = 1 (3 >= 2 tokens)."""
    assert text.corpus_bleu(["the the the"], ["the cat"], max_n=1)["bleu_1"] == pytest.approx(1 / 3)
    # shorter than the reference: BP = exp(1 - 4/2); unigram precision 2/2, bigram 1/1
    assert text.corpus_bleu(["the cat"], ["the cat sat down"], max_n=2)["bleu_2"] == pytest.approx(math.exp(-1))


def test_seed_bleu_by_hand():
    """The seed's BLEU: per-sample clipped precision averaged over samples for each n, geometric mean over
    n = 1..4, corpus brevity penalty. Sample 1: "a a a b c d" vs "a b c d e": p1 = 4/6 (two "a" clipped), p2 = 3/5
    ("a a" twice, not in the reference), p3 = 2/4, p4 = 1/3. Sample 2 is identical to its reference: all 1.
    Lengths 6 + 4 >= 5 + 4: BP 1."""
    hyps, refs = ["a a a b c d", "w x y z"], ["a b c d e", "w x y z"]
    means = [(4 / 6 + 1) / 2, (3 / 5 + 1) / 2, (2 / 4 + 1) / 2, (1 / 3 + 1) / 2]
    assert text.seed_bleu(hyps, refs) == pytest.approx(math.exp(sum(map(math.log, means)) / 4))
    # a shorter corpus is penalised: "w x" against "w x y z" alone: p1 = p2 = 1, p3 = p4 = 0 -> 0
    assert text.seed_bleu(["w x"], ["w x y z"]) == 0.0
    assert text.seed_bleu(["w x y"], ["w x y z w"]) == 0.0  # no 4-gram in a 3-token prediction
    short = text.seed_bleu(["p q r s"], ["p q r s t u"])
    assert short == pytest.approx(math.exp(1 - 6 / 4))


def rouge_score_reference(hyps, refs):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = [0.0, 0.0, 0.0]
    for h, r in zip(hyps, refs):
        scores = scorer.score(r, h)  # rouge-score's order: target (reference), prediction
        for i, key in enumerate(("rouge1", "rouge2", "rougeL")):
            totals[i] += scores[key].fmeasure
    return dict(zip(("rouge_1", "rouge_2", "rouge_l"), (t / len(hyps) for t in totals)))


@pytest.mark.parametrize("name", list(CORPORA))
def test_eval_rouge_equals_rouge_score(name):
    hyps, refs = CORPORA[name]
    assert text.rouge(hyps, refs) == pytest.approx(rouge_score_reference(hyps, refs), abs=1e-12)


def test_rouge_by_hand():
    """"the the the cat" against "the the cat": clipped unigram overlap 3, P 3/4, R 3/3 -> F 6/7; bigrams
    (the the) x2 + (the cat) against (the the) + (the cat): overlap 2, P 2/3, R 1 -> 0.8; the longest common
    subsequence is 3 tokens: 6/7. "heart normal" against "heart is normal today": P 1, R 2/4 -> 2/3. An empty
    prediction scores 0 and counts in the mean; so does an empty reference."""
    scores = text.rouge(["the the the cat"], ["the the cat"])
    assert scores == pytest.approx({"rouge_1": 6 / 7, "rouge_2": 0.8, "rouge_l": 6 / 7})
    assert text.rouge(["heart normal", "", "lungs clear"], ["heart is normal today", "normal", ""]) == \
        pytest.approx({"rouge_1": (2 / 3) / 3, "rouge_2": 0.0, "rouge_l": (2 / 3) / 3})
    assert text.rouge_l(["  "], ["normal heart"]) == 0.0
    # the stemmer is on: "effusions" matches "effusion"
    assert text.rouge(["small effusions"], ["small effusion"])["rouge_1"] == pytest.approx(1.0)
