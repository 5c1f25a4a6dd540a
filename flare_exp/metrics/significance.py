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
    idx = rng.integers(0, n, size=(resamples, n))
    boot_a, boot_b = aggregate(task, stats_a[idx]), aggregate(task, stats_b[idx])
    swap = rng.random((resamples, n)) < 0.5
    perm_a = np.where(swap[..., None], stats_b, stats_a)
    perm_b = np.where(swap[..., None], stats_a, stats_b)
    perm_diff = aggregate(task, perm_b) - aggregate(task, perm_a)
    observed = abs(b - a)
    extreme = int((np.abs(perm_diff) >= observed - 1e-12).sum())
    out.update(a_ci95=_interval(boot_a), b_ci95=_interval(boot_b), difference_ci95=_interval(boot_b - boot_a),
               p_value=(1 + extreme) / (1 + resamples), resamples=resamples)
    return out


def bootstrap_interval(task: str, stats: np.ndarray, resamples: int = 1000, seed: int = 0) -> list[float] | None:
    """The 95% percentile bootstrap interval of one run's official metric (None when it is infinite or
    undefined, or there are no samples)."""
    if not len(stats) or not resamples or not math.isfinite(float(aggregate(task, stats))):
        return None
    idx = np.random.default_rng(seed).integers(0, len(stats), size=(resamples, len(stats)))
    return _interval(aggregate(task, stats[idx]))
