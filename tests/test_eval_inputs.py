"""Eval scores against the prepared split: predictions joined to it by id, unknown ids and changed answers
refused (named); without a known split the report says the answers came from the predictions file; a byte
that is not UTF-8 names the file and line."""
import json

import pytest

from conftest import compose_cfg
from flare_exp.io import write_jsonl
from flare_exp.main import run
from flare_exp.data.predictions import load_rows

REFERENCE = [{"id": f"dental/{i}", "dataset": "dental", "task_type": "classification", "answer": "ABC"[i % 3],
              "split": "val", "question": f"q{i}", "image_name": f"{i}.png"} for i in range(8)]


def _predictions(folder, rows):
    write_jsonl(folder / "predictions.jsonl", rows)
    return folder / "predictions.jsonl"


def _prepared(tmp_path):
    write_jsonl(tmp_path / "prepared" / "val.jsonl", REFERENCE)
    return str(tmp_path / "prepared")


def test_unknown_ids_and_changed_answers_are_refused_by_name(tmp_path):
    prepared = _prepared(tmp_path)
    foreign = [{**r, "prediction": "A"} for r in REFERENCE[:2]] + \
        [{**REFERENCE[0], "id": f"dental/x{i}", "prediction": "A"} for i in range(7)]
    with pytest.raises(ValueError, match=r"7 prediction id\(s\) are not in the prepared split .*val.jsonl: "
                                         r"dental/x0, dental/x1, dental/x2, dental/x3, dental/x4 and 2 more"):
        load_rows(_predictions(tmp_path, foreign), False, prepared)
    edited = [{**r, "prediction": "A", "answer": "A"} for r in REFERENCE]
    with pytest.raises(ValueError, match=r"5 answer\(s\) differ from the prepared split .*: dental/1, dental/2, "
                                         r"dental/4, dental/5, dental/7\."):
        load_rows(_predictions(tmp_path, edited), False, prepared)


def test_rows_of_several_splits_in_one_file_are_refused(tmp_path):
    """One train row in a val file made the split unknown: the answers went unchecked (edited ones scored) and a
    train question counted in the val numbers. Prepared dir or not, it is refused, naming a stray row."""
    prepared = _prepared(tmp_path)
    edited = [{**r, "prediction": "A", "answer": "A"} for r in REFERENCE]
    mixed = edited + [{**REFERENCE[0], "id": "dental/training/t0", "split": "train", "prediction": "B"}]
    with pytest.raises(ValueError, match=r"1 prediction id\(s\) are not in the prepared split .*val.jsonl: "
                                         r"dental/training/t0"):
        load_rows(_predictions(tmp_path, mixed), False, prepared)
    with pytest.raises(ValueError, match=r"its rows name several splits \(val: 8, train: 1\), e.g. "
                                         r"dental/training/t0 \(train\): eval scores one split at a time"):
        load_rows(_predictions(tmp_path, mixed), False, None)  # no prepared split to check them against
    # a row whose split is null, or the split spelt otherwise, beside the named ones: joined to the split holding
    # their ids, so the edited answers are refused (it had left every answer unchecked) and a stray id named
    for odd in (None, "VAL", "validation", "", 1):
        relabelled = [dict(r) for r in edited]
        relabelled[0]["split"] = odd
        with pytest.raises(ValueError, match=r"answer\(s\) differ from the prepared split .*val.jsonl"):
            load_rows(_predictions(tmp_path, relabelled), False, prepared)
    stray = [{**r, "prediction": "A"} for r in REFERENCE] + [
        {**REFERENCE[0], "id": "dental/training/t0", "split": None, "prediction": "B"}]
    with pytest.raises(ValueError, match=r"1 prediction id\(s\) are not in the prepared split .*val.jsonl: "
                                         r"dental/training/t0"):
        load_rows(_predictions(tmp_path, stray), False, prepared)
    rows, info = load_rows(_predictions(tmp_path, [{**r, "prediction": "A", "split": "VAL"} for r in REFERENCE]),
                           False, prepared)
    assert info["answers_from"].endswith("val.jsonl") and {r["split"] for r in rows} == {"val"}


