"""The reference answers eval scores against: the prepared split the predictions answer, joined by id.

A predictions file carries the answers infer copied into it; a hand-edited or foreign file may carry other ones,
or ids that are not in the split. Where the prepared split is known, eval takes the answer, task type and
dataset from it and refuses unknown ids, answers that differ, and rows whose dataset, task type, image name or
question name another question than their id's (a sheet's cells edited); where it is not, the report says the
answers came from the predictions file, unchecked.
"""
from __future__ import annotations

import logging
import math
import re
import unicodedata
from pathlib import Path

from flare_exp.data.prepared_split import answer_problem
from flare_exp.data.rejects import describe_rejected, rejected_questions
from flare_exp.io import read_jsonl
from flare_exp.run.layout import CONFIG
from flare_exp.run.stage import infer_input_file
from flare_exp.runtime import abspath

log = logging.getLogger(__name__)

SHOWN = 5  # ids named in an error
FROM_REFERENCE = ("answer", "task_type", "dataset", "question", "image_name", "raw_answer", "raw_task_type")
# what else a row says about its question (row key, the sheet's header): compared with the id's prepared record
DESCRIBING = (("dataset", "Dataset"), ("task_type", "TaskType"), ("image_name", "ImageName"), ("question", "Question"))


def reference_file(source: Path | None, rows: list[dict], prepared_dir: str | None) -> Path | None:
    """The file infer read for these predictions (``source``: ``run_split``), else the prepared split the rows
    name (``<data.prepared_dir>/<split>.jsonl``), else the prepared split holding most of their ids; None when
    there is none."""
    if source is not None and source.is_file():
        return source
    splits = {r.get("split") for r in rows}
    if prepared_dir and len(splits) == 1 and isinstance(next(iter(splits)), str):
        candidate = abspath(prepared_dir) / f"{next(iter(splits))}.jsonl"
        if candidate.is_file():
            return candidate
    if prepared_dir:  # rows that name no split (a worksheet, a hand-made file), or not one split it has a file of
        # (null beside val, "VAL", "validation", 1): the split holding most of their ids, whose join then refuses
        # an id it lacks and an answer edited, rather than leave every answer unchecked
        return split_holding(abspath(prepared_dir), {r.get("id") for r in rows})
    return None


def run_split(predictions: Path) -> Path | None:
    """The file infer read for these predictions, from its run dir's saved config; None without an infer run's
    config (one that names neither infer.input_file nor data.prepared_dir and infer.split)."""
    from omegaconf import OmegaConf

    saved = predictions.parent / CONFIG
    if not saved.is_file():
        return None
    try:
        cfg = OmegaConf.load(saved)
        named = OmegaConf.select(cfg, "infer.input_file") or (OmegaConf.select(cfg, "data.prepared_dir")
                                                               and OmegaConf.select(cfg, "infer.split"))
        if named:  # a relative path from the directory that infer started in (run_info.json), not eval's
            from flare_exp.run.fingerprint import as_compared, launch_dir_of

            return Path(as_compared("infer.input_file", str(infer_input_file(cfg)), launch_dir_of(predictions.parent)))
        why = "it names neither infer.input_file nor data.prepared_dir and infer.split"
    except Exception as e:  # noqa: BLE001  (torn or edited: the split the rows name is used)
        why = f"it cannot be read ({type(e).__name__}: {str(e)[:200]})"
    log.warning("eval: %s: %s, so the split its infer run read is not known: the predictions are joined to "
                "data.prepared_dir's split their rows name (the report's 'prepared split' row says which)", saved, why)
    return None


def gone_run_split(predictions: Path, source: Path | None) -> str | None:
    """What to say when the split the predictions' infer run read (``source``: ``run_split``) is gone (deleted,
    or a path of another machine): said before any error of the split eval falls back to."""
    if source is None or source.is_file():
        return None
    return f"its infer run's split {source} ({predictions.parent.name}/{CONFIG}) is gone"


def split_holding(prepared: Path, ids: set) -> Path | None:
    """The prepared split holding the most of ``ids`` (None if none holds any). Ids are digests of the
    question, so a split holding some of them is the one the rows came from: an id it lacks (a typo in a
    hand-edited sheet) is then an error naming it, not a reason to leave every answer unchecked."""
    best, most = None, 0
    for candidate in sorted(prepared.glob("*.jsonl")) if prepared.is_dir() else ():
        try:
            known = {r.get("id") for r in read_jsonl(candidate) if isinstance(r, dict)}
        except ValueError:
            continue  # not a split file
        held = len(ids & known)
        if held > most:
            best, most = candidate, held
    return best


