"""What a resumed infer keeps of the predictions earlier attempts wrote. Each row is checked against the question
its id names and the model this run decodes with: a row whose fields are another question's (its id edited), one
made with another adapter (a journal copied from another run), one without a text prediction (null, a number:
infer writes text), or an earlier row of an id that a later, different row replaced, is set aside into
predictions.set_aside.jsonl with the reason, and its question decoded again. Nothing is deleted, and neither the
predictions file nor a FLARE submission ever carries such a row."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from flare_exp.io import read_journal, read_jsonl, write_jsonl
from flare_exp.run.layout import PREDICTIONS, SPARE_PREDICTIONS
from flare_exp.run.layout import RANK_PREDICTIONS as RANK_JOURNAL

log = logging.getLogger(__name__)
SET_ASIDE = "predictions.set_aside.jsonl"
# what infer copies from a question's record into its prediction row (stages/infer.py): every record's fields,
# then the submission's Question and its record where prepare kept them
RECORD_FIELDS = ("dataset", "task_type", "raw_task_type", "split", "image_name", "images", "question", "answer")
KEPT_IF_THERE = ("raw_question", "question_record")
COPIED = RECORD_FIELDS + KEPT_IF_THERE


def prediction_row(record: dict, prediction: str, label: str, adapter: dict | None) -> dict:
    """The journal row infer writes for ``record``'s prediction (row_problem holds a resumed one to it)."""
    return {"id": record["id"], **{k: record[k] for k in RECORD_FIELDS},
            **{k: record[k] for k in KEPT_IF_THERE if k in record},
            "prediction": prediction, "model": label, "adapter": adapter}


def read_predictions(out_dir: Path, replaced: list | None = None) -> dict[str, dict]:
    """Every prediction written so far: the merged file and any rank's journal (a resume may use another
    number of ranks than the attempt it continues); rows a later one replaced go to ``replaced``."""
    done = read_journal(out_dir / SPARE_PREDICTIONS, "id", replaced)
    for path in (out_dir / PREDICTIONS, *sorted(out_dir.glob(RANK_JOURNAL.format(rank="*")))):
        for key, row in read_journal(path, "id", replaced).items():
            if key in done and done[key] != row and replaced is not None:
                replaced.append(done[key])
            done[key] = row
    return done


def row_problem(row: dict, record: dict, adapter: dict | None) -> str | None:
    """Why a prediction row cannot stand for ``record``'s answer by this run's model, or None."""
    prediction = row.get("prediction")
    if not isinstance(prediction, str):
        return f"its prediction is {'missing' if 'prediction' not in row else json.dumps(prediction)[:40]}, not text"
    missing = [k for k in (*COPIED, "adapter") if k not in row and (k in record or k == "adapter")]
    if missing:  # infer writes each of them: a row cut down by hand (the sheet and submission read them)
        return f"its {', '.join(missing)} missing"
    wrong = [k for k in COPIED if k in record and row[k] != record[k]]
    if wrong:
        return f"its {', '.join(wrong)} {'differs' if len(wrong) == 1 else 'differ'} from the question its id names"
    if _sha(row["adapter"]) != _sha(adapter):
        return (f"made by another model (adapter {_sha(row['adapter']) or 'none: the base model'}, this run's "
                f"{_sha(adapter) or 'none: the base model'})")
    return None


def _sha(adapter) -> str | None:
    return adapter.get("sha256") if isinstance(adapter, dict) else None


def usable_predictions(out_dir: Path, split_records: dict[str, dict], adapter: dict | None,
                       writer: bool, quiet: bool = False) -> dict[str, dict]:
    """The rows earlier attempts wrote that this run keeps (id -> row); the others set aside (written by the
    ``writer`` rank only) and said (unless ``quiet``: the ranks' rows merged at the end, said as the run began).
    Rows of ids outside the split are kept here: finish() files them."""
    replaced: list[dict] = []
    done = read_predictions(out_dir, replaced)
    aside = [(row, "an earlier row of its id, which a later, different row replaced") for row in replaced]
    for key, row in list(done.items()):
        why = row_problem(row, split_records[key], adapter) if key in split_records else None
        if why:
            aside.append((row, why))
            del done[key]
    new = file_set_aside(out_dir / SET_ASIDE, aside, writer)
    if new and not quiet:
        again = len({row.get("id") for row, _ in new} - set(done))
        log.warning("infer: %d prediction row(s) of an earlier attempt set aside into %s, %d question(s) decoded "
                    "again (first: %s: %s)", len(new), SET_ASIDE, again, new[0][0].get("id"), new[0][1])
    return done


def file_set_aside(path: Path, aside: list[tuple[dict, str]], writer: bool) -> list[tuple[dict, str]]:
    """The rows of ``aside`` not in the set-aside file yet (an attempt killed before it merged leaves the rows it
    set aside in the journal: found again, for this reason or another), each once; added to the file, rewritten
    whole, by the ``writer`` rank."""
    kept = read_jsonl(path) if path.is_file() else []
    seen = {json.dumps(entry["row"], sort_keys=True) for entry in kept}
    new = []
    for row, why in aside:
        text = json.dumps(row, sort_keys=True)
        if text not in seen:
            seen.add(text)
            new.append((row, why))
    if new and writer:
        write_jsonl(path, kept + [{"set_aside": why, "row": row} for row, why in new])
    return new