def test_answers_come_from_the_prepared_split_the_infer_run_read(tmp_path):
    prepared = _prepared(tmp_path)
    run_dir = tmp_path / "infer"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(json.dumps({"infer": {"input_file": f"{prepared}/val.jsonl",
                                                               "split": "val"}}))
    bare = [{"id": r["id"], "prediction": "B"} for r in REFERENCE[:3]]  # a hand-made file: ids and predictions
    rows, info = load_rows(_predictions(run_dir, bare), False, prepared_dir=None)
    assert [r["answer"] for r in rows] == ["A", "B", "C"] and rows[0]["task_type"] == "classification"
    assert info["answers_from"] == f"{prepared}/val.jsonl" and "answers_note" not in info
    assert info["coverage"].startswith(f"5 of the 8 questions of {prepared}/val.jsonl have no prediction: the "
                                       "numbers cover the 3 answered")
    _, whole = load_rows(_predictions(run_dir, [{"id": r["id"], "prediction": "B"} for r in REFERENCE]), False)
    assert "coverage" not in whole


def test_without_a_prepared_split_the_report_says_where_the_answers_came_from(base_overrides, tmp_path):
    rows = [{**r, "prediction": "A", "model": "m"} for r in REFERENCE]
    preds = _predictions(tmp_path, rows)
    _, info = load_rows(preds, False, str(tmp_path / "nothing"))
    assert info["answers_from"] == "the predictions file"
    run(compose_cfg(["stage=eval", *base_overrides, f"eval.predictions=[{preds}]", "eval.radgraph=false",
                     f"data.prepared_dir={tmp_path / 'nothing'}"]), run_dir=tmp_path / "eval")
    assert "answers taken from the predictions file, unchecked" in (tmp_path / "eval" / "report.md").read_text()


