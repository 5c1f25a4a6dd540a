"""The accepted images a user should look at, said by prepare in its log and summary.json: nearly flat ones (a
window that saturates them, blank scans), framed ones (a collimated field), high-bit-depth ones a few extreme pixels
stretched, multi-page files."""
from __future__ import annotations

import logging
from pathlib import Path

from flare_exp.data.images import NEARLY_UNIFORM

log = logging.getLogger("flare_exp.data.prepare")  # prepare's own lines: one logger for the stage's account


def named_images(accepted, root: Path, window, decoded: bool = True) -> dict:
    """The accepted images (prepare's Accepted) a user should look at, each kind counted, the first named, and
    said in the log: those that decoded to nearly one flat level, those whose content is a box inside a wide
    border (said, not warned: a collimated field is a picture), high-bit-depth ones a few extreme pixels
    stretched (say_stretched), and multi-page files (only the first page is read)."""
    def names(paths: list[Path]) -> list[str]:
        return [str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in paths]

    flat, pages, framed = names(accepted.nearly_uniform), names(accepted.multi_frame), names(accepted.framed)
    clipped = set(names(accepted.clipped))
    for group, why in (([f for f in flat if f in clipped], f"data.image_window=[{window[0]:g}, {window[1]:g}] "
                        "clips most of their values and may not suit them" if window is not None else ""),
                       ([f for f in flat if f not in clipped], "blank or constant images (a blank exposure, a "
                        "detector frame of noise only, one value throughout)")):
        if group:
            log.warning("prepare: %d accepted image(s) decoded to nearly one flat grey level (>= %d%% of the pixels),"
                        " e.g. %s: %s. They are kept; summary.json lists the first ones", len(group),
                        round(NEARLY_UNIFORM * 100), ", ".join(group[:3]), why)
    if framed:
        log.info("prepare: %d accepted image(s) hold their content in a box inside a border of one level (>= %d%% of "
                 "the pixels: a collimated field, a wide margin), e.g. %s; kept as they are (the model sees the "
                 "border too); summary.json lists the first ones", len(framed), round(NEARLY_UNIFORM * 100),
                 ", ".join(framed[:3]))
    stretched = say_stretched(accepted.stretched, names)
    if pages:
        log.warning("prepare: %d accepted image(s) are multi-page files, e.g. %s: every stage reads their first "
                    "page only. summary.json lists the first ones", len(pages), ", ".join(pages[:3]))
    return {"nearly_uniform_images": {"count": len(flat), "first": flat[:20]} if decoded else
            "not checked (data.verify_images=false: headers only)",
            "framed_images": {"count": len(framed), "first": framed[:20]}, "stretched_by_outliers": stretched,
            "multi_page_images": {"count": len(pages), "first": pages[:20]}}


def say_stretched(stretched: dict[Path, tuple], names) -> dict:
    """High-bit-depth images whose own range a few extreme pixels set (hot pixels, a marker, padding at the
    maximum): warned of, with a data.image_window only where one suits them all (their values' ranges together
    span at most twice the widest one's; the window applies to every high-bit-depth image prepared)."""
    if not stretched:
        return {"count": 0, "first": []}
    first = [{"image": name, "content_range": list(v[:2]), "own_range": list(v[2:])}
             for name, v in zip(names(list(stretched)), stretched.values())][:20]
    low, high = min(v[0] for v in stretched.values()), max(v[1] for v in stretched.values())
    one_window = high - low <= 2 * max(v[1] - v[0] for v in stretched.values())
    remedy = (f"data.image_window=[{low:g},{high:g}] (their values' range) decodes them with their contrast: "
              "prepare again with it and overwrite=true (the window applies to every high-bit-depth image)"
              if one_window else "no one data.image_window suits them all (their values' ranges differ: "
              "summary.json's stretched_by_outliers lists each): re-export them with their values scaled, or "
              "prepare them apart, each set with its own window")
    log.warning("prepare: %d high-bit-depth image(s) hold nearly all their values in a small part of their own "
                "range, e.g. %s: %g..%g of %g..%g. A few extreme pixels (hot or dead pixels, a burned-in marker, "
                "padding written as the maximum) set the stretch from the image's own minimum and maximum, so the "
                "anatomy decodes to a handful of grey levels. Kept; %s", len(stretched), first[0]["image"],
                *first[0]["content_range"], *first[0]["own_range"], remedy)
    return {"count": len(stretched), "first": first, "window_holding_them": [low, high] if one_window else None}
