"""The statistics module on data small enough to check by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ctxdistill import stats


def test_one_seed_continuous_difference_is_a_t_interval_on_the_item_differences():
    a, b = np.array([1.0, 2.0, 4.0, 5.0]), np.array([0.0, 1.0, 1.0, 2.0])  # differences 1, 1, 3, 3
    est = stats.paired([a], [b])
    assert est.delta == pytest.approx(2.0)
    assert est.se == pytest.approx(math.sqrt(4 / 3) / 2)  # SD of (1, 1, 3, 3) is sqrt(4/3); / sqrt(4)
    half = 3.182446305 * est.se  # t(0.975, 3 df)
    assert (est.lo, est.hi) == pytest.approx((2.0 - half, 2.0 + half))
    assert 0.02 < est.p < 0.05  # t = 3.46 on 3 df


def test_two_seeds_add_the_between_seed_variance_two_way_anova():
    a = [np.array([1.0, 2, 3, 4]), np.array([2.0, 2, 4, 4])]
    zero = [np.zeros(4), np.zeros(4)]
    est = stats.paired(a, zero, binary=False)
    # grand mean 2.75; item means 1.5, 2, 3.5, 4 -> MS_items = 2 * 4.25 / 3 = 17/6; seed means 2.5, 3 -> MS_seeds = 4 * 0.125 = 0.5
    # Var = (MS_items + MS_seeds) / (n k) = (17/6 + 1/2) / 8; Satterthwaite df = V^2 / ((17/6)^2 / 3 + 0.5^2 / 1) * 64
    assert est.delta == pytest.approx(2.75)
    assert est.se == pytest.approx(math.sqrt((17 / 6 + 0.5) / 8))
    df = (17 / 6 + 0.5) ** 2 / ((17 / 6) ** 2 / 3 + 0.5 ** 2)
    assert est.hi - est.delta == pytest.approx(stats.sps.t.ppf(0.975, df) * est.se)
    # a seed effect that is much larger than the item noise makes the interval much wider than one seed's
    shifted = [np.array([1.0, 1.1, 0.9, 1.0]), np.array([3.0, 3.1, 2.9, 3.0])]
    wide = stats.paired(shifted, zero, binary=False)
    one = stats.paired(shifted[:1], zero[:1], binary=False)
    assert wide.hi - wide.lo > 20 * (one.hi - one.lo)


def test_a_repeated_seed_adds_no_information():
    a = np.array([1.0, 2, 3, 4])
    twice = stats.paired([a, a], [np.zeros(4)] * 2, binary=False)  # MS_seeds = MS_error = 0: items only
    once = stats.paired([a], [np.zeros(4)], binary=False)
    assert twice.se == pytest.approx(once.se) == pytest.approx(np.std(a, ddof=1) / 2)


def test_clustered_items_use_the_cluster_robust_se():
    # two prompts with 2 and 1 instructions: d = (1, 1 | 0) and (0 | 1) ...
    d = np.array([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    clusters = ["p1", "p1", "p2", "p3", "p3", "p4"]
    u = stats.cluster_totals(d, clusters)
    assert u.mean() == pytest.approx(d.mean())  # the linearised scores keep the mean
    mean = d.mean()
    totals, sizes = np.array([2.0, 0, 1, 0]), np.array([2.0, 1, 2, 1])
    by_hand = math.sqrt(((totals - mean * sizes) ** 2).sum() / 3 / 4) * 4 / 6  # sqrt(G/(G-1) sum r^2) / N
    est = stats.paired([d], [np.zeros(6)], clusters=clusters, binary=False)
    assert est.se == pytest.approx(by_hand)


def test_binary_one_seed_uses_exact_mcnemar_and_tango():
    a = np.array([1, 1, 1, 0, 0, 1, 0, 1, 0, 0.0])
    b = np.array([0, 0, 0, 0, 0, 1, 0, 1, 0, 0.0])  # 3 discordant, all for A
    est = stats.paired([a], [b])
    assert est.delta == pytest.approx(0.3) and est.p == pytest.approx(0.25)  # 2 * 0.5^3
    assert est.lo < 0 < est.hi  # 3 discordant pairs of 10 cannot exclude 0
    assert stats.mcnemar_exact(6, 0) == pytest.approx(2 * 0.5 ** 6)


def test_tango_interval_is_not_degenerate_with_zero_or_one_discordant_pair():
    lo, hi = stats.tango_interval(0, 0, 32)
    assert lo == pytest.approx(-hi) and hi == pytest.approx(1.96 ** 2 / (32 + 1.96 ** 2), rel=1e-3)  # n d/(1-d) = z^2
    lo1, hi1 = stats.tango_interval(1, 0, 32)
    assert lo1 < 0 < 1 / 32 < hi1
    one = np.zeros(32)
    one[0] = 1
    normal = stats.normal_estimate(one)
    assert normal.hi - normal.lo < hi1 - lo1  # the normal interval is too narrow here (see the coverage check)


def test_undefined_uncertainty_has_a_reason():
    est = stats.paired([], [])
    assert not est.defined and est.reason == stats.NO_ITEMS
    assert stats.align([1, 0], ["a", "b"], [1, 1], ["a", "c"]) is None


def test_holm_adjusts_within_the_family_and_skips_missing():
    assert stats.holm([0.01, 0.04, None, 0.03]) == [pytest.approx(0.03), pytest.approx(0.06), None, pytest.approx(0.06)]
    assert stats.holm([0.5]) == [0.5]


def test_power_and_sample_size_agree():
    n = stats.n_for_power(0.05, 0.4)
    assert stats.power_paired_binary(n, 0.05, 0.16) == pytest.approx(0.8, abs=0.01)  # sd^2 = 0.16 - 0.05^2 ~ 0.4^2
    assert stats.mde(0.03) == pytest.approx(0.06) and stats.mde(None) is None


def test_matched_gain_bootstrap_interpolates_per_resample_and_counts_reach():
    B = 4
    curve = stats.Curve(domain=[np.zeros(B), np.array([10.0, 10, 10, 4])], metric=[np.zeros(B), np.array([2.0, 4, 6, 8])])
    values = stats.curve_values(curve, 5.0)
    assert values[:3] == pytest.approx([1.0, 2.0, 3.0]) and math.isnan(values[3])  # the 4th never reaches +5
    shifted = stats.Curve(domain=[np.array([2.0, 0, 0, 0]), np.array([12.0, 10, 10, 10])], metric=curve.metric)
    assert stats.curve_values(shifted, 5.0)[0] == pytest.approx(1.0)  # the gain counts from the resample's own initial score
    summary = stats.bootstrap_summary(np.array([1.0] * 30 + [np.nan] * 10), 1.0)
    assert summary["reach"] == pytest.approx(0.75) and summary["lo"] == summary["hi"] == 1.0
    idx = stats.resample_indices(3, 5, np.random.default_rng(0), clusters=["a", "a", "b"])
    assert all(sorted(r[r >= 0].tolist()) in ([0, 0, 1, 1], [0, 1, 2], [2, 2]) for r in idx)
    assert stats.resampled_means(np.array([1.0, 1.0, 4.0]), np.array([[0, 1, 2], [2, 2, -1]])).tolist() == [2.0, 4.0]


def test_coverage_self_check_fast():
    """benchmarks/bench_ci_coverage.py on 300 studies: every printed interval near 95 %, the normal one failing
    where it must (the full run, 4000 studies, is in docs/evaluation.md)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_ci_coverage

    result = bench_ci_coverage.run(studies=300, seed=1, boot=100)
    for key, value in result["checks"].items():
        assert 0.90 <= value <= 0.99, (key, value)  # 0.95 +- 3 Monte-Carlo SEs at 300 studies
    assert result["coverage"]["binary_1_discordant_n32"]["normal"] < 0.8
    assert result["coverage"]["binary_1_discordant_n32"]["tango"] >= 0.95
    assert result["coverage"]["seeds_2"]["items_only"] < result["coverage"]["seeds_2"]["two_way"]
    assert result["coverage"]["binary_2_seeds_few_discordant"]["pooled_mcnemar"] < result["coverage"]["binary_2_seeds_few_discordant"]["two_way"]
