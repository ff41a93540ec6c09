"""95% intervals for differences between methods: paired t over seeds, or Welch from summaries.

The experiment compares each method with `prefix` on the same seeds: within a seed both
see the same training subset, dev subset and data order, so the per-seed difference
removes what the seed does to both. The interval is Student's t on those differences.
A paired bootstrap would drop the normality assumption, but with 3 to 5 seeds it has at
most a few dozen distinct resamples, and its percentile interval is known to be too
narrow at that size (it behaves like a z interval with a variance shrunk by (n-1)/n);
the t interval keeps the right width for small n and is exact when the differences are
normal. Where only means and standard deviations survive (runs whose per-seed records
were not kept), the unpaired Welch interval is the honest substitute, and is said so.

No SciPy: the t quantile comes from the regularised incomplete beta function (Lentz's
continued fraction) and bisection, which is accurate to 1e-10 for the degrees of freedom
used here.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < eps:
            break
    return result


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


@dataclass(frozen=True)
class Interval:
    """A mean difference and its two-sided interval; `method` names how it was made."""

    mean: float
    low: float
    high: float
    n: int
    method: str

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0.0 or self.high < 0.0

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2.0


def mean_interval(values: Sequence[float], level: float = 0.95, method: str = "t") -> Interval:
    """Student's t interval for the mean of `values` (at least 2)."""
    n = len(values)
    if n < 2:
        raise ValueError("an interval needs at least two values")
    mean = statistics.fmean(values)
    half = t_quantile(0.5 + level / 2.0, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, method)


def paired_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    """Interval for mean(a - b) over pairs (a_i, b_i) from the same seed."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} values paired with {len(b)}")
    return mean_interval([x - y for x, y in zip(a, b, strict=True)], level, "paired t")


def welch_interval(
    mean_a: float,
    sd_a: float,
    n_a: int,
    mean_b: float,
    sd_b: float,
    n_b: int,
    level: float = 0.95,
) -> Interval:
    """Interval for mean_a - mean_b from two summaries (unpaired, unequal variances)."""
    if n_a < 2 or n_b < 2:
        raise ValueError("an interval needs at least two values on each side")
    va, vb = sd_a * sd_a / n_a, sd_b * sd_b / n_b
    diff = mean_a - mean_b
    if va + vb == 0.0:
        return Interval(diff, diff, diff, min(n_a, n_b), "Welch t")
    df = (va + vb) ** 2 / (va * va / (n_a - 1) + vb * vb / (n_b - 1))
    half = t_quantile(0.5 + level / 2.0, df) * math.sqrt(va + vb)
    return Interval(diff, diff - half, diff + half, min(n_a, n_b), "Welch t")
