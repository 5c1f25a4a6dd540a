"""The paired bootstrap and the paired permutation test against scipy's (``bootstrap`` over the sample index,
which resamples both runs' rows together; ``permutation_test`` with ``permutation_type='samples'``, which swaps
each sample's two values), on fixed seeds and several synthetic pairs of runs, within Monte-Carlo error; and
one example worked out by hand."""
import numpy as np
import pytest

from flare_exp.metrics.official import aggregate
from flare_exp.metrics.significance import bootstrap_interval, paired_test

stats = pytest.importorskip("scipy.stats")

RESAMPLES = 4000


def _regression_pair(rng, n=40):
    """Absolute errors of two runs that share most of their difficulty (strongly paired), B slightly better."""
    a = rng.gamma(2.0, 1.0, n)
    return a[:, None], (a + rng.normal(-0.12, 0.35, n)).clip(0)[:, None]


def _classification_pair(rng, n=60):
    """(gold class, correct) of two runs on three classes; B fixes a few of A's mistakes and makes one."""
    classes = rng.integers(0, 3, n).astype(float)
    correct_a = rng.random(n) < 0.55
    correct_b = correct_a.copy()
    correct_b[np.flatnonzero(~correct_a)[:5]] = True
    correct_b[np.flatnonzero(correct_a)[:1]] = False
    return np.stack([classes, correct_a], 1).astype(float), np.stack([classes, correct_b], 1).astype(float)


def _multi_label_pair(rng, n=50):
    """(tp, fp, fn) per sample: B finds one more label than A on about one sample in eight."""
    labels = rng.integers(1, 4, n)
    tp_a = rng.binomial(labels, 0.5)
    fp_a = rng.integers(0, 2, n)
    tp_b = np.minimum(labels, tp_a + (rng.random(n) < 0.12))
    return (np.stack([tp_a, fp_a, labels - tp_a], 1).astype(float),
            np.stack([tp_b, fp_a, labels - tp_b], 1).astype(float))


PAIRS = {"regression": _regression_pair, "classification": _classification_pair, "multi_label": _multi_label_pair}


def scipy_reference(task, stats_a, stats_b, seed):
    """scipy's paired percentile bootstrap of A, of B and of B - A, and its paired permutation p-value."""
    n = len(stats_a)
    index = np.arange(n)

    def boot(statistic):
        return stats.bootstrap((index,), statistic, vectorized=True, n_resamples=RESAMPLES, method="percentile",
                               rng=np.random.default_rng(seed))

    diff = boot(lambda i, axis=-1: aggregate(task, stats_b[i]) - aggregate(task, stats_a[i]))
    boot_a = boot(lambda i, axis=-1: aggregate(task, stats_a[i]))
    # the rows of both runs in one table: index i is A's row i, n + i is B's; a swap exchanges a sample's rows
    pooled = np.concatenate([stats_a, stats_b])
    perm = stats.permutation_test((index, index + n),
                                  lambda x, y, axis=-1: aggregate(task, pooled[y]) - aggregate(task, pooled[x]),
                                  permutation_type="samples", vectorized=True, n_resamples=RESAMPLES,
                                  alternative="two-sided", rng=np.random.default_rng(seed + 1))
    unpaired = stats.bootstrap((index, index), lambda i, j, axis=-1: aggregate(task, stats_b[j])
                               - aggregate(task, stats_a[i]), vectorized=True, paired=False,
                               n_resamples=RESAMPLES, method="percentile", rng=np.random.default_rng(seed))
    return diff, boot_a, perm.pvalue, unpaired


