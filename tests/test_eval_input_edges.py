"""What users bring to stage=eval besides infer's own files: a sheet whose answers Excel turned into numbers,
blank predictions, ids with a stray space, a spreadsheet or JSON file of another format, an infer run whose split
was deleted, and runs.compare on a broken, failed or unfinished eval."""
import json
import zipfile

import pytest
from conftest import compose_cfg
from openpyxl import load_workbook

from flare_exp.runs_compare import comparison
from flare_exp.data.predictions import load_rows
from flare_exp.io import write_jsonl
from flare_exp.reports.sheets import write_sheet
from flare_exp.run.lifecycle import run_with_markers
from flare_exp.run.record import write_failed, write_run_metadata

REFERENCE = [{"id": f"boneresorption/{i}", "dataset": "boneresorption", "task_type": "regression",
              "answer": f"{60 + i}.0", "split": "val", "question": f"q{i}", "image_name": f"{i}.png"}
             for i in range(4)] + \
            [{"id": f"dental/{i}", "dataset": "dental", "task_type": "classification", "answer": "ABC"[i % 3],
              "split": "val", "question": f"d{i}", "image_name": f"d{i}.png"} for i in range(4)]


def _prepared(tmp_path, rows=REFERENCE, split="val"):
    write_jsonl(tmp_path / "prepared" / f"{split}.jsonl", rows)
    return str(tmp_path / "prepared")


def _predictions(folder, rows, name="predictions.jsonl"):
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / name, rows)
    return folder / name


def _answered(**changes):
    return [{**r, "prediction": r["answer"], **changes.get(r["id"], {})} for r in REFERENCE]


def _sheet(tmp_path, edit):
    path = tmp_path / "predictions.xlsx"
    write_sheet(path, _answered(), "my-run")
    workbook = load_workbook(path)
    edit(workbook["predictions"])
    workbook.save(path)
    return path


def test_answers_equal_as_numbers_are_the_same_answer_and_a_different_one_is_still_refused(tmp_path):
    """Excel's "Convert to Number" on the Answer column stores "60.0" as 60; a tool writes 61.0 for "61"."""
    prepared = _prepared(tmp_path)
    converted = _sheet(tmp_path, lambda s: [s.cell(row, 3, 60 + row - 2) for row in range(2, 6)])
    rows, _ = load_rows(converted, False, prepared)
    assert {r["id"]: r["answer"] for r in rows}["boneresorption/0"] == "60.0"  # the prepared answer is scored
    as_numbers = _answered(**{"boneresorption/1": {"answer": 61.0}, "boneresorption/2": {"answer": "62"}})
    assert len(load_rows(_predictions(tmp_path, as_numbers), False, prepared)[0]) == 8
    for other in (60.5, "60.01", "60 mm"):
        edited = _answered(**{"boneresorption/0": {"answer": other}})
        with pytest.raises(ValueError, match=r"1 answer\(s\) differ from the prepared split .*: boneresorption/0\."):
            load_rows(_predictions(tmp_path, edited), False, prepared)


def test_blank_and_whitespace_predictions_are_counted_as_empty(tmp_path):
    prepared = _prepared(tmp_path)
    blank = _answered(**{"dental/0": {"prediction": ""}, "dental/1": {"prediction": "  \n"},
                         "dental/2": {"prediction": None}})
    _, info = load_rows(_predictions(tmp_path, blank), False, prepared)
    assert info["empty_predictions"] == 3
    cleared = _sheet(tmp_path, lambda s: (s.__setitem__("D6", None), s.__setitem__("D7", " ")))
    _, info = load_rows(cleared, False, prepared)
    assert info["empty_predictions"] == 2
    _, info = load_rows(_predictions(tmp_path, _answered()), False, prepared)
    assert "empty_predictions" not in info


