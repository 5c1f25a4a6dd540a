"""FLARE's official numbers, worked out by hand from its evaluator's rules, through the eval stage; the paired
significance tests; what eval does with predictions it should not trust."""
import json
import math

import numpy as np
import pytest

from conftest import compose_cfg
from flare_exp.io import write_json, write_jsonl
from flare_exp.main import run
from flare_exp.metrics import official
from flare_exp.metrics.significance import paired_test


def row(i, dataset, task, answer, prediction, model="m", split="val"):
    return {"id": f"{dataset}/{i}", "dataset": dataset, "task_type": task, "answer": answer,
            "prediction": prediction, "model": model, "split": split}


MIXED = [
    # classification (dental): per class recall A 2/2, B 0/1 ("The answer is B" is not "b"), C 1/1 -> 2/3
    row(1, "dental", "classification", "A", "A"), row(2, "dental", "classification", "A", " a "),
    row(3, "dental", "classification", "B", "The answer is B"), row(4, "dental", "classification", "C", "C"),
    # multi-label: FLARE splits on both ';' and ',': chestdr tp 2; periapical's gold has 4 pieces, tp 1 fn 3
    row(5, "chestdr", "multi_label", "Cardiomegaly, Aortic Calcification", "Cardiomegaly; Aortic Calcification"),
    row(6, "periapical", "multi_label", "Endodontic Treatment, Restorative Treatment, and Complications;Caries",
        "Caries"),
    # regression: "22.9%" is not a float: FLARE's MAE is infinite
    row(7, "boneresorption", "regression", "20", "22.9%"), row(8, "boneresorption", "regression", "30", "31"),
    row(9, "IU_XRay", "report_generation", "The heart is normal.", "Heart normal."),
]


def _eval(base_overrides, tmp_path, *files, extra=()):
    entries = ",".join(str(f) for f in files)
    run(compose_cfg(["stage=eval", *base_overrides, f"eval.predictions=[{entries}]", "eval.radgraph=false",
                     f"data.prepared_dir={tmp_path / 'hand_made'}", *extra]),  # rows of no prepared split
        run_dir=tmp_path / "eval")
    return json.loads((tmp_path / "eval" / "metrics.json").read_text())


def test_official_block_by_hand(base_overrides, tmp_path):
    write_jsonl(tmp_path / "p.jsonl", MIXED)
    metrics = _eval(base_overrides, tmp_path, tmp_path / "p.jsonl")["m"]
    off, by_dataset = metrics["official"], metrics["official_by_dataset"]
    assert off["classification"]["balanced_accuracy"] == pytest.approx(2 / 3)
    # pooled: tp 3, fp 0, fn 3 -> precision 1, recall 1/2, F1 2/3
    assert off["multi_label"]["f1_score"] == pytest.approx(2 / 3)
    assert off["multi_label"]["flare_task_type"] == "multi-label classification"
    assert off["multi_label"]["num_examples"] == 2
    assert by_dataset["chestdr"]["f1_score"] == pytest.approx(1.0)
    assert by_dataset["periapical"]["f1_score"] == pytest.approx(2 * 0.25 / 1.25)
    # strict JSON: the infinity FLARE gives is written as the string "Infinity" (no bare token)
    assert off["regression"]["mean_absolute_error"] == "Infinity" and "float()" in off["regression"]["note"]
    assert off["report_generation"]["green_score"] is None
    assert '"mean_absolute_error": "Infinity"' in (tmp_path / "eval" / "metrics.json").read_text()
    # our variants beside them, named for what they are
    variants = metrics["by_task"]
    assert variants["multi_label"]["dataset_aware_f1_micro"] == pytest.approx(2 * 1 / 6)  # tp 1, fp 1, fn 3
    assert variants["regression"]["mae_parseable"] == pytest.approx(1.95) and variants["regression"]["unparseable"] == 0
    assert variants["classification"]["balanced_accuracy_parsed"] == pytest.approx(1.0)
    md = (tmp_path / "eval" / "report.md").read_text()
    assert md.index("## Official numbers") < md.index("## classification: all metrics")
    assert "| regression: mean_absolute_error (lower is better) | Infinity |" in md
    summary = json.loads((tmp_path / "eval" / "metrics_summary.json").read_text())
    assert summary["multi_label/f1_score"] == pytest.approx(2 / 3)


def test_official_rules_edge_cases():
    # a non-string prediction is left out of the multi-label counts; no labels anywhere gives 0
    stats = official.multi_label_stats([None, "a;b"], ["x", "b, c"])
    assert official.official_value("multi_label", stats) == pytest.approx(0.5)
    assert official.official_value("multi_label", official.multi_label_stats([""], [""])) == 0.0
    # float() as FLARE: "1e1" and " 3 " parse, "3 %" and None do not
    assert official.official_value("regression", official.regression_stats(["1e1", " 3 "], ["10", "4"])) == 0.5
    assert math.isinf(official.official_value("regression", official.regression_stats([None], ["4"])))
    # a prediction class absent from the ground truth adds no class; a None prediction is ""
    stats = official.classification_stats(["z", None, "b"], ["a", "a", "b"])
    assert official.official_value("classification", stats) == pytest.approx(0.5)


