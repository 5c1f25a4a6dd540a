"""FLARE's official numbers, computed by the rules of FLARE's public evaluator (the script that scores
leaderboard submissions), so a number we write equals the one FLARE would, with the exceptions that
docs/metrics.md's conformance table names.

FLARE groups predictions by task type across datasets (chestdr and periapical pool into one multi-label
number) and reads the answers as they are, without any parsing of free text:

- classification: balanced accuracy (scikit-learn's) on ``str(x).strip().lower()`` (a missing answer is "");
  the mean recall over the classes present in the ground truth.
- multi-label: micro F1 over pooled true / false positives and false negatives; labels are the pieces of
  ``re.split('[;,]')``, stripped and lower-cased, empties dropped (so periapical's comma-containing label
  becomes several). A pair whose prediction or answer is not a string is left out. No label anywhere: 0.
- regression: the mean absolute error (scikit-learn's) of ``float(prediction)`` against ``float(answer)``; one
  value that ``float()`` refuses ("22.9%", "about 20", a null, an integer too large for a float) makes it
  infinite, whatever else is there; otherwise one value that reads as NaN or infinity ("nan", "inf", "1e400")
  stops FLARE's evaluator (scikit-learn rejects it): the block then reports that abort and the rows' ids, and
  no number.
- report generation: the GREEN package's mean score (``flare_exp.metrics.green``), None where the package gives
  none (``flare_exp.metrics.green.official_green``).

``per_sample_stats`` + ``aggregate`` express each metric as per-sample statistics and their aggregate, which
the paired significance tests (``flare_exp.metrics.significance``) resample.
"""
from __future__ import annotations

import math
import re

import numpy as np

OFFICIAL_METRIC = {"classification": "balanced_accuracy", "multi_label": "f1_score",
                   "regression": "mean_absolute_error", "report_generation": "green_score"}
# FLARE's own name of each group (its TaskType, lower-cased)
FLARE_TASK_TYPE = {"classification": "classification", "multi_label": "multi-label classification",
                   "regression": "regression", "report_generation": "report_generation"}
LOWER_IS_BETTER = {"mean_absolute_error"}


def dataset_groups(rows: list[dict]) -> list[str]:
    """Each row's per-dataset block (our addition beside FLARE's per-task numbers): its dataset, or "dataset (task
    type)" where the file holds rows of several task types for it (prepare keeps a record whose TaskType differs
    from its dataset's): each block is scored by its own task's rule, whatever the rows' order."""
    types: dict[str, set] = {}
    for row in rows:
        types.setdefault(row["dataset"], set()).add(row["task_type"])
    return [row["dataset"] if len(types[row["dataset"]]) == 1 else f"{row['dataset']} ({row['task_type']})"
            for row in rows]


def agrees(said: float, true: float) -> bool:
    """Whether a number is the recomputed one (to rounding: 2/3 summed two ways; an infinite or NaN one exactly)."""
    if math.isnan(said) or math.isnan(true):
        return math.isnan(said) and math.isnan(true)
    if math.isinf(said) or math.isinf(true):
        return said == true
    return abs(said - true) <= 1e-9 * max(1.0, abs(true))


def flare_text(value) -> str:
    return "" if value is None else str(value).strip().lower()


def flare_labels(value) -> set[str]:
    return {piece.strip().lower() for piece in re.split(r"[;,]", value) if piece.strip()}


def flare_float(value) -> float | None:
    """``float(value)``, or None where it raises (FLARE's evaluator catches any exception and then gives
    infinity): text that is not a number, a null, and an integer too large for a float (OverflowError)."""
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return None


def classification_stats(preds: list, golds: list) -> np.ndarray:
    """Per sample: (gold class index, correct)."""
    golds, preds = [flare_text(g) for g in golds], [flare_text(p) for p in preds]
    classes = {c: i for i, c in enumerate(sorted(set(golds)))}
    return np.array([[classes[g], float(p == g)] for p, g in zip(preds, golds)], dtype=float).reshape(-1, 2)


def multi_label_stats(preds: list, golds: list) -> np.ndarray:
    """Per sample: (true positives, false positives, false negatives); zeros for a pair FLARE leaves out."""
    rows = []
    for p, g in zip(preds, golds):
        if not (isinstance(p, str) and isinstance(g, str)):
            rows.append([0.0, 0.0, 0.0])
            continue
        pred, gold = flare_labels(p), flare_labels(g)
        rows.append([len(pred & gold), len(pred - gold), len(gold - pred)])
    return np.array(rows, dtype=float).reshape(-1, 3)


