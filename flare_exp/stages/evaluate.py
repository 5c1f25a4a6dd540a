"""eval stage: FLARE's official numbers per task type, our named variants, report-text metrics, GREEN as the
GREEN package computes it; one model, or several side by side with paired significance tests.

``python launch.py stage=eval eval.predictions=[runs/a/infer,runs/b/infer]``: each entry is a predictions.jsonl
or a run dir holding one. Several entries give a side-by-side comparison (base vs SFT vs RL, or a sweep).
Writes metrics.json (per run: ``official``, FLARE's metric per task type and per dataset under FLARE's names;
``by_task`` / ``by_dataset``, every metric), metrics_summary.json (flat, for sweep reports), significance.json
(comparisons), report.md, report.html, metrics.png, and the GREEN judge's per-sample counts when GREEN runs.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from flare_exp.card import card_memory, green_batch, sized_batch
from flare_exp.data.predictions import load_rows
from flare_exp.fixtures.random_scorers import random_scorer_caveats
from flare_exp.compile_cache import prepare_gpu_run
from flare_exp.io import write_json, write_jsonl
from flare_exp.metrics import official, tasks, text
from flare_exp.reports.eval_report import write_reports
from flare_exp.metrics.significance import adjust_p_values, bootstrap_interval, correct_family
from flare_exp.run.layout import CONFIG, DONE, METRICS, RUN_INFO, predictions_file, summary_name
from flare_exp.run.stage import Stage
from flare_exp.runtime import abspath, barrier, ranks
from flare_exp.reports.sheets import write_scored_sheet


STAGE = Stage(
    name="eval",
    help="FLARE's official metrics, GREEN, RadGraph, ROUGE/BLEU, runs compared side by side",
    reads=("eval.predictions",),
    deciding=("eval.green",),
    free=("eval.green.batch_size", "eval.green.decode_loop", "eval.green.parser"),
    fingerprinted=("eval.predictions",),
    resumable=("green_judgments.jsonl", "green_judgments.rank*.jsonl"),
    ranks="several",
    feeds_from={"eval.predictions": ("infer",)},
    pipeline_step=True,
    reads_doc="`eval.predictions` (one or more)",
    writes_doc=("`metrics.json`, `metrics_summary.json`, `significance.json` (several runs), `report.md`, "
        "`report.html`, `metrics.png`, `scored.xlsx` (each row with its score: correct, label F1, absolute "
        "error, GREEN or ROUGE-L; worst first), `green_samples_*.jsonl`, `green_judgments.jsonl`"),
)

log = logging.getLogger(__name__)
TASK_METRICS = {"classification": tasks.classification_metrics, "multi_label": tasks.multi_label_metrics,
                "regression": tasks.regression_metrics}


def find_predictions(entry: str) -> Path:
    found = predictions_file(abspath(entry))
    if found is not None:
        return found
    raise FileNotFoundError(f"eval.predictions entry {entry}: no predictions.jsonl there (run stage=infer first)")


class ReportScorers:
    """RadGraph, CheXbert, the keyword metrics and GREEN, loaded once and shared by every predictions file."""

    def __init__(self, cfg, out_dir: Path):
        self.cfg, self.out_dir = cfg, out_dir
        self._radgraph = self._green = self._crimson = self._chexbert = self._keyword = None
        self.green_batch = None  # eval.green.batch_size as used, and why (the summary's)

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
            batch, self.green_batch = sized_batch("eval.green.batch_size", g.batch_size,
                                                  lambda: green_batch(card_memory(), g.max_length))
            self._green = GreenJudge.from_pretrained(
                abspath(g.model_path), g.dtype, batch_size=batch, max_length=g.max_length,
                max_new_tokens=g.max_new_tokens, decode_loop=g.decode_loop, parser=g.parser, exact=g.exact,
                journal=self.out_dir / "green_judgments.jsonl")  # a rerun resumes here
        return self._green


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


def report_metrics(rows: list[dict], scorers: ReportScorers, label: str) -> tuple[dict, list | None]:
    """Report-text metrics; also the GREEN judge's per-sample rows (None when no judge is configured)."""
    hyps, refs = [r["prediction"] for r in rows], [r["answer"] for r in rows]
    out = {"n": len(rows), **text.rouge(hyps, refs), **text.corpus_bleu(hyps, refs),
           "seed_bleu": text.seed_bleu(hyps, refs)}
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
                              scorers.out_dir / f"crimson_samples_{label.replace('/', '_')}.jsonl"))
    judge = scorers.green()
    if judge is None:
        out["green_score"] = None
        out["green_note"] = "not computed: eval.green.model_path is not set (no GREEN judge configured)"
        return out, None
    summary, per_sample = judge.score(refs, hyps)
    out.update(summary)
    write_jsonl(scorers.out_dir / f"green_samples_{label.replace('/', '_')}.jsonl",
                [{"id": r["id"], **s} for r, s in zip(rows, per_sample)])
    return out, per_sample


