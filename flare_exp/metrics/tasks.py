"""Our own metrics for the non-report tasks, each named for what it computes. They sit beside FLARE's official
numbers (``flare_exp.metrics.official``) and differ from them on purpose:

- classification: ``balanced_accuracy_parsed`` first reads the option letter out of free text (FLARE compares
  the raw string, so "The answer is C" is wrong there); ``accuracy``; ``macro_f1`` (per-class F1 on FLARE's
  stripped, lower-cased strings, averaged over the classes of the ground truth and the predictions, as
  scikit-learn's ``average="macro"``).
- multi_label: FLARE splits every answer on both ``;`` and ``,``, so periapical's label "Endodontic Treatment,
  Restorative Treatment, and Complications" becomes three; ``dataset_aware_*`` split on each dataset's own
  separator (chestdr ``,``, periapical ``;``) and keep labels whole: micro F1 / precision / recall (pooled
  counts), example-based F1 (mean per-sample F1) and ``per_label_f1``. ``precision_micro`` / ``recall_micro``
  are FLARE's counts, beside its F1.
- regression: FLARE's MAE is infinite once one prediction is not a plain number ("22.9%");
  ``mae_parseable`` / ``rmse_parseable`` read the first number of each answer and leave out the ones with
  none, counted in ``unparseable``.
Rows reach these functions with ``prediction`` as a string (eval turns null / non-string ones into "").
"""
from __future__ import annotations

import math
from collections import defaultdict

from flare_exp.metrics.answers import extract_choice, label_set, parse_number, set_f1
from flare_exp.data.records import label_separator
from flare_exp.metrics.official import flare_text, multi_label_stats


def balanced_accuracy(preds: list[str], golds: list[str]) -> float:
    """Mean per-class recall over the classes present in the ground truth."""
    hits, totals = defaultdict(int), defaultdict(int)
    for p, g in zip(preds, golds):
        totals[g] += 1
        hits[g] += int(p == g)
    return sum(hits[c] / totals[c] for c in totals) / len(totals) if totals else float("nan")


def macro_f1(preds: list[str], golds: list[str]) -> float:
    classes = sorted(set(golds) | set(preds))
    scores = []
    for c in classes:
        tp = sum(p == c and g == c for p, g in zip(preds, golds))
        fp = sum(p == c and g != c for p, g in zip(preds, golds))
        fn = sum(p != c and g == c for p, g in zip(preds, golds))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(scores) if scores else float("nan")


def classification_metrics(rows: list[dict]) -> dict:
    golds = [flare_text(r["answer"]) for r in rows]
    preds = [flare_text(r["prediction"]) for r in rows]
    parsed = [flare_text(extract_choice(r["prediction"]) or "") for r in rows]
    return {"n": len(rows), "balanced_accuracy_parsed": balanced_accuracy(parsed, golds),
            "accuracy": sum(p == g for p, g in zip(preds, golds)) / len(rows), "macro_f1": macro_f1(preds, golds)}


def _micro(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return precision, recall, (2 * precision * recall / (precision + recall) if precision + recall else 0.0)


def multi_label_metrics(rows: list[dict]) -> dict:
    counts = [0, 0, 0]        # dataset-aware tp, fp, fn
    per_label = defaultdict(lambda: [0, 0, 0])
    per_sample = []
    for r in rows:
        sep = label_separator(r["dataset"], r["answer"])
        pred, gold = label_set(r["prediction"], sep), label_set(r["answer"], sep)
        for i, n in enumerate((len(pred & gold), len(pred - gold), len(gold - pred))):
            counts[i] += n
        for label in pred | gold:
            per_label[label][0 if label in pred & gold else 1 if label in pred else 2] += 1
        per_sample.append(set_f1(pred, gold))
    precision, recall, f1 = _micro(*counts)
    flare = multi_label_stats([r["prediction"] for r in rows], [r["answer"] for r in rows]).sum(0)
    flare_precision, flare_recall, _ = _micro(*(int(n) for n in flare))
    return {"n": len(rows), "precision_micro": flare_precision, "recall_micro": flare_recall,
            "dataset_aware_f1_micro": f1, "dataset_aware_precision_micro": precision,
            "dataset_aware_recall_micro": recall, "dataset_aware_f1_example": sum(per_sample) / len(per_sample),
            "per_label_f1": {label: _micro(*c)[2] for label, c in sorted(per_label.items())}}


def regression_metrics(rows: list[dict]) -> dict:
    errors, unparseable = [], 0
    for r in rows:
        pred, gold = parse_number(r["prediction"]), parse_number(r["answer"])
        if pred is None or gold is None:
            unparseable += 1
            continue
        errors.append(abs(pred - gold))
    return {"n": len(rows), "mae_parseable": sum(errors) / len(errors) if errors else None,
            "rmse_parseable": math.sqrt(sum(e * e for e in errors) / len(errors)) if errors else None,
            "unparseable": unparseable}
