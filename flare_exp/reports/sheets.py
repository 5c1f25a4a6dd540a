"""The worksheets we write (infer's predictions.xlsx; eval's scored.xlsx, with a score per row and a metrics
sheet): one row per question, frozen header, filters, wrapped text and set column widths; untrusted text is
stored as text, never as a formula."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from flare_exp.cells import EXCEL_CELL_CHARACTERS, as_stored
from flare_exp.data.sheet_predictions import (ALTERED_HEADER, ALTERED_SHEET, PREDICTION_COLUMN, ROW_COLUMNS,
                                              SCORE_COLUMNS, SHEET)
from flare_exp.metrics.official import FLARE_TASK_TYPE, OFFICIAL_METRIC

PREDICTION_WIDTHS = (38, 60, 50, 50, 16, 18, 30)  # ImageName, Question, Answer, prediction, Dataset, TaskType, id
EXTRA_WIDTHS = {"score": 12, "score_kind": 40}  # eval's score columns; others 18

log = logging.getLogger(__name__)


def write_sheet(path: Path, rows: list[dict], label: str, extra: tuple[str, ...] = (), adapter: dict | None = None,
                metrics: list[tuple[str, ...]] | None = None) -> None:
    """The predictions as a worksheet; ``extra`` names row keys added as columns after id (eval's per-row score);
    ``metrics`` (a header row, then rows) becomes a "metrics" sheet beside the rows; a last sheet names the
    adapter that made them."""
    from openpyxl import Workbook

    wb = Workbook()
    ws = wb.active
    ws.title = SHEET
    names = [name for name, _ in ROW_COLUMNS]
    header = [*names[:PREDICTION_COLUMN], label, *names[PREDICTION_COLUMN:], *extra]
    body = []
    for r in rows:
        cells = [r[key] if key != "image_name" or isinstance(r[key], str) else ", ".join(r[key])
                 for _, key in ROW_COLUMNS]
        values = [*cells[:PREDICTION_COLUMN], r["prediction"], *cells[PREDICTION_COLUMN:], *(r.get(k) for k in extra)]
        body.append([cell_value(v) for v in values])
    cut, stripped = fill_sheet(ws, header, body, PREDICTION_WIDTHS + tuple(EXTRA_WIDTHS.get(k, 18) for k in extra),
                               wrap=True)
    named = lambda rows: ", ".join([str(body[row][header.index("id")]) for row in rows][:5]) + (  # noqa: E731
        ", ..." if len(rows) > 5 else "")
    if cut:
        log.warning("%s: %d row(s) with a text longer than a worksheet cell's %d characters, cut there (rows: %s); "
                    "the whole texts are in the run's JSONL", path, len(cut), EXCEL_CELL_CHARACTERS, named(cut))
    if stripped:  # an eval of the sheet itself warns that it scores other texts than the run dir's JSONL
        # the rows stay, only those characters are left out of their cells (cells.as_stored)
        log.info("%s: %d row(s) with control characters a worksheet cannot store, kept there without those "
                 "characters (rows: %s); the run's JSONL holds the texts as generated", path, len(stripped),
                 named(stripped))
    altered = altered_predictions(rows)
    if altered:  # said in the workbook itself: an eval of a copy of it, away from the run dir, says it too
        fill_sheet(wb.create_sheet(ALTERED_SHEET), list(ALTERED_HEADER), altered, (30, 70), wrap=False)
    if metrics:
        fill_sheet(wb.create_sheet("metrics"), list(metrics[0]), [list(m) for m in metrics[1:]],
                   (48,) + (22,) * (len(metrics[0]) - 1), wrap=False)
    about = wb.create_sheet("adapter")
    about.append(["adapter path", (adapter or {}).get("path") or "none (the base model)"])
    about.append(["adapter sha256", (adapter or {}).get("sha256") or ""])
    about.column_dimensions["A"].width, about.column_dimensions["B"].width = 16, 80
    save_workbook(wb, path)


def altered_predictions(rows: list[dict]) -> list[list[str]]:
    """[id, what the worksheet could not hold] for each prediction a cell does not hold as generated."""
    from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

    altered = []
    for r in rows:
        text = r.get("prediction")
        if not isinstance(text, str) or as_stored(text) == text:
            continue
        dropped = len(ILLEGAL_CHARACTERS_RE.findall(text))
        lost = [f"{dropped} control character(s) left out"] if dropped else []
        if len(text) - dropped > EXCEL_CELL_CHARACTERS:
            lost.append(f"cut at {EXCEL_CELL_CHARACTERS} characters (of {len(text) - dropped})")
        altered.append([str(r.get("id")), "; ".join(lost)])
    return altered


def cell_value(value):
    """A value as a worksheet cell holds it: a list or object as its JSON, an integer a float does not hold
    exactly (past 2**53: a worksheet's numbers are floats) as its digits."""
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2 ** 53:
        return str(value)
    return value


def write_scored_sheet(path: Path, rows: list[dict], label: str, samples: dict, result: dict | None = None) -> None:
    """The predictions with a score per row, each task's worst first (a reviewer's reading order), and the
    run's metrics on a sheet beside them."""
    from flare_exp.metrics.row_scores import row_scores, worst_first

    scores = row_scores(rows, samples)
    blank = {"image_name": "", "question": "", "answer": None, "prediction": None, "dataset": ""}
    scored = [{**blank, **r, "score": scores.get(r["id"], (None, ""))[0],
               "score_kind": scores.get(r["id"], (None, ""))[1]} for r in rows]  # a hand-made file may lack fields
    write_sheet(path, worst_first(scored), label, extra=SCORE_COLUMNS,
                adapter=next((r["adapter"] for r in rows if r.get("adapter")), None),  # infer's rows name it
                metrics=metric_rows(result) if result else None)


def sheet_value(value):
    """A number as the sheet stores it (infinity and missing ones as words a reader understands)."""
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return "Infinity" if value > 0 else "n/a"
    return value


def metric_rows(result: dict) -> list[tuple]:
    """scored.xlsx's metrics sheet for one run: FLARE's official numbers, then every metric of each task type."""
    rows = [("metric", "value")]
    for task, block in sorted(result["official"].items()):
        metric = OFFICIAL_METRIC[task]
        rows.append((f"official {FLARE_TASK_TYPE[task]}: {metric}", sheet_value((block or {}).get(metric))))
    for task, metrics in sorted(result["by_task"].items()):
        rows += [(f"{task}: {k}", sheet_value(v)) for k, v in metrics.items()
                 if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))]
    return rows + [("n", result["n"])]


