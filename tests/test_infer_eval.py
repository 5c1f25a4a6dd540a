import json
import math

import pytest

from conftest import compose_cfg
from flare_exp.main import run
from flare_exp.metrics import official, tasks, text
from flare_exp.metrics.green import green_score, make_prompt, parse_green
from flare_exp.metrics.green_judge import GreenJudge


def _infer(base_overrides, run_dir, *extra):
    return run(compose_cfg(["stage=infer", *base_overrides, "infer.max_new_tokens=6", "infer.batch_size=5",
                            *extra]), run_dir=run_dir)


def test_infer_writes_predictions_and_a_sheet(base_overrides, sft_adapter, tmp_path, demo_prepared):
    from openpyxl import load_workbook

    from flare_exp.io import read_jsonl

    summary = _infer(base_overrides, tmp_path / "inf", f"infer.checkpoint={sft_adapter}")
    val = read_jsonl(demo_prepared / "val.jsonl")
    preds = read_jsonl(tmp_path / "inf" / "predictions.jsonl")
    assert summary["samples"] == len(val) == len(preds) and summary["label"].endswith("sft")
    assert all(isinstance(p["prediction"], str) and not p["prediction"].startswith("assistant") for p in preds)
    ws = load_workbook(tmp_path / "inf" / "predictions.xlsx").active
    header = [c.value for c in ws[1]]
    assert header[:4] == ["ImageName", "Question", "Answer", summary["label"]]
    assert header[4:6] == ["Dataset", "TaskType"] and ws.max_row == len(val) + 1
    assert ws.freeze_panes == "A2" and ws.auto_filter.ref
    assert [ws.cell(i + 2, 7).value for i in range(len(val))] == [r["id"] for r in val]  # input order
    # the adapter that made them, by path and sha256: in the summary, every row, the sheet and the run info
    from flare_exp.io import file_fingerprint

    adapter = {"path": str(sft_adapter / "final"),
               "sha256": file_fingerprint(sft_adapter / "final" / "adapter_model.safetensors")["sha256"]}
    assert summary["adapter"] == adapter and all(p["adapter"] == adapter for p in preds)
    about = load_workbook(tmp_path / "inf" / "predictions.xlsx")["adapter"]
    assert [[c.value for c in row] for row in about.iter_rows()] == [["adapter path", adapter["path"]],
                                                                     ["adapter sha256", adapter["sha256"]]]
    assert json.loads((tmp_path / "inf" / "run_info.json").read_text())["adapter"] == adapter


def test_decoding_keeps_only_new_tokens_and_uses_every_view(tiny_model_dir, demo_prepared):
    from omegaconf import OmegaConf
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from flare_exp.data.vision import VisionChat
    from flare_exp.io import read_jsonl
    from flare_exp.models.batch_decoding import generate

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()
    chat = VisionChat(processor, demo_prepared.parent / "raw")
    iu = [r for r in read_jsonl(demo_prepared / "val.jsonl") if r["dataset"] == "IU_XRay"][:3]
    batch = chat.generation_batch(iu)
    assert batch["image_grid_thw"].shape[0] == 6  # two views per IU_XRay sample
    assert processor.tokenizer.decode(batch["input_ids"][0]).endswith("<|im_start|>assistant\n")
    inf = OmegaConf.create({"max_new_tokens": 5, "do_sample": False, "cache_implementation": None})
    batched = generate(model, chat, iu, inf)
    single = [generate(model, chat, [r], inf)[0] for r in iu]
    assert batched == single  # left padding does not change greedy outputs
    assert all(r["question"] not in p for r, p in zip(iu, batched))


