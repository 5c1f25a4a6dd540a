"""A predictions file as eval reads it: found from an eval.predictions entry, joined to the prepared split it
answers, checked row by row and against what its infer run says it wrote; what produced it and anything the report
must say about it."""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

from flare_exp.data.sheet_predictions import OLE2, SHEET
from flare_exp.io import read_jsonl, read_jsonl_of_unfinished_run
from flare_exp.metrics import official
from flare_exp.run.layout import CONFIG, DONE, FINGERPRINT, RUN_INFO, predictions_file, summary_name
from flare_exp.run.stage import infer_input_file
from flare_exp.runtime import abspath

log = logging.getLogger(__name__)


def load_rows(path: Path, allow_partial: bool, prepared_dir: str | None = None) -> tuple[list[dict], dict]:
    """The predictions of one file, joined by id to the prepared split they answer (found from the infer run,
    else ``prepared_dir``), checked; and what the report must say about them."""
    from flare_exp.data.sheet_predictions import is_sheet, read_sheet_predictions, stored_sheet_note

    if not is_sheet(path):
        refuse_other_formats(path)
    run_dir = path.parent
    unfinished = (run_dir / RUN_INFO).exists() and not (run_dir / DONE).exists()
    if unfinished and not allow_partial:
        raise ValueError(f"{run_dir} holds an unfinished infer run (no {DONE} marker): finish it (rerun the same "
                         "infer command, it resumes) or pass eval.allow_partial=true to score what is there")
    sheet, torn, hidden = is_sheet(path), False, 0
    if sheet:
        rows, sheet_title, other_sheets = read_sheet_predictions(path)
        hidden = sum(bool(r.pop("sheet_hidden", False)) for r in rows)
    elif unfinished or (allow_partial and not (run_dir / DONE).exists()):
        # allowed partial: a killed infer's journal, or a copy of one, may end in a torn line, left out and said
        rows, torn = read_jsonl_of_unfinished_run(path)
    else:
        try:
            rows = read_jsonl(path)
        except ValueError as e:
            if not (run_dir / DONE).exists():
                last = _torn_at_the_end(path)
                raise ValueError(f"{e}" + (". It is the file's last line, cut short (a copy or a run stopped while "
                                           "writing): eval.allow_partial=true scores the complete lines before it, "
                                           "said in the report" if last else "")) from None
            raise ValueError(f"{e}. Its infer run finished, so the file was cut or edited since: copy it again "
                             "from where it was made, or rerun that infer with overwrite=true") from None
    if not rows:
        raise ValueError(f"{path}: no predictions")
    check_fields(path, rows)
    refuse_mixed_models(path, rows)
    # a doubled row is named as such: not as a changed answer (the join), nor as a count to allow_partial away
    check_one_row_per_id(path, rows)
    check_written_count(path, len(rows), allow_partial)
    rows, info = joined(path, rows, prepared_dir)
    if sheet:
        if hidden:
            log.warning("eval: %s: %d row(s) hidden in the sheet (an Excel filter or Hide) are scored too: delete "
                        "the rows to leave them out", path, hidden)
        why_this = "" if sheet_title == SHEET else f": no sheet named {SHEET!r} has an id column"
        info["sheet_note"] = (f"predictions read from the worksheet {path.name} (sheet {sheet_title!r}{why_this}), "
                              "as it is now: a prediction edited by hand is scored as edited" + (
                                  f"; not read: the sheet(s) {', '.join(map(repr, other_sheets))}, which also "
                                  "hold an id column" if other_sheets else "") + (
                                  f"; {hidden} row(s) hidden in the sheet are scored too" if hidden else ""))
        info.update(stored_sheet_note(path, rows))
    else:
        info.update(edited_sheet_beside(path, rows))
    if unfinished or torn:  # an unfinished infer run, or a file whose torn last line was left out
        of = f" of {expected_count(run_dir) or 'an unknown number of'}" if unfinished else ""
        info["partial"] = (f"partial: {len(rows)}{of} predictions"
                           + ("; the file's torn last line (a write cut short) left out" if torn else ""))
    for row in rows:
        row.pop("sheet_row", None)
    if info.get("answers_from") == "the predictions file":  # unchecked: the file's own names, read as eval does
        info.update(same_names(path, rows))
    unknown = sorted({str(r.get("task_type")) for r in rows} - set(official.OFFICIAL_METRIC))
    if unknown:
        raise ValueError(f"{path}: unknown task type(s) {', '.join(unknown)}; known: "
                         f"{', '.join(official.OFFICIAL_METRIC)}")
    missing = [r for r in rows if r.get("answer") is None]
    if missing:
        split = missing[0].get("split")
        why = ("the test split is scored by FLARE from the submission files" if split in ("test", None) else
               f"their answers in the {split} split {info.get('answers_from', '')} are empty (edited since?): undo "
               "the edit, or rerun stage=prepare (overwrite=true)")
        raise ValueError(f"{path}: {len(missing)} predictions have no ground truth (e.g. {missing[0]['id']}); {why}")
    empty = sum(r.get("prediction") is None or isinstance(r["prediction"], str) and not r["prediction"].strip()
                for r in rows)  # a number is no empty answer (our variants score its text)
    if empty:
        info["empty_predictions"] = empty
    left_out = sum(r.get("task_type") == "multi_label" and not isinstance(r.get("prediction"), str) for r in rows)
    if left_out:  # FLARE's multi-label F1 leaves a pair out whose prediction is no text (null, a number); "" no label
        info["null_multi_label_predictions"] = left_out
    return rows, info


