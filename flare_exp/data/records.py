"""The prepared-record schema shared by every stage, and the FLARE facts it encodes.

One JSONL line per question::

    {"id", "dataset", "task_type", "raw_task_type", "split", "source_split", "modality",
     "image_name" (FLARE's raw ImageName, str or list), "images" (paths relative to data.root, frontal first),
     "question" (stripped; "raw_question": FLARE's own text, only where it had surrounding whitespace),
     "answer" (as text; null for test; "raw_answer": the file's own value, only where it differs: FLARE's
     evaluator reads that one), "messages" (Unsloth/TRL vision chat schema)}
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Any

# Our task type names: every stage, reward and metric is keyed by them.
TASK_TYPES = ("report_generation", "classification", "multi_label", "regression")

# FLARE's raw TaskType strings (compared after strip/lower/[-_ ] -> " ") -> our task type names.
_RAW_TASK_TYPES = {
    "report generation": "report_generation",
    "multi label classification": "multi_label",
    "multilabel classification": "multi_label",
    "classification": "classification",
    "regression": "regression",
    "counting": "regression",  # FLARE's evaluator scores a count as a regression answer (MAE)
    "multi label": "multi_label",  # ours, as a sheet or another tool may write it (MULTI_LABEL, Multi-label)
    "multilabel": "multi_label",
}

# Multi-label separators differ per dataset: chestdr joins labels with ", ", periapical with ";" (and one
# periapical label itself contains commas).
LABEL_SEPARATORS = {"chestdr": ",", "periapical": ";"}
# the FLARE 2025 Task 5 X-ray datasets as the download spells them (data.datasets' default)
FLARE_DATASETS = ("IU_XRay", "chestdr", "dental", "periapical", "boneresorption")

_VIEW_SUFFIX = re.compile(r"-(\d+)\.[A-Za-z0-9]+$")


def normalise_task_type(raw: str) -> str | None:
    key = re.sub(r"[-_\s]+", " ", str(raw).strip().lower())
    return _RAW_TASK_TYPES.get(key)


def label_separator(dataset: str, answer: str | None = None) -> str:
    if dataset in LABEL_SEPARATORS:
        return LABEL_SEPARATORS[dataset]
    return ";" if answer and ";" in answer else ","


def image_list(image_name: Any) -> list[str]:
    """FLARE's ImageName as a list, views ordered frontal first (IU_XRay '...-0.png' before '...-1.png')."""
    names = [image_name] if isinstance(image_name, str) else list(image_name)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"ImageName holds a {type(next(n for n in names if not isinstance(n, str))).__name__}")
    if len(names) > 1 and all(_VIEW_SUFFIX.search(n) for n in names):
        names = sorted(names, key=lambda n: int(_VIEW_SUFFIX.search(n).group(1)))
    return names


def image_name_problem(image_name: Any) -> str | None:
    """Why a raw ImageName is unusable (null, a number, an empty list, a list holding a non-string), or None."""
    if isinstance(image_name, str):
        return None if image_name.strip() else "empty ImageName"
    if not isinstance(image_name, list):
        return f"ImageName must be a string or a list of strings, got {_json_type(image_name)}"
    if not image_name:
        return "empty ImageName list"
    bad = [n for n in image_name if not isinstance(n, str) or not n.strip()]
    return f"ImageName list holds {_json_type(bad[0])} {bad[0]!r}" if bad else None


def _json_type(value: Any) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", dict: "an object",
            list: "a list", str: "a string"}.get(type(value), type(value).__name__)


_NUMBER_ANSWER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?\s*%?")
_OPTION = re.compile(r"(?:^|[\s(])([A-Z])[.)]\s")


def listed_options(question: str) -> str:
    """The option letters a multiple-choice question lists ("A. ... B. ..."), when they run A, B, C, ... in
    order (two at least); "" when the question lists none that way."""
    letters = "".join(dict.fromkeys(m.group(1) for m in _OPTION.finditer(question)))
    expected = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:len(letters)]
    return letters if len(letters) >= 2 and letters == expected else ""


