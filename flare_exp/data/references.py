"""The reference answers eval scores against: the prepared split the predictions answer, joined by id.

A predictions file carries the answers infer copied into it; a hand-edited or foreign file may carry other ones,
or ids that are not in the split. Where the prepared split is known, eval takes the answer, task type and
dataset from it and refuses unknown ids and answers that differ; where it is not, the report says the answers
came from the predictions file, unchecked.
"""
from __future__ import annotations

from pathlib import Path

from flare_exp.io import read_jsonl
from flare_exp.run.layout import CONFIG
from flare_exp.run.stage import infer_input_file
from flare_exp.runtime import abspath

SHOWN = 5  # ids named in an error
FROM_REFERENCE = ("answer", "task_type", "dataset", "question", "image_name")


def reference_file(predictions: Path, rows: list[dict], prepared_dir: str | None) -> Path | None:
    """The file infer read for these predictions (its run dir's saved config), else the prepared split the rows
    name (``<data.prepared_dir>/<split>.jsonl``); None when neither exists."""
    from omegaconf import OmegaConf

    saved = predictions.parent / CONFIG
    if saved.is_file():
        try:
            source = abspath(infer_input_file(OmegaConf.load(saved)))
        except Exception:  # noqa: BLE001  (not an infer run's config: fall back to the split the rows name)
            source = None
        if source is not None and source.is_file():
            return source
    splits = {r.get("split") for r in rows}
    if prepared_dir and len(splits) == 1 and isinstance(next(iter(splits)), str):
        candidate = abspath(prepared_dir) / f"{next(iter(splits))}.jsonl"
        if candidate.is_file():
            return candidate
    if prepared_dir and splits == {None}:  # rows that name no split (a worksheet, a hand-made file)
        return split_holding(abspath(prepared_dir), {r.get("id") for r in rows})
    return None


def split_holding(prepared: Path, ids: set) -> Path | None:
    """The prepared split holding the most of ``ids`` (None if none holds any). Ids are digests of the
    question, so a split holding some of them is the one the rows came from: an id it lacks (a typo in a
    hand-edited sheet) is then an error naming it, not a reason to leave every answer unchecked."""
    best, most = None, 0
    for candidate in sorted(prepared.glob("*.jsonl")) if prepared.is_dir() else ():
        try:
            known = {r.get("id") for r in read_jsonl(candidate) if isinstance(r, dict)}
        except ValueError:
            continue  # not a split file
        held = len(ids & known)
        if held > most:
            best, most = candidate, held
    return best


def _named(ids: list) -> str:
    shown = [repr(str(i)) if not str(i) or str(i) != str(i).strip() else str(i) for i in ids[:SHOWN]]  # a space shows
    return ", ".join(shown) + (f" and {len(ids) - SHOWN} more" if len(ids) > SHOWN else "")


def join_to_reference(predictions: Path, rows: list[dict], reference: Path) -> tuple[list[dict], dict]:
    """The rows with the reference's answer, task type, dataset, question and image name, and how much of the
    split they answer (``coverage``); an id the reference lacks, or an answer that differs from it, is an error
    naming the first few."""
    refs = {r["id"]: r for r in read_jsonl(reference) if isinstance(r, dict) and "id" in r}
    unknown = [r.get("id") for r in rows if r.get("id") not in refs]
    if unknown:
        raise ValueError(f"{predictions}: {len(unknown)} prediction id(s) are not in the prepared split {reference}: "
                         f"{_named(unknown)}. Score predictions of this split only (or point data.prepared_dir at "
                         "the one they were made from)")
    changed = [r["id"] for r in rows if r.get("answer") is not None and refs[r["id"]].get("answer") is not None
               and str(r["answer"]) != str(refs[r["id"]]["answer"])]
    if changed:
        raise ValueError(f"{predictions}: {len(changed)} answer(s) differ from the prepared split {reference}: "
                         f"{_named(changed)}. Eval scores against the prepared answers; a predictions file whose "
                         "answers were edited is refused")
    joined = [{**r, **{k: refs[r["id"]][k] for k in FROM_REFERENCE if k in refs[r["id"]]}} for r in rows]
    return joined, coverage(joined, reference, len(refs))


def coverage(rows: list[dict], reference: Path, total: int) -> dict:
    """A file that answers part of its split (``total`` questions): the report says how much (else a subset reads
    as the whole)."""
    answered = len({r.get("id") for r in rows})
    if answered >= total:
        return {}
    return {"coverage": f"{total - answered} of the {total} questions of {reference} have no prediction: the numbers "
                        f"cover the {answered} answered (a subset asked for, or a cut file)"}