def edited_sheet_beside(path: Path, rows: list[dict]) -> dict:
    """An infer run's predictions.xlsx edited by hand next to the predictions.jsonl eval scores (a run dir
    given): said in the log and the report, naming the sheet to pass instead; {} when it agrees or is absent."""
    from flare_exp.data.sheet_predictions import read_sheet_predictions

    sheet = path.with_suffix(".xlsx")
    if not sheet.is_file() or sheet.stat().st_mtime <= path.stat().st_mtime:
        return {}  # infer writes the sheet after the journal: an older sheet was not edited since
    try:
        edited = {r.get("id"): r.get("prediction") for r in read_sheet_predictions(sheet)[0]}
    except Exception:  # noqa: BLE001  (a sheet broken by the edit: only passing it would say how)
        edited = None
    from flare_exp.data.references import same_answer
    from flare_exp.cells import as_stored

    text = lambda value: "" if value is None else str(as_stored(value))  # noqa: E731  (an empty cell: a null one)
    # compared as answers are: Excel's "Convert to Number" (text "60.0" stored as 60) scores the same, no edit
    differ = None if edited is None else sum(
        not same_answer(text(edited.get(r["id"], r.get("prediction"))), text(r.get("prediction"))) for r in rows)
    if differ == 0:
        return {}
    note = (f"{sheet} was changed after {path.name} and " + (f"differs in {differ} prediction(s)" if differ else
            "cannot be read") + f": eval scored {path.name}, not the sheet; to score the edited sheet pass "
            f"eval.predictions=[{sheet}]")
    log.warning("eval: %s", note)
    return {"edited_sheet_note": note}


def same_names(path: Path, rows: list[dict]) -> dict:
    """A file scored without a prepared split: its task types as ours (FLARE's raw names and ours in any case or
    spacing), and one dataset written in several cases ("chestdr", "ChestDR") as one, said in the report (two
    would split the dataset's number in two): a FLARE dataset as the download spells it, so every file of an
    eval names it alike (files compared side by side), another one as its most frequent spelling in the file."""
    from collections import Counter

    from flare_exp.data.records import FLARE_DATASETS, normalise_task_type

    for row in rows:
        task = row.get("task_type")
        if isinstance(task, str) and task not in official.OFFICIAL_METRIC:
            row["task_type"] = normalise_task_type(task) or task
    spellings: dict[str, Counter] = {}
    for row in rows:
        if isinstance(row.get("dataset"), str):
            spellings.setdefault(row["dataset"].strip().casefold(), Counter())[row["dataset"]] += 1
    flare = {name.casefold(): name for name in FLARE_DATASETS}
    merged = {key: flare.get(key) or found.most_common(1)[0][0] for key, found in spellings.items()
              if len(found) > 1 or key in flare and set(found) != {flare[key]}}
    if not merged:
        return {}
    for row in rows:
        if isinstance(row.get("dataset"), str) and row["dataset"].strip().casefold() in merged:
            row["dataset"] = merged[row["dataset"].strip().casefold()]
    note = ("datasets written in several cases scored as one: " + ", ".join(
        f"{' / '.join(sorted(spellings[k]))} as {v}" for k, v in sorted(merged.items())))
    log.warning("eval: %s: %s", path, note)
    return {"dataset_names_note": note}


