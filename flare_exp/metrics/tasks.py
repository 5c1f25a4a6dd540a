"""FLARE's official metrics for the non-report tasks (FACTS §1), plus clearly named variants.

- classification: balanced accuracy on stripped, lower-cased strings (FLARE's definition: the prediction must
  equal the option letter); ``balanced_accuracy_parsed`` first reads the option out of free text.
- multi_label: F1 over label sets, micro (pooled counts) and example-based (mean per-sample F1), both named.
- regression: MAE of float(answer). FLARE's MAE is infinite with one unparseable prediction; we report the
  MAE over parseable predictions and the number of unparseable ones, never silently dropping them.
"""
from __future__ import annotations

from collections import defaultdict

from flare_exp.rewards.choice import extract_choice
from flare_exp.rewards.label_f1 import label_set, set_f1
from flare_exp.data.records import label_separator
from flare_exp.rewards.numeric import parse_number


def balanced_accuracy(preds: list[str], golds: list[str]) -> float:
    """Mean per-class recall over the classes present in the ground truth."""
    hits, totals = defaultdict(int), defaultdict(int)
    for p, g in zip(preds, golds):
        totals[g] += 1
        hits[g] += int(p == g)
    return sum(hits[c] / totals[c] for c in totals) / len(totals) if totals else float("nan")


def classification_metrics(rows: list[dict]) -> dict:
    norm = lambda s: str(s or "").strip().lower()  # noqa: E731
    golds = [norm(r["answer"]) for r in rows]
    parsed = [norm(extract_choice(r["prediction"]) or "") for r in rows]
    return {"n": len(rows), "balanced_accuracy": balanced_accuracy([norm(r["prediction"]) for r in rows], golds),
            "balanced_accuracy_parsed": balanced_accuracy(parsed, golds),
            "accuracy": sum(p == g for p, g in zip((norm(r["prediction"]) for r in rows), golds)) / len(rows)}


def multi_label_metrics(rows: list[dict]) -> dict:
    tp = fp = fn = 0
    per_sample = []
    for r in rows:
        sep = label_separator(r["dataset"], r["answer"])
        pred, gold = label_set(r["prediction"], sep), label_set(r["answer"], sep)
        tp, fp, fn = tp + len(pred & gold), fp + len(pred - gold), fn + len(gold - pred)
        per_sample.append(set_f1(pred, gold))
    micro = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0
    return {"n": len(rows), "f1_micro": micro, "f1_example": sum(per_sample) / len(per_sample)}


def regression_metrics(rows: list[dict]) -> dict:
    errors, unparseable = [], 0
    for r in rows:
        pred, gold = parse_number(r["prediction"]), parse_number(r["answer"])
        if pred is None or gold is None:
            unparseable += 1
            continue
        errors.append(abs(pred - gold))
    return {"n": len(rows), "mae": sum(errors) / len(errors) if errors else None, "unparseable": unparseable,
            # FLARE's evaluator: float() of every prediction, so one unparseable answer makes the MAE infinite.
            "mae_flare": (sum(errors) / len(errors) if errors and not unparseable else None),
            "mae_flare_note": f"FLARE's MAE is infinite: {unparseable} unparseable prediction(s)" if unparseable else ""}
