"""Means with 95% confidence intervals over replicates (seeds): Student t, no SciPy.

A conclusion over seeds needs its spread: the interval is mean ± t(0.975, n-1) · s / √n, with s the
sample standard deviation. Ratios (BN's effect on a positive quantity) are averaged on the log
scale, so 2x and 0.5x are symmetric and the interval of a ratio never crosses zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# t(0.975, df) for df = 1..30 (two-sided 95%); beyond, interpolated linearly in 1/df towards the
# normal quantile, which is within 1e-3 of the exact value.
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
_Z975 = 1.959964


def t975(df: int) -> float:
    """The 97.5th percentile of Student's t with ``df`` degrees of freedom (df >= 1)."""
    if df < 1:
        raise ValueError(f"t975: df must be at least 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    last = len(_T975)
    return _Z975 + (_T975[-1] - _Z975) * last / df


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` replicates and its 95% interval (``low``/``high`` are None for n < 2)."""

    mean: float
    low: float | None
    high: float | None
    n: int

    def excludes(self, value: float) -> bool:
        """True when the interval lies wholly on one side of ``value`` (a clear effect)."""
        return self.low is not None and self.high is not None and (self.low > value or self.high < value)


def mean_interval(values: Sequence[float]) -> Interval | None:
    """Mean and Student t 95% interval of the finite ``values``; None when there are none."""
    xs = [float(v) for v in values if math.isfinite(v)]
    if not xs:
        return None
    n = len(xs)
    mean = math.fsum(xs) / n
    if n < 2:
        return Interval(mean, None, None, n)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def ratio_interval(ratios: Sequence[float]) -> Interval | None:
    """Geometric mean of positive ``ratios`` and its interval (a t interval of their logs, mapped back)."""
    logs = [math.log(r) for r in ratios if math.isfinite(r) and r > 0]
    found = mean_interval(logs)
    if found is None:
        return None
    low = math.exp(found.low) if found.low is not None else None
    high = math.exp(found.high) if found.high is not None else None
    return Interval(math.exp(found.mean), low, high, found.n)
