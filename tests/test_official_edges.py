"""FLARE's official numbers at the edges: non-finite and huge regression values, GREEN where the package gives
no number; the family-wise correction and the two paired tests checked against scipy."""
import json
import math

import numpy as np
import pytest

from flare_exp.metrics import official
from flare_exp.metrics.green import official_green, package_summary_fails


def rows(preds, golds):
    return [{"id": f"r{i}", "prediction": p, "answer": g} for i, (p, g) in enumerate(zip(preds, golds))]


@pytest.mark.parametrize("pred", ["nan", "inf", "1e400", "-Infinity", float("nan"), json.loads("1e400")])
def test_regression_non_finite_is_flares_abort_with_the_ids(pred):
    block = official.official_block("regression", rows(["3", pred, "5"], ["3", "4", "5"]))
    assert block["mean_absolute_error"] is None and block["aborted"] is True and block["abort_ids"] == ["r1"]
    assert "scikit-learn" in block["note"]


def test_regression_missing_value_is_infinite_even_beside_nan_and_huge_ints_do_not_crash():
    # float() refused (a null) comes first in FLARE's evaluator: infinity, even with a NaN elsewhere
    block = official.official_block("regression", rows([None, "nan"], ["3", "4"]))
    assert math.isinf(block["mean_absolute_error"]) and "aborted" not in block
    huge = json.loads("[" + "9" * 400 + "]")[0]  # a JSON integer too large for a float: OverflowError in float()
    block = official.official_block("regression", rows([huge, "2"], ["3", "4"]))
    assert math.isinf(block["mean_absolute_error"])
    stats = official.regression_stats([huge, "nan", "2"], ["3", "4", "4"])
    assert math.isinf(stats[0, 0]) and math.isnan(stats[1, 0]) and stats[2, 0] == 2
    # finite values whose difference overflows: infinity, as scikit-learn gives it
    assert math.isinf(official.official_block("regression", rows(["1e308"], ["-1e308"]))["mean_absolute_error"])
    assert official.official_block("regression", rows(["1", "2"], ["2", "4"]))["mean_absolute_error"] == 1.5


SIGNIFICANT_LETTERS = ("[Explanation]:\nx\n\n[Clinically Significant Errors]:\n" +
                       "\n".join(f"({c}) {name[4:]}: 0." for c, name in zip("abcdef", __import__(
                           "flare_exp.metrics.green", fromlist=["CATEGORY_NAMES"]).CATEGORY_NAMES)) +
                       "\n\n[Matched Findings]:\n2. a; b\n")
NUMBERED_ONLY = "[Clinically Significant Errors]:\n(1) False report: 1.\n\n[Matched Findings]:\n1. a\n"


def _sample(output, tokens=100):
    return {"judge_output": output, "judge_input_tokens": tokens}


def test_official_green_is_none_where_the_package_raises():
    good = [_sample(SIGNIFICANT_LETTERS), _sample("no sections at all")]
    assert official_green(["a", "b"], good, 2048) == {"green_score": 0.5}
    out = official_green(["a", None], good, 2048)
    assert out["green_score"] is None and out["green_score_none"] == {"prediction not text (null or a number)": 1}
    out = official_green(["a", "b"], [_sample(SIGNIFICANT_LETTERS), _sample("x", 2048)], 2048)
    assert out["green_score"] is None and list(out["green_score_none"].values()) == [1]
    assert "the reports beside it are judged in their own room" in out["note"]
    # in the package's batches (exact) the reports beside it got no room either: said, not "their own room"
    out = official_green(["a", "b", "c"], [_sample(""), _sample("", 2048), _sample(SIGNIFICANT_LETTERS)], 2048)
    assert "1 report(s) judged in a batch beside one got no room either and score 0" in out["note"]
    assert "their own room" not in out["note"]
    # a judgment with numbered lines only switches the package's category names; the letters never come back
    assert package_summary_fails([SIGNIFICANT_LETTERS, NUMBERED_ONLY])
    assert not package_summary_fails([NUMBERED_ONLY, "no sections at all"])
    assert not package_summary_fails([SIGNIFICANT_LETTERS, SIGNIFICANT_LETTERS])
    out = official_green(["a", "b"], [_sample(SIGNIFICANT_LETTERS), _sample(NUMBERED_ONLY)], 2048)
    assert out["green_score"] is None and "summary" in next(iter(out["green_score_none"]))
    assert official.official_block("report_generation", rows(["a"], ["b"]), out)["green_score"] is None


