"""eval.predictions may name a worksheet (infer's predictions.xlsx, edited by hand): read as it is now, joined to
the prepared split like a predictions.jsonl; what Excel did to typed text is read back as text where it can be
(numbers) and refused, naming the cell, where it cannot (dates, booleans, formulas)."""
import datetime
import json
import shutil

import pytest
from openpyxl import load_workbook

from conftest import compose_cfg
from flare_exp.data.predictions import load_rows
from flare_exp.io import write_jsonl
from flare_exp.main import run
from flare_exp.reports.sheets import write_sheet

REFERENCE = [{"id": f"boneresorption/{i}", "dataset": "boneresorption", "task_type": "regression",
              "answer": str(10 + i), "split": "val", "question": f"q{i}", "image_name": f"{i}.png"}
             for i in range(6)] + \
            [{"id": f"dental/{i}", "dataset": "dental", "task_type": "classification", "answer": "ABC"[i % 3],
              "split": "val", "question": f"d{i}", "image_name": f"d{i}.png"} for i in range(6)]
PREDICTED = {**{f"boneresorption/{i}": str(10 + i + (i % 2)) for i in range(6)},
             **{f"dental/{i}": "ABCA"[i % 4] for i in range(6)}}


def _prepared(tmp_path):
    write_jsonl(tmp_path / "prepared" / "val.jsonl", REFERENCE)
    write_jsonl(tmp_path / "prepared" / "train.jsonl", [{**REFERENCE[0], "id": "other/0", "split": "train"}])
    return str(tmp_path / "prepared")


def _sheet(tmp_path, name="predictions.xlsx"):
    rows = [{**r, "prediction": PREDICTED[r["id"]]} for r in REFERENCE]
    write_jsonl(tmp_path / "predictions.jsonl", rows)
    write_sheet(tmp_path / name, rows, "my-run")
    return tmp_path / name


def _edit(path, edit):
    workbook = load_workbook(path)
    edit(workbook["predictions"])
    workbook.save(path)
    return path


def test_a_sheet_reads_as_its_jsonl_and_scores_the_same(base_overrides, tmp_path):
    prepared = _prepared(tmp_path)
    sheet = _sheet(tmp_path)
    from_sheet, info = load_rows(sheet, False, prepared)
    from_jsonl, _ = load_rows(tmp_path / "predictions.jsonl", False, prepared)
    pick = lambda rows: [(r["id"], r["prediction"], r["answer"], r["task_type"]) for r in rows]  # noqa: E731
    assert pick(from_sheet) == pick(from_jsonl) and from_sheet[0]["model"] == "my-run"
    assert info["answers_from"].endswith("prepared/val.jsonl") and "worksheet predictions.xlsx" in info["sheet_note"]
    metrics = {}
    for name, entry in (("sheet", sheet), ("jsonl", tmp_path / "predictions.jsonl")):
        run(compose_cfg(["stage=eval", *base_overrides, f"eval.predictions=[{entry}]",
                         f"data.prepared_dir={prepared}", f"run_name=e-{name}"]), run_dir=tmp_path / name)
        metrics[name] = next(iter(json.loads((tmp_path / name / "metrics.json").read_text()).values()))
    assert metrics["sheet"]["official"] == metrics["jsonl"]["official"]
    assert metrics["sheet"]["split"] == metrics["jsonl"]["split"] == "val"  # runs.compare: one split, no warning
    assert metrics["sheet"]["official"]["regression"]["mean_absolute_error"] == 0.5
    assert (tmp_path / "sheet" / "scored.xlsx").exists()
    assert "worksheet predictions.xlsx (sheet 'predictions'), as it is now" in (
        tmp_path / "sheet" / "report.md").read_text()


