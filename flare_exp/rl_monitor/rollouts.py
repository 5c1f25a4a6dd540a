"""Rollouts you can read: every ``rl.log_rollouts_steps`` steps, a few prompts' groups of completions with each
reward term, the total and the advantage, appended to ``rollouts.jsonl`` (one line per group) and shown in
``rollouts.html``. The file is bounded (``rl.rollouts_max_mb``): past it, no more groups are written (said once)."""
from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from pathlib import Path

from flare_exp.io import mended_journal, torn_line_step, write_jsonl
from flare_exp.run.lock import check_still_held

log = logging.getLogger(__name__)
ROLLOUTS = "rollouts.jsonl"
MAX_TEXT = 2000  # characters of a completion kept (a runaway completion stays readable, the file bounded)


def pick_groups(rows: list[dict], wanted: int) -> list[list[int]]:
    """Indices of up to ``wanted`` prompt groups (a group: the consecutive completions of one record), taken in
    turn from each task type present, so a step's few groups show several tasks."""
    groups: dict[str, list[list[int]]] = defaultdict(list)
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i]["id"] != rows[start]["id"]:
            groups[rows[start]["task_type"]].append(list(range(start, i)))
            start = i
    picked, queues = [], [list(g) for g in groups.values()]
    while len(picked) < wanted and any(queues):
        for queue in queues:
            if queue and len(picked) < wanted:
                picked.append(queue.pop(0))
    return picked


def group_entries(step: int, rows: list[dict], samples: list[dict], advantages: list[float], lengths: list[int],
                  cap: int, weights: dict[str, dict[str, float]], wanted: int) -> list[dict]:
    """One readable entry per picked group: the record, its reference and every completion with its terms."""
    out = []
    for idx in pick_groups(rows, wanted):
        row = rows[idx[0]]
        out.append({
            "step": step, "id": row["id"], "dataset": row.get("dataset"), "task_type": row["task_type"],
            "images": list(row.get("image_paths") or []), "image_window": row.get("image_window"),
            "reference": str(row.get("answer")),
            "weights": weights.get(row["task_type"], {}),
            "completions": [{"text": (samples[i]["text"] or "")[:MAX_TEXT], "terms": {k: round(v, 4) for k, v in samples[i]["terms"].items()},
                             "total": round(samples[i]["total"], 4), "advantage": round(advantages[i], 4),
                             "length": lengths[i], "at_cap": lengths[i] >= cap} for i in idx]})
    return out


class RolloutLog:
    """Appends picked groups to rollouts.jsonl (rank 0 only) and rewrites rollouts.html after each append."""

    def __init__(self, out_dir: Path, every: int, groups_per_step: int, max_mb: float, image_root: Path):
        self.path, self.html = out_dir / ROLLOUTS, out_dir / "rollouts.html"
        self.every, self.groups_per_step = every, groups_per_step
        self.max_bytes, self.image_root = int(max_mb * 2 ** 20), image_root
        self.full_said = False
        # a resumed run: the groups written so far (a line torn by the kill cut off, so appends start a new line)
        rows, self.torn_step = journal_rows(self.path) if self.path.exists() else ([], None)
        self.steps_written = {e["step"] for e in rows}
        self.new_entries: list[dict] = []  # since the tracker last took them (a W&B table per logging step)

    def continue_from(self, step: int) -> None:
        """A resumed run continues from its checkpoint at ``step``: the groups of later steps are the stopped
        attempt's, whose trajectory was thrown away (the resume trains those steps again, its rewards in the log):
        they go, and the redone steps write their own."""
        if not self.path.exists():
            return
        if self.torn_step is not None and self.torn_step <= step:  # not redone: the step stays without that group
            log.warning("rl: %s: step %d's last group was cut by the kill; the resume starts after that step (at "
                        "%d), so it keeps its other groups", self.path, self.torn_step, step)
        rows = read_rollouts(self.path)
        kept = [r for r in rows if not isinstance(r.get("step"), int) or r["step"] <= step]
        if len(kept) == len(rows):
            return
        check_still_held()
        write_jsonl(self.path, kept)
        self.steps_written = {r.get("step") for r in kept}
        log.info("rl: %s: %d group(s) of steps after %d (the stopped attempt's) dropped: the resumed run writes "
                 "those steps again", self.path, len(rows) - len(kept), step)
        from flare_exp.rl_monitor.rollouts_html import write_html

        write_html(kept, self.html, self.image_root)

    def wants(self, step: int) -> bool:
        return bool(self.every) and (step == 1 or step % self.every == 0)

    def append(self, entries: list[dict]) -> None:
        from flare_exp.rl_monitor.rollouts_html import write_html

        if not entries:
            return
        lines = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries)
        size = self.path.stat().st_size if self.path.exists() else 0
        if size + len(lines.encode()) > self.max_bytes:
            if not self.full_said:
                log.warning("rl: %s reached rl.rollouts_max_mb=%s: no more rollouts are written (raise it, or "
                            "raise rl.log_rollouts_steps to log fewer)", self.path, self.max_bytes / 2 ** 20)
                self.full_said = True
            return
        if {e["step"] for e in entries} & self.steps_written:
            return  # a resumed run redoes steps whose groups are already there: keep the first ones
        check_still_held()  # stopped past the takeover wait: the run dir is another's now
        with open(self.path, "a") as f:  # appended lines: a crash loses at most the line being written
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())
        self.steps_written |= {e["step"] for e in entries}
        self.new_entries += entries
        write_html(read_rollouts(self.path), self.html, self.image_root)


def journal_rows(path: Path) -> tuple[list[dict], int | None]:
    """The journal's entries, mended (mended_journal: a torn last line dropped), and the step of that torn line
    where it says one (a line cut before its step: None). A step's groups are one append, so the torn one is of
    the step the kill cut: ``continue_from`` drops it whole where the resume redoes it, so the redone step writes
    all its groups."""
    last = path.read_bytes().rstrip(b"\n").rsplit(b"\n", 1)[-1]
    try:
        rows = mended_journal(path)
    except ValueError as e:  # a line broken inside (an edit): a log to read, not training's input: set aside
        aside = path.with_name(f"{path.name}.damaged")
        n = 1
        while aside.exists():
            n += 1
            aside = path.with_name(f"{path.name}.damaged-{n}")
        path.rename(aside)
        log.warning("%s (%s); it is kept as %s and the resumed run starts a new one", path, e, aside.name)
        return [], None
    try:
        json.loads(last or b"{}")
        return rows, None
    except ValueError:
        return rows, torn_line_step(last)  # a line cut before its step is said: nothing more known


def read_rollouts(path: Path) -> list[dict]:
    """The complete lines of rollouts.jsonl (a line cut by a crash is left out)."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def wandb_table(entries: list[dict], image_root: Path):
    """The entries as a W&B table: one row per completion, the first image of its record shown."""
    import wandb

    from flare_exp.rl_monitor.rollouts_html import shown_image

    terms = sorted({t for e in entries for c in e["completions"] for t in c["terms"]})
    table = wandb.Table(columns=["step", "id", "dataset", "task_type", "image", "reference", "completion",
                                 *terms, "total", "advantage", "length"])
    for e in entries:
        image = wandb.Image(shown_image(image_root / e["images"][0], e.get("image_window"))) if e["images"] else None
        for c in e["completions"]:
            table.add_data(e["step"], e["id"], e["dataset"], e["task_type"], image, e["reference"], c["text"],
                           *(c["terms"].get(t) for t in terms), c["total"], c["advantage"], c["length"])
    return table
