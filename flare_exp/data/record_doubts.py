"""What prepare keeps but a careful user wants named (counted in summary.json with the first ones, every case in
doubts.jsonl, one warning per kind), per split:

- the same question on the same pixels with answers that disagree (a picture filed twice under two names, its
  labels edited in one copy): the model is trained on both, FLARE scores against both;
- a record that shows one picture more than once (a view listed twice, or two names of one file);
- a bone-resorption answer outside 0-100 (it is a percentage: -5 or 250 is a typo);
- records of a dataset under another task type than the rest of it (a hand-edited TaskType: the dataset is then
  trained and scored as several tasks).
"""
from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict

from flare_exp.data.records import label_separator

log = logging.getLogger(__name__)
SHOWN = 10  # the cases named in summary.json (all are counted, and listed in doubts.jsonl)
DOUBTS = "doubts.jsonl"
PERCENT_DATASETS = ("boneresorption",)


def answer_key(row: dict):
    """An answer as it is scored: a multi-label answer as its set of labels (their order does not count), a
    number as its value, anything else as its text without surrounding space."""
    answer = row.get("answer")
    if not isinstance(answer, str):
        return answer
    if row.get("task_type") == "multi_label":
        sep = label_separator(row.get("dataset", ""), answer)
        return frozenset(label.strip().casefold() for label in answer.split(sep) if label.strip())
    if row.get("task_type") == "regression":
        try:
            return float(answer)
        except ValueError:
            return answer.strip()
    return answer.strip()


def conflicting_answers(rows: list[dict]) -> list[list[dict]]:
    """Groups of records of one split with the same dataset, question (case and spacing aside) and images (by
    their decoded pixels, ``_pixels``) whose answers differ."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        if row.get("_pixels") and all(row["_pixels"]):  # every image's digest known
            question = " ".join(str(row.get("question", "")).split()).casefold()
            groups[(row["dataset"], row["task_type"], tuple(sorted(row["_pixels"])), question)].append(row)
    return [group for group in groups.values() if len({_hashable(answer_key(r)) for r in group}) > 1]


def _hashable(key):
    return repr(key) if isinstance(key, (list, dict)) else key


def repeated_images(rows: list[dict]) -> list[dict]:
    """Records that show one picture more than once (the same path twice, or two files of the same pixels)."""
    def pixels(row):
        return [d for d in row.get("_pixels") or () if d]

    return [row for row in rows if len(set(row["images"])) < len(row["images"])
            or len(set(pixels(row))) < len(pixels(row))]


def out_of_range(rows: list[dict]) -> list[dict]:
    """Regression answers of a percentage dataset outside 0-100."""
    out = []
    for row in rows:
        key = answer_key(row) if row.get("task_type") == "regression" else None
        if row.get("dataset") in PERCENT_DATASETS and isinstance(key, float) and math.isfinite(key) \
                and not 0 <= key <= 100:
            out.append(row)
    return out


def other_task_types(rows: list[dict]) -> list[dict]:
    """Records whose task type is not their dataset's commonest one (over every split)."""
    kinds: dict[str, Counter] = defaultdict(Counter)
    for row in rows:
        kinds[row["dataset"]][row["task_type"]] += 1
    usual = {dataset: counts.most_common(1)[0][0] for dataset, counts in kinds.items()}
    return [row for row in rows if row["task_type"] != usual[row["dataset"]]]


def _named(row: dict) -> str:
    """A record as a user finds it in the download: its images (under data.root), then its id."""
    return f"{' + '.join(row['images'])} ({row['id']})"


def _listed(kind: str, split: str, rows: list[dict]) -> dict:
    """One line of doubts.jsonl: a case with every record it involves, as a user finds them in the download."""
    return {"kind": kind, "split": split, "records": [
        {"id": r["id"], "images": r["images"], "question": r.get("question"), "answer": r.get("answer")} for r in rows]}


def record_doubts(by_split: dict[str, list[dict]]) -> tuple[dict, list[dict]]:
    """The kinds above, counted over the splits with the first named (summary.json), every case listed
    (doubts.jsonl's lines), each kind said once in the log."""
    conflicts = [(split, group) for split, rows in by_split.items() for group in conflicting_answers(rows)]
    # and across splits (data.allow_overlap keeps a picture in two): eval scores against the other split's answer
    conflicts += [("+".join(sorted({r["split"] for r in group})), group) for group in
                  conflicting_answers([r for rows in by_split.values() for r in rows])
                  if len({r["split"] for r in group}) > 1]
    repeated = [(split, row) for split, rows in by_split.items() for row in repeated_images(rows)]
    ranged = [(split, row) for split, rows in by_split.items() for row in out_of_range(rows)]
    mixed = [(row["split"], row) for row in other_task_types([r for rows in by_split.values() for r in rows])]
    said = {
        "same_pixels_other_answers": {"count": len(conflicts), "first": [
            f"{split}: " + "; ".join(f"{_named(r)} = {str(r.get('answer'))[:40]!r}" for r in group[:4])
            for split, group in conflicts[:SHOWN]]},
        "repeated_images_in_a_record": {"count": len(repeated),
                                        "first": [f"{split}: {_named(r)}" for split, r in repeated[:SHOWN]]},
        "percentages_out_of_range": {"count": len(ranged), "first": [
            f"{split}: {_named(r)} = {r.get('answer')!r}" for split, r in ranged[:SHOWN]]},
        "other_task_type_than_its_dataset": {"count": len(mixed), "first": [
            f"{split}: {_named(r)} is {r['task_type']}" for split, r in mixed[:SHOWN]]},
    }
    listed = ([_listed("same_pixels_other_answers", split, group) for split, group in conflicts]
              + [_listed("repeated_images_in_a_record", split, [r]) for split, r in repeated]
              + [_listed("percentages_out_of_range", split, [r]) for split, r in ranged]
              + [_listed("other_task_type_than_its_dataset", split, [r]) for split, r in mixed])
    every = f"{DOUBTS} lists all"
    if conflicts:
        log.warning("prepare: %d question(s) are asked of the same pixels under several names with answers that "
                    "differ, e.g. %s: all are kept (the model is trained on each, FLARE scores against each); "
                    "correct the labels or remove the copy. %s (same_pixels_other_answers)", len(conflicts),
                    said["same_pixels_other_answers"]["first"][0], every)
    if repeated:
        log.warning("prepare: %d record(s) show one picture more than once (a view listed twice, or two names of "
                    "one file), e.g. %s: kept, the model sees it twice; %s (repeated_images_in_a_record)",
                    len(repeated), said["repeated_images_in_a_record"]["first"][0], every)
    if ranged:
        log.warning("prepare: %d percentage answer(s) lie outside 0-100, e.g. %s: kept as written (a typo?); "
                    "%s (percentages_out_of_range)", len(ranged), said["percentages_out_of_range"]["first"][0],
                    every)
    if mixed:
        datasets = sorted({r["dataset"] for _, r in mixed})
        log.warning("prepare: %d record(s) of %s have another task type than the rest of their dataset, e.g. %s: "
                    "kept as written (the dataset is trained and scored as several tasks; a TaskType edited by "
                    "hand?); %s (other_task_type_than_its_dataset)", len(mixed), ", ".join(datasets),
                    said["other_task_type_than_its_dataset"]["first"][0], every)
    return said, listed