def run_metadata(path: Path) -> dict:
    """What produced a predictions file, from its infer run dir when there is one: the model, the checkpoint,
    the backend, when and from which commit."""
    import json

    from omegaconf import OmegaConf

    run_dir, meta = path.parent, {}
    try:
        if (run_dir / summary_name("infer")).exists():
            summary = json.loads((run_dir / summary_name("infer")).read_text())
            adapter = summary.get("adapter") or {}
            meta.update(checkpoint=adapter.get("path") or summary.get("checkpoint") or "base model",
                        adapter_sha256=adapter.get("sha256"), label=summary.get("label"))
        if (run_dir / CONFIG).exists():
            cfg = OmegaConf.load(run_dir / CONFIG)
            meta.update(model=str(cfg.model.get("name")), model_path=str(cfg.model.get("path")),
                        backend=str(cfg.model.get("backend")))
        if (run_dir / RUN_INFO).exists():
            info = json.loads((run_dir / RUN_INFO).read_text())
            meta.update(commit=info.get("git_commit"), started=info.get("started") or info.get("start_time"))
        if (run_dir / DONE).exists():
            meta["finished"] = json.loads((run_dir / DONE).read_text()).get("finished")
    except (OSError, ValueError) as e:  # a best-effort record for the report
        meta["note"] = f"run metadata unreadable: {e}"
    return meta