def test_ids_with_stray_whitespace_are_trimmed_but_still_count_as_duplicates(tmp_path):
    prepared = _prepared(tmp_path)
    spaced = _answered(**{"dental/0": {"id": " dental/0"}, "dental/1": {"id": "dental/1\t "}})
    rows, _ = load_rows(_predictions(tmp_path, spaced), False, prepared)
    assert {"dental/0", "dental/1"} <= {r["id"] for r in rows} and rows[4]["answer"] == "A"
    sheet = _sheet(tmp_path, lambda s: s.cell(2, 7, "  boneresorption/0 "))
    assert "boneresorption/0" in {r["id"] for r in load_rows(sheet, False, prepared)[0]}
    doubled = _answered() + [{**_answered()[5], "id": "dental/1 "}]
    with pytest.raises(ValueError, match=r"1 id\(s\) occur more than once \(2 rows, e.g. dental/1\)"):
        load_rows(_predictions(tmp_path, doubled), False, prepared)
    with pytest.raises(ValueError, match=r"row 2: no id"):
        load_rows(_predictions(tmp_path, [_answered()[0], {**_answered()[1], "id": "  "}]), False, prepared)


def _ods(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("mimetype", "application/vnd.oasis.opendocument.spreadsheet")
        z.writestr("content.xml", "<office:document-content/>")
    return path


@pytest.mark.parametrize("name, write, message", [
    ("p.xls", lambda p: p.write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00\xc7" * 300),
     r"p.xls: an old binary Excel workbook \(.xls\).* save it as .xlsx"),
    ("predictions.jsonl", lambda p: p.write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00\xc7" * 300),
     r"predictions.jsonl: an old binary Excel workbook \(.xls\).* save it as .xlsx"),
    ("p.ods", _ods, r"p.ods: an OpenDocument spreadsheet \(.ods\).* save it as .xlsx"),
    ("p.json", lambda p: p.write_text(json.dumps([{"id": "dental/0", "prediction": "A"}], indent=2)),
     r"p.json: a JSON array, not JSON Lines; eval reads .*one JSON object per line.*\.xlsx"),
    ("dental_predictions.json", lambda p: p.write_text(json.dumps(
        [{"TaskType": "classification", "Modality": "Xray", "ImageName": "0.png", "Question": "d0", "Answer": "A",
          "Split": "val"}], indent=4)),
     r"dental_predictions.json: a FLARE submission file \(a JSON array .*no ids\), not JSON Lines.*infer run"),
])
def test_a_file_of_another_format_is_named_with_what_to_do(tmp_path, name, write, message):
    prepared = _prepared(tmp_path)
    write(tmp_path / name)
    with pytest.raises(ValueError, match=message) as refused:
        load_rows(tmp_path / name, False, prepared)
    assert "\n" not in str(refused.value)


def _infer_run(tmp_path, split_dir):
    run_dir = tmp_path / "infer"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(json.dumps({"data": {"prepared_dir": str(split_dir)},
                                                     "infer": {"input_file": None, "split": "val"}}))
    return _predictions(run_dir, [{**r, "prediction": "B"} for r in REFERENCE])  # as infer writes them


def test_an_infer_runs_deleted_split_is_named_not_a_join_to_another_split(tmp_path):
    run_split = tmp_path / "theirs"
    _prepared(run_split)
    path = _infer_run(tmp_path, run_split / "prepared")
    (run_split / "prepared" / "val.jsonl").unlink()
    other = _prepared(tmp_path / "mine", [{**REFERENCE[0], "id": "other/0"}])  # data.prepared_dir: other ids
    gone = rf"its infer run's split {run_split}/prepared/val.jsonl \(infer/config.yaml\) is gone"
    with pytest.raises(ValueError, match=gone + r", and data.prepared_dir's .*mine/prepared/val.jsonl, tried instead, "
                                          r"does not match these predictions: prepare that split again"):
        load_rows(path, False, other)
    _, info = load_rows(path, False, str(tmp_path / "nothing"))  # no split at all: unchecked, and why
    assert info["answers_from"] == "the predictions file" and f"{run_split}/prepared/val.jsonl" in info["answers_note"]
    rows, info = load_rows(path, False, _prepared(tmp_path / "copy"))  # the same split elsewhere: joined to it
    assert info["answers_from"] == f"{tmp_path}/copy/prepared/val.jsonl" and rows[0]["answer"] == "60.0"


def _eval_run(run_dir, metrics: str | None, finish=True):
    """An eval run dir whose metrics.json holds ``metrics``; marked DONE when ``finish``."""
    write_run_metadata(run_dir, compose_cfg(["stage=eval"]))
    rows = [{"id": f"q{i}", "task_type": "multi_label", "dataset": "chestdr", "split": "val",
             "answer": "effusion", "prediction": "effusion"} for i in range(4)]
    block = {"file": str(_predictions(run_dir / "scored", rows)), "n": 4, "split": "val",
             "official": {"multi_label": {"f1_score": 1.0}}, "official_by_dataset": {}}
    (run_dir / "metrics.json").write_text(json.dumps({run_dir.name: block}) if metrics is None else metrics)
    if finish:
        run_with_markers(run_dir, lambda: {})


def test_compare_names_a_torn_metrics_file_a_failed_eval_and_warns_of_an_unfinished_one(tmp_path):
    root = tmp_path / "out"
    _eval_run(root / "runs" / "good", None)
    _eval_run(root / "runs" / "torn", '{"torn": {"n": 4, "offi')
    with pytest.raises(ValueError, match=r"runs.compare: \S+/torn/metrics.json is unreadable \(Unterminated string"):
        comparison(root, ["good", "torn"], resamples=20)
    failed = root / "runs" / "failed"
    write_run_metadata(failed, compose_cfg(["stage=eval"]))
    write_failed(failed, RuntimeError("GREEN judge ran out of memory"))
    with pytest.raises(FileNotFoundError, match=r"runs.compare: failed FAILED: RuntimeError: GREEN judge ran out"):
        comparison(root, ["good", "failed"], resamples=20)
    _eval_run(root / "runs" / "cut", None, finish=False)
    text = "\n".join(comparison(root, ["good", "cut"], resamples=20))
    assert f"warning: cut: its eval {root}/runs/cut is unfinished (no DONE marker): its metrics may be partial" in text
    assert "good: its eval" not in text


def test_a_split_joined_instead_of_an_infer_runs_deleted_one_is_said_in_the_log_and_the_report(tmp_path, caplog):
    """data.prepared_dir's split with the same ids is scored when the run's own split is gone; its answers and
    image window may not be what the run predicted on, so the report's caveats say it was used instead."""
    from flare_exp.reports.eval_report import caveat_lines

    run_split = tmp_path / "theirs"
    _prepared(run_split)
    path = _infer_run(tmp_path, run_split / "prepared")
    (run_split / "prepared" / "val.jsonl").unlink()
    fallback = f"{tmp_path}/copy/prepared/val.jsonl"
    _, info = load_rows(path, False, _prepared(tmp_path / "copy"))
    said = (f"its infer run's split {run_split}/prepared/val.jsonl (infer/config.yaml) is gone; joined to {fallback} "
            "(data.prepared_dir) instead")
    assert info["answers_from"] == fallback and said in info["answers_note"] and said in caplog.text
    assert any(said in line for line in caveat_lines({"infer": {**info, "official": {}, "by_task": {}}}, []))
    _, own = load_rows(_predictions(tmp_path / "plain", [{**r, "prediction": "B"} for r in REFERENCE]), False,
                       _prepared(tmp_path / "copy"))  # no infer run: the split its rows name, no note
    assert "answers_note" not in own


def test_a_sheet_of_answers_with_control_characters_is_infers_own_not_an_edit(tmp_path):
    """A prepared answer holding a character a worksheet cannot store (NUL, a vertical tab or form feed pasted
    from a PDF): infer's sheet holds it without, and eval takes that sheet as unedited, scoring the prepared
    answer; another answer is still refused."""
    reference = [{**r, "answer": "The heart\x00 is\x0b normal.", "task_type": "report_generation"}
                 if r["id"] == "dental/0" else r for r in REFERENCE]
    prepared = _prepared(tmp_path, reference)
    path = tmp_path / "predictions.xlsx"
    write_sheet(path, [{**r, "prediction": "x"} for r in reference], "my-run")
    rows, _ = load_rows(path, False, prepared)
    assert {r["id"]: r["answer"] for r in rows}["dental/0"] == "The heart\x00 is\x0b normal."
    workbook = load_workbook(path)
    workbook["predictions"]["C6"] = "The heart is abnormal."
    workbook.save(path)
    with pytest.raises(ValueError, match=r"1 answer\(s\) differ from the prepared split .*: dental/0\."):
        load_rows(path, False, prepared)


def test_merged_cells_in_an_edited_sheet_are_refused_naming_the_range(tmp_path):
    """Two equal predictions merged into one cell: the hidden cell would read as a blank prediction (MAE
    Infinity); refused, naming the range. A merge on another sheet does not matter."""
    prepared = _prepared(tmp_path)
    merged = _sheet(tmp_path, lambda s: s.merge_cells("D2:D3"))
    with pytest.raises(ValueError, match=r"sheet 'predictions'\): merged cells D2:D3: .* unmerge them"):
        load_rows(merged, False, prepared)
    workbook = load_workbook(merged)
    workbook["predictions"].unmerge_cells("D2:D3")
    workbook["predictions"]["D3"] = "61.0"
    workbook.create_sheet("notes").merge_cells("A1:B2")
    workbook.save(merged)
    rows, _ = load_rows(merged, False, prepared)
    assert len(rows) == 8


def test_a_null_multi_label_prediction_is_said_as_left_out_of_flares_f1(tmp_path):
    """FLARE's multi-label F1 leaves out a pair whose prediction is not text, while a blank text is no label:
    the caveat says which the official number did, not only "scored as empty"."""
    from flare_exp.metrics.official import multi_label_stats
    from flare_exp.reports.eval_report import caveat_lines

    reference = REFERENCE + [{"id": f"chestdr/{i}", "dataset": "chestdr", "task_type": "multi_label",
                              "answer": "Mass, Nodule", "split": "val", "question": f"c{i}", "image_name": f"c{i}.png"}
                             for i in range(2)]
    prepared = _prepared(tmp_path, reference)
    rows = [{**r, "prediction": r["answer"]} for r in reference]
    rows[-2]["prediction"], rows[-1]["prediction"] = None, ""
    _, info = load_rows(_predictions(tmp_path, rows), False, prepared)
    assert info["empty_predictions"] == 2 and info["null_multi_label_predictions"] == 1
    (line,) = [c for c in caveat_lines({"r": {**info, "official": {}, "by_task": {}}}, []) if "empty" in c]
    assert "2 empty" in line and "leaves out the 1 pair(s) whose prediction is null or a number" in line
    assert "every multi-label pair" not in line
    official = {"multi_label": {"f1_score": 0.0, "num_examples": 1}}  # every pair left out: an F1 over none
    (line,) = [c for c in caveat_lines({"r": {**info, "official": official, "by_task": {}}}, []) if "leaves" in c]
    assert "here that is every multi-label pair, so its f1_score of 0 is FLARE's value for no pairs" in line
    assert multi_label_stats([None, ""], ["Mass", "Mass"]).tolist() == [[0, 0, 0], [0, 0, 1]]


def test_a_standalone_predictions_file_with_a_torn_last_line_says_so_and_allow_partial_scores_the_rest(tmp_path):
    """A copy of a killed run's journal: the refusal says the last line is cut short and what scores the rest;
    with eval.allow_partial=true the complete lines are scored and the report says one was left out."""
    prepared = _prepared(tmp_path)
    path = _predictions(tmp_path / "copy", _answered())
    path.write_text(path.read_text()[:-25])  # cut inside the last line
    with pytest.raises(ValueError, match=r"It is the file's last line, cut short .* eval.allow_partial=true"):
        load_rows(path, False, prepared)
    rows, info = load_rows(path, True, prepared)
    assert len(rows) == len(REFERENCE) - 1 and "torn last line" in info["partial"]
    broken = _predictions(tmp_path / "mid", _answered())
    lines = broken.read_text().splitlines(keepends=True)
    broken.write_text("".join([lines[0], "garbage\n", *lines[1:]]))
    with pytest.raises(ValueError, match="not valid JSON"):  # a broken line inside the file: refused either way
        load_rows(broken, True, prepared)


def test_an_infer_runs_unreadable_config_is_said_before_eval_falls_back(tmp_path, caplog):
    """An infer run dir whose config.yaml was torn or edited: eval cannot know the split that run read, joins the
    rows to data.prepared_dir's split, and now says so (it did quietly)."""
    from flare_exp.data.references import run_split

    for text, why in ((":: not yaml [", "it names neither infer.input_file nor data.prepared_dir"),
                      ("a: [1, 2", "it cannot be read (")):
        (tmp_path / "config.yaml").write_text(text)
        assert run_split(tmp_path / "predictions.jsonl") is None
        assert f"eval: {tmp_path / 'config.yaml'}: {why}" in caplog.text
    assert "joined to data.prepared_dir's split their rows name" in caplog.text


def _trial_run(run_dir, own_f1_rows: int):
    """A pipeline run (an Optuna trial) whose eval scored stage.compare's base beside its own infer step."""
    write_run_metadata(run_dir, compose_cfg(["stage=eval"]))
    rows = lambda hits: [{"id": f"q{i}", "task_type": "multi_label", "dataset": "chestdr", "split": "val",  # noqa
                          "answer": "effusion", "prediction": "effusion" if i < hits else "edema"} for i in range(4)]
    blocks = {label: {"file": str(_predictions(run_dir / step, rows(hits))), "n": 4, "split": "val",
                      "official": {"multi_label": {"f1_score": hits / 4}}, "official_by_dataset": {}}
              for label, step, hits in (("base", "infer-base", 0), (f"{run_dir.name}/rl", "infer", own_f1_rows))}
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "metrics.json").write_text(json.dumps(blocks))
    run_with_markers(run_dir / "eval", lambda: {})


