"""The prepared-record schema shared by every stage, and the FLARE facts it encodes.

One JSONL line per question::

    {"id", "dataset", "task_type", "raw_task_type", "split", "source_split", "modality",
     "image_name" (FLARE's raw ImageName, str or list), "images" (paths relative to data.root, frontal first),
     "question", "answer" (raw; null for test), "messages" (Unsloth/TRL vision chat schema)}
"""
from __future__ import annotations

import hashlib
import re
from typing import Any

# FLARE's raw TaskType strings (compared after strip/lower/[-_ ] -> " ") -> our task type names.
_TASK_TYPES = {
    "report generation": "report_generation",
    "multi label classification": "multi_label",
    "multilabel classification": "multi_label",
    "classification": "classification",
    "regression": "regression",
}

# Multi-label separators differ per dataset: chestdr joins labels with ", ", periapical with ";" (and one
# periapical label itself contains commas).
LABEL_SEPARATORS = {"chestdr": ",", "periapical": ";"}

_VIEW_SUFFIX = re.compile(r"-(\d+)\.[A-Za-z0-9]+$")


def normalise_task_type(raw: str) -> str | None:
    key = re.sub(r"[-_\s]+", " ", str(raw).strip().lower())
    return _TASK_TYPES.get(key)


def label_separator(dataset: str, answer: str | None = None) -> str:
    if dataset in LABEL_SEPARATORS:
        return LABEL_SEPARATORS[dataset]
    return ";" if answer and ";" in answer else ","


def image_list(image_name: Any) -> list[str]:
    """FLARE's ImageName as a list, views ordered frontal first (IU_XRay '...-0.png' before '...-1.png')."""
    names = [image_name] if isinstance(image_name, str) else list(image_name)
    if len(names) > 1 and all(_VIEW_SUFFIX.search(n) for n in names):
        names = sorted(names, key=lambda n: int(_VIEW_SUFFIX.search(n).group(1)))
    return names


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
