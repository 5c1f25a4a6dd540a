"""``stage=runs runs.compare=[a,b]``: chosen runs' official metrics side by side (from each one's eval
metrics.json: a pipeline's or trial's own model, every model an eval run scored by hand) and the paired tests
between every two, on the per-sample statistics of the very predictions each eval scored: a file changed since
(an infer redone with overwrite=true, a sheet edited again) is refused, one whose root moved is found again by
its bytes, and a hand-edited metric that is no number is named."""
from __future__ import annotations

from pathlib import Path

from flare_exp.catalog import (find_run, metrics_file, non_number, official_blocks, own_label, run_summary,
                               shown_label)
from flare_exp.metrics.official import agrees
from flare_exp.run.layout import DONE, FAILED, own_or_step
from flare_exp.run.record import marker


def scored_rows(block: dict) -> list[dict]:
    """The rows of the predictions file a run's eval scored (``scored_file`` found it), read without the
    reader's warnings (which sheet it read, rows it skipped): the eval run said them; a listing or a comparison
    printed them again above its table."""
    import logging

    from flare_exp.data.predictions import load_rows

    readers = logging.getLogger("flare_exp.data")
    level = readers.level
    readers.setLevel(logging.ERROR)  # setLevel, not the attribute: it clears the loggers' cached levels
    try:
        return load_rows(Path(block["file"]), allow_partial=True)[0]
    finally:
        readers.setLevel(level)


def official_stats(rows: list[dict], field: str = "task_type") -> dict:
    """group -> (task, ids, per-sample official statistics) of the rows grouped by ``field`` (task_type, or
    eval's per-dataset blocks); report generation left out (its GREEN scores are the judge's)."""
    from flare_exp.metrics import official

    groups: dict = {}
    for row in rows:
        groups.setdefault(row[field], []).append(row)
    return {name: (group[0]["task_type"], [r["id"] for r in group], official.STATS[group[0]["task_type"]](
        [r.get("prediction", "") for r in group], [r.get("answer", "") for r in group]))
        for name, group in groups.items() if group[0]["task_type"] in official.STATS}


def per_sample_stats(rows: list[dict]) -> tuple[dict, set]:
    """task -> (ids, per-sample official statistics) for the paired tests (the GREEN judge's per-report scores
    are not kept: report generation is left out); and every id the rows hold, reports included (what two runs
    share is counted on those)."""
    return ({task: (ids, values) for task, (_, ids, values) in official_stats(rows).items()},
            {r["id"] for r in rows})


def scored_file(block: dict, key: str, output_root: Path) -> Path:
    """The predictions file the eval scored, as it was then (its sha256 in the block): where the eval found it,
    else the same path's tail under this output root with the same bytes (an output root moved or copied
    elsewhere). A file changed since is refused: its tests would use predictions the eval never scored beside
    the eval's own numbers."""
    from flare_exp.io import file_digest

    recorded, digest = Path(str(block.get("file", ""))), block.get("file_sha256")
    if not digest:  # a metrics.json of an eval that recorded no digest: the path as it is
        if recorded.is_file():
            return recorded
    else:
        parts = recorded.parts
        for candidate in [recorded, *(output_root / Path(*parts[i:]) for i in range(1, len(parts)))]:
            if candidate.is_file() and file_digest(candidate) == digest:
                return candidate
    if recorded.is_file():
        raise ValueError(
            f"runs.compare: {key}: the predictions its eval scored, {recorded}, have changed since (sha256 "
            f"{digest[:12]}... then, {file_digest(recorded)[:12]}... now: an infer redone with overwrite=true, a "
            "sheet edited again): the table would show the eval's numbers and the tests another file's. Rerun "
            "that eval (its command with overwrite=true) to compare the file as it is now")
    raise FileNotFoundError(
        f"runs.compare: {key}: its eval scored {recorded}, which is not there"
        + (f" (nor under {output_root} by the end of that path with the same bytes)" if digest else "")
        + "; the paired tests read each sample's prediction from it. Put it back where it was, or rerun that "
        "eval on where it is now")


