"""Is run B better than run A? Paired tests on the samples both runs predicted, for every official metric.

- 95% intervals: a paired bootstrap (the same resampled sample ids for both runs) of each run's metric and
  of the difference B - A (percentile intervals).
- p-value: a paired permutation test (approximate randomisation): each sample's two predictions swap runs
  with probability 1/2; p = (1 + #{|difference| >= observed}) / (1 + resamples), two-sided.
Each metric is recomputed on every resample from per-sample statistics (``official.aggregate``), so balanced
accuracy and micro F1 are resampled as what they are, not as a mean of per-sample scores.
"""
from __future__ import annotations

import math
from itertools import combinations

import numpy as np

from flare_exp.metrics.official import OFFICIAL_METRIC, aggregate


def _interval(values: np.ndarray) -> list[float] | None:
    values = values[~np.isnan(values)]
    if not len(values):
        return None
    low, high = np.percentile(values, [2.5, 97.5])
    return [float(low), float(high)]


def paired_test(task: str, stats_a: np.ndarray, stats_b: np.ndarray, resamples: int = 1000,
                seed: int = 0) -> dict:
    """stats_*: (n, k) per-sample statistics of the two runs on the same n samples, in the same order."""
    n = len(stats_a)
    a, b = float(aggregate(task, stats_a)), float(aggregate(task, stats_b))
    out = {"metric": OFFICIAL_METRIC[task], "n": n, "a": a, "b": b, "difference": b - a}
    if not math.isfinite(a) or not math.isfinite(b):
        out["note"] = "a metric is infinite or undefined on these samples: no interval or p-value"
        return out
    rng = np.random.default_rng(seed)
    boot_a, boot_b = _resampled(task, rng, (stats_a, stats_b), resamples)
    perm_diff = _swapped_differences(task, rng, stats_a, stats_b, resamples)
    observed = abs(b - a)
    extreme = int((np.abs(perm_diff) >= observed - 1e-12).sum())
    out.update(a_ci95=_interval(boot_a), b_ci95=_interval(boot_b), difference_ci95=_interval(boot_b - boot_a),
               p_value=(1 + extreme) / (1 + resamples), resamples=resamples)
    return out


