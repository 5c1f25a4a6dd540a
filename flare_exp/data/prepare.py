"""prepare: the raw FLARE Task 5 X-ray download -> train/val/test JSONL in the vision chat schema.

Steps: unzip nested archives in place (idempotent), discover the question files of the chosen splits and
datasets (any prefix: the original scripts nest them under train/ and val/), validate every record (rejects are kept
with file, index and reason), guard against a study in two splits, write atomically, summarise.
"""
from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

from tqdm.auto import tqdm

from flare_exp.data import records as R
from flare_exp.data.decoding import check_window
from flare_exp.data.image_modes import say_modes
from flare_exp.data.image_notes import named_images
from flare_exp.data.images import NEARLY_UNIFORM, ProcessorLimits, check_images, walk_files
from flare_exp.data.later_answers import apply_later_answers, read_later, record_shadow, say_shared_keys, shadow
from flare_exp.data.overlap import check_overlap
from flare_exp.data.question_files import (COST, QuestionFile, datasets_left_out, datasets_without_questions,
                                           discover, load_question_file, question_files, resolve_image,
                                           say_unread_splits, split_sources_of, unread_copies)
from flare_exp.data.prepare_inputs import INPUTS, record_inputs
from flare_exp.data.record_doubts import DOUBTS, record_doubts
from flare_exp.data.rejects import REJECTS, reason_kind
from flare_exp.data.unzip import PrepareError, unzip_nested
from flare_exp.io import write_json, write_jsonl

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("TaskType", "ImageName", "Question")


def _encodable(value) -> bool:
    """Text that UTF-8 can hold (JSON may escape half of a surrogate pair: text cut inside a character)."""
    try:
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def convert_record(raw, qf: QuestionFile, out_split: str, root: Path, cfg):
    """Return (record, None) or (None, reason). The record's image files are found, not yet decoded."""
    if not isinstance(raw, dict):
        return None, "record is not an object"
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    needs_answer = out_split != "test"
    if needs_answer and "Answer" not in raw:
        missing.append("Answer")
    if missing:
        return None, f"missing key {', '.join(missing)}"
    broken = next((key for key in (*REQUIRED_KEYS, "Answer", "Modality") if not _encodable(raw.get(key))), None)
    if broken:
        return None, f"{broken} is not valid Unicode (a lone UTF-16 surrogate: text cut inside a character)"
    task_type = R.normalise_task_type(raw["TaskType"])
    if task_type is None:
        return None, f"unknown TaskType {raw['TaskType']!r}"
    if not isinstance(raw["Question"], str):
        return None, f"Question is not text ({type(raw['Question']).__name__})"
    if not raw["Question"].strip():
        return None, "empty question"
    question = raw["Question"].strip()
    answer = None
    if needs_answer:
        answer, problem = R.answer_text(raw["Answer"], task_type, qf.dataset, question)
        if problem:
            return None, problem
    problem = R.image_name_problem(raw["ImageName"])
    if problem:
        return None, problem
    paths = []
    for name in R.image_list(raw["ImageName"]):
        path = resolve_image(qf.path.parent, name)
        if isinstance(path, str):
            return None, path
        paths.append(path)
    images = [p.relative_to(root).as_posix() for p in paths]
    text = R.prompt_text(question, task_type, cfg.instructions)
    return {
        "id": R.record_id(qf.dataset, qf.split, raw["ImageName"], question),
        "dataset": qf.dataset,
        "task_type": task_type,
        "raw_task_type": raw["TaskType"],
        "split": out_split,
        "source_split": qf.split,
        "modality": raw.get("Modality", "Xray"),
        "image_name": raw["ImageName"],
        "images": images,
        "question": question,
        # FLARE's evaluator joins a submission to its ground truth on the raw ImageName||Question: the raw text
        # is kept for the submission where stripping changed it
        **({"raw_question": raw["Question"]} if raw["Question"] != question else {}),
        **({"question_record": {k: v for k, v in raw.items() if k != "Answer"}} if not needs_answer else {}),  # to submit
        "answer": answer,
        **({"raw_answer": raw["Answer"]} if needs_answer and raw["Answer"] != answer else {}),  # FLARE reads it
        "messages": R.build_messages(images, text, answer),
        "_paths": paths,  # for the image pass and the leakage check; not written out
    }, None


