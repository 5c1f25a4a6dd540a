"""What in a run dir's record is not as the run left it (a hand edit, a copy, a cut file): said beside its status
by stage=runs and in the sweep report's error column, never taken at its word."""
from __future__ import annotations

import json
import math
from pathlib import Path

from flare_exp.run.layout import CONFIG, DONE, FAILED, FINGERPRINT, RUN_INFO


def _read_json(path: Path) -> dict:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def done_seconds(run_dir: Path) -> float | None:
    """The seconds a finished run's DONE records; None for a DONE no run wrote (touched, emptied, hand-edited)."""
    seconds = _read_json(run_dir / DONE).get("seconds")
    ok = isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and math.isfinite(seconds)
    return float(seconds) if ok and seconds >= 0 else None


def done_edited(run_dir: Path) -> bool:
    """A DONE whose text no run wrote: not JSON, not an object, or seconds that are no number. An empty one or
    {} (a marker touched by hand, an older writer) only lacks the time: no doubt of its own."""
    try:
        text = (run_dir / DONE).read_text()
        found = json.loads(text) if text.strip() else {}
    except OSError:
        return False
    except ValueError:
        return True
    return not isinstance(found, dict) or "seconds" in found and done_seconds(run_dir) is None


def info_torn(run_dir: Path) -> bool:
    """run_info.json there but not readable as the object a run writes (cut, hand-broken): the run started."""
    return not _read_json(run_dir / RUN_INFO) and (run_dir / RUN_INFO).is_file()


def record_doubts(run_dir: Path, found: str | None, torn_info: bool | None = None) -> list[str]:
    """What in a run dir's record is not as the run left it: run_info.json unreadable, a FAILED beside its DONE
    (an rsync of two attempts into one dir), config.yaml edited after the run (its stage or deciding settings
    differ from the fingerprint it recorded)."""
    from flare_exp.run.fingerprint import config_edits

    doubts = [f"{RUN_INFO} unreadable"] if (info_torn(run_dir) if torn_info is None else torn_info) else []
    if found == DONE and done_edited(run_dir):
        doubts.append(f"{DONE} not as a run writes it (edited): how long it ran is not known")
    if found == DONE and (run_dir / FAILED).is_file():
        doubts.append("a FAILED marker lies beside DONE")
    # a pipeline's steps each record their own fingerprint (its own config.yaml records none)
    steps = [p for p in sorted(run_dir.iterdir()) if (p / FINGERPRINT).is_file()] if run_dir.is_dir() else []
    for where in (run_dir, *steps):
        edits = config_edits(where)
        if edits:
            doubts.append(f"{(where / CONFIG).relative_to(run_dir)} edited since: {edits[0]}"
                          + (f" and {len(edits) - 1} more" if len(edits) > 1 else ""))
    return doubts
