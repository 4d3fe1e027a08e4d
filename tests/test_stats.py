"""Paired statistics: known numbers, pairing by document, macro combination."""

import math

import numpy as np
import pytest

from rt_lib.evaluation import stats

# 10 documents: the variant fixes two that the reference got wrong, breaks none.
VARIANT = [1, 1, 0, 1, 0, 1, 1, 1, 0, 1]
REFERENCE = [1, 0, 0, 1, 0, 1, 0, 1, 0, 1]


def test_paired_t_interval_known_numbers():
    # d = [0,1,0,0,0,0,1,0,0,0]: mean 0.2, sd = sqrt(1.6 / 9) = 0.421637, se = 0.133333,
    # t(0.975, df=9) = 2.262157 -> half width 0.301621
    r = stats.paired_difference(VARIANT, REFERENCE, confidence=0.95)
    assert r.n == 10 and r.method == "t"
    assert r.diff == pytest.approx(0.2)
    assert r.se == pytest.approx(math.sqrt(1.6 / 9) / math.sqrt(10))
    assert r.ci_low == pytest.approx(0.2 - 0.3016214, abs=1e-6)
    assert r.ci_high == pytest.approx(0.2 + 0.3016214, abs=1e-6)
    # 90%: t(0.95, 9) = 1.833113
    r90 = stats.paired_difference(VARIANT, REFERENCE, confidence=0.90)
    assert r90.ci_high - r90.diff == pytest.approx(1.833113 * r.se, abs=1e-6)


def test_t_interval_agrees_with_scipys_paired_t_test():
    from scipy import stats as scipy_stats

    rng = np.random.default_rng(2)
    ref = (rng.random(300) < 0.55).astype(float)
    var = np.where(rng.random(300) < 0.1, 1 - ref, ref)
    for confidence in (0.9, 0.95, 0.99):
        r = stats.paired_difference(var, ref, confidence=confidence)
        ci = scipy_stats.ttest_rel(var, ref).confidence_interval(confidence)
        assert (r.ci_low, r.ci_high) == pytest.approx((ci.low, ci.high), abs=1e-12)
        assert r.se == scipy_stats.sem(var - ref)


def test_identical_scores_give_a_zero_width_interval():
    r = stats.paired_difference(REFERENCE, REFERENCE)
    assert (r.diff, r.ci_low, r.ci_high, r.se) == (0.0, 0.0, 0.0, 0.0)


def test_single_document_has_no_interval():
    r = stats.paired_difference([1.0], [0.0])
    assert r.diff == 1.0 and math.isnan(r.ci_low) and math.isnan(r.ci_high)


def test_paired_interval_is_much_tighter_than_independent_error_bars():
    rng = np.random.default_rng(0)
    ref = (rng.random(2000) < 0.6).astype(float)
    var = ref.copy()
    flip = rng.choice(2000, 40, replace=False)  # the variant changes 2% of the answers
    var[flip] = 1 - var[flip]
    paired = stats.paired_difference(var, ref)
    independent_se = math.sqrt(var.var(ddof=1) / 2000 + ref.var(ddof=1) / 2000)
    assert paired.se < independent_se / 3
    assert paired.ci_low <= paired.diff <= paired.ci_high


def test_bootstrap_agrees_with_t_on_a_large_sample():
    rng = np.random.default_rng(1)
    ref = (rng.random(3000) < 0.5).astype(float)
    var = np.where(rng.random(3000) < 0.05, 1 - ref, ref)
    t = stats.paired_difference(var, ref, method="t")
    b = stats.paired_difference(var, ref, method="bootstrap", n_boot=4000, seed=0)
    assert b.diff == t.diff
    assert b.ci_low == pytest.approx(t.ci_low, abs=0.002)
    assert b.ci_high == pytest.approx(t.ci_high, abs=0.002)
    again = stats.paired_difference(var, ref, method="bootstrap", n_boot=4000, seed=0)
    assert (again.ci_low, again.ci_high) == (b.ci_low, b.ci_high)  # seeded


def test_pair_scores_aligns_by_document_and_refuses_mismatches():
    v = {("piqa", 2): 1.0, ("piqa", 0): 0.0, ("piqa", 1): 1.0}
    r = {("piqa", 1): 0.0, ("piqa", 2): 1.0, ("piqa", 0): 0.0}
    keys, x, y = stats.pair_scores(v, r)
    assert keys == [("piqa", 0), ("piqa", 1), ("piqa", 2)]
    assert x.tolist() == [0.0, 1.0, 1.0] and y.tolist() == [0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="same documents"):
        stats.pair_scores(v, {("piqa", 0): 1.0})


def test_macro_difference_combines_independent_tasks():
    a = stats.PairedDifference(0.02, 0, 0, 100, 0.03, 0.95, "t")
    b = stats.PairedDifference(-0.04, 0, 0, 400, 0.04, 0.95, "t")
    m = stats.macro_difference([a, b])
    assert m.diff == pytest.approx(-0.01)
    assert m.se == pytest.approx(0.025)  # sqrt(0.03^2 + 0.04^2) / 2
    assert m.ci_high - m.diff == pytest.approx(1.959964 * 0.025, abs=1e-6)
    assert m.n == 500
    assert stats.macro_stderr([0.03, 0.04]) == pytest.approx(0.025)


def test_bad_arguments():
    with pytest.raises(ValueError, match="equal length"):
        stats.paired_difference([1, 0], [1])
    with pytest.raises(ValueError, match="no paired"):
        stats.paired_difference([], [])
    with pytest.raises(ValueError, match="confidence"):
        stats.paired_difference([1, 0], [0, 0], confidence=95)
    with pytest.raises(ValueError, match="method"):
        stats.paired_difference([1, 0], [0, 0], method="z")
