"""FLARE's download unpacked in place: every nested ``*.zip`` extracted next to itself, once; an archive
replaced after extracting (a re-download) is extracted again (its marker records the size and time it was
extracted at)."""
from __future__ import annotations

import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from flare_exp.data.images import walk_files


class PrepareError(ValueError):
    """Bad input that stops prepare (malformed JSON file or archive, strict-mode reject, leakage)."""


def pending_zips(root: Path) -> list[Path]:
    """The archives not extracted yet, or replaced since (their marker records the size and time extracted)."""
    return [z for z in walk_files(root, ".zip") if _unzip_stamp(z.with_name(z.name + ".unzipped")) not in (
        _archive_stamp(z), "")]


def _archive_stamp(archive: Path) -> str:
    stat = archive.stat()
    return f"extracted by flare_exp prepare: {stat.st_size} bytes, modified {stat.st_mtime_ns}\n"


def _unzip_stamp(marker: Path) -> str | None:
    """The marker's stamp; "" for a marker of an earlier version (no stamp: taken as extracted), None if none."""
    try:
        text = marker.read_text()
    except OSError:
        return None
    return text if text.startswith("extracted by flare_exp prepare:") else ""


def unzip_nested(root: Path) -> int:
    """Extract every *.zip under ``root`` next to itself, repeating for zips inside zips. Idempotent. Under a
    lock in ``root`` when there is anything to extract: two prepares of one download (into two prepared dirs)
    would otherwise extract over each other and read half-written files; the second waits, then finds it done."""
    from flare_exp.run.lock import RunLock

    if not pending_zips(root):
        return 0  # nothing written into the download (it may be read-only)
    lock = RunLock(root, name=".flare_exp_unzip.lock").acquire_when_free("prepare: unzip")
    try:
        return _extract_pending(root)
    finally:
        lock.release()


def _extract_pending(root: Path) -> int:
    extracted = 0
    while True:
        pending = pending_zips(root)
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
            archive.with_name(archive.name + ".unzipped").write_text(_archive_stamp(archive))
            extracted += 1
