"""``stage=runs``: the runs under the output root, listed (name, stage, status, started, duration, headline
metric), and chosen runs' official metrics compared side by side with the paired significance tests
(``runs.compare=[a,b]``). Only reads: each run dir's state comes from its own records (run.record's markers,
run_info.json, config.yaml, the lock), metrics from its eval's metrics.json.

A run's status: DONE (with how an rl run stopped early: the reward-hacking alarm or Optuna's pruner, at step N of
rl.max_steps), FAILED (the first line of its error), "stopped by settings" (FAILED written before the run
started: no run_info.json), running (its lock is held by a live process), stopped (that process is stopped:
SIGSTOP, Ctrl-Z, a suspended job), unfinished (crashed or killed; rerunning its command resumes it), or
interrupted (retried) (an Optuna trial a killed search left running, tried again by its rerun as a new trial).
"""
from __future__ import annotations

import datetime as _dt
import errno
import json
import logging
import os
from pathlib import Path

from flare_exp.run.layout import (CONFIG, DONE, FAILED, FINGERPRINT, HYDRA, METRICS, RUN_INFO, in_a_sweep, own_or_step,
                               sweep_job_dirs)
from flare_exp.run.doubts import done_seconds, info_torn, record_doubts
from flare_exp.run.record import marker

log = logging.getLogger(__name__)
# the official metric a run is known by, in this order of preference
HEADLINE = (("multi_label", "f1_score"), ("classification", "balanced_accuracy"),
            ("report_generation", "green_score"), ("regression", "mean_absolute_error"))


def metrics_file(run_dir: Path) -> Path | None:
    """The eval metrics a run holds: its own (an eval run) or its eval step's (a pipeline, an Optuna trial)."""
    return own_or_step(run_dir, METRICS)


def official_blocks(run_dir: Path, strict: bool = False) -> dict:
    """label -> the official block of every predictions file the run's eval scored (empty without an eval);
    ``strict`` (runs.compare): an unreadable metrics.json is an error naming it, not an empty one."""
    path = metrics_file(run_dir)
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        if strict:
            raise ValueError(f"runs.compare: {path} is unreadable ({why_unreadable(e)}): cut or edited since its "
                             "eval wrote it; rerun that eval") from None
        return {}
    blocks, hollow = blocks_in(data), hollow_blocks(data)
    if strict and hollow and blocks:  # one model of several emptied by hand: not left out without a word
        raise ValueError(f"runs.compare: {path}: the block of {hollow[0]} holds no official metric: edited since "
                         "its eval wrote it; rerun that eval")
    return blocks


def blocks_in(data) -> dict:
    """A parsed metrics.json's blocks shaped as eval writes them (a hand-made or foreign one: only those)."""
    return {k: v for k, v in data.items() if _with_official_metric(v)} if isinstance(data, dict) else {}


def hollow_blocks(data) -> list[str]:
    """The labels of a metrics.json's blocks of a scored file (they name it) whose official part names no metric."""
    return [k for k, v in data.items() if isinstance(v, dict) and "file" in v and not _with_official_metric(v)] \
        if isinstance(data, dict) else []


def _with_official_metric(block) -> bool:
    """A block as eval writes it: its official part names at least one task's official metric."""
    from flare_exp.metrics.official import OFFICIAL_METRIC

    official = block.get("official") if isinstance(block, dict) else None
    return isinstance(official, dict) and any(isinstance(found, dict) and OFFICIAL_METRIC.get(task) in found
                                              for task, found in official.items())


def own_label(blocks: dict, run_dir: Path | None) -> str | None:
    """The label of a run's own model among those its eval scored: in a pipeline (a sweep job, an Optuna trial)
    the block of the predictions its own infer step wrote (stage.compare's models are scored beside it); None where
    no block is (an eval run of inputs given by hand)."""
    if run_dir is not None:
        own = (Path(run_dir) / "infer").resolve()
        for label, block in blocks.items():
            if isinstance(block, dict) and Path(str(block.get("file", ""))).resolve().parent == own:
                return label
    return None


def own_block(blocks: dict, run_dir: Path | None = None) -> dict:
    """The metrics block of a run's own model (own_label); else the last (an eval's inputs in the order given).
    Empty where there is none."""
    return blocks[shown_label(blocks, run_dir)] if blocks else {}


