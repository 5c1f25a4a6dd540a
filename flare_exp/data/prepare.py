"""prepare: the raw FLARE Task 5 X-ray download -> train/val/test JSONL in the vision chat schema.

Steps: unzip nested archives in place (idempotent), discover the question files of the chosen splits and
datasets (any prefix: the seed nests them under train/ and val/), validate every record (rejects are kept
with file, index and reason), guard against train/val study overlap, write atomically, summarise.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from flare_exp.data import records as R
from flare_exp.io import write_json, write_jsonl

log = logging.getLogger(__name__)

FLARE_SPLITS = ("training", "validation-public", "validation-hidden", "testing")
_QUESTION_FILE = re.compile(r"^(?P<dataset>.+?)_(?:questions_(?:train|val|test)(?P<gt>_withGT)?|all_(?:train|val))\.json$")
REQUIRED_KEYS = ("TaskType", "ImageName", "Question")


class PrepareError(ValueError):
    """Bad input that stops prepare (malformed JSON file, strict-mode reject, leakage)."""


@dataclass(frozen=True)
class QuestionFile:
    path: Path
    split: str  # the FLARE split folder it sits under
    dataset: str


def unzip_nested(root: Path) -> int:
    """Extract every *.zip under ``root`` next to itself, repeating for zips inside zips. Idempotent."""
    extracted = 0
    while True:
        pending = [z for z in sorted(root.rglob("*.zip")) if not z.with_name(z.name + ".unzipped").exists()]
        if not pending:
            return extracted
        for archive in tqdm(pending, desc="unzip", unit="zip", disable=len(pending) < 2):
            dest = archive.parent.resolve()
            try:
                with zipfile.ZipFile(archive) as zf:
                    for member in zf.namelist():
                        target = (dest / member).resolve()
                        if dest not in target.parents and target != dest:
                            raise PrepareError(f"{archive}: member {member!r} would extract outside {dest}")
                    zf.extractall(dest)
            except zipfile.BadZipFile as e:
                raise PrepareError(f"{archive}: not a valid zip file ({e})") from None
            archive.with_name(archive.name + ".unzipped").write_text("extracted by flare_exp prepare\n")
            extracted += 1


def discover(root: Path, datasets: list[str], splits: list[str]) -> list[QuestionFile]:
    """Find the question JSON files of the wanted datasets under any FLARE split folder, in sorted order."""
    found: dict[tuple[str, str], list[tuple[Path, bool]]] = defaultdict(list)
    for path in sorted(root.rglob("*.json")):
        m = _QUESTION_FILE.match(path.name)
        if not m or any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        dataset = m.group("dataset")
        split = next((p for p in path.relative_to(root).parts if p in FLARE_SPLITS), None)
        if dataset in datasets and split in splits:
            found[(split, dataset)].append((path, bool(m.group("gt"))))
    out = []
    for (split, dataset), paths in sorted(found.items()):
        # validation-hidden may ship both <ds>_questions_val.json (no answers) and ..._withGT.json: use the latter.
        with_gt = [p for p, gt in paths if gt]
        for p in (with_gt or [p for p, _ in paths]):
            out.append(QuestionFile(p, split, dataset))
    return out


def _resolve_image(dataset_dir: Path, name: str) -> Path | None:
    direct = dataset_dir / name
    if direct.is_file():
        return direct
    for sub in sorted(dataset_dir.glob("images*")):  # ImageName given relative to imagesTr/ etc.
        if (sub / name).is_file():
            return sub / name
    return None


def _check_image(path: Path, verify: bool, cache: dict) -> tuple[str | None, str | None]:
    """(problem, content digest) of an image; the digest finds the same picture under two names."""
    if not verify:
        return None, None
    if path not in cache:
        data = path.read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.verify()
            cache[path] = (None, hashlib.sha1(data).hexdigest())
        except Exception as e:  # PIL raises many types for broken files
            cache[path] = (f"corrupt image {path.name}: {type(e).__name__}", None)
    return cache[path]


def load_question_file(qf: QuestionFile) -> list:
    try:
        data = json.loads(qf.path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PrepareError(f"{qf.path}: malformed JSON ({e})") from None
    if not isinstance(data, list):
        raise PrepareError(f"{qf.path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def convert_record(raw, index: int, qf: QuestionFile, out_split: str, root: Path, cfg, image_cache: dict):
    """Return (record, None) or (None, reason)."""
    if not isinstance(raw, dict):
        return None, "record is not an object"
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    needs_answer = out_split != "test"
    if needs_answer and "Answer" not in raw:
        missing.append("Answer")
    if missing:
        return None, f"missing key {', '.join(missing)}"
    task_type = R.normalise_task_type(raw["TaskType"])
    if task_type is None:
        return None, f"unknown TaskType {raw['TaskType']!r}"
    answer = raw.get("Answer")
    if needs_answer and (answer is None or not str(answer).strip()):
        return None, "empty answer"
    question = str(raw["Question"]).strip()
    if not question:
        return None, "empty question"
    names = R.image_list(raw["ImageName"])
    if not names or not all(isinstance(n, str) and n for n in names):
        return None, "bad ImageName"
    dataset_dir = qf.path.parent
    images, digests = [], []
    for name in names:
        path = _resolve_image(dataset_dir, name)
        if path is None:
            return None, f"missing image {name}"
        problem, digest = _check_image(path, cfg.verify_images, image_cache)
        if problem:
            return None, problem
        images.append(path.relative_to(root).as_posix())
        digests.append(digest)
    answer = None if answer is None else str(answer).strip()
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
        "answer": answer if needs_answer else None,
        "messages": R.build_messages(images, text, answer if needs_answer else None),
        "_digests": [d for d in digests if d],  # for the leakage check; not written out
    }, None


def _study_keys(split_rows: list[dict]) -> dict[str, str]:
    """key -> study: the study named after its images, and each image's content (same picture, other name)."""
    keys = {}
    for r in split_rows:
        study = R.study_key(r["dataset"], r["images"])
        keys[study] = study
        for digest in r.get("_digests", []):
            keys[f"sha1:{digest}"] = study
    return keys


