"""The eval stage's report: report.md, report.html and metrics.png from metrics.json's content.

The first table holds FLARE's official numbers (what the leaderboard would show); the notes under it say how
each differs from our own variants, which follow per task type.
"""
from __future__ import annotations

import html
import math
from pathlib import Path

from flare_exp.io import write_text
from flare_exp.metrics.official import FLARE_TASK_TYPE, LOWER_IS_BETTER, OFFICIAL_METRIC

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


def fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return "Infinity" if math.isinf(v) else f"{v:.4f}"
    return str(v)


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


SIGNIFICANCE_HEADER = ["comparison", "metric", "A", "B", "B - A", "95% interval of B - A", "p (permutation)",
                       "p adjusted", "p (approx. randomization)", "p adjusted", "n"]


def significance_rows(tests: list[dict]) -> list[list[str]]:
    def interval(ci):
        return "n/a" if not ci else f"[{ci[0]:.4f}, {ci[1]:.4f}]"

    return [[f"{t['run_b']} vs {t['run_a']}", f"{t['task']}: {t['metric']}", fmt(t["a"]), fmt(t["b"]),
             fmt(t["difference"]), interval(t.get("difference_ci95")), fmt(t.get("p_value")),
             fmt(t.get("p_value_adjusted")), fmt(t.get("ar_p_value")), fmt(t.get("ar_p_value_adjusted")), str(t["n"])]
            for t in tests]


def significance_notes(family: dict | None) -> list[str]:
    notes = ["95% intervals: paired bootstrap; p: paired permutation test and paired approximate randomization "
             "(both two-sided), raw and adjusted."]
    if family:
        name = {"holm": "Holm's step-down", "bh": "Benjamini-Hochberg", "none": "no correction"}[family["correction"]]
        notes.append(f"Adjusted p ({name}) over the family: {family['family']}.")
    return notes


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows), ""]


def html_table(header: list[str], rows: list[list[str]]) -> str:
    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" +
            "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>")


RUN_FIELDS = (("model", "model"), ("model_path", "model path"), ("backend", "backend"),
              ("checkpoint", "adapter"), ("adapter_sha256", "adapter sha256"), ("finished", "predicted"),
              ("commit", "commit"))


def runs_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """What each evaluated run is: its predictions file, split, n, and what its infer run recorded."""
    rows = [[label, res.get("split") or "n/a", str(res["n"]), *(str(res.get("run", {}).get(k) or "n/a")
                                                                for k, _ in RUN_FIELDS), res["file"]]
            for label, res in results.items()]
    return ["run", "split", "n", *(title for _, title in RUN_FIELDS), "predictions"], rows


def output_files(out_dir: Path) -> list[str]:
    """The eval's own files, for the report's list (links relative to the report)."""
    return sorted(p.name for p in out_dir.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix in (".json", ".jsonl", ".md", ".html", ".png", ".xlsx", ".yaml"))


def write_reports(out_dir: Path, results: dict, tests: list[dict], warnings: list[str],
                  intervals: dict | None = None, family: dict | None = None) -> None:
    """report.md, report.html and metrics.png; ``intervals``: label -> task -> 95% bootstrap interval of the
    official metric (the plot's error bars)."""
    import datetime

    from flare_exp.run.record import git_commit

    sections = []  # (title, paragraphs, header, rows)
    header, rows = official_table(results)
    sections.append(("Official numbers (FLARE's evaluator)", OFFICIAL_NOTES, header, rows))
    status = [f"{lab}: {res['partial']}" for lab, res in results.items() if res.get("partial")]
    status += [f"{lab}: {res['empty_predictions']} empty (null or non-text) prediction(s), scored as empty answers"
               for lab, res in results.items() if res.get("empty_predictions")]
    status += [f"{lab}: {res['answers_note']}" for lab, res in results.items() if res.get("answers_note")]
    if tests or warnings:
        sections.append(("Significance (paired, on shared samples)", significance_notes(family) + warnings,
                         SIGNIFICANCE_HEADER, significance_rows(tests)))
    for task, notes, head, task_rows in variant_tables(results):
        sections.append((f"{task}: all metrics", notes, head, task_rows))
    run_head, run_rows = runs_table(results)
    sections.insert(1, ("Runs evaluated", [], run_head, run_rows))
    made = (f"evaluated {datetime.datetime.now().isoformat(timespec='seconds')}, flare-exp commit "
            f"{git_commit() or 'unknown'}")
    plot(out_dir / "metrics.png", results, intervals or {})
    files = output_files(out_dir) + ["report.md", "report.html"]
    md = ["# flare-exp evaluation", "", made, "", *(f"**{s}**" for s in status), ""]
    page = ["<html><head><meta charset='utf-8'><title>flare-exp evaluation</title><style>body{font-family:sans-serif;"
            "max-width:1200px}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
            "text-align:left}.meta{color:#555}</style></head><body><h1>flare-exp evaluation</h1>",
            f"<p class='meta'>{html.escape(made)}</p>", *(f"<p><b>{html.escape(s)}</b></p>" for s in status),
            "<img src='metrics.png' alt='official metrics per task type and dataset' style='max-width:100%'>"]
    for title, paragraphs, head, table_rows in sections:
        md += [f"## {title}", "", *(f"- {p}" for p in paragraphs), "" if paragraphs else "", *md_table(head, table_rows)]
        page.append(f"<h2>{html.escape(title)}</h2>" + "".join(f"<p>{html.escape(p)}</p>" for p in paragraphs) +
                    html_table(head, table_rows))
    md += ["## Files", "", *(f"- [{name}]({name})" for name in sorted(set(files)))]
    page.append("<h2>Files</h2><ul>" + "".join(f"<li><a href='{html.escape(n)}'>{html.escape(n)}</a></li>"
                                               for n in sorted(set(files))) + "</ul>")
    write_text(out_dir / "report.md", "\n".join(md) + "\n")
    write_text(out_dir / "report.html", "".join(page) + "</body></html>\n")


