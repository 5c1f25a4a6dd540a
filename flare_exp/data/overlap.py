"""Leakage between splits: a study (named after its images, or the same picture under another name) in more
than one of train, val and test stops prepare unless data.allow_overlap."""
from __future__ import annotations

from collections import defaultdict

from flare_exp.data import records as R
from flare_exp.data.unzip import PrepareError


def _study_keys(split_rows: list[dict]) -> dict[str, str]:
    """key -> study: the study named after its images, and each image's content (same picture, other name)."""
    keys = {}
    for r in split_rows:
        study = R.study_key(r["dataset"], r["images"])
        keys[study] = study
        for digest in r.get("_digests", []):
            keys[f"sha1:{digest}"] = study
    return keys


def check_overlap(by_split: dict[str, list[dict]], allow: bool) -> list[str]:
    """Studies in more than one split (train/val, train/test and val/test: a val study in test would make the
    model selection leak too)."""
    keys = {split: _study_keys(by_split.get(split, [])) for split in ("train", "val", "test")}
    pairs = {(a, b): sorted({keys[a][k] for k in keys[a].keys() & keys[b].keys()})
             for a, b in (("train", "val"), ("train", "test"), ("val", "test"))}
    overlap = sorted({study for studies in pairs.values() for study in studies})
    if overlap and not allow:
        twins = defaultdict(set)  # a study -> its other names in the later split (same picture, renamed)
        for a, b in pairs:
            for k in keys[a].keys() & keys[b].keys():
                if keys[a][k] != keys[b][k]:
                    twins[keys[a][k]].add(f"{keys[b][k]} ({b})")
        named = [study + (f" = {', '.join(sorted(twins[study]))}" if twins[study] else "") for study in overlap]
        shown = "\n  ".join(named[:50]) + (f"\n  ... and {len(overlap) - 50} more" if len(overlap) > 50 else "")
        where = ", ".join(f"{a}/{b}: {len(studies)}" for (a, b), studies in pairs.items() if studies)
        raise PrepareError(
            f"{len(overlap)} studies appear in more than one split ({where}; validation would leak):\n  {shown}\n"
            "Remove them from one side (a study's picture under another name is shown as 'name = other name "
            "(split)'), or pass data.allow_overlap=true to accept the leak.")
    return overlap
