"""The image files of a FLARE download: found under data.root (symlinked folders followed), kept inside it,
and decoded once, in parallel, before any record that names them is accepted.

``Image.verify()`` reads a PNG's chunk structure only: a file whose compressed pixel data is broken passes it
and then kills SFT at its first batch, and again after every resume. Each image is therefore decoded in full,
by the stages' own rule (flare_exp.data.decoding), in worker processes, held against the processor's limits
(a picture it cannot take would kill sft or infer), and its digests kept for the leakage check.
"""
from __future__ import annotations

import hashlib
import io
import os
import posixpath
import re
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

from tqdm.auto import tqdm

from flare_exp.data.decoding import HIGH_BIT_DEPTH, mode_label, upright_rgb
from flare_exp.data.wide_colour import colour_channels, wide_colour_values

OUTSIDE_ROOT = "outside data.root"
SMALLER_THAN_A_PATCH = "image smaller than one vision patch"
PROCESSOR_REFUSES = "image the processor refuses"
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


class ImageCheck(NamedTuple):
    problem: str | None  # why the image is rejected, else None
    sha1: str | None  # of the file's bytes (the leakage check)
    mode: str | None  # the file's PIL mode (summary.json counts them)
    pixels: str | None  # sha1 of the decoded 8-bit RGB pixels (same picture in another file format)
    size: tuple[int, int] | None = None  # width, height as stored
    uniform: float | None = None  # share of the decoded grey values near their median (1.0: one flat value)
    frames: int = 1  # pages of a multi-page file (TIFF): the stages read the first
    framed: bool = False  # nearly one level, but around a box that holds content (a collimated field, a margin)
    clipped: bool = False  # data.image_window clips most of its values (a high-bit-depth image)
    # a high-bit-depth image stretched from its own range whose values nearly all lie in a small part of it:
    # (content low, content high, own low, own high) (outlier_stretch)
    stretched: tuple | None = None


# an accepted image with this share of its pixels at one grey level is named in summary.json and the log: a
# window that saturates it (data.image_window), a float or constant image, a blank scan; or, when the rest forms
# a box of content inside that level, a collimated field or a wide margin (named apart: it is a picture)
NEARLY_UNIFORM = 0.9


@dataclass(frozen=True)
class ProcessorLimits:
    """What the image processor can take: sides of at least one vision patch, and the sizes its own resize
    (transformers' ``smart_resize``) accepts, under the image token budget."""
    patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int
    source: str

    def problem(self, width: int, height: int) -> str | None:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        if min(width, height) < self.patch_size:
            return f"{SMALLER_THAN_A_PATCH}: {width}x{height} px, the processor's patch is {self.patch_size} px"
        try:
            smart_resize(height, width, factor=self.patch_size * self.merge_size, min_pixels=self.min_pixels,
                         max_pixels=self.max_pixels)
        except ValueError as e:
            return f"{PROCESSOR_REFUSES}: {width}x{height} px: {e}"
        return None


# Qwen3-VL's published processor settings, used when prepare runs before the model is on this machine.
QWEN3_VL_LIMITS = dict(patch_size=16, merge_size=2, min_pixels=65536, max_pixels=16777216)


def processor_limits(model_cfg) -> ProcessorLimits:
    """The limits of the processor at model.path (its preprocessor_config.json or processor_config.json, read
    without loading the model), with model.min_pixels / max_pixels applied as the stages apply them."""
    import json

    from omegaconf import OmegaConf

    from flare_exp.runtime import abspath

    path = OmegaConf.select(model_cfg, "path", default=None, throw_on_missing=False)
    # transformers 4 saves preprocessor_config.json; 5 saves processor_config.json, the image processor's
    # settings nested under "image_processor"
    files = [abspath(path) / name for name in ("preprocessor_config.json", "processor_config.json")] if path else []
    config_file = next((f for f in files if f.is_file()), None)
    values = dict(QWEN3_VL_LIMITS)
    source = "Qwen3-VL's defaults (no preprocessor_config.json or processor_config.json at model.path)"
    if config_file is not None:
        saved = json.loads(config_file.read_text(encoding="utf-8"))
        if config_file.name == "processor_config.json":
            saved = saved.get("image_processor") if isinstance(saved.get("image_processor"), dict) else {}
        size = saved.get("size") or {}
        for key, size_key in (("patch_size", None), ("merge_size", None), ("min_pixels", "shortest_edge"),
                              ("max_pixels", "longest_edge")):
            found = size.get(size_key) if size_key else None
            values[key] = int(found or saved.get(key) or values[key])
        source = str(config_file)
    for key in ("min_pixels", "max_pixels"):
        if model_cfg.get(key) is not None:
            values[key] = int(model_cfg[key])
    return ProcessorLimits(**values, source=source)