def non_number(block: dict) -> str | None:
    """'task.metric=value' of the first official metric (by_dataset too) that is no number (a hand-edited
    metrics.json): not a number, null (a metric not computed) or a non-finite one as the project writes it."""
    from flare_exp.io import NON_FINITE
    from flare_exp.metrics.official import OFFICIAL_METRIC

    for part in ("official", "official_by_dataset"):
        for where, metrics in (block.get(part) or {}).items():
            for metric in OFFICIAL_METRIC.values():
                value = metrics.get(metric) if isinstance(metrics, dict) else None
                if value is None or (isinstance(value, str) and value in NON_FINITE) or (
                        isinstance(value, (int, float)) and not isinstance(value, bool)):
                    continue
                return f"{part}.{where}.{metric}={value!r}"
    return None


def why_unreadable(error: Exception) -> str:
    """A file's read or parse error in a line (a JSON error's own first line, else its type)."""
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def headline(run_dir: Path) -> str | None:
    """The run's number (HEADLINE's first official metric it has); of an eval that scored several models by hand,
    the last one's, named (the listing has one column: runs.compare shows them all)."""
    from flare_exp.reports.tables import fmt

    blocks = official_blocks(run_dir)
    if not blocks:
        return training_headline(run_dir)
    own = own_label(blocks, run_dir)
    label = shown_label(blocks, run_dir)
    edited = non_number(blocks[label])
    if edited:
        return f"{edited}: no number ({metrics_file(run_dir).name} edited since its eval wrote it; rerun that eval)"
    for task, metric in HEADLINE:
        found = blocks[label].get("official", {}).get(task)
        value = found.get(metric) if isinstance(found, dict) else None
        if value is None and isinstance(found, dict) and found.get("aborted"):  # FLARE's evaluator stops: no number
            value = "aborted (FLARE's evaluator stops on a NaN or infinite value)"
        if value is not None:  # a number of part of the split says so (a partial run, a cut file)
            part = " (partial)" if blocks[label].get("partial") or blocks[label].get("coverage") else ""
            if own is None and len(blocks) > 1:
                part += f" (of {label}, the last of {len(blocks)} models scored)"
            if marker(metrics_file(run_dir).parent) != DONE:  # a killed eval's (or an earlier attempt's) file
                part += " (its eval unfinished)"
            return f"{task}.{metric}={fmt(value)}{part}"
    return None


# a training run without an eval: its summary's number, and what it is (no official metric: not ranked by it)
TRAINING_HEADLINE = (("rl", "reward_last", "mean reward, last quarter of the steps"),
                     ("sft", "last_loss", "last logged training loss"))


def training_headline(run_dir: Path) -> str | None:
    """An rl or sft run's (or a pipeline's step's, where it has no eval) own number, named."""
    from flare_exp.reports.tables import fmt
    from flare_exp.run.layout import summary_name

    for stage, key, what in TRAINING_HEADLINE:
        found = own_or_step(run_dir, summary_name(stage), (stage,))
        value = _read_json(found).get(key) if found is not None else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return f"{stage}.{key}={fmt(value)} ({what})"
    return None


def shown_label(blocks: dict, run_dir: Path | None) -> str:
    """The label of the block whose number the listing shows: the run's own model's, else the last scored."""
    own = own_label(blocks, run_dir)
    return own if own is not None else list(blocks)[-1]


def _read_json(path: Path) -> dict:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}  # a hand-edited list or number: nothing read, no crash


def stage_of(run_dir: Path) -> str | None:
    """The stage a run dir's fingerprint recorded as it ran, else the one its config.yaml names (a pipeline, which
    records no fingerprint; a refused launch: its .hydra/config.yaml); None if none does."""
    from omegaconf import OmegaConf

    recorded = _read_json(run_dir / FINGERPRINT).get("stage")
    if isinstance(recorded, str) and recorded:
        return recorded
    for saved in (run_dir / CONFIG, run_dir / HYDRA / CONFIG):  # the latter: a refused launch
        try:
            return OmegaConf.select(OmegaConf.load(saved), "stage.name")
        except Exception:  # noqa: BLE001  (missing, cut or hand-broken: the listing goes on)
            continue
    return None


def _live_status(run_dir: Path) -> str:
    """running (a live process holds its lock), stopped (that process is stopped: SIGSTOP, Ctrl-Z, a suspended
    job; it goes on when continued) or unfinished."""
    from flare_exp.run.lock import RunLock, holder_stopped

    holder = RunLock(run_dir).live_holder()
    if holder is None:
        return "unfinished"
    return f"stopped (pid {holder.get('pid')}: kill -CONT to go on)" if holder_stopped(holder) else "running"


