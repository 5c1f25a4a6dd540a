"""CRIMSON as the crimson-score package (0.2.0) computes it: its prompt, its JSON repairs, its score, worked by
hand; the judge on a tiny random Gemma 3, batched as the package's one-at-a-time way, on the graph loop where
the judge allows it, journaled; eval's CRIMSON fields."""
import hashlib
import json

import pytest

from flare_exp.metrics.crimson import crimson_score, make_prompt, messages, parse_judgment, summarise
from flare_exp.metrics.crimson_judge import CrimsonJudge


def test_prompt_is_the_packages_for_its_medgemma_judge():
    prompt = make_prompt(["Left effusion.", "Cardiomegaly."], "None")
    # the package's build_prompt(..., include_*=False) for the same pair (computed from crimson-score 0.2.0)
    assert hashlib.sha256(prompt.encode()).hexdigest() == \
        "d9204a7d3b058561f96bce63447bda742c27ba9b798ac7033afbdfe74f41576e"
    assert "Reference Findings (Ground Truth):\nLeft effusion. Cardiomegaly.\n\nPredicted Findings" in prompt
    assert "Examples of typical classifications" not in prompt and '{{"ref_id": "R1", "pred_id": "P1"}}' in prompt
    assert messages("P")[0]["role"] == "system" and messages("P")[1] == {"role": "user", "content": "P"}


@pytest.mark.parametrize("text, expected", [
    ('{"a": 1}', {"a": 1}),
    ('{"a": 1, "a": 2}', {"a": 1}),  # the first of duplicate keys
    ('{"a": "say "hi" now", "b": 2}', {"a": 'say "hi" now', "b": 2}),  # stray quotes escaped
    ('{"a":1,"orphan","b":2}', {"a": 1, "b": 2}),  # an orphan string dropped
    ('{"a": "C:\\L\\_x"}', {"a": "C:\\L\\_x"}),  # invalid escapes doubled
    ('{"a": ["":["R1"], "b": 1}', {"a": ["R1"], "b": 1}),  # the array-object hybrid mended
    ('{"x": 1, b": 2}', {"x": 1, "b": 2}),  # a key's missing opening quote
    ('{"k": "it\u2019s"}', {"k": "it\\'s"}),  # a curly quote escaped (kept with its backslash, as the package)
    ('```json\n{"a":1}\n```', None), ("not json", None), ("", None),
])
def test_parser_repairs_as_the_package(text, expected):
    assert parse_judgment(text) == expected


def test_score_by_hand():
    judgment = {
        "reference_findings": [{"id": "R1", "clinical_significance": "urgent"},
                               {"id": "R2", "clinical_significance": "actionable_not_urgent"},
                               {"id": "R3", "clinical_significance": "something else"}],
        "predicted_findings": [{"id": "P1", "clinical_significance": "urgent"},
                               {"id": "P2", "clinical_significance": "benign_expected"},
                               {"id": "P3", "clinical_significance": "not_actionable_not_urgent"}],
        "matched_findings": [{"ref_id": "R1", "pred_id": "P1"}, {"ref_id": "R1", "pred_id": "P2"}],
        "errors": {"false_findings": ["P3"], "missing_findings": ["R2", "R3"],
                   "attribute_errors": [{"ref_id": "R1", "pred_id": "P1", "severity": "significant",
                                         "error_types": ["location", "severity"]}]}}
    # reference weight 1 + 0.5 + 0.25; R1 once, 1 * 1 / (1 + 0.5); false 0.25; S = (2/3 - 0.25) / 1.75
    out = crimson_score(judgment)
    assert out["crimson"] == round((2 / 3 - 0.25) / 1.75, 4) and out["missed_weight"] == 0.75
    assert out["error_counts"]["location_errors"] == 1 and out["error_counts"]["false_findings"] == 1
    # more false weight than credit: -e / (1 + e)
    worse = {"reference_findings": [{"id": "R1", "clinical_significance": "not_actionable_not_urgent"}],
             "predicted_findings": [{"id": "P1", "clinical_significance": "urgent"}],
             "matched_findings": [], "errors": {"false_findings": ["P1"], "missing_findings": ["R1"]}}
    assert crimson_score(worse)["crimson"] == round(-1 / 2, 4)
    assert crimson_score({})["crimson"] == 1.0  # nothing abnormal on either side
    false_only = {"predicted_findings": [{"id": "P1", "clinical_significance": "urgent"}],
                  "errors": {"false_findings": ["P1"]}}
    assert crimson_score(false_only)["S"] == -2 and crimson_score(false_only)["crimson"] == -0.5
    assert crimson_score([1]) is None and crimson_score({"matched_findings": [{"pred_id": "P1"}]}) is None
    summary = summarise([{"crimson": 0.5, "error_counts": {"false_findings": 1}},
                         {"crimson": None, "error_counts": None}])
    assert summary["crimson_score"] == 0.5 and summary["crimson_unscored"] == 1 and summary["crimson_n"] == 1