def _named(ids: list) -> str:
    shown = [repr(str(i)) if not str(i) or str(i) != str(i).strip() else str(i) for i in ids[:SHOWN]]  # a space shows
    return ", ".join(shown) + (f" and {len(ids) - SHOWN} more" if len(ids) > SHOWN else "")


def join_to_reference(predictions: Path, rows: list[dict], reference: Path) -> tuple[list[dict], dict]:
    """The rows with the reference's answer, task type, dataset, question and image name, and how much of the
    split they answer (``coverage``); an id the reference lacks, or an answer that differs from it, is an error
    naming the first few."""
    refs = {r["id"]: r for r in read_jsonl(reference) if isinstance(r, dict) and "id" in r}
    unknown = [r.get("id") for r in rows if r.get("id") not in refs]
    if unknown:
        raise ValueError(f"{predictions}: {len(unknown)} prediction id(s) are not in the prepared split {reference}: "
                         f"{_named(unknown)}. Score predictions of this split only (or point data.prepared_dir at "
                         "the one they were made from)")
    not_text = [r["id"] for r in rows if answer_problem(refs[r["id"]].get("answer"))]
    if not_text:  # a list of labels, a number typed in, "": scored against text, every one would count as wrong
        first = refs[not_text[0]]["answer"]
        raise ValueError(f"{reference}: {len(not_text)} answer(s) of this prepared split are not text or empty, "
                         f"e.g. {not_text[0]}: {first!r} (a {type(first).__name__}): prepare writes every answer as "
                         "non-empty text (labels joined with ';'), so the file was edited since. Undo the edit, or "
                         "rerun stage=prepare (overwrite=true)")
    changed = [r["id"] for r in rows if r.get("answer") is not None and refs[r["id"]].get("answer") is not None
               and not same_answer(r["answer"], refs[r["id"]]["answer"])]
    if changed:
        raise ValueError(f"{predictions}: {len(changed)} answer(s) differ from the prepared split {reference}: "
                         f"{_named(changed)}. Eval scores against the prepared answers; a predictions file whose "
                         "answers were edited is refused")
    refuse_other_descriptions(predictions, rows, refs, reference)
    joined = [{**r, **{k: refs[r["id"]][k] for k in FROM_REFERENCE if k in refs[r["id"]]}} for r in rows]
    return joined, {**coverage(joined, reference, len(refs)),
                    "image_window": windows_of(refs[r["id"]] for r in rows) if high_bit(reference) else
                    "none applies (8-bit images)"}


def refuse_other_descriptions(predictions: Path, rows: list[dict], refs: dict, reference: Path) -> None:
    """A row whose Dataset, TaskType, ImageName or Question differs from its id's prepared record (a sheet's
    cells edited, rows pasted under other ids): eval joins by id and would score the prediction against the id's
    question, while FLARE joins on ImageName||Question; which one the row answers is not said, so it is refused."""
    differing = []
    for row in rows:
        ref = refs[row["id"]]
        said = [f"{header} {_difference(row[key], ref[key])}" for key, header in DESCRIBING
                if not _blank(row.get(key)) and ref.get(key) is not None
                and not _same_description(key, row[key], ref[key])]
        if said:
            where = f"row {row['sheet_row']} (id {row['id']})" if row.get("sheet_row") else str(row["id"])
            differing.append(f"{where}: {', '.join(said)}")
    if differing:
        raise ValueError(
            f"{predictions}: {len(differing)} row(s) describe another question than their id's in the prepared split "
            f"{reference}: {'; '.join(differing[:3])}{' and more' if len(differing) > 3 else ''}. Eval joins each "
            "prediction to its question by id and takes the dataset, task type, image and question from the "
            "prepared split: put the prepared values back, or move the prediction to the row (id) of the question it "
            "answers")


def _blank(value) -> bool:
    return value is None or isinstance(value, str) and not value.strip()


def _text(value) -> str:
    """A value as compared: one Unicode form (macOS writes names decomposed), runs of spaces and line breaks as
    one space (a non-breaking one too)."""
    return " ".join(unicodedata.normalize("NFC", str(value)).split())


