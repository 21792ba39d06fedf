"""Measured J/token fed back into the profile: one energy scale per GPU product x model.

The node agents publish, per node, the energy per output token they measured
and the operating point it was measured at (mean output tokens/s of an
instance and mean SM clock, token-weighted over the same window). The profile
is compared with each measurement *at that operating point*: the batch at which
the profile's decode throughput at that clock equals the measured tokens/s, so
a node that ran lightly loaded (high J/token by nature) is not mistaken for a
wrong profile. Each node gives a ratio ``r_i = measured_i / eps_profile(b_i, f_i)``.

The correction is one scale factor ``s`` on the profile's power (busy and
idle), so the curve keeps its shape and every eps it yields is multiplied by
``s`` (docs/feedback.md):

* fresh: entries older than ``max_age_s`` or without an operating point are
  ignored;
* outliers: ratios whose log is further than ``mad_k`` robust standard
  deviations (1.4826 MAD, floored at ``mad_floor``) from the median log ratio
  across nodes are rejected;
* blend: ``log s = sum(n_i log r_i) / (prior_tokens + sum n_i)`` over the kept
  nodes, ``n_i`` their token counts: a sample-weighted geometric mean shrunk
  towards the profile (``s = 1``) with the profile worth ``prior_tokens``;
* enough: below ``min_tokens`` kept tokens the profile is used unchanged;
* bounds: ``s`` is clipped to ``[min_scale, max_scale]``.

Drift is ``|s - 1| > drift_threshold``. Pure: callers pass ``now``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime

import numpy as np

from joulepool.core.profiles import BatchPoint, Figure, ServingProfile

#: 1 / Phi^-1(3/4): MAD of a normal sample times this is its standard deviation
MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class FeedbackParams:
    """How measurements correct a profile (defaults documented in docs/feedback.md)."""

    #: measurements older than this are stale, seconds (agents publish every ~60 s)
    max_age_s: float = 900.0
    #: kept output tokens needed before the profile is corrected at all
    min_tokens: float = 2000.0
    #: weight of the profile as a prior, in output tokens
    prior_tokens: float = 500.0
    #: reject ratios more than this many robust standard deviations from the median
    mad_k: float = 3.0
    #: floor of the robust standard deviation of log ratios (nodes that agree exactly)
    mad_floor: float = 0.05
    min_scale: float = 0.2
    max_scale: float = 5.0
    #: |scale - 1| above this is profile drift (an event, a condition, a metric)
    drift_threshold: float = 0.15

    def __post_init__(self) -> None:
        if self.max_age_s <= 0 or self.min_tokens < 0 or self.prior_tokens < 0:
            raise ValueError("max_age_s must be > 0, min_tokens and prior_tokens >= 0")
        if self.mad_k <= 0 or self.mad_floor <= 0 or self.drift_threshold <= 0:
            raise ValueError("mad_k, mad_floor and drift_threshold must be > 0")
        if not 0.0 < self.min_scale <= 1.0 <= self.max_scale:
            raise ValueError("need 0 < min_scale <= 1 <= max_scale")


@dataclass(frozen=True)
class Measured:
    """One node's published measurement of one GPU product x model."""

    joules_per_token: float
    tokens: float  # output tokens behind the estimate
    node: str = ""
    updated_at: datetime | None = None
    tokens_per_second: float | None = None  # mean output tokens/s of one instance
    clock_mhz: float | None = None  # mean SM clock over the window


@dataclass(frozen=True)
class Correction:
    """The scale on a profile's eps and how it was reached."""

    scale: float = 1.0
    tokens: float = 0.0  # tokens of the kept measurements
    used: tuple[str, ...] = ()  # nodes kept
    rejected: tuple[str, ...] = ()  # nodes rejected as outliers
    stale: tuple[str, ...] = ()  # nodes ignored: too old or no operating point
    drifted: bool = False
    reason: str = "no measurements"

    @property
    def applied(self) -> bool:
        return self.scale != 1.0


def measured_batch(profile: ServingProfile, tokens_per_s: float,
                   clock_mhz: float | None) -> float:
    """The batch at which ``profile`` decodes ``tokens_per_s`` at ``clock_mhz``.

    Decode throughput rises with the batch, so this inverts it on the batch
    grid 1..max_batch (linear between batches), clamped to that range.
    """
    b = np.arange(1, int(profile.max_batch.value) + 1, dtype=np.float64)
    tps = np.maximum.accumulate(np.asarray(profile.decode_tokens_per_s(b, clock_mhz)))
    return float(np.interp(tokens_per_s, tps, b))


def ratio_at_operating_point(profile: ServingProfile, m: Measured) -> float:
    """measured / profile eps at the batch and clock the measurement was taken at."""
    if m.tokens_per_second is None:
        raise ValueError("measurement has no operating point")
    batch = measured_batch(profile, m.tokens_per_second, m.clock_mhz)
    modelled = float(profile.joules_per_token(batch, m.clock_mhz))
    return m.joules_per_token / modelled


