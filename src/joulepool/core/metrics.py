"""Summary statistics used to judge schedules: fairness, slowdown, confidence intervals.

Energy and carbon unit conversions live in :mod:`joulepool.core.energy`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


def jain_index(values: npt.ArrayLike) -> float:
    """Jain's fairness index ``(sum x)^2 / (n * sum x^2)``: 1 = all equal, 1/n = one gets all.

    NaNs are ignored (a class that saw no requests has no slowdown); an empty
    or all-zero input is perfectly fair (1.0). Negative values are rejected.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[~np.isnan(x)]
    if x.size == 0:
        return 1.0
    if np.any(x < 0) or not np.all(np.isfinite(x)):
        raise ValueError("Jain's index needs finite, non-negative values")
    sq = float(np.sum(x * x))
    if sq == 0.0:
        return 1.0
    return float(np.sum(x)) ** 2 / (x.size * sq)


def slowdown(latency_s: npt.ArrayLike, ideal_s: npt.ArrayLike) -> FloatArray:
    """Normalised slowdown: latency over the latency the request would see alone."""
    lat = np.asarray(latency_s, dtype=np.float64)
    ideal = np.asarray(ideal_s, dtype=np.float64)
    if np.any(ideal <= 0):
        raise ValueError("ideal latencies must be positive")
    return np.asarray(lat / ideal, dtype=np.float64)


def class_mean_slowdown(
    slowdowns: npt.ArrayLike, classes: npt.ArrayLike, n_classes: int
) -> FloatArray:
    """Mean slowdown per class index 0..n_classes-1 (NaN for a class with no requests)."""
    s = np.asarray(slowdowns, dtype=np.float64)
    c = np.asarray(classes, dtype=np.int64)
    ok = ~np.isnan(s)
    sums = np.bincount(c[ok], weights=s[ok], minlength=n_classes)[:n_classes]
    counts = np.bincount(c[ok], minlength=n_classes)[:n_classes]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(np.where(counts > 0, sums / np.maximum(counts, 1), np.nan))


@dataclass(frozen=True)
class MeanCI:
    """Sample mean with a two-sided Student-t confidence interval."""

    mean: float
    half_width: float  # NaN with fewer than two samples
    n: int
    level: float

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


def mean_ci(samples: npt.ArrayLike, level: float = 0.95) -> MeanCI:
    """Mean and t-interval half width ``t_{(1+level)/2, n-1} * s / sqrt(n)``."""
    from scipy import stats

    if not 0.0 < level < 1.0:
        raise ValueError("confidence level must be in (0, 1)")
    x = np.asarray(samples, dtype=np.float64).ravel()
    n = int(x.size)
    if n == 0:
        return MeanCI(math.nan, math.nan, 0, level)
    mean = float(np.mean(x))
    if n < 2:
        return MeanCI(mean, math.nan, n, level)
    sd = float(np.std(x, ddof=1))
    t = float(stats.t.ppf((1.0 + level) / 2.0, n - 1))
    return MeanCI(mean, t * sd / math.sqrt(n), n, level)


def relative_change(value: float, reference: float) -> float:
    """``value / reference - 1`` (e.g. -0.25 = 25 % less than the reference)."""
    if reference == 0:
        return math.nan
    return value / reference - 1.0
