"""Online estimators the node agent feeds from counters: pure, typed, no I/O.

* :func:`counter_delta` - increase of a monotonic counter between two reads,
  with Prometheus' reset rule (a drop means the counter restarted from 0).
* :func:`histogram_quantile` - a quantile from cumulative histogram buckets,
  by Prometheus' rule (linear inside the bucket, the highest finite bound for
  the +Inf bucket), so the agent reads vLLM histograms as PromQL would.
* :func:`bucket_delta` - the buckets observed between two scrapes.
* :func:`trapezoid_energy_j` - energy from two power readings, for GPUs whose
  energy counter is not supported.
* :class:`EnergyPerTokenEstimator` - eps (J per output token) from energy and
  token-count deltas, exponentially forgetting with a half-life in seconds.
  It closes JouleSched's "profile drift" limitation: the offline profile is
  corrected by what the GPU actually spends.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def counter_delta(new: float, old: float | None) -> float:
    """Increase of a monotonic counter; a drop is a reset, so the new value is the increase."""
    if old is None:
        return 0.0
    if new < old:
        return max(new, 0.0)
    return new - old


def bucket_delta(new: Sequence[float], old: Sequence[float] | None) -> list[float]:
    """Cumulative bucket counts observed between two scrapes (a reset restarts from 0)."""
    if old is None or len(old) != len(new):
        return [float(c) for c in new]
    if any(n < o for n, o in zip(new, old, strict=True)):
        return [float(c) for c in new]
    return [float(n - o) for n, o in zip(new, old, strict=True)]


def histogram_quantile(
    q: float, upper_bounds: Sequence[float], cumulative: Sequence[float]
) -> float | None:
    """The q-quantile of a cumulative histogram, as PromQL's ``histogram_quantile``.

    ``upper_bounds`` ascend and normally end with ``inf``; ``cumulative[i]``
    counts observations <= ``upper_bounds[i]``. Returns None when the
    histogram is empty. Inside a bucket the value is interpolated linearly
    (from 0 for the first bucket); a quantile in the +Inf bucket returns the
    highest finite bound.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError("quantile must be in [0, 1]")
    if len(upper_bounds) != len(cumulative) or not upper_bounds:
        raise ValueError("need one cumulative count per bucket bound")
    total = float(cumulative[-1])
    if total <= 0:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in zip(upper_bounds, cumulative, strict=True):
        if count >= rank and count > prev_count:
            if math.isinf(bound):
                return prev_bound
            frac = (rank - prev_count) / (count - prev_count)
            return prev_bound + (bound - prev_bound) * min(max(frac, 0.0), 1.0)
        if not math.isinf(bound):
            prev_bound = float(bound)
        prev_count = float(count)
    return prev_bound


def trapezoid_energy_j(power0_w: float, power1_w: float, dt_s: float) -> float:
    """Energy between two power readings ``dt_s`` apart (trapezoid rule)."""
    if dt_s < 0:
        raise ValueError("dt must be >= 0")
    return 0.5 * (power0_w + power1_w) * dt_s


#: half-life of online J/token estimates (node agent and router), seconds
EPS_HALF_LIFE_S = 120.0


@dataclass
class EnergyPerTokenEstimator:
    """eps = smoothed energy / smoothed tokens, forgetting with a half-life.

    Each period contributes (joules, tokens). Both running sums decay by
    ``0.5 ** (dt / half_life_s)``, so the estimate is a ratio of exponentially
    weighted sums: token-weighted and unbiased by how many periods were idle.
    Periods without tokens add no energy (idle draw is not a per-token cost;
    the profile's idle power carries it) but still age the sums.
    """

    half_life_s: float = EPS_HALF_LIFE_S
    min_tokens: float = 1.0
    energy_j: float = 0.0
    tokens: float = 0.0
    samples: int = 0

    def __post_init__(self) -> None:
        if self.half_life_s <= 0 or self.min_tokens <= 0:
            raise ValueError("half_life_s and min_tokens must be positive")

    def update(self, energy_j: float, tokens: float, dt_s: float) -> float | None:
        """Feed one period; return the current estimate (None until enough tokens)."""
        if energy_j < 0 or tokens < 0 or dt_s < 0:
            raise ValueError("energy, tokens and dt must be >= 0")
        decay = 0.5 ** (dt_s / self.half_life_s)
        self.energy_j *= decay
        self.tokens *= decay
        if tokens > 0:
            self.energy_j += energy_j
            self.tokens += tokens
            self.samples += round(tokens)
        return self.value

    @property
    def value(self) -> float | None:
        if self.tokens < self.min_tokens:
            return None
        return self.energy_j / self.tokens