def prepare(cfg_data, root: Path, out_dir: Path, limits: ProcessorLimits | None = None) -> dict:
    """``limits``: the processor's (images it cannot take are rejected); None: not checked."""
    start = time.time()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root={root} does not exist. Download FLARE-Task5-MLLM-2D (Xray) and "
                                "point data.root at the folder holding training/ validation-public/ ...")
    if cfg_data.unzip:
        n = unzip_nested(root, list(cfg_data.datasets))
        if n:
            log.info("unzipped %d archives under %s", n, root)
    split_sources = split_sources_of(cfg_data)
    rejects: list[dict] = []
    jsons = walk_files(root, ".json")  # walked once for both
    found = question_files(root, jsons)
    copies = unread_copies(root, found, list(cfg_data.datasets), jsons)
    if copies:
        log.warning("prepare: %d question file(s) not read, named or placed as a copy (no FLARE name), e.g. %s: give "
                    "them FLARE's names if they hold the data to prepare", len(copies), copies[0].relative_to(root))
    say_unread_splits(found, list(cfg_data.datasets), split_sources)
    lacking = datasets_without_questions(found, list(cfg_data.datasets), split_sources)
    missing: list[tuple[Path, str]] = []
    candidates = read_records(root, cfg_data, split_sources, rejects, found, missing, lacking)
    accepted = accept_records(candidates, cfg_data, rejects, limits)
    by_split, modes = accepted.by_split, accepted.modes
    apply_later_answers(by_split, rejects)
    rejects.sort(key=lambda r: (r["file"], r["index"]))
    write_jsonl(out_dir / REJECTS, rejects)  # first: an error below points at it
    check_requested(root, cfg_data, split_sources, by_split, rejects, out_dir / REJECTS, found)
    overlap = check_overlap(by_split, cfg_data.allow_overlap)
    shared = say_shared_keys(by_split)
    doubts, listed = record_doubts(by_split)
    write_jsonl(out_dir / DOUBTS, listed)  # before the splits lose their private fields: every case, in full
    for split, rows in by_split.items():
        for r in rows:
            for private in ("_digests", "_paths", "_pixels", "_at"):
                r.pop(private, None)
        rows.sort(key=lambda r: (r["dataset"], r["source_split"], r["id"]))
        write_jsonl(out_dir / f"{split}.jsonl", rows)
    counts = {split: dict(sorted(Counter(f"{r['dataset']}/{r['task_type']}" for r in rows).items()))
              for split, rows in by_split.items()}
    summary = {
        "data_root": str(root),
        "records": {s: len(rows) for s, rows in by_split.items()},
        "by_dataset_task": counts,
        "rejects": dict(Counter(reason_kind(r["reason"]) for r in rejects)),
        "datasets_without_questions": lacking,  # infer's test submission is a subset where test lacks one
        "datasets_left_out": datasets_left_out(found, list(cfg_data.datasets), split_sources),
        "images": len({p for rows in by_split.values() for r in rows for p in r["images"]}),
        "images_by_mode": modes,
        "image_window": list(cfg_data.image_window) if cfg_data.image_window is not None else "own range",
        **named_images(accepted, root, cfg_data.image_window, cfg_data.verify_images),
        "classification_answers_not_one_letter": _said_answers(by_split),
        "multi_label_labels": _said_labels(by_split),
        **doubts,
        "processor_limits": asdict(limits) if limits else None,
        "overlapping_studies_allowed": len(overlap),
        "questions_sharing_a_flare_key": shared,
        "inputs": INPUTS,  # recorded beside: a later reuse check expects it
        "seconds": round(time.time() - start, 2),
    }
    write_json(out_dir / "summary.json", summary)
    record_inputs(out_dir, root, questions_read(found, cfg_data, split_sources), accepted.sha1s, missing,
                  outputs=[out_dir / f"{split}.jsonl" for split in by_split])
    return summary


