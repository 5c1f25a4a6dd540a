"""The one rule by which an image file becomes the 8-bit RGB picture the processor takes, used by prepare's image
pass and by every stage that loads images (sft, rl, infer, through ``VisionChat.load_images``), so the same file
gives the same pixels everywhere.

1. The EXIF orientation is applied first (a phone photo or a scanner export stands the way it was taken).
2. By PIL mode:
   - ``RGB``: as it is; ``L``: its grey value in all three channels; ``1``: black 0 / white 255, then as ``L``;
     ``P``: its palette colours; ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: PIL's conversion to RGB.
   - high bit depth (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``, ``I``, ``F``): one grey channel, scaled linearly
     from ``[low, high]`` to 0..255 (rounded, values outside clipped). ``[low, high]`` is the image's own
     minimum and maximum (a constant image becomes black), or the window the user set (data.image_window).
     PIL's own conversion would clip, not scale: a 16-bit X-ray became two grey levels, nearly all white.
   - alpha (``LA``, ``La``, ``PA``, ``RGBA``, ``RGBa``: an alpha channel, one value a pixel): composited over
     black, the colour of no signal on an X-ray: ``value * alpha / 255``, rounded (``La``, grey premultiplied by
     its alpha, is that already: its grey channel).
   - transparency declared by colour (a PNG's tRNS chunk: one grey value, one RGB colour, or alphas for palette
     entries; a GIF's transparent index; PIL's ``info["transparency"]``, in any mode) is ignored: the stored
     colour values are the picture. Why: it applies to every pixel of that colour, so on an X-ray it punches
     holes wherever the anatomy has that grey, and it was honoured for ``P`` only (a grey 40 marked transparent
     became 0) while an ``L`` or ``RGB`` file declaring the same colour kept it: one picture gave two sets of
     pixels by the way it was saved. An alpha channel (above) is set pixel by pixel, so it keeps its rule.
   - 16-bit colour files (RGB, grey + alpha, RGBA: 16 bits a channel, which PIL opens as ``RGB`` / ``RGBA``
     keeping each value's high byte, so 12-bit data became 16 grey levels of near black): read in full
     (wide_colour.py: PNG, uncompressed TIFF), the colour channels scaled together as a high-bit-depth grey is
     (own range or the window), the alpha rounded to 8 bits, then as their 8-bit mode. ``mode_label`` names them
     ``RGB;16``, ``LA;16``, ``RGBA;16`` (``... (high bytes only)``: a compressed TIFF, PIL's reading kept).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from flare_exp.data.wide_colour import colour_channels, wide_colour_mode, wide_colour_values

ORIENTATION = 0x0112  # the EXIF tag
HIGH_BIT_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
WITH_ALPHA = ("LA", "La", "PA", "RGBA", "RGBa")
# EXIF orientation -> the transpose that stands the picture up (PIL's ImageOps.exif_transpose table)
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


def check_window(window) -> tuple[float, float] | None:
    """data.image_window as (low, high), or None (each image's own range); a ValueError names the key."""
    if window is None:
        return None
    values = list(window)
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) \
            or not np.isfinite(values).all() or values[0] >= values[1]:
        raise ValueError(f"data.image_window={values}: give [low, high] with low < high, in the images' own units "
                         "(e.g. [0, 4095] for 12-bit data stored in 16 bits), or null to scale each image by its "
                         "own minimum and maximum")
    return float(values[0]), float(values[1])


def check_records_window(records: list[dict], configured, source) -> None:
    """data.image_window is prepare's: each record carries the window its images are decoded with. Set on a
    later stage, it must be the records' (else a ValueError names both), so no stage decodes by another
    window than the one the user sees set."""
    wanted = check_window(configured)
    if wanted is None:
        return
    used = {check_window(r.get("image_window")) for r in records}
    if used != {wanted}:
        named = ", ".join("each image's own range" if w is None else f"[{w[0]:g}, {w[1]:g}]"
                          for w in sorted(used, key=lambda w: (w is not None, w or ())))
        raise ValueError(f"data.image_window=[{wanted[0]:g}, {wanted[1]:g}], but the records of {source} were "
                         f"prepared with {named}: the window is prepare's setting. Re-run stage=prepare with "
                         "this data.image_window into another data.prepared_dir, or leave data.image_window "
                         "unset here (the records' window is used)")


