"""prepare's ``rejects.jsonl``: the questions it left out of its splits (file, index, reason, split), and what
they mean downstream. FLARE scores every question of a split, so a test question whose image prepare rejected
is one a submission cannot answer, and a val question left out is one the metrics do not cover: infer and eval
count them from here instead of trusting the prepared split's length."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from flare_exp.data.images import OUTSIDE_ROOT, PROCESSOR_REFUSES, SMALLER_THAN_A_PATCH
from flare_exp.io import read_jsonl

REJECTS = "rejects.jsonl"
# a second record of an ImageName||Question the split keeps once: its question is answered by the kept one
DUPLICATE = "duplicate ImageName||Question"
SPLIT_FILES = ("train.jsonl", "val.jsonl", "test.jsonl")


def reason_kind(reason: str) -> str:
    """A reject's reason without its particulars (the file, the sizes), for counting."""
    for prefix in (f"{DUPLICATE} with another answer", "missing image", "corrupt image", "decompression bomb",
                   "missing key", "unknown TaskType", OUTSIDE_ROOT, SMALLER_THAN_A_PATCH, PROCESSOR_REFUSES):
        if reason.startswith(prefix):
            return prefix
    return reason


def rejected_questions(split_file: Path) -> dict | None:
    """The questions of a prepared split (``<prepared dir>/<split>.jsonl``) that prepare left out, its duplicates
    aside: {"count", "reasons" (kind -> count), "file"}; None when there are none, or the file is no prepared
    split (another infer.input_file), or its rejects.jsonl predates the split tags (a prepare before them)."""
    split_file = Path(split_file)
    rejects = split_file.parent / REJECTS
    if split_file.name not in SPLIT_FILES or not rejects.is_file():
        return None
    split = split_file.name.removesuffix(".jsonl")
    try:
        left_out = [r for r in read_jsonl(rejects) if isinstance(r, dict) and r.get("split") == split
                    and not str(r.get("reason", "")).startswith(DUPLICATE)]
    except (OSError, ValueError):
        return None  # unreadable: prepare's own summary still says what it rejected
    if not left_out:
        return None
    return {"count": len(left_out), "file": str(rejects),
            "reasons": dict(Counter(reason_kind(str(r.get("reason", ""))) for r in left_out).most_common())}


def describe_rejected(rejected: dict, split: str) -> str:
    """'3 question(s) of the val split that prepare rejected (corrupt image: 2, ...; see .../rejects.jsonl)'."""
    reasons = ", ".join(f"{kind}: {n}" for kind, n in rejected["reasons"].items())
    return (f"{rejected['count']} question(s) of the {split} split that prepare rejected ({reasons}; see "
            f"{rejected['file']})")