def _said_answers(by_split: dict) -> dict:
    odd = R.unusual_answers([r for rows in by_split.values() for r in rows])
    if odd["count"]:
        log.warning("prepare: %d classification answer(s) are not one option letter, e.g. %s: kept as written (FLARE "
                    "scores against them as written), so a model trained on them learns to write them; "
                    "summary.json lists the first ones", odd["count"], ", ".join(odd["first"][:3]))
    return odd


def _said_labels(by_split: dict) -> dict:
    """The multi-label datasets' label distributions; a label seen once among many answers is said (a typo or
    another separator is most likely)."""
    found = R.multi_label_labels([r for rows in by_split.values() for r in rows])
    for dataset, block in found.items():
        if block["rare"] and block["answers"] >= 50:
            log.warning("prepare: %s: %d label(s) appear once in its %d multi-label answers, e.g. %s: a typo, labels "
                        "joined with another separator, or a rare finding; summary.json lists them "
                        "(multi_label_labels)", dataset, len(block["rare"]), block["answers"],
                        ", ".join(repr(label) for label in block["rare"][:3]))
    return found


def questions_read(found: list[tuple], cfg_data, split_sources: dict) -> list[Path]:
    """The question files a prepare with these settings reads (``found``: question_files(root))."""
    return sorted({qf.path for sources in split_sources.values()
                   for qf in discover(found, list(cfg_data.datasets), sources)})


def _reject(rejects: list, cfg_data, file: str, index: int, reason: str, split: str, key: dict | None = None) -> None:
    """A question left out, with the split it was for (infer and eval count a split's from it: data/rejects.py)
    and, where it names one, its id (a later record of a kept key: later_answers)."""
    if cfg_data.strict:
        raise PrepareError(f"{file} record {index}: {reason} (data.strict=true)")
    rejects.append({"file": file, "index": index, "reason": reason, "split": split, **(key or {})})


def read_records(root: Path, cfg_data, split_sources: dict, rejects: list, found: list[tuple],
                 missing: list | None = None, lacking: dict | None = None) -> list[tuple[dict, str, int]]:
    """(record, file, index) of every record that passes the field checks, in file order; the others go to
    ``rejects`` with file, index and reason, and the images a record named that are not there to ``missing``
    (dataset folder, ImageName: supplied later, they are a changed input). A dataset whose question files under a
    split's folders hold no record (an empty list) is added to ``lacking`` (datasets_without_questions) with
    what that costs."""
    candidates = []
    for out_split, sources in split_sources.items():
        records_of: Counter = Counter()
        for qf in discover(found, list(cfg_data.datasets), sources):
            raw_records = load_question_file(qf)
            records_of[qf.dataset] += len(raw_records)
            file = str(qf.path.relative_to(root))
            if not raw_records:
                (log.info if out_split == "val" else log.warning)(
                    "prepare: %s holds no records (an empty list): %s gets nothing from %s's %s split", file, out_split,
                    qf.dataset, qf.split)
            for index, raw in enumerate(tqdm(raw_records, desc=f"{out_split}:{qf.dataset}", unit="q",
                                             leave=False, disable=len(raw_records) < 500)):
                record, reason = convert_record(raw, qf, out_split, root, cfg_data)
                if record is None:
                    _reject(rejects, cfg_data, file, index, reason, out_split, shadow(raw, qf.dataset, qf.split))
                    if reason.startswith("missing image") and missing is not None:
                        missing += [(qf.path.parent, n) for n in R.image_list(raw["ImageName"])
                                    if isinstance(resolve_image(qf.path.parent, n), str)]
                else:
                    record["_at"] = (file, index)  # where it came from: a later rejected record of its key
                    candidates.append((record, file, index))
        emptied = [d for d, n in sorted(records_of.items()) if not n]
        if emptied and lacking is not None:
            lacking[out_split] = sorted({*lacking.get(out_split, []), *emptied})
            (log.info if out_split == "val" else log.warning)(
                "prepare: %s has no question of %s (their question files there hold no record): %s; put their records "
                "back in those files, then prepare with overwrite=true", out_split, ", ".join(emptied), COST[out_split])
    return candidates