def _panel(ax, title: str, metric: str, labels: list[str], values: list, errors: list | None) -> None:
    """One metric, one bar per run (grouped by colour), value labels, 95% intervals where known; bounded
    metrics on a fixed 0-1 axis, errors marked lower-is-better."""
    colours = [f"C{i % 10}" for i in range(len(labels))]
    shown = [v if v is not None and math.isfinite(v) else 0.0 for v in values]
    bars = ax.bar(range(len(labels)), shown, color=colours)
    if errors and any(e for e in errors):
        for i, (v, e) in enumerate(zip(shown, errors)):
            if e:
                ax.errorbar(i, v, yerr=[[max(v - e[0], 0)], [max(e[1] - v, 0)]], color="black", capsize=3, lw=1)
    lower = metric in LOWER_IS_BETTER
    if lower:
        ax.set_ylim(bottom=0)
    else:
        ax.set_ylim(0, 1.1)
    note = None
    if all(v is None for v in values):
        note = "not computed" + ("\nno GREEN judge\n(eval.green.model_path)" if metric == "green_score" else "")
    elif all(v is not None and not math.isfinite(v) for v in values):
        note = "Infinity: a prediction that\nfloat() cannot read\n(see mae_parseable)"
    if note:
        ax.text(0.5, 0.5, note, ha="center", va="center", fontsize=8, transform=ax.transAxes)
    else:
        for bar, v in zip(bars, values):
            ax.annotate(fmt(v) if v is not None else "n/a", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.set_title(f"{title}\n{metric}" + (" (lower is better)" if lower else ""), fontsize=9)
    ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=7, ha="right")


def plot(path: Path, results: dict, intervals: dict) -> None:
    """Row 1: FLARE's official metric per task type (what the leaderboard shows), runs side by side with their
    95% bootstrap intervals. Row 2: the official metric per dataset."""
    from flare_exp.plotting import save_png, subplots

    labels = list(results)
    tasks = sorted({t for r in results.values() for t in r["official"]})
    datasets = sorted({d for r in results.values() for d in r["official_by_dataset"]})
    columns = max(len(tasks), len(datasets), 1)
    fig, axes = subplots(2 if datasets else 1, columns, figsize=(3.4 * columns + 1, 7 if datasets else 3.6),
                         squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for ax, task in zip(axes[0], tasks):
        ax.set_visible(True)
        metric = OFFICIAL_METRIC[task]
        _panel(ax, f"official: {FLARE_TASK_TYPE[task]}", metric, labels,
               [results[lab]["official"].get(task, {}).get(metric) for lab in labels],
               [intervals.get(lab, {}).get(task) for lab in labels])
    for ax, dataset in zip(axes[1] if datasets else [], datasets):
        ax.set_visible(True)
        block = next(r["official_by_dataset"][dataset] for r in results.values() if dataset in r["official_by_dataset"])
        metric = next(k for k in block if k in OFFICIAL_METRIC.values())
        _panel(ax, dataset, metric, labels,
               [results[lab]["official_by_dataset"].get(dataset, {}).get(metric) for lab in labels], None)
    save_png(fig, path)
