"""One score per row, for a sheet a reviewer sorts worst first: FLARE's per-sample numbers (correct or not,
the label F1, the absolute error) and, for reports, the GREEN score when the judge ran, else ROUGE-L."""
from __future__ import annotations

import math

KINDS = {"classification": "correct (1/0)", "multi_label": "label F1", "regression": "absolute error",
         "report_generation": "GREEN"}


def row_scores(rows: list[dict], samples: dict) -> dict[str, tuple[float | None, str]]:
    """id -> (score, what it is), from eval's per-sample official statistics (``samples``: task -> (ids, stats))."""
    out = {}
    for task, (ids, stats) in samples.items():
        for id_, stat in zip(ids, stats):
            out[id_] = (_score(task, stat), KINDS[task])
    for r in rows:
        if r["task_type"] == "regression" and out.get(r["id"], (None,))[0] is None:
            out[r["id"]] = first_number_error(r)
    missing = [r for r in rows if r["id"] not in out and r["task_type"] == "report_generation"]
    if missing:  # no GREEN judge: the row's ROUGE-L
        from flare_exp.metrics.text import rouge_l_per_pair

        scores = rouge_l_per_pair([r.get("prediction") for r in missing], [r.get("answer") or "" for r in missing])
        out.update((r["id"], (score, "ROUGE-L")) for r, score in zip(missing, scores))
    return out


def first_number_error(row: dict) -> tuple[float | None, str]:
    """A regression row that FLARE's float() does not read ("22.9%", free text): the absolute error of the first
    number in it (as mae_parseable reads it), or why there is none."""
    from flare_exp.metrics.answers import parse_number

    pred, gold = parse_number(row.get("prediction")), parse_number(row.get("answer"))
    if pred is None or gold is None:
        return None, "no number in the " + ("prediction" if pred is None else "answer")
    error = abs(pred - gold)
    if not math.isfinite(error):
        return None, "no finite number in the prediction"
    return error, "absolute error of its first number (float() does not read it)"


def _score(task: str, stat) -> float | None:
    if task == "multi_label":
        tp, fp, fn = (float(x) for x in stat)
        return None if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
    value = float(stat[-1])
    # an answer float() does not read (infinite), or one read as NaN or infinity: no error to show
    return value if math.isfinite(value) else None


def worst_first(rows: list[dict]) -> list[dict]:
    """Errors largest first, other scores smallest first; rows without a score last, by task."""
    def key(r):
        score = r.get("score")
        if score is None:  # a regression answer with no number is as wrong as it gets
            return (r["task_type"], -1 if r["task_type"] == "regression" else 1, 0.0)
        return (r["task_type"], 0, -score if r["task_type"] == "regression" else score)
    return sorted(rows, key=key)