def test_infer_resumes_after_a_torn_write(base_overrides, sft_adapter, tmp_path):
    run_dir = tmp_path / "inf"
    _infer(base_overrides, run_dir, f"infer.checkpoint={sft_adapter}", "infer.num_samples=6")
    lines = (run_dir / "predictions.jsonl").read_text().splitlines()
    (run_dir / "predictions.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # killed mid-write
    (run_dir / "DONE").unlink()
    summary = _infer(base_overrides, run_dir, f"infer.checkpoint={sft_adapter}", "infer.num_samples=6")
    assert summary["generated_now"] == 3 and summary["samples"] == 6
    assert summary["decoded_by_note"].startswith("decode_loop and inputs are this attempt's, which made 3 of the 6")
    rows = [json.loads(l) for l in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len({r["id"] for r in rows}) == 6


def test_a_resume_sets_aside_journal_rows_that_cannot_stand_for_their_question(base_overrides, sft_adapter, tmp_path,
                                                                                caplog):
    """Hand-edited or copied journal rows went into a test submission marked complete: a row whose id was edited
    to another question's (that question answered twice in the submission, another missing), one made with
    another adapter, a null or numeric prediction, a row without its prediction (a KeyError after all the
    decoding). Each is set aside into predictions.set_aside.jsonl with why, its question decoded again; the
    earlier of two differing rows of an id too. A row no object, or without its id, is an error naming it; a
    blank line is skipped."""
    import shutil

    from flare_exp.io import read_jsonl

    run_dir, overrides = tmp_path / "inf", (f"infer.checkpoint={sft_adapter}", "infer.split=test")
    _infer(base_overrides, run_dir, *overrides)
    clean = json.loads((run_dir / "submission" / "predictions.json").read_text())
    rows = read_jsonl(run_dir / "predictions.jsonl")
    edited = [{**rows[0], "id": rows[5]["id"]}, {**rows[1], "adapter": {"path": "/elsewhere", "sha256": "1" * 64}},
              {**rows[2], "prediction": None}, {**rows[3], "prediction": 42},
              {k: v for k, v in rows[4].items() if k != "prediction"}, {**rows[6], "prediction": "EDITED"}, rows[6]]
    (run_dir / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in edited) + "\n")
    (run_dir / "DONE").unlink()
    shutil.rmtree(run_dir / "submission")
    caplog.set_level("WARNING")
    summary = _infer(base_overrides, run_dir, *overrides)
    assert summary["submission_complete"] is True and summary["generated_now"] == len(rows) - 1
    assert ("infer: 6 prediction row(s) of an earlier attempt set aside into predictions.set_aside.jsonl, 5 "
            "question(s) decoded again") in caplog.text
    aside = read_jsonl(run_dir / "predictions.set_aside.jsonl")
    assert [a["row"] for a in aside] == [{**rows[6], "prediction": "EDITED"}, *edited[:5]]
    assert [a["set_aside"].split(" (")[0] for a in aside] == [
        "an earlier row of its id, which a later, different row replaced",
        "its image_name, images, question, question_record differ from the question its id names",
        "made by another model",
        "its prediction is null, not text", "its prediction is 42, not text", "its prediction is missing, not text"]
    submitted = json.loads((run_dir / "submission" / "predictions.json").read_text())
    key = lambda r: (json.dumps(r["ImageName"]), r["Question"])  # noqa: E731
    assert sorted(map(key, submitted)) == sorted(map(key, clean))  # each question once
    assert all(isinstance(r["Answer"], str) and r["Answer"] != "EDITED" for r in submitted)
    (run_dir / "DONE").unlink()
    with open(run_dir / "predictions.jsonl", "a") as f:
        f.write("\n[1, 2, 3]\n")
    with pytest.raises(ValueError, match=r"predictions.jsonl: a row without its 'id' \(\[1, 2, 3\]\): edited by "
                                         r"hand\? fix or remove that line"):
        _infer(base_overrides, run_dir, *overrides)


def test_rows_set_aside_once_across_killed_resumes_and_rows_cut_down_by_hand(tmp_path, caplog):
    """A resume killed while decoding the set-aside questions again leaves the bad rows in the journal: the next
    resume found them again (now replaced by a later row: another reason) and filed them twice. A row cut down by
    hand (no image_name: the sheet's KeyError on every rerun; no adapter key: taken as this model's) is set aside."""
    from flare_exp.io import read_jsonl
    from flare_exp.stages.infer_resume import SET_ASIDE, usable_predictions

    records = {f"d/val/{i:016x}": {"id": f"d/val/{i:016x}", "dataset": "d", "image_name": f"{i}.png",
                                   "question": "q", "answer": "a"} for i in range(4)}
    adapter = {"path": "/a", "sha256": "f" * 64}
    good = {rid: {**r, "prediction": "p", "model": "m", "adapter": adapter} for rid, r in records.items()}
    ids = list(records)
    journal = tmp_path / "predictions.jsonl"
    rows = [{**good[ids[0]], "prediction": None}, {k: v for k, v in good[ids[1]].items() if k != "image_name"},
            {k: v for k, v in good[ids[2]].items() if k != "adapter"}, good[ids[3]]]
    journal.write_text("".join(json.dumps(r) + "\n" for r in rows))
    caplog.set_level("WARNING")
    assert set(usable_predictions(tmp_path, records, adapter, writer=True)) == {ids[3]}
    assert "3 prediction row(s) of an earlier attempt set aside into predictions.set_aside.jsonl, 3 question(s) " \
           "decoded again" in caplog.text
    reasons = [a["set_aside"] for a in read_jsonl(tmp_path / SET_ASIDE)]
    assert reasons == ["its prediction is null, not text", "its image_name missing", "its adapter missing"]
    with open(journal, "a") as f:  # killed after the first question was decoded again
        f.write(json.dumps(good[ids[0]]) + "\n")
    caplog.clear()
    assert set(usable_predictions(tmp_path, records, adapter, writer=True)) == {ids[0], ids[3]}
    assert len(read_jsonl(tmp_path / SET_ASIDE)) == 3 and "set aside" not in caplog.text  # nothing new


def test_test_split_writes_a_flare_submission(base_overrides, tmp_path):
    """Each test question file's records as given (their Split, Modality and key order too), each once, with the
    model's Answer: all in predictions.json (the one file FLARE's evaluator reads), and split by dataset."""
    from pathlib import Path

    _infer(base_overrides, tmp_path / "inf", "infer.split=test")
    folder = tmp_path / "inf" / "submission"
    datasets = ("IU_XRay", "boneresorption", "chestdr", "dental", "periapical")
    assert {f.name for f in folder.glob("*.json")} == {"predictions.json", *(f"{d}_predictions.json" for d in datasets)}
    submitted = json.loads((folder / "predictions.json").read_text())
    asked = [q for f in sorted(Path(compose_cfg(base_overrides).data.root).glob("testing/Xray/*/*_questions_test.json"))
             for q in json.loads(f.read_text())]
    assert len(submitted) == len(asked) and all(isinstance(r["Answer"], str) for r in submitted)
    assert sorted(json.dumps({k: v for k, v in r.items() if k != "Answer"}) for r in submitted) == \
        sorted(json.dumps(q) for q in asked)  # the question records, key order included
    assert {r["Split"] for r in submitted} == {q["Split"] for q in asked} == {"testing"}
    by_dataset = [r for d in datasets for r in json.loads((folder / f"{d}_predictions.json").read_text())]
    assert sorted(map(json.dumps, by_dataset)) == sorted(map(json.dumps, submitted))
    summary = _infer(base_overrides, tmp_path / "part", "infer.split=test", "infer.num_samples=3")
    assert not (tmp_path / "part" / "submission").exists() and summary["submission_complete"] is False
    assert len(json.loads((tmp_path / "part" / "submission_subset" / "predictions.json").read_text())) == 3


def test_a_smaller_num_samples_keeps_the_predictions_it_leaves_out(base_overrides, sft_adapter, tmp_path):
    run_dir = tmp_path / "inf"
    _infer(base_overrides, run_dir, f"infer.checkpoint={sft_adapter}", "infer.num_samples=6")
    first = {json.loads(l)["id"]: l for l in (run_dir / "predictions.jsonl").read_text().splitlines()}
    (run_dir / "DONE").unlink()  # an unfinished attempt, resumed asking for fewer
    summary = _infer(base_overrides, run_dir, f"infer.checkpoint={sft_adapter}", "infer.num_samples=2")
    assert summary["samples"] == 2 and summary["generated_now"] == 0
    assert summary["decode_loop"] is None and summary["inputs"] is None  # nothing decoded: the same keys, null
    spare = (run_dir / "predictions.beyond_num_samples.jsonl").read_text().splitlines()
    assert len(spare) == 4 and all(first[json.loads(l)["id"]] == l for l in spare)  # kept as they were
    (run_dir / "DONE").unlink()
    summary = _infer(base_overrides, run_dir, f"infer.checkpoint={sft_adapter}", "infer.num_samples=6")
    assert summary["generated_now"] == 0 and summary["samples"] == 6  # none decoded again
    assert not (run_dir / "predictions.beyond_num_samples.jsonl").exists()
    (run_dir / "DONE").unlink()  # a row whose id is in no record (edited by hand): set apart as such
    with open(run_dir / "predictions.jsonl", "a") as f:
        f.write(json.dumps({**json.loads(next(iter(first.values()))), "id": "dental/typed-by-hand"}) + "\n")
    summary = _infer(base_overrides, run_dir, f"infer.checkpoint={sft_adapter}", "infer.num_samples=6")
    assert summary["samples"] == 6 and not (run_dir / "predictions.beyond_num_samples.jsonl").exists()
    foreign = (run_dir / "predictions.not_in_split.jsonl").read_text().splitlines()
    assert [json.loads(l)["id"] for l in foreign] == ["dental/typed-by-hand"]


def test_eval_demo_and_comparison(base_overrides, sft_adapter, tmp_path):
    _infer(base_overrides, tmp_path / "a", f"infer.checkpoint={sft_adapter}")
    _infer(base_overrides, tmp_path / "b", "infer.label=base")
    cfg = compose_cfg(["stage=eval", *base_overrides, f"eval.predictions=[{tmp_path / 'a'},{tmp_path / 'b'}]"])
    summary = run(cfg, run_dir=tmp_path / "eval")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert list(metrics)[1] == "base" and len(metrics) == 2
    report = metrics["base"]["by_task"]["report_generation"]
    assert report["green_score"] is None and "eval.green.model_path" in report["green_note"]
    assert "radgraph_RG_ER" in report and "bleu_4" in report and "seed_bleu" in report
    assert set(metrics["base"]["by_task"]) == {"classification", "multi_label", "regression", "report_generation"}
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "| metric | " in md and "| report_generation: green_score | n/a | n/a |" in md
    # the demo's RadGraph is the tiny random one: the caveats say its numbers mean nothing, once for both runs
    assert md.count("radgraph_* are scored by a tiny random RadGraph (the demo's): they mean nothing") == 1
    assert md.index("Official numbers") < md.index("all metrics")
    assert (tmp_path / "eval" / "metrics.png").stat().st_size > 1000 and (tmp_path / "eval" / "report.html").exists()
    assert any(k.startswith("base/classification/") for k in summary)
    assert metrics["base"]["run"]["checkpoint"] == "base model" and metrics["base"]["run"]["model"] == "tiny"
    trained = metrics[list(metrics)[0]]["run"]  # the adapter that made the predictions, by path and sha256
    assert trained["checkpoint"] == str(sft_adapter / "final") and len(trained["adapter_sha256"]) == 64
    page = (tmp_path / "eval" / "report.html").read_text()
    assert page.index("Official numbers") < page.index("Runs evaluated") < page.index("all metrics")
    assert "flare-exp commit" in page and "<code>metrics.json</code>" in page and "<code>scored_1.xlsx</code>" in page and "scored sheet" in page
    # one run's jsonl and its sheet side by side: the second is named by its input, not with a trailing apostrophe
    cfg = compose_cfg(["stage=eval", *base_overrides,
                       f"eval.predictions=[{tmp_path / 'b'},{tmp_path / 'b' / 'predictions.xlsx'}]"])
    run(cfg, run_dir=tmp_path / "eval-both")
    assert list(json.loads((tmp_path / "eval-both" / "metrics.json").read_text())) == [
        "base", "base [2: predictions.xlsx]"]
    # two runs of one adapter (an infer on train beside one on val): the second named by its run dir too
    (tmp_path / "b-train").mkdir()
    (tmp_path / "b-train" / "predictions.jsonl").write_bytes((tmp_path / "b" / "predictions.jsonl").read_bytes())
    cfg = compose_cfg(["stage=eval", *base_overrides, f"eval.predictions=[{tmp_path / 'b'},{tmp_path / 'b-train'}]"])
    run(cfg, run_dir=tmp_path / "eval-two-runs")
    assert list(json.loads((tmp_path / "eval-two-runs" / "metrics.json").read_text())) == [
        "base", "base [2: b-train/predictions.jsonl]"]


def _rows(task, dataset, pairs):
    return [{"task_type": task, "dataset": dataset, "prediction": p, "answer": a} for p, a in pairs]


def test_balanced_accuracy_by_hand():
    rows = _rows("classification", "dental", [("A", "A"), ("B", "A"), ("a ", "A"), ("C", "C"), ("the answer is C", "C")])
    m = tasks.classification_metrics(rows)
    assert official.official_block("classification", rows)["balanced_accuracy"] == pytest.approx(
        (2 / 3 + 1 / 2) / 2)  # strings: "the answer is c" != "c"
    assert m["balanced_accuracy_parsed"] == pytest.approx((2 / 3 + 1) / 2)


def test_multi_label_f1_by_hand():
    rows = _rows("multi_label", "chestdr", [("Effusion, Mass", "Effusion"), ("Nodule", "Nodule, Mass")])
    m = tasks.multi_label_metrics(rows)
    # TP=2 (effusion, nodule), FP=1 (mass), FN=1 (mass): micro = 4 / 6; per sample 2/3 and 2/3
    assert m["dataset_aware_f1_micro"] == pytest.approx(4 / 6) and m["dataset_aware_f1_example"] == pytest.approx(2 / 3)


def test_mae_reports_unparseable():
    m = tasks.regression_metrics(_rows("regression", "boneresorption", [("20%", "22"), ("30", "25"), ("n/a", "10")]))
    assert m["mae_parseable"] == pytest.approx(3.5) and m["unparseable"] == 1
    assert m["rmse_parseable"] == pytest.approx(math.sqrt((4 + 25) / 2))


def test_bleu_by_hand():
    b = text.corpus_bleu(["the heart is normal"], ["the heart is normal"])
    assert b["bleu_4"] == pytest.approx(1.0)
    b = text.corpus_bleu(["the heart"], ["the heart is normal"])
    assert b["bleu_1"] == pytest.approx(math.exp(1 - 4 / 2)) and b["bleu_2"] == pytest.approx(math.exp(-1))
    # seed_bleu averages per-sample precisions: 1-grams (1 + 0.5)/2, 2-grams (1 + 0)/2 ...
    assert text.seed_bleu(["a b", "c d"], ["a b", "c x"], max_n=2) == pytest.approx(math.sqrt(0.75 * 0.5))


WELL_FORMED = """[Explanation]:
The candidate misses the effusion.

[Clinically Significant Errors]:
(a) False report of a finding in the candidate: 0.
(b) Missing a finding present in the reference: 1. Pleural effusion.
(c) Misidentification of a finding's anatomic location/position: 0.
(d) Misassessment of the severity of a finding: 0.
(e) Mentioning a comparison that isn't in the reference: 0.
(f) Omitting a comparison detailing a change from a prior study: 0.

[Clinically Insignificant Errors]:
(a) False report of a finding in the candidate: 1. Small granuloma.

[Matched Findings]:
3. Normal heart; Clear lungs; No pneumothorax.
"""


NUMBERED = """[Explanation]:
Mostly right.

[Clinically Significant Errors]:
(1) False report of a finding in the candidate: 1. Nodule.
(2) Missing a finding present in the reference: 2. Effusion; edema.
(6) Omitting a comparison detailing a change from a prior study: 0.

[Matched Findings]:
5. Heart; lungs; mediastinum; bones; diaphragm.
"""


# The GREEN package's value of each output, worked out by hand from its rules (a section runs to a blank line;
# "No..." counts 0; matched = the leading number followed by "."; errors per "(a) ".."(f) " line, else per
# "(1) ".."(6) " line, the count after ": " followed by "."; matched 0 scores 0), beside the robust parser's.
@pytest.mark.parametrize("output,significant,matched,package,robust", [
    (WELL_FORMED, [0, 1, 0, 0, 0, 0], 3, 3 / 4, 0.75),
    # no blank lines: the significant section runs to the end and takes in the insignificant (a) line too;
    # sorted, "...: 1. Small granuloma." comes after "...: 0." and wins: 3 / (3 + 1 + 1)
    (WELL_FORMED.replace("\n\n", "\n"), [1, 1, 0, 0, 0, 0], 3, 3 / 5, 0.75),
    # counts without a trailing period are not counts; "2 Normal" is no matched number: 0
    (WELL_FORMED.replace(": 1. Pleural effusion.", ": 2").replace("3. Normal", "2 Normal"), [0] * 6, 0, 0.0, 0.5),
    ("[Explanation]: fine.\n[Clinically Significant Errors]: No errors.\n[Matched Findings]: 4.", [0] * 6, 4, 1.0,
     1.0),
    ("[Clinically Significant Errors]:\n(a) False report: 2.\n[Matched Findings]:\n0.", [2, 0, 0, 0, 0, 0], 0, 0.0,
     0.0),
    # "None. ..." starts with "No": 0 matched, whatever digits follow (the robust parser read the 6: 6 / 7)
    ("[Clinically Significant Errors]:\n(b) Missing: 1. Nodule.\n\n[Matched Findings]:\nNone. The 6 mm nodule "
     "is described in both.", [0, 1, 0, 0, 0, 0], 0, 0.0, 6 / 7),
    (NUMBERED, [1, 2, 0, 0, 0, 0], 5, 5 / 8, 5 / 5),  # numbered lines; the robust parser reads only letters
])
def test_green_parser_matches_the_package(output, significant, matched, package, robust):
    counts = parse_green(output)
    assert counts["significant"] == significant and counts["matched"] == matched
    assert green_score(counts) == pytest.approx(package)
    assert green_score(parse_green(output, "robust")) == pytest.approx(robust)


def test_green_unreadable_output_scores_zero_and_counts_in_the_mean():
    from flare_exp.metrics.green import summarise

    assert green_score(parse_green("lorem ipsum 3 4 5")) == 0.0
    robust = parse_green("lorem ipsum 3 4 5", "robust")
    assert robust["parsed"] is False and green_score(robust) is None
    samples = [{"green": green_score(parse_green(t)), **parse_green(t)} for t in (WELL_FORMED, "garbage")]
    summary = summarise(samples)
    assert summary["green_score"] == pytest.approx(0.375) and summary["green_std"] == pytest.approx(0.375)
    assert summary["green_n"] == 2 and summary["green_matched_findings_mean"] == pytest.approx(1.5)
    assert summary["green_error_free_share"]["(b) Missing a finding present in the reference"] == 0.5
    with pytest.raises(ValueError, match="eval.green.parser='exact'"):
        parse_green("x", "exact")


def test_green_cleans_the_decoded_sequence_as_the_package():
    from flare_exp.metrics.green import clean_response

    prompt = make_prompt("ref", "cand")
    full = f"<|user|>\n{prompt}\n<|assistant|>\n\n<|assistant|>\n[Explanation]:\nok.\n\n[Matched Findings]:\n1. x</s>"
    assert clean_response(full) == "\nok.\n\n[Matched Findings]:\n1. x"
    assert clean_response("no heading <unk>here") == "no heading here"


def test_green_prompt_cuts_reports_to_300_words():
    prompt = make_prompt("word " * 500, "short candidate")
    assert prompt.count("word") == 300 and "[Matched Findings]" in prompt and "short candidate" in prompt


def test_green_judge_builds_the_packages_input(tmp_path):
    from flare_exp.fixtures.tiny_models import build_tiny_causal_lm

    judge = GreenJudge.from_pretrained(build_tiny_causal_lm(tmp_path / "judge"), "float32", batch_size=2,
                                       max_new_tokens=8)
    rendered = judge.render("PROMPT")
    # the human turn, an empty assistant turn, then the generation prompt
    assert rendered == "<|user|>\nPROMPT</s>\n<|assistant|>\n</s>\n<|assistant|>\n"
    ids = judge.encode([rendered, "short"])["input_ids"]
    tok = judge.tokenizer
    assert ids[0, 0] == tok.bos_token_id and ids[0, -1] == tok.eos_token_id and ids[1, -1] == tok.eos_token_id
    assert ids[1, 0] == tok.pad_token_id == tok.eos_token_id and tok.padding_side == "left"
    assert judge.new_token_budget(2000) == 8 and judge.new_token_budget(10) == 8
    judge.max_new_tokens = None
    assert judge.new_token_budget(2000) == 48  # the package's total max_length=2048
    summary, samples = judge.score(["The heart is normal."] * 3, ["Heart normal.", "Lungs clear.", ""])
    assert len(samples) == 3 and all(isinstance(s["judge_output"], str) for s in samples)
    assert summary["green_n"] == 3 and summary["green_score"] == 0.0  # random text: unreadable, scored 0


def test_green_judge_input_is_the_packages_token_for_token(tmp_path):
    """The judge's input ids equal those the GREEN package's own tokenizer loading gives on transformers 4.57.6
    (tests/golden, made there on the same tiny judge); on transformers 5 that loading drops the BOS and
    tokenizes otherwise."""
    import json
    from pathlib import Path

    from flare_exp.fixtures.tiny_models import build_tiny_causal_lm

    golden = json.loads((Path(__file__).parent / "golden" / "green_judge_input.json").read_text())
    judge = GreenJudge.from_pretrained(build_tiny_causal_lm(tmp_path / "judge"), "float32")
    assert [judge.render(make_prompt(ref, cand)) for ref, cand in golden["pairs"]] == golden["texts"][:2]
    enc = judge.encode(golden["texts"])
    assert enc["input_ids"].tolist() == golden["input_ids"]
    assert enc["attention_mask"].tolist() == golden["attention_mask"]


def test_green_graph_loop_judges_as_generate(tmp_path):
    from flare_exp.fixtures.tiny_models import build_tiny_causal_lm

    path = build_tiny_causal_lm(tmp_path / "judge")
    refs = ["The heart is normal.", "No effusion.", "Mild cardiomegaly with a small left effusion."]
    cands = ["Heart normal.", "Lungs clear and no effusion seen.", ""]
    outputs = {loop: GreenJudge.from_pretrained(path, "float32", batch_size=2, max_new_tokens=12, decode_loop=loop)
               .judge(refs, cands) for loop in ("generate", "graph")}
    assert outputs["graph"] == outputs["generate"] and all(outputs["graph"])


def test_green_judgments_are_journaled_and_resumed(tmp_path, monkeypatch):
    """Each judgment is appended as its batch finishes; a rerun (a preempted eval) judges only what is missing,
    a repeated pair is judged once, and a torn last line is dropped."""
    from flare_exp.fixtures.tiny_models import build_tiny_causal_lm

    path, journal = build_tiny_causal_lm(tmp_path / "judge"), tmp_path / "eval" / "green_judgments.jsonl"
    refs, cands = ["The heart is normal."] * 4, ["Heart normal.", "Lungs clear.", "Heart normal.", "No effusion."]
    first = GreenJudge.from_pretrained(path, batch_size=2, max_new_tokens=6, journal=journal, decode_loop="generate")
    full = first.judge(refs, cands)
    assert full[0] == full[2] and len(journal.read_text().splitlines()) == 3  # three distinct pairs
    lines = journal.read_text().splitlines()
    journal.write_text(lines[0] + "\n" + lines[1][:20])  # killed during the second judgment's write
    again = GreenJudge.from_pretrained(path, batch_size=2, max_new_tokens=6, journal=journal, decode_loop="generate")
    generated = []
    real = again.model.generate
    monkeypatch.setattr(again.model, "generate", lambda **kw: (generated.append(len(kw["input_ids"])), real(**kw))[1])
    assert again.judge(refs, cands) == full and generated == [2]  # only the two missing, in one batch
    assert len(journal.read_text().splitlines()) == 3
    other = GreenJudge.from_pretrained(path, batch_size=2, max_new_tokens=7, journal=journal)  # other settings: judged afresh
    assert {other.key(t) for t in ["x"]} != {again.key(t) for t in ["x"]}


def test_green_missing_judge_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval.green.model_path=.*GREEN-radllama2-7b"):
        GreenJudge.from_pretrained(tmp_path / "none")


def test_eval_runs_green_when_configured(base_overrides, tmp_path):
    from flare_exp.fixtures.tiny_models import build_tiny_causal_lm

    _infer(base_overrides, tmp_path / "inf", "infer.num_samples=20")
    judge = build_tiny_causal_lm(tmp_path / "judge")
    run(compose_cfg(["stage=eval", *base_overrides, f"eval.predictions=[{tmp_path / 'inf'}]",
                     f"eval.green.model_path={judge}", "eval.green.max_new_tokens=4"]), run_dir=tmp_path / "eval")
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())["base"]["by_task"]["report_generation"]
    assert "green_note" not in report and report["green_n"] == report["n"] and report["green_parser"] == "package"
    official_green = json.loads((tmp_path / "eval" / "metrics.json").read_text())["base"]["official"]
    assert official_green["report_generation"]["green_score"] == report["green_score"]
    samples = (tmp_path / "eval" / "green_samples_base.jsonl").read_text().splitlines()
    assert len(samples) == report["n"] and "judge_output" in json.loads(samples[0])
    caveats = json.loads((tmp_path / "eval" / "metrics.json").read_text())["base"]["caveats"]
    assert "report_generation: green_score is judged by a tiny random model (eval.green.model_path): it means " \
           "nothing" in caveats


