"""The analyzer's statistics agree with scipy (and with first principles) on fixed data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sp

from services.analyzer import stats

X = np.array([2.1, 3.4, 1.9, 5.6, 4.4, 3.3, 2.8, 6.1, 4.9, 3.7, 2.2, 5.0])
Y = np.array([1.8, 3.9, 2.5, 5.1, 4.0, 3.9, 2.1, 6.6, 4.2, 3.1, 2.9, 4.4])


def test_pearson_matches_scipy_with_fisher_interval() -> None:
    got = stats.pearson(X, Y)
    ref = sp.pearsonr(X, Y)
    ci = ref.confidence_interval(0.95)
    assert got.statistic == pytest.approx(ref.statistic, abs=1e-12)
    assert got.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert got.ci == pytest.approx((ci.low, ci.high), abs=1e-12)
    # The Fisher-z interval from first principles.
    z, se = math.atanh(ref.statistic), 1 / math.sqrt(len(X) - 3)
    assert got.ci == pytest.approx(
        (math.tanh(z - 1.959964 * se), math.tanh(z + 1.959964 * se)), abs=1e-5
    )
    assert got.n == len(X)


def test_spearman_mann_whitney_t_wilcoxon_match_scipy() -> None:
    rho = sp.spearmanr(X, Y)
    got = stats.spearman(X, Y)
    assert (got.statistic, got.p_value) == pytest.approx((rho.statistic, rho.pvalue), rel=1e-12)

    u = sp.mannwhitneyu(X, Y + 1.0, alternative="less")
    got_u = stats.mann_whitney(X, Y + 1.0, alternative="less")
    assert (got_u.statistic, got_u.p_value) == pytest.approx((u.statistic, u.pvalue), rel=1e-12)
    assert got_u.to_json()["effect_size"] == pytest.approx(u.statistic / (len(X) * len(Y)))

    t = sp.ttest_1samp(X / Y, 1.0, alternative="greater")
    got_t = stats.one_sample_t(X / Y, 1.0, alternative="greater")
    assert (got_t.statistic, got_t.p_value) == pytest.approx((t.statistic, t.pvalue), rel=1e-12)
    assert got_t.to_json()["df"] == len(X) - 1

    w = sp.wilcoxon(X, Y)
    got_w = stats.wilcoxon(X, Y)
    assert (got_w.statistic, got_w.p_value) == pytest.approx((w.statistic, w.pvalue), rel=1e-12)


def test_missing_values_are_dropped_pairwise() -> None:
    x = [1.0, None, 3.0, float("nan"), 5.0, 6.0]
    y = [2.0, 2.0, None, 4.0, 5.5, 7.0]
    got = stats.pearson(x, y)
    ref = sp.pearsonr([1.0, 5.0, 6.0], [2.0, 5.5, 7.0])
    assert got.n == 3
    assert got.statistic == pytest.approx(ref.statistic)


def test_degenerate_inputs_say_why_instead_of_raising() -> None:
    assert stats.pearson([1, 2], [3, 4]).reason == "n = 2 < 3"
    assert stats.pearson([1, 1, 1], [1, 2, 3]).reason == "constant input"
    assert stats.spearman([1, 2, 3], [5, 5, 5]).statistic is None
    assert stats.one_sample_t([2.0, 2.0, 2.0], 1.0).reason == "constant input"
    assert stats.one_sample_t([2.0], 1.0).reason == "n = 1 < 2"
    assert stats.wilcoxon([1, 2, 3], [1, 2, 3]).reason == "n = 0 < 3"
    assert stats.mann_whitney([], [1.0]).statistic is None
    j = stats.pearson([1, 2], [3, 4]).to_json()
    assert j["statistic"] is None and j["reason"] == "n = 2 < 3"


def test_wilson_matches_scipy_and_edges() -> None:
    for k, n in ((8, 10), (0, 12), (12, 12), (37, 50)):
        got = stats.wilson(k, n)
        ci = sp.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert (got.low, got.high) == pytest.approx((ci.low, ci.high), abs=1e-12)
        assert got.value == k / n
    assert stats.wilson(0, 0).value is None
    with pytest.raises(ValueError):
        stats.wilson(5, 3)


def test_bootstrap_is_seeded_and_matches_a_hand_rolled_percentile_bootstrap() -> None:
    a = stats.bootstrap(X, resamples=500, seed=7)
    b = stats.bootstrap(X, resamples=500, seed=7)
    c = stats.bootstrap(X, resamples=500, seed=8)
    assert a == b and a != c
    rng = np.random.Generator(np.random.PCG64(7))
    idx = rng.integers(0, len(X), size=(500, len(X)))
    lo, hi = np.quantile(X[idx].mean(axis=1), [0.025, 0.975])
    assert a.value == pytest.approx(X.mean())
    assert (a.low, a.high) == pytest.approx((lo, hi))
    assert a.low < X.mean() < a.high
    median = stats.bootstrap(X, lambda m: np.median(m, axis=1), resamples=300, seed=1)
    assert median.value == pytest.approx(np.median(X))


def test_bootstrap_diff_paired_and_independent() -> None:
    paired = stats.bootstrap_diff(X, Y, paired=True, resamples=400, seed=2)
    assert paired.value == pytest.approx((X - Y).mean())
    assert paired.n == len(X)
    independent = stats.bootstrap_diff(X, Y + 10, paired=False, resamples=400, seed=2)
    assert independent.value == pytest.approx(X.mean() - Y.mean() - 10)
    assert independent.high is not None and independent.high < 0
    assert independent.method.endswith("(independent)")
    single = stats.bootstrap([4.0])
    assert (single.value, single.low, single.high) == (4.0, 4.0, 4.0)
    assert stats.bootstrap([]).value is None


def test_mcnemar_is_the_exact_binomial_test_on_discordant_pairs() -> None:
    a = [True] * 10 + [False] * 2 + [True] * 5 + [False] * 3
    b = [True] * 10 + [True] * 2 + [False] * 5 + [False] * 3
    got = stats.mcnemar(a, b)
    assert got.p_value == pytest.approx(sp.binomtest(5, 7, 0.5).pvalue)
    assert got.to_json()["only_a_correct"] == 5 and got.to_json()["only_b_correct"] == 2
    assert stats.mcnemar([True, False], [True, False]).p_value == 1.0


def test_fisher_z_mean() -> None:
    rs = [0.5, 0.9, None, 0.7]
    expected = math.tanh(np.mean([math.atanh(0.5), math.atanh(0.9), math.atanh(0.7)]))
    assert stats.fisher_z_mean(rs) == pytest.approx(expected)
    assert stats.fisher_z_mean([None]) is None


def test_to_json_has_no_non_finite_numbers() -> None:
    est = stats.Estimate(float("nan"), float("inf"), 1.0, 3)
    assert est.to_json()["value"] is None and est.to_json()["low"] is None