def _scipy_two_sided(task, stats_a, stats_b):
    """scipy's exact paired permutation p of the official metric (every swap of the n pairs)."""
    from scipy.stats import permutation_test

    table = np.concatenate([stats_a, stats_b])
    n = len(stats_a)

    def statistic(x, y):
        return official.aggregate(task, table[y.astype(int)]) - official.aggregate(task, table[x.astype(int)])

    return permutation_test((np.arange(n), np.arange(n) + n), statistic, permutation_type="samples",
                            alternative="two-sided", n_resamples=np.inf).pvalue


@pytest.mark.parametrize("task", ["regression", "classification", "multi_label"])
def test_permutation_and_approximate_randomization_agree_with_scipy(task):
    from flare_exp.metrics.significance import approximate_randomization, paired_test

    rng = np.random.default_rng(3)
    n = 11
    if task == "regression":
        a, b = rng.random((n, 1)), rng.random((n, 1)) + 0.25
    elif task == "classification":
        gold = rng.integers(0, 3, n)
        a = np.stack([gold, rng.random(n) < 0.4], 1).astype(float)
        b = np.stack([gold, rng.random(n) < 0.8], 1).astype(float)
    else:
        a, b = rng.integers(0, 3, (n, 3)).astype(float), rng.integers(0, 3, (n, 3)).astype(float)
    expected = _scipy_two_sided(task, a, b)
    assert 0.005 < expected < 0.9
    assert paired_test(task, a, b, resamples=20000, seed=1)["p_value"] == pytest.approx(expected, abs=0.015)
    assert approximate_randomization(task, a, b, trials=20000, seed=1) == pytest.approx(expected, abs=0.015)
    assert approximate_randomization("regression", np.full((3, 1), np.inf), np.ones((3, 1))) is None


def test_holm_and_benjamini_hochberg():
    from scipy.stats import false_discovery_control

    from flare_exp.metrics.significance import adjust_p_values, correct_family

    p = [0.01, 0.04, None, 0.03, 0.005, 0.5]
    # Holm by hand: sorted 0.005 0.01 0.03 0.04 0.5 (m=5) -> 0.025 0.04 0.09 0.09 0.5 (running maximum)
    assert adjust_p_values(p, "holm") == pytest.approx([0.04, 0.09, None, 0.09, 0.025, 0.5])
    known = [x for x in p if x is not None]
    bh = [x for x in adjust_p_values(p, "bh") if x is not None]
    assert bh == pytest.approx(list(false_discovery_control(known, method="bh")))
    assert adjust_p_values(p, "none") == p
    with pytest.raises(ValueError, match="eval.significance.correction='bonferoni'"):
        adjust_p_values(p, "bonferoni")
    tests = [{"p_value": 0.01, "ar_p_value": 0.02}, {"p_value": 0.04, "ar_p_value": 0.01}]
    family = correct_family(tests, "holm")
    assert family["size"] == 2 and "every pair of runs" in family["family"]
    assert [t["p_value_adjusted"] for t in tests] == pytest.approx([0.02, 0.04])
    assert [t["ar_p_value_adjusted"] for t in tests] == pytest.approx([0.02, 0.02])


@pytest.fixture(scope="module")
def tiny_green_judge(tmp_path_factory):
    from flare_exp.fixtures.tiny_models import build_tiny_causal_lm

    return build_tiny_causal_lm(tmp_path_factory.mktemp("green") / "judge")