def test_chexbert_efficacy_by_hand():
    from flare_exp.metrics.chexbert import binarise, efficacy

    gold = binarise([[1, 2, 3], [0, 1, 0]], uncertain_as_positive=True)   # [[1,0,1],[0,1,0]]
    pred = binarise([[1, 1, 0], [0, 1, 3]], uncertain_as_positive=True)   # [[1,1,0],[0,1,1]]
    m = efficacy(pred, gold)
    # TP=2, FP=2, FN=1: micro P=0.5 R=2/3
    assert m["chexbert_precision_micro"] == pytest.approx(0.5) and m["chexbert_recall_micro"] == pytest.approx(2 / 3)
    # per label F1: [1, 2/3, 0] -> macro 5/9; per example F1: [0.5, 2/3]
    assert m["chexbert_f1_macro"] == pytest.approx(5 / 9) and m["chexbert_f1_example"] == pytest.approx(7 / 12)
    assert binarise([[3]], uncertain_as_positive=False) == [[0]]


def test_chexbert_labeler_loads_a_checkpoint_in_the_published_layout(base_overrides, tmp_path):
    import torch

    from flare_exp.metrics.chexbert import build_labeler
    from flare_exp.fixtures.tiny_radgraph import _build_bert

    _build_bert(tmp_path / "bert")
    state = {f"module.{k}": v for k, v in build_labeler(tmp_path / "bert").state_dict().items()}
    torch.save({"model_state_dict": state}, tmp_path / "chexbert.pth")
    _infer(base_overrides, tmp_path / "inf", "infer.num_samples=20")
    run(compose_cfg(["stage=eval", *base_overrides, f"eval.predictions=[{tmp_path / 'inf'}]",
                     f"eval.chexbert.path={tmp_path / 'chexbert.pth'}", f"eval.chexbert.encoder_path={tmp_path / 'bert'}"]),
        run_dir=tmp_path / "eval")
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())["base"]["by_task"]["report_generation"]
    assert {"chexbert_f1_micro", "chexbert_f1_macro", "chexbert_f1_example"} <= set(report)
    assert report["chexbert_uncertain_as"] == "positive"


