"""A sweep's Optuna study as its readers need it: where it is kept (the study file, the journal), how it is
opened again, and how an objective is read from a run's metrics and which way it goes.

The search (flare_exp.optuna_search), its pruner (flare_exp.optuna_pruning), the in-training held-out metric
(flare_exp.rl_monitor.heldout) and the study report (flare_exp.reports.study) all read these; this module reads
none of them.
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)
STUDY_FILE = "optuna_study.json"  # what sweep_report needs to open the study again
JOURNAL = "optuna.journal"
_MINIMISED = ("mean_absolute_error", "mae_parseable", "rmse_parseable", "unparseable")


def direction_of(objective: str) -> str:
    """'<task>.<metric>': minimise errors (FLARE's MAE), maximise everything else."""
    metric = objective.rsplit(".", 1)[-1]
    return "minimize" if metric in _MINIMISED or "error" in metric else "maximize"


def parse_objective(spec: str, key: str = "hydra.sweeper.objectives") -> tuple[str, str]:
    task, _, metric = spec.partition(".")
    if not metric:
        raise ValueError(f"{key}: {spec!r} is not '<task>.<metric>', e.g. "
                         "multi_label.f1_score or report_generation.green_score")
    return task, metric


def check_objective(spec: str, key: str = "hydra.sweeper.objectives") -> None:
    """An objective eval's metrics.json can hold, before any trial runs (a misspelt one would fail every trial
    after its rl, infer and eval): a known task and, for the tasks of fixed metrics, one of their names (the
    report metrics depend on the scorers configured, so any name passes there)."""
    import difflib

    from flare_exp.metrics import official, tasks

    task, metric = parse_objective(spec, key)
    known = sorted(official.OFFICIAL_METRIC)
    if task not in known:
        near = difflib.get_close_matches(task, known, n=1)
        raise ValueError(f"{key}: {spec!r} names no task {task!r}" + (
            f" (did you mean {near[0]}.{metric}?)" if near else f"; the tasks: {', '.join(known)}"))
    if task == "report_generation":
        return
    sample = [{"id": "x", "prediction": "1", "answer": "1", "task_type": task, "dataset": "chestdr"}]
    names = sorted(k for k in {**official.official_block(task, sample, None), **getattr(tasks, f"{task}_metrics")(
        sample)} if k not in ("n", "num_examples", "flare_task_type", "per_label_f1"))
    if metric not in names:
        near = difflib.get_close_matches(metric, names, n=1)
        raise ValueError(f"{key}: {spec!r}: {task} has no metric {metric!r}" + (
            f" (did you mean {task}.{near[0]}?)" if near else "") + f"; its metrics: {', '.join(names)}")


def objective_list(objectives) -> list[str]:
    """hydra.sweeper.objectives as a list: one written without brackets (a string) is one objective, not one per
    character."""
    return [objectives] if isinstance(objectives, str) else [str(o) for o in objectives or []]


def objective_problems(objectives, green_judge: bool = True) -> list[ValueError]:
    """check_objective's refusal of each of a sweeper's objectives (None: a sweeper without them), an empty list,
    and a GREEN objective without a judge (``green_judge``: eval.green.model_path set): every trial would run in
    full, then fail."""
    if objectives is None:
        return []
    specs, problems = objective_list(objectives), []
    if not specs:
        return [ValueError("hydra.sweeper.objectives is empty: name at least one '<task>.<metric>' of eval's "
                           "metrics.json, e.g. [multi_label.f1_score]")]
    twice = sorted({s for s in specs if specs.count(s) > 1})
    if twice:
        problems.append(ValueError(f"hydra.sweeper.objectives names {', '.join(twice)} more than once: each "
                                   "objective once (twice, it made a two-objective study that cannot prune)"))
    for spec in dict.fromkeys(specs):
        try:
            check_objective(spec)
        except ValueError as e:
            problems.append(e)
        else:
            if spec == "report_generation.green_score" and not green_judge:
                problems.append(ValueError("hydra.sweeper.objectives: report_generation.green_score needs the GREEN "
                                           "judge: set eval.green.model_path (or choose other objectives)"))
    return problems


def objective_value(metrics: dict, spec: str) -> float | None:
    """An objective from one run's metrics.json block: FLARE's official number first, then our variants."""
    task, metric = parse_objective(spec)
    for section in ("official", "by_task"):
        value = (metrics.get(section, {}).get(task) or {}).get(metric)
        if value is not None:
            return float(value)
    return None


def open_storage(storage: str | None, sweep_dir: Path):
    """A journal file (default, safe on NFS/Lustre), or a database URL (postgresql://..., mysql://...)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if storage and "://" in storage:
        if storage.startswith("sqlite"):
            log.warning("hydra.sweeper.storage=%s: SQLite locks are unreliable on NFS/Lustre; a journal file "
                        "(the default) is the safe choice on a shared filesystem", storage)
        return storage
    path = journal_path(storage, sweep_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    repair_journal_tail(path)
    return JournalStorage(JournalFileBackend(str(path)))


def journal_path(storage: str | None, sweep_dir: Path) -> Path | None:
    """The study's journal file; None for a database URL."""
    if storage and "://" in storage:
        return None
    return Path(storage) if storage else sweep_dir / JOURNAL


def repair_journal_tail(path: Path) -> None:
    """A sweep killed while Optuna appended to the journal leaves a torn last line; the next append would run
    on from it and make the study unreadable for good. Cut the file back to its last whole line (logged)."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        log.warning("optuna: %s ends in a torn line (%d bytes, a write cut short by a kill): cut back to its "
                    "last whole line", path, len(data) - keep)
        f.truncate(keep)
