"""FLARE's download unpacked in place: every nested ``*.zip`` extracted next to itself, once; an archive
replaced after extracting (a re-download with other bytes) is extracted again (its marker records the size, time
and sha1 it had when extracted), and its files deleted since (a disk cleanup, a copy of the download that kept the
markers) come back from it."""
from __future__ import annotations

import logging
import re
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from flare_exp.data.images import walk_files
from flare_exp.io import file_digest

log = logging.getLogger(__name__)


class PrepareError(ValueError):
    """Bad input that stops prepare (malformed JSON file or archive, strict-mode reject, leakage)."""


def pending_zips(root: Path) -> list[Path]:
    """The archives not extracted yet, or replaced since: their marker records the size, time and sha1 the
    archive had when extracted; one copied again with the same bytes (new times) is not pending, its marker
    refreshed where the download is writable. A marker of an earlier version (no record) counts as extracted
    unless the archive is newer than it. Also those extracted before whose files were deleted since."""
    return list(pending_archives(root))


def pending_archives(root: Path) -> dict[Path, list[str] | None]:
    """pending_zips with what each needs: None (the whole archive) or the files extracted before and gone since."""
    return {z: refill for z in walk_files(root, ".zip") if (refill := _refill(z)) is None or refill}


def _refill(archive: Path) -> list[str] | None:
    """None where the archive is to be extracted whole; else its files gone since it was (none: nothing to do)."""
    return _gone_members(archive) if _extracted(archive, _marker(archive)) else None


def why_pending(archive: Path) -> str:
    """Why a pending archive is to be extracted, in words."""
    return said_pending(_refill(archive))


def said_pending(refill: list[str] | None) -> str:
    if refill is None:
        return "new or replaced, not extracted yet"
    return f"extracted before, {len(refill)} of its files gone since (e.g. {refill[0]}): extracted again"


def _marker(archive: Path) -> Path:
    return archive.with_name(archive.name + ".unzipped")


def _gone_members(archive: Path) -> list[str]:
    """The archive's files that are not next to it (deleted since it was extracted: a disk cleanup, a copy of the
    download that kept the marker); an archive that cannot be read counts as not extracted."""
    try:
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return ["(the archive cannot be read)"]
    return [m for m in names if not m.endswith("/") and not (archive.parent / m).exists()]


def _extracted(archive: Path, marker: Path) -> bool:
    try:
        text, marked = marker.read_text(), marker.stat().st_mtime_ns
    except OSError:
        return False
    stat = archive.stat()
    found = re.match(rf"{STAMP} (\d+) bytes, modified (\d+), sha1 ([0-9a-f]+)", text)
    if found is None:
        return stat.st_mtime_ns <= marked  # an earlier version's marker: replaced if the archive is newer
    size, mtime, sha1 = int(found.group(1)), int(found.group(2)), found.group(3)
    if (size, mtime) == (stat.st_size, stat.st_mtime_ns):
        return True
    if size != stat.st_size or file_digest(archive, "sha1") != sha1:
        return False
    try:
        marker.write_text(_stamp(size, stat.st_mtime_ns, sha1))  # the same bytes, copied again: new times kept
    except OSError:
        pass  # a read-only download: compared by content again next time
    return True


STAMP = "extracted by flare_exp prepare:"


def _stamp(size: int, mtime_ns: int, sha1: str) -> str:
    return f"{STAMP} {size} bytes, modified {mtime_ns}, sha1 {sha1}\n"


def _archive_stamp(archive: Path) -> str:
    stat = archive.stat()
    return _stamp(stat.st_size, stat.st_mtime_ns, file_digest(archive, "sha1"))


def unzip_nested(root: Path, datasets: list[str] | None = None) -> int:
    """Extract every *.zip under ``root`` next to itself, repeating for zips inside zips. Idempotent. Under a
    lock in ``root`` when there is anything to extract: two prepares of one download (into two prepared dirs)
    would otherwise extract over each other and read half-written files; the second waits, then finds it done.
    ``datasets``: the ones asked for; a broken archive that names only another FLARE dataset is passed over."""
    from flare_exp.run.lock import RunLock

    if not pending_zips(root):
        return 0  # nothing written into the download (it may be read-only)
    lock = RunLock(root, name=".flare_exp_unzip.lock").acquire_when_free("prepare: unzip")
    try:
        return _extract_pending(root, datasets)
    finally:
        lock.release()


def of_another_dataset(root: Path, archive: Path, datasets: list[str] | None) -> bool:
    """Whether the archive's path names a FLARE dataset (training/Xray/chestdr.zip, .../chestdr/imagesTr.zip)
    and none of those asked for."""
    from flare_exp.data.records import FLARE_DATASETS

    if datasets is None:
        return False
    named = {part.casefold() for part in archive.relative_to(root).with_suffix("").parts}
    flare = {d.casefold() for d in FLARE_DATASETS}
    return bool(named & flare) and not named & {d.casefold() for d in datasets}


def _extract_pending(root: Path, datasets: list[str] | None = None) -> int:
    extracted, passed_over = 0, set()
    while True:
        # extracted before: only its files gone since come back (the others may have been edited in place)
        pending = {z: refill for z, refill in pending_archives(root).items() if z not in passed_over}
        if not pending:
            return extracted
        for archive, refill in tqdm(pending.items(), desc="unzip", unit="zip", disable=len(pending) < 2):
            dest = archive.parent.resolve()
            try:
                with zipfile.ZipFile(archive) as zf:
                    for member in zf.namelist():
                        target = (dest / member).resolve()
                        if dest not in target.parents and target != dest:
                            raise PrepareError(f"{archive}: member {member!r} would extract outside {dest}")
                    if refill:
                        log.warning("prepare: %d file(s) of %s, extracted before, are gone (e.g. %s): extracted "
                                    "again", len(refill), archive, refill[0])
                    zf.extractall(dest, members=refill)
            except OSError as e:
                if refill is None:
                    raise
                log.warning("prepare: %d file(s) of %s, extracted before, are gone and cannot be extracted again "
                            "(%s): the questions naming them are rejected as missing images", len(refill), archive, e)
                passed_over.add(archive)
                continue
            except zipfile.BadZipFile as e:
                if of_another_dataset(root, archive, datasets):
                    log.warning("prepare: %s is not a valid zip file (%s); passed over: it holds none of "
                                "data.datasets=%s", archive, e, list(datasets))
                    passed_over.add(archive)
                    continue
                raise PrepareError(f"{archive}: not a valid zip file ({e}): a download cut short? Download it "
                                   "again, or move it out of data.root if its data is not needed (data.unzip=false "
                                   "skips every archive)") from None
            _marker(archive).write_text(_archive_stamp(archive))
            passed_over.add(archive)  # once per call: a member the filesystem does not keep is not retried
            extracted += 1