def test_infer_overwrite_regenerates(base_overrides, tmp_path):
    from flare_exp.run.record import RunFinishedError

    first = _infer(base_overrides, tmp_path / "inf", "infer.num_samples=4")
    with pytest.raises(RunFinishedError, match=r"holds a finished infer run \(DONE marker present\)\. Nothing"):
        _infer(base_overrides, tmp_path / "inf", "infer.num_samples=4")
    eval_cfg = compose_cfg(["stage=eval", *base_overrides, f"eval.predictions=[{tmp_path / 'inf'}]"])
    with pytest.raises(RunFinishedError, match=r"holds a finished infer run \(DONE marker present\) \(this launch is "
                                               r"stage=eval: another run_name= keeps both\)"):
        run(eval_cfg, run_dir=tmp_path / "inf")  # the other stage's run is named as what it is
    again = _infer(base_overrides, tmp_path / "inf", "infer.num_samples=4", "overwrite=true")
    assert first["generated_now"] == again["generated_now"] == 4


def test_merged_adapter_predicts_what_the_unmerged_one_does(base_overrides, sft_adapter, tmp_path):
    from peft import PeftModel

    from flare_exp.io import read_jsonl
    from flare_exp.models.loading import load_model

    cfg = compose_cfg(base_overrides)
    assert not isinstance(load_model(cfg.model, str(sft_adapter), training=False, merge_adapter=True).model,
                          PeftModel)
    common = (f"infer.checkpoint={sft_adapter}", "infer.num_samples=10")
    _infer(base_overrides, tmp_path / "merged", *common)
    _infer(base_overrides, tmp_path / "unmerged", *common, "infer.merge_adapter=false")
    predictions = [[r["prediction"] for r in read_jsonl(tmp_path / d / "predictions.jsonl")]
                   for d in ("merged", "unmerged")]
    assert predictions[0] == predictions[1]  # float32 tiny model, greedy: folding the LoRA changes nothing


