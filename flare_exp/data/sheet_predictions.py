"""Predictions read from a worksheet: infer's predictions.xlsx after a person has edited it (a prediction fixed
by hand, rows deleted, columns moved), or a sheet made elsewhere with the same columns. eval takes it as an
``eval.predictions`` entry like a predictions.jsonl; the rows are then joined to the prepared split as any file's.

What Excel does to typed text is not guessed at: a number typed into a cell is read back as the number's text
("12.5"), but a cell Excel turned into a date or a TRUE/FALSE, or a formula, is an error naming the cell, since
the text that was typed cannot be known."""
from __future__ import annotations

import datetime
import logging
import re
import zipfile
from pathlib import Path

SHEET_SUFFIXES = (".xlsx", ".xlsm")
SHEET = "predictions"  # the sheet infer writes (reports/sheets.py); else the first one is read (_pick_sheet)
# the columns of infer's sheet besides the prediction (header -> row key), in its order; the prediction column,
# headed by the run's label, comes at PREDICTION_COLUMN (after Answer); eval's scored sheets add SCORE_COLUMNS
ROW_COLUMNS = (("ImageName", "image_name"), ("Question", "question"), ("Answer", "answer"), ("Dataset", "dataset"),
               ("TaskType", "task_type"), ("id", "id"))
PREDICTION_COLUMN = 3
SCORE_COLUMNS = ("score", "score_kind")
# the sheet, beside the predictions, naming those a worksheet could not hold whole (control characters, a text
# past a cell's limit): it goes where the workbook goes (a copy to submit, a colleague's), the run dir may not
ALTERED_SHEET = "not stored whole"
ALTERED_HEADER = ("row", "the worksheet could not hold")
KNOWN_COLUMNS = {header.lower(): key for header, key in ROW_COLUMNS}  # read case-insensitively
UNHEADED = "(no header)"
HEADER_SEARCH_ROWS = 20  # the header is looked for in this many rows: blank ones or a title may come first
OLE2 = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"  # the old binary Office container: .xls, .doc, an encrypted .xlsx

log = logging.getLogger(__name__)


def is_sheet(path: Path) -> bool:
    return path.suffix.lower() in SHEET_SUFFIXES