def run_summary(run_dir: Path) -> dict | None:
    """One run dir's row: name, stage, status, started, seconds, headline, error; None for a dir that is no run."""
    info = _read_json(run_dir / RUN_INFO)
    found = marker(run_dir)
    torn_info = info_torn(run_dir)  # cut or hand-broken: the run started all the same
    if not info and found is None and not torn_info:
        return None
    started = info.get("started") if isinstance(info.get("started"), str) else None
    try:
        _dt.datetime.fromisoformat(started) if started else None
    except ValueError:  # hand-edited: no time, not a crash of the whole listing
        started = None
    seconds, error, note = None, None, None
    if found == DONE:
        status, seconds = DONE, done_seconds(run_dir)
        note = stopped_early(run_dir)
    elif found == FAILED:
        text = (run_dir / FAILED).read_text(errors="replace").strip()
        error = next((line for line in text.splitlines() if line.strip()), "")[:200]
        status = FAILED if info or torn_info else "stopped by settings"
        if started:
            seconds = (run_dir / FAILED).stat().st_mtime - _dt.datetime.fromisoformat(started).timestamp()
    else:
        status = _live_status(run_dir)
        if started and status != "unfinished":
            seconds = _dt.datetime.now().timestamp() - _dt.datetime.fromisoformat(started).timestamp()
    stage = stage_of(run_dir)  # the fingerprint's, else config.yaml's: read once per row
    metrics, unreadable, metric = metrics_file(run_dir), None, None
    if metrics is not None:  # a torn or hand-broken metrics.json: said, not an empty metric beside a plain DONE
        try:
            data = json.loads(metrics.read_text())
            if not isinstance(data, dict):
                raise ValueError("not an object of metrics blocks")
            if not blocks_in(data):
                raise ValueError("no block of official metrics in it")
            hollow = hollow_blocks(data)
            if hollow:
                raise ValueError(f"the block of {hollow[0]} holds no official metric")
        except (OSError, ValueError) as e:
            unreadable = f"{metrics.relative_to(run_dir)} unreadable"
            metric = (f"{unreadable} ({why_unreadable(e)}): cut or edited since its eval wrote it; rerun "
                      "that eval")
    elif marker(scored := run_dir if stage == "eval" else run_dir / "eval") == DONE:
        unreadable = f"{(scored / METRICS).relative_to(run_dir)} missing"
        metric = f"{unreadable}: deleted since its eval wrote it; rerun that eval"
    note = "; ".join(n for n in (note, *record_doubts(run_dir, found, torn_info)) if n) or None
    earlier = continued_attempts(run_dir)
    known = seconds is not None and None not in earlier  # a killed attempt (kill -9: no FAILED) has no end time
    return {"name": run_dir.name, "stage": stage or "?", "status": status, "started": started,
            "seconds": seconds + sum(earlier) if known else seconds, "attempts": 1 + len(earlier),
            "all_attempts_timed": known, "headline": metric or headline(run_dir), "error": error,
            "metrics_unreadable": unreadable, "note": note}


def stopped_early(run_dir: Path) -> str | None:
    """How a finished rl run (or a pipeline's rl step) ended short of rl.max_steps, stopped by the reward-hacking
    alarm or Optuna's pruner (its rl_summary.json's stopped_early), else None: such a run is DONE, and a plain
    DONE read as one that trained all its steps."""
    from flare_exp.rl_monitor.reward_summary import stop_note
    from flare_exp.run.layout import summary_name

    found = own_or_step(run_dir, summary_name("rl"), ("rl",))
    return stop_note(_read_json(found) if found is not None else {})


def continued_attempts(run_dir: Path) -> list[float | None]:
    """The seconds of each earlier attempt this run continued (a kill, a preemption, then the same command: its
    record alone was filed in attempts/NN/, its checkpoints stayed), newest first, back to one it did not continue
    (a finished run or one overwrite=true filed away whole, with its outputs); None for one killed without a
    FAILED marker (kill -9, a node lost), whose end is not known."""
    from flare_exp.run.layout import FILED_CHECKPOINTS, FINGERPRINT
    from flare_exp.run.record import attempt_numbers

    record_only = {CONFIG, RUN_INFO, FAILED, FINGERPRINT, HYDRA}
    seconds = []
    for number in sorted(attempt_numbers(run_dir), reverse=True):
        attempt = run_dir / "attempts" / f"{number:02d}"
        names = {p.name for p in attempt.iterdir()} if attempt.is_dir() else set()
        names -= {FILED_CHECKPOINTS, *_read_json(attempt / FILED_CHECKPOINTS)}  # a resume filed them: no output
        if not names:  # only checkpoints a resume filed (their names taken in the attempt before): no attempt
            continue
        started = _read_json(attempt / RUN_INFO).get("started")
        if RUN_INFO not in names or not names <= record_only:
            break
        try:
            ended = (attempt / FAILED).stat().st_mtime if FAILED in names else None
            seconds.append(max(0.0, ended - _dt.datetime.fromisoformat(started).timestamp()) if ended else None)
        except (OSError, ValueError, TypeError):
            seconds.append(None)
    return seconds