class Accepted(NamedTuple):
    by_split: dict[str, list[dict]]
    modes: dict[str, int]  # PIL mode -> accepted images
    sha1s: dict[Path, str]  # every decoded image's bytes
    nearly_uniform: list[Path]  # accepted images whose decoded pixels are nearly all one level
    framed: list[Path]  # accepted images nearly all one level around a box of content (a collimated field)
    clipped: list[Path]  # accepted nearly flat images whose values data.image_window mostly clips
    multi_frame: list[Path]  # accepted multi-page files
    stretched: dict[Path, tuple]  # accepted images whose few extreme values set their own range (outlier_stretch)



def accept_records(candidates: list, cfg_data, rejects: list,
                   limits: ProcessorLimits | None = None) -> "Accepted":
    """Decode every image the candidates name (once, in parallel; data.verify_images=false: headers only); a
    record with a broken image, one the processor cannot take, or a second record with the same
    ImageName||Question and answer, is rejected; of two with other answers, the earlier (FLARE's rule). Also: the
    accepted images counted by PIL mode, each image's sha1, and the accepted images that decoded to one nearly
    flat grey level, and those of several pages."""
    by_split: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    images = [p for record, _, _ in candidates for p in record["_paths"]]
    window = check_window(cfg_data.image_window)
    checked = check_images(images, cfg_data.image_workers, window, limits, decode=cfg_data.verify_images)
    seen: dict[str, tuple] = {}  # id -> (its place in its split, file, index) of the record kept
    modes = {}
    for record, file, index in candidates:
        results = [checked[p] for p in record["_paths"]]
        problem = next((result.problem for result in results if result.problem), None)
        replaces = None
        if problem is None and record["id"] in seen:
            place, kept_file, kept_index = seen[record["id"]]
            kept = by_split[record["split"]][place].get("answer")
            if kept == record.get("answer"):  # FLARE reads this later one (its TaskType, its raw answer)
                problem = "duplicate ImageName||Question"
                read_later(by_split[record["split"]][place], record, (file, index))
            else:  # FLARE's evaluator keys its ground truth by ImageName||Question: the last record's answer counts
                _reject(rejects, cfg_data, kept_file, kept_index, "duplicate ImageName||Question with another answer "
                        f"({kept!r}; a later record of the question replaces it, as FLARE's evaluator keeps the "
                        "last)", record["split"])
                replaces = place
        if problem:
            _reject(rejects, cfg_data, file, index, problem, record["split"],  # its image: FLARE reads it still
                    None if problem == "duplicate ImageName||Question" else record_shadow(record))
            continue
        record["_digests"] = [d for result in results for d in (result.sha1, result.pixels) if d]
        record["_pixels"] = [result.pixels or result.sha1 for result in results]  # one per image (record_doubts)
        if window is not None:
            record["image_window"] = list(window)  # every stage decodes with it (VisionChat.load_images)
        modes.update({p: result.mode for p, result in zip(record["_paths"], results)})
        split = by_split[record["split"]]
        if replaces is None:
            split.append(record)
        else:
            split[replaces] = record  # in the first one's place (a dict keeps its key's first place)
        seen[record["id"]] = (len(split) - 1 if replaces is None else replaces, file, index)
    sha1s = {p: result.sha1 for p, result in checked.items() if result.sha1}
    flat = sorted(p for p in modes if (checked[p].uniform or 0) >= NEARLY_UNIFORM and not checked[p].framed
                  and not checked[p].stretched)
    say_modes(by_split, modes)  # compressed 16-bit colour TIFFs; a dataset mixing 8-bit and high-bit-depth images
    return Accepted(by_split, dict(sorted(Counter(modes.values()).items())), sha1s, flat,
                    sorted(p for p in modes if checked[p].framed), sorted(p for p in flat if checked[p].clipped),
                    sorted(p for p in modes if checked[p].frames > 1),
                    {p: checked[p].stretched for p in sorted(modes) if checked[p].stretched})