def read_sheet_predictions(path: Path) -> tuple[list[dict], str, list[str]]:
    """(one row per question: id, prediction, and what else the sheet names (answer, task type, ...); the
    prediction column's header (the run's label in infer's sheet) becomes the rows' ``model``, the sheet's
    title, the other sheets with an id column). Another sheet that also has an id column (an edited copy,
    "predictions (2)") is named in a warning (and the report): only one sheet is read (which: _pick_sheet)."""
    from openpyxl import load_workbook
    from openpyxl.utils.exceptions import InvalidFileException

    try:
        with open(path, "rb") as f:
            ole2 = f.read(len(OLE2)) == OLE2
    except OSError:
        ole2 = False
    if ole2:  # Office's older container: a password-protected workbook, or an .xls renamed .xlsx
        raise ValueError(f"{path}: a password-protected workbook or an old .xls named .xlsx, which eval cannot read: "
                         "save it without a password, as an Excel Workbook (.xlsx)")
    try:
        workbook = load_workbook(path, read_only=True, data_only=False)
    except (InvalidFileException, zipfile.BadZipFile, OSError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: not a readable .xlsx workbook ({type(e).__name__}: {e})") from e
    try:
        sheet, others = _pick_sheet(path, workbook)
        merged, hidden = _layout(path, sheet.title)
        _refuse_merged_cells(path, sheet.title, merged)  # first: a merged header would read as a missing column
        lines = enumerate(sheet.iter_rows(), 1)  # numbered here: a row's leading empty cells carry no number
        header, header_row = _header(path, sheet.title, lines)
        columns, prediction = _columns(path, sheet.title, header, header_row)
        rows = []
        for number, cells in lines:
            row = _row(path, sheet.title, cells, number, columns, prediction, header_row)
            if row is not None:
                # a hidden row is scored like the others: eval says how many (a user may have hidden them to
                rows.append({**row, "sheet_hidden": True} if number in hidden else row)  # leave them out)
    finally:
        workbook.close()
    if others:
        log.warning("%s: predictions read from the sheet %r only; %s also %s an id column and %s not read (eval "
                    "reads the sheet named %r, else the first one: keep the edited sheet under that name)", path,
                    sheet.title, ", ".join(repr(o) for o in others), "has" if len(others) == 1 else "have",
                    "is" if len(others) == 1 else "are", SHEET)
    return rows, sheet.title, others


def _pick_sheet(path: Path, workbook):
    """(the sheet to read, the titles of the other sheets with an id column): the one named SHEET, else the first;
    where that one has no id column (infer's adapter sheet moved first, the predictions' sheet renamed) but one
    other sheet has, that one, said in a warning; where several have, refused naming them. Where none has, the
    first one is refused naming its header (_columns): a sheet without an id column is never read."""
    first = workbook[SHEET] if SHEET in workbook.sheetnames else workbook.worksheets[0]
    with_id = [w.title for w in workbook.worksheets if _has_id_column(w)]
    if first.title in with_id or not with_id:
        return first, [title for title in with_id if title != first.title]
    named = (f"the sheet {SHEET!r}" if first.title == SHEET
             else f"the first sheet, {first.title!r} (no sheet is named {SHEET!r}),")
    if len(with_id) > 1:
        rename = f" (after renaming the sheet {SHEET!r})" if first.title == SHEET else ""
        raise ValueError(f"{path}: {named} has no 'id' column in its first {HEADER_SEARCH_ROWS} rows: the sheets "
                         f"{', '.join(map(repr, with_id))} each have one, so which to score is not known: name the "
                         f"one to score {SHEET!r}{rename}, or delete the others")
    log.warning("%s: %s has no 'id' column in its first %d rows: predictions read from the sheet %r, the only one "
                "with an id column (keep them in a sheet named %r to read them without this warning)", path, named,
                HEADER_SEARCH_ROWS, with_id[0], SHEET)
    return workbook[with_id[0]], []


def _layout(path: Path, title: str) -> tuple[list[str], set[int]]:
    """(the sheet's merged ranges, the rows Excel hides in it). A read-only workbook says neither, so the sheets'
    XML is looked at once and the workbook opened in full only where one has a merge or a hidden row."""
    from openpyxl import load_workbook

    with zipfile.ZipFile(path) as archive:
        if not any(re.search(rb'<mergeCell |<row [^>]*hidden="(?:1|true)"', archive.read(n))
                   for n in archive.namelist() if n.startswith("xl/worksheets/") and n.endswith(".xml")):
            return [], set()
    workbook = load_workbook(path)
    try:
        sheet = workbook[title]
        return ([str(r) for r in sheet.merged_cells.ranges],
                {number for number, row in sheet.row_dimensions.items() if row.hidden})
    finally:
        workbook.close()


def _refuse_merged_cells(path: Path, title: str, merged: list[str]) -> None:
    """Merged cells hold their value in the first cell only: the others would read as blank predictions (or
    answers) without a word."""
    if merged:
        raise ValueError(f"{path} (sheet {title!r}): merged cells {', '.join(merged[:5])}"
                         + (f" and {len(merged) - 5} more" if len(merged) > 5 else "") + ": a merge keeps its value "
                         "in its first cell only, so the others would read as blank; unmerge them and fill each cell")


def _names_id(values) -> bool:
    return any(isinstance(v, str) and v.strip().lower() == "id" for v in values)


def _header(path: Path, title: str, lines) -> tuple[tuple, int | None]:
    """The header row and its number, taken from ``lines`` (numbered rows; the rows after it stay there to be
    read): the first of the first HEADER_SEARCH_ROWS rows with an "id" cell, so blank rows or a title typed
    above the table are passed over. A row above it with values in more than one cell is no title (a row of the
    table moved above its header?): refused, as it would not be read. Without an id cell: the first row that
    has a value (its columns name what is there) or nothing, and None."""
    first_filled, titles = None, []
    for number, cells in lines:
        values = [c.value for c in cells]
        if _names_id(values):
            if titles:
                log.info("%s (sheet %r): the header is row %d; row(s) %s above it (a title) are not read", path,
                         title, number, ", ".join(map(str, titles)))
            return cells, number
        filled = [v for v in values if v is not None and str(v).strip()]
        if len(filled) > 1:
            first_filled = first_filled or cells
            for later, more in lines:  # is there a header below it?
                if later > HEADER_SEARCH_ROWS:
                    break
                if _names_id([c.value for c in more]):
                    raise ValueError(
                        f"{path} (sheet {title!r}): row {number} holds values in {len(filled)} cells above the "
                        f"header (row {later}), where only a title may stand: a row of the table moved above its "
                        "header? Move it below the header, or delete it")
            return first_filled, None
        if filled:
            titles.append(number)
            first_filled = first_filled or cells
        if number >= HEADER_SEARCH_ROWS:
            break
    return first_filled or (), None


def _has_id_column(worksheet) -> bool:
    rows = worksheet.iter_rows(max_row=HEADER_SEARCH_ROWS, values_only=True)
    return any(_names_id(values) for values in rows)


def _columns(path: Path, title: str, header, header_row: int | None) -> tuple[dict[int, str], tuple[int, str]]:
    """{column index: row key} of the known columns, and (index, header) of the prediction column: the one
    column that is neither a known one nor a score. A column with values but no header is refused in _row."""
    names = [("" if c.value is None else str(c.value)).strip() for c in header]
    columns = {i: KNOWN_COLUMNS[n.lower()] for i, n in enumerate(names) if n.lower() in KNOWN_COLUMNS}
    columns.update({i: UNHEADED for i, n in enumerate(names) if not n})
    others = [(i, n) for i, n in enumerate(names) if n and n.lower() not in {*KNOWN_COLUMNS, *SCORE_COLUMNS}]
    shown = ", ".join(repr(n) for n in names if n)
    _refuse_a_column_twice(path, title, names, columns)
    if "id" not in columns.values():
        first = f"the first row with values has: {shown}" if shown else "they are blank"
        raise ValueError(f"{path} (sheet {title!r}): no 'id' column in its first {HEADER_SEARCH_ROWS} rows ({first}); "
                         "eval joins each prediction to its question by id, as infer's predictions.xlsx has it")
    blank = [i for i, key in columns.items() if key == UNHEADED]
    if not others and blank:  # the predictions' header cell cleared (or never typed): that column is named
        from openpyxl.utils import get_column_letter

        cells = ", ".join(f"{get_column_letter(i + 1)}{header_row or 1}" for i in blank[:3])
        raise ValueError(f"{path} (sheet {title!r}): no column is headed for the predictions (the header, row "
                         f"{header_row}: {shown}), and the header cell {cells} is empty: if the predictions are "
                         "there, head that column with the run's label")
    if len(others) != 1:
        raise ValueError(
            f"{path} (sheet {title!r}): {'no' if not others else 'more than one'} column that could hold the "
            f"predictions (the header, row {header_row}: {shown}). Keep exactly one column besides "
            "ImageName, Question, Answer, Dataset, TaskType and id: the predictions, headed by the run's label")
    return columns, others[0]


def _refuse_a_column_twice(path: Path, title: str, names: list[str], columns: dict[int, str]) -> None:
    """Two columns read as one (id and ID, two Answer columns): which one eval should read is not said."""
    from openpyxl.utils import get_column_letter

    seen: dict[str, int] = {}
    for i, key in sorted(columns.items()):
        if key == UNHEADED:
            continue
        if key in seen:
            first = seen[key]
            raise ValueError(f"{path} (sheet {title!r}): columns {get_column_letter(first + 1)} ({names[first]!r}) "
                             f"and {get_column_letter(i + 1)} ({names[i]!r}) are both read as {key!r}: keep one "
                             "of them (delete or rename the other)")
        seen[key] = i


def _row(path: Path, title: str, cells, number: int, columns: dict[int, str], prediction: tuple[int, str],
         header_row: int) -> dict | None:
    """Row ``number``'s values by key (None for an empty row, or one that repeats the header: said); a cell
    whose typed text is lost is an error."""
    values = {i: _text(path, title, c) for i, c in enumerate(cells)}
    if all(v is None or isinstance(v, str) and not v.strip() for v in values.values()):
        return None  # an empty line left by a deleted row (a space typed in a cell of it: still empty)
    ids = [values.get(i) for i, key in columns.items() if key == "id"]
    if ids and isinstance(ids[0], str) and ids[0].strip().lower() == "id":
        log.warning("%s (sheet %r): row %d repeats the header (row %d): not read", path, title, number, header_row)
        return None
    unheaded = [c for i, c in enumerate(cells) if columns.get(i) == UNHEADED and values.get(i) not in (None, "")]
    if unheaded:
        raise ValueError(f"{path} (sheet {title!r}), cell {unheaded[0].coordinate}: a value in a column without a "
                         "header. Head it (the predictions' column: the run's label) or delete the column")
    row = {key: values.get(i) for i, key in columns.items() if values.get(i) is not None and key != UNHEADED}
    row["prediction"] = values.get(prediction[0]) or ""  # an empty cell: an empty answer, scored as wrong
    row["model"] = prediction[1]
    row["sheet_row"] = number  # named in a refusal; dropped once the rows are joined
    if isinstance(row.get("id"), str):
        row["id"] = row["id"].strip()  # a space typed after it: the id; two left equal are doubled
    if not row.get("id"):
        raise ValueError(f"{path} (sheet {title!r}), row {number}: a prediction without an id; give it the "
                         "question's id or delete the row")
    return row


def _text(path: Path, title: str, cell) -> str | None:
    value = getattr(cell, "value", None)
    if value is None or isinstance(value, str) and cell.data_type not in ("f", "e"):
        return value
    where = f"{path} (sheet {title!r}), cell {cell.coordinate}"
    if cell.data_type == "f":
        raise ValueError(f"{where} holds a formula ({value}): paste its value as text")
    if cell.data_type == "e":  # a lookup pasted as values: no text anybody typed
        raise ValueError(f"{where} holds the Excel error {value}, not a prediction: put the prediction's text there")
    if isinstance(value, bool) or isinstance(value, (datetime.date, datetime.time, datetime.timedelta)):
        raise ValueError(f"{where}: Excel turned the typed text into {type(value).__name__} {value}; format the "
                         "column as Text and type it again")
    if "%" in re.sub(r'"[^"]*"|\\.', "", str(getattr(cell, "number_format", "") or "")):  # not a quoted "%"
        raise ValueError(f"{where}: a percentage cell (format {cell.number_format!r}) holds {value}, the typed number "
                         "divided by 100; format the column as Text and type the number without '%'")
    return str(value)  # a number typed into the cell: its text, as eval reads a number in a predictions.jsonl


def stored_sheet_note(sheet: Path, rows: list[dict]) -> dict:
    """A sheet infer wrote, scored as it is, beside the run's predictions.jsonl: where its predictions differ
    from the journal's only by what a worksheet cannot store (control characters dropped, a text cut at a cell's
    limit), said, since the run dir would score other texts; {} otherwise (no journal, or edits by hand: the
    sheet is what was asked for)."""
    from flare_exp.io import read_jsonl
    from flare_exp.cells import as_stored

    journal = sheet.with_suffix(".jsonl")
    try:
        generated = {r.get("id"): r.get("prediction") for r in read_jsonl(journal)}
    except (OSError, ValueError):  # none beside it (a copy sent on): the sheet's own list of them
        generated = None
    if generated is not None:
        altered = sum(isinstance(g := generated.get(r.get("id")), str) and g != r.get("prediction") and
                      as_stored(g) == (r.get("prediction") or "") for r in rows)
        held = f"{journal.name} beside it holds them as generated"
    else:
        listed = altered_rows(sheet)
        altered = sum(str(r.get("id")) in listed for r in rows)
        held = f"its sheet {ALTERED_SHEET!r} names them; the predictions.jsonl of the run that wrote it holds them"
    if not altered:
        return {}
    note = (f"{altered} prediction(s) of {sheet.name} lost characters a worksheet cannot store (control "
            f"characters, or a text past a cell's limit) when it was written: scored as the sheet holds them; {held}")
    log.warning("eval: %s", note)
    return {"stored_sheet_note": note}


def altered_rows(sheet: Path) -> set[str]:
    """The ids the workbook's ALTERED_SHEET names (the predictions the worksheet could not hold whole); none
    where it has no such sheet or it cannot be read."""
    from openpyxl import load_workbook

    try:
        workbook = load_workbook(sheet, read_only=True)
    except Exception:  # noqa: BLE001  (read_sheet_predictions said why the workbook is unreadable)
        return set()
    try:
        if ALTERED_SHEET not in workbook.sheetnames:
            return set()
        values = workbook[ALTERED_SHEET].iter_rows(min_row=2, max_col=1, values_only=True)
        return {str(row[0]) for row in values if row and row[0] is not None}
    finally:
        workbook.close()