def test_green_exact_batches_as_the_package(tiny_green_judge, tmp_path, monkeypatch):
    """exact: batches of 8 in input order, repeats judged again, each batch's budget set by its longest prompt;
    a rerun judges only the batches with a judgment missing."""
    from flare_exp.metrics.green_judge import GreenJudge

    path, journal = tiny_green_judge, tmp_path / "green.jsonl"
    refs = ["The heart is normal."] * 10
    cands = ["Heart normal."] * 3 + ["Lungs clear " * (i + 1) for i in range(7)]
    with pytest.raises(ValueError, match="eval.green.max_new_tokens null"):
        GreenJudge.from_pretrained(path, "float32", exact=True, max_new_tokens=4)
    judge = GreenJudge.from_pretrained(path, "float32", exact=True, max_length=330, journal=journal)
    seen = []
    monkeypatch.setattr(judge, "generate", lambda texts: (seen.append(list(texts)), ["out"] * len(texts))[1])
    assert judge.judge(refs, cands) == ["out"] * 10 and judge.batch_size == 8 and judge.decoder.graph is None
    rendered = [judge.render(__import__("flare_exp.metrics.green", fromlist=["make_prompt"]).make_prompt(r, c))
                for r, c in zip(refs, cands)]
    assert seen == [rendered[:8], rendered[8:]]  # input order, the repeated pair judged three times
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(lines[:9]) + "\n")  # the second batch's last judgment lost
    seen.clear()
    assert judge.judge(refs, cands) == ["out"] * 10 and seen == [rendered[8:]]
    default = GreenJudge.from_pretrained(path, "float32", batch_size=16)
    monkeypatch.setattr(default, "generate", lambda texts: (seen.append(list(texts)), ["out"] * len(texts))[1])
    seen.clear()
    default.judge(refs, cands)
    assert len(seen) == 1 and len(seen[0]) == 8 and seen[0][0] == rendered[-1]  # distinct, longest first


def test_runs_predicted_with_other_decoding_or_another_base_model_are_said():
    """Three evals of one adapter (3 new tokens, sampled at 1.5, another base model) printed side by side with
    no note of what differed; the prepared file, window and max_pixels were said already."""
    from flare_exp.data.predictions import decoding_of
    from flare_exp.metrics.significance import input_differences

    greedy = decoding_of({"max_new_tokens": 256, "do_sample": False, "temperature": 1.0, "top_p": 1.0})
    hot = decoding_of({"max_new_tokens": 256, "do_sample": True, "temperature": 1.5, "top_p": 1.0})
    assert greedy == "max_new_tokens=256, greedy" and hot == "max_new_tokens=256, sampled (temperature=1.5, top_p=1.0)"
    a = {"run": {"model_path": "/models/qwen", "decoding": greedy}}
    said = input_differences("sft", "sft'", a, {"run": {"model_path": "/models/other", "decoding": hot}})
    assert said == ["sft and sft' were predicted on different base models (model.path): /models/qwen and "
                    "/models/other", f"sft and sft' were predicted with different decoding settings: {greedy} and "
                    f"{hot}"]
    assert input_differences("sft", "rl", a, {"run": {"model_path": "/models/../models/qwen", "decoding": greedy}}) == []
    assert input_differences("sft", "rl", a, {"run": {}}) == []  # a file without its infer run: nothing to compare


