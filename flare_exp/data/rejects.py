"""prepare's ``rejects.jsonl``: the questions it left out of its splits (file, index, reason, split), and what
they mean downstream. FLARE scores every question of a split, so a test question whose image prepare rejected
is one a submission cannot answer, and a val question left out is one the metrics do not cover: infer and eval
count them from here instead of trusting the prepared split's length."""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from flare_exp.data.images import OUTSIDE_ROOT, PROCESSOR_REFUSES, SMALLER_THAN_A_PATCH
from flare_exp.io import read_jsonl

log = logging.getLogger(__name__)

REJECTS = "rejects.jsonl"
# a second record of an ImageName||Question the split keeps once: its question is answered by the kept one
DUPLICATE = "duplicate ImageName||Question"
SPLIT_FILES = ("train.jsonl", "val.jsonl", "test.jsonl")
SPLITS = {name.removesuffix(".jsonl") for name in SPLIT_FILES}


def reason_kind(reason: str) -> str:
    """A reject's reason without its particulars (the file, the sizes), for counting."""
    if reason.startswith(DUPLICATE):  # the kind before its particulars: "... whose later record is kept (...)"
        return reason.split(" (", 1)[0]
    for prefix in ("missing image", "corrupt image", "decompression bomb", "missing key", "unknown TaskType",
                   OUTSIDE_ROOT, SMALLER_THAN_A_PATCH, PROCESSOR_REFUSES):
        if reason.startswith(prefix):
            return prefix
    if reason.startswith("regression answer ") and "is not a finite number" in reason:
        return "regression answer not a finite number" + (" (decimal comma)" if "decimal comma" in reason else "")
    return reason


def rejected_questions(split_file: Path) -> dict | None:
    """The questions of a prepared split (``<prepared dir>/<split>.jsonl``) that prepare left out, its duplicates
    aside: {"count", "reasons" (kind -> count), "file"}; where prepare rejected questions but which split they
    were for cannot be told (its rejects.jsonl predates the split tags, cannot be read, or is gone while its
    summary.json counts rejects): {"count": None, "at_most", "why", "file"}. None when none were rejected or
    the file is no prepared split (another infer.input_file). Links are followed to the prepared dir."""
    split_file = Path(split_file).resolve()
    if split_file.name not in SPLIT_FILES:
        return None
    rejects, split = split_file.parent / REJECTS, split_file.name.removesuffix(".jsonl")
    if not rejects.is_file():
        counted = _summary_rejects(split_file.parent / "summary.json")
        return _unknown(counted, f"{rejects} is gone, while prepare's summary.json counts them", rejects)
    try:
        entries = [r for r in read_jsonl(rejects) if isinstance(r, dict)
                   and not str(r.get("reason", "")).startswith(DUPLICATE)]
    except (OSError, ValueError) as e:
        counted = _summary_rejects(split_file.parent / "summary.json")
        return _unknown(counted, f"{rejects} cannot be read ({type(e).__name__}: {str(e)[:120]})", rejects)
    untagged = [r for r in entries if "split" not in r]
    if untagged:
        return _unknown(len(untagged), f"{rejects} names no split for them (a prepare before the split tags)",
                        rejects)
    counted = _summary_rejects(split_file.parent / "summary.json")
    if counted is not None and counted != len(entries):  # lines deleted or added by hand since prepare wrote both
        return _unknown(max(counted, len(entries)), f"{rejects} lists {len(entries)} rejected question(s) and "
                                                    f"prepare's summary.json {counted}", rejects)
    left_out = [r for r in entries if r.get("split") == split]
    if not left_out:
        return None
    return {"count": len(left_out), "file": str(rejects),
            "reasons": dict(Counter(reason_kind(str(r.get("reason", ""))) for r in left_out).most_common())}


def _summary_rejects(summary: Path) -> int | None:
    """The questions prepare's summary.json counts as rejected, duplicates aside (None: no readable count)."""
    import json

    try:
        kinds = json.loads(summary.read_text(encoding="utf-8")).get("rejects") or {}
        return sum(int(n) for kind, n in kinds.items() if not str(kind).startswith(DUPLICATE))
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def _unknown(at_most: int | None, why: str, rejects: Path) -> dict | None:
    return None if not at_most else {"count": None, "at_most": at_most, "why": why, "file": str(rejects)}


def describe_rejected(rejected: dict, split: str) -> str:
    """'3 question(s) of the val split that prepare rejected (corrupt image: 2, ...; see .../rejects.jsonl)', or
    for rejects no split can be told of: 'up to 3 question(s) of the val split that prepare rejected (which split
    each was for is not known: ...; rerun stage=prepare with overwrite=true to count them)'."""
    if rejected["count"] is None:
        return (f"up to {rejected['at_most']} question(s) of the {split} split that prepare rejected (which split "
                f"each was for is not known: {rejected['why']}; rerun stage=prepare with overwrite=true to count them)")
    reasons = ", ".join(f"{kind}: {n}" for kind, n in rejected["reasons"].items())
    return (f"{rejected['count']} question(s) of the {split} split that prepare rejected ({reasons}; see "
            f"{rejected['file']})")


# the summary.json keys of the datasets a prepared split has no question of: their question files missing or
# empty under its FLARE folders, or left out by data.datasets (recorded for test only)
LACKING = ("datasets_without_questions", "datasets_left_out")


class SplitCheck(NamedTuple):
    lacking: dict[str, list[str]]  # summary key (LACKING): [datasets]
    unverified: str | None  # why the file cannot be held against prepare's record, or None


def what_the_split_lacks(split_file: Path, records: list[dict]) -> SplitCheck:
    """(the datasets it lacks by summary key (LACKING), why the file cannot be checked) for the ``records`` read from
    ``split_file`` (links followed): the datasets prepare recorded the split as having no question of (its
    summary.json; those with records in the file aside), and, where the file cannot be held against prepare's
    record, why: no prepared split (a copy, a part, a file of one's own), a summary.json that does not read, another
    count of records than prepare wrote (edited or cut since), a value that is not {split: [names]} (a hand edit).
    A key a prepare before the record did not write is read as none."""
    import json

    split_file = Path(split_file).resolve()
    summary = split_file.parent / "summary.json"
    if split_file.name not in SPLIT_FILES or not summary.exists():
        return SplitCheck({}, f"{split_file} is no prepared split (a data.prepared_dir's {', '.join(SPLIT_FILES)} "
                                  "beside its summary.json): a copy, a part or a file of one's own")
    try:
        recorded = json.loads(summary.read_text(encoding="utf-8"))
        if not isinstance(recorded, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        return SplitCheck({}, f"{summary} does not read ({e})")
    split = split_file.name.removesuffix(".jsonl")
    written = recorded.get("records", {}).get(split) if isinstance(recorded.get("records"), dict) else None
    if written != len(records):
        return SplitCheck({}, f"{split_file} holds {len(records)} records where prepare wrote {written} (edited or "
                                  "cut since)")
    present, out = {r.get("dataset") for r in records}, {}
    for key in LACKING:
        by_split = recorded.get(key, {})
        lacking = by_split.get(split, []) if isinstance(by_split, dict) and set(by_split) <= SPLITS else None
        if not isinstance(lacking, list) or not all(isinstance(d, str) for d in lacking):
            return SplitCheck({}, f"{summary}: {key} is not a list of dataset names by split ({by_split!r}; edited "
                                  "since?)")
        lacking = [d for d in lacking if d not in present]
        if lacking:
            out[key] = lacking
    return SplitCheck(out, None)
