"""Where FLARE's evaluator, reading the question file as it is, scores other rows than eval does: prepare
normalises what it can read for certain (a multi-label answer given as a list joined, a regression answer's
percent sign dropped, "Multilabel Classification" read as multi-label), while FLARE's evaluator leaves a list
answer's pair out, reads "40 %" as no number (an infinite MAE) and gives a TaskType it does not spell its way no
number. Prepared records keep the raw ``raw_answer`` (where it differs) and ``raw_task_type``: the official block
keeps eval's reading and a caveat gives FLARE's number beside it."""
from __future__ import annotations

from collections import Counter

from flare_exp.metrics.official import FLARE_TASK_TYPE, OFFICIAL_METRIC, agrees, official_block
from flare_exp.reports.tables import fmt

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


def flare_group(row: dict, task: str) -> str | None:
    """The group FLARE's evaluator scores the row in: its TaskType as the question file gives it, stripped and
    lower-cased (each such text is a group with a number of its own: "regression" and "counting" are two MAEs),
    or None where it gives that TaskType no number."""
    raw = raw_task_type(row, task)
    return raw.strip().lower() if flare_task(raw) is not None else None


def raw_task_type(row: dict, task: str):
    """The TaskType the row's question file gives; a row prepared before it was kept: its task's own."""
    return row.get("raw_task_type", FLARE_TASK_TYPE[task])


def flare_groups(by_task: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """FLARE's group (flare_group) -> the rows its evaluator scores there, each with the answer as the question
    file gives it: a row goes where its raw TaskType puts it (maybe another task's group than eval's, or none)."""
    groups: dict[str, list[dict]] = {}
    for task, rows in by_task.items():
        for row in rows:
            group = flare_group(row, task)
            if group is not None:
                groups.setdefault(group, []).append({**row, "answer": row["raw_answer"]} if "raw_answer" in row
                                                    else row)
    return groups


def differences(task: str, ours: list[dict], theirs: list[dict], groups: int = 1) -> list[str]:
    """What FLARE's reading of ``task``'s rows (``theirs``, in ``groups`` groups) differs by, one phrase per kind."""
    why = []
    stays = [flare_task(raw_task_type(r, task)) == task for r in ours]
    gone = [r for r, kept in zip(ours, stays) if not kept]
    come = [r for r in theirs if r["task_type"] != task]
    for rows, verb in ((gone, "which it does not score as"), (come, "which it scores as")):
        names = Counter(repr(row.get("raw_task_type")) for row in rows)
        why += [f"{n} row(s) of TaskType {name}, {verb} {FLARE_TASK_TYPE[task]}" for name, n in sorted(names.items())]
    raw = [r["raw_answer"] for r, kept in zip(ours, stays) if kept and "raw_answer" in r]
    lists = sum(isinstance(a, list) for a in raw)
    if lists:
        why.append(f"{lists} answer(s) given as a list, which it leaves out (prepare joined them)")
    if raw and len(raw) > lists:
        example = next(a for a in raw if not isinstance(a, list))
        why.append(f"{len(raw) - lists} answer(s) as the file writes them (e.g. {example!r}), which prepare normalised")
    if groups > 1:
        why.append(f"it scores them in {groups} groups by their TaskType's text, a number each, where eval pools them")
    return why


def flare_reading_caveats(by_task: dict[str, list[dict]]) -> list[str]:
    """One line per task whose FLARE number, on the question file as it is, differs from eval's: both numbers
    (FLARE's per group where it splits the task's rows by their TaskType's text) and why. Report generation: the
    rows FLARE gives no green_score are said (the judge is not run again)."""
    if not any(k in row for rows in by_task.values() for row in rows for k in RAW_FIELDS):
        return []
    groups, lines = flare_groups(by_task), []
    for task in sorted(set(by_task) | {flare_task(group) for group in groups}):
        names = sorted(group for group in groups if flare_task(group) == task)
        ours, theirs = by_task.get(task, []), [row for group in names for row in groups[group]]
        why = differences(task, ours, theirs, len(names))
        if not why:
            continue
        name = OFFICIAL_METRIC[task]
        if task == "report_generation":
            lines.append(f"{FLARE_TASK_TYPE[task]}: FLARE's evaluator, reading the question file as it is, scores "
                         f"{len(theirs)} of these {len(ours)} rows: {'; '.join(why)}")
            continue
        mine = official_block(task, ours).get(name) if ours else None
        flares = [official_block(task, groups[group]).get(name) for group in names]
        if len(names) > 1:
            shown = ", ".join(f"{_shown(value)} for {group!r} ({len(groups[group])} rows)"
                              for group, value in zip(names, flares))
            lines.append(f"{FLARE_TASK_TYPE[task]}: {name} {shown} by FLARE's evaluator on the question file as it "
                         f"is, {_shown(mine)} here: {'; '.join(why)}")
            continue
        flares = flares[0] if flares else None
        differ = mine is not flares if mine is None or flares is None else not agrees(mine, flares)
        if differ:  # not a rounding's difference (2/3 summed two ways)
            lines.append(f"{FLARE_TASK_TYPE[task]}: {name} {_shown(flares)} by FLARE's evaluator on the question file "
                         f"as it is, {_shown(mine)} here: {'; '.join(why)}")
    return lines


def shared_key_caveat(ids) -> list[str]:
    """A line where rows of different datasets share an ImageName||Question (their ids say so), which FLARE's
    evaluator cannot tell apart."""
    from flare_exp.data.records import keys_shared_across_datasets

    groups = keys_shared_across_datasets(ids)
    if not groups:
        return []
    return [f"{sum(map(len, groups))} row(s) share their ImageName||Question with another dataset's row (e.g. "
            f"{' and '.join(groups[0])}): FLARE's evaluator joins answers to questions by ImageName||Question over "
            "all datasets, so it scores one row of each such key, with the prediction its file lists last; each "
            "is scored here"]


def _shown(value) -> str:
    """A number as the report's tables show it (four decimals, Infinity), "none" for no number."""
    return "none" if value is None else fmt(value)