def answer_text(raw: Any, task_type: str, dataset: str, question: str) -> tuple[str | None, str | None]:
    """(the answer as a string, None) or (None, why it is not an answer of its task type). Only what is certain
    is refused: a regression answer that is not one finite number, a classification letter the question's
    listed options do not include; a list-valued multi-label answer is joined with the dataset's separator, a
    regression answer's percent sign dropped ("40 %" -> "40")."""
    import math

    if isinstance(raw, list) and task_type == "multi_label" and all(isinstance(x, str) for x in raw):
        sep = LABEL_SEPARATORS.get(dataset, ",")
        raw = (sep + " " if sep == "," else sep).join(x.strip() for x in raw)
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        return None, f"answer must be text, got {_json_type(raw)}"
    text = str(raw).strip()
    if not text:
        return None, "empty answer"
    if task_type == "regression":
        # a full-width "３５％" is "35%", an Arabic "٣٥٪" is "35%", and invisible format characters go
        text = "".join(c for c in unicodedata.normalize("NFKC", text) if unicodedata.category(c) != "Cf")
        text = text.replace("\u066a", "%").strip()
        # the number alone: FLARE's evaluator reads float(answer), which "40%" fails (an infinite MAE), so a
        # model trained on "40%" would write answers the leaderboard cannot read
        number = text.rstrip("% ")
        if not _NUMBER_ANSWER.fullmatch(text) or not math.isfinite(float(number)):
            comma = " (a decimal comma? FLARE's evaluator reads float(answer): write it with a point)" if \
                re.fullmatch(r"[+-]?\d+,\d+ ?%?", text) else ""
            return None, f"regression answer {text[:40]!r} is not a finite number{comma}"
        # digits of another script ("３５", "٣٥"): float() reads them, but a model trained on them writes them
        text = "".join(str(unicodedata.digit(c)) if c.isdigit() and not c.isascii() else c for c in number)
    if task_type == "classification":
        options = listed_options(question)
        letter = re.fullmatch(r"\(?([A-Za-z])\)?[.)]?", text) or re.match(r"([A-Z])[.)]\s", text)
        if options and letter and letter.group(1).upper() not in options:
            return None, f"classification answer {text!r} is not one of the options {options[0]}-{options[-1]}"
    return text, None


def study_key(dataset: str, images: list[str]) -> str:
    """The study a record belongs to: its image names with the view index removed (for leakage checks)."""
    stems = sorted({_VIEW_SUFFIX.sub("", n.rsplit("/", 1)[-1]) if len(images) > 1 else n.rsplit("/", 1)[-1]
                    for n in images})
    return f"{dataset}:{'|'.join(stems)}"


def flare_key(image_name: Any, question: str) -> str:
    """FLARE's evaluator joins predictions to ground truth on ImageName||Question."""
    name = image_name if isinstance(image_name, str) else ",".join(image_name)
    return f"{name}||{question}"


def record_id(dataset: str, source_split: str, image_name: Any, question: str) -> str:
    digest = hashlib.sha1(flare_key(image_name, question).encode("utf-8")).hexdigest()[:16]
    return f"{dataset}/{source_split}/{digest}"


def keys_shared_across_datasets(ids) -> list[list[str]]:
    """Record ids (``record_id``'s form) of one FLARE split whose ImageName||Question a record of another dataset
    has too, grouped by that key; ids of another form are left out. FLARE's evaluator keys its ground truth, read
    from every dataset's file of a split, and a submission by ImageName||Question alone: of each such group it
    scores one question (the file it reads last) against the prediction listed last."""
    by_key: dict[tuple[str, str], list[str]] = {}
    for rid in ids:
        parts = rid.split("/") if isinstance(rid, str) else []
        if len(parts) == 3 and re.fullmatch(r"[0-9a-f]{16}", parts[2]):
            by_key.setdefault((parts[1], parts[2]), []).append(rid)
    return [sorted(group) for group in by_key.values() if len({rid.split("/")[0] for rid in group}) > 1]


def build_messages(images: list[str], prompt_text: str, answer: str | None) -> list[dict]:
    """One image part per view, then the text; the assistant turn holds the answer (absent when unknown)."""
    content = [{"type": "image", "image": p} for p in images] + [{"type": "text", "text": prompt_text}]
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def prompt_text(question: str, task_type: str, instructions: dict | None) -> str:
    instruction = (instructions or {}).get(task_type, "") or ""
    return f"{instruction.strip()}\n{question}" if instruction.strip() else question


def unusual_answers(rows: list[dict]) -> dict:
    """Classification answers that are not one option letter ("E.", "(E)", "A,B", a finding's name): kept as
    the download has them (FLARE scores against them as written, so "E" would not match "E."), counted and the
    first named, since a model trained on them learns to write them."""
    odd = [r for r in rows if r["task_type"] == "classification" and isinstance(r.get("answer"), str)
           and not re.fullmatch(r"[A-Za-z]", r["answer"])]
    return {"count": len(odd), "first": [f"{r['id']}: {r['answer'][:40]!r}" for r in odd[:10]]}


def multi_label_labels(rows: list[dict], rare_below: int = 2) -> dict:
    """Per multi-label dataset: its answers counted, each label (the answer split by the dataset's separator, as
    written) with how often it appears, most frequent first, and those seen fewer than ``rare_below`` times: a
    typo ("Cardiomegally"), answers joined with another separator ("Effusion; Mass" as one label), or a rare
    finding, which a reader of the label distribution wants named."""
    from collections import Counter

    counts: dict[str, Counter] = {}
    answers: Counter = Counter()
    for r in rows:
        if r.get("task_type") != "multi_label" or not isinstance(r.get("answer"), str):
            continue
        answers[r["dataset"]] += 1
        sep = label_separator(r["dataset"], r["answer"])
        counts.setdefault(r["dataset"], Counter()).update(
            label.strip() for label in r["answer"].split(sep) if label.strip())
    return {dataset: {"answers": answers[dataset], "labels": dict(found.most_common()),
                      "rare": sorted(label for label, n in found.items() if n < rare_below)}
            for dataset, found in sorted(counts.items())}
