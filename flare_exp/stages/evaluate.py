"""eval stage: FLARE's official metric per task type, report-text metrics, real GREEN; one or many models.

``python launch.py stage=eval eval.predictions=[runs/a/infer,runs/b/infer]``: each entry is a predictions.jsonl
or a run dir holding one. Several entries give a side-by-side comparison (base vs SFT vs RL, or a sweep).
Writes metrics.json, metrics_summary.json (flat, for sweep reports), report.md, report.html, metrics.png, and
the GREEN judge's per-sample counts when GREEN runs.
"""
from __future__ import annotations

import html
import logging
from collections import defaultdict
from pathlib import Path

from flare_exp.io import read_jsonl, write_json, write_jsonl, write_text
from flare_exp.metrics import tasks, text
from flare_exp.runtime import abspath

log = logging.getLogger(__name__)
OFFICIAL = {"classification": "balanced_accuracy", "multi_label": "f1_micro", "regression": "mae",
            "report_generation": "green"}
TASK_METRICS = {"classification": tasks.classification_metrics, "multi_label": tasks.multi_label_metrics,
                "regression": tasks.regression_metrics}


def find_predictions(entry: str) -> Path:
    path = abspath(entry)
    for candidate in (path, path / "predictions.jsonl", path / "infer" / "predictions.jsonl"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"eval.predictions entry {entry}: no predictions.jsonl there (run stage=infer first)")


class ReportScorers:
    """RadGraph and GREEN, loaded once and shared by every predictions file."""

    def __init__(self, cfg, out_dir: Path):
        self.cfg, self.out_dir = cfg, out_dir
        self._radgraph = self._green = self._chexbert = self._keyword = None

    def radgraph(self):
        rg = self.cfg.reward.radgraph
        if not self.cfg.eval.radgraph or not rg.model_dir:
            return None
        if self._radgraph is None:
            from flare_exp.rewards.radgraph_term import RadGraphScorer

            self._radgraph = RadGraphScorer(str(abspath(rg.model_dir)), rg.model_type, rg.cache_size,
                                            build_tiny=rg.build_tiny, device=rg.device)
        return self._radgraph

    def chexbert(self):
        c = self.cfg.eval.chexbert
        if not c.path:
            return None
        if self._chexbert is None:
            from flare_exp.metrics.chexbert import CheXbert

            self._chexbert = CheXbert(abspath(c.path), abspath(c.encoder_path) if c.encoder_path else None,
                                      c.batch_size)
        return self._chexbert

    def keyword(self):
        path = self.cfg.eval.keyword_metrics.module
        if not path:
            return None
        if self._keyword is None:
            from flare_exp.metrics.keyword import load_reference_module

            self._keyword = load_reference_module(abspath(path))
        return self._keyword

    def green(self):
        if not self.cfg.eval.green.model_path:
            return None
        if self._green is None:
            from flare_exp.metrics.green import GreenJudge

            g = self.cfg.eval.green
            self._green = GreenJudge(abspath(g.model_path), g.batch_size, g.max_length, g.max_new_tokens,
                                     journal=self.out_dir / "green_judgments.jsonl")  # a rerun resumes here
        return self._green


def report_metrics(rows: list[dict], scorers: ReportScorers, label: str) -> dict:
    hyps, refs = [r["prediction"] for r in rows], [r["answer"] for r in rows]
    out = {"n": len(rows), "rouge_l": text.rouge_l(hyps, refs), **text.corpus_bleu(hyps, refs),
           "seed_bleu": text.seed_bleu(hyps, refs)}
    radgraph = scorers.radgraph()
    if radgraph is not None:
        triples = radgraph.score_pairs(hyps, refs)
        for i, name in enumerate(("radgraph_RG_E", "radgraph_RG_ER", "radgraph_RG_ER_bar")):
            out[name] = sum(t[i] for t in triples) / len(triples)
    else:
        out["radgraph_note"] = "not computed: reward.radgraph.model_dir is not set (or eval.radgraph=false)"
    reference = scorers.keyword()
    if reference is None:
        out["keyword_note"] = ("keyword_green / keyword_clinical_efficacy not computed: set "
                               "eval.keyword_metrics.module to compare with the seed's published numbers")
    else:
        from flare_exp.metrics.keyword import keyword_metrics

        out.update(keyword_metrics(reference, hyps, refs, seed_bleu=out["seed_bleu"]))
    labeler = scorers.chexbert()
    if labeler is not None:
        from flare_exp.metrics.chexbert import binarise, efficacy

        uap = scorers.cfg.eval.chexbert.uncertain_as_positive
        out.update(efficacy(binarise(labeler.label(hyps), uap), binarise(labeler.label(refs), uap)))
        out["chexbert_uncertain_as"] = "positive" if uap else "negative"
    judge = scorers.green()
    if judge is None:
        out["green"] = None
        out["green_note"] = "not computed: eval.green.model_path is not set (no GREEN judge configured)"
    else:
        summary, per_sample = judge.score(refs, hyps)
        out.update(summary)
        safe = label.replace("/", "_")
        write_jsonl(scorers.out_dir / f"green_samples_{safe}.jsonl",
                    [{"id": r["id"], **s} for r, s in zip(rows, per_sample)])
    return out