def test_a_byte_that_is_not_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_bytes(json.dumps(REFERENCE[0]).encode() + b"\n" + b'{"id": "d/1", "prediction": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"predictions.jsonl:2: not UTF-8 \(byte 0xe9"):
        load_rows(path, False)


def test_a_finished_infer_runs_file_cut_at_a_line_boundary_is_refused(tmp_path):
    """Six of eight rows left (a partial copy): every row is valid JSON, so only the infer run's own record of
    what it wrote can tell; scoring the six would silently report a subset."""
    prepared = _prepared(tmp_path)
    run_dir = tmp_path / "infer"
    run_dir.mkdir()
    (run_dir / "DONE").write_text("")
    (run_dir / "infer_summary.json").write_text(json.dumps({"samples": 8}))
    path = _predictions(run_dir, [{**r, "prediction": "A"} for r in REFERENCE[:6]])
    with pytest.raises(ValueError, match=r"holds 6 predictions but its infer run wrote 8 \(infer_summary.json\)"):
        load_rows(path, False, prepared)
    rows, _ = load_rows(path, True, prepared)  # eval.allow_partial=true: the rows that are there
    assert len(rows) == 6
    _predictions(run_dir, [{**r, "prediction": "A"} for r in REFERENCE])
    assert len(load_rows(path, False, prepared)[0]) == 8


def test_the_same_predictions_named_twice_are_refused_before_any_work(base_overrides, tmp_path):
    """eval.predictions=[run, run/predictions.jsonl]: one run compared with itself is refused at the checks,
    naming both entries; two different files pass."""
    from flare_exp.checks import setting_problems

    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        folder.mkdir()
        _predictions(folder, [{**r, "prediction": "A"} for r in REFERENCE])
    twice = compose_cfg(["stage=eval", *base_overrides, f"eval.predictions=[{first},{first}/predictions.jsonl]"])
    problems = setting_problems(twice)
    assert len(problems) == 1 and "eval.predictions lists" in str(problems[0]) and "twice" in str(problems[0])
    assert f"'{first}/predictions.jsonl'" in str(problems[0])
    with pytest.raises(ValueError, match="twice"):
        run(twice, run_dir=tmp_path / "eval")
    assert not (tmp_path / "eval" / "metrics.json").exists()
    assert setting_problems(compose_cfg(["stage=eval", *base_overrides, f"eval.predictions=[{first},{second}]"])) == []


def test_numbers_missing_fields_and_a_killed_runs_torn_line(tmp_path):
    """A number written as a JSON number stays a number, as FLARE's evaluator reads it (no empty answer); a file whose rows have
    no 'prediction' field, or a row without an id, is refused by name; a killed infer run's torn last line is
    left out under eval.allow_partial and said, the file untouched."""
    prepared = _prepared(tmp_path)
    numeric = [{**r, "task_type": "regression", "answer": "3", "prediction": 3.0} for r in REFERENCE]
    write_jsonl(tmp_path / "prepared" / "val.jsonl", [{**r, "task_type": "regression", "answer": "3"}
                                                      for r in REFERENCE])
    rows, info = load_rows(_predictions(tmp_path, numeric), False, prepared)
    assert {r["prediction"] for r in rows} == {3.0} and "empty_predictions" not in info
    renamed = [{"id": r["id"], "Prediction": "A"} for r in REFERENCE]
    with pytest.raises(ValueError, match=r"no row has a 'prediction' field \(the first row's fields: 'id', "
                                         r"'Prediction'\)"):
        load_rows(_predictions(tmp_path, renamed), False, prepared)
    for odd, named in ((["Effusion", "Mass"], r"list \["), ({"a": 1}, "dict"), (True, "bool")):
        rows = [{"id": "dental/0", "prediction": "A"}, {"id": "dental/1", "prediction": odd}]
        with pytest.raises(ValueError, match=rf"row 2 \(id dental/1\): the prediction is {named}.*, not text"):
            load_rows(_predictions(tmp_path, rows), False, prepared)
    with pytest.raises(ValueError, match=r"row 3: no id"):
        load_rows(_predictions(tmp_path, [{"id": "dental/0", "prediction": "A"}, {"id": "dental/1", "prediction":
                                          "B"}, {"prediction": "C"}]), False, prepared)
    run_dir = tmp_path / "killed"
    run_dir.mkdir()
    (run_dir / "run_info.json").write_text("{}")  # an infer run without DONE
    path = _predictions(run_dir, [{**r, "task_type": "regression", "prediction": "3", "answer": "3"}
                                  for r in REFERENCE[:3]])
    whole = path.read_text()
    path.write_text(whole + '{"id": "dental/3", "predic')
    with pytest.raises(ValueError, match="unfinished infer run"):
        load_rows(path, False, prepared)
    rows, info = load_rows(path, True, prepared)
    assert len(rows) == 3 and "torn last line" in info["partial"]
    assert path.read_text() == whole + '{"id": "dental/3", "predic'


def test_a_finished_runs_cut_predictions_file_says_what_to_do(tmp_path):
    """A DONE infer run's predictions.jsonl cut mid-line (copied half, edited): the line, and what to do."""
    prepared = _prepared(tmp_path)
    run_dir = tmp_path / "done"
    run_dir.mkdir()
    (run_dir / "DONE").write_text("{}")
    path = _predictions(run_dir, [{**r, "prediction": "3"} for r in REFERENCE[:3]])
    path.write_text(path.read_text() + '{"id": "dental/3", "predic')
    with pytest.raises(ValueError, match=r"predictions.jsonl:4: .*the file was cut or edited since: copy it again"):
        load_rows(path, True, prepared)


def test_a_doubled_id_is_named_as_such_even_when_its_answers_differ(tmp_path):
    prepared = _prepared(tmp_path)
    rows = [{**r, "prediction": "A"} for r in REFERENCE[:3]]
    rows.append({**rows[0], "answer": "something else"})  # the same question twice, its answer edited once
    with pytest.raises(ValueError, match=r"1 id\(s\) occur more than once \(2 rows, e.g. "):
        load_rows(_predictions(tmp_path, rows), False, prepared)


def test_a_finished_runs_doubled_row_is_named_not_sent_to_allow_partial(tmp_path):
    """A row pasted twice into a finished run's file: the count differs from the summary, but the hint is the
    doubled id (eval.allow_partial would only be refused next on the same row)."""
    prepared = _prepared(tmp_path)
    run_dir = tmp_path / "done"
    run_dir.mkdir()
    (run_dir / "DONE").write_text("{}")
    (run_dir / "infer_summary.json").write_text(json.dumps({"samples": 3}))
    rows = [{**r, "prediction": "A"} for r in REFERENCE[:3]]
    path = _predictions(run_dir, rows + rows[:1])
    for partial in (False, True):
        with pytest.raises(ValueError, match=r"occur more than once") as caught:
            load_rows(path, partial, prepared)
        assert "allow_partial" not in str(caught.value)


def test_a_byte_order_mark_is_read_past_and_a_csv_is_named(tmp_path):
    """Windows editors open a file with a byte-order mark: the JSONL still reads. A .csv export is named with
    what eval reads instead of failing as 'not valid JSON'."""
    prepared = _prepared(tmp_path)
    path = _predictions(tmp_path, [{**r, "prediction": r["answer"]} for r in REFERENCE])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    rows, _ = load_rows(path, False, prepared)
    assert len(rows) == 8 and rows[0]["id"] == "dental/0"
    (tmp_path / "p.csv").write_text("id,prediction\ndental/0,A\n")
    with pytest.raises(ValueError, match=r"p.csv: eval reads predictions as JSONL .* save this table as .xlsx"):
        load_rows(tmp_path / "p.csv", False, prepared)


def test_a_question_file_with_a_byte_order_mark_is_prepared(tmp_path):
    from test_prepare import GOOD, _prepare, _small_tree

    from flare_exp.io import read_jsonl

    root = tmp_path / "raw"
    _small_tree(root, [GOOD])
    question_file = root / "training" / "Xray" / "chestdr" / "chestdr_questions_train.json"
    question_file.write_bytes(b"\xef\xbb\xbf" + question_file.read_bytes())
    assert len(read_jsonl(_prepare(tmp_path, root, "data.datasets=[chestdr]") / "train.jsonl")) == 1


def test_an_id_with_a_stray_space_is_read_as_the_id_and_a_typo_is_named(tmp_path):
    prepared = _prepared(tmp_path)
    rows = [{**r, "prediction": "A"} for r in REFERENCE]
    rows[3]["id"] = "dental/3 "  # a space typed after it in a sheet
    assert [r["id"] for r in load_rows(_predictions(tmp_path, rows), False, prepared)[0]][3] == "dental/3"
    rows[3]["id"] = "dental/e "
    with pytest.raises(ValueError, match=r"not in the prepared split .*: dental/e\. "):
        load_rows(_predictions(tmp_path, rows), False, prepared)


def test_no_report_no_scorer_caveat(base_overrides, tmp_path):
    """The tiny RadGraph's caveat is about reports: a file without any has none."""
    from flare_exp.fixtures.tiny_radgraph import build_tiny_radgraph
    from flare_exp.runtime import abspath

    prepared = _prepared(tmp_path)
    path = _predictions(tmp_path, [{**r, "prediction": r["answer"]} for r in REFERENCE])
    cfg = compose_cfg(["stage=eval", *base_overrides, f"eval.predictions=[{path}]", f"data.prepared_dir={prepared}"])
    build_tiny_radgraph(abspath(cfg.reward.radgraph.model_dir))  # configured and random, as the demo's
    run(cfg, run_dir=tmp_path / "eval")
    (entry,) = json.loads((tmp_path / "eval" / "metrics.json").read_text()).values()
    assert list(entry["by_task"]) == ["classification"] and not any("RadGraph" in c for c in entry["caveats"])


def test_rows_of_two_models_in_one_file_are_refused(tmp_path):
    """Two infer runs' files joined into one: each row names its model (and adapter), and eval scored them as one
    model under the first one's name. Refused, naming a row of the other; rows without the fields pass."""
    prepared = _prepared(tmp_path)
    rows = [{**r, "prediction": "A", "model": "runs/rl", "adapter": {"path": "/a"}} for r in REFERENCE]
    for row in rows[5:7]:
        row["model"], row["adapter"] = "base", None
    with pytest.raises(ValueError, match=r"its rows come from 2 models \(model/adapter fields\), e.g. 2 row\(s\) "
                                         r"like dental/5 with model 'base', adapter None beside rows with model "
                                         r"'runs/rl', adapter \{'path': '/a'\}: eval scores one model per file"):
        load_rows(_predictions(tmp_path, rows), False, prepared)
    for row in rows[5:7]:  # rows without the fields beside named ones: as mixed
        del row["model"], row["adapter"]
    with pytest.raises(ValueError, match=r"like dental/5 with no model fields beside rows with model 'runs/rl'"):
        load_rows(_predictions(tmp_path, rows), False, prepared)
    one = [{**r, "prediction": "A", "model": "runs/rl"} for r in REFERENCE]
    assert len(load_rows(_predictions(tmp_path, one), False, prepared)[0]) == 8
    bare = [{**r, "prediction": "A"} for r in REFERENCE]
    assert len(load_rows(_predictions(tmp_path, bare), False, prepared)[0]) == 8


def test_predictions_of_the_test_split_are_refused_before_the_scorers_load(tmp_path):
    """They were refused only after RadGraph (and a judge) had loaded: "predictions have no ground truth"."""
    from flare_exp.stages.evaluate import check_settings

    run_dir = tmp_path / "infer-test"
    rows = [{**r, "split": "test", "answer": None, "prediction": "A"} for r in REFERENCE]
    _predictions(run_dir, rows)
    with pytest.raises(ValueError, match=r"holds predictions of the test split, which has no answers to score here"):
        check_settings(compose_cfg(["stage=eval", f"eval.predictions=[{run_dir}]"]))
    _predictions(run_dir, [{**r, "prediction": "A"} for r in REFERENCE])
    check_settings(compose_cfg(["stage=eval", f"eval.predictions=[{run_dir}]"]))  # a val split's: scored