def test_paired_tests():
    rng = np.random.default_rng(1)
    correct_a = rng.random(60) < 0.4
    stats_a = np.stack([np.zeros(60), correct_a.astype(float)], axis=1)
    same = paired_test("classification", stats_a, stats_a.copy(), resamples=500)
    assert same["difference"] == 0 and same["p_value"] == 1.0
    better = np.stack([np.zeros(60), np.ones(60)], axis=1)
    test = paired_test("classification", stats_a, better, resamples=500)
    assert test["p_value"] < 0.01 and test["difference_ci95"][0] > 0
    assert test["a_ci95"][0] <= test["a"] <= test["a_ci95"][1]
    errors = paired_test("regression", np.full((5, 1), np.inf), np.ones((5, 1)))
    assert "infinite" in errors["note"] and "p_value" not in errors


def test_comparison_writes_significance_and_warns_on_other_inputs(base_overrides, tmp_path):
    a = [row(i, "dental", "classification", "A", "B", model="a") for i in range(30)]
    b = [row(i, "dental", "classification", "A", "A", model="b") for i in range(1, 31)]
    write_jsonl(tmp_path / "a.jsonl", a)
    write_jsonl(tmp_path / "b.jsonl", b)
    _eval(base_overrides, tmp_path, tmp_path / "a.jsonl", tmp_path / "b.jsonl", extra=["eval.significance.resamples=200"])
    sig = json.loads((tmp_path / "eval" / "significance.json").read_text())
    test = sig["tests"][0]
    assert test["n"] == 29 and test["difference"] == pytest.approx(1.0) and test["p_value"] < 0.01
    assert "1 sample(s) only in a, 1 only in b" in sig["warnings"][0]
    # one test in the family: Holm leaves it as it is; approximate randomization beside the permutation test
    assert sig["family"]["correction"] == "holm" and sig["family"]["size"] == 1
    assert test["p_value_adjusted"] == test["p_value"] and test["ar_p_value"] < 0.01
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "## Significance" in md and "b vs a" in md and "different inputs" in md
    assert "Adjusted p (Holm's step-down) over the family: all 1 paired comparisons" in md


def test_eval_refuses_what_it_should_not_trust(base_overrides, tmp_path):
    doubled = MIXED + [dict(MIXED[0])] + [dict(MIXED[1])]
    write_jsonl(tmp_path / "d.jsonl", doubled)
    with pytest.raises(ValueError, match="2 id\\(s\\) occur more than once"):
        _eval(base_overrides, tmp_path, tmp_path / "d.jsonl")
    write_jsonl(tmp_path / "u.jsonl", [row(1, "x", "segmentation", "a", "b")])
    with pytest.raises(ValueError, match="unknown task type\\(s\\) segmentation"):
        _eval(base_overrides, tmp_path, tmp_path / "u.jsonl")
    unfinished = tmp_path / "infer"
    write_jsonl(unfinished / "predictions.jsonl", MIXED[:4])
    write_json(unfinished / "run_info.json", {})
    with pytest.raises(ValueError, match="no DONE marker.*eval.allow_partial=true"):
        _eval(base_overrides, tmp_path, unfinished)
    metrics = _eval(base_overrides, tmp_path, unfinished, extra=["eval.allow_partial=true"])
    assert metrics["m"]["partial"].startswith("partial: 4 of")
    assert "partial: 4 of" in (tmp_path / "eval" / "report.md").read_text()


def test_null_and_missing_predictions_score_as_empty_and_a_list_is_refused(base_overrides, tmp_path):
    rows = [row(1, "dental", "classification", "A", None), row(3, "dental", "classification", "A", "A"),
            row(4, "boneresorption", "regression", "3", None)]
    rows.append({k: v for k, v in row(5, "chestdr", "multi_label", "Mass", "x").items() if k != "prediction"})
    write_jsonl(tmp_path / "p.jsonl", rows)
    metrics = _eval(base_overrides, tmp_path, tmp_path / "p.jsonl")["m"]
    assert metrics["empty_predictions"] == 3 and metrics["by_task"]["classification"]["accuracy"] == pytest.approx(1 / 2)
    assert metrics["official"]["regression"]["mean_absolute_error"] == "Infinity"  # strict JSON's infinity
    assert "3 empty" in (tmp_path / "eval" / "report.md").read_text()
    write_jsonl(tmp_path / "list.jsonl", [*rows, row(2, "dental", "classification", "A", ["A"])])
    with pytest.raises(ValueError, match=r"row 5 \(id \S+\): the prediction is list \[\"A\"\], not text"):
        _eval(base_overrides, tmp_path / "again", tmp_path / "list.jsonl")