def test_compare_of_two_pipelines_compares_their_own_models_not_the_base_each_scored(tmp_path):
    """runs.compare=[t1,t2] of two trials compared every block of each (their base too): four columns and six
    tests where the one question is t1 against t2 (Holm's family grew with the models nobody asked about)."""
    root = tmp_path / "out"
    _trial_run(root / "runs" / "t1", 2)
    _trial_run(root / "runs" / "t2", 4)
    text = "\n".join(comparison(root, ["t1", "t2"], resamples=20))
    assert "base" not in text and "t1:" not in text, text
    header = next(line for line in text.splitlines() if line.startswith("|"))
    assert "t1" in header and "t2" in header


def test_a_dataset_holding_two_task_types_is_scored_per_task_whatever_the_rows_order(base_overrides, tmp_path):
    """Prepare keeps a record whose TaskType differs from its dataset's: eval scored the whole dataset by the rule
    of its first row's task (balanced accuracy over label strings 0.625, or in reverse order F1 0.8). Each task's
    rows of it are now a block of their own, the same in any order; the runs listing's recomputation agrees."""
    from flare_exp.main import run
    from flare_exp.runs_compare import disagreeing_value

    rows = [{"id": "chestdr/c0", "dataset": "chestdr", "task_type": "classification", "split": "val",
             "answer": "A", "prediction": "A", "model": "m"}] + [
        {"id": f"chestdr/m{i}", "dataset": "chestdr", "task_type": "multi_label", "split": "val",
         "answer": "Effusion, Cardiomegaly", "prediction": "Effusion" if i else "Effusion, Cardiomegaly",
         "model": "m"} for i in range(4)]
    blocks = []
    for name, order in (("forward", rows), ("reverse", rows[::-1])):
        path = _predictions(tmp_path / name, order)
        run(compose_cfg(["stage=eval", *base_overrides, f"eval.predictions=[{path}]", "eval.radgraph=false",
                         f"data.prepared_dir={tmp_path / 'hand_made'}"]), run_dir=tmp_path / f"eval-{name}")
        block = json.loads((tmp_path / f"eval-{name}" / "metrics.json").read_text())["m"]
        assert disagreeing_value(block, load_rows(path, True)[0]) is None
        blocks.append((block["official_by_dataset"], block["by_dataset"]))
    assert blocks[0][0] == blocks[1][0]  # the variants too, to the sums' rounding
    assert blocks[0][1]["chestdr (multi_label)"]["dataset_aware_f1_example"] == pytest.approx(
        blocks[1][1]["chestdr (multi_label)"]["dataset_aware_f1_example"])
    official_blocks, variants = blocks[0]
    assert official_blocks["chestdr (classification)"]["balanced_accuracy"] == 1.0
    assert official_blocks["chestdr (multi_label)"]["f1_score"] == pytest.approx(10 / 13)  # 5 of 8 labels, 8 true
    assert variants["chestdr (multi_label)"]["task_type"] == "multi_label" and "chestdr" not in official_blocks


