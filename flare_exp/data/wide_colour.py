"""16-bit colour images (RGB, grey + alpha, RGBA at 16 bits a channel) read in full. PIL opens them as ``RGB`` /
``RGBA`` keeping each value's high byte (it has no 16-bit colour mode), so 12-bit data stored in 16 bits became 16
levels of near black. Read here instead: a PNG through torchvision's decoder (libpng), an uncompressed file (a
TIFF as scanners export it) from its bytes; a compressed 16-bit colour TIFF has no full reader here and keeps
PIL's high bytes (its label says so)."""
from __future__ import annotations

import numpy as np

# PIL's raw mode of a 16-bit colour file -> (its label, channels, byte order)
WIDE_RAWMODES = {f"{mode};16{order}": (f"{mode};16", channels, order) for mode, channels in
                 (("RGB", 3), ("LA", 2), ("RGBA", 4)) for order in ("B", "L", "N")}
LABELS = {label for label, _, _ in WIDE_RAWMODES.values()}
HIGH_BYTE_ONLY = " (high bytes only)"  # a label's tail where the file has no full reader here


def rawmode(im) -> str | None:
    tiles = getattr(im, "tile", None)  # an image made in memory has none; a loaded file's are gone
    if not tiles:
        return None
    args = tiles[0].args
    return args if isinstance(args, str) else args[0] if args else None


def full_reader(im) -> bool:
    return im.format == "PNG" or all(tile.codec_name == "raw" and tile.args[1:3] in ((0, 1), ()) for tile in im.tile)


def wide_colour_mode(im) -> str | None:
    """The label of a 16-bit colour image as PIL opened it (before its pixels are loaded), else None."""
    found = WIDE_RAWMODES.get(rawmode(im))
    if found is None:
        return None
    return found[0] + ("" if full_reader(im) else HIGH_BYTE_ONLY)


def wide_colour_values(im) -> np.ndarray | None:
    """(channels, height, width) of 16-bit values of a 16-bit colour image not yet loaded (alpha last where it has
    one); None for any other image, and where there is no full reader (PIL's high bytes then)."""
    found = WIDE_RAWMODES.get(rawmode(im))
    if found is None:
        return None
    label, channels, order = found
    if im.format == "PNG":
        return _png_values(im, label)
    if not full_reader(im):
        return None
    dtype = np.dtype(np.uint16).newbyteorder({"B": ">", "L": "<", "N": "="}[order])
    values = np.zeros((im.height, im.width, channels), np.int64)
    for tile in im.tile:  # uncompressed strips or tiles: rows of packed samples at their offset
        x0, y0, x1, y1 = tile.extents
        im.fp.seek(tile.offset)
        count = (y1 - y0) * (x1 - x0) * channels
        block = np.frombuffer(im.fp.read(count * 2), dtype=dtype, count=count)
        values[y0:y1, x0:x1] = block.reshape(y1 - y0, x1 - x0, channels)
    return np.moveaxis(values, -1, 0)


def colour_channels(values: np.ndarray) -> np.ndarray:
    """wide_colour_values' colour channels: grey + alpha and RGBA without their alpha."""
    return values[:-1] if values.shape[0] in (2, 4) else values


def _png_values(im, label: str) -> np.ndarray:
    import warnings

    import torch

    try:
        from torchvision.io import ImageReadMode, decode_png
    except ImportError as e:  # a torchvision without its image codecs
        raise ValueError(f"a 16-bit colour PNG ({label}) is decoded in full by torchvision's PNG decoder, which "
                         f"this torchvision lacks ({e}); install the pinned torchvision, or save the image as "
                         "16-bit grey") from e
    im.fp.seek(0)
    with warnings.catch_warnings():  # 0.29 says its codecs move to TorchCodec; the pinned version has them
        warnings.simplefilter("ignore", DeprecationWarning)
        data = decode_png(torch.frombuffer(bytearray(im.fp.read()), dtype=torch.uint8), ImageReadMode.UNCHANGED)
    return data.numpy().astype(np.int64)
