"""Small statistics for comparing seeds, with no scipy: Student-t tail probabilities and Welch's t-test.

The two-sided p-value of a t statistic with `df` degrees of freedom is the regularized incomplete
beta function I_x(df/2, 1/2) at x = df / (df + t^2). I_x(a, b) is evaluated with its continued
fraction (modified Lentz method), using the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) where the
fraction converges slowly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

_EPS = 1e-15
_TINY = 1e-300
_MAX_ITER = 500


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (converges fast for x < (a + 1) / (a + b + 2))."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    result = d
    for m in range(1, _MAX_ITER + 1):
        for numerator in (_even_term(a, b, x, m), _odd_term(a, b, x, m)):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + numerator / c
            c = c if abs(c) > _TINY else _TINY
            result *= c * d
        if abs(c * d - 1.0) < _EPS:
            break
    return result


def _even_term(a: float, b: float, x: float, m: int) -> float:
    return m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))


def _odd_term(a: float, b: float, x: float, m: int) -> float:
    return -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))


def _log_beta_prefactor(a: float, b: float, x: float) -> float:
    """log of x^a (1-x)^b / B(a, b)."""
    return math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if a <= 0 or b <= 0:
        raise ValueError(f"incomplete beta needs a, b > 0 (got a={a}, b={b})")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"incomplete beta needs 0 <= x <= 1 (got {x})")
    if x == 0.0 or x == 1.0:
        return x
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(_log_beta_prefactor(a, b, x)) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(_log_beta_prefactor(b, a, 1.0 - x)) * _beta_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom (df may be fractional, as in Welch)."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0 (got {df})")
    if math.isinf(t):
        return 0.0
    return regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    tail = t_two_sided_p(t, df) / 2.0
    return 1.0 - tail if t > 0 else tail


@dataclass(frozen=True)
class WelchResult:
    t: float
    df: float
    p: float  # two-sided


def _mean_var(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, sum((v - mean) ** 2 for v in values) / (len(values) - 1)


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> Optional[WelchResult]:
    """Welch's unequal-variance t-test of mean(a) - mean(b); None if a group has fewer than two
    values or both groups have zero variance (the test is undefined)."""
    if len(a) < 2 or len(b) < 2:
        return None
    mean_a, var_a = _mean_var(a)
    mean_b, var_b = _mean_var(b)
    se2_a, se2_b = var_a / len(a), var_b / len(b)
    se2 = se2_a + se2_b
    if se2 <= 0:
        return None
    t = (mean_a - mean_b) / math.sqrt(se2)
    df = se2**2 / (se2_a**2 / (len(a) - 1) + se2_b**2 / (len(b) - 1))
    return WelchResult(t=t, df=df, p=t_two_sided_p(t, df))