def _check_image(path: str, window: tuple[float, float] | None, decode: bool = True) -> ImageCheck:
    """One image file, decoded in full by the stages' rule (``decode``; else its header only); the problem
    names PIL's reason and the size."""
    from PIL import Image

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return ImageCheck(f"unreadable image {Path(path).name}: {e.strerror or e}", None, None, None)
    digest = hashlib.sha1(data).hexdigest()  # a rejected file too: replaced later, it is another input
    size, mode, pixels, uniform, frames, framed, clipped = f"{len(data):,} bytes", None, None, None, 1, False, False
    stretched = None
    try:
        with warnings.catch_warnings():
            # PIL's own limit rejects (DecompressionBombError, twice MAX_IMAGE_PIXELS: ~179 MP); its warning at
            # half that is no reason to drop a large scan, which the processor's max_pixels scales down anyway
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                size, mode, stored = f"{im.width}x{im.height} px, {size}", mode_label(im), im.size
                frames = getattr(im, "n_frames", 1)
                if decode:
                    wide = wide_colour_values(im)  # a 16-bit colour file, read once for both
                    values = high_bit_values(im, wide)
                    picture = upright_rgb(im, window, wide)
                    pixels, uniform = hashlib.sha1(picture.tobytes()).hexdigest(), flat_share(picture)
                    stretched = outlier_stretch(values) if window is None else None
                    if not stretched:  # else said apart: a few extreme pixels set the stretch, not blank
                        uniform, framed, clipped = flatness(picture, values, window, uniform)
    except Image.DecompressionBombError as e:
        return ImageCheck(f"decompression bomb {Path(path).name}: {e} ({size}). If it is a true X-ray, save it "
                          "downscaled (every stage resizes it to model.max_pixels anyway) and prepare again",
                          digest, mode, None)
    except Image.UnidentifiedImageError:  # PIL's wording names an in-memory buffer, not the file
        reason = ("no image format Pillow reads: an empty or cut download, or another kind of file under an "
                  "image's name" if data else "the file is empty")
        return ImageCheck(f"corrupt image {Path(path).name}: {reason} ({size})", digest, mode, None)
    except Exception as e:  # PIL raises many types for broken files
        reason = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "this file", str(e))[:200]
        return ImageCheck(f"corrupt image {Path(path).name}: {type(e).__name__}: {reason} ({size})", digest, mode,
                          None)
    return ImageCheck(None, digest, mode, pixels, stored, uniform, frames, framed, clipped, stretched)


def high_bit_values(im, wide=None):
    """The values a high-bit-depth image is scaled from: a grey mode's, or a 16-bit colour file's colour channels
    (``wide``: its wide_colour_values); None for an 8-bit image."""
    import numpy as np

    if im.mode in HIGH_BIT_DEPTH:
        return np.asarray(im)
    return None if wide is None else colour_channels(wide)