def test_two_report_datasets_get_their_own_text_metrics(base_overrides, tmp_path):
    """by_dataset's report variants were the whole task's for every report dataset: each now has its own rows'."""
    from flare_exp.main import run

    rows = [{"id": f"{d}/{i}", "dataset": d, "task_type": "report_generation", "split": "val", "model": "m",
             "answer": "the heart is normal in size", "prediction": p}
            for d, p in (("IU_XRay", "the heart is normal in size"), ("other", "no acute disease"))
            for i in range(2)]
    path = _predictions(tmp_path / "p", rows)
    run(compose_cfg(["stage=eval", *base_overrides, f"eval.predictions=[{path}]", "eval.radgraph=false",
                     f"data.prepared_dir={tmp_path / 'hand_made'}"]), run_dir=tmp_path / "eval")
    block = json.loads((tmp_path / "eval" / "metrics.json").read_text())["m"]
    per_dataset = block["by_dataset"]
    assert per_dataset["IU_XRay"]["rouge_l"] == pytest.approx(1.0) and per_dataset["other"]["rouge_l"] == 0
    assert per_dataset["IU_XRay"]["n"] == 2 and 0 < block["by_task"]["report_generation"]["rouge_l"] < 1
    assert (tmp_path / "eval" / "report.html").exists()