def test_images_are_prefetched_in_order_and_image_device_is_checked(demo_prepared):
    from types import SimpleNamespace

    import torch

    from flare_exp.io import read_jsonl
    from flare_exp.models.batch_decoding import check_image_device, image_device
    from flare_exp.models.image_reading import batches_with_images

    records = read_jsonl(demo_prepared / "val.jsonl")[:7]
    chat = SimpleNamespace(load_images=lambda r: [r["id"]] * len(r["images"]))
    batches = list(batches_with_images(chat, records, 3))
    assert [len(b) for b, _ in batches] == [3, 3, 1]
    assert all(imgs == [[r["id"]] * len(r["images"]) for r in b] for b, imgs in batches)
    model = SimpleNamespace(device=SimpleNamespace(type="cpu"))
    assert image_device("auto", model) is None and image_device("cpu", model) == "cpu"
    check_image_device("cuda:1", here=False)  # the check before a sweep's launch: the spelling only
    for bad in ("gpu", "cuda:x", "cuda:", "CPU"):
        with pytest.raises(ValueError, match=f"infer.image_device='{bad}': choose auto, cpu or cuda"):
            image_device(bad, model)
    cards = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=f"infer.image_device=cuda:{cards}: this process sees "
                                         + (f"{cards} GPU" if cards else "no GPU")):
        image_device(f"cuda:{cards}", model)  # a card this process does not have (it died on a driver error)


