"""FLARE's evaluator keys its ground truth by ImageName||Question, the last record of a key winning, whatever the
record holds. prepare keeps, of two records of one key, the later (accept_records); but a later record that
prepare rejects ("n/a" as a regression answer, a null, a missing image) never reaches that choice: the earlier
stays for training and inference, while FLARE's evaluator reads the later one's Answer (an infinite MAE for
"n/a"). The kept record then carries the later one's raw answer and TaskType (eval's caveat gives FLARE's number
from them: flare_exp.metrics.flare_reading), and the reject is a duplicate, not a question the split lacks."""
from __future__ import annotations

from flare_exp.data import records as R
from flare_exp.data.rejects import DUPLICATE


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
    """What a rejected record leaves for ``apply_later_answers``: its id, and its raw Answer and TaskType."""
    key = key_of(raw, dataset, split)
    return {} if key is None else {"id": key, "_raw_answer": raw.get("Answer"), "_raw_task_type": raw.get("TaskType")}


def apply_later_answers(by_split: dict[str, list[dict]], rejects: list[dict]) -> int:
    """Each kept record whose key a later, rejected record repeats takes that record's raw answer and TaskType as
    FLARE reads them; the reject is named a duplicate. Returns how many records changed."""
    kept = {r["id"]: r for rows in by_split.values() for r in rows}
    changed = 0
    for reject in sorted(rejects, key=lambda r: (r["file"], r["index"])):  # the last one of a key wins
        raw_answer, raw_type = reject.pop("_raw_answer", None), reject.pop("_raw_task_type", None)
        record = kept.get(reject.get("id"))
        at = record.get("_at") if record is not None else None
        if at is None or at[0] != reject["file"] or at[1] > reject["index"]:  # none kept, or kept after it
            continue
        answer = record.get("answer")
        record.pop("raw_answer", None)
        if raw_answer != answer:
            record["raw_answer"] = raw_answer
        record["raw_task_type"] = raw_type
        reject["reason"] = (f"{DUPLICATE} whose later record prepare refuses ({reject['reason']}): the earlier "
                            f"answer {answer!r} kept for training; FLARE's evaluator reads this one (eval's caveat "
                            "says its number)")
        changed += 1
    return changed