def scored_rows(rows: list[dict]) -> list[dict]:
    """Our variants score a null, list or missing prediction as an empty answer (counted in the report)."""
    return [{**r, "prediction": r["prediction"] if isinstance(r.get("prediction"), str) else ""} for r in rows]


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
    for raw_row, row in zip(raw, rows):
        by_task[row["task_type"]].append((raw_row, row))
        by_dataset[row["dataset"]].append((raw_row, row))
    result = {"file": str(path), "n": len(rows), "split": raw[0].get("split"), **info, "run": run_metadata(path),
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
    for dataset, pairs in sorted(by_dataset.items()):
        task = pairs[0][1]["task_type"]
        group = [row for _, row in pairs]
        green = official_green_of(scorers, pairs, green_by_id) if task == "report_generation" else None
        metrics = TASK_METRICS[task](group) if task != "report_generation" else dict(result["by_task"][task])
        block = official.official_block(task, [r for r, _ in pairs], green)
        result["by_dataset"][dataset] = {"task_type": task, **metrics}
        result["official_by_dataset"][dataset] = block
    return label, result, samples, raw


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


def compare(results: dict, samples: dict, resamples: int, seed: int, ar_trials: int = 0) -> tuple[list[dict], list[str]]:
    """Paired tests for every pair of runs and official metric, on the ids both scored (the bootstrap and
    permutation test; approximate randomization with ``ar_trials``); and the warnings on runs that were not
    scored on the same inputs."""
    from itertools import combinations

    from flare_exp.metrics.significance import approximate_randomization, paired_test

    tests, warnings = [], []
    for a, b in combinations(list(results), 2):
        ids_a = {i for ids, _ in samples[a].values() for i in ids}
        ids_b = {i for ids, _ in samples[b].values() for i in ids}
        split_a, split_b = results[a].get("split"), results[b].get("split")
        if ids_a != ids_b:
            warnings.append(f"{a} and {b} were scored on different inputs: {len(ids_a - ids_b)} sample(s) only in "
                            f"{a}, {len(ids_b - ids_a)} only in {b}; the comparisons use the {len(ids_a & ids_b)} "
                            "they share")
        if split_a != split_b:
            warnings.append(f"{a} and {b} come from different splits: {split_a} and {split_b}")
        for task in sorted(set(samples[a]) & set(samples[b])):
            (ids_ta, st_a), (ids_tb, st_b) = samples[a][task], samples[b][task]
            where_b = {i: k for k, i in enumerate(ids_tb)}
            shared = [(k, where_b[i]) for k, i in enumerate(ids_ta) if i in where_b]
            if not shared or not resamples:
                continue
            ka, kb = map(list, zip(*shared))
            test = {"run_a": a, "run_b": b, "task": task,
                    **paired_test(task, st_a[ka], st_b[kb], resamples=resamples, seed=seed)}
            if ar_trials:
                test["ar_p_value"] = approximate_randomization(task, st_a[ka], st_b[kb], ar_trials, seed)
                test["ar_trials"] = ar_trials
            tests.append(test)
    return tests, warnings


def judge_shares(cfg, scorers: ReportScorers, entries: list, rank: int, world: int) -> None:
    """A data-parallel eval: each rank's report judges (GREEN, CRIMSON) take their share of every file's reports
    (own journals), then rank 0 merges the journals. The other metrics are computed by rank 0 alone (they take
    seconds)."""
    judges = scorers.judges()
    for judge in judges:
        for entry in entries:
            rows = scored_rows(load_rows(find_predictions(entry), cfg.eval.allow_partial, cfg.data.prepared_dir)[0])
            reports = [r for r in rows if r["task_type"] == "report_generation"]
            judge.judge([r["answer"] for r in reports], [r["prediction"] for r in reports], share=(rank, world))
    barrier()
    if rank == 0:
        for judge in judges:
            judge.merge_shares()


def run(cfg, out_dir: Path) -> dict:
    entries = list(cfg.eval.predictions)
    if not entries:
        raise ValueError("eval.predictions is empty: pass one or more predictions.jsonl files or infer run dirs, "
                         "e.g. eval.predictions=[outputs/runs/demo-infer]")
    adjust_p_values([], cfg.eval.significance.correction)  # an unknown correction fails before any judging
    prepare_gpu_run(cfg)
    scorers = ReportScorers(cfg, out_dir)
    rank, world = ranks()
    if world > 1:  # every rank judges its share of the reports; rank 0 then scores with every judgment journaled
        judge_shares(cfg, scorers, entries, rank, world)
        if rank != 0:
            return {"rank": rank}
    results, samples = {}, {}
    for k, entry in enumerate(entries):
        path = find_predictions(entry)
        label, res, per_sample, rows = evaluate_file(path, scorers, cfg.eval.allow_partial)
        while label in results:  # two runs with the same label stay apart
            label += "'"
        results[label], samples[label] = res, per_sample
        write_scored_sheet(out_dir / ("scored.xlsx" if len(entries) == 1 else f"scored_{k + 1}.xlsx"), rows, label,
                           per_sample, res)
    meaningless = random_scorer_caveats(cfg)  # after scoring: a tiny RadGraph is built on first use
    for res in results.values():
        res["caveats"] = [*res.get("caveats", []), *meaningless]
    write_json(out_dir / METRICS, results)
    summary = flat_summary(results)
    write_json(out_dir / summary_name("eval"), summary)
    sig = cfg.eval.significance
    tests, warnings = compare(results, samples, sig.resamples, sig.seed, sig.ar_trials) \
        if len(results) > 1 else ([], [])
    family = correct_family(tests, sig.correction)
    for warning in warnings:
        log.warning("eval: %s", warning)
    if len(results) > 1:
        write_json(out_dir / "significance.json", {"family": family, "tests": tests, "warnings": warnings})
    intervals = {label: {task: bootstrap_interval(task, stats, cfg.eval.significance.resamples,
                                                  cfg.eval.significance.seed)
                         for task, (_, stats) in per_task.items()} for label, per_task in samples.items()}
    write_reports(out_dir, results, tests, warnings, intervals, family, root=abspath(cfg.paths.output_root))
    log.info("evaluation written to %s", out_dir)  # the run's summary (its official table) is printed at its end
    return {"metrics": str(out_dir / METRICS), "report": str(out_dir / "report.md"), **summary,
            **({"green_batch": scorers.green_batch} if scorers.green_batch else {})}