def check_requested(root: Path, cfg_data, split_sources: dict, by_split: dict, rejects: list,
                    rejects_file: Path, found: list[tuple]) -> None:
    """Every dataset asked for, and every split whose FLARE folders are there, must yield records: an empty
    one is an error naming what was found, never a DONE with train=0."""
    present = {split for _, _, split, _ in found if split}
    problems = []
    for out_split, sources in split_sources.items():
        if by_split[out_split] or not sources:
            continue
        if present & set(sources):
            problems.append(f"{out_split} (FLARE splits {sources}) yielded no record for datasets "
                            f"{list(cfg_data.datasets)}")
        elif out_split != "test":
            log.warning("no question files found for %s (FLARE splits %s) under %s", out_split, sources, root)
    for dataset in cfg_data.datasets:
        if not any(r["dataset"] == dataset for rows in by_split.values() for r in rows):
            problems.append(f"dataset {dataset} yielded no record in any split")
    all_rejected(root, cfg_data, split_sources, by_split, rejects, found, rejects_file)
    if not by_split["train"] and not by_split["val"]:
        problems.append("no train or val records at all")
    if problems:
        kinds = Counter(reason_kind(r["reason"]) for r in rejects)
        raise PrepareError(f"under data.root={root}: " + "; ".join(problems)
                           + f". Rejected records: {dict(kinds) or 'none'} (each with file, index and reason in "
                           f"{rejects_file}). Check data.root, data.datasets and data.*_splits "
                           "(an empty list, e.g. data.test_splits=[], leaves a split out).")


def all_rejected(root: Path, cfg_data, split_sources: dict, by_split: dict, rejects: list, found: list[tuple],
                 rejects_file: Path) -> None:
    """A dataset whose questions for a split were all rejected (hand-edited answers, its images gone) leaves that
    split without its task: said as an emptied question file is, with the commonest reasons (the dataset's other
    splits keep prepare going, so nothing stops)."""
    for out_split, sources in split_sources.items():
        kept = {r["dataset"] for r in by_split[out_split]}
        lost: dict[str, Counter] = defaultdict(Counter)
        for qf in discover(found, list(cfg_data.datasets), sources):
            if qf.dataset not in kept:
                file = str(qf.path.relative_to(root))
                lost[qf.dataset].update(reason_kind(r["reason"]) for r in rejects
                                        if r["file"] == file and r["split"] == out_split)
        for dataset, reasons in lost.items():
            if reasons:
                log.warning("prepare: %s gets nothing from %s: its %d questions there were all rejected (%s; "
                            "each in %s)", out_split, dataset, sum(reasons.values()), ", ".join(
                                f"{n} {why}" for why, n in reasons.most_common(3)), rejects_file)


def format_summary(summary: dict) -> str:
    lines = ["split  dataset/task_type                       records"]
    for split, counts in summary["by_dataset_task"].items():
        for key, n in counts.items():
            lines.append(f"{split:<6} {key:<40} {n:>6}")
    lines.append(f"total: {summary['records']}  images: {summary['images']}  time: {summary['seconds']} s")
    lines.append(f"images by mode: {summary.get('images_by_mode') or 'not read'}")
    lines.append(f"rejects: {summary['rejects'] or 'none'}")
    return "\n".join(lines)
