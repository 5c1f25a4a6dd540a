"""eval stage: FLARE's official numbers per task type, our named variants, report-text metrics, GREEN as the
GREEN package computes it; one model, or several side by side with paired significance tests.

``python launch.py stage=eval eval.predictions=[runs/a/infer,runs/b/infer]``: each entry is a predictions.jsonl
or a run dir holding one, or a worksheet (infer's predictions.xlsx, edited by hand: flare_exp/data/sheet_predictions.py). Several entries give a side-by-side comparison (base vs SFT vs RL, or a sweep).
Writes metrics.json (per run: ``official``, FLARE's metric per task type and per dataset under FLARE's names;
``by_task`` / ``by_dataset``, every metric), metrics_summary.json (flat, for sweep reports), significance.json
(comparisons), report.md, report.html, metrics.png, and the GREEN judge's per-sample counts when GREEN runs.
"""
from __future__ import annotations

import logging
from pathlib import Path

from flare_exp.compile_cache import prepare_gpu_run
from flare_exp.data.predictions import find_predictions, load_rows
from flare_exp.fixtures.random_scorers import random_scorer_caveats
from flare_exp.io import write_json
from flare_exp.metrics.scoring import ReportScorers, evaluate_file, flat_summary, scored_rows
from flare_exp.metrics.significance import bootstrap_interval, compare, correct_family, id_order
from flare_exp.reports.eval_report import write_reports
from flare_exp.reports.sheets import write_scored_sheet
from flare_exp.run.layout import METRICS, predictions_file, summary_name
from flare_exp.run.stage import Stage
from flare_exp.runtime import abspath, barrier, ranks

STAGE = Stage(
    name="eval",
    help="FLARE's official metrics, GREEN, RadGraph, ROUGE/BLEU, runs compared side by side",
    reads=("eval.predictions",),
    deciding=("eval",),
    # the predictions are compared by their bytes (fingerprinted), not by where they lie
    free=("eval.predictions", "eval.allow_partial", "eval.green.batch_size", "eval.green.decode_loop",
          "eval.green.decode_attention", "eval.green.shared_prefix", "eval.crimson.batch_size", "eval.crimson.decode_loop",
          "eval.chexbert.batch_size"),
    fingerprinted=("eval.predictions",),
    models_read=("eval.green.model_path", "eval.crimson.model_path"),  # a judge swapped in its folder
    resumable=("green_judgments.jsonl", "green_judgments.rank*.jsonl"),
    ranks="several",
    feeds_from={"eval.predictions": ("infer",)},
    pipeline_step=True,
    reads_doc="`eval.predictions` (one or more: infer run dirs, `predictions.jsonl` or `.xlsx` files)",
    writes_doc=("`metrics.json`, `metrics_summary.json`, `significance.json` (several runs), `report.md`, "
        "`report.html`, `metrics.png`, `scored.xlsx` (each row with its score: correct, label F1, absolute "
        "error, GREEN or ROUGE-L; worst first; several runs: `scored_1.xlsx`, ... in eval.predictions' order, "
        "named in the report's runs table), `green_samples_*.jsonl`, `green_judgments.jsonl`"),
)

log = logging.getLogger(__name__)
EMPTY = ("eval.predictions is empty: pass one or more predictions.jsonl files or infer run dirs, e.g. "
         "eval.predictions=[outputs/runs/demo-infer]")


def check_settings(cfg) -> None:
    """eval.predictions names each predictions file once: the same run twice would be compared with itself
    (every difference 0, every p-value 1) and its sheet written twice under two names. The judge's attention
    settings are checked here, before the judge loads."""
    from flare_exp.data.predictions import other_format
    from flare_exp.data.sheet_predictions import is_sheet
    from flare_exp.models.grouped_attention import SETTINGS
    from flare_exp.runtime import check_choice

    green = cfg.eval.green
    check_choice("eval.green.decode_attention", green.decode_attention, SETTINGS)
    if green.shared_prefix and green.decode_attention != "split_kv":
        raise ValueError(f"eval.green.shared_prefix=true reads the prompts' common beginning apart in the split-KV "
                         f"kernel: also pass eval.green.decode_attention=split_kv (it is {green.decode_attention})")
    if not cfg.eval.predictions and cfg.stage.name == "eval":  # a pipeline fills it from its infer steps
        raise ValueError(EMPTY)
    seen: dict[Path, str] = {}
    for entry in cfg.eval.predictions or ():
        path = abspath(str(entry))
        found = predictions_file(path)
        if found is None and (what := not_predictions(path, str(entry))):
            raise ValueError(f"eval.predictions entry {entry}: {what}")
        if path.is_file() and not is_sheet(path) and (why := other_format(path)):  # a config, a CSV, a submission
            raise ValueError(f"{path}: {why}")
        if found is None and path.is_dir() and cfg.stage.name == "eval":  # a pipeline's infer step comes later
            raise ValueError(f"eval.predictions entry {entry}: no predictions.jsonl or predictions.xlsx there; "
                             "pass an infer run dir or its predictions file")
        if found is not None and (why := unanswered(found)):
            raise ValueError(f"eval.predictions entry {entry}: {why}")
        key = (found or path).resolve()
        if key in seen:
            raise ValueError(f"eval.predictions lists {key} twice ({seen[key]!r} and {str(entry)!r}): name each "
                             "run once")
        seen[key] = str(entry)


