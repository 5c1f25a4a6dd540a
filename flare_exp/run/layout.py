"""The file names of a run dir, in one place: every reader and writer of a run (the lifecycle, the catalog, the
sweep report, eval finding its predictions, the stages' summaries) takes them from here.

A run dir holds its record (``config.yaml``: the config that ran; ``run_info.json``; ``fingerprint.json``; the
``DONE`` / ``FAILED`` marker; ``attempts/NN/``; the ``.lock``) and its stage's outputs. A pipeline's run dir holds
one step dir per step (``<run dir>/<step>``), each a run dir of its own.
"""
from __future__ import annotations

from pathlib import Path

CONFIG = "config.yaml"  # the config that ran (sft's card preset applied; run_info.json says what it changed)
RUN_INFO = "run_info.json"
FINGERPRINT = "fingerprint.json"  # what decides a stage's outputs (run/fingerprint.py)
DONE = "DONE"
FAILED = "FAILED"
LOCK = ".lock"
ATTEMPTS = "attempts"
FILED_CHECKPOINTS = "filed_checkpoints.json"  # in attempts/NN/: the checkpoints a resume moved there, and why
HYDRA = ".hydra"  # Hydra's own record of a launch: its composed config and the overrides given
OVERRIDES = "overrides.yaml"
PREDICTIONS = "predictions.jsonl"
RANK_PREDICTIONS = "predictions.rank{rank}.jsonl"  # one per rank of a data-parallel infer, merged at the end
# predictions an earlier attempt made for records a smaller infer.num_samples leaves out: kept, and reused by a
# later attempt that asks for them again
SPARE_PREDICTIONS = "predictions.beyond_num_samples.jsonl"
FOREIGN_PREDICTIONS = "predictions.not_in_split.jsonl"  # journal rows whose id is in no record of the split
LOG_HISTORY = "log_history.json"
METRICS = "metrics.json"
REPORT_HTML = "report.html"
SWEEP_TABLE = "sweep.md"


def summary_name(stage: str) -> str:
    """The summary a stage writes beside its outputs: ``<stage>_summary.json`` (eval's: metrics_summary.json)."""
    return f"{'metrics' if stage == 'eval' else stage}_summary.json"


def own_or_step(run_dir: Path, name: str, steps: tuple[str, ...] = ("eval",)) -> Path | None:
    """``name`` in the run dir itself (a stage's run), else in one of its pipeline steps' dirs, else None."""
    for path in (run_dir / name, *(run_dir / step / name for step in steps)):
        if path.is_file():
            return path
    return None


def predictions_file(path: Path) -> Path | None:
    """The predictions a path stands for: the file itself, an infer run dir's, or a pipeline's infer step's."""
    for candidate in (path, path / PREDICTIONS, path / "infer" / PREDICTIONS):
        if candidate.is_file():
            return candidate
    return None


SWEEP_REPORT_DIR = "report"  # <sweep dir>/report/: the sweep report's, no job
SUBDIR_DEPTH = 6  # how deep a custom hydra.sweep.subdir's job dirs are looked for (a path in an override nests)


def sweep_job_dirs(sweep_dir: Path) -> list[Path]:
    """A sweep's job dirs: each dir named by its number right under it (the default ``hydra.sweep.subdir``,
    whatever Hydra recorded), and each other dir below it, up to SUBDIR_DEPTH deep, that holds Hydra's record of
    a job (``.hydra/``: a custom subdir such as ``seed_${seed}`` or ``${hydra.job.override_dirname}``, whose
    override values may nest the dir). Not below a job dir: a pipeline job's steps are its own."""
    import os

    numbered, named = [], []
    for child in sorted(sweep_dir.iterdir()) if sweep_dir.is_dir() else []:
        if not child.is_dir() or child.name.startswith(".") or child.name == SWEEP_REPORT_DIR:
            continue
        if child.name.isdigit():
            numbered.append(child)
            continue
        for root, dirs, _ in os.walk(child):  # a link to a job dir is followed right under the sweep dir only
            here = Path(root)
            if HYDRA in dirs:
                named.append(here)
                dirs.clear()
            elif len(here.relative_to(sweep_dir).parts) < SUBDIR_DEPTH:
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            else:
                dirs.clear()
    return sorted(numbered, key=lambda p: int(p.name)) + named


def in_a_sweep(run_dir: Path, sweeps: Path) -> bool:
    """Whether ``run_dir`` is a job dir of a sweep under ``sweeps`` (<output root>/sweeps), as sweep_job_dirs
    finds them (made or being made: Hydra writes ``.hydra/`` before the job starts)."""
    try:
        parts = run_dir.relative_to(sweeps).parts
    except ValueError:
        return False
    if len(parts) == 2 and parts[1].isdigit():
        return True
    return 2 <= len(parts) <= SUBDIR_DEPTH + 1 and parts[1] != SWEEP_REPORT_DIR and (run_dir / HYDRA).is_dir()