def joined(path: Path, rows: list[dict], prepared_dir: str | None) -> tuple[list[dict], dict]:
    """The rows joined to the prepared split they answer, and where their answers came from; an infer run whose
    own split is gone is named as such, not as ids missing from the split data.prepared_dir offers instead."""
    from flare_exp.data.references import gone_run_split, join_to_reference, reference_file, run_split

    source = run_split(path)  # the infer run's own split, read from its config once
    reference, gone = reference_file(source, rows, prepared_dir), gone_run_split(path, source)
    if reference is None:
        refuse_mixed_splits(path, rows)
        return rows, {"answers_from": "the predictions file", "answers_note": (
            "answers taken from the predictions file, unchecked: no prepared split was found to join them to "
            f"(data.prepared_dir{'; ' + gone if gone else ''})")}
    try:
        rows, covered = join_to_reference(path, rows, reference)
    except ValueError as e:
        if not gone:
            raise
        raise ValueError(f"{path}: {gone}, and data.prepared_dir's {reference}, tried instead, does not match "
                         "these predictions: prepare that split again (stage=prepare with the run's data settings) or "
                         "point data.prepared_dir at a copy of it") from e
    if reference.stem in ("train", "val", "test"):  # a prepared split holds every row now: they are it, whatever
        for row in rows:  # a sheet (no split column) or a hand-edited file ("VAL", null) called them
            row["split"] = reference.stem
    if gone:  # the ids matched another prepared split: its answers, split and image window are scored, and said
        covered["answers_note"] = (f"{gone}; joined to {reference} (data.prepared_dir) instead: the answers, split and "
                                   "image window are that file's, which may not be what the run predicted on")
        log.warning("eval: %s: %s", path, covered["answers_note"])
    return rows, {"answers_from": str(reference), **covered}


def refuse_mixed_splits(path: Path, rows: list[dict]) -> None:
    """Rows that name several splits, with no prepared split to join them to (where one holds their ids, its join
    refuses the ids it lacks): none of their answers could be checked, and one split's numbers would count
    another's questions."""
    named = Counter(r["split"] for r in rows if isinstance(r.get("split"), str))
    if len(named) < 2:
        return
    _, *others = [split for split, _count in named.most_common()]
    strays = [r.get("id") for r in rows if r.get("split") in others]
    raise ValueError(f"{path}: its rows name several splits ({', '.join(f'{k}: {n}' for k, n in named.most_common())}"
                     f"), e.g. {strays[0]} ({next(r['split'] for r in rows if r.get('id') == strays[0])}): eval scores "
                     f"one split at a time. Leave out the rows of the other split(s), or score each split's "
                     "predictions as a file of its own")


def refuse_mixed_models(path: Path, rows: list[dict]) -> None:
    """Rows whose own model / adapter fields (infer writes them on every row) name several models: two runs'
    files joined into one would be scored as one model, under one name."""
    import json

    def made_by(row: dict) -> str | None:
        if row.get("model") is None and row.get("adapter") is None:
            return None  # a row written by hand or by another tool: nothing to compare
        return json.dumps([row.get("model"), row.get("adapter")], sort_keys=True, default=str)

    named = Counter(made_by(r) for r in rows)  # None: a row without the fields
    if len(named) < 2:
        return
    (first, _), (other, count) = named.most_common(2)
    stray = next(r for r in rows if made_by(r) == other)
    said = lambda made: "no model fields" if made is None else "model {!r}, adapter {!r}".format(  # noqa: E731
        *json.loads(made))
    raise ValueError(f"{path}: its rows come from {len(named)} models (model/adapter fields), e.g. {count} row(s) "
                     f"like {stray.get('id')} with {said(other)} beside rows with {said(first)}: eval scores one "
                     "model per file. Give each model's predictions as a file of its own in eval.predictions (they "
                     "are compared side by side)")


ZIP = b"PK\x03\x04"  # .xlsx, .ods
ACCEPTED = ("eval reads infer's predictions.jsonl (one JSON object per line with id and prediction), an infer run "
            "dir or an .xlsx sheet with infer's columns")


def refuse_other_formats(path: Path) -> None:
    """A file of another format (a CSV, an .xls or .ods spreadsheet, a JSON array) named as such with what to
    do, before reading it as JSONL fails on its first byte."""
    why = other_format(path)
    if why:
        raise ValueError(f"{path}: {why}")