def test_a_prediction_integer_too_large_for_a_float_is_flares_infinity_not_an_abort(base_overrides, tmp_path):
    """check_fields turned a JSON number into its text, and float() reads a 400-digit integer's text as inf (an
    abort), while FLARE's float() of the integer raises OverflowError: infinity, as docs/metrics.md says."""
    from flare_exp.main import run

    rows = [{"id": f"boneresorption/{i}", "dataset": "boneresorption", "task_type": "regression", "split": "val",
             "answer": "5", "prediction": p, "model": "m"} for i, p in enumerate([10 ** 400, "3", "4"])]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run(compose_cfg(["stage=eval", *base_overrides, f"eval.predictions=[{path}]", "eval.radgraph=false",
                     f"data.prepared_dir={tmp_path / 'hand_made'}"]), run_dir=tmp_path / "eval")
    official = json.loads((tmp_path / "eval" / "metrics.json").read_text())["m"]["official"]["regression"]
    assert official["mean_absolute_error"] == "Infinity" and not official.get("aborted")


def test_where_prepare_normalised_what_flares_evaluator_reads_otherwise_both_numbers_are_said(base_overrides,
                                                                                              tmp_path):
    """A list answer (joined by prepare; FLARE leaves its pair out) and a TaskType FLARE does not spell its way
    ("Multilabel Classification": no number there) were scored silently as FLARE's number. The official block
    keeps eval's reading; a caveat gives the number FLARE's evaluator gives on the question file as it is."""
    from test_prepare import _prepare, _small_tree

    from flare_exp.main import run

    root = tmp_path / "raw"
    good = {"TaskType": "Multi-label Classification", "Modality": "Xray", "ImageName": "imagesTr/a.png",
            "Split": "train"}
    _small_tree(root, [{**good, "Question": "q0", "Answer": ["Effusion", "Mass"]},
                       {**good, "Question": "q1", "Answer": "Effusion"},
                       {**good, "Question": "q2", "Answer": "Mass", "TaskType": "Multilabel Classification"}])
    prepared = _prepare(tmp_path, root, "data.datasets=[chestdr]")
    records = [json.loads(line) for line in (prepared / "train.jsonl").read_text().splitlines()]
    assert {r["question"]: r.get("raw_answer") for r in records} == {"q0": ["Effusion", "Mass"], "q1": None,
                                                                       "q2": None}
    path = _predictions(tmp_path / "p", [{"id": r["id"], "prediction": "Effusion", "model": "m"} for r in records])
    run(compose_cfg(["stage=eval", *base_overrides, f"eval.predictions=[{path}]", "eval.radgraph=false",
                     f"data.prepared_dir={prepared}"]), run_dir=tmp_path / "eval")
    block = json.loads((tmp_path / "eval" / "metrics.json").read_text())["m"]
    assert block["official"]["multi_label"]["f1_score"] == pytest.approx(4 / 7)  # eval's reading: every row
    caveat, = block["caveats"]
    assert caveat.startswith("multi-label classification: f1_score 1.0000 by FLARE's evaluator on the question "
                             "file as it is, 0.5714 here")
    assert "1 row(s) of TaskType 'Multilabel Classification'" in caveat and "1 answer(s) given as a list" in caveat
    assert "f1_score 1.0000 by FLARE's evaluator" in (tmp_path / "eval" / "report.md").read_text()
    from flare_exp.metrics.flare_reading import flare_reading_caveats

    rows = [{"prediction": "a, b", "answer": "a, b, c", "raw_task_type": "Multi-label Classification"},
            {"prediction": "a, b", "answer": "a, b, c", "raw_answer": "a, b, c", "raw_task_type": "Multilabel"}]
    rows = [{**r, "task_type": "multi_label"} for r in rows]
    assert flare_reading_caveats({"multi_label": rows}) == []  # 0.8 both ways: no difference to say
    # a row FLARE puts in another task's group (a later record's TaskType): that group's number is said too
    moved = [{"task_type": "classification", "prediction": "K", "answer": "E", "raw_task_type": "Regression",
              "raw_answer": "n/a"}, {"task_type": "classification", "prediction": "E", "answer": "E",
                                     "raw_task_type": "Classification"}]
    regression = [{"task_type": "regression", "prediction": "5", "answer": "5", "raw_task_type": "Regression"}]
    lines = flare_reading_caveats({"classification": moved, "regression": regression})
    assert any(line.startswith("regression: mean_absolute_error Infinity by FLARE's evaluator") and
               "1 row(s) of TaskType 'Regression', which it scores as regression" in line for line in lines), lines
    assert any(line.startswith("classification: balanced_accuracy 1.0000 by FLARE") for line in lines), lines
    # TaskType texts FLARE scores by one rule are still groups of their own, a number each (its evaluator groups
    # by the text): "Counting" beside "Regression", "report" beside "Report_Generation"
    counted = [{"task_type": "regression", "prediction": p, "answer": "5", "raw_task_type": t}
               for p, t in (("5", "Regression"), ("7", "regression "), ("5", "Counting"), ("6", "Counting"))]
    line, = flare_reading_caveats({"regression": counted})
    assert line.startswith("regression: mean_absolute_error 0.5000 for 'counting' (2 rows), 1.0000 for 'regression' "
                           "(2 rows) by FLARE's evaluator on the question file as it is, 0.7500 here"), line
    assert "2 row(s) of TaskType 'Counting', which it does not score as regression" not in line
    assert line.endswith("it scores them in 2 groups by their TaskType's text, a number each, where eval pools them")
    reports = [{"task_type": "report_generation", "prediction": "x", "answer": "y", "raw_task_type": t}
               for t in ("Report_Generation", "report", "Report Generation")]
    line, = flare_reading_caveats({"report_generation": reports})
    assert line.startswith("report_generation: FLARE's evaluator, reading the question file as it is, scores 2 of "
                           "these 3 rows: 1 row(s) of TaskType 'Report Generation', which it does not score"), line
    assert "in 2 groups" in line
    same = [{**r, "raw_task_type": "Regression"} for r in counted]  # one group, the same rows: nothing to say
    assert flare_reading_caveats({"regression": same}) == []