def _fresh(ms: Sequence[Measured], now: datetime,
           p: FeedbackParams) -> tuple[list[Measured], list[str]]:
    """Measurements young enough and with an operating point; the nodes of the others."""
    fresh: list[Measured] = []
    stale: list[str] = []
    for m in ms:
        age = (now - m.updated_at).total_seconds() if m.updated_at is not None else math.inf
        usable = (m.tokens_per_second is not None and m.tokens_per_second > 0
                  and m.joules_per_token > 0 and m.tokens > 0)
        if usable and age <= p.max_age_s:
            fresh.append(m)
        else:
            stale.append(m.node)
    return fresh, stale


def inliers(log_ratios: Sequence[float], p: FeedbackParams) -> list[bool]:
    """Which log ratios lie within ``mad_k`` robust standard deviations of their median."""
    x = np.asarray(log_ratios, dtype=np.float64)
    if x.size == 0:
        return []
    med = float(np.median(x))
    sigma = max(MAD_TO_SIGMA * float(np.median(np.abs(x - med))), p.mad_floor)
    return [bool(abs(v - med) <= p.mad_k * sigma) for v in x]


def correction(profile: ServingProfile, measurements: Sequence[Measured], now: datetime,
               params: FeedbackParams | None = None) -> Correction:
    """The eps scale of ``profile`` from the nodes' ``measurements`` (module docstring)."""
    p = params or FeedbackParams()
    fresh, stale = _fresh(measurements, now, p)
    if not fresh:
        return Correction(stale=tuple(stale),
                          reason="no fresh measurement" if stale else "no measurements")
    logs = [math.log(ratio_at_operating_point(profile, m)) for m in fresh]
    keep = inliers(logs, p)
    kept = [(m, lr) for m, lr, k in zip(fresh, logs, keep, strict=True) if k]
    rejected = tuple(m.node for m, k in zip(fresh, keep, strict=True) if not k)
    tokens = sum(m.tokens for m, _ in kept)
    used = tuple(m.node for m, _ in kept)
    if tokens < p.min_tokens:
        return Correction(1.0, tokens, used, rejected, tuple(stale),
                          reason=f"{tokens:.0f} of {p.min_tokens:.0f} tokens needed")
    log_s = sum(m.tokens * lr for m, lr in kept) / (p.prior_tokens + tokens)
    scale = min(max(math.exp(log_s), p.min_scale), p.max_scale)
    return Correction(scale, tokens, used, rejected, tuple(stale),
                      drifted=abs(scale - 1.0) > p.drift_threshold,
                      reason=f"measured on {len(used)} node(s), {tokens:.0f} tokens")


def corrected_profile(profile: ServingProfile, scale: float) -> ServingProfile:
    """``profile`` with its busy and idle power times ``scale``: every eps times ``scale``.

    The clock law (busy = idle + dynamic x clock factors) is linear in the
    powers, so scaling both scales ``power_w`` and ``joules_per_token``
    exactly, at every batch and clock; latency is untouched.
    """
    if scale <= 0 or not math.isfinite(scale):
        raise ValueError("scale must be a positive finite number")
    if scale == 1.0:
        return profile
    src = f"measured x{scale:.3f}"

    def times(f: Figure) -> Figure:
        return Figure(f.value * scale, f"{f.source}; {src}")

    points = tuple(BatchPoint(pt.batch, pt.itl_ms, times(pt.power_w)) for pt in profile.points)
    product = replace(profile.product, idle_w=times(profile.product.idle_w))
    return replace(profile, product=product, points=points)


@dataclass
class OperatingPointEstimator:
    """Mean output tokens/s and SM clock of the periods behind a J/token estimate.

    Forgets with the same half-life as
    :class:`joulepool.core.estimators.EnergyPerTokenEstimator` and, like it,
    counts only periods with tokens, so both describe the same window.
    """

    half_life_s: float
    tokens: float = 0.0
    seconds: float = 0.0
    clock_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.half_life_s <= 0:
            raise ValueError("half_life_s must be > 0")

    def update(self, tokens: float, dt_s: float, clock_mhz: float) -> None:
        """Feed one period of ``dt_s`` seconds with ``tokens`` output tokens at ``clock_mhz``."""
        if tokens < 0 or dt_s < 0:
            raise ValueError("tokens and dt must be >= 0")
        decay = 0.5 ** (dt_s / self.half_life_s)
        self.tokens *= decay
        self.seconds *= decay
        self.clock_seconds *= decay
        if tokens > 0 and dt_s > 0:
            self.tokens += tokens
            self.seconds += dt_s
            self.clock_seconds += clock_mhz * dt_s

    @property
    def tokens_per_second(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 else None

    @property
    def clock_mhz(self) -> float | None:
        return self.clock_seconds / self.seconds if self.seconds > 0 else None


__all__ = [
    "Correction",
    "FeedbackParams",
    "Measured",
    "OperatingPointEstimator",
    "corrected_profile",
    "correction",
    "inliers",
    "measured_batch",
    "ratio_at_operating_point",
]