def test_hand_edits_are_scored_as_edited(tmp_path):
    """A prediction retyped as a number, a deleted row, an empty line, another sheet put first."""
    prepared = _prepared(tmp_path)

    def edit(sheet):
        sheet["D2"] = 99.5  # boneresorption/0's prediction, typed as a number
        sheet["D3"] = 7  # boneresorption/1
        sheet.delete_rows(4)  # boneresorption/2 gone
        sheet.insert_rows(6)  # an empty line
    sheet = _edit(_sheet(tmp_path), edit)
    workbook = load_workbook(sheet)
    workbook.create_sheet("my notes", 0).append(["nothing to read here"])
    workbook.save(sheet)
    rows, info = load_rows(sheet, False, prepared)
    by_id = {r["id"]: r["prediction"] for r in rows}
    assert by_id["boneresorption/0"] == "99.5" and by_id["boneresorption/1"] == "7"
    assert len(rows) == 11 and "boneresorption/2" not in by_id
    assert info["coverage"].startswith("1 of the 12 questions")


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.__setitem__("D2", datetime.datetime(2024, 1, 2)), r"cell D2: Excel turned the typed text into "
                                                                    r"datetime"),
    (lambda s: s.__setitem__("D3", True), "cell D3: Excel turned the typed text into bool"),
    (lambda s: s.__setitem__("D4", "=1+1"), r"cell D4 holds a formula \(=1\+1\): paste its value"),
    # a lookup pasted as values: the error value, not text (scored as the text "#N/A", an infinite MAE)
    (lambda s: s.__setitem__("D5", "#N/A"), r"cell D5 holds the Excel error #N/A, not a prediction"),
    (lambda s: s.__setitem__("G1", "ID number"), r"no 'id' column in its first 20 rows \(the first row with values has: 'ImageName', .*'ID number'\)"),
    (lambda s: s.__setitem__("H1", "my notes"), r"more than one column that could hold the predictions"),
    (lambda s: s.__setitem__("D1", "Answer"), r"\('Answer'\) are both read as 'answer'"),  # the predictions'
    (lambda s: s.__setitem__("D1", "score"), r"no column that could hold the predictions"),  # headers renamed
    (lambda s: s.__setitem__("G5", None), "row 5: a prediction without an id"),
    (lambda s: s.__setitem__("G11", "dental/0"), r"id\(s\) occur more than once"),  # dental/3: its answer too
    # "40%" typed into a cell: Excel keeps 0.4 with a percentage format
    (lambda s: (s.__setitem__("D2", 0.4), setattr(s["D2"], "number_format", "0%")),
     r"cell D2: a percentage cell \(format '0%'\) holds 0.4, the typed number divided by 100"),
    # a second id column (a copy of ids, typed over): which one to join by is not said
    (lambda s: (s.__setitem__("H1", "ID"), s.__setitem__("H2", "x")),
     r"columns G \('id'\) and H \('ID'\) are both read as 'id': keep one"),
    # the predictions' header cleared: the empty header cell named, not "no column that could hold them"
    (lambda s: s.__setitem__("D1", None),
     r"no column is headed for the predictions .*the header cell D1 is empty: if the predictions are there, head"),
    # the predictions' header cleared and a notes column added: the notes must not be scored
    (lambda s: (s.__setitem__("D1", None), s.__setitem__("H1", "notes"), s.__setitem__("H2", "looks fine")),
     r"cell D2: a value in a column without a header"),
])
def test_what_cannot_be_read_back_is_refused_naming_the_cell(tmp_path, edit, message):
    prepared = _prepared(tmp_path)
    sheet = _edit(_sheet(tmp_path), edit)
    with pytest.raises(ValueError, match=message):
        load_rows(sheet, False, prepared)