def test_image_files_read_by_several_threads_keep_the_records_order_and_errors(demo_prepared, monkeypatch):
    """infer.image_threads: a batch's files decoded by several threads, each record's pictures in its place
    whatever order the threads finish in; an unreadable file stops the run with the first such record's error,
    as one thread reading in order does; auto is this process's share of its cores, at most 8; a bad value is
    refused by name."""
    import random
    import threading
    import time
    from types import SimpleNamespace

    from flare_exp.io import read_jsonl
    from flare_exp.models import image_reading
    from flare_exp.models.image_reading import batches_with_images, check_image_threads, image_threads

    records = read_jsonl(demo_prepared / "val.jsonl")[:11]
    seen_threads, jitter = set(), random.Random(0)

    def load_images(r):
        seen_threads.add(threading.get_ident())
        time.sleep(jitter.random() * 0.02)  # threads finish out of order
        if r["id"] in (records[9]["id"], records[10]["id"]):
            raise ValueError(f"record {r['id']}: cannot read image")
        return [r["id"]] * len(r["images"])

    chat = SimpleNamespace(load_images=load_images)
    batches = batches_with_images(chat, records, 4, None, threads=3)
    for b, imgs in [next(batches), next(batches)]:
        assert imgs == [[r["id"]] * len(r["images"]) for r in b]
    assert len(seen_threads) > 1  # the first batch: every thread reads while the decode waits
    with pytest.raises(ValueError, match=f"record {records[9]['id']}: cannot read image"):
        next(batches)
    monkeypatch.setattr(image_reading, "MOST_IMAGE_THREADS", 8)
    monkeypatch.setattr("flare_exp.runtime.usable_cores", lambda: 32)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert image_threads("auto") == 8 and image_threads(3) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun's 8 ranks on this node share its 32 cores
    assert image_threads("auto") == 4
    monkeypatch.setattr("flare_exp.runtime.usable_cores", lambda: 2)
    assert image_threads("auto") == 1
    check_image_threads("auto")
    for bad in (0, -2, True, 2.5, "four", None):
        with pytest.raises(ValueError, match=f"infer.image_threads={bad!r}: choose auto or a whole number"):
            image_threads(bad)