def fill_sheet(ws, header: list[str], rows: list[list], widths: tuple[int, ...], wrap: bool) -> list[int]:
    """``header`` in bold and frozen, ``rows`` under it with filters, the columns ``widths`` characters wide;
    numbers with four decimals. Returns the indices of the rows with a text cut at a cell's limit, and of those
    that lost control characters."""
    from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
    from openpyxl.styles import Alignment, Font
    from openpyxl.utils import get_column_letter

    from flare_exp.cells import text_cells

    ws.append(header)
    text_cells(ws[1])
    for cell in ws[1]:
        cell.font = Font(bold=True)
    cut, stripped = [], []
    for index, values in enumerate(rows):
        if any(isinstance(v, str) and len(ILLEGAL_CHARACTERS_RE.sub("", v)) > EXCEL_CELL_CHARACTERS for v in values):
            cut.append(index)
        if any(isinstance(v, str) and ILLEGAL_CHARACTERS_RE.search(v) for v in values):
            stripped.append(index)
        ws.append([as_stored(v) for v in values])
        text_cells(ws[ws.max_row])  # untrusted text: never a formula, whatever it starts with
        for cell in ws[ws.max_row]:
            if isinstance(cell.value, float):
                cell.number_format = "0.0000"
    for k, width in enumerate(widths, start=1):
        column = get_column_letter(k)
        ws.column_dimensions[column].width = width
        if wrap:
            for cell in ws[column][1:]:
                cell.alignment = Alignment(wrap_text=True, vertical="top")
    ws.freeze_panes = "A2"
    ws.auto_filter.ref = ws.dimensions
    return cut, stripped


def save_workbook(wb, path: Path) -> None:
    from flare_exp.io import atomic_path

    with atomic_path(path) as tmp:
        wb.save(tmp)
