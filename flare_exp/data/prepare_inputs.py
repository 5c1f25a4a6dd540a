"""What a prepare read from data.root, recorded beside its outputs (``inputs.json``), so a finished prepare is
reused only while the download is as it was: FLARE publishes corrected annotations, and a user who unpacks
them into the same data.root and reruns a pipeline must not get the old records (and the model trained on
them) reported as made "with the same settings and inputs".

Recorded: each question file read (sha256), each image a record named (size, modification and change times, sha1
of its bytes; rejected ones too: cut short, unreadable, too small), and each image a record named that was not
there. The change time is the one a user cannot set back: an image edited in place at the same size with its
modification time restored (``touch -r``) is read again.
Checked: a question file changed, removed or added for the chosen datasets and splits; an image changed or
removed (one whose size or time changed is read again and counts only if its bytes did: a copy with new times is
the same download, and its new times are kept under that data.root's path, so each copy is read once, and the
prepare's own record stays as it was); a missing image that is there now.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from flare_exp.io import file_digest, write_json

log = logging.getLogger(__name__)

INPUTS = "inputs.json"
SHOWN = 5  # changed files named in a message; the rest are counted
KEPT_ROOTS = 4  # the copies of data.root whose file times are kept (the latest ones)


def record_inputs(out_dir: Path, root: Path, questions: list[Path], images: dict[Path, str],
                  missing: list[tuple[Path, str]] = (), outputs: list[Path] = ()) -> None:
    """``images``: path -> sha1 of its bytes (prepare's image pass computed it, rejected files too); ``missing``:
    (dataset folder, ImageName) of the images a record named that were not there; ``outputs``: the split files
    it wrote (sha256: one edited by hand since is no longer this prepare's output)."""
    stats = {p: p.stat() for p in images if p.exists()}
    write_json(out_dir / INPUTS, {
        "question_files": {_name(p, root): file_digest(p) for p in questions},
        "images": {_name(p, root): [s.st_size, s.st_mtime_ns, images[p], s.st_ctime_ns] for p, s in stats.items()},
        "missing": sorted({(_name(folder, root), name) for folder, name in missing}),
        "outputs": {p.name: file_digest(p) for p in outputs if p.is_file()}})


def output_changes(out_dir: Path, recorded: dict) -> list[str]:
    """'prepared file train.jsonl: edited since ...' for each split file that is not what the prepare wrote (a
    reuse would train and report on other records than its summary counts)."""
    changes = []
    for name, sha in sorted(recorded.get("outputs", {}).items()):
        path = out_dir / name
        now = file_digest(path) if path.is_file() else None
        if now != sha:
            changes.append(f"prepared file {name}: " + ("removed since the prepare wrote it" if now is None else
                                                         f"edited since the prepare wrote it (sha256 {sha[:12]} -> "
                                                         f"{now[:12]})"))
    return changes


def _name(path: Path, root: Path) -> str:
    """Relative to data.root where it lies under it (as written), else absolute (a symlinked folder, resolved)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def input_changes(out_dir: Path, root: Path, questions: list[Path], resolve, expected: bool = False,
                  quiet: bool = False) -> list[str]:
    """'data.root file X: changed' for what differs between the recorded inputs and data.root now
    (``questions``: the question files a prepare would read now; ``resolve(folder, name)``: prepare's image
    lookup, a path or why there is none). An image found with new times but the same bytes is the same, and its
    record takes the new times. Without a readable record: a change when one was written (``expected``: a
    prepare of this version, deleted or cut since), else said once in the log (unless ``quiet``: the demo's own
    generated tree), nothing compared."""
    recorded = _recorded(out_dir, expected or quiet)
    if recorded is None:
        return [f"{INPUTS} in {out_dir}: missing or unreadable, though the prepare wrote it (deleted or cut "
                "since): its inputs cannot be compared"] if expected else []
    changes = question_changes(recorded["question_files"], root, questions)
    images, refreshed = image_changes(root, recorded["images"], recorded["times"].get(str(root), {}))
    changes += [f"{name}: {why}" for name, why in images]
    changes += [f"{Path(folder, name).as_posix()}: added (missing at the prepare)"
                for folder, name in recorded["missing"] if not isinstance(resolve(root / folder, name), str)]
    if not changes:
        keep_times(out_dir, recorded, root, refreshed)
    return [f"data.root file {c}" for c in changes] + output_changes(out_dir, recorded)


def question_changes(before: dict, root: Path, questions: list[Path]) -> list[str]:
    """'X: added / removed / changed (sha256 a -> b)' for the question files a prepare would read now
    (``questions``) against those it recorded (``before``: name -> sha256)."""
    now = {_name(p, root): p for p in questions}
    changes = [f"{name}: added" for name in sorted(set(now) - set(before))]
    changes += [f"{name}: removed" for name in sorted(set(before) - set(now))]
    current = {name: file_digest(now[name]) for name in sorted(before) if name in now}  # each read once
    return changes + [f"{name}: changed (sha256 {before[name][:12]} -> {sha[:12]})" for name, sha in current.items()
                      if sha != before[name]]


def keep_times(out_dir: Path, recorded: dict, root: Path, refreshed: dict) -> None:
    """The new times of a data.root copy's files found with the same bytes, kept under that root's path (the
    latest KEPT_ROOTS roots): the next check there compares by size and time again, not by reading every file."""
    if not refreshed:
        return
    times = {k: v for k, v in recorded["times"].items() if k != str(root)}
    times[str(root)] = {**recorded["times"].get(str(root), {}), **refreshed}
    try:
        write_json(out_dir / INPUTS, {**recorded, "times": dict(list(times.items())[-KEPT_ROOTS:])})
    except OSError:
        pass  # a read-only prepared dir: compared by bytes again next time


COMPARED: set[tuple[str, str]] = set()  # (prepared dir, data.root) pairs whose comparison was said
SAID: set[str] = set()  # the prepared dirs whose missing record was said (a run checks them more than once)


def recorded_inputs(out_dir: Path) -> dict | None:
    """The inputs the prepare in ``out_dir`` recorded, None when none is readable (nothing said)."""
    return _recorded(out_dir, silent=True)


def prepared_summary(out_dir: Path) -> dict:
    """The summary.json a finished prepare wrote in ``out_dir`` ({} when there is none, or it is unreadable)."""
    try:
        found = json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _recorded(out_dir: Path, silent: bool = False) -> dict | None:
    """The recorded inputs, or None (said once per dir in the log, unless ``silent``) when there is no readable
    record: a prepare made before they were recorded, or a file cut short or edited."""
    try:
        recorded = json.loads((out_dir / INPUTS).read_text(encoding="utf-8"))
        parts = (recorded["question_files"], recorded["images"], recorded.get("missing", []),
                 recorded.get("times", {}), recorded.get("outputs", {}))
        if not (isinstance(parts[0], dict) and isinstance(parts[1], dict) and isinstance(parts[2], list)
                and isinstance(parts[3], dict) and isinstance(parts[4], dict)):
            raise ValueError("not the shape prepare writes")
        return {"question_files": parts[0], "images": parts[1], "missing": parts[2], "times": parts[3],
                "outputs": parts[4]}
    except FileNotFoundError:
        why = "none was recorded (a prepare made before they were)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = f"it is unreadable ({type(e).__name__}: {e})"
    if not silent and str(out_dir) not in SAID:
        SAID.add(str(out_dir))
        log.warning("prepare: %s: %s, so data.root's files were not compared with what made it; a prepare into "
                    "this dir with overwrite=true records them (the steps trained on it then redo too)",
                    out_dir / INPUTS, why)
    return None


def image_changes(root: Path, recorded: dict, copy_times: dict | None = None) -> tuple[list[tuple[str, str]], dict]:
    """(name, removed | changed) of each recorded image that differs, and the times of those found with new
    times but the same bytes (``copy_times``: name -> time, those found so before under this root)."""
    out, refreshed, copy_times = [], {}, copy_times or {}
    for name, (size, mtime, sha1, *ctime) in sorted(recorded.items()):
        path = root / name
        try:
            stat = path.stat()
        except OSError:
            out.append((name, "removed"))
            continue
        times = [stat.st_mtime_ns, stat.st_ctime_ns]
        if stat.st_size == size and (times in ([mtime, *ctime], copy_times.get(name))
                                     or not ctime and stat.st_mtime_ns in (mtime, copy_times.get(name))):
            continue
        if stat.st_size != size or file_digest(path, "sha1") != sha1:
            out.append((name, "changed"))
        else:
            refreshed[name] = times
    return out, refreshed


def moved_here(out_dir: Path, root: Path, recorded: dict | None = None, only: set | None = None) -> str | None:
    """None when every image the prepare in ``out_dir`` recorded (``recorded``, read if not given; ``only``: those
    of them named here, the images a stage's records use) is under ``root`` with the same bytes (its data.root
    moved or copied there: a stat each, the bytes read only where size or time differ); else why not."""
    recorded = recorded or _recorded(out_dir, silent=True)
    if recorded is None:
        return f"{out_dir / INPUTS} is missing or unreadable, so the images there cannot be compared"
    if not root.is_dir():
        return f"no such directory {root}"
    images = recorded["images"] if only is None else {k: v for k, v in recorded["images"].items() if k in only}
    if (str(out_dir), str(root)) not in COMPARED:  # a launch compares them at each of its checks: said once
        COMPARED.add((str(out_dir), str(root)))
        log.info("comparing the %d images recorded in %s with those under %s", len(images), out_dir / INPUTS, root)
    changed, refreshed = image_changes(root, images, recorded["times"].get(str(root), {}))
    if changed:
        name, why = changed[0]
        which = "images prepare recorded" if only is None else "images prepare recorded that these records use"
        return f"{len(changed)} of the {len(images)} {which} differ there, e.g. {name}: {why}"
    keep_times(out_dir, recorded, root, refreshed)
    return None


def summarised(changes: list[str]) -> list[str]:
    return changes[:SHOWN] + ([f"and {len(changes) - SHOWN} more data.root files"] if len(changes) > SHOWN else [])


def images_named(record_files: list[Path]) -> set[str] | None:
    """The images the records in these prepared files use (their ``images`` field); None (the caller compares
    every recorded image) for no files, or where a file cannot be read whole: its stage says so itself."""
    if not record_files:
        return None
    names: set[str] = set()
    try:
        for path in record_files:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        names.update(json.loads(line).get("images") or ())
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    return names


def check_prepare_finished(key: str, value) -> None:
    """A file in the dir of a prepare that did not finish (killed, failed or still running): its splits may lack
    records and its checks' records (inputs.json, summary.json) are missing, so nothing it holds is read."""
    from omegaconf import OmegaConf

    from flare_exp.run.layout import CONFIG, DONE, FAILED
    from flare_exp.run.lock import being_made
    from flare_exp.run.record import marker
    from flare_exp.runtime import abspath

    folder = abspath(value).parent if value else None
    if folder is None or not (folder / CONFIG).is_file() or marker(folder) == DONE:
        return  # no run's dir (a prepared dir made by hand), or a finished one
    try:
        if OmegaConf.select(OmegaConf.load(folder / CONFIG), "stage.name") != "prepare":
            return
    except Exception:  # noqa: BLE001  (a config cut or edited: not known to be a prepare's)
        return
    state = (f"it FAILED: {folder / FAILED}" if marker(folder) == FAILED else "it is still running: a live process "
             "holds its lock; wait for it" if being_made(folder / "train.jsonl") else
             "it was stopped before its end: no DONE marker")
    raise ValueError(f"{key}={value}: the prepare that writes {folder} has not finished ({state}), so "
                     "its splits may lack records and its records of what it checked are missing. Run stage=prepare "
                     f"with data.prepared_dir={folder} to the end (the same command finishes it), then this")


def check_prepared_questions(cfg, record_files: list[Path]) -> None:
    """The question files of the FLARE splits a stage's records come from (test.jsonl: testing/, ...) are the
    ones the prepare in data.prepared_dir read (inputs.json): a question file changed, added or removed since
    (organisers re-release a corrected one) would leave a test submission without its new questions while it
    says it is complete, and train or score on answers changed since. Other splits are not looked at (a data.root
    holding only testing/ serves a test infer)."""
    from flare_exp.data.question_files import discover, question_files, split_sources_of
    from flare_exp.runtime import abspath

    prepared, root = abspath(cfg.data.prepared_dir), abspath(cfg.data.root)
    kinds = split_sources_of(cfg.data)
    sources = {s for f in record_files if abspath(f).parent == prepared for s in kinds.get(Path(f).stem, ())}
    recorded = recorded_inputs(prepared) if root.is_dir() and prepared_summary(prepared) else None
    if recorded is None or not sources:
        return
    found = discover(question_files(root), list(cfg.data.datasets), sorted(sources))
    prepared_with = prepared_datasets(prepared)
    beyond = sorted({qf.dataset for qf in found if prepared_with is not None and qf.dataset not in prepared_with})
    if beyond:  # their question files would read as "added" since the prepare
        raise ValueError(f"data.datasets names {', '.join(beyond)}, which the prepare in {prepared} left out while "
                         f"{', '.join(sorted(sources))} holds their question files (it prepared data.datasets="
                         f"[{','.join(prepared_with)}]): launch with those, or prepare again with every dataset "
                         "(another data.prepared_dir, or overwrite=true), then this")
    now = [qf.path for qf in found]
    before = {k: v for k, v in recorded["question_files"].items() if sources & set(k.split("/"))}  # its splits'
    changes = question_changes(before, root, now)
    if changes:
        raise ValueError(f"data.root={cfg.data.root}: {len(changes)} question file(s) of {', '.join(sorted(sources))} "
                         f"differ from those the prepare in {prepared} read, e.g. {changes[0]}: its records lack or "
                         "misstate those questions (a test submission would miss them while it says it is whole). "
                         "Prepare again (stage=prepare overwrite=true, or another data.prepared_dir), then this")


def prepared_datasets(prepared: Path) -> list[str] | None:
    """The data.datasets the prepare in ``prepared`` was run with (its config.yaml; None where that does not read)."""
    from omegaconf import OmegaConf

    from flare_exp.run.layout import CONFIG

    try:
        datasets = OmegaConf.to_container(OmegaConf.select(OmegaConf.load(prepared / CONFIG), "data.datasets"))
    except Exception:  # noqa: BLE001  (missing, cut or hand-broken: the file comparison below says what it can)
        return None
    return [str(d) for d in datasets] if isinstance(datasets, list) else None