def outlier_stretch(values, levels: int = 16, share: float = 0.001) -> tuple | None:
    """(content low, content high, own low, own high) for high-bit-depth values (``high_bit_values``) of which
    all but ``share`` at each end, the pixels at the very minimum and maximum aside, lie within 1/``levels`` of
    the own range that scales them: a few hot or dead pixels, a burned-in marker, or padding written as the
    maximum set the stretch, and the anatomy decodes to fewer than ``levels`` grey levels. None otherwise, and
    where the extremes hold nearly every pixel (a binary or flat image: the other checks say those)."""
    import numpy as np

    if values is None or values.size == 0:
        return None
    every = values.reshape(-1)
    if every.dtype.kind == "f":  # NaN and infinities decode as the ends: the finite values set the range
        every = every[np.isfinite(every)]
    if every.size == 0:
        return None
    low, high = every.min(), every.max()  # all of them: two hot pixels set the range
    flat = every[::max(1, every.size // 250_000)]  # the spread from a sample: cheap on large scans
    inner = flat[(flat > low) & (flat < high)]
    if high <= low or inner.size < 0.05 * flat.size:
        return None
    content_low, content_high = np.quantile(inner, [share, 1 - share])
    if (content_high - content_low) * levels >= high - low:
        return None
    return tuple(round(float(v), 6) for v in (content_low, content_high, low, high))


def narrow_integer_range(values, levels: int = 16) -> bool:
    """High-bit-depth integer values (``high_bit_values``) that span fewer than ``levels``: scaled from their own
    range they become full-contrast noise, a blank scan that looks like content."""
    if values is None or values.dtype.kind == "f":  # integer values: a float image may span less than 1
        return False
    return values.size > 0 and int(values.max()) - int(values.min()) < levels


def flat_share(picture, levels: int = 6) -> float:
    """The share of an 8-bit picture's grey values within ``levels`` of their median: near 1 for a picture that
    decoded to one flat value (a window that saturates it, a blank or constant scan, sensor noise on a blank),
    low for any X-ray with content (a black border alone is not flat: its content is elsewhere)."""
    import numpy as np

    counts = np.bincount(np.asarray(picture.convert("L")).ravel(), minlength=256)  # a histogram: cheap on large scans
    return _near_median(counts, levels)[1]


def _near_median(counts, levels: int) -> tuple[int, float]:
    """A grey-level histogram's median level, and the share of its values within ``levels`` of it."""
    import numpy as np

    total = max(int(counts.sum()), 1)
    median = int(np.searchsorted(np.cumsum(counts), total / 2))
    return median, float(counts[max(median - levels, 0):median + levels + 1].sum() / total)


FIELD_FILLS = 0.8  # a field inside a bright border fills at least this share of its box (an ellipse: 0.785)


def framed_content(picture, levels: int = 6, busy: float = 0.05, filled: float = 0.0,
                   edges_touched: int = 2) -> bool:
    """Whether a picture that is nearly one grey level holds its content in a box inside that level (a collimated
    field inside its shutters' border, a small scan on a wide margin). Off the level means further from it than
    ``levels`` or twice the level's own noise (its 90th percentile). The rows and columns where at least ``busy``
    of the pixels are off bound the box, which must cover 1-90% of the picture, touch at most two of its edges (a
    band along one side, all the window left unclipped, is no field), be more than a tenth off the level, and
    hold many grey levels there (a lead marker or a white block on a blank exposure is one level: no picture);
    ``filled``: the least share of the box that is off the level (a collimated field fills its box, the parts of
    an anatomy a too narrow window leaves unclipped do not); ``edges_touched``: the most edges the box may touch."""
    import numpy as np

    grey = np.asarray(picture.convert("L"))
    level, _ = _near_median(np.bincount(grey.ravel(), minlength=256), levels)
    deviation = np.abs(grey.astype(np.int16) - level)
    off = deviation > max(levels, 2 * float(np.percentile(deviation, 90)))
    rows, cols = np.flatnonzero(off.mean(axis=1) >= busy), np.flatnonzero(off.mean(axis=0) >= busy)
    if not rows.size or not cols.size:
        return False
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    edges = sum(int(touches) for touches in (top == 0, bottom == grey.shape[0], left == 0, right == grey.shape[1]))
    box, inside = off[top:bottom, left:right], grey[top:bottom, left:right]
    fill = float(box.mean())
    if not (0.01 * off.size <= box.size < 0.9 * off.size) or edges > edges_touched or fill <= 1 - NEARLY_UNIFORM \
            or fill < filled:
        return False
    return _near_median(np.bincount(inside[box], minlength=256), levels)[1] < NEARLY_UNIFORM


def flatness(picture, values, window, uniform: float) -> tuple[float, bool, bool]:
    """(uniform, framed, clipped) of a decoded picture whose share of its most common level is ``uniform``: a
    blank frame's noise its own range stretched to full contrast counts as flat (1.0); a nearly flat one is
    framed (a collimated field) or clipped (data.image_window leaves little)."""
    if window is None and (narrow_integer_range(values) or stretched_noise(values, picture)):
        return 1.0, False, False
    if uniform < NEARLY_UNIFORM:
        return uniform, False, False
    side = clipped_side(window, values)
    # clipped on the bright side: a window too narrow (what it leaves is anatomy or a band, no box), unless a
    # field fills a box that a bright border surrounds (shutters stored bright)
    framed = (framed_content(picture, filled=FIELD_FILLS, edges_touched=0) if side == "above"
              else framed_content(picture))
    return uniform, framed, side is not None and not framed


def stretched_noise(values, picture) -> bool:
    """A high-bit-depth image whose own range, stretched to 0..255, shows no structure: neighbouring pixels no
    more alike than chance (a blank detector frame's noise, e.g. 1000 +- 3, at full contrast), also once a smooth
    trend across the frame is taken out (a blank exposure's heel effect: a gradient under the noise). An X-ray's
    neighbours are alike, its trend taken out or not; only integer modes with their own range are looked at (a
    window says the user chose)."""
    import numpy as np

    if values is None:  # an 8-bit image: not stretched
        return False
    grey = np.asarray(picture.convert("L"), dtype=np.float64)
    step = max(1, max(grey.shape) // 512)  # a 512-px sample: cheap on large scans
    grey = grey[::step, ::step]
    if grey[:, :-1].size < 16:
        return False
    if _unlike_neighbours(grey):
        return True
    residual = grey - _quadratic_trend(grey)
    # under 1 level: rounding, no noise; the spread robust to a few outliers (one hot or +inf pixel of a smooth
    # image is no noise, but it alone lifted the standard deviation of a small frame's residual above a level)
    spread = 1.4826 * float(np.median(np.abs(residual - np.median(residual))))
    return spread >= 1.0 and _unlike_neighbours(residual)


def _unlike_neighbours(values) -> bool:
    import numpy as np

    left, right = values[:, :-1].ravel(), values[:, 1:].ravel()
    if left.std() == 0 or right.std() == 0:
        return False  # constant: flat_share names it already
    return float(np.corrcoef(left, right)[0, 1]) < 0.25


def _quadratic_trend(values):
    """The least-squares quadratic surface over the picture (a heel effect's gradient and its bend)."""
    import numpy as np

    def terms(rows, cols):
        y, x = rows.ravel() / max(values.shape[0], 1), cols.ravel() / max(values.shape[1], 1)
        return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1)

    rows, cols = np.mgrid[:values.shape[0], :values.shape[1]]
    fit = max(1, max(values.shape) // 128)  # fitted on a 128-px sample: a smooth surface needs no more
    coefficients, *_ = np.linalg.lstsq(terms(rows[::fit, ::fit], cols[::fit, ::fit]),
                                       values[::fit, ::fit].ravel(), rcond=None)
    return (terms(rows, cols) @ coefficients).reshape(values.shape)


def clipped_side(window: tuple[float, float] | None, values) -> str | None:
    """Which side of data.image_window clips most of a high-bit-depth image's values (``high_bit_values``;
    "above": a window too narrow for the data, "below": the dark side, where a collimator's border lies), None
    where neither does."""
    import numpy as np

    if window is None or values is None:
        return None
    above, below = float(np.mean(values > window[1])), float(np.mean(values < window[0]))
    return "above" if above >= 0.5 else "below" if below >= 0.5 else None


def _within(check: ImageCheck, path: Path, limits: ProcessorLimits | None) -> ImageCheck:
    """The check with the processor's verdict on the image's size (in the calling process: the workers stay
    free of transformers' import)."""
    problem = limits.problem(*check.size) if limits and check.problem is None else None
    return check._replace(problem=f"{problem} ({path.name})") if problem else check


def check_images(paths: list[Path], workers: int = 0, window: tuple[float, float] | None = None,
                 limits: ProcessorLimits | None = None, decode: bool = True) -> dict[Path, ImageCheck]:
    """path -> its ImageCheck for every file, decoded by ``workers`` processes (0: one per core this job may
    use, at most 16)."""
    from flare_exp.runtime import usable_cores  # here: the workers import this module, not hydra's

    unique = sorted(set(paths))
    workers = workers or min(usable_cores(), 16)  # the job's cores (SLURM's cpus-per-task), not the node's
    check = partial(_check_image, window=window, decode=decode)
    bar = dict(total=len(unique), desc="decode images", unit="img", disable=len(unique) < 200)
    if workers <= 1 or len(unique) < _INLINE_BELOW:
        results = [check(str(p)) for p in tqdm(unique, **bar)]
    else:
        chunk = max(1, min(64, len(unique) // (workers * 4)))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(tqdm(pool.map(check, [str(p) for p in unique], chunksize=chunk), **bar))
    return {p: _within(r, p, limits) for p, r in zip(unique, results)}