def test_a_sheet_outside_a_run_finds_its_split_and_a_broken_file_is_named(tmp_path):
    prepared = _prepared(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    sheet = _sheet(tmp_path / "elsewhere", "mine.xlsx")
    _edit(sheet, lambda s: s.delete_cols(1, 3))  # ImageName, Question, Answer removed: answers from the split
    rows, info = load_rows(sheet, False, prepared)
    assert info["answers_from"].endswith("prepared/val.jsonl") and rows[0]["answer"] == "10"
    typo = _edit(_sheet(tmp_path / "elsewhere", "typo.xlsx"), lambda s: s.cell(2, 7, "boneresorption/O "))
    with pytest.raises(ValueError, match=r"1 prediction id\(s\) are not in the prepared split \S+val.jsonl: "
                                         r"boneresorption/O\. "):  # a typo is named; the answers stay checked
        load_rows(typo, False, prepared)
    torn = tmp_path / "torn.xlsx"
    torn.write_bytes(sheet.read_bytes()[:500])
    with pytest.raises(ValueError, match=r"torn.xlsx: not a readable .xlsx workbook"):
        load_rows(torn, False, prepared)


def test_a_number_shown_with_a_quoted_percent_sign_is_read_as_typed(tmp_path):
    """The format 0"%" shows 11 as "11%" without dividing it: the number is what was typed."""
    prepared = _prepared(tmp_path)

    def edit(sheet):
        sheet["D3"] = 11
        sheet["D3"].number_format = '0"%"'
    rows, _ = load_rows(_edit(_sheet(tmp_path), edit), False, prepared)
    assert {r["id"]: r["prediction"] for r in rows}["boneresorption/1"] == "11"


def test_an_edited_copy_sheet_is_named_as_not_read(tmp_path, caplog):
    """Excel's copy of a sheet ("predictions (2)") edited instead of the original: the sheet read and the copy
    left unread are both named."""
    prepared = _prepared(tmp_path)
    sheet = _sheet(tmp_path)
    workbook = load_workbook(sheet)
    workbook.copy_worksheet(workbook["predictions"]).title = "predictions (2)"
    workbook.save(sheet)
    rows, info = load_rows(sheet, False, prepared)
    assert len(rows) == 12 and "(sheet 'predictions')" in info["sheet_note"]
    assert "not read: the sheet(s) 'predictions (2)'" in info["sheet_note"]  # the report says it too
    assert "read from the sheet 'predictions' only; 'predictions (2)' also has an id column and is not read" in caplog.text


def test_an_edited_sheet_beside_the_jsonl_eval_scores_is_said_naming_the_sheet(tmp_path, caplog):
    """A run dir given to eval scores its predictions.jsonl; its predictions.xlsx edited by hand since is not
    scored, and that is said (log and report note) with the sheet to pass instead. An unedited one says nothing."""
    import os

    prepared = _prepared(tmp_path)
    bell = tmp_path / "bell"  # a control character the sheet cannot store: left out there, not an edit
    bell.mkdir()
    rows = [{**r, "prediction": PREDICTED[r["id"]] + ("\x07" if r["task_type"] == "classification" else "")}
            for r in REFERENCE]
    write_jsonl(bell / "predictions.jsonl", rows)
    with caplog.at_level("INFO"):
        write_sheet(bell / "predictions.xlsx", rows, "my-run")
    bells = sum(r["task_type"] == "classification" for r in rows)
    assert f"predictions.xlsx: {bells} row(s) with control characters a worksheet cannot store, kept there " \
        "without those characters" in caplog.text
    assert "edited_sheet_note" not in load_rows(bell / "predictions.jsonl", False, prepared)[1]
    # the sheet itself scored: as it holds them, and said (the run dir would score the texts as generated)
    scored, said = load_rows(bell / "predictions.xlsx", False, prepared)
    assert not any("\x07" in r["prediction"] for r in scored)
    assert said["stored_sheet_note"].startswith(f"{bells} prediction(s) of predictions.xlsx lost characters a "
                                                "worksheet cannot store")
    assert "stored_sheet_note" not in load_rows(_sheet(tmp_path), False, prepared)[1]  # nothing lost: nothing said
    sent = tmp_path / "sent-on"  # the sheet alone, copied out of the run dir (to submit it): the workbook says it
    sent.mkdir()
    shutil.copy(bell / "predictions.xlsx", sent / "predictions.xlsx")
    said = load_rows(sent / "predictions.xlsx", False, prepared)[1]
    assert said["stored_sheet_note"].startswith(f"{bells} prediction(s) of predictions.xlsx lost characters a ")
    assert "its sheet 'not stored whole' names them" in said["stored_sheet_note"]
    listed = load_workbook(sent / "predictions.xlsx")["not stored whole"]
    assert [c.value for c in listed[2]][1] == "1 control character(s) left out"
    sheet = _sheet(tmp_path)
    assert "edited_sheet_note" not in load_rows(tmp_path / "predictions.jsonl", False, prepared)[1]
    _edit(sheet, lambda ws: setattr(ws.cell(row=2, column=_column(ws, "my-run")), "value", "99"))
    os.utime(sheet, (sheet.stat().st_atime, (tmp_path / "predictions.jsonl").stat().st_mtime + 5))
    rows, info = load_rows(tmp_path / "predictions.jsonl", False, prepared)
    assert f"{sheet} was changed after predictions.jsonl and differs in 1 prediction(s)" in info["edited_sheet_note"]
    assert f"eval.predictions=[{sheet}]" in info["edited_sheet_note"] and "was changed after" in caplog.text
    assert {r["prediction"] for r in rows} == set(PREDICTED.values())  # the jsonl's, as scored


def _column(ws, header: str) -> int:
    return next(c.column for c in ws[1] if c.value == header)


def test_a_sheet_whose_numbers_excel_converted_is_not_an_edit_but_a_changed_number_is(tmp_path):
    """Excel's "Convert to Number" on regression predictions (the text "10.0" stored as the number 10) scores the
    same, so it is no edit; a number or text changed by hand still is."""
    import os

    prepared = _prepared(tmp_path)
    rows = [{**r, "prediction": f"{PREDICTED[r['id']]}.0" if r["task_type"] == "regression" else PREDICTED[r["id"]]}
            for r in REFERENCE]
    write_jsonl(tmp_path / "predictions.jsonl", rows)
    sheet = tmp_path / "predictions.xlsx"
    write_sheet(sheet, rows, "my-run")

    def converted(ws, *changes):
        column = _column(ws, "my-run")
        for row in range(2, 8):  # the regression rows: the text "10.0" stored as the number 10
            ws.cell(row=row, column=column).value = int(float(ws.cell(row=row, column=column).value))
        for row, value in changes:
            ws.cell(row=row, column=column).value = value
    for changes, differ in (((), None), (((2, 10.5),), 1), (((2, "10 mm"), (9, "C")), 2)):
        write_sheet(sheet, rows, "my-run")
        _edit(sheet, lambda ws: converted(ws, *changes))
        os.utime(sheet, (sheet.stat().st_atime, (tmp_path / "predictions.jsonl").stat().st_mtime + 5))
        note = load_rows(tmp_path / "predictions.jsonl", False, prepared)[1].get("edited_sheet_note")
        assert (note is None) if differ is None else f"differs in {differ} prediction(s)" in note, (changes, note)


def test_a_window_is_named_only_where_the_prepared_images_have_more_than_8_bits(tmp_path):
    """A window scales 16-bit and float grey only: over 8-bit images the runs table says none applies (two runs
    prepared with and without one decode alike, no difference to warn of)."""
    prepared = _prepared(tmp_path)
    _sheet(tmp_path)
    assert load_rows(tmp_path / "predictions.jsonl", False, prepared)[1]["image_window"] == "own range"  # unknown
    (tmp_path / "prepared" / "summary.json").write_text(json.dumps({"images_by_mode": {"RGB": 3, "L": 2}}))
    assert load_rows(tmp_path / "predictions.jsonl", False, prepared)[1]["image_window"] == \
        "none applies (8-bit images)"
    (tmp_path / "prepared" / "summary.json").write_text(json.dumps({"images_by_mode": {"RGB": 3, "I;16": 2}}))
    assert load_rows(tmp_path / "predictions.jsonl", False, prepared)[1]["image_window"] == "own range"


@pytest.mark.parametrize("cell, value, message", [
    ("F2", "classification", r"row 2 \(id boneresorption/0\): TaskType 'classification' \(prepared: 'regression'; "
                             r"they differ at character 1\)"),
    ("E3", "dental", r"row 3 \(id boneresorption/1\): Dataset 'dental' \(prepared: 'boneresorption'"),
    ("A4", "9.png", r"row 4 \(id boneresorption/2\): ImageName '9.png' \(prepared: '2.png'"),
    ("B8", "d5", r"row 8 \(id dental/0\): Question 'd5' \(prepared: 'd0'; they differ at character 2\)"),
])
def test_a_row_edited_to_describe_another_question_is_refused(tmp_path, cell, value, message):
    """eval joins by id and scores against the id's prepared question; FLARE joins on ImageName||Question: a row
    whose cells now name another question would be scored against one the person did not mean."""
    prepared = _prepared(tmp_path)
    sheet = _edit(_sheet(tmp_path), lambda s: s.__setitem__(cell, value))
    with pytest.raises(ValueError, match=r"1 row\(s\) describe another question than their id's.*" + message):
        load_rows(sheet, False, prepared)


def test_an_edit_far_into_a_long_question_is_shown_where_it_is(tmp_path):
    _prepared(tmp_path)
    long = "Which option best describes this dental radiograph? A. Normal B. Caries C. Other"
    write_jsonl(tmp_path / "prepared" / "val.jsonl", [{**r, "question": long} if r["id"] == "dental/0" else r
                                                      for r in REFERENCE])
    rows = [{**r, "prediction": "A", **({"question": long} if r["id"] == "dental/0" else {})} for r in REFERENCE]
    write_sheet(tmp_path / "s.xlsx", rows, "my-run")
    sheet = _edit(tmp_path / "s.xlsx", lambda s: s.__setitem__("B8", long.replace("A. Normal", "A. Healthy")))
    with pytest.raises(ValueError, match=r"row 8 \(id dental/0\): Question '\.\.\.ntal radiograph\? A\. "
                                         r"Healthy B\. Caries C\. Other' \(prepared: '\.\.\.ntal radiograph\? "
                                         r"A\. Normal B\. Caries C\. Other'; they differ at character 56\)"):
        load_rows(sheet, False, str(tmp_path / "prepared"))


def test_the_same_description_written_another_way_is_no_edit(tmp_path):
    """FLARE's raw TaskType, another case, spacing, a list of images joined with ',' or ', ': the same question."""
    prepared = _prepared(tmp_path)
    write_jsonl(tmp_path / "prepared" / "val.jsonl",
                [*REFERENCE, {**REFERENCE[0], "id": "iu/0", "dataset": "IU_XRay", "task_type": "report_generation",
                              "image_name": ["a-0.png", "a-1.png"], "answer": "No acute findings."}])

    import unicodedata

    def edit(sheet):
        sheet["F2"], sheet["E3"], sheet["B4"] = "Regression", "BoneResorption", " q2  "
        sheet["F5"], sheet["B6"] = " ", "Q4"  # a blank cell, a question in another case
        sheet["B7"] = unicodedata.normalize("NFD", "qé5")  # macOS's form of the prepared "qé5"
    accented = [{**r, "question": "qé5"} if r["id"] == "boneresorption/5" else r for r in REFERENCE]
    rows = [{**r, "prediction": "1"} for r in accented] + [
        {"id": f"iu/{i}", "dataset": "IU_XRay", "task_type": task, "image_name": names, "question": "q0",
         "answer": "No acute findings.", "prediction": "x"}
        for i, (task, names) in enumerate((("Report_Generation", "a-0.png,a-1.png"), ("REPORT GENERATION", "a-0.png ; a-1.png"),
                                           ("report-generation", "a-1.png\na-0.png")))] + [
        {"id": f"cd/{i}", "dataset": "chestdr", "task_type": task, "image_name": "c.png", "question": "q0",
         "answer": "Mass", "prediction": "Mass"} for i, task in enumerate(("MULTI_LABEL", "multi label", "Multi-Label"))]
    write_jsonl(tmp_path / "prepared" / "val.jsonl",
                [*accented, *({**REFERENCE[0], "id": f"iu/{i}", "dataset": "IU_XRay", "task_type": "report_generation",
                                "image_name": ["a-0.png", "a-1.png"], "answer": "No acute findings."} for i in range(3)),
                 *({**REFERENCE[0], "id": f"cd/{i}", "dataset": "chestdr", "task_type": "multi_label",
                    "image_name": "c.png", "answer": "Mass"} for i in range(3))])
    write_sheet(tmp_path / "s.xlsx", rows, "my-run")
    rows, _ = load_rows(_edit(tmp_path / "s.xlsx", edit), False, prepared)
    assert {r["id"]: r["task_type"] for r in rows}["boneresorption/0"] == "regression" and len(rows) == 18
    assert not any("sheet_row" in r for r in rows)


def test_a_sheet_scored_without_its_split_reads_names_as_one(tmp_path):
    """No prepared split (answers unchecked): FLARE's raw TaskType is read as ours, and one dataset written in two
    cases is one dataset, said in the report."""
    rows = [{"id": f"c/{i}", "dataset": "ChestDR" if i % 2 else "chestdr", "task_type": "Multi-label Classification",
             "image_name": f"{i}.png", "question": "q", "answer": "Mass", "prediction": "Mass" if i < 3 else "Effusion"}
            for i in range(6)]
    write_sheet(tmp_path / "s.xlsx", rows, "my-run")
    read, info = load_rows(tmp_path / "s.xlsx", False, str(tmp_path / "nothing"))
    assert {r["dataset"] for r in read} == {"chestdr"}  # FLARE's own spelling, whichever is more frequent
    assert {r["task_type"] for r in read} == {"multi_label"} and "several cases scored as one" in \
        info["dataset_names_note"]
    # another file spelling it one way only: the same name, so two files compared side by side line up
    write_sheet(tmp_path / "t.xlsx", [{**r, "dataset": "ChestDR"} for r in rows], "other-run")
    assert {r["dataset"] for r in load_rows(tmp_path / "t.xlsx", False, str(tmp_path / "nothing"))[0]} == {"chestdr"}
    write_sheet(tmp_path / "u.xlsx", [{**r, "dataset": "MyXrays" if r["id"] < "c/4" else "myxrays"} for r in rows],
                "third-run")  # not a FLARE dataset: its most frequent spelling in the file
    assert {r["dataset"] for r in load_rows(tmp_path / "u.xlsx", False, str(tmp_path / "nothing"))[0]} == {"MyXrays"}


def test_a_merged_header_is_named_as_a_merge(tmp_path):
    """A merge over the predictions' header and the next one reads as a missing header: the merge is named."""
    prepared = _prepared(tmp_path)
    sheet = _edit(_sheet(tmp_path), lambda s: s.merge_cells("C1:D1"))
    with pytest.raises(ValueError, match=r"merged cells C1:D1"):
        load_rows(sheet, False, prepared)


def test_blank_rows_or_a_title_above_the_header_are_passed_over(tmp_path, caplog):
    """A sheet whose table was moved down (blank rows inserted at the top) or given a title line reads as before;
    a sheet whose header row was deleted names what its first row holds."""
    import logging

    prepared = _prepared(tmp_path)
    expected = [(r["id"], r["prediction"]) for r in load_rows(_sheet(tmp_path), False, prepared)[0]]

    def moved_down(sheet):
        sheet.insert_rows(1, 3)
        sheet["B2"] = "Predictions of my-run, checked by hand"
    with caplog.at_level(logging.INFO):
        rows, _ = load_rows(_edit(_sheet(tmp_path, "moved.xlsx"), moved_down), False, prepared)
    assert [(r["id"], r["prediction"]) for r in rows] == expected
    assert "the header is row 4; row(s) 2 above it (a title) are not read" in caplog.text
    # a space typed in column A below the table: a blank row (it was "a prediction without an id")
    spaced = _edit(_sheet(tmp_path, "spaced.xlsx"), lambda s: s.cell(row=s.max_row + 3, column=1, value=" "))
    assert [(r["id"], r["prediction"]) for r in load_rows(spaced, False, prepared)[0]] == expected
    headless = _edit(_sheet(tmp_path, "headless.xlsx"), lambda s: s.delete_rows(1))
    with pytest.raises(ValueError, match=r"no 'id' column in its first 20 rows \(the first row with values has: "
                                         r"'0.png', 'q0', '10'"):
        load_rows(headless, False, prepared)


def test_rows_of_the_table_misplaced_or_shifted(tmp_path, caplog):
    """A row of the table moved above its header is refused (it would not be read); the header typed twice (two
    tables pasted together) is passed over, said; a table that starts in column B reads as in column A."""
    prepared = _prepared(tmp_path)
    expected = sorted((r["id"], r["prediction"]) for r in load_rows(_sheet(tmp_path), False, prepared)[0])

    def moved_up(sheet):
        sheet.insert_rows(1)
        for column in range(1, 8):
            sheet.cell(1, column, sheet.cell(3, column).value)
        sheet.delete_rows(3)
    with pytest.raises(ValueError, match=r"row 1 holds values in 7 cells above the header \(row 2\), where only a "
                                         r"title may stand"):
        load_rows(_edit(_sheet(tmp_path, "up.xlsx"), moved_up), False, prepared)

    def header_twice(sheet):
        sheet.insert_rows(5)
        for column in range(1, 8):
            sheet.cell(5, column, sheet.cell(1, column).value)
    rows, _ = load_rows(_edit(_sheet(tmp_path, "twice.xlsx"), header_twice), False, prepared)
    assert sorted((r["id"], r["prediction"]) for r in rows) == expected
    assert "row 5 repeats the header (row 1): not read" in caplog.text

    shifted = _edit(_sheet(tmp_path, "shifted.xlsx"), lambda s: s.insert_cols(1))
    assert sorted((r["id"], r["prediction"]) for r in load_rows(shifted, False, prepared)[0]) == expected
    with pytest.raises(ValueError, match=r"row 5: a prediction without an id"):  # numbered in a shifted table too
        load_rows(_edit(shifted, lambda s: s.__setitem__("H5", None)), False, prepared)

    blank_top = _edit(_sheet(tmp_path, "low.xlsx"), lambda s: s.insert_rows(1, 20))
    with pytest.raises(ValueError, match=r"no 'id' column in its first 20 rows \(they are blank\)"):
        load_rows(blank_top, False, prepared)


def test_rows_hidden_in_the_sheet_are_scored_and_said(tmp_path, caplog):
    """Rows hidden by an Excel filter (or Hide) are still rows of the sheet: scored, and the report and the log
    say how many, so a user who hid rows to leave them out hears it."""
    prepared = _prepared(tmp_path)
    sheet = _edit(_sheet(tmp_path), lambda s: [setattr(s.row_dimensions[n], "hidden", True) for n in (3, 4)])
    rows, info = load_rows(sheet, False, prepared)
    assert len(rows) == len(REFERENCE) and "2 row(s) hidden in the sheet are scored too" in info["sheet_note"]
    assert "2 row(s) hidden in the sheet (an Excel filter or Hide) are scored too" in caplog.text
    rows, info = load_rows(_sheet(tmp_path, "plain.xlsx"), False, prepared)
    assert "hidden" not in info["sheet_note"]


def _rearranged(tmp_path, *copies):
    """infer's workbook with its adapter sheet moved first and the predictions' sheet renamed "Sheet1" (and
    copied as ``copies``), as a hand edit leaves it."""
    sheet = _sheet(tmp_path)
    workbook = load_workbook(sheet)
    workbook["predictions"].title = "Sheet1"
    for name in copies:
        workbook.copy_worksheet(workbook["Sheet1"]).title = name
    workbook.move_sheet("adapter", offset=-workbook.sheetnames.index("adapter"))
    assert workbook.sheetnames[0] == "adapter"
    workbook.save(sheet)
    return sheet


def test_a_renamed_predictions_sheet_behind_the_adapter_sheet_is_read_and_said(tmp_path, caplog):
    """No sheet named 'predictions' and infer's adapter sheet first: that sheet has no id column, so it was
    refused as "(sheet 'adapter'): no 'id' column", while the renamed sheet has one. The one sheet with an id
    column is read, named in a warning and in the report's note."""
    prepared = _prepared(tmp_path)
    rows, info = load_rows(_rearranged(tmp_path), False, prepared)
    assert len(rows) == 12 and {r["id"]: r["prediction"] for r in rows} == PREDICTED
    assert "(sheet 'Sheet1': no sheet named 'predictions' has an id column)" in info["sheet_note"]
    assert ("the first sheet, 'adapter' (no sheet is named 'predictions'), has no 'id' column in its first 20 rows: "
            "predictions read from the sheet 'Sheet1', the only one with an id column") in caplog.text


def test_a_predictions_sheet_without_ids_reads_the_one_sheet_that_has_them(tmp_path, caplog):
    """The sheet named 'predictions' lost its id column, an edited copy of it has one: the copy is read, said."""
    prepared = _prepared(tmp_path)
    sheet = _sheet(tmp_path)
    workbook = load_workbook(sheet)
    workbook.copy_worksheet(workbook["predictions"]).title = "predictions (2)"
    workbook["predictions"]["G1"] = "ID number"
    workbook.save(sheet)
    rows, info = load_rows(sheet, False, prepared)
    assert len(rows) == 12
    assert "(sheet 'predictions (2)': no sheet named 'predictions' has an id column)" in info["sheet_note"]
    assert "the sheet 'predictions' has no 'id' column" in caplog.text
    assert "predictions read from the sheet 'predictions (2)', the only one with an id column" in caplog.text


def test_several_sheets_with_ids_behind_one_without_are_refused_naming_them(tmp_path):
    with pytest.raises(ValueError, match=r"the first sheet, 'adapter' \(no sheet is named 'predictions'\), has no "
                                         r"'id' column .*: the sheets 'Sheet1', 'Sheet1 \(2\)' each have one, so "
                                         r"which to score is not known: name the one to score 'predictions'"):
        load_rows(_rearranged(tmp_path, "Sheet1 (2)"), False, _prepared(tmp_path))


def test_the_adapter_sheet_is_never_read_as_predictions(tmp_path):
    """The predictions' sheet deleted: the adapter sheet left is refused, not read."""
    sheet = _sheet(tmp_path)
    workbook = load_workbook(sheet)
    del workbook["predictions"]
    workbook.save(sheet)
    with pytest.raises(ValueError, match=r"\(sheet 'adapter'\): no 'id' column"):
        load_rows(sheet, False, _prepared(tmp_path))


def test_listing_an_eval_of_a_rearranged_workbook_does_not_say_the_workbooks_warnings_again(base_overrides,
                                                                                          tmp_path, caplog, capsys):
    """The eval said which sheet it read; stage=runs, checking the eval's record (its fingerprint reads the
    inputs), printed the same warning above its table, once per listing."""
    from flare_exp.run.doubts import record_doubts

    prepared = _prepared(tmp_path)
    sheet = _rearranged(tmp_path)
    run(compose_cfg(["stage=eval", *base_overrides, f"eval.predictions=[{sheet}]", f"data.prepared_dir={prepared}",
                     "run_name=e"]), run_dir=tmp_path / "e")
    assert "predictions read from the sheet 'Sheet1', the only one with an id column" in caplog.text
    caplog.clear()
    (tmp_path / "out" / "runs").mkdir(parents=True)
    shutil.copytree(tmp_path / "e", tmp_path / "out" / "runs" / "e")
    with caplog.at_level("INFO"):
        assert record_doubts(tmp_path / "e", "DONE") == []
        run(compose_cfg(["stage=runs", *base_overrides]))
    assert "| e | eval | DONE |" in capsys.readouterr().out
    assert "Sheet1" not in caplog.text, caplog.text