def unanswered(path: Path) -> str | None:
    """Predictions of the test split (its first row names split test and has no answer): found before the
    scorers load, not after (FLARE scores the test split from the submission files)."""
    import json

    if path.suffix != ".jsonl":
        return None
    try:
        with path.open(encoding="utf-8") as f:
            first = json.loads(f.readline() or "{}")
    except (OSError, ValueError):
        return None  # read, and named, by the eval itself
    if isinstance(first, dict) and first.get("split") == "test" and first.get("answer") is None:
        return (f"{path} holds predictions of the test split, which has no answers to score here: FLARE scores the "
                "test split from the submission (infer.split=test writes submission/predictions.json); score a val or "
                "train split's predictions")
    return None


def not_predictions(path: Path, entry: str) -> str | None:
    """What a folder given as predictions is instead, with what to pass (a training run, an adapter, a sweep);
    None where it cannot be told (an infer run still to make, in a pipeline, is left to the run)."""
    if not path.is_dir():
        return None
    if (other := other_stages_run(path)):
        return (f"the run dir of a stage={other} run, which holds no predictions; eval scores an infer run's "
                "(stage=infer with infer.checkpoint= pointing at its adapter makes them)")
    if (path / "adapter_config.json").is_file():
        return (f"an adapter (LoRA weights), not predictions: run stage=infer infer.checkpoint={entry} first and "
                "pass that infer run")
    jobs = sorted((p for p in path.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    if (path / "multirun.yaml").is_file() or any(predictions_file(job) for job in jobs):
        shown = ",".join(f"{entry.rstrip('/')}/{job.name}" for job in jobs[:2]) or f"{entry.rstrip('/')}/0"
        return f"a sweep dir: name the jobs whose predictions to score, e.g. eval.predictions=[{shown}]"
    return None


def other_stages_run(path: Path) -> str | None:
    """The stage of the run dir ``path`` when it is another stage's than infer (an sft or rl run given as eval's
    input); None for anything else (an infer run still to make, in a pipeline, is left to the run)."""
    from flare_exp.catalog import stage_of

    stage = stage_of(path)
    return str(stage) if stage and stage != "infer" else None


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
        raise ValueError(EMPTY)
    check_settings(cfg)
    prepare_gpu_run(cfg)
    scorers = ReportScorers(cfg, out_dir)
    rank, world = ranks()
    if world > 1:  # every rank judges its share of the reports; rank 0 then scores with every judgment journaled
        judge_shares(cfg, scorers, entries, rank, world)
        if rank != 0:
            return {"rank": rank}
    results, samples, inputs, paths = {}, {}, {}, {}
    for k, entry in enumerate(entries):
        path = find_predictions(entry)
        label, res, per_sample, rows = evaluate_file(path, scorers, cfg.eval.allow_partial)
        if label in results:  # two files of one run (its jsonl and its sheet, a copy) stay apart, named by file;
            # two runs of one adapter (infer on two splits) by run dir and file
            named = path.name if path.parent == paths[label].parent else f"{path.parent.name}/{path.name}"
            label = f"{label} [{k + 1}: {named}]"
        while label in results:
            label += "'"
        res["scored_sheet"] = "scored.xlsx" if len(entries) == 1 else f"scored_{k + 1}.xlsx"  # in eval.predictions' order
        results[label], samples[label], paths[label] = res, per_sample, path
        inputs[label] = {r["id"] for r in rows}  # every row scored, reports too (samples lack them without a judge)
        write_scored_sheet(out_dir / res["scored_sheet"], rows, label, per_sample, res)
    meaningless = random_scorer_caveats(cfg)  # after scoring: a tiny RadGraph is built on first use
    for res in results.values():  # the scorers' caveats are about reports: only where there are reports
        res["caveats"] = [*res.get("caveats", []),
                          *(meaningless if "report_generation" in res.get("by_task", {}) else [])]
    write_json(out_dir / METRICS, results)
    summary = flat_summary(results)
    write_json(out_dir / summary_name("eval"), summary)
    sig = cfg.eval.significance
    tests, warnings = compare(results, samples, sig.resamples, sig.seed, sig.ar_trials, inputs) \
        if len(results) > 1 else ([], [])
    family = correct_family(tests, sig.correction)
    for warning in warnings:
        log.warning("eval: %s", warning)
    if len(results) > 1:
        write_json(out_dir / "significance.json", {"family": family, "tests": tests, "warnings": warnings})
    intervals = {label: {task: bootstrap_interval(task, stats[id_order(ids)], cfg.eval.significance.resamples,
                                                  cfg.eval.significance.seed)
                         for task, (ids, stats) in per_task.items()} for label, per_task in samples.items()}
    write_reports(out_dir, results, tests, warnings, intervals, family, root=abspath(cfg.paths.output_root))
    log.info("evaluation written to %s", out_dir)  # the run's summary (its official table) is printed at its end
    return {"metrics": str(out_dir / METRICS), "report": str(out_dir / "report.md"), **summary,
            **({"green_batch": scorers.green_batch} if scorers.green_batch else {})}
