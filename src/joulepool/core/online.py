"""Online estimators fed by completion reports: smoothing, windowed rates, eps drift.

JouleSched profiles eps offline and lists profile drift as a limitation
(section 7); joulepool closes it by scaling the profiled J/token of each
endpoint by the ratio of measured to modelled energy over the recent tokens,
both forgotten with the same half-life (core.estimators.EnergyPerTokenEstimator):

    scale      = clip(E_measured / E_modelled, lo, hi)   (1 until enough tokens)
    eps_online = scale * eps_profile(batch, clock)

Pure: no clocks are read here; callers pass ``now``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from joulepool.core.estimators import EPS_HALF_LIFE_S, EnergyPerTokenEstimator


@dataclass
class ExpSmoothed:
    """Exponentially weighted moving average; the first sample seeds it."""

    alpha: float
    value: float | None = None
    samples: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError("alpha must be in (0, 1]")

    def update(self, x: float) -> float | None:
        """Feed one sample (non-finite samples are ignored); return the new value."""
        x = float(x)
        if not math.isfinite(x):
            return self.value
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)
        self.samples += 1
        return self.value

    def get(self, default: float) -> float:
        return default if self.value is None else self.value


class SlidingWindowRate:
    """Fraction of events that were hits (e.g. deadline misses) in the last ``window_s``.

    Memory is bounded by ``max_events``: the oldest events drop first.
    """

    def __init__(self, window_s: float, max_events: int = 100_000) -> None:
        if window_s <= 0 or max_events < 1:
            raise ValueError("window_s must be > 0 and max_events >= 1")
        self.window_s = float(window_s)
        self._events: deque[tuple[float, bool]] = deque(maxlen=max_events)
        self._hits = 0

    def _expire(self, now: float) -> None:
        horizon = now - self.window_s
        ev = self._events
        while ev and ev[0][0] < horizon:
            _, hit = ev.popleft()
            self._hits -= hit

    def add(self, now: float, hit: bool) -> None:
        ev = self._events
        if ev.maxlen is not None and len(ev) == ev.maxlen:
            _, old = ev.popleft()
            self._hits -= old
        ev.append((float(now), bool(hit)))
        self._hits += bool(hit)
        self._expire(now)

    def count(self, now: float) -> int:
        self._expire(now)
        return len(self._events)

    def rate(self, now: float) -> float | None:
        """Hit fraction in the window, or None when the window is empty."""
        self._expire(now)
        n = len(self._events)
        return self._hits / n if n else None


@dataclass
class EpsEstimator:
    """Online correction of an endpoint's profiled J/token from measured joules.

    Two :class:`joulepool.core.estimators.EnergyPerTokenEstimator` with the same
    half-life accumulate the measured and the modelled energy of the same
    tokens; their ratio (token-weighted, so batch-aware through the model) is
    the scale, clipped to [min_scale, max_scale]. Until ``min_tokens`` tokens
    have been reported the scale is 1 (the profile is the prior).
    """

    half_life_s: float = EPS_HALF_LIFE_S
    min_tokens: float = 1000.0
    min_scale: float = 0.2
    max_scale: float = 5.0
    _measured: EnergyPerTokenEstimator = field(init=False)
    _modelled: EnergyPerTokenEstimator = field(init=False)
    _last_t: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if not 0.0 < self.min_scale <= 1.0 <= self.max_scale:
            raise ValueError("need 0 < min_scale <= 1 <= max_scale")
        self._measured = EnergyPerTokenEstimator(self.half_life_s, self.min_tokens)
        self._modelled = EnergyPerTokenEstimator(self.half_life_s, self.min_tokens)

    @property
    def samples(self) -> int:
        return self._measured.samples

    @property
    def scale(self) -> float:
        """Measured / modelled energy of the recent tokens; 1.0 before enough tokens."""
        meas, model = self._measured.value, self._modelled.value
        if meas is None or model is None or model <= 0:
            return 1.0
        return min(max(meas / model, self.min_scale), self.max_scale)

    def observe(self, joules: float, tokens: float, modelled_eps: float, now: float) -> float:
        """Feed one completion: ``joules`` measured for ``tokens`` output tokens at ``now``.

        Samples without tokens, energy or a positive modelled eps are ignored.
        Returns the (possibly unchanged) scale.
        """
        if not (tokens > 0 and joules > 0 and modelled_eps > 0):
            return self.scale
        if not (math.isfinite(joules) and math.isfinite(tokens) and math.isfinite(modelled_eps)):
            return self.scale
        dt = 0.0 if self._last_t is None else max(float(now) - self._last_t, 0.0)
        self._last_t = float(now)
        self._measured.update(float(joules), float(tokens), dt)
        self._modelled.update(float(modelled_eps) * float(tokens), float(tokens), dt)
        return self.scale

    def eps(self, modelled_eps: float) -> float:
        return self.scale * modelled_eps


@dataclass
class IncrementRatio:
    """The ratio of two cumulative counters' increments (e.g. an engine's GPU joules over
    its generated tokens = its measured J/token), over spans of at least ``min_span`` of
    the denominator.

    Each :meth:`update` passes both counters' current values. The first pair is the
    baseline; once the denominator has grown by ``min_span`` since the baseline, the
    ratio of the increments becomes :attr:`value` and the pair the next baseline. A
    counter that went down (its exporter restarted) starts a new baseline; until a span
    completes, the previous value stands (None before the first).
    """

    min_span: float = 1.0
    value: float | None = None
    _base: tuple[float, float] | None = field(init=False, default=None)

    def update(self, numerator: float, denominator: float) -> float | None:
        if not (math.isfinite(numerator) and math.isfinite(denominator)):
            return self.value
        base = self._base
        if base is None or numerator < base[0] or denominator < base[1]:
            self._base = (numerator, denominator)
            return self.value
        span = denominator - base[1]
        if span >= self.min_span and span > 0:
            self.value = (numerator - base[0]) / span
            self._base = (numerator, denominator)
        return self.value