def test_json_number_predictions_are_read_as_flares_evaluator_reads_them(base_overrides, tmp_path):
    """check_fields turned 5 and 3.0 into "5" and "3.0": multi-label scored them as labels (0.5455) where FLARE's
    evaluator leaves a pair whose prediction is no text out (1.0), and a number was called an empty prediction.
    Numbers stay numbers for the official rules; our variants score their text."""
    from flare_exp.main import run

    rows = [{"id": f"chestdr/{i}", "dataset": "chestdr", "task_type": "multi_label", "split": "val", "model": "m",
             "answer": "Effusion", "prediction": p} for i, p in enumerate(["Effusion", 5, 3.0])] + [
        {"id": f"boneresorption/{i}", "dataset": "boneresorption", "task_type": "regression", "split": "val",
         "model": "m", "answer": "20", "prediction": p} for i, p in enumerate([20.0, 22])]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run(compose_cfg(["stage=eval", *base_overrides, f"eval.predictions=[{path}]", "eval.radgraph=false",
                     f"data.prepared_dir={tmp_path / 'hand_made'}"]), run_dir=tmp_path / "eval")
    block = json.loads((tmp_path / "eval" / "metrics.json").read_text())["m"]
    assert block["official"]["multi_label"]["f1_score"] == 1.0  # the two number pairs left out, as FLARE does
    assert block["official"]["regression"]["mean_absolute_error"] == 1.0  # float(20.0), float(22)
    assert block["by_task"]["regression"]["mae_parseable"] == 1.0 and "empty_predictions" not in block
    assert block["null_multi_label_predictions"] == 2


