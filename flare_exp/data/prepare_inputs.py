"""What a prepare read from data.root, recorded beside its outputs (``inputs.json``), so a finished prepare is
reused only while the download is as it was: FLARE publishes corrected annotations, and a user who unpacks
them into the same data.root and reruns a pipeline must not get the old records (and the model trained on
them) reported as made "with the same settings and inputs".

Recorded: each question file read (sha256), each image a record named (size, modification time, sha1 of its
bytes). Checked: a question file changed, removed or added for the chosen datasets and splits; an image whose
size or time changed is read again and counts as changed only if its bytes did (a copy with new times is the
same download).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from flare_exp.io import file_fingerprint, write_json

INPUTS = "inputs.json"
SHOWN = 5  # changed files named in a message; the rest are counted


def record_inputs(out_dir: Path, root: Path, questions: list[Path], images: dict[Path, str]) -> None:
    """``images``: path -> sha1 of its bytes (prepare's leakage check computed it)."""
    stats = {p: p.stat() for p in images if p.exists()}
    write_json(out_dir / INPUTS, {
        "question_files": {_name(p, root): file_fingerprint(p)["sha256"] for p in questions},
        "images": {_name(p, root): [s.st_size, s.st_mtime_ns, images[p]] for p, s in stats.items()}})


def _name(path: Path, root: Path) -> str:
    """Relative to data.root where it lies under it (as written), else absolute (a symlinked folder, resolved)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def input_changes(out_dir: Path, root: Path, questions: list[Path]) -> list[str]:
    """'data.root file X: changed' for what differs between the recorded inputs and data.root now
    (``questions``: the question files a prepare would read now); nothing when no record was kept."""
    try:
        recorded = json.loads((out_dir / INPUTS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    now = {_name(p, root): p for p in questions}
    before = recorded.get("question_files", {})
    changes = [f"{name}: added" for name in sorted(set(now) - set(before))]
    changes += [f"{name}: removed" for name in sorted(set(before) - set(now))]
    changes += [f"{name}: changed (sha256 {sha[:12]} -> {file_fingerprint(now[name])['sha256'][:12]})"
                for name, sha in sorted(before.items())
                if name in now and file_fingerprint(now[name])["sha256"] != sha]
    changes += [f"{name}: {why}" for name, why in image_changes(root, recorded.get("images", {}))]
    return [f"data.root file {c}" for c in changes]


def image_changes(root: Path, recorded: dict) -> list[tuple[str, str]]:
    out = []
    for name, (size, mtime, sha1) in sorted(recorded.items()):
        path = root / name
        try:
            stat = path.stat()
        except OSError:
            out.append((name, "removed"))
            continue
        if (stat.st_size, stat.st_mtime_ns) != (size, mtime) and _sha1(path) != sha1:
            out.append((name, "changed"))
    return out


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def summarised(changes: list[str]) -> list[str]:
    return changes[:SHOWN] + ([f"and {len(changes) - SHOWN} more data.root files"] if len(changes) > SHOWN else [])
