"""chatlm.runs.stats: the Student-t tail and Welch's t-test against known values and an independent reference."""

from __future__ import annotations

import math

import pytest

from chatlm.runs.stats import regularized_incomplete_beta, t_cdf, t_two_sided_p, welch_t_test


def _normal_two_sided(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2.0))


@pytest.mark.parametrize(
    "t, df, p",
    [
        (2.0, 10, 0.07338803477),  # tables: two-sided p of t=2 with 10 df
        (1.0, 1, 0.5),  # Cauchy: P(|T| > 1) = 1/2 exactly
        (0.0, 7, 1.0),
        (2.228138852, 10, 0.05),  # the 97.5% quantile of t(10)
        (12.7062047, 1, 0.05),  # the 97.5% quantile of t(1)
        (4.604094871, 4, 0.01),  # the 99.5% quantile of t(4)
    ],
)
def test_two_sided_p_known_values(t, df, p):
    assert t_two_sided_p(t, df) == pytest.approx(p, rel=1e-7, abs=1e-12)
    assert t_two_sided_p(-t, df) == pytest.approx(p, rel=1e-7, abs=1e-12)


def test_cauchy_cdf_is_closed_form():
    for t in (-5.0, -0.3, 0.0, 0.7, 3.0, 40.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)


def test_large_df_approaches_the_normal():
    for z in (0.5, 1.0, 1.959963985, 3.0):
        assert t_two_sided_p(z, 1e7) == pytest.approx(_normal_two_sided(z), rel=1e-5)
    assert t_two_sided_p(1.959963985, 1e7) == pytest.approx(0.05, rel=1e-5)
    # far from the normal at small df: heavier tails
    assert t_two_sided_p(1.959963985, 3) > 0.14


def test_incomplete_beta_against_mpmath_and_closed_forms():
    mpmath = pytest.importorskip("mpmath")
    for a, b, x in [(0.5, 0.5, 0.1), (5.0, 0.5, 0.8), (2.5, 7.0, 0.3), (30.0, 0.5, 0.95), (1.0, 3.0, 0.999)]:
        want = float(mpmath.betainc(a, b, 0, x, regularized=True))
        assert regularized_incomplete_beta(a, b, x) == pytest.approx(want, rel=1e-10, abs=1e-14)
    # I_x(1, 1) = x, I_x(a, 1) = x^a
    assert regularized_incomplete_beta(1.0, 1.0, 0.37) == pytest.approx(0.37, abs=1e-14)
    assert regularized_incomplete_beta(3.0, 1.0, 0.5) == pytest.approx(0.125, abs=1e-14)
    assert regularized_incomplete_beta(2.0, 3.0, 0.0) == 0.0 and regularized_incomplete_beta(2.0, 3.0, 1.0) == 1.0
    with pytest.raises(ValueError):
        regularized_incomplete_beta(0.0, 1.0, 0.5)
    with pytest.raises(ValueError):
        t_two_sided_p(1.0, 0)


def test_welch_hand_computed():
    # a = 1..5: mean 3, var 2.5; b = 2,4,..,10: mean 6, var 10.
    # se^2 = 2.5/5 + 10/5 = 2.5 -> t = -3 / sqrt(2.5) = -1.8973666
    # df = 2.5^2 / ((0.5^2)/4 + (2^2)/4) = 6.25 / 1.0625 = 5.8823529
    r = welch_t_test([1, 2, 3, 4, 5], [2, 4, 6, 8, 10])
    assert r is not None
    assert r.t == pytest.approx(-3 / math.sqrt(2.5), rel=1e-12)
    assert r.df == pytest.approx(6.25 / 1.0625, rel=1e-12)
    mpmath = pytest.importorskip("mpmath")
    want = float(mpmath.betainc(r.df / 2, 0.5, 0, r.df / (r.df + r.t**2), regularized=True))
    assert r.p == pytest.approx(want, rel=1e-10)
    assert r.p == pytest.approx(0.1075312, abs=1e-6)
    # equal variances and sizes: Welch's df = 2(n-1), t as Student's pooled test
    r = welch_t_test([0.90, 0.92], [0.85, 0.87])  # both variances 0.0002 -> se^2 = 0.0002
    assert r.df == pytest.approx(2.0) and r.t == pytest.approx(0.05 / math.sqrt(0.0002), rel=1e-9)
    # t(2) has a closed-form tail: p = 1 - t / sqrt(2 + t^2)
    assert r.p == pytest.approx(1 - r.t / math.sqrt(2 + r.t**2), rel=1e-9)


def test_welch_undefined_cases():
    assert welch_t_test([1.0], [1.0, 2.0]) is None
    assert welch_t_test([1.0, 1.0], [2.0, 2.0]) is None  # no variance at all
    r = welch_t_test([1.0, 1.0], [2.0, 3.0])  # one group without variance is fine
    assert r is not None and r.df == pytest.approx(1.0) and 0 < r.p < 1