def _chunk_rows(resamples: int, stats: np.ndarray, cells: int = 2 ** 22):
    """Row counts that split ``resamples`` so a (rows, n, k) array stays ~32 MB: a large eval.significance.resamples
    takes longer, never all memory. numpy's Generator draws the same numbers in row chunks as in one call, so the
    chunking changes no result."""
    per_row = max(1, stats.size)
    step = max(1, cells // per_row)
    return [min(step, resamples - start) for start in range(0, resamples, step)]


def _resampled(task: str, rng, runs: tuple, resamples: int) -> list[np.ndarray]:
    """Each run's metric on the same ``resamples`` bootstrap draws of sample ids."""
    out = [[] for _ in runs]
    for rows in _chunk_rows(resamples, runs[0]):
        idx = rng.integers(0, len(runs[0]), size=(rows, len(runs[0])))
        for values, stats in zip(out, runs):
            values.append(np.atleast_1d(aggregate(task, stats[idx])))
    return [np.concatenate(values) if values else np.zeros(0) for values in out]


def _swapped_differences(task: str, rng, stats_a: np.ndarray, stats_b: np.ndarray, trials: int) -> np.ndarray:
    """The metric's difference between the two runs after each sample's two predictions swap runs with probability
    1/2, ``trials`` times (the permutation test's and approximate randomization's draws), in bounded chunks."""
    parts = [np.zeros(0)]
    for rows in _chunk_rows(trials, stats_a):
        swap = rng.random((rows, len(stats_a)))[..., None] < 0.5
        parts.append(np.atleast_1d(aggregate(task, np.where(swap, stats_a, stats_b))
                                   - aggregate(task, np.where(swap, stats_b, stats_a))))
    return np.concatenate(parts)


def bootstrap_interval(task: str, stats: np.ndarray, resamples: int = 1000, seed: int = 0) -> list[float] | None:
    """The 95% percentile bootstrap interval of one run's official metric (None when it is infinite or
    undefined, or there are no samples)."""
    if not len(stats) or not resamples or not math.isfinite(float(aggregate(task, stats))):
        return None
    return _interval(_resampled(task, np.random.default_rng(seed), (stats,), resamples)[0])


# ---- approximate randomization and the correction across a family of tests -------------------------------

CORRECTIONS = ("holm", "bh", "none")


def approximate_randomization(task: str, stats_a: np.ndarray, stats_b: np.ndarray, trials: int = 10000,
                              seed: int = 0) -> float | None:
    """Paired approximate randomization (Noreen's test, the one RadEval reports): in each trial every
    sample's two predictions swap runs with probability 1/2 and the metric is recomputed on both shuffled
    runs; p = (1 + #{trials with |difference| >= observed}) / (1 + trials), two-sided. Its own random stream
    and trial count beside ``paired_test``'s permutation p; None where a metric is infinite or undefined."""
    observed = float(aggregate(task, stats_b)) - float(aggregate(task, stats_a))
    if not math.isfinite(observed) or not trials:
        return None
    shuffled = _swapped_differences(task, np.random.default_rng([seed, 1]), stats_a, stats_b, trials)
    return (1 + int((np.abs(shuffled) >= abs(observed) - 1e-12).sum())) / (1 + trials)


def adjust_p_values(p_values: list[float | None], method: str = "holm") -> list[float | None]:
    """Family-wise adjusted p-values, in the input's order (None stays None and is not in the family).
    holm: Holm's step-down (controls the family-wise error rate); bh: Benjamini-Hochberg (the false
    discovery rate); none: the raw values."""
    if method not in CORRECTIONS:
        raise ValueError(f"eval.significance.correction={method!r}: choose one of {', '.join(CORRECTIONS)}")
    known = [(i, p) for i, p in enumerate(p_values) if p is not None]
    out: list[float | None] = list(p_values)
    m = len(known)
    if method == "none" or not m:
        return out
    ranked = sorted(known, key=lambda item: item[1])
    if method == "holm":
        running = 0.0
        for rank, (i, p) in enumerate(ranked):
            running = max(running, min(1.0, (m - rank) * p))
            out[i] = running
    else:
        running = 1.0
        for rank in range(m - 1, -1, -1):
            i, p = ranked[rank]
            running = min(running, p * m / (rank + 1))
            out[i] = min(1.0, running)
    return out


def correct_family(tests: list[dict], method: str = "holm") -> dict:
    """Adds the adjusted p-values to every test (``p_value_adjusted``, ``ar_p_value_adjusted``), each test kind
    corrected over all of the report's tests of that kind, and returns the family's description."""
    for key in ("p_value", "ar_p_value"):
        adjusted = adjust_p_values([t.get(key) for t in tests], method)
        for test, value in zip(tests, adjusted):
            if key in test:
                test[f"{key}_adjusted"] = value
    size = sum(t.get("p_value") is not None for t in tests)
    return {"correction": method, "size": size,
            "family": f"all {size} paired comparisons with a p-value in this report (every pair of runs x every "
                      "official metric they share), corrected per test (permutation, approximate randomization)"}


def input_differences(a: str, b: str, res_a: dict, res_b: dict) -> list[str]:
    """What else two runs did not share: the prepared file they were joined to (prepare's settings, e.g.
    data.image_window, decide its records and pixels), the images' window, the model's image size cap."""
    import os

    out = []
    scored = [res.get("file") for res in (res_a, res_b)]
    digests = [res.get("file_sha256") for res in (res_a, res_b)]
    if None not in scored and os.path.realpath(scored[0]) == os.path.realpath(scored[1]):
        out.append(f"{a} and {b} scored the same predictions file ({scored[0]}): their differences are the scorers' "
                   "alone, and their tests widen the correction's family")
    elif None not in digests and digests[0] == digests[1]:
        out.append(f"{a} and {b} scored byte-identical predictions files ({scored[0]} and {scored[1]}: a copy?): "
                   "their differences are the scorers' alone, and their tests widen the correction's family")
    files = [res.get("answers_from") for res in (res_a, res_b)]
    if None not in files and "the predictions file" not in files and os.path.realpath(files[0]) != os.path.realpath(
            files[1]):
        out.append(f"{a} and {b} were joined to different prepared files ({files[0]} and {files[1]}): their "
                   "records or decoded images may differ (prepare's settings, data.image_window)")
    windows = [res.get("image_window") for res in (res_a, res_b)]
    if all(windows) and windows[0] != windows[1]:
        out.append(f"{a} and {b} decoded their images with different windows: {windows[0]} and {windows[1]}")
    for field, what in (("model_path", "on different base models (model.path)"),
                        ("decoding", "with different decoding settings")):
        values = [res.get("run", {}).get(field) for res in (res_a, res_b)]
        same = os.path.realpath(values[0]) == os.path.realpath(values[1]) if field == "model_path" and None not in \
            values else values[0] == values[1]
        if None not in values and not same:  # both from infer runs that recorded it
            out.append(f"{a} and {b} were predicted {what}: {values[0]} and {values[1]}")
    pixels = [res.get("run", {}).get("max_pixels", "unknown") for res in (res_a, res_b)]
    if "unknown" not in pixels and pixels[0] != pixels[1]:  # both from infer runs that recorded it
        out.append(f"{a} and {b} were predicted with different model.max_pixels: {pixels[0]} and {pixels[1]}")
    return out


def id_order(ids: list[str]) -> list[int]:
    """The positions of the samples in the order of their ids: the draws resample samples, not rows, so the same
    predictions give the same intervals and p-values whatever the file's row order (a sheet sorted in Excel)."""
    return sorted(range(len(ids)), key=lambda k: str(ids[k]))


def compare(results: dict, samples: dict, resamples: int, seed: int, ar_trials: int = 0,
            inputs: dict[str, set] | None = None) -> tuple[list[dict], list[str]]:
    """Paired tests for every pair of runs and official metric, on the ids both scored (the bootstrap and
    permutation test; approximate randomization with ``ar_trials``); and the warnings on runs that were not
    scored on the same inputs: every id a run scored (``inputs``, run -> ids; default: those in ``samples``,
    which may leave a task out)."""
    tests, warnings = [], []
    for a, b in combinations(list(results), 2):
        ids_a, ids_b = ({i for ids, _ in samples[r].values() for i in ids} if inputs is None else inputs[r]
                        for r in (a, b))
        split_a, split_b = results[a].get("split"), results[b].get("split")
        if ids_a != ids_b:
            warnings.append(f"{a} and {b} were scored on different inputs: {len(ids_a - ids_b)} sample(s) only in "
                            f"{a}, {len(ids_b - ids_a)} only in {b}; the comparisons use the {len(ids_a & ids_b)} "
                            "they share")
        if split_a != split_b:
            warnings.append(f"{a} and {b} come from different splits: {split_a} and {split_b}")
        warnings += input_differences(a, b, results[a], results[b])
        for task in sorted(set(samples[a]) & set(samples[b])):
            (ids_ta, st_a), (ids_tb, st_b) = samples[a][task], samples[b][task]
            where_b = {i: k for k, i in enumerate(ids_tb)}
            shared = [(k, where_b[ids_ta[k]]) for k in id_order(ids_ta) if ids_ta[k] in where_b]
            if not shared or not resamples:
                continue
            ka, kb = map(list, zip(*shared))
            test = {"run_a": a, "run_b": b, "task": task,
                    **paired_test(task, st_a[ka], st_b[kb], resamples=resamples, seed=seed)}
            if ar_trials:
                test["ar_p_value"] = approximate_randomization(task, st_a[ka], st_b[kb], ar_trials, seed)
                test["ar_trials"] = ar_trials
            tests.append(test)
    return tests, warnings
