"""Atomic file writes and JSONL helpers: a crash never leaves a half-written output behind."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

log = logging.getLogger(__name__)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _umask_mode() -> int:
    return 0o666 & ~_umask()


def shared_as_umask(tree: Path) -> None:
    """Files and folders under ``tree`` (itself included) that their writer made private (0600 / 0700:
    safetensors' save_file, mkdtemp) get the mode a plain open() or mkdir() gives under this umask (0644 /
    0755 under 022), so a teammate can read a shared run; a mode set otherwise is left as it is."""
    mask = _umask()
    for path in [tree, *tree.rglob("*")]:
        try:
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode) or mode & 0o077:
                continue
            os.chmod(path, (0o777 if stat.S_ISDIR(mode) else 0o666) & ~mask)
        except OSError:
            continue


# Called with the target of every atomic write (file or tree) just before it lands: the run lock
# (flare_exp.run.lock) puts its check here that this process still owns the run dir the target is in, so a
# process whose lock was taken over while it was stopped lands nothing more in a dir that has another writer.
# A list filled by the lock's module, so io depends on nothing of the run's.
BEFORE_LANDING: list = []


def _before_landing(path: Path) -> None:
    for check in BEFORE_LANDING:
        check(path)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; it replaces ``path`` only if the block finishes (and the run
    lock, where one is held, is still this process's: ``BEFORE_LANDING``)."""
    path = Path(path)
    _before_landing(path)  # also before: no folder or temporary file made in a dir that is another's
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _umask_mode())  # mkstemp's file is 0600: give it the mode a plain open() would
        _before_landing(path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # atomic_path's name for a file not yet in place
TEMPORARY_DIR = re.compile(r"^\.(tmp|submission)-[a-z0-9_]{8}$")  # atomic_dir's tree not yet in place
REPLACED = re.compile(r"^\.(.+)\.replaced-[a-z0-9_]{8}$")  # atomic_dir's earlier tree, until the new one is in


def remove_leftover_temporaries(folder: Path) -> int:
    """Remove what writes a kill cut short left under ``folder`` (atomic_path's files and atomic_dir's trees,
    never read), and put back a tree atomic_dir had moved aside when the kill came before its new one was in
    place; links not followed, earlier attempts' records left as filed; the count. Only for a run dir whose lock
    is held: no other writer's file is in flight there."""
    import shutil

    removed = 0
    for parent, dirs, files in os.walk(folder):
        for name in [d for d in dirs if TEMPORARY_DIR.match(d) or REPLACED.match(d)]:
            dirs.remove(name)
            aside, replaced = Path(parent, name), REPLACED.match(name)
            if replaced and not Path(parent, replaced[1]).exists():
                aside.rename(Path(parent, replaced[1]))  # the new tree never arrived: the earlier one is still it
            else:
                shutil.rmtree(aside, ignore_errors=True)
                removed += 1
        dirs[:] = [d for d in dirs if d != "attempts"]
        for name in files:
            if TEMPORARY.match(name):
                Path(parent, name).unlink(missing_ok=True)
                removed += 1
    return removed


@contextlib.contextmanager
def atomic_dir(target: str | Path, prefix: str = ".tmp-", complete=None) -> Iterator[Path]:
    """A temporary sibling directory to fill; renamed to ``target`` when the block ends (a half-written
    ``target`` left by a crash is replaced), removed if the block fails: a reader never sees half a tree.
    ``complete(target)``: whether a target is whole. A whole one that appeared meanwhile (another process that
    built the same thing, e.g. parallel sweep jobs building a fixture) is kept and this block's tree dropped, so
    a process already reading it never sees its files vanish. Without it, an existing target is replaced."""
    import shutil

    target = Path(target)
    _before_landing(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        yield tmp
        shared_as_umask(tmp)  # mkdtemp's dir is 0700, as are some writers' files
        if complete is not None and complete(target):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        _before_landing(target)
        aside = None
        if target.exists():  # moved aside, not deleted, until the new tree is in (a kill between keeps it)
            aside = target.with_name(f".{target.name}.replaced-{os.urandom(4).hex()}")
            target.rename(aside)
        try:
            tmp.rename(target)
        except OSError:  # another process renamed its tree there first
            if aside is not None and not target.exists():
                aside.rename(target)
                aside = None
            if complete is None or not complete(target):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# How a strict JSON reader (jq, JavaScript's JSON.parse) gets a non-finite number: as these strings, which
# Number() and float() read back; json.dumps would write bare NaN / Infinity tokens that such readers reject.
NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _finite_only(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {k: _finite_only(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_only(v) for v in obj]
    return obj


def strict_json(obj: Any, indent: int | None = None) -> str:
    """JSON text every strict reader parses: NaN and infinities written as the strings of ``NON_FINITE``."""
    return json.dumps(_finite_only(obj), indent=indent, ensure_ascii=False, default=str, allow_nan=False)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, strict_json(obj, indent=2) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    n = 0
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(strict_json(row) + "\n")
                n += 1
    return n


def _parse_line(path: Path, lineno: int, raw: bytes):
    """One JSONL line: its object, or a ValueError naming the file, line and what is wrong with it. A byte-order
    mark opening the file (Windows editors write one) is not part of the JSON."""
    if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})"
                         f"{_remade_by(path)}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno}){_remade_by(path)}") from None


def _remade_by(path: Path) -> str:
    """For a split prepare wrote (its summary.json beside it): how to write it again."""
    if Path(path).stem in ("train", "val", "test") and (Path(path).parent / "summary.json").exists():
        return (f"; it is a split prepare wrote, cut or edited since: write it again with stage=prepare "
                f"data.prepared_dir={Path(path).parent} overwrite=true (the steps trained on it redo too)")
    return ""


def read_journal(path: str | Path, key: str, replaced: list | None = None) -> dict[str, dict]:
    """Rows of an append-only JSONL journal (predictions, judgments) by ``row[key]``, for resuming. A torn last
    line (the job was killed mid-write, at any byte, inside a multi-byte character too) is dropped, logged, and
    the file rewritten without it, so appends continue cleanly; a broken line elsewhere, or a row that is no
    object with its ``key``, is an error naming it; blank lines are skipped. Of two different rows of one key the
    later is kept, the earlier appended to ``replaced`` where given."""
    path = Path(path)
    if not path.exists():
        return {}
    rows: dict[str, dict] = {}
    for row in mended_journal(path):
        if not isinstance(row, dict) or not isinstance(row.get(key), (str, int)) or isinstance(row.get(key), bool):
            raise ValueError(f"{path}: a row without its {key!r} ({json.dumps(row, ensure_ascii=False)[:120]}): "
                             "edited by hand? fix or remove that line (the job writes one object per line)")
        if row[key] in rows and rows[row[key]] != row:  # never appended twice by a resume: an edit by hand
            log.warning("%s: two rows for %s %r that differ: the later one is kept", path, key, row[key])
            if replaced is not None:
                replaced.append(rows[row[key]])
        rows[row[key]] = row
    return rows


def torn_line_step(line: str | bytes) -> int | None:
    """The step a journal line cut short begins with (``{"step": N, ...``, as the training journals write their
    lines), read only where the number is whole (a comma after it); None otherwise."""
    found = re.match(r'\{"step": (\d+),', line.decode(errors="replace") if isinstance(line, bytes) else line)
    return int(found.group(1)) if found else None


def mended_journal(path: Path) -> list[dict]:
    """The rows of an append-only JSONL journal; a torn last line (a write cut short, at any byte) is dropped,
    logged, and the file rewritten without it, and a last line without its newline gets one, so the next append
    starts a line of its own instead of gluing onto the torn one. A broken line elsewhere is an error naming it."""
    import logging

    rows, torn = _rows_up_to_a_torn_end(path, skip_blank=True)  # a blank line (an edit by hand) holds nothing
    if torn is not None:
        logging.getLogger(__name__).warning("%s: dropping a torn last line (interrupted write: %s)", path,
                                            str(torn).split(": ", 1)[1])
    if torn is not None or (rows and not path.read_bytes().endswith(b"\n")):
        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return rows


def _rows_up_to_a_torn_end(path: Path, skip_blank: bool) -> tuple[list, ValueError | None]:
    """The rows of a JSONL file and, when its last line does not parse (a write cut short), that line's error
    instead of the line; a broken line elsewhere is an error naming it."""
    lines = path.read_bytes().splitlines()
    rows = []
    for i, raw in enumerate(lines):
        if skip_blank and not raw.strip():
            continue
        try:
            rows.append(_parse_line(path, i + 1, raw))
        except ValueError as e:
            if i < len(lines) - 1:
                raise
            return rows, e
    return rows, None


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file; a broken line (not JSON, not UTF-8) is an error naming the file and line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    rows = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                rows.append(_parse_line(path, lineno, line))
    return rows


def read_jsonl_of_unfinished_run(path: str | Path) -> tuple[list[dict], bool]:
    """read_jsonl for a journal another job may have been killed while writing: a torn last line is left out
    (the file itself is not touched) and said by the second value; a broken line elsewhere is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    rows, torn = _rows_up_to_a_torn_end(path, skip_blank=True)
    return rows, torn is not None


def file_fingerprint(path: str | Path) -> dict:
    """sha256 + size of a file, saved with checkpoints so a resumed run can tell its data changed."""
    path = Path(path)
    return {"path": str(path), "sha256": file_digest(path), "bytes": path.stat().st_size}


def model_dir_digest(path: str | Path, sample: int = 1 << 20) -> str:
    """A model directory's digest without reading its gigabytes: every file's name and size, the small ones
    (config, tokenizer) whole, the large ones (weights) by three samples (start, middle, end); another model
    in the same folder (re-downloaded, fine-tuned into it, a link moved to another version) differs in them."""
    h = hashlib.sha256()
    root = Path(path)
    for file in sorted(p for p in root.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(root).parts)):
        size = file.stat().st_size
        h.update(f"{file.relative_to(root).as_posix()}\0{size}\0".encode())
        with open(file, "rb") as f:
            if size <= 3 * sample:
                h.update(f.read())
                continue
            for at in (0, size // 2, size - sample):
                f.seek(at)
                h.update(f.read(sample))
    return h.hexdigest()


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """A file's digest, read in 1 MiB chunks (downloads and weights are large)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
