"""prepare's ``rejects.jsonl``: the questions it left out of its splits (file, index, reason, split), and what
they mean downstream. FLARE scores every question of a split, so a test question whose image prepare rejected
is one a submission cannot answer, and a val question left out is one the metrics do not cover: infer and eval
count them from here instead of trusting the prepared split's length."""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from flare_exp.data.images import OUTSIDE_ROOT, PROCESSOR_REFUSES, SMALLER_THAN_A_PATCH
from flare_exp.io import read_jsonl

log = logging.getLogger(__name__)

REJECTS = "rejects.jsonl"
# a second record of an ImageName||Question the split keeps once: its question is answered by the kept one
DUPLICATE = "duplicate ImageName||Question"
SPLIT_FILES = ("train.jsonl", "val.jsonl", "test.jsonl")


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
    the file is no prepared split (another infer.input_file)."""
    split_file = Path(split_file)
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


def datasets_recorded_without_questions(split_file: Path, present: set[str] = frozenset()) -> list[str]:
    """The datasets prepare found question files of in other splits but none in this prepared split's FLARE
    folders, as it recorded them (its summary.json, question_files.datasets_without_questions; [] for a file
    that is no prepared split, or a prepare before the record), those with records in the split (``present``)
    aside. A value summary.json does not hold as a list of names (a hand edit) is said and read as none."""
    import json

    split_file = Path(split_file)
    if split_file.name not in SPLIT_FILES:
        return []
    summary = split_file.parent / "summary.json"
    try:
        lacking = json.loads(summary.read_text(encoding="utf-8")).get("datasets_without_questions") or {}
        lacking = lacking.get(split_file.name.removesuffix(".jsonl")) or []
    except (OSError, ValueError, AttributeError, TypeError):
        return []
    if not isinstance(lacking, list) or not all(isinstance(d, str) for d in lacking):
        log.warning("%s: datasets_without_questions is not a list of dataset names (%r): not read; rerun stage=prepare "
                    "with overwrite=true to record it again", summary, lacking)
        return []
    return [d for d in lacking if d not in present]
