"""The image files of a FLARE download: found under data.root (symlinked folders followed), kept inside it,
and decoded once, in parallel, before any record that names them is accepted.

``Image.verify()`` reads a PNG's chunk structure only: a file whose compressed pixel data is broken passes it
and then kills SFT at its first batch, and again after every resume. Each image is therefore decoded in full
(``load()``), in worker processes, and its sha1 kept for the leakage check.
"""
from __future__ import annotations

import hashlib
import io
import os
import posixpath
import re
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

OUTSIDE_ROOT = "outside data.root"
_INLINE_BELOW = 32  # fewer images than this are decoded in the calling process (worker start-up costs more)


def walk_files(root: Path, suffix: str):
    """Files under ``root`` ending in ``suffix``, sorted, following symlinked folders (clusters stage data by
    linking dataset and split folders); a link back to a folder already walked is not entered again. Paths stay
    under ``root`` as written (not resolved), so they can be taken relative to it."""
    seen: set[str] = set()
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        found += [Path(dirpath) / f for f in filenames if f.endswith(suffix)]
    return sorted(found)


def inside(folder: Path, name: str) -> Path | None:
    """``folder / name`` when ``name`` is a relative path that stays inside ``folder`` (``a/../b`` does, ``../x``
    and ``/etc/passwd`` do not), else None. Judged on the text, not on resolved links: a symlink the user put
    inside the folder is trusted, a record cannot climb out of it."""
    if not name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return None
    normal = posixpath.normpath(name.replace("\\", "/"))
    if normal == ".." or normal.startswith("../") or normal == ".":
        return None
    return folder / normal


def _decode(path: str) -> tuple[str | None, str | None]:
    """(problem, sha1) of one image file, decoded in full; the problem names PIL's reason and the size."""
    from PIL import Image

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return f"unreadable image {Path(path).name}: {e.strerror or e}", None
    size = f"{len(data):,} bytes"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                size = f"{im.width}x{im.height} px, {size}"
                im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return f"decompression bomb {Path(path).name}: {e} ({size})", None
    except Exception as e:  # PIL raises many types for broken files
        reason = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "this file", str(e))[:200]
        return f"corrupt image {Path(path).name}: {type(e).__name__}: {reason} ({size})", None
    return None, hashlib.sha1(data).hexdigest()


def check_images(paths: list[Path], workers: int = 0) -> dict[Path, tuple[str | None, str | None]]:
    """path -> (problem or None, sha1 or None) for every file, decoded by ``workers`` processes (0: one per
    core, at most 16)."""
    unique = sorted(set(paths))
    workers = workers or min(os.cpu_count() or 1, 16)
    bar = dict(total=len(unique), desc="decode images", unit="img", disable=len(unique) < 200)
    if workers <= 1 or len(unique) < _INLINE_BELOW:
        return {p: _decode(str(p)) for p in tqdm(unique, **bar)}
    chunk = max(1, min(64, len(unique) // (workers * 4)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = list(tqdm(pool.map(_decode, [str(p) for p in unique], chunksize=chunk), **bar))
    return dict(zip(unique, results))