def test_questions_of_two_datasets_sharing_imagename_and_question_are_said(base_overrides, tmp_path, caplog):
    """FLARE's evaluator keys every dataset's ground truth of a split by ImageName||Question alone: two datasets'
    questions of one key are one question there (it scores one), while eval scores each. prepare says so and
    counts them; eval's report says it beside the numbers."""
    from test_prepare import GOOD, _prepare, _small_tree

    from flare_exp.main import run

    root = tmp_path / "raw"
    _small_tree(root, [GOOD, {**GOOD, "Question": "Other?"}])
    _small_tree(root, [{**GOOD, "Answer": "Caries"}], dataset="periapical")
    caplog.set_level("WARNING", logger="flare_exp.data.later_answers")
    prepared = _prepare(tmp_path, root, "data.datasets=[chestdr,periapical]")
    assert json.loads((prepared / "summary.json").read_text())["questions_sharing_a_flare_key"] == 2
    assert "2 question(s) share their ImageName||Question with another dataset's question of the same FLARE " \
           "split, e.g. chestdr/training/" in caplog.text
    records = [json.loads(line) for line in (prepared / "train.jsonl").read_text().splitlines()]
    path = _predictions(tmp_path / "p", [{"id": r["id"], "prediction": "Mass", "model": "m"} for r in records])
    run(compose_cfg(["stage=eval", *base_overrides, f"eval.predictions=[{path}]", "eval.radgraph=false",
                     f"data.prepared_dir={prepared}"]), run_dir=tmp_path / "eval")
    caveats = json.loads((tmp_path / "eval" / "metrics.json").read_text())["m"]["caveats"]
    assert any(c.startswith("2 row(s) share their ImageName||Question with another dataset's row (e.g. "
                            "chestdr/training/") for c in caveats), caveats
    from flare_exp.data.records import keys_shared_across_datasets

    assert keys_shared_across_datasets(["a/x", "b/x", "chestdr/val/0123456789abcdef", None]) == []
