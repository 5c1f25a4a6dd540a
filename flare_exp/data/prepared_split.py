"""A prepared split as sft, rl and infer read it: the JSONL prepare wrote, checked record by record, since a person
may have edited it since (a line copied twice, a key deleted, a path typed in). What prepare would never have
written is one error naming the file, the records and what is wrong, before any model loads: not a traceback
mid-run, nor a run that finishes and leaves eval to refuse its predictions."""
from __future__ import annotations

from pathlib import Path

from flare_exp.data.images import inside
from flare_exp.data.records import TASK_TYPES
from flare_exp.io import read_jsonl

# the keys every prepared record has, with their type (the others are prepare's too, but not read to decode)
REQUIRED = {"id": str, "dataset": str, "task_type": str, "images": list, "messages": list}
SHOWN = 5  # problems named in the error; the rest counted


def read_prepared_split(path: str | Path) -> list[dict]:
    """The records of a prepared split (read_jsonl), refused as a whole if any is not as prepare writes them."""
    path = Path(path)
    rows = read_jsonl(path)
    problems, first_seen = [], {}
    for number, record in enumerate(rows, 1):
        problem = record_problem(record)
        if problem is None:
            key = record["id"]
            if key in first_seen:
                problem = f"the id of record {first_seen[key]} again (a line copied twice?)"
            first_seen.setdefault(key, number)
        if problem is not None:
            named = f" (id {record['id']})" if isinstance(record, dict) and isinstance(record.get("id"), str) else ""
            problems.append(f"record {number}{named}: {problem}")
    if problems:
        more = f"; and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise ValueError(f"{path}: {len(problems)} record(s) are not as prepare writes them (edited since?): "
                         f"{'; '.join(problems[:SHOWN])}{more}. Undo the edit, or rerun stage=prepare "
                         "(overwrite=true) to write the split again")
    return rows


def answer_problem(answer) -> str | None:
    """Why a prepared record's answer is not one prepare writes (eval would score it 0 against the predictions'
    text), or None: null (a test split's) or non-empty text."""
    if answer is not None and not isinstance(answer, str):
        return (f"a {type(answer).__name__}, not text (prepare writes every answer as text: labels joined with ';', "
                "numbers as written)")
    if isinstance(answer, str) and not answer.strip():  # prepare refuses an empty answer
        return "empty (prepare writes none: a test split's answers are null)"
    return None


def record_problem(record) -> str | None:
    """What keeps one record from being read as prepare wrote it, or None."""
    if not isinstance(record, dict):
        return f"a {type(record).__name__}, not a record"
    for key, kind in REQUIRED.items():
        if key not in record:
            return f"no {key!r}"
        if not isinstance(record[key], kind):
            return f"{key!r} is a {type(record[key]).__name__}, not a {kind.__name__}"
    if record["task_type"] not in TASK_TYPES:
        return f"task_type {record['task_type']!r} is none of {', '.join(TASK_TYPES)}"
    wrong = answer_problem(record.get("answer"))
    if wrong:
        return f"'answer' is {wrong}"
    for image in record["images"]:
        if not isinstance(image, str) or not image:
            return f"an image path {image!r} that is no path"
        if inside(Path("."), image) is None:  # prepare's own rule for a record's image path
            return (f"the image {image!r} lies outside data.root (prepare writes paths inside it, and a stage "
                    "opens no file elsewhere)")
    shown = sum(1 for message in record["messages"] if isinstance(message, dict)
                for part in (message.get("content") if isinstance(message.get("content"), list) else [])
                if isinstance(part, dict) and part.get("type") == "image")
    if shown != len(record["images"]):
        return (f"its messages show {shown} image(s) and its 'images' list {len(record['images'])}: each view is "
                "one image entry in the user's message")
    if not any(isinstance(m, dict) and m.get("role") == "user" for m in record["messages"]):
        return "no user message (the question)"
    return None