def test_one_thread_reads_ahead_until_the_decode_waits_on_the_reading():
    """Reading threads slow the decode beside them: while reading keeps ahead of the decode one thread reads
    the next batch; once the decode waits on it, every thread joins that batch, and later batches start with
    twice as many. A run stopped early reads no more files."""
    import threading
    import time
    from types import SimpleNamespace

    from flare_exp.models.image_reading import ImageReader, batches_with_images

    records = [{"id": str(i), "images": ["x"]} for i in range(40)]
    readers_of = {}

    def reading(seconds):
        def load_images(r):
            readers_of.setdefault(int(r["id"]) // 4, set()).add(threading.get_ident())
            time.sleep(seconds)
            return [r["id"]]
        return SimpleNamespace(load_images=load_images)

    batches = batches_with_images(reading(0.001), records[:16], 4, None, threads=4)
    for _ in batches:
        time.sleep(0.1)  # a decode far slower than the reading
    assert [len(readers_of[b]) for b in (1, 2, 3)] == [1, 1, 1]
    reader = ImageReader(reading(0.02), 4, None)
    for i in range(4):  # a decode faster than the reading: it waits on every batch
        reader.wait(reader.start(records[4 * i:4 * i + 4]), first=i == 0)
    assert reader.ahead_threads == 4 and reader.waits == 2  # 1 -> 2 -> 4 after the second and third batch
    reader.close(None)
    read = []
    batches = batches_with_images(SimpleNamespace(load_images=lambda r: read.append(r["id"]) or time.sleep(0.05)),
                                  records, 4, None, threads=1)
    next(batches)
    batches.close()  # the consumer stopped: the batch being read ahead stops after its record in hand
    assert 4 <= len(read) <= 5


def test_infer_kv_cache_auto_and_a_failing_compiled_decode(base_overrides, tmp_path, monkeypatch, caplog):
    import torch._dynamo.exc

    from transformers import PreTrainedModel
    from transformers.generation.utils import GenerationMixin

    from flare_exp.models.decoding import kv_cache

    assert kv_cache("auto", "hf", on_gpu=True) == "static" and kv_cache("auto", "unsloth", on_gpu=True) is None
    assert kv_cache("auto", "hf", on_gpu=False) is None and kv_cache("dynamic", "hf", on_gpu=True) is None

    caches, attempts = [], []

    def criteria(self, model_kwargs, config):  # as on a GPU: a static cache gets a compiled decode step
        caches.append(type(model_kwargs.get("past_key_values")).__name__)
        return not config.disable_compile and caches[-1] == "StaticCache"

    def failing_compiled_call(self, compile_config):
        def call(*args, **kwargs):
            attempts.append(1)
            raise torch._dynamo.exc.TorchDynamoException("backend compiler failed")
        return call

    monkeypatch.setattr(GenerationMixin, "_valid_auto_compile_criteria", criteria)
    monkeypatch.setattr(PreTrainedModel, "get_compiled_call", failing_compiled_call)
    summary = _infer(base_overrides, tmp_path / "inf", "infer.num_samples=12", "infer.cache_implementation=static")
    assert summary["samples"] == 12 and len(attempts) == 1 and "continuing uncompiled" in caplog.text
    # batch 1 (failed compiled attempt + eager retry) and batch 2 on the static cache; the last 2 reports dynamic
    assert caches == ["StaticCache"] * 3 + ["DynamicCache"]


def test_eval_writes_a_sheet_scored_per_row_worst_first(base_overrides, sft_adapter, tmp_path):
    from openpyxl import load_workbook

    from flare_exp.metrics.row_scores import row_scores, worst_first

    _infer(base_overrides, tmp_path / "a", f"infer.checkpoint={sft_adapter}")
    run(compose_cfg(["stage=eval", *base_overrides, f"eval.predictions=[{tmp_path / 'a'}]"]), run_dir=tmp_path / "e")
    ws = load_workbook(tmp_path / "e" / "scored.xlsx").active
    header = [c.value for c in ws[1]]
    assert header[-2:] == ["score", "score_kind"]
    kinds = {ws.cell(i, 6).value: ws.cell(i, 9).value for i in range(2, ws.max_row + 1)}
    assert kinds == {"classification": "correct (1/0)", "multi_label": "label F1", "regression": kinds["regression"],
                     "report_generation": "ROUGE-L"}
    assert kinds["regression"] == "absolute error" or kinds["regression"].startswith(("absolute error", "no number"))
    # by hand: FLARE's per-sample numbers
    rows = [{"id": "c", "task_type": "classification"}, {"id": "m", "task_type": "multi_label"},
            {"id": "r", "task_type": "regression"}, {"id": "x", "task_type": "regression"}]
    import numpy as np
    samples = {"classification": (["c"], np.array([[0, 1.0]])), "multi_label": (["m"], np.array([[1, 1, 0]])),
               "regression": (["r", "x"], np.array([[2.5], [np.inf]]))}
    scores = row_scores(rows, samples)
    assert scores["c"][0] == 1.0 and scores["m"][0] == 2 / 3 and scores["r"][0] == 2.5 and scores["x"][0] is None
    ordered = worst_first([{"task_type": "regression", "score": 1.0}, {"task_type": "regression", "score": 5.0},
                           {"task_type": "regression", "score": None}])
    assert [r["score"] for r in ordered] == [None, 5.0, 1.0]  # no number at all: the worst answer


def test_a_hand_broken_config_in_an_infer_run_dir_is_a_note_not_a_crash(tmp_path):
    """What made a predictions file is a best-effort record: a config.yaml cut or broken by hand becomes a note in
    the report's metadata, and the run listing passes over it."""
    from flare_exp.catalog import stage_of
    from flare_exp.data.predictions import run_metadata

    (tmp_path / "config.yaml").write_text("garbage: [")
    (tmp_path / "predictions.jsonl").write_text("")
    meta = run_metadata(tmp_path / "predictions.jsonl")
    assert meta["note"].startswith("run metadata unreadable: ") and "Traceback" not in meta["note"]
    assert stage_of(tmp_path) is None


def test_the_submission_keeps_flares_own_question_text(tmp_path):
    """FLARE's evaluator joins a submission to its ground truth on the raw ImageName||Question and skips what does
    not match: a question with surrounding whitespace in FLARE's file goes back as it was, not stripped."""
    from test_prepare import GOOD, _prepare, _small_tree

    from flare_exp.io import read_jsonl
    from flare_exp.stages.infer import write_submission

    root = tmp_path / "raw"
    _small_tree(root, [GOOD, {**GOOD, "Question": " Which findings? \n"}])
    records = read_jsonl(_prepare(tmp_path, root, "data.datasets=[chestdr]") / "train.jsonl")
    assert [r["question"] for r in records] == [GOOD["Question"], "Which findings?"]
    assert "raw_question" not in records[0] and records[1]["raw_question"] == " Which findings? \n"
    rows = [{**r, "prediction": "none"} for r in records]
    submitted = json.loads((write_submission(tmp_path / "inf", rows, 2) / "chestdr_predictions.json").read_text())
    assert [s["Question"] for s in submitted] == [GOOD["Question"], " Which findings? \n"]


def test_a_submission_appears_whole_or_not_at_all_and_never_beside_an_earlier_attempts(tmp_path, monkeypatch,
                                                                                        caplog):
    """A kill while the dataset files were written left submission/ with some datasets missing (an upload of it
    scores them as wrong); a rerun answering fewer questions (infer.num_samples) left that submission/ beside its
    submission_subset/."""
    import flare_exp.stages.infer as infer

    rows = [{"dataset": d, "raw_task_type": "Multi-label Classification", "image_name": f"{d}{i}.png",
             "question": "Which findings?", "prediction": "none"} for d in ("chestdr", "periapical") for i in range(2)]
    out = tmp_path / "inf"
    written = []

    def dies_on_the_second(path, obj):
        if written:
            raise KeyboardInterrupt  # as a kill part-way
        written.append(path)
        (path.parent.mkdir(parents=True, exist_ok=True), path.write_text(json.dumps(obj)))

    with monkeypatch.context() as patched:
        patched.setattr(infer, "write_json", dies_on_the_second)
        with pytest.raises(KeyboardInterrupt):
            infer.write_submission(out, rows, 4)
    assert written and not (out / "submission").exists() and not list(out.glob(".submission-*"))
    whole = infer.write_submission(out, rows, 4)
    assert sorted(p.name for p in whole.iterdir()) == ["chestdr_predictions.json", "periapical_predictions.json",
                                                       "predictions.json"]
    subset = infer.write_submission(out, rows[:1], 4)
    assert subset.name == "submission_subset" and not whole.exists()
    assert sorted(p.name for p in subset.iterdir()) == ["chestdr_predictions.json", "predictions.json"]
    assert "1 of the 4 test questions answered (3 left out by infer.num_samples)" in caplog.text
    assert infer.write_submission(out, rows, 4) == whole and whole.is_dir() and not subset.exists()
    # short for prepare's rejects and infer.num_samples together: each reason said (only the rejects were)
    rejected = {"count": 1, "reasons": {"missing image": 1}, "file": "rejects.jsonl"}
    assert infer.write_submission(out, rows[:2], 5, rejected).name == "submission_subset"
    assert "2 of the 5 test questions answered (1 question(s) of the test split that prepare rejected" in caplog.text
    assert "each with overwrite=true; 2 left out by infer.num_samples)" in caplog.text
    # rows prepared before prepare kept each test question's record: rebuilt, and said
    assert "4 of the 4 test questions were prepared before prepare kept each question's record" in caplog.text


def test_eval_says_runs_differ_in_their_reports_without_a_green_judge(base_overrides, tmp_path):
    """Without a GREEN judge the report rows have no paired test, but they are inputs: eval's own warning counts
    them, as runs.compare does for the same pair."""
    from flare_exp.io import write_jsonl

    split = [{"id": f"dental/{i}", "dataset": "dental", "task_type": "classification", "answer": "ABC"[i % 3],
              "split": "val", "question": f"d{i}", "image_name": f"d{i}.png"} for i in range(4)] + \
            [{"id": f"iu/{i}", "dataset": "IU_XRay", "task_type": "report_generation", "answer": "No acute findings.",
              "split": "val", "question": f"r{i}", "image_name": f"r{i}.png"} for i in range(4)]
    write_jsonl(tmp_path / "prepared" / "val.jsonl", split)
    for name, reports in (("a", ("iu/0", "iu/1")), ("b", ("iu/0", "iu/2", "iu/3"))):
        write_jsonl(tmp_path / name / "predictions.jsonl",
                    [{**r, "prediction": "A" if r["task_type"] == "classification" else "Normal chest."}
                     for r in split if r["task_type"] == "classification" or r["id"] in reports])
    run(compose_cfg(["stage=eval", *base_overrides, f"eval.predictions=[{tmp_path / 'a'},{tmp_path / 'b'}]",
                     f"data.prepared_dir={tmp_path / 'prepared'}", "eval.significance.resamples=20"]),
        run_dir=tmp_path / "eval")
    warnings = json.loads((tmp_path / "eval" / "significance.json").read_text())["warnings"]
    said = "a and b were scored on different inputs: 1 sample(s) only in a, 2 only in b; the comparisons use the 5"
    assert any(w.startswith(said) for w in warnings), warnings
    assert said in (tmp_path / "eval" / "report.md").read_text()


def test_inputs_built_ahead_give_the_same_predictions_and_are_all_used(base_overrides, demo_prepared, monkeypatch):
    """infer.inputs_ahead: the reader thread builds each batch's model input (its own processor copy) and the
    graph loop's prompt positions; the decoder takes them instead of building its own: same predictions, every
    built input used, none left over."""
    from flare_exp.data.vision import VisionChat
    from flare_exp.io import read_jsonl
    from flare_exp.models import batch_decoding
    from flare_exp.models.batch_decoding import Decoder, InputsAhead, decode_in_parts
    from flare_exp.models.image_reading import batches_with_images
    from flare_exp.models.batch_decoding import inputs_ahead
    from flare_exp.models.loading import load_model
    from flare_exp.runtime import abspath

    cfg = compose_cfg(["stage=infer", *base_overrides, "model.dtype=float32", "infer.batch_size=3",
                       "infer.decode_loop=graph", "infer.max_new_tokens=6"])
    loaded = load_model(cfg.model, training=False)
    chat = VisionChat(loaded.processor, abspath(cfg.data.root))
    records = read_jsonl(demo_prepared / "val.jsonl")[:7]  # two full batches (the loop), a short one (generate)
    decoder = Decoder(loaded.model, chat, cfg.infer, "hf")
    assert inputs_ahead(decoder) is None  # on a CPU the input is built in turn
    built_in_turn = [decode_in_parts(decoder, c, ims) for c, ims in batches_with_images(chat, records, 3)]

    def not_called(*args):
        raise AssertionError("the decoder built an input the reader thread had built")

    import threading

    from flare_exp.models import graph_decoding

    positions_by = []  # the threads that computed a loop batch's prompt positions
    original_positions = graph_decoding.prompt_positions

    def positions(owner, batch):
        positions_by.append(threading.current_thread() is threading.main_thread())
        return original_positions(owner, batch)

    monkeypatch.setattr(graph_decoding, "prompt_positions", positions)
    decoder.ahead = InputsAhead(loaded.model, chat, batch_decoding.loop_positions(decoder.decoding.loop))
    assert decoder.ahead.chat.processor is not chat.processor
    monkeypatch.setattr(batch_decoding, "model_batch", not_called)
    ahead = [decode_in_parts(decoder, c, ims) for c, ims in batches_with_images(chat, records, 3, decoder.ahead)]
    assert ahead == built_in_turn and any(p for batch in ahead for p in batch)
    # every batch's positions in the reader thread (the short last one's too, unused: generate decodes it)
    assert positions_by == [False, False, False]
    assert decoder.ahead.ready == {}
    decoder.ahead.build(records[:3], [chat.load_images(r) for r in records[:3]])
    assert decoder.ahead.take(records[:2]) is None  # a half of a built batch builds its own
    with decoder.ahead:  # as infer holds it: a loop stopped between batches leaves no built input behind
        decoder.ahead.build(records[:3], [chat.load_images(r) for r in records[:3]])
    assert decoder.ahead.ready == {} and decoder.ahead.state() == "ahead"


def test_a_batch_out_of_memory_stops_building_inputs_ahead(base_overrides, demo_prepared, monkeypatch, caplog):
    """The memory an input built ahead holds goes to the decode once a batch runs out of it: the halves and
    every later batch are built in turn, said in the halving warning and in the summary's words."""
    import torch

    from flare_exp.data.vision import VisionChat
    from flare_exp.io import read_jsonl
    from flare_exp.models.batch_decoding import Decoder, InputsAhead, decode_in_parts
    from flare_exp.models.image_reading import batches_with_images
    from flare_exp.models.loading import load_model
    from flare_exp.runtime import abspath

    cfg = compose_cfg(["stage=infer", *base_overrides, "model.dtype=float32", "infer.batch_size=2",
                       "infer.max_new_tokens=4"])
    loaded = load_model(cfg.model, training=False)
    chat = VisionChat(loaded.processor, abspath(cfg.data.root))
    records = read_jsonl(demo_prepared / "val.jsonl")[:4]
    decoder = Decoder(loaded.model, chat, cfg.infer, "hf")
    decoder.ahead = InputsAhead(loaded.model, chat)
    original, calls = Decoder.__call__, []

    def first_batch_too_large(self, batch_records, images):
        calls.append(len(batch_records))
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, batch_records, images)

    monkeypatch.setattr(Decoder, "__call__", first_batch_too_large)
    with caplog.at_level("WARNING"):
        texts = [t for c, ims in batches_with_images(chat, records, 2, decoder.ahead)
                 for t in decode_in_parts(decoder, c, ims)]
    assert len(texts) == 4 and calls == [2, 1, 1, 2]
    assert decoder.ahead.stopped and decoder.ahead.ready == {}
    assert "building each batch's input in turn from now on (infer.inputs_ahead)" in caplog.text
    assert decoder.ahead.state() == "ahead, then in turn (a batch ran out of GPU memory)"


