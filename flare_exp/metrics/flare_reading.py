"""Where FLARE's evaluator, reading the question file as it is, scores other rows than eval does: prepare
normalises what it can read for certain (a multi-label answer given as a list joined, a regression answer's
percent sign dropped, "Multilabel Classification" read as multi-label), while FLARE's evaluator leaves a list
answer's pair out, reads "40 %" as no number (an infinite MAE) and gives a TaskType it does not spell its way no
number. Prepared records keep the raw ``raw_answer`` (where it differs) and ``raw_task_type``: the official block
keeps eval's reading and a caveat gives FLARE's number beside it."""
from __future__ import annotations

import math

from flare_exp.metrics.official import FLARE_TASK_TYPE, OFFICIAL_METRIC, official_block

RAW_FIELDS = ("raw_answer", "raw_task_type")  # joined from the prepared split with the answers


def flare_task(raw_task_type) -> str | None:
    """The task FLARE's evaluator scores a question file's TaskType as (its ``calculate_task_metrics``), or None
    where it gives that TaskType no number."""
    if not isinstance(raw_task_type, str):
        return None
    name = raw_task_type.strip().lower()
    if name in ("classification", "multi-label classification", "regression", "counting"):
        return {"multi-label classification": "multi_label", "counting": "regression"}.get(name, name)
    return "report_generation" if name and name in "report_generation" else None  # its test is a substring test


def as_flare_reads(task: str, rows: list[dict]) -> tuple[list[dict], list[str]]:
    """The rows FLARE's evaluator scores in ``task``'s group, with the answers as the question file gives them;
    and what differs from eval's reading, one phrase per kind."""
    kept, other_type = [], {}
    for row in rows:
        if "raw_task_type" in row and flare_task(row["raw_task_type"]) != task:
            other_type[repr(row["raw_task_type"])] = other_type.get(repr(row["raw_task_type"]), 0) + 1
            continue
        kept.append({**row, "answer": row["raw_answer"]} if "raw_answer" in row else row)
    why = [f"{n} row(s) of TaskType {name}, which it does not score as {FLARE_TASK_TYPE[task]}"
           for name, n in sorted(other_type.items())]
    raw = [r["raw_answer"] for r in kept if "raw_answer" in r]
    lists = sum(isinstance(a, list) for a in raw)
    if lists:
        why.append(f"{lists} answer(s) given as a list, which it leaves out (prepare joined them)")
    if raw and len(raw) > lists:
        example = next(a for a in raw if not isinstance(a, list))
        why.append(f"{len(raw) - lists} answer(s) as the file writes them (e.g. {example!r}), which prepare normalised")
    return kept, why


def flare_reading_caveats(by_task: dict[str, list[dict]]) -> list[str]:
    """One line per task whose FLARE number, on the question file as it is, differs from eval's: both numbers
    and why. Report generation: the rows FLARE gives no green_score are said (the judge is not run again)."""
    lines = []
    for task, rows in sorted(by_task.items()):
        if not any(k in row for row in rows for k in RAW_FIELDS):
            continue
        read, why = as_flare_reads(task, rows)
        if not why:
            continue
        name = OFFICIAL_METRIC[task]
        if task == "report_generation":
            lines.append(f"{FLARE_TASK_TYPE[task]}: FLARE's evaluator, reading the question file as it is, scores "
                         f"{len(read)} of these {len(rows)} rows: {'; '.join(why)}")
            continue
        ours = official_block(task, rows).get(name)
        theirs = official_block(task, read).get(name) if read else None
        if _same(ours, theirs):
            continue
        lines.append(f"{FLARE_TASK_TYPE[task]}: {name} {_shown(theirs)} by FLARE's evaluator on the question file "
                     f"as it is, {_shown(ours)} here: {'; '.join(why)}")
    return lines


def _same(a, b) -> bool:
    """Equal to the sums' rounding (2/3 summed two ways), infinities and NaNs alike; None only to None."""
    if a is None or b is None:
        return a is b
    if math.isnan(a) or math.isnan(b) or math.isinf(a) or math.isinf(b):
        return a == b or (math.isnan(a) and math.isnan(b))
    return abs(a - b) <= 1e-9 * max(1.0, abs(b))


def _shown(value) -> str:
    """A number as the report's tables show it (four decimals, Infinity), "none" for no number."""
    if value is None:
        return "none"
    return ("-" if value < 0 else "") + "Infinity" if math.isinf(value) else f"{value:.4f}"