@pytest.fixture(scope="module")
def tiny_crimson(tmp_path_factory):
    from flare_exp.fixtures.tiny_crimson import build_tiny_crimson_judge

    return build_tiny_crimson_judge(tmp_path_factory.mktemp("crimson") / "judge")


REFS = ["Small left pleural effusion.", "No acute disease.", "Cardiomegaly with a right lower lobe opacity."]
CANDS = ["Left effusion.", "Normal chest radiograph, nothing acute seen at all.", ""]


def test_judge_batched_and_graph_loop_judge_as_the_packages_way(tiny_crimson, tmp_path, monkeypatch):
    """The package's way: transformers' text-generation pipeline, one chat at a time, greedy."""
    from transformers import pipeline

    one = CrimsonJudge.from_pretrained(tiny_crimson, "float32", batch_size=2, max_new_tokens=6,
                                       decode_loop="generate")
    text = one.render_pair("r", "c")
    assert text.startswith("<bos><start_of_turn>user\nYou are an expert") and text.endswith("<start_of_turn>model\n")
    pipe = pipeline("text-generation", model=one.model, tokenizer=one.tokenizer)
    package_way = [pipe(messages(make_prompt(r, c)), max_new_tokens=6, max_length=None, do_sample=False)[0]
                   ["generated_text"][-1]["content"] for r, c in zip(REFS, CANDS)]
    assert one.judge(REFS, CANDS) == package_way and all(package_way)
    graph = CrimsonJudge.from_pretrained(tiny_crimson, "float32", batch_size=2, max_new_tokens=6, decode_loop="graph",
                                         journal=tmp_path / "crimson.jsonl")
    assert graph.decoding == "graph" and graph.judge(REFS, CANDS) == package_way
    monkeypatch.setattr(graph, "generate", lambda texts: pytest.fail("judged again"))
    summary, samples = graph.score(REFS, CANDS)  # every judgment from the journal
    assert summary["crimson_n"] + summary.get("crimson_unscored", 0) == 3 and len(samples) == 3
    assert one.config.do_sample is False and one.config.max_new_tokens == 6


def test_judge_settings_the_package_takes_from_the_judge(tmp_path):
    from flare_exp.fixtures.tiny_crimson import build_tiny_crimson_judge

    sliding = build_tiny_crimson_judge(tmp_path / "sliding", sliding=True, generation_config={"max_new_tokens": 5})
    with pytest.raises(ValueError, match="eval.crimson.decode_loop=graph.*sliding-window"):
        CrimsonJudge.from_pretrained(sliding, "float32", decode_loop="graph")
    judge = CrimsonJudge.from_pretrained(sliding, "float32", decode_loop="auto")
    assert judge.decoder.graph is None and "sliding-window" in judge.decoding
    assert judge.config.max_new_tokens == 5  # the judge's generation_config.json, as the package passes it
    with pytest.raises(FileNotFoundError, match="eval.crimson.model_path=.*medgemma-4b-it-crimson"):
        CrimsonJudge.from_pretrained(tmp_path / "none")


def test_eval_reports_crimson_when_configured(base_overrides, tmp_path, tiny_crimson):
    from conftest import compose_cfg
    from flare_exp.io import write_jsonl
    from flare_exp.main import run

    rows = [{"id": f"IU_XRay/{i}", "dataset": "IU_XRay", "task_type": "report_generation", "answer": r,
             "prediction": c, "model": "m", "split": "val"} for i, (r, c) in enumerate(zip(REFS, CANDS))]
    write_jsonl(tmp_path / "p.jsonl", rows)
    run(compose_cfg(["stage=eval", *base_overrides, f"eval.predictions=[{tmp_path / 'p.jsonl'}]",
                     f"data.prepared_dir={tmp_path / 'hand_made'}",  # rows of no prepared split
                     "eval.radgraph=false", f"eval.crimson.model_path={tiny_crimson}", "eval.crimson.max_new_tokens=4",
                     "eval.crimson.dtype=float32"]), run_dir=tmp_path / "eval")
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())["m"]["by_task"]["report_generation"]
    assert report["crimson_decoding"] == "generate" and report["crimson_n"] + report["crimson_unscored"] == 3
    samples = (tmp_path / "eval" / "crimson_samples_m.jsonl").read_text().splitlines()
    assert len(samples) == 3 and "judge_output" in json.loads(samples[0])
    assert len((tmp_path / "eval" / "crimson_judgments.jsonl").read_text().splitlines()) == 3
    # replies the parser does not read: said among the caveats, not only as n/a in the task's table
    said = f"CRIMSON gave no score for {report['crimson_unscored']} of 3 reports (replies its parser does not read)"
    assert said in (tmp_path / "eval" / "report.md").read_text()
