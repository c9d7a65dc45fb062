"""idode.stats against independent computations (statistics, numpy, scipy)."""

import math
import statistics

import numpy as np
import pytest
from scipy import stats as sps
from scipy.special import logsumexp

from idode import stats


def test_z95_is_the_two_sided_normal_quantile():
    assert stats.Z95 == pytest.approx(sps.norm.ppf(0.975), rel=1e-15)


def test_summarize_matches_statistics_and_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=57)
    s = stats.summarize(x)
    assert s.n == 57
    assert s.mean == pytest.approx(statistics.fmean(x.tolist()), rel=1e-15)
    assert s.std == pytest.approx(statistics.stdev(x.tolist()), rel=1e-13)
    assert s.stderr == pytest.approx(sps.sem(x), rel=1e-13)
    lo, hi = sps.norm.interval(0.95, loc=x.mean(), scale=sps.sem(x))
    assert s.ci95 == pytest.approx((lo, hi), rel=1e-12)
    assert s.halfwidth == pytest.approx((hi - lo) / 2, rel=1e-12)


def test_summarize_is_exact_where_the_naive_two_pass_computation_is_not():
    # a large offset and a spread of a few ulps: 1e15 + k / 8 (exact in float64). The naive two
    # passes (np.mean, then the squared deviations) lose digits in the mean's sum and, since the
    # mean is not representable there, add n delta^2 to the squares; the reference is exact
    # rational arithmetic (statistics.mean / stdev work in fractions).
    k = np.random.default_rng(0).integers(0, 8, 1000)
    x = 1e15 + 0.125 * k
    assert np.array_equal(x - 1e15, 0.125 * k)
    exact_mean, exact_std = statistics.mean(x.tolist()), statistics.stdev(x.tolist())
    naive_mean = np.mean(x)
    naive_std = math.sqrt(np.sum((x - naive_mean) ** 2) / (len(x) - 1))
    assert abs(naive_std - exact_std) > 0.05 * exact_std  # what this test rules out
    s = stats.summarize(x)
    assert s.std == pytest.approx(exact_std, rel=1e-14)
    assert abs(s.mean - exact_mean) <= np.spacing(exact_mean)  # one rounding of the exact sum / n


def test_one_value_reports_the_value_and_no_interval():
    s = stats.summarize([2.5])
    assert (s.mean, s.n) == (2.5, 1)
    assert s.stderr is None and s.ci95 is None and s.std is None and s.halfwidth is None
    assert stats.verdict(s.ci95) == "inconclusive"


@pytest.mark.parametrize(
    "bad, match",
    [([], "empty"), ([1.0, float("nan")], "non-finite"), ([[1.0, 2.0]], "one-dimensional")],
)
def test_bad_input_is_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        stats.summarize(bad)


def test_paired_interval_matches_scipy_and_is_narrow():
    rng = np.random.default_rng(1)
    a = rng.normal(size=400)
    b = a - 0.5 + 0.1 * rng.normal(size=400)  # b is lower by 0.5 on every example
    s = stats.paired(a, b)
    d = a - b
    t = sps.ttest_rel(a, b)  # the paired t statistic is mean / stderr of the differences
    assert s.mean == pytest.approx(d.mean(), rel=1e-12)
    assert s.mean / s.stderr == pytest.approx(t.statistic, rel=1e-10)
    # much narrower than the separate intervals of a and b
    assert s.ci95[1] - s.ci95[0] < 0.05 < stats.summarize(a).halfwidth
    assert stats.verdict(s.ci95) == "held"
    with pytest.raises(ValueError, match="one value per example"):
        stats.paired(a, b[:-1])


def test_verdict():
    assert stats.verdict([0.1, 0.2]) == "held"
    assert stats.verdict([-0.2, -0.1]) == "did not hold"
    assert stats.verdict([-0.1, 0.2]) == "inconclusive"
    assert stats.verdict([1.1, 3.0], null=1.0) == "held"
    assert stats.verdict([0.5, 0.9], null=1.0) == "did not hold"


def test_bootstrap_draws_with_replacement_and_matches_a_hand_loop():
    rng_data = np.random.default_rng(2)
    x = rng_data.exponential(size=40)
    boots = stats.bootstrap(lambda idx: (x[idx].mean(), x[idx].var(ddof=1)), 40, 300, seed=7)
    assert boots.shape == (300, 2)
    rng = np.random.default_rng(7)
    want = []
    for _ in range(300):
        idx = rng.integers(0, 40, 40)
        want.append((x[idx].mean(), x[idx].var(ddof=1)))
    np.testing.assert_allclose(boots, want, rtol=1e-15)
    lo, hi = stats.percentile_interval(boots[:, 0])
    assert (lo, hi) == (np.percentile(boots[:, 0], 2.5), np.percentile(boots[:, 0], 97.5))
    # the bootstrap standard error of the mean is close to the analytic one
    assert boots[:, 0].std() == pytest.approx(x.std(ddof=1) / math.sqrt(40), rel=0.2)
    with pytest.raises(ValueError, match="resamples"):
        stats.bootstrap(lambda idx: 0.0, 5, 0)


def test_logmeanexp_matches_scipy_without_overflow():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 4, 16)) * 50 - 1000.0  # exp underflows to 0 in float64
    got = stats.logmeanexp(x, 2)
    assert got.shape == (3, 4)
    np.testing.assert_allclose(got, logsumexp(x, axis=2) - math.log(16), rtol=1e-13)
    # equal values: the mean of K equal exponentials is that value
    np.testing.assert_allclose(stats.logmeanexp(np.full((2, 8), -100.0), 1), -100.0)
