"""A predictions file scored: FLARE's official numbers per task type and per dataset, our variants, the report-text
metrics and the report judges (GREEN, CRIMSON), with the scorers loaded once and shared by every file scored."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from flare_exp.data.predictions import load_rows, run_metadata
from flare_exp.io import file_digest, write_jsonl
from flare_exp.metrics import official, tasks, text
from flare_exp.metrics.flare_reading import flare_reading_caveats, shared_key_caveat
from flare_exp.run.layout import CONFIG, FINGERPRINT
from flare_exp.runtime import abspath

TASK_METRICS = {"classification": tasks.classification_metrics, "multi_label": tasks.multi_label_metrics,
                "regression": tasks.regression_metrics}


class ReportScorers:
    """RadGraph, CheXbert, the keyword metrics and GREEN, loaded once and shared by every predictions file."""

    def __init__(self, cfg, out_dir: Path):
        self.cfg, self.out_dir = cfg, out_dir
        self._radgraph = self._green = self._crimson = self._chexbert = self._keyword = None

    def radgraph(self):
        rg = self.cfg.reward.radgraph
        if not self.cfg.eval.radgraph or not rg.model_dir:
            return None
        if self._radgraph is None:
            from flare_exp.metrics.radgraph_f1 import RadGraphScorer

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
            from flare_exp.metrics.green_judge import GreenJudge

            g = self.cfg.eval.green
            self._green = GreenJudge.from_pretrained(
                abspath(g.model_path), g.dtype, batch_size=g.batch_size, max_length=g.max_length,
                max_new_tokens=g.max_new_tokens, decode_loop=g.decode_loop, parser=g.parser, exact=g.exact,
                decode_attention=g.decode_attention, shared_prefix=g.shared_prefix,
                journal=self.out_dir / "green_judgments.jsonl")  # a rerun resumes here
        return self._green

    @property
    def green_batch(self) -> dict | None:
        """eval.green.batch_size as used, and why (the summary's); None before the judge judged."""
        return self._green.batch_choice if self._green is not None else None

    def crimson(self):
        if not self.cfg.eval.crimson.model_path:
            return None
        if self._crimson is None:
            from flare_exp.metrics.crimson_judge import CrimsonJudge

            c = self.cfg.eval.crimson
            self._crimson = CrimsonJudge.from_pretrained(
                abspath(c.model_path), c.dtype, batch_size=c.batch_size, max_new_tokens=c.max_new_tokens,
                decode_loop=c.decode_loop, journal=self.out_dir / "crimson_judgments.jsonl")  # a rerun resumes here
        return self._crimson

    def judges(self) -> list:
        """The report judges configured (GREEN, CRIMSON), loaded."""
        return [judge for judge in (self.green(), self.crimson()) if judge is not None]


def text_metrics(hyps: list[str], refs: list[str]) -> dict:
    """The count and the report-text metrics of predictions against their references: ROUGE, corpus BLEU and
    the original scripts' per-sample BLEU."""
    return {"n": len(hyps), **text.rouge(hyps, refs), **text.corpus_bleu(hyps, refs),
            "seed_bleu": text.seed_bleu(hyps, refs)}


def report_metrics(rows: list[dict], scorers: ReportScorers, label: str) -> tuple[dict, list | None]:
    """Report-text metrics; also the GREEN judge's per-sample rows (None when no judge is configured)."""
    hyps, refs = [r["prediction"] for r in rows], [r["answer"] for r in rows]
    out = text_metrics(hyps, refs)
    radgraph = scorers.radgraph()
    if radgraph is not None:
        from flare_exp.metrics.radgraph_f1 import MAX_WORDS, is_cut

        triples = radgraph.score_pairs(hyps, refs)
        for i, name in enumerate(("radgraph_RG_E", "radgraph_RG_ER", "radgraph_RG_ER_bar")):
            out[name] = sum(t[i] for t in triples) / len(triples)
        cut = sum(is_cut(h) for h in hyps)
        if cut:
            out["radgraph_cut_predictions"] = cut
            out["radgraph_cut_note"] = f"{cut} prediction(s) cut to their first {MAX_WORDS} words for RadGraph"
    else:
        out["radgraph_note"] = "not computed: reward.radgraph.model_dir is not set (or eval.radgraph=false)"
    reference = scorers.keyword()
    if reference is None:
        out["keyword_note"] = ("keyword_green / keyword_clinical_efficacy not computed: set "
                               "eval.keyword_metrics.module to compare with the original scripts' published numbers")
    else:
        from flare_exp.metrics.keyword import keyword_metrics

        out.update(keyword_metrics(reference, hyps, refs, seed_bleu=out["seed_bleu"]))
    labeler = scorers.chexbert()
    if labeler is not None:
        from flare_exp.metrics.chexbert import binarise, efficacy

        uap = scorers.cfg.eval.chexbert.uncertain_as_positive
        out.update(efficacy(binarise(labeler.label(hyps), uap), binarise(labeler.label(refs), uap)))
        out["chexbert_uncertain_as"] = "positive" if uap else "negative"
    from flare_exp.metrics.crimson_judge import crimson_fields

    out.update(crimson_fields(scorers.crimson(), rows,
                              samples_file(scorers.out_dir, "crimson", label)))
    judge = scorers.green()
    if judge is None:
        out["green_score"] = None
        out["green_note"] = "not computed: eval.green.model_path is not set (no GREEN judge configured)"
        return out, None
    summary, per_sample = judge.score(refs, hyps)
    out.update(summary)
    write_jsonl(samples_file(scorers.out_dir, "green", label),
                [{"id": r["id"], **s} for r, s in zip(rows, per_sample)])
    return out, per_sample


def samples_file(out_dir: Path, judge: str, label: str) -> Path:
    """Where eval keeps a judge's per-report rows for one model (``judge``: green, crimson); runs.compare reads
    GREEN's back to recompute the score."""
    return out_dir / f"{judge}_samples_{label.replace('/', '_')}.jsonl"


def scored_rows(rows: list[dict]) -> list[dict]:
    """Our variants score a number's text, and a null or missing prediction as an empty answer (counted in the
    report); FLARE's official numbers read the raw rows."""
    return [{**r, "prediction": prediction_text(r.get("prediction"))} for r in rows]


def prediction_text(value) -> str:
    """A prediction as our variants read it: its text, a number's digits, else empty."""
    if isinstance(value, str):
        return value
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else ""


def official_green_of(scorers: ReportScorers, pairs: list, green_by_id: dict) -> dict | None:
    """FLARE's green_score outcome for these (raw row, scored row) pairs, from the judge's rows (None: no judge)."""
    if not green_by_id:
        return None
    from flare_exp.metrics.green import official_green

    return official_green([raw.get("prediction") for raw, _ in pairs], [green_by_id[raw["id"]] for raw, _ in pairs],
                          scorers.cfg.eval.green.max_length)


def evaluate_file(path: Path, scorers: ReportScorers, allow_partial: bool = False) -> tuple[str, dict, dict, list]:
    """(label, metrics, per-sample official statistics by task: (ids, stats) for the significance tests and
    the scored sheet, the rows as read)."""
    raw, info = load_rows(path, allow_partial, scorers.cfg.data.prepared_dir)
    label = raw[0].get("model") or path.parent.name
    rows = scored_rows(raw)
    by_task, by_dataset = defaultdict(list), defaultdict(list)
    for raw_row, row, group in zip(raw, rows, official.dataset_groups(rows)):
        by_task[row["task_type"]].append((raw_row, row))
        by_dataset[group].append((raw_row, row))
    result = {"file": str(path), "file_sha256": file_digest(path), "n": len(rows), "split": raw[0].get("split"),
              **info, "run": run_metadata(path),
              "official": {},
              "official_by_dataset": {}, "by_task": {}, "by_dataset": {}}
    samples, green_by_id = {}, {}
    for task, pairs in sorted(by_task.items()):
        group = [row for _, row in pairs]
        if task == "report_generation":
            metrics, green = report_metrics(group, scorers, label)
            green_by_id = dict(zip((r["id"] for r in group), green or []))
        else:
            metrics, green = TASK_METRICS[task](group), None
        result["by_task"][task] = metrics
        result["official"][task] = official.official_block(task, [r for r, _ in pairs],
                                                           official_green_of(scorers, pairs, green_by_id))
        if task != "report_generation":
            samples[task] = ([r["id"] for r in group], official.STATS[task](
                [r.get("prediction", "") for r, _ in pairs], [r.get("answer", "") for r, _ in pairs]))
        elif green is not None:
            samples[task] = ([r["id"] for r in group], official.green_stats([s["green"] for s in green]))
    reading = flare_reading_caveats({task: [row for row, _ in pairs] for task, pairs in by_task.items()})
    reading += shared_key_caveat(r.get("id") for r in raw)
    edited = result["run"].get("config_edited")
    if edited:
        reading.append(f"{path.parent / CONFIG} was edited after its infer run ({'; '.join(edited[:4])}): the run "
                       f"block gives the settings the run recorded as it ran ({FINGERPRINT})")
    if reading:
        result["caveats"] = reading
    for dataset, pairs in sorted(by_dataset.items()):
        task = pairs[0][1]["task_type"]
        group = [row for _, row in pairs]
        green = official_green_of(scorers, pairs, green_by_id) if task == "report_generation" else None
        metrics = (TASK_METRICS[task](group) if task != "report_generation" else
                   report_group_metrics(group, result["by_task"][task], by_task[task], green_by_id))
        block = official.official_block(task, [r for r, _ in pairs], green)
        result["by_dataset"][dataset] = {"task_type": task, **metrics}
        result["official_by_dataset"][dataset] = block
    return label, result, samples, raw


def report_group_metrics(group: list[dict], task_metrics: dict, task_pairs: list, green_by_id: dict) -> dict:
    """Our report variants of one dataset's reports: the task's own where the dataset holds them all (FLARE's
    one report dataset); else the text metrics and GREEN of its rows alone, the rest named in by_task."""
    if len(group) == len(task_pairs):
        return dict(task_metrics)
    out = text_metrics([r["prediction"] for r in group], [r["answer"] for r in group])
    if green_by_id:
        from flare_exp.metrics.green import summarise

        out.update(summarise([green_by_id[r["id"]] for r in group]))
    out["note"] = "the task's other report metrics (RadGraph, CRIMSON, CheXbert) are over all its datasets: by_task"
    return out


def flat_summary(results: dict) -> dict:
    out = {}
    for label, res in results.items():
        prefix = f"{label}/" if len(results) > 1 else ""
        for task, block in res["official"].items():
            out[f"{prefix}{task}/{official.OFFICIAL_METRIC[task]}"] = block[official.OFFICIAL_METRIC[task]]
        for task, m in res["by_task"].items():
            for k, v in m.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[f"{prefix}{task}/{k}"] = v
    return out