def scale_to_8bit(values: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    """A high-bit-depth grey channel scaled linearly from the window (else its own range) to uint8, rounded
    half up (float32 holds every 16-bit value exactly)."""
    floating = values.dtype.kind == "f"
    values = values.astype(np.float32)
    finite = np.isfinite(values) if floating else None
    if finite is not None and not finite.all():  # NaN (no signal) and -inf: black; +inf: white
        seen = values[finite]
        lowest, highest = (float(seen.min()), float(seen.max())) if seen.size else (0.0, 0.0)
        if window is not None:
            lowest, highest = window
        values = np.nan_to_num(values, copy=False, nan=lowest, posinf=highest, neginf=lowest)
    low, high = window if window is not None else (float(values.min()), float(values.max()))
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    values -= np.float32(low)
    values *= np.float32(255.0 / (high - low))
    values += np.float32(0.5)
    return np.clip(values, 0, 255, out=values).astype(np.uint8)


def _over_black(im: Image.Image) -> Image.Image:
    """An image with alpha composited over black (PIL's integer blend: the same bytes on every machine)."""
    rgba = im.convert("RGBA")
    canvas = Image.new("RGB", rgba.size)
    canvas.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    return canvas


def to_rgb(im: Image.Image, window: tuple[float, float] | None = None) -> Image.Image:
    """An opened image (any PIL mode, orientation already applied) as 8-bit RGB, by the rule above."""
    mode = im.mode
    if mode in HIGH_BIT_DEPTH:
        return Image.fromarray(scale_to_8bit(np.asarray(im), window), mode="L").convert("RGB")
    if mode == "La":  # grey premultiplied by its alpha: already the grey over black (PIL cannot unpremultiply it)
        return im.getchannel(0).convert("RGB")
    if mode in WITH_ALPHA:  # an alpha channel; a declared transparent colour (info["transparency"]) is ignored
        return _over_black(im)
    if mode == "1":
        return im.convert("L").convert("RGB")
    with warnings.catch_warnings():  # PIL's advice to turn a palette's alphas into RGBA: the rule ignores them
        warnings.filterwarnings("ignore", "Palette images with Transparency", UserWarning)
        # RGB (a copy), L, P, CMYK, YCbCr, LAB, HSV: PIL's own conversion, which keeps a transparent colour's values
        return im.convert("RGB")


def mode_label(im: Image.Image) -> str:
    """The image's mode as summary.json counts it: PIL's, or a 16-bit colour file's label (wide_colour.py)."""
    return wide_colour_mode(im) or im.mode


def wide_colour_rgb(values: np.ndarray, window: tuple[float, float] | None) -> Image.Image:
    """16-bit colour values (channels, height, width; alpha last where there is one) as 8-bit RGB: the colour
    channels scaled together from the window (else their own range), alpha rounded to 8 bits and composited."""
    colour = scale_to_8bit(colour_channels(values), window)
    if len(colour) == len(values):  # no alpha
        return Image.fromarray(np.moveaxis(colour, 0, -1), "RGB")
    opacity = ((values[-1] * 255 + 32767) // 65535).astype(np.uint8)[None]
    layers = np.moveaxis(np.concatenate([colour, opacity]), 0, -1)
    return _over_black(Image.fromarray(layers, "LA" if colour.shape[0] == 1 else "RGBA"))


def upright_rgb(im: Image.Image, window: tuple[float, float] | None = None, values=None) -> Image.Image:
    """An opened image, turned as its EXIF orientation says, as 8-bit RGB by the rule above. ``values``: its
    wide_colour_values where the caller read them already (prepare's image check)."""
    values = wide_colour_values(im) if values is None else values
    if values is not None:
        picture = wide_colour_rgb(values, window)
        turn = UPRIGHT.get(im.getexif().get(ORIENTATION, 1))
        return picture.transpose(turn) if turn is not None else picture
    if im.getexif().get(ORIENTATION, 1) != 1:
        im = ImageOps.exif_transpose(im)
    return to_rgb(im, window)


def decode_image(path: str | Path, window: tuple[float, float] | None = None) -> Image.Image:
    """The picture of one image file as 8-bit RGB, by the rule above."""
    with Image.open(path) as im:
        return upright_rgb(im, window)