def _same_description(key: str, given, prepared) -> bool:
    """The same dataset, task type, image name or question, as a sheet or another tool may write it: our task
    type or FLARE's in any case and spacing, the dataset and the question in any case, a list of image names
    joined with ",", ";" or line breaks in any order (the same views), any Unicode form and spacing."""
    from flare_exp.data.records import normalise_task_type
    from flare_exp.cells import as_stored

    if key == "image_name":
        names = prepared if isinstance(prepared, list) else [prepared]
        pieces = given if isinstance(given, list) else re.split(r"[,;\n]", str(given))
        return sorted(_text(p) for p in pieces if _text(p)) == sorted(_text(n) for n in names)
    if key == "task_type":
        return (normalise_task_type(_text(given)) or _text(given)) == (normalise_task_type(prepared) or prepared)
    if key == "dataset":
        return _text(given).casefold() == _text(prepared).casefold()
    return _text(given).casefold() in (_text(prepared).casefold(), _text(as_stored(prepared)).casefold())


def _difference(given, prepared) -> str:
    """The two values where they first differ (a long question's edit is past its start; two forms of one
    letter look the same, so the place is named)."""
    a, b = _text(given), _text(prepared)
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    def near(text: str) -> str:
        start = max(at - 20, 0)
        return ("..." if start else "") + text[start:at + 30] + ("..." if len(text) > at + 30 else "")
    return f"{near(a)!r} (prepared: {near(b)!r}; they differ at character {at + 1})"


def windows_of(records) -> str:
    """How the records' images were decoded: prepare's data.image_window each carries, or their own range."""
    named = {"own range" if not r.get("image_window") else "[{:g}, {:g}]".format(*r["image_window"])
             for r in records}
    return ", ".join(sorted(named)) or "n/a"


def high_bit(reference: Path) -> bool:
    """Whether the prepared split's images include any a window applies to (its summary.json counts the modes;
    unknown, e.g. a file outside a prepared dir: assumed so)."""
    import json

    try:
        modes = json.loads((reference.parent / "summary.json").read_text(encoding="utf-8"))["images_by_mode"]
    except (OSError, ValueError, KeyError, TypeError):
        return True
    from flare_exp.data.decoding import HIGH_BIT_DEPTH  # the modes a window scales
    from flare_exp.data.wide_colour import LABELS

    return not isinstance(modes, dict) or any(mode in HIGH_BIT_DEPTH or mode in LABELS for mode in modes)


def same_answer(given, prepared) -> bool:
    """The same text, or the same number written another way: Excel's "Convert to Number" stores "60.0" as 60, a
    tool writes 61.0 for "61". Only a whole answer that is a number counts so ("60 mm" is not 60). A worksheet
    holds the prepared text as it can store it (control characters dropped, cut at a cell's limit)."""
    from flare_exp.cells import as_stored

    if str(given) == str(prepared) or isinstance(prepared, str) and str(given) == as_stored(prepared):
        return True
    numbers = [_number(v) for v in (given, prepared)]
    return None not in numbers and numbers[0] == numbers[1]


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value.replace("_", "x") if isinstance(value, str) else value)  # "6_0" is no number here
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def coverage(rows: list[dict], reference: Path, total: int) -> dict:
    """A file that answers part of its split (``total`` questions), or a split prepare left questions out of
    (data/rejects.py): the report says how much (else a subset reads as the whole)."""
    answered = len({r.get("id") for r in rows})
    rejected = rejected_questions(reference)
    said = {}
    if answered < total:
        said["coverage"] = (f"{total - answered} of the {total} questions of {reference} have no prediction: the "
                            f"numbers cover the {answered} answered (a subset asked for, or a cut file)")
    split = Path(reference).name.removesuffix(".jsonl")
    if rejected and rejected["count"] is None:
        said["rejected_at_prepare"] = (f"{describe_rejected(rejected, split)} may be in no prepared split: the "
                                       f"numbers cover {answered} questions, maybe not all of the split's")
    elif rejected:
        said["rejected_at_prepare"] = (f"{describe_rejected(rejected, split)} are in no prepared split: the numbers "
                                       f"cover {answered} of the split's {total + rejected['count']} questions")
    return said
