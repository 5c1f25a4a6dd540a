"""Cells of the sheets and CSV files we write (predictions.xlsx, scored.xlsx, sweep.csv) hold untrusted text:
FLARE's questions and answers, model outputs, error messages. None of them may become a formula that runs when
a colleague opens the file (``=HYPERLINK(...)``, ``=WEBSERVICE(...)``)."""
from __future__ import annotations

import csv
import io
import math

# What a spreadsheet program reads as the start of a formula in a cell it parses (a CSV's every cell).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
EXCEL_CELL_CHARACTERS = 32767  # the most a cell holds: Excel and openpyxl cut a longer text there


def as_stored(value):
    """A value as a worksheet cell holds it: generated text can hold control characters a worksheet cannot store
    (dropped, in the sheet only) and run past a cell's limit (cut)."""
    from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

    return ILLEGAL_CHARACTERS_RE.sub("", value)[:EXCEL_CELL_CHARACTERS] if isinstance(value, str) else value


def text_cells(cells) -> None:
    """Every string cell of a written worksheet row stored as text (openpyxl types any string starting with
    ``=`` as a formula): it reads back as the same string."""
    for cell in cells:
        if isinstance(cell.value, str):
            cell.data_type = "s"


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def csv_cell(value):
    """A CSV cell that no spreadsheet evaluates: text that would start a formula gets a leading apostrophe
    (the spreadsheets' text marker); numbers, negative ones included, stay as they are."""
    if isinstance(value, str) and value.startswith(FORMULA_START) and not _is_number(value):
        return "'" + value
    return value


def csv_text(header: list, rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerows([[csv_cell(v) for v in row] for row in [header, *rows]])
    return buf.getvalue()