def regression_stats(preds: list, golds: list) -> np.ndarray:
    """Per sample: the absolute error, +inf where either side does not parse with float(), NaN where a side
    reads as NaN or infinity (FLARE's evaluator stops there; an aggregate with it is undefined)."""
    out = []
    for p, g in zip(preds, golds):
        pv, gv = flare_float(p), flare_float(g)
        if pv is None or gv is None:
            out.append(math.inf)
        else:
            out.append(abs(pv - gv) if math.isfinite(pv) and math.isfinite(gv) else math.nan)
    return np.array(out, dtype=float).reshape(-1, 1)


def regression_outcome(rows: list[dict]) -> dict:
    """FLARE's regression outcome for rows (``prediction``, ``answer``, ``id``), in its evaluator's order: a
    value float() refuses gives infinity; else a NaN or infinite value stops the evaluator (scikit-learn's
    finiteness check), reported with the rows' ids; else the MAE."""
    name = OFFICIAL_METRIC["regression"]
    preds = [flare_float(r.get("prediction", "")) for r in rows]
    golds = [flare_float(r.get("answer", "")) for r in rows]
    unread = sum(p is None or g is None for p, g in zip(preds, golds))
    if unread:
        return {name: math.inf, "note": f"infinite: {unread} of {len(rows)} rows hold a prediction or answer that "
                                        "float() does not read (FLARE's rule); mae_parseable is the error where a "
                                        "number can be read from the text (unparseable counts the rest)"}
    stopped = [r.get("id") for r, p, g in zip(rows, preds, golds) if not (math.isfinite(p) and math.isfinite(g))]
    if stopped:
        return {name: None, "aborted": True, "abort_ids": stopped,
                "note": f"FLARE's evaluator stops on these rows: {len(stopped)} prediction(s) or answer(s) read as "
                        "NaN or infinity, which scikit-learn's mean_absolute_error rejects; it reports no number"}
    if not rows:
        return {name: None}
    with np.errstate(over="ignore"):  # finite values whose difference overflows: infinity, as scikit-learn
        return {name: float(np.mean(np.abs(np.array(preds) - np.array(golds))))}


def green_stats(scores: list[float]) -> np.ndarray:
    return np.array(scores, dtype=float).reshape(-1, 1)


STATS = {"classification": classification_stats, "multi_label": multi_label_stats, "regression": regression_stats}


def aggregate(task: str, stats: np.ndarray) -> np.ndarray:
    """The official metric of each set of samples: ``stats`` is (..., n, k) per-sample statistics; the result
    has the leading shape (a single value for (n, k))."""
    if task == "classification":
        classes, correct = stats[..., 0], stats[..., 1]
        recalls = []
        for c in np.unique(classes):
            members = classes == c
            count = members.sum(-1)
            with np.errstate(invalid="ignore", divide="ignore"):
                recalls.append(np.where(count > 0, (correct * members).sum(-1) / count, np.nan))
        return np.nanmean(np.stack(recalls), axis=0) if recalls else np.full(stats.shape[:-2], np.nan)
    if task == "multi_label":
        tp, fp, fn = (stats[..., i].sum(-1) for i in range(3))
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
            recall = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
            return np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    if task in ("regression", "report_generation"):
        return stats[..., 0].mean(-1)
    raise ValueError(f"no official metric for task type {task!r}")


def official_value(task: str, stats: np.ndarray) -> float | None:
    if len(stats) == 0:
        return None
    return float(aggregate(task, stats))


def official_block(task: str, rows: list[dict], green: dict | None = None) -> dict:
    """FLARE's metric for one group of rows (``prediction`` and ``answer`` as written), under FLARE's name;
    ``green``: for reports, ``flare_exp.metrics.green.official_green``'s outcome (None: no judge ran)."""
    name = OFFICIAL_METRIC[task]
    block = {"flare_task_type": FLARE_TASK_TYPE[task], "num_examples": len(rows)}
    if task == "report_generation":
        return {**block, name: None, **(green or {})}
    if task == "regression":
        return {**block, **regression_outcome(rows)}
    stats = STATS[task]([r.get("prediction", "") for r in rows], [r.get("answer", "") for r in rows])
    block[name] = official_value(task, stats)
    return block
