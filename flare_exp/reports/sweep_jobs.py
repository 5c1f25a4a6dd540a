"""A sweep's jobs as its report sees them: each job dir's overrides, status, final numbers and reward curve,
and the jobs ranked by one metric."""
from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from flare_exp.io import NON_FINITE
from flare_exp.run.layout import (CONFIG, HYDRA, LOG_HISTORY, METRICS, OVERRIDES, own_or_step, summary_name,
                               sweep_job_dirs)
from flare_exp.run.record import marker
from flare_exp.rl_monitor.reward_summary import stop_note
from flare_exp.run.stage import declared_stages
from flare_exp.sweep_launch import launched_jobs, not_of_latest_launch, override_pairs

TRAINED = tuple(name for name, s in declared_stages().items() if s.trains)  # their summaries hold a job's numbers
LOWER_IS_BETTER = ("mean_absolute_error", "loss", "mae", "rmse", "seconds")
# how a job was launched (a rerun's overwrite=true, a search's own trial keys), not what it ran: no column
LAUNCH_KEYS = ("overwrite", "resume", "rl.optuna_trial", "rl.optuna_study")


def collect(sweep_dir: Path) -> list[dict]:
    """Every job dir of the sweep: its settings (the command line's, each swept key's value filled from the job's
    own config where its command line left it out), status, numbers; a job the sweep dir's latest launch did not
    make (its .launch.json) is marked: an earlier launch's, left out of the ranking."""
    jobs = _read_jobs(sweep_dir)
    launched = launched_jobs(sweep_dir)
    for job in jobs:
        raw = job.pop("raw_overrides")
        why = not_of_latest_launch(job_number(Path(job["dir"])), raw, launched, Path(job["job"]).as_posix()) \
            if launched is not None else None
        if why:
            job["earlier_launch"] = True
            job["error"] = (f"{job.get('error', '')}; " if job.get("error") else "") + (
                f"made by an earlier launch into this sweep dir ({why}): left out of the ranking")
    fill_settings(jobs)
    return jobs


