"""What prepare says about the accepted images' modes (summary.json counts them, ``images_by_mode``) where the
decoding rule (flare_exp/data/decoding.py) treats them in ways a user should know of:

- 16-bit colour TIFFs read by their high bytes only (no full reader here: narrow 12-bit data comes out near black);
- one dataset whose images mix 8-bit and high-bit-depth modes. An 8-bit image is used as stored, a high-bit-depth
  one scaled from its own minimum and maximum (or data.image_window) to 0..255: one kind of scan exported two
  ways reaches the model with two contrast treatments, silently. Said once per dataset, with the counts per mode
  and one example file of each, so the user can export them alike.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from flare_exp.data.decoding import HIGH_BIT_DEPTH
from flare_exp.data.wide_colour import HIGH_BYTE_ONLY, LABELS

log = logging.getLogger(__name__)


def stretched(mode: str) -> bool:
    """Whether the decoding rule scales a mode's values to 0..255 (own range or the window) rather than using
    them as stored: the high-bit-depth greys and the 16-bit colour files read in full (a compressed one keeps
    PIL's high bytes, as stored)."""
    return mode in HIGH_BIT_DEPTH or mode in LABELS


def mixed_bit_depths(by_split: dict[str, list[dict]], modes: dict[Path, str]) -> dict[str, dict]:
    """dataset -> {mode: {"count": images, "example": one image under data.root}} for each dataset whose accepted
    images (``by_split``'s records, over every split; ``modes``: path -> mode label) mix 8-bit modes, used as
    stored, with high-bit-depth ones, stretched."""
    seen: dict[str, dict[str, dict[str, None]]] = defaultdict(lambda: defaultdict(dict))  # dataset -> mode -> names
    for rows in by_split.values():
        for row in rows:
            for path, name in zip(row["_paths"], row["images"]):
                if modes.get(path):
                    seen[row["dataset"]][modes[path]][name] = None
    mixed = {}
    for dataset, by_mode in sorted(seen.items()):
        if len({stretched(mode) for mode in by_mode}) == 2:
            mixed[dataset] = {mode: {"count": len(names), "example": min(names)}
                              for mode, names in sorted(by_mode.items())}
    return mixed


def say_modes(by_split: dict[str, list[dict]], modes: dict[Path, str]) -> None:
    """The warnings above, in prepare's log."""
    high_bytes = sorted(p for p, mode in modes.items() if mode.endswith(HIGH_BYTE_ONLY))
    if high_bytes:
        log.warning("prepare: %d 16-bit colour image(s) are compressed TIFFs read by their high bytes only (PIL's "
                    "reading: narrow 12-bit data comes out near black), e.g. %s: save them as 16-bit grey (PNG or "
                    "TIFF) for their full depth", len(high_bytes), high_bytes[0])
    for dataset, by_mode in mixed_bit_depths(by_split, modes).items():
        counts = "; ".join(f"{mode}: {block['count']} (e.g. {block['example']})" for mode, block in by_mode.items())
        log.warning("prepare: dataset %s mixes 8-bit and high-bit-depth images (%s). Their contrast is treated "
                    "differently: an 8-bit image is used as stored, a high-bit-depth one (%s) is stretched from its "
                    "own minimum and maximum (or data.image_window) to 0..255, so scans of one kind reach the model "
                    "two ways. If they are one kind of scan, export them alike (all 8-bit, or all at full depth) "
                    "and run prepare again", dataset, counts,
                    ", ".join(mode for mode in by_mode if stretched(mode)))