def test_two_evals_of_one_predictions_file_are_said():
    from flare_exp.metrics.significance import input_differences

    said = input_differences("ev1", "ev2", {"file": "/runs/infer/predictions.jsonl"},
                             {"file": "/runs/infer/../infer/predictions.jsonl"})
    assert said == ["ev1 and ev2 scored the same predictions file (/runs/infer/predictions.jsonl): their "
                    "differences are the scorers' alone, and their tests widen the correction's family"]
    copy = input_differences("ev1", "ev2", {"file": "/a/predictions.jsonl", "file_sha256": "x"},
                             {"file": "/b/predictions.jsonl", "file_sha256": "x"})
    assert copy and "scored byte-identical predictions files (/a/predictions.jsonl and /b/predictions.jsonl" in copy[0]
    assert input_differences("ev1", "ev2", {"file": "/a/p.jsonl", "file_sha256": "x"},
                             {"file": "/b/p.jsonl", "file_sha256": "y"}) == []


def test_a_judge_out_of_memory_names_its_longest_input_and_what_to_change(tmp_path):
    """A ~36,000-token prediction made the CRIMSON judge run out of memory with no word of which report or what
    to do; the judgments made before it stay journaled."""
    import torch

    from flare_exp.metrics.judge_journal import JournaledJudge

    class Judge(JournaledJudge):
        name, section, batch_size, journal = "CRIMSON judge", "eval.crimson", 2, tmp_path / "j.jsonl"

        def render_pair(self, reference, candidate):
            return f"{reference} || {candidate}"

        def generate(self, texts):
            if any(len(t) > 1000 for t in texts):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 45.00 GiB")
            return ["ok"] * len(texts)

    judge = Judge()
    with pytest.raises(MemoryError, match=r"CRIMSON judge ran out of memory on a batch of 2, its longest input 6007 "
                                          r"characters, for the prediction 'heart heart .*\.\.\. \(1000 words\): lower "
                                          r"eval.crimson.batch_size \(1 judges one report at a time\), or shorten that "
                                          r"prediction"):
        judge.judge(["ref"] * 3, ["short", "fine", "heart " * 1000])
    assert judge.judge(["ref"] * 2, ["short", "fine"]) == ["ok", "ok"]


def test_the_paired_tests_and_intervals_do_not_move_with_the_rows_order(base_overrides, tmp_path):
    """The bootstrap resampled rows in run A's file order: the same predictions sorted in Excel (or a shuffled
    JSONL) gave other p-values and intervals under the same seed. The draws now resample samples by id."""
    import random

    from conftest import compose_cfg
    from flare_exp.io import write_jsonl
    from flare_exp.main import run
    from flare_exp.stages import evaluate

    rng = random.Random(1)
    labels = ["Effusion", "Cardiomegaly", "Edema", "No Finding"]
    golds = [", ".join(rng.sample(labels, 2)) for _ in range(24)]
    runs = {name: [{"id": f"chestdr/{i}", "dataset": "chestdr", "task_type": "multi_label", "split": "val",
                    "answer": g, "prediction": rng.choice(labels), "model": name} for i, g in enumerate(golds)]
            for name in ("a", "b")}
    seen = []
    for order in ("as written", "shuffled"):
        a = list(runs["a"])
        if order == "shuffled":
            rng.shuffle(a)
        write_jsonl(tmp_path / order / "a.jsonl", a)
        write_jsonl(tmp_path / order / "b.jsonl", runs["b"])
        intervals = []
        real = evaluate.write_reports
        evaluate.write_reports = lambda *args, **kw: intervals.append(args[4]) or real(*args, **kw)
        try:
            run(compose_cfg(["stage=eval", *base_overrides, "eval.radgraph=false",
                             f"eval.predictions=[{tmp_path / order / 'a.jsonl'},{tmp_path / order / 'b.jsonl'}]",
                             f"data.prepared_dir={tmp_path / 'hand_made'}"]), run_dir=tmp_path / f"eval-{order}")
        finally:
            evaluate.write_reports = real
        tests = json.loads((tmp_path / f"eval-{order}" / "significance.json").read_text())["tests"]
        seen.append(([{k: v for k, v in t.items() if k not in ("run_a", "run_b")} for t in tests], intervals[0]))
    assert seen[0] == seen[1] and seen[0][0][0]["p_value"] is not None