def run_dirs(output_root: Path) -> list[tuple[str, Path]]:
    """(name relative to the output root, dir) of every run: runs/<name>, sweeps/<sweep>/<job>; a run linked under
    another name once."""
    found = []
    for path in sorted((output_root / "runs").glob("*")) if (output_root / "runs").is_dir() else []:
        found.append((path.name, path))
    for sweep in sorted((output_root / "sweeps").glob("*")) if (output_root / "sweeps").is_dir() else []:
        if sweep.is_dir():
            found += [(f"sweeps/{sweep.name}/{job.relative_to(sweep)}", job) for job in sweep_job_dirs(sweep)]
    # a link to a run dir listed already (or to one outside, linked twice) is that run, not a second one
    real = {path.resolve() for _, path in found if not path.is_symlink()}
    kept, seen = [], set()
    for name, path in found:
        if path.is_dir() and not (path.is_symlink() and (path.resolve() in real or path.resolve() in seen)):
            kept.append((name, path))
            seen.add(path.resolve())
    return kept


def listed_under(run_dir: Path, output_root: Path) -> bool:
    """Whether ``run_dirs(output_root)`` lists run_dir (made or not yet): runs/<name>, sweeps/<sweep>/<job>."""
    return run_dir.parent == output_root / "runs" or in_a_sweep(run_dir, output_root / "sweeps")


def duration(seconds) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def listing(output_root: Path, recheck=None) -> tuple[list[str], list[list[str]]]:
    """The runs table; ``recheck(run_dir)``: why a finished run's shown number is not what its own predictions
    give (a number edited into metrics.json), or None; said in place of that number."""
    rows, retried = [], {}
    for name, path in run_dirs(output_root):
        row = run_summary(path)
        if row is None:
            continue
        if row["status"] == "unfinished" and name.startswith("sweeps/"):  # an Optuna trial a rerun retried?
            from flare_exp.reports.study import RETRIED, retried_trials

            if path.parent not in retried:
                retried[path.parent] = retried_trials(path.parent)
            if path.name in retried[path.parent]:
                row["status"] = f"{RETRIED}: the search's rerun tried it again as a new trial"
        if recheck is not None and row["headline"] and not row["metrics_unreadable"] and "no number" not in \
                row["headline"] and (edited := recheck(path)):
            row["headline"] = f"{edited}: {metrics_file(path).name} edited since its eval wrote it; rerun that eval"
        status = row["status"] + (f": {row['error']}" if row["error"] and row["status"] != DONE else "")
        if row["metrics_unreadable"] and row["status"] == DONE:  # the why: in the headline column
            status += f" ({row['metrics_unreadable']})"
        if row["note"]:  # DONE short of its steps: the row says so
            status += f" ({row['note']})"
        attempts = "" if row["attempts"] == 1 else f" ({row['attempts']} attempts)" if row["all_attempts_timed"] \
            else f" (the last of {row['attempts']} attempts: an earlier one was killed, its time unknown)"
        rows.append([name, row["stage"], status[:90], (row["started"] or "").replace("T", " "),
                     duration(row["seconds"]) + attempts, row["headline"] or ""])
    for link in dangling_links(output_root):  # a run dir on purged scratch: said, not dropped without a word
        try:
            link.resolve(strict=True)
            loop = False
        except RuntimeError:  # links that lead back to each other (Python 3.11 says so with RuntimeError)
            loop = True
        except OSError as e:
            loop = e.errno == errno.ELOOP
        rows.append([link.name, "?", "a link that leads back to itself (a loop of links)" if loop else
                     "a link to nothing (its target purged or unmounted)", "", "",
                     f"{os.readlink(link)} " + ("leads back round" if loop else "does not exist")])
    return ["run", "stage", "status", "started", "duration", "headline metric"], rows


def dangling_links(output_root: Path) -> list[Path]:
    """runs/<name> entries that are symbolic links to nothing (scratch storage purged, a disk unmounted)."""
    runs = output_root / "runs"
    return [p for p in sorted(runs.glob("*")) if p.is_symlink() and not p.exists()] if runs.is_dir() else []


def find_run(output_root: Path, name: str) -> Path:
    """A run named as the listing names it (or a path)."""
    for candidate in (output_root / "runs" / name, output_root / name, Path(name)):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"runs.compare: no run {name!r} under {output_root} (python launch.py stage=runs "
                            "lists them)")
