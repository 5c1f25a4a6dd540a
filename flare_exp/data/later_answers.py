"""FLARE's evaluator keys its ground truth by ImageName||Question, the last record of a key winning, whatever the
record holds. prepare keeps, of two records of one key, the later (accept_records); but a later record that
prepare rejects ("n/a" as a regression answer, a null, a missing image) never reaches that choice: the earlier
stays for training and inference, while FLARE's evaluator reads the later one's Answer (an infinite MAE for
"n/a"). The kept record then carries the later one's raw answer and TaskType (eval's caveat gives FLARE's number
from them: flare_exp.metrics.flare_reading), and the reject is a duplicate, not a question the split lacks."""
from __future__ import annotations

import logging

from flare_exp.data import records as R
from flare_exp.data.rejects import DUPLICATE

log = logging.getLogger(__name__)


def key_of(raw, dataset: str, split: str) -> str | None:
    """The id a raw question record would have (its ImageName and Question usable), else None."""
    if not isinstance(raw, dict) or R.image_name_problem(raw.get("ImageName")) is not None:
        return None
    question = raw.get("Question")
    if not isinstance(question, str) or not question.strip():
        return None
    try:
        return R.record_id(dataset, split, raw["ImageName"], question.strip())
    except (TypeError, ValueError):
        return None


def shadow(raw, dataset: str, split: str) -> dict:
    """What a rejected record leaves for ``apply_later_answers``: its id, and its Answer (``""`` where it has none:
    FLARE's ``get("Answer", "")``) and TaskType as FLARE reads them."""
    key = key_of(raw, dataset, split)
    if key is None:
        return {}
    return {"id": key, "_raw_answer": raw.get("Answer", ""), "_raw_task_type": raw.get("TaskType")}


def record_shadow(record: dict) -> dict:
    """``shadow`` of a converted record that prepare rejects later (its image)."""
    return {"id": record["id"], "_raw_answer": record.get("raw_answer", record.get("answer")),
            "_raw_task_type": record.get("raw_task_type")}


def read_later(kept: dict, later: dict, at: tuple) -> None:
    """FLARE reads ``later`` (a record of ``kept``'s question further on, at ``at``; a converted record, or a
    reject's ``shadow``): its raw answer and TaskType are the kept record's raw ones; its own answer stays the one
    it trains and is scored on."""
    raw_answer = later.get("raw_answer", later.get("answer"))
    kept.pop("raw_answer", None)
    if raw_answer != kept.get("answer"):
        kept["raw_answer"] = raw_answer
    kept["raw_task_type"], kept["_at"] = later.get("raw_task_type"), at


def apply_later_answers(by_split: dict[str, list[dict]], rejects: list[dict]) -> int:
    """Each rejected record of a kept question: before the kept one, a duplicate (FLARE reads the kept); after it,
    what FLARE reads (``read_later``), a duplicate too. A question rejected twice is one question left out.
    Returns how many kept records FLARE reads otherwise."""
    kept = {r["id"]: r for rows in by_split.values() for r in rows}
    refused, changed = set(), 0
    for reject in sorted(rejects, key=lambda r: (r["file"], r["index"])):  # prepare's reading order
        if "_raw_answer" not in reject:
            continue
        later = {"raw_answer": reject.pop("_raw_answer"), "raw_task_type": reject.pop("_raw_task_type")}
        key, at, why = reject["id"], (reject["file"], reject["index"]), reject["reason"]
        record = kept.get(key)
        if record is None:
            if key in refused:
                reject["reason"] = f"{DUPLICATE} also refused ({why})"
            refused.add(key)
        elif at < tuple(record["_at"]):
            reject["reason"] = f"{DUPLICATE} whose later record is kept ({why})"
        else:
            read_later(record, later, at)
            reject["reason"] = (f"{DUPLICATE} whose later record prepare refuses ({why}): the earlier answer "
                                f"{record.get('answer')!r} kept for training; FLARE's evaluator reads this one (eval's "
                                "caveat says its number)")
            changed += 1
    return changed


def say_shared_keys(by_split: dict) -> int:
    """Questions whose ImageName||Question another dataset's question of their FLARE split has too, said; their
    number."""
    groups = [g for rows in by_split.values() for g in R.keys_shared_across_datasets(r["id"] for r in rows)]
    if groups:
        log.warning("prepare: %d question(s) share their ImageName||Question with another dataset's question of the "
                    "same FLARE split, e.g. %s: FLARE's evaluator joins answers to questions by ImageName||Question "
                    "over all datasets, so it scores one question of each such key; eval scores each (its report "
                    "says so)", sum(map(len, groups)), " and ".join(groups[0]))
    return sum(map(len, groups))