def evaluate_file(path: Path, scorers: ReportScorers) -> tuple[str, dict]:
    rows = read_jsonl(path)
    if not rows:
        raise ValueError(f"{path}: no predictions")
    missing = [r["id"] for r in rows if r.get("answer") is None]
    if missing:
        raise ValueError(f"{path}: {len(missing)} predictions have no ground truth (e.g. {missing[0]}); "
                         "the test split is scored by FLARE from the submission files")
    label = rows[0].get("model") or path.parent.name
    by_task, by_dataset = defaultdict(list), defaultdict(list)
    for r in rows:
        by_task[r["task_type"]].append(r)
        by_dataset[r["dataset"]].append(r)

    def metrics(task, group):
        return report_metrics(group, scorers, label) if task == "report_generation" else TASK_METRICS[task](group)

    result = {"file": str(path), "n": len(rows),
              "by_task": {t: metrics(t, g) for t, g in sorted(by_task.items())},
              "by_dataset": {d: {"task_type": g[0]["task_type"], **metrics(g[0]["task_type"], g)}
                             for d, g in sorted(by_dataset.items()) if g[0]["task_type"] != "report_generation"}}
    for d, g in by_dataset.items():  # reports: one dataset (IU_XRay) in FLARE, reuse the task numbers
        if g[0]["task_type"] == "report_generation":
            result["by_dataset"][d] = {"task_type": "report_generation", **result["by_task"]["report_generation"]}
    return label, result


def flat_summary(results: dict) -> dict:
    out = {}
    for label, res in results.items():
        for task, m in res["by_task"].items():
            for k, v in m.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[f"{label}/{task}/{k}" if len(results) > 1 else f"{task}/{k}"] = v
    return out


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def tables(results: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """One table per task type: rows = metrics, columns = models (side by side)."""
    labels = list(results)
    out = []
    for task in sorted({t for r in results.values() for t in r["by_task"]}):
        keys = []
        for r in results.values():
            keys += [k for k, v in r["by_task"].get(task, {}).items() if k not in keys and not k.endswith("_note")]
        rows = [[k + (" (official)" if k == OFFICIAL.get(task) else ""),
                 *(_fmt(results[lab]["by_task"].get(task, {}).get(k)) for lab in labels)] for k in keys]
        notes = sorted({v for r in results.values() for k, v in r["by_task"].get(task, {}).items()
                        if k.endswith("_note") and v})
        out.append((task + ("" if not notes else "  \n_" + "; ".join(notes) + "_"), ["metric", *labels], rows))
    return out


def write_reports(out_dir: Path, results: dict) -> None:
    md = ["# flare-exp evaluation", "", "Official FLARE metric per task type is marked (official). "
          "BLEU: corpus BLEU on lower-cased whitespace tokens; seed_bleu: the seed's per-sample-averaged variant. "
          "keyword_green / keyword_clinical_efficacy: the seed's and FLARE25 baseline's keyword heuristics (not "
          "GREEN, not CheXbert), only for comparison with their published numbers.", ""]
    page = ["<html><head><meta charset='utf-8'><title>flare-exp evaluation</title><style>body{font-family:sans-serif}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px}</style></head>"
            "<body><h1>flare-exp evaluation</h1><img src='metrics.png' style='max-width:100%'>"]
    for title, header, rows in tables(results):
        md += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += ["| " + " | ".join(r) + " |" for r in rows] + [""]
        page.append(f"<h2>{html.escape(title.split(chr(10))[0])}</h2><table><tr>" +
                    "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" +
                    "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows) +
                    "</table>")
    md += ["## Files", ""] + [f"- `{lab}`: {res['file']} ({res['n']} predictions)" for lab, res in results.items()]
    write_text(out_dir / "report.md", "\n".join(md) + "\n")
    write_text(out_dir / "report.html", "".join(page) + "</body></html>\n")
    _plot(out_dir / "metrics.png", results)


def _plot(path: Path, results: dict) -> None:
    from flare_exp.plotting import save_png, subplots

    task_list = sorted({t for r in results.values() for t in r["by_task"]})
    fig, axes = subplots(1, len(task_list), figsize=(4 * len(task_list), 3.6), squeeze=False)
    for ax, task in zip(axes[0], task_list):
        metric = OFFICIAL[task] if task != "report_generation" or any(
            r["by_task"].get(task, {}).get("green") is not None for r in results.values()) else "rouge_l"
        values = [results[lab]["by_task"].get(task, {}).get(metric) or 0.0 for lab in results]
        ax.bar(list(results), values, color="tab:blue")
        ax.set_title(f"{task}\n{metric}", fontsize=9)
        ax.tick_params(axis="x", rotation=20, labelsize=7)
    save_png(fig, path)


def run(cfg, out_dir: Path) -> dict:
    entries = list(cfg.eval.predictions)
    if not entries:
        raise ValueError("eval.predictions is empty: pass one or more predictions.jsonl files or infer run dirs, "
                         "e.g. eval.predictions=[outputs/runs/demo-infer]")
    scorers = ReportScorers(cfg, out_dir)
    results = {}
    for entry in entries:
        label, res = evaluate_file(find_predictions(entry), scorers)
        while label in results:  # two runs with the same label stay apart
            label += "'"
        results[label] = res
    write_json(out_dir / "metrics.json", results)
    summary = flat_summary(results)
    write_json(out_dir / "metrics_summary.json", summary)
    write_reports(out_dir, results)
    log.info("evaluation written to %s\n%s", out_dir, (out_dir / "report.md").read_text())
    return {"metrics": str(out_dir / "metrics.json"), "report": str(out_dir / "report.md"), **summary}