def green_values(rows: list[dict], samples: Path | None, field: str) -> dict:
    """group -> FLARE's green_score of its reports, from the judgments eval kept for them (green_samples_*.jsonl:
    each report's judge output, read by the package's parser); {} without them."""
    from flare_exp.io import read_jsonl
    from flare_exp.metrics.green import green_score, parse_package

    try:
        judged = {s["id"]: s["judge_output"] for s in read_jsonl(samples)} if samples else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    groups: dict = {}
    for row in rows:
        if row["task_type"] == "report_generation":
            groups.setdefault(row[field], []).append(row["id"])
    return {name: sum(green_score(parse_package(judged[i])) for i in ids) / len(ids)
            for name, ids in groups.items() if all(isinstance(judged.get(i), str) for i in ids)}


def disagreeing_value(block: dict, rows: list[dict], green_samples: Path | None = None) -> str | None:
    """'task.metric: V in metrics.json, W from the predictions it scored' for the first official number, of a
    task or of a dataset, that its own predictions (for report generation: the judgments eval kept of them) do
    not give (a number edited into metrics.json: the table would show it beside tests of the true one); None
    where they agree. A partial run's numbers (predictions missing: counted by eval over the whole split) are
    not recomputed here."""
    import math

    from flare_exp.io import NON_FINITE
    from flare_exp.metrics.official import OFFICIAL_METRIC, dataset_groups, official_value

    if block.get("partial") or block.get("coverage"):
        return None
    rows = [{**row, DATASET_GROUP: group} for row, group in zip(rows, dataset_groups(rows))]
    for part, field in (("official", "task_type"), ("official_by_dataset", DATASET_GROUP)):
        recomputed = {group: (task, official_value(task, values))
                      for group, (task, _ids, values) in official_stats(rows, field).items()}
        judged = green_values(rows, green_samples, field)
        for group in {r[field] for r in rows if r["task_type"] == "report_generation"}:  # no judgments: UNJUDGED
            recomputed[group] = ("report_generation", judged.get(group, UNJUDGED))
        for group, (task, true) in recomputed.items():
            found = (block.get(part) or {}).get(group)
            said = found.get(OFFICIAL_METRIC[task]) if isinstance(found, dict) else None
            said = NON_FINITE.get(said, said) if isinstance(said, str) else said
            if said is None and (task == "report_generation" or not isinstance(found, dict)):
                continue  # no judge or no FLARE number from the package (its reasons said), or no block written
            if said is None and found.get("aborted") and isinstance(true, float) and math.isnan(true):
                continue  # FLARE's evaluator stops on these rows: no number, as recomputed (NaN)
            if said is not None and true is not UNJUDGED and agrees(said, true):
                continue
            where = group if part == "official" or group.endswith(f"({task})") else f"{group} ({task})"
            given = ("no judgment eval kept (no judge ran: no green_samples file)" if true is UNJUDGED else
                     f"{true!r} from the predictions it scored")
            return f"{where}.{OFFICIAL_METRIC[task]}: {said!r} in metrics.json, {given}"
    return None


UNJUDGED = object()  # a report group without the judgments to recompute its GREEN score from
DATASET_GROUP = "dataset block"  # the key of eval's per-dataset block a row counts in (official.dataset_groups)


def compared_blocks(output_root: Path, name: str, run_dir: Path) -> dict:
    """key -> block of the models a run stands for in the comparison: a pipeline's or trial's own, else every one
    its eval scored (``name:label``); a run without usable metrics is an error saying why."""
    from flare_exp.metrics.scoring import samples_file

    blocks, failed = official_blocks(run_dir, strict=True), own_or_step(run_dir, FAILED)
    if not blocks:
        found = metrics_file(run_dir)
        raise (ValueError if found and not failed else FileNotFoundError)(f"runs.compare: {name} " + (
            f"FAILED: {run_summary(failed.parent)['error']} ({failed}); rerun it" if failed else
            f"has {found}, but it holds no metrics as eval writes them (edited since); rerun that eval" if found else
            "holds no eval metrics.json (an eval run, or a pipeline or trial with an eval step)"))
    own = own_label(blocks, run_dir)  # a pipeline's or trial's own model, not the base/sft it was compared to
    chosen = {own: blocks[own]} if own is not None else blocks
    out = {}
    for label, block in chosen.items():
        key = name if len(chosen) == 1 else f"{name}:{label}"
        edited = non_number(block)
        if edited:
            raise ValueError(f"runs.compare: {key}: {metrics_file(run_dir)} has {edited}, no number: edited since "
                             "its eval wrote it; rerun that eval")
        samples = samples_file(metrics_file(run_dir).parent, "green", label)
        out[key] = {**block, "file": str(scored_file(block, key, output_root)),
                    **({"green_samples": str(samples)} if samples.is_file() else {})}
    return out


