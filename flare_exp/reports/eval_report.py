"""The eval stage's report: report.md, report.html and metrics.png from metrics.json's content.

Results first: FLARE's official numbers (what the leaderboard would show), the figure, the significance tests;
then the caveats (lines the eval results carry: a partial run, empty predictions, a run's ``caveats`` list),
what was evaluated, our own variants per task type, and how the official numbers are computed. Paths are shown
relative to the output root.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from flare_exp.io import write_text
from flare_exp.metrics.official import FLARE_TASK_TYPE, LOWER_IS_BETTER, OFFICIAL_METRIC
from flare_exp.reports.page import Block, to_html, to_markdown
from flare_exp.reports.tables import fmt

OFFICIAL_NOTES = [
    "Official numbers follow FLARE's evaluator: tasks grouped by task type across datasets (chestdr and "
    "periapical pool into one multi-label number), answers read as written.",
    "balanced_accuracy compares the raw answer with the option (stripped, lower-cased); "
    "balanced_accuracy_parsed first reads the option letter out of free text.",
    "f1_score splits every answer on both ';' and ',' (periapical's comma-containing label becomes several); "
    "dataset_aware_f1_micro splits on each dataset's own separator.",
    "mean_absolute_error is float() of every prediction: one that is not a plain number (\"22.9%\") makes it "
    "infinite; mae_parseable reads the first number and counts the rest as unparseable.",
    "mean_absolute_error is FLARE's abort (no number) where a value reads as NaN or infinity and every value "
    "is read by float(): scikit-learn rejects it; the block names the rows (abort_ids).",
    "green_score is the GREEN package's mean (unreadable judgments score 0), with the package's parser; None "
    "where the package raises for FLARE (a non-text prediction, a judge input at the length limit, its "
    "summary failing: green_score_none says which and how many). report_generation's own green_score scores "
    "them anyway; eval.green.parser=robust reads more there and leaves unreadable ones out.",
]


def official_cell(block: dict | None, metric: str) -> str:
    """An official number, or why FLARE's evaluator gives none (its abort; GREEN's package raising)."""
    block = block or {}
    if block.get("aborted"):
        return "aborted (FLARE's evaluator stops)"
    if block.get("green_score_none"):
        return "None (the GREEN package raises)"
    return fmt(block.get(metric))


def official_table(results: dict) -> tuple[list[str], list[list[str]]]:
    labels = list(results)
    tasks = sorted({t for r in results.values() for t in r["official"]})
    rows = []
    for task in tasks:
        metric = OFFICIAL_METRIC[task]
        name = f"{FLARE_TASK_TYPE[task]}: {metric}" + (" (lower is better)" if metric in LOWER_IS_BETTER else "")
        rows.append([name, *(official_cell(results[lab]["official"].get(task), metric) for lab in labels)])
    datasets = sorted({d for r in results.values() for d in r["official_by_dataset"]})
    for dataset in datasets:
        block = next(r["official_by_dataset"][dataset] for r in results.values() if dataset in r["official_by_dataset"])
        metric = next(k for k in block if k in OFFICIAL_METRIC.values())
        rows.append([f"  {dataset}: {metric}",
                     *(official_cell(results[lab]["official_by_dataset"].get(dataset), metric) for lab in labels)])
    rows.append(["n", *(str(results[lab]["n"]) for lab in labels)])
    return ["official (FLARE)", *labels], rows


def variant_tables(results: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """One table per task type: rows = our metrics, columns = models (side by side)."""
    labels = list(results)
    out = []
    for task in sorted({t for r in results.values() for t in r["by_task"]}):
        keys = []
        for r in results.values():
            keys += [k for k, v in r["by_task"].get(task, {}).items()
                     if k not in keys and not k.endswith("_note") and not isinstance(v, dict)]
        rows = [[k, *(fmt(results[lab]["by_task"].get(task, {}).get(k)) for lab in labels)] for k in keys]
        notes = sorted({v for r in results.values() for k, v in r["by_task"].get(task, {}).items()
                        if k.endswith("_note") and v})
        out.append((task, notes, ["metric", *labels], rows))
    return out


SIGNIFICANCE_HEADER = ["B vs A", "metric", "A", "B", "B - A", "95% interval of B - A", "p (perm.)",
                       "p adj.", "p (AR)", "p adj.", "n"]


def significance_rows(tests: list[dict]) -> list[list[str]]:
    def interval(ci):
        return "n/a" if not ci else f"[{ci[0]:.4f}, {ci[1]:.4f}]"

    def value(t, v):  # a NaN mean absolute error: FLARE's evaluator stops on a NaN or infinite value
        undefined = isinstance(v, float) and math.isnan(v)
        return ("aborted" if t["task"] == "regression" else "undefined") if undefined else fmt(v)

    def difference(t):
        return "n/a" if any(isinstance(v, float) and math.isnan(v) for v in (t["a"], t["b"])) else fmt(t["difference"])

    return [[f"{t['run_b']} vs {t['run_a']}", f"{t['task']}: {t['metric']}", value(t, t["a"]), value(t, t["b"]),
             difference(t), interval(t.get("difference_ci95")), fmt(t.get("p_value")),
             fmt(t.get("p_value_adjusted")), fmt(t.get("ar_p_value")), fmt(t.get("ar_p_value_adjusted")), str(t["n"])]
            for t in tests]


def significance_notes(family: dict | None) -> list[str]:
    notes = ["95% intervals: paired bootstrap; p: paired permutation test and paired approximate randomization "
             "(both two-sided), raw and adjusted."]
    if family:
        name = {"holm": "Holm's step-down", "bh": "Benjamini-Hochberg", "none": "no correction"}[family["correction"]]
        notes.append(f"Adjusted p ({name}) over the family: {family['family']}.")
    return notes


RUN_FIELDS = (("split", "split"), ("n", "n"), ("answers_from", "prepared split"), ("image_window", "image window"),
              ("model", "model"), ("model_path", "model path"), ("max_pixels", "model.max_pixels"),
              ("decoding", "decoding"), ("backend", "backend"), ("checkpoint", "adapter"), ("adapter_sha256", "adapter sha256"),
              ("finished", "predicted"), ("commit", "commit"), ("file", "predictions"), ("scored_sheet", "scored sheet"))
RESULT_FIELDS = ("split", "n", "answers_from", "image_window", "file", "scored_sheet")  # the rest: its run's
SHORT_HASH = 12


def shown_path(value, root: Path | None) -> str:
    """A path relative to the output root when it lies under it (what a colleague with the same tree finds)."""
    text = str(value)
    if root is None or not os.path.isabs(text):
        return text
    try:
        return os.path.relpath(text, root) if Path(text).resolve().is_relative_to(root.resolve()) else text
    except (OSError, ValueError):
        return text


def short_hash(value) -> str:
    """A commit or sha256 cut to its first characters (enough to tell runs apart); a -dirty mark kept."""
    text = str(value)
    return text[:SHORT_HASH] + ("-dirty" if text.endswith("-dirty") else "") if len(text) > SHORT_HASH else text


def runs_table(results: dict, root: Path | None = None) -> tuple[list[str], list[list[str]]]:
    """What each evaluated run is, one column per run (a row per field keeps the table inside the page)."""
    def field(res: dict, key: str) -> str:
        value = res.get(key) if key in RESULT_FIELDS else res.get("run", {}).get(key)
        if value in (None, ""):
            return "n/a"
        if key in ("commit", "adapter_sha256"):
            return short_hash(value)
        return shown_path(value, root) if key in ("model_path", "checkpoint", "file", "answers_from") else str(value)

    return ["run", *results], [[title, *(field(res, key) for res in results.values())] for key, title in RUN_FIELDS]


def unjudged_lines(report: dict) -> list[str]:
    """A judge whose output gave no score for some reports (CRIMSON's unparsed replies, GREEN's with
    eval.green.parser=robust): its mean is over the others, or there is none."""
    lines = []
    for judge, score, left in (("CRIMSON", "crimson_score", "crimson_unscored"),
                               ("GREEN (robust parser)", "green_score", "green_unparsed")):
        unscored = report.get(left)
        if unscored:
            total = unscored + (report.get(score.split("_")[0] + "_n") or 0)
            lines.append(f"report generation: {judge} gave no score for {unscored} of {total} reports (replies its "
                         "parser does not read): " + (f"{score} is the mean over the other {total - unscored}"
                                                      if total > unscored else f"no {score}"))
    return lines


def caveat_lines(results: dict, warnings: list[str], caveats: list[str] | None = None) -> list[str]:
    """What a reader must know before trusting the numbers: ``caveats`` (the eval's own), each run's
    ``caveats`` list and state (partial, empty predictions, unchecked answers), the official blocks' notes,
    and the significance warnings."""
    runs_of: dict[str, list[str]] = {}  # a line shared by several runs is said once, naming them all
    for label, res in results.items():
        lines = list(res.get("caveats", []))
        if res.get("partial"):
            lines.append(res["partial"])
        elif res.get("coverage"):
            lines.append(res["coverage"])
        null = res.get("null_multi_label_predictions")
        if res.get("empty_predictions") or null:
            every = null and null >= ((res["official"].get("multi_label") or {}).get("num_examples") or math.inf)
            left_out = (f"FLARE's multi-label f1_score leaves out the {null} pair(s) whose prediction is null or a "
                        "number, not text (as its evaluator does; a blank text counts as no label)")
            lines.append((f"{res['empty_predictions']} empty (blank or null) prediction(s), scored as empty answers"
                          + (f", except that {left_out}" if null else "") if res.get("empty_predictions") else
                          left_out + "; our other metrics score a number's text")
                         + ("; here that is every multi-label pair, so its f1_score of 0 is FLARE's value for no "
                            "pairs, not a measurement" if every else ""))
        for note in ("rejected_at_prepare", "answers_note", "dataset_names_note", "sheet_note", "stored_sheet_note",
                     "edited_sheet_note"):
            if res.get(note):
                lines.append(res[note])
        lines += unjudged_lines((res.get("by_task") or {}).get("report_generation") or {})
        for task, block in res["official"].items():
            note = (block or {}).get("note") or (block or {}).get(OFFICIAL_METRIC[task]) is None and \
                res["by_task"].get(task, {}).get(OFFICIAL_METRIC[task].split("_")[0] + "_note")
            if note:
                lines.append(f"{FLARE_TASK_TYPE[task]}: {note}")
        for line in lines:
            runs_of.setdefault(line, []).append(label)
    return [*(caveats or []), *(f"{', '.join(labels)}: {line}" for line, labels in runs_of.items()), *warnings]


def output_files(out_dir: Path) -> list[str]:
    """The eval's own files, for the report's list."""
    return sorted(p.name for p in out_dir.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix in (".json", ".jsonl", ".md", ".html", ".png", ".xlsx", ".yaml"))


def report_blocks(out_dir: Path, results: dict, tests: list[dict], warnings: list[str], family: dict | None,
                  root: Path | None, caveats: list[str] | None) -> list[Block]:
    header, rows = official_table(results)
    blocks = [Block("h2", "Official numbers (FLARE's evaluator)"), Block("table", header=header, items=rows),
              Block("figure", "FLARE's official metric per task type, runs side by side",
                    png=(out_dir / "metrics.png").read_bytes())]
    if tests:
        blocks += [Block("h2", "Significance (paired, on shared samples)"),
                   Block("table", header=SIGNIFICANCE_HEADER, items=significance_rows(tests)),
                   Block("notes", items=significance_notes(family))]
    lines = caveat_lines(results, warnings, caveats)
    blocks += [Block("h2", "Caveats"), Block("list", items=lines or ["none recorded"])]
    run_head, run_rows = runs_table(results, root)
    blocks += [Block("h2", "Runs evaluated"), Block("table", header=run_head, items=run_rows)]
    for task, notes, head, task_rows in variant_tables(results):
        blocks += [Block("h2", f"{task}: all metrics"), Block("table", header=head, items=task_rows)]
        if notes:
            blocks.append(Block("notes", items=notes))
    files = sorted(set(output_files(out_dir) + ["report.md", "report.html"]))
    blocks += [Block("h2", "How the official numbers are computed"), Block("notes", items=OFFICIAL_NOTES),
               Block("h2", "Files"), Block("files", f"Beside this report, in {shown_path(out_dir, root)}:",
                                           items=files)]
    return blocks


def write_reports(out_dir: Path, results: dict, tests: list[dict], warnings: list[str],
                  intervals: dict | None = None, family: dict | None = None, root: Path | None = None,
                  caveats: list[str] | None = None) -> None:
    """metrics.png, report.md and report.html; ``intervals``: label -> task -> 95% bootstrap interval of the
    official metric (the plot's error bars); ``root``: the output root paths are shown relative to;
    ``caveats``: lines for the report's caveats list (each result's own ``caveats`` list joins them)."""
    import datetime

    from flare_exp.reports.eval_figure import plot
    from flare_exp.run.record import git_commit

    meta = (f"evaluated {datetime.datetime.now().isoformat(timespec='seconds')}, flare-exp commit "
            f"{short_hash(git_commit() or 'unknown')}" + (f", output root {root}" if root else ""))
    plot(out_dir / "metrics.png", results, intervals or {})
    blocks = report_blocks(out_dir, results, tests, warnings, family, root, caveats)
    write_text(out_dir / "report.md", to_markdown("flare-exp evaluation", meta, blocks, "metrics.png"))
    write_text(out_dir / "report.html", to_html("flare-exp evaluation", meta, blocks))
