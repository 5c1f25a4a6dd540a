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