def check_overlap(by_split: dict[str, list[dict]], allow: bool) -> list[str]:
    train = _study_keys(by_split.get("train", []))
    held_out = _study_keys(by_split.get("val", []) + by_split.get("test", []))
    overlap = sorted({train[k] for k in train.keys() & held_out.keys()})
    if overlap and not allow:
        shown = "\n  ".join(overlap[:50]) + (f"\n  ... and {len(overlap) - 50} more" if len(overlap) > 50 else "")
        raise PrepareError(
            f"{len(overlap)} studies appear both in train and in val/test (validation would leak):\n  {shown}\n"
            "Remove them from one side, or pass data.allow_overlap=true to accept the leak.")
    return overlap


def prepare(cfg_data, root: Path, out_dir: Path) -> dict:
    start = time.time()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root={root} does not exist. Download FLARE-Task5-MLLM-2D (Xray) and "
                                "point data.root at the folder holding training/ validation-public/ ...")
    if cfg_data.unzip:
        n = unzip_nested(root)
        if n:
            log.info("unzipped %d archives under %s", n, root)
    split_sources = {"train": list(cfg_data.train_splits), "val": list(cfg_data.val_splits),
                     "test": list(cfg_data.test_splits)}
    by_split: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    rejects, seen, image_cache = [], set(), {}
    for out_split, sources in split_sources.items():
        files = discover(root, list(cfg_data.datasets), sources)
        if sources and not files and out_split != "test":
            log.warning("no question files found for %s (FLARE splits %s, datasets %s) under %s",
                        out_split, sources, list(cfg_data.datasets), root)
        for qf in files:
            raw_records = load_question_file(qf)
            for index, raw in enumerate(tqdm(raw_records, desc=f"{out_split}:{qf.dataset}", unit="q",
                                             leave=False, disable=len(raw_records) < 500)):
                record, reason = convert_record(raw, index, qf, out_split, root, cfg_data, image_cache)
                if record is not None and record["id"] in seen:
                    record, reason = None, "duplicate ImageName||Question"
                if record is None:
                    where = f"{qf.path.relative_to(root)} record {index}"
                    if cfg_data.strict:
                        raise PrepareError(f"{where}: {reason} (data.strict=true)")
                    rejects.append({"file": str(qf.path.relative_to(root)), "index": index, "reason": reason})
                    continue
                seen.add(record["id"])
                by_split[out_split].append(record)
    if not by_split["train"] and not by_split["val"]:
        raise PrepareError(f"no usable records under {root} for datasets {list(cfg_data.datasets)}"
                           f" (rejected: {len(rejects)}). Check data.root and data.datasets.")
    overlap = check_overlap(by_split, cfg_data.allow_overlap)

    out_dir.mkdir(parents=True, exist_ok=True)
    for split, rows in by_split.items():
        for r in rows:
            r.pop("_digests", None)
        rows.sort(key=lambda r: (r["dataset"], r["source_split"], r["id"]))
        write_jsonl(out_dir / f"{split}.jsonl", rows)
    write_jsonl(out_dir / "rejects.jsonl", rejects)
    counts = {split: dict(sorted(Counter(f"{r['dataset']}/{r['task_type']}" for r in rows).items()))
              for split, rows in by_split.items()}
    summary = {
        "data_root": str(root),
        "records": {s: len(rows) for s, rows in by_split.items()},
        "by_dataset_task": counts,
        "rejects": dict(Counter(_reason_kind(r["reason"]) for r in rejects)),
        "images": len({p for rows in by_split.values() for r in rows for p in r["images"]}),
        "overlapping_studies_allowed": len(overlap),
        "seconds": round(time.time() - start, 2),
    }
    write_json(out_dir / "summary.json", summary)
    return summary


def _reason_kind(reason: str) -> str:
    for prefix in ("missing image", "corrupt image", "missing key", "unknown TaskType"):
        if reason.startswith(prefix):
            return prefix
    return reason


def format_summary(summary: dict) -> str:
    lines = ["split  dataset/task_type                       records"]
    for split, counts in summary["by_dataset_task"].items():
        for key, n in counts.items():
            lines.append(f"{split:<6} {key:<40} {n:>6}")
    lines.append(f"total: {summary['records']}  images: {summary['images']}  time: {summary['seconds']} s")
    lines.append(f"rejects: {summary['rejects'] or 'none'}")
    return "\n".join(lines)