def other_format(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return ("eval reads predictions as JSONL (infer's predictions.jsonl: one JSON object per line with id and "
                "prediction) or as an .xlsx sheet with infer's columns; save this table as .xlsx")
    if not path.is_file():
        return None  # the reader says so
    with open(path, "rb") as f:
        head = f.read(128)
    if suffix == ".xls" or head.startswith(OLE2):
        return "an old binary Excel workbook (.xls), which eval does not read: save it as .xlsx (Excel Workbook)"
    if suffix == ".ods" or head.startswith(ZIP) and b"opendocument" in head:
        return ("an OpenDocument spreadsheet (.ods), which eval does not read: save it as .xlsx (LibreOffice: Save "
                "As, Excel 2007-365)")
    if head.startswith(ZIP):
        return f"a zip archive, not JSON Lines: a workbook is read when saved as .xlsx; {ACCEPTED}"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")  # past a byte-order mark and blank space
    if text.startswith(b"["):
        return json_array(path)
    if suffix in (".yaml", ".yml", ".md", ".txt", ".log", ".html", ".png"):
        return f"a {suffix[1:]} file (a run's config, log or report?), not predictions; {ACCEPTED}"
    if suffix == ".json" and text.startswith(b"{"):
        try:
            whole = json.loads(path.read_text(encoding="utf-8-sig"))
        except ValueError:
            return None  # JSON Lines under a .json name: read as such
        if not (isinstance(whole, dict) and "id" in whole):  # one prediction row is JSON Lines too
            return f"one JSON object (a run's summary or record?), not predictions; {ACCEPTED}"
    return None


def json_array(path: Path) -> str:
    """What a file holding one JSON array is: FLARE's submission format (a dataset's *_predictions.json, rows
    without ids), or another list of rows."""
    try:
        first = (json.loads(path.read_text(encoding="utf-8-sig")) or [None])[0]
    except (ValueError, TypeError, KeyError, IndexError):
        first = None
    if isinstance(first, dict) and {"ImageName", "Answer"} <= set(first) and "id" not in first:
        return ("a FLARE submission file (a JSON array of TaskType, ImageName, Question, Answer: no ids), not JSON "
                f"Lines; {ACCEPTED}: pass the infer run that wrote it (its dir or its predictions.jsonl)")
    return (f"a JSON array, not JSON Lines; {ACCEPTED}: write one object per line "
            f"(e.g. jq -c '.[]' {path.name} > predictions.jsonl)")


def check_one_row_per_id(path: Path, rows: list[dict]) -> None:
    counts = Counter(r.get("id") for r in rows)
    doubled = {k: c for k, c in counts.items() if c > 1}
    if doubled:
        raise ValueError(f"{path}: {len(doubled)} id(s) occur more than once ({sum(doubled.values())} rows, e.g. "
                         f"{next(iter(doubled))}): a predictions file holds one row per question")


def _torn_at_the_end(path: Path) -> bool:
    """Whether the only line that does not parse is the file's last one (a write cut short)."""
    try:
        return read_jsonl_of_unfinished_run(path)[1]
    except ValueError:
        return False


def check_fields(path: Path, rows: list[dict]) -> None:
    """Every row an object with an id; the predictions under the key ``prediction`` (a file where no row has it
    would score as all empty answers); a number (a tool writing 20.0, not "20.0") kept a number, as FLARE reads it."""
    for line, row in enumerate(rows, 1):
        if isinstance(row, dict) and isinstance(row.get("id"), str):
            row["id"] = row["id"].strip()  # a space a spreadsheet or an editor added; two ids left equal are doubled
        if not isinstance(row, dict) or row.get("id") in (None, ""):
            raise ValueError(f"{path}, row {line}: {'no id' if isinstance(row, dict) else 'not a JSON object'}; "
                             "every prediction names its question's id")
    if not any("prediction" in r for r in rows):
        raise ValueError(f"{path}: no row has a 'prediction' field (the first row's fields: "
                         f"{', '.join(map(repr, rows[0]))}); eval reads each row's answer to its question there")
    for line, row in enumerate(rows, 1):
        value = row.get("prediction")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            continue  # kept a number, as FLARE's evaluator reads it (multi-label and GREEN leave it out, float() of
            # an integer past a float's range fails: infinity); our variants score its text (scoring.scored_rows)
        if value is not None and not isinstance(value, str):  # FLARE's sheet holds text: no list, object, bool
            raise ValueError(f"{path}, row {line} (id {row['id']}): the prediction is {type(value).__name__} "
                             f"{json.dumps(value)[:60]}, not text; write the answer as the model's text (a "
                             "multi-label answer as one string, labels separated as in the dataset's answers)")


def check_written_count(path: Path, count: int, allow_partial: bool) -> None:
    """A finished infer run's predictions file must hold as many rows as its summary says it wrote: fewer means
    the file was cut (a partial copy, an edit) and the scores would silently cover a subset."""
    summary = path.parent / summary_name("infer")
    if not ((path.parent / DONE).exists() and summary.exists()):
        return
    written = json.loads(summary.read_text()).get("samples")
    if isinstance(written, int) and written != count and not allow_partial:
        raise ValueError(f"{path} holds {count} predictions but its infer run wrote {written} ({summary.name}): the "
                         "file was cut or edited since. Copy it again, or rerun that infer with overwrite=true; "
                         "eval.allow_partial=true scores the rows that are there")


def expected_count(run_dir: Path) -> int | None:
    """How many predictions an unfinished infer run was asked for (its saved config), if it can be told."""
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.load(run_dir / CONFIG)
        source = infer_input_file(cfg)
        total = sum(1 for line in open(source, encoding="utf-8") if line.strip())
    except Exception:  # noqa: BLE001  (a best-effort count for the report's wording)
        return None
    return min(total, cfg.infer.num_samples) if cfg.infer.num_samples and cfg.infer.num_samples > 0 else total


def find_predictions(entry: str) -> Path:
    found = predictions_file(abspath(entry))
    if found is not None:
        return found
    raise FileNotFoundError(f"eval.predictions entry {entry}: no predictions.jsonl there (run stage=infer first)")



def decoding_of(infer) -> str:
    """The settings that decide a prediction's text, as one line (two runs that differ in it are not one model's
    numbers under two decodings' noise)."""
    said = f"max_new_tokens={infer.get('max_new_tokens')}"
    if infer.get("min_new_tokens"):
        said += f", min_new_tokens={infer.get('min_new_tokens')}"
    if infer.get("do_sample"):
        said += f", sampled (temperature={infer.get('temperature')}, top_p={infer.get('top_p')})"
    return said + ("" if infer.get("do_sample") else ", greedy")


def config_edits_said(run_dir: Path) -> list[str]:
    """config.yaml's hand edits since the run (fingerprint.config_edits), warned once per run dir."""
    from flare_exp.run.fingerprint import config_edits

    edits = config_edits(run_dir)
    if edits and run_dir not in _EDITS_SAID:
        _EDITS_SAID.add(run_dir)
        log.warning("%s/%s differs from the settings the run recorded as it ran (%s): %s. Edited after the run? "
                    "The report gives the recorded ones", run_dir, CONFIG, FINGERPRINT, "; ".join(edits[:6]))
    return edits


_EDITS_SAID: set[Path] = set()


def as_recorded(cfg, run_dir: Path):
    """``cfg`` with the deciding settings the run's fingerprint recorded put back over its config.yaml's."""
    from omegaconf import OmegaConf

    from flare_exp.run.fingerprint import recorded_fingerprint

    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    for key, value in recorded_fingerprint(run_dir).get("settings", {}).items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def run_metadata(path: Path) -> dict:
    """What produced a predictions file, from its infer run dir when there is one: the model, the checkpoint,
    the backend, when and from which commit."""
    from omegaconf import OmegaConf

    run_dir, meta = path.parent, {}
    try:
        if (run_dir / summary_name("infer")).exists():
            summary = json.loads((run_dir / summary_name("infer")).read_text())
            adapter = summary.get("adapter") or {}
            meta.update(checkpoint=adapter.get("path") or summary.get("checkpoint") or "base model",
                        adapter_sha256=adapter.get("sha256"), label=summary.get("label"))
        if (run_dir / CONFIG).exists():
            cfg = OmegaConf.load(run_dir / CONFIG)
            edits = config_edits_said(run_dir)
            if edits:  # the settings the run recorded as it ran, not a hand edit's
                cfg = as_recorded(cfg, run_dir)
                meta["config_edited"] = edits
            meta.update(model=str(cfg.model.get("name")), model_path=str(cfg.model.get("path")),
                        backend=str(cfg.model.get("backend")), max_pixels=cfg.model.get("max_pixels"),
                        decoding=decoding_of(cfg.get("infer") or {}))
        if (run_dir / RUN_INFO).exists():
            info = json.loads((run_dir / RUN_INFO).read_text())
            meta.update(commit=info.get("git_commit"), started=info.get("started") or info.get("start_time"))
        if (run_dir / DONE).exists():
            meta["finished"] = json.loads((run_dir / DONE).read_text()).get("finished")
    except Exception as e:  # noqa: BLE001  (a best-effort record for the report: a cut or hand-broken file, too)
        meta["note"] = f"run metadata unreadable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return meta