def job_number(job_dir: Path) -> str:
    """The job's number in its sweep (hydra.job.num, as Hydra recorded it: a custom hydra.sweep.subdir names the
    dir otherwise), else the dir's name."""
    try:
        return str(yaml.safe_load((job_dir / HYDRA / "hydra.yaml").read_text())["hydra"]["job"]["num"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return job_dir.name


def fill_settings(jobs: list[dict]) -> None:
    """The launch keys dropped; every key some job's command line set, filled in for the others from their own
    config (a job of another launch ran the default: its cell showed blank, as if the same)."""
    for job in jobs:
        job["overrides"] = {k: v for k, v in job["overrides"].items() if k.lstrip("+~") not in LAUNCH_KEYS}
    keys = {k for job in jobs for k in job["overrides"]}
    for job in jobs:
        for key in keys - set(job["overrides"]):
            value = config_value(Path(job["dir"]), key.lstrip("+~"))
            if value is not None:
                job["overrides"][key] = value


def config_value(job_dir: Path, key: str) -> str | None:
    """``key``'s value in the config a job ran with (its .hydra/config.yaml, else its config.yaml), as text; None
    where neither is readable or the key is not there."""
    from omegaconf import OmegaConf

    for path in (job_dir / HYDRA / "config.yaml", job_dir / CONFIG):
        try:
            value = OmegaConf.select(OmegaConf.load(path), key, throw_on_missing=False)
        except Exception:  # noqa: BLE001  (not there, cut, or an interpolation that does not resolve alone)
            continue
        if value is not None:
            return str(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)
    return None


def _read_jobs(sweep_dir: Path) -> list[dict]:
    jobs = []
    for job_dir in sweep_job_dirs(sweep_dir):  # numbered dirs, and the others that hold .hydra/
        job = {"job": str(job_dir.relative_to(sweep_dir)), "dir": str(job_dir), "status": marker(job_dir) or "unfinished",
               "metrics": {}, "curve": []}
        overrides = _overrides(job_dir, job)
        job.update(overrides=override_pairs(overrides), raw_overrides=overrides)
        history = own_or_step(job_dir, LOG_HISTORY, steps=("rl",))
        logged = _read(history, job, job_dir) if history is not None else None  # read once: curve, checks
        logged = logged if isinstance(logged, list) else None
        for sub in ("", *TRAINED):  # a stage's job, or a pipeline job's steps
            for name in map(summary_name, TRAINED):
                summary = _read(job_dir / sub / name, job, job_dir) if (job_dir / sub / name).exists() else None
                if not isinstance(summary, dict):
                    continue
                edited = edited_rewards(summary, logged if history == job_dir / sub / LOG_HISTORY else None)
                if edited:  # a reward typed into the summary: not ranked as the job's own
                    _note(job, f"{sub or '.'}/{name}: {edited}: edited since its run wrote it; its reward numbers left "
                               "out of the table and the ranking")
                    summary = {k: v for k, v in summary.items() if not is_reward_number(k)}
                job["metrics"].update(summary)
        official = official_metrics(job_dir, job)
        edited = edited_metrics(job_dir, sweep_dir) if official else None
        if edited:  # a number typed into metrics.json: not ranked as the job's own
            _note(job, f"{edited}: metrics.json edited since its eval wrote it, left out of the ranking; rerun that eval")
            official = {}
        job["metrics"].update(official)
        if logged is not None:
            job["curve"] = [(h["step"], h["reward"]) for h in logged if isinstance(h, dict) and "reward" in h]
            job["metrics"].update(run_term_means(logged))
        job["metrics"] = {k: NON_FINITE.get(v, v) if isinstance(v, str) else v for k, v in job["metrics"].items()}
        if job["status"] == "FAILED":
            from flare_exp.sweep_watch import failed_line

            _note(job, (failed_line(job_dir, 200) or "FAILED (its marker is empty)"), first=True)
        elif job["status"] == "DONE":  # the alarm's or the pruner's stop (its rl_summary.json, read above)
            job["stopped_early"] = stop_note(job["metrics"])
        _note_doubts(job, job_dir)
        jobs.append(job)
    return jobs


def _note(job: dict, text: str, first: bool = False) -> None:
    """One more thing said in the job's error column (its first line first: a FAILED job's why)."""
    said = [text, job["error"]] if first and job.get("error") else [job["error"], text] if job.get("error") else [text]
    job["error"] = "; ".join(said)


def _read(path: Path, job: dict, job_dir: Path):
    """A job file's JSON; None, said in the job's error column, where it is cut or unreadable (one damaged job
    does not stop the report of the others)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        _note(job, f"{path.relative_to(job_dir)} unreadable ({type(e).__name__}): cut or edited since its run wrote "
                   "it; its numbers left out of the table and the ranking")
        return None


def _overrides(job_dir: Path, job: dict) -> list:
    """The job's command line as Hydra recorded it (.hydra/overrides.yaml); [] and said where there is none."""
    path = job_dir / HYDRA / OVERRIDES
    try:
        found = yaml.safe_load(path.read_text()) if path.exists() else None
    except (OSError, yaml.YAMLError):
        found = None
    if not isinstance(found, list):
        _note(job, f"{HYDRA}/{OVERRIDES} " + ("unreadable" if path.exists() else "missing (copied without its dot-dirs?)")
              + ": its command line is not known; its settings read from its config")
        return []
    return found


def _note_doubts(job: dict, job_dir: Path) -> None:
    """What in the job's record is not as its run left it (run.doubts.record_doubts: run_info.json cut, DONE typed
    over, config.yaml edited), said as stage=runs says it."""
    from flare_exp.run.doubts import record_doubts

    for doubt in record_doubts(job_dir, marker(job_dir)):
        _note(job, doubt)


def is_reward_number(key: str) -> bool:
    return key.startswith(("reward", "rewards/")) and key != "reward_note"


def edited_rewards(summary: dict, history: list | None) -> str | None:
    """'key: V, W from its log_history.json' for the first reward number of a GRPO run's summary that its logged
    steps (``history``: the log_history.json beside it) do not give; None where they agree or there is no log
    to recompute from."""
    from flare_exp.metrics.official import agrees
    from flare_exp.rl_monitor.reward_summary import summarise

    if "reward_last" not in summary or history is None:
        return None
    try:
        recomputed = summarise(history, summary.get("global_step"))
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    for key, true in recomputed.items():
        said = summary.get(key)
        said = NON_FINITE.get(said, said) if isinstance(said, str) else said
        if not is_reward_number(key) or not isinstance(true, (int, float)) or isinstance(true, bool):
            continue
        if not isinstance(said, (int, float)) or isinstance(said, bool) or not agrees(said, true):
            return f"{key} {said!r}, {true!r} from its log_history.json"
    return None


def edited_metrics(job_dir: Path, sweep_dir: Path) -> str | None:
    """Why the job's own official numbers are not what its predictions give (runs_compare's recomputation, as
    the runs listing does); None where they agree or cannot be recomputed."""
    from flare_exp.runs_compare import listed_disagreement

    return listed_disagreement(job_dir, sweep_dir.parent.parent)  # sweeps/<name>/: the output root above


def official_metrics(job_dir: Path, job: dict | None = None) -> dict:
    """FLARE's official numbers of the job's own model (catalog.own_block: not a model stage.compare scored beside
    it), as official/<task>/<metric>."""
    from flare_exp.catalog import own_block

    path = own_or_step(job_dir, METRICS)
    found = _read(path, {} if job is None else job, job_dir) if path is not None else None
    if not isinstance(found, dict):
        return {}
    own = own_block(found, job_dir)
    return {f"official/{task}/{k}": v for task, block in own.get("official", {}).items() for k, v in block.items()
            if (isinstance(v, (int, float)) or v in NON_FINITE) and k not in ("num_examples",)}


RUN_MEAN = "reward_term_all/"  # a term's mean over the whole run (reward_term/* in rl_summary.json: the last quarter)


def run_term_means(history: list[dict]) -> dict:
    """Each reward term's mean over every logged step of the run, as reward_term_all/<task>/<term> (the summary's
    reward_term/* are last-quarter means, null for a term whose task had no prompt in the last batches)."""
    sums: dict[str, list[float]] = {}
    for h in history:
        for k, v in h.items():
            if k.startswith("reward_term/") and isinstance(v, (int, float)):
                sums.setdefault(RUN_MEAN + k.removeprefix("reward_term/"), []).append(v)
    return {k: round(sum(v) / len(v), 4) for k, v in sums.items()}


def varying_keys(jobs: list[dict]) -> list[str]:
    return sorted({k for j in jobs for k in j["overrides"] if len({jj["overrides"].get(k) for jj in jobs}) > 1})


def rank_key(jobs: list[dict], setting: str | None) -> str | None:
    """The metric the jobs are ranked by: sweep_report.rank_by, else the first official metric, else reward_last."""
    known = {k for j in jobs for k in j["metrics"]}
    if setting and setting not in known and f"official/{setting.replace('.', '/', 1)}" in known:
        setting = f"official/{setting.replace('.', '/', 1)}"  # task.metric, as objectives and the listing name it
    if setting:
        if setting not in known:
            raise ValueError(f"sweep_report.rank_by={setting}: no job has it; choose one of {', '.join(sorted(known))}")
        return setting
    return next((k for k in sorted(known) if k.startswith("official/")), "reward_last" if "reward_last" in known
                else None)


def lower_is_better(key: str) -> bool:
    return any(part in key for part in LOWER_IS_BETTER)


def reward_caveat(jobs: list[dict], key: str | None) -> str:
    """Said under the ranking when jobs with other reward weights are ranked by their own reward."""
    reward_keys = {k for j in jobs for k in j["overrides"] if k.startswith("reward.")}
    if key != "reward_last" or not any(len({j["overrides"].get(k) for j in jobs}) > 1 for k in reward_keys):
        return ""
    return (" Each job's reward is computed with its own reward weights, so jobs whose weights differ are not "
            "comparable by it: evaluate each job (stage.steps=[rl,infer,eval]) and rank by an official metric.")


def ranks_by(job: dict, key: str | None) -> bool:
    """A finished job of the latest launch with a finite ``key``: a NaN or infinite value (a diverged run) is no
    score to rank by."""
    value = job["metrics"].get(key)
    return (job["status"] == "DONE" and not job.get("earlier_launch") and isinstance(value, (int, float))
            and math.isfinite(value))


def tie_breakers(jobs: list[dict], key: str | None) -> list[str]:
    """The other official metrics, in name order: jobs equal on ``key`` are ordered by them in turn."""
    return sorted({k for j in jobs for k in j["metrics"] if k.startswith("official/") and k != key})


def _oriented(job: dict, key: str) -> float:
    """``key``'s value with the best lowest (missing, NaN or infinite: last)."""
    value = job["metrics"].get(key)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return math.inf
    return value if lower_is_better(key) else -value


def ranked(jobs: list[dict], key: str | None) -> list[dict]:
    """Finished jobs with a finite ``key`` best first (lowest first for errors), equal ones by the other official
    metrics in turn (tie_breakers), then job order; then the others in job order (NaN and infinite values among
    them, shown as they are)."""
    if key is None:
        return jobs
    order = [key, *tie_breakers(jobs, key)]
    scored = sorted((j for j in jobs if ranks_by(j, key)), key=lambda j: [_oriented(j, k) for k in order])
    return scored + [j for j in jobs if j not in scored]
