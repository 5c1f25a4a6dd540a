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
    "green_score is the GREEN package's mean (unreadable judgments score 0); eval.green.parser=robust reads "
    "more and leaves unreadable ones out (then it is not the package's number).",
]


def fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return "Infinity" if math.isinf(v) else f"{v:.4f}"
    return str(v)


def official_table(results: dict) -> tuple[list[str], list[list[str]]]:
    labels = list(results)
    tasks = sorted({t for r in results.values() for t in r["official"]})
    rows = []
    for task in tasks:
        metric = OFFICIAL_METRIC[task]
        name = f"{FLARE_TASK_TYPE[task]}: {metric}" + (" (lower is better)" if metric in LOWER_IS_BETTER else "")
        rows.append([name, *(fmt(results[lab]["official"].get(task, {}).get(metric)) for lab in labels)])
    datasets = sorted({d for r in results.values() for d in r["official_by_dataset"]})
    for dataset in datasets:
        block = next(r["official_by_dataset"][dataset] for r in results.values() if dataset in r["official_by_dataset"])
        metric = next(k for k in block if k in OFFICIAL_METRIC.values())
        rows.append([f"  {dataset}: {metric}",
                     *(fmt(results[lab]["official_by_dataset"].get(dataset, {}).get(metric)) for lab in labels)])
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


def significance_rows(tests: list[dict]) -> list[list[str]]:
    def interval(ci):
        return "n/a" if not ci else f"[{ci[0]:.4f}, {ci[1]:.4f}]"

    return [[f"{t['run_b']} vs {t['run_a']}", f"{t['task']}: {t['metric']}", fmt(t["a"]), fmt(t["b"]),
             fmt(t["difference"]), interval(t.get("difference_ci95")), fmt(t.get("p_value")), str(t["n"])]
            for t in tests]


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows), ""]


def html_table(header: list[str], rows: list[list[str]]) -> str:
    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" +
            "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>")


def write_reports(out_dir: Path, results: dict, tests: list[dict], warnings: list[str]) -> None:
    sections = []  # (title, paragraphs, header, rows)
    header, rows = official_table(results)
    sections.append(("Official numbers (FLARE's evaluator)", OFFICIAL_NOTES, header, rows))
    status = [f"{lab}: {res['partial']}" for lab, res in results.items() if res.get("partial")]
    status += [f"{lab}: {res['empty_predictions']} empty (null or non-text) prediction(s), scored as empty answers"
               for lab, res in results.items() if res.get("empty_predictions")]
    if tests or warnings:
        sections.append(("Significance (paired, on shared samples)",
                         ["95% intervals: paired bootstrap; p: paired permutation test (two-sided)."] + warnings,
                         ["comparison", "metric", "A", "B", "B - A", "95% interval of B - A", "p", "n"],
                         significance_rows(tests)))
    for task, notes, head, task_rows in variant_tables(results):
        sections.append((f"{task}: all metrics", notes, head, task_rows))
    md = ["# flare-exp evaluation", "", *(f"**{s}**" for s in status), ""]
    page = ["<html><head><meta charset='utf-8'><title>flare-exp evaluation</title><style>body{font-family:sans-serif}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px}</style></head>"
            "<body><h1>flare-exp evaluation</h1>", *(f"<p><b>{html.escape(s)}</b></p>" for s in status),
            "<img src='metrics.png' style='max-width:100%'>"]
    for title, paragraphs, head, table_rows in sections:
        md += [f"## {title}", "", *(f"- {p}" for p in paragraphs), "" if paragraphs else "", *md_table(head, table_rows)]
        page.append(f"<h2>{html.escape(title)}</h2>" + "".join(f"<p>{html.escape(p)}</p>" for p in paragraphs) +
                    html_table(head, table_rows))
    md += ["## Files", ""] + [f"- `{lab}`: {res['file']} ({res['n']} predictions)" for lab, res in results.items()]
    write_text(out_dir / "report.md", "\n".join(md) + "\n")
    write_text(out_dir / "report.html", "".join(page) + "</body></html>\n")
    plot(out_dir / "metrics.png", results, tests)


def plot(path: Path, results: dict, tests: list[dict]) -> None:
    """The official metric per task type, one panel each; bounded metrics on a fixed 0-1 axis."""
    from flare_exp.plotting import save_png, subplots

    task_list = sorted({t for r in results.values() for t in r["official"]})
    fig, axes = subplots(1, len(task_list), figsize=(4 * len(task_list), 3.6), squeeze=False)
    for ax, task in zip(axes[0], task_list):
        metric = OFFICIAL_METRIC[task]
        values = [results[lab]["official"].get(task, {}).get(metric) for lab in results]
        shown = [v if v is not None and math.isfinite(v) else 0.0 for v in values]
        bars = ax.bar(list(results), shown, color="tab:blue")
        for bar, v in zip(bars, values):
            ax.annotate(fmt(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=7)
        if metric not in LOWER_IS_BETTER:
            ax.set_ylim(0, 1.05)
        ax.set_title(f"{FLARE_TASK_TYPE[task]}\n{metric}" + (" (lower is better)" if metric in LOWER_IS_BETTER
                                                              else ""), fontsize=9)
        ax.tick_params(axis="x", rotation=20, labelsize=7)
    save_png(fig, path)