def listed_disagreement(run_dir: Path, output_root: Path) -> str | None:
    """For the runs listing: disagreeing_value of the block whose number it shows; None where the numbers agree
    or cannot be recomputed (no eval, predictions moved or changed since: runs.compare names those)."""
    from flare_exp.metrics.scoring import samples_file

    blocks = official_blocks(run_dir)
    if not blocks:
        return None
    label = shown_label(blocks, run_dir)
    samples = samples_file(metrics_file(run_dir).parent, "green", label)
    try:
        rows = scored_rows({"file": str(scored_file(blocks[label], label, output_root))})
        return disagreeing_value(blocks[label], rows, samples if samples.is_file() else None)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def unfinished_eval(name: str, run_dir: Path) -> list[str]:
    eval_dir = metrics_file(run_dir).parent
    if marker(eval_dir) == DONE:
        return []
    return [f"{name}: its eval {eval_dir} " + (  # a killed eval's metrics.json, or an attempt's before a FAILED
        "FAILED: its metrics.json may be an earlier attempt's" if marker(eval_dir) == FAILED else
        "is unfinished (no DONE marker): its metrics may be partial")]


def _read_compared(output_root: Path, name: str, dirs: dict, results: dict, samples: dict, inputs: dict) -> list:
    """One named run's blocks, per-sample statistics and ids read into the comparison; its unfinished-eval notes."""
    run_dir = find_run(output_root, name)
    same = dirs.get(run_dir.resolve())
    if same is not None:  # a link to a run dir, or its path beside its name: one eval, not two
        raise ValueError(f"runs.compare: {same} and {name} are one run dir ({run_dir.resolve()}): name it once")
    dirs[run_dir.resolve()] = name
    for key, block in compared_blocks(output_root, name, run_dir).items():
        results[key] = block
        rows = scored_rows(block)
        samples[key], inputs[key] = per_sample_stats(rows)
        edited = disagreeing_value(block, rows, Path(block["green_samples"]) if "green_samples" in block else None)
        if edited:
            raise ValueError(f"runs.compare: {key}: {edited}: {metrics_file(run_dir)} was edited since its "
                             "eval wrote it; rerun that eval")
    return unfinished_eval(name, run_dir)


def comparison(output_root: Path, names: list[str], resamples: int = 1000, seed: int = 0,
               ar_trials: int = 0, correction: str = "holm") -> list[str]:
    """Markdown: the runs' official metrics side by side, then the paired tests between every two of them."""
    from flare_exp.reports.eval_report import (SIGNIFICANCE_HEADER, official_table, significance_notes,
                                               significance_rows)
    from flare_exp.reports.tables import md_table
    from flare_exp.metrics.significance import compare, correct_family

    results, samples, inputs, unfinished, dirs, problems = {}, {}, {}, [], {}, []
    for name in names:
        try:  # every named run's problem said at once, not the first alone
            unfinished += _read_compared(output_root, name, dirs, results, samples, inputs)
        except (ValueError, FileNotFoundError) as e:
            problems.append(e)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise ValueError(f"runs.compare: {len(problems)} problems:\n" + "\n".join(
            f"  {i}. {str(e).removeprefix('runs.compare: ')}" for i, e in enumerate(problems, 1)))
    tests, warnings = compare(results, samples, resamples, seed, ar_trials, inputs)
    family = correct_family(tests, correction)
    lines = md_table(*official_table(results))
    if tests:
        lines += ["Paired tests (report generation left out: its per-report GREEN scores are in the eval runs' "
                  "scored sheets, not compared here):", "",
                  *md_table(SIGNIFICANCE_HEADER, significance_rows(tests)), *significance_notes(family)]
    return lines + [f"warning: {w}" for w in unfinished + warnings]