def test_an_infer_config_edited_after_the_run_is_not_reported_as_its_settings(base_overrides, tmp_path, caplog):
    """config.yaml edited by hand after the infer run (max_pixels, max_new_tokens): eval's run block gives the
    settings the run recorded as it ran (fingerprint.json), says so in a warning and a caveat."""
    from omegaconf import OmegaConf

    _infer(base_overrides, tmp_path / "a", "infer.num_samples=4")
    saved = tmp_path / "a" / "config.yaml"
    edited = OmegaConf.load(saved)
    ran_with = (edited.model.max_pixels, edited.infer.max_new_tokens)
    edited.model.max_pixels, edited.infer.max_new_tokens = 262144, 512
    OmegaConf.save(edited, saved)
    cfg = compose_cfg(["stage=eval", *base_overrides, f"eval.predictions=[{tmp_path / 'a'}]", "eval.radgraph=false"])
    run(cfg, run_dir=tmp_path / "eval")
    block = next(iter(json.loads((tmp_path / "eval" / "metrics.json").read_text()).values()))
    assert block["run"]["max_pixels"] == ran_with[0] and block["run"]["decoding"].startswith(
        f"max_new_tokens={ran_with[1]},"), block["run"]
    assert any(e.startswith("infer.max_new_tokens: 6 -> 512") for e in block["run"]["config_edited"])
    assert any("was edited after its infer run" in c for c in block["caveats"])
    assert "differs from the settings the run recorded as it ran" in caplog.text