@pytest.mark.parametrize("task", list(PAIRS))
@pytest.mark.parametrize("seed", [0, 1])
def test_paired_test_agrees_with_scipy(task, seed):
    stats_a, stats_b = PAIRS[task](np.random.default_rng(100 + seed))
    ours = paired_test(task, stats_a, stats_b, resamples=RESAMPLES, seed=seed)
    diff, boot_a, p_value, unpaired = scipy_reference(task, stats_a, stats_b, seed + 10)  # other draws than ours
    assert ours["difference"] == pytest.approx(float(aggregate(task, stats_b) - aggregate(task, stats_a)))
    # scipy draws other resamples than ours (another seed): a percentile endpoint's Monte-Carlo error with 4,000
    # resamples is ~0.05 bootstrap standard errors on each side, 0.35 SE is ~5 of those (measured: within 0.4
    # of the tolerance on every pair here)
    tolerance = 0.35 * diff.standard_error
    assert ours["difference_ci95"] == pytest.approx(list(diff.confidence_interval), abs=tolerance)
    assert ours["a_ci95"] == pytest.approx(list(boot_a.confidence_interval), abs=0.35 * boot_a.standard_error)
    # the pairs are chosen so that resampling the runs independently would be far off (the test can fail)
    unpaired_width = np.diff(unpaired.confidence_interval)[0]
    assert unpaired_width > 1.5 * np.diff(diff.confidence_interval)[0]
    # p: binomial Monte-Carlo error of both estimates, 4.5 standard deviations
    mc_sd = np.sqrt(2 * p_value * (1 - p_value) / RESAMPLES)
    assert 0.005 < p_value < 0.6  # a one-sided p (half of it) is told apart
    assert ours["p_value"] == pytest.approx(p_value, abs=4.5 * mc_sd + 2 / RESAMPLES)


def test_exact_permutation_p_on_a_small_pair():
    """Ten samples: scipy enumerates all 1,024 sign patterns (exact); our Monte-Carlo p agrees within its error."""
    a = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0, 3.0])
    b = a + np.array([-1.0, 0.5, -2.0, 0.0, -1.5, 1.0, -0.5, -1.0, 0.5, -2.5])
    exact = stats.permutation_test((a, b), lambda x, y, axis=-1: y.mean(axis) - x.mean(axis),
                                   permutation_type="samples", vectorized=True, n_resamples=10_000).pvalue
    ours = paired_test("regression", a[:, None], b[:, None], resamples=RESAMPLES, seed=3)["p_value"]
    assert 0.05 < exact < 0.2
    assert ours == pytest.approx(exact, abs=4.5 * np.sqrt(exact * (1 - exact) / RESAMPLES))


def test_worked_example_by_hand():
    """Four samples, B's error is A's + 1 on every one: the difference is exactly 1 on every paired resample
    (an unpaired one would spread it); of the 16 sign patterns only the 2 all-same ones reach |mean| >= 1,
    so p = 2/16 = 1/8 (a one-sided test would give 1/16)."""
    a = np.array([0.0, 1.0, 2.0, 3.0])[:, None]
    test = paired_test("regression", a, a + 1, resamples=RESAMPLES, seed=0)
    assert test["a"] == 1.5 and test["b"] == 2.5 and test["difference"] == 1.0
    assert test["difference_ci95"] == [1.0, 1.0]
    assert test["p_value"] == pytest.approx(1 / 8, abs=4.5 * np.sqrt(1 / 8 * 7 / 8 / RESAMPLES))
    # the bootstrap of A alone: means of 4 draws from {0, 1, 2, 3}; the 2.5% and 97.5% points of that
    # distribution (enumerated over all 256 draws: P(mean <= 0.25) = 5/256, P(mean <= 0.5) = 15/256) are 0.5
    # and 2.5; Monte-Carlo percentiles fall on the lattice of quarters
    assert test["a_ci95"] == [0.5, 2.5]
    assert bootstrap_interval("regression", a, RESAMPLES, 0) == test["a_ci95"]


def test_resampling_in_chunks_changes_no_number(monkeypatch):
    """A large eval.significance.resamples is drawn in row chunks of bounded memory; numpy draws the same numbers
    either way, so every interval and p-value equals the one-array draw (chunks of 7 rows here)."""
    from flare_exp.metrics import significance

    rng = np.random.default_rng(5)
    a = (rng.random((60, 3)) < 0.5).astype(float)
    b = np.where(rng.random((60, 3)) < 0.8, a, 1 - a)
    whole = paired_test("classification", a, b, resamples=500, seed=4)
    interval = bootstrap_interval("classification", a, 500, 4)
    chunked = significance._chunk_rows
    monkeypatch.setattr(significance, "_chunk_rows", lambda resamples, stats: chunked(resamples, stats, cells=7 * 180))
    assert significance._chunk_rows(500, a)[:2] == [7, 7]
    assert paired_test("classification", a, b, resamples=500, seed=4) == whole
    assert bootstrap_interval("classification", a, 500, 4) == interval == whole["a_ci95"]
