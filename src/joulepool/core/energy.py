"""Energy and carbon unit conversions, once."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

J_PER_KWH = 3.6e6
J_PER_MJ = 1e6
S_PER_HOUR = 3600.0


def joules_per_token(power_w: float, tokens_per_s: float) -> float:
    """Energy per token of something drawing ``power_w`` while making ``tokens_per_s``."""
    if tokens_per_s <= 0:
        raise ValueError("tokens_per_s must be positive")
    return power_w / tokens_per_s


def megajoules(joules: float) -> float:
    """``joules`` in MJ."""
    return joules / J_PER_MJ


def per_hour(amount: float, seconds: float) -> float:
    """Hourly rate of ``amount`` accrued over ``seconds`` (J -> J/h, g -> g/h, ...)."""
    if seconds <= 0:
        raise ValueError("seconds must be positive")
    return amount / seconds * S_PER_HOUR


def megajoules_per_hour(joules: float, seconds: float) -> float:
    """Mean energy rate, in MJ/h, of ``joules`` spent over ``seconds``."""
    return megajoules(per_hour(joules, seconds))


def grams_co2(joules: float, g_per_kwh: float) -> float:
    """Emissions of ``joules`` of electricity at a grid intensity in gCO2/kWh."""
    return joules / J_PER_KWH * g_per_kwh


def grams_co2_per_hour(power_w: float, g_per_kwh: float) -> float:
    """Emission rate of a constant draw."""
    return grams_co2(power_w * S_PER_HOUR, g_per_kwh)


# -------------------------------------------------------------------------- carbon intensity
#: grams in one avoirdupois pound (exact, by definition)
G_PER_LB = 453.59237

#: Units in which grid-data services publish carbon intensity, and the factor
#: that takes one of them to gCO2/kWh.  ``lbsPerMWh`` is WattTime's MOER unit,
#: ``gPerKWh`` the Carbon Aware SDK's and Electricity Maps'.
INTENSITY_UNITS: dict[str, float] = {
    "gPerKWh": 1.0,
    "kgPerKWh": 1000.0,
    "gPerMWh": 1e-3,
    "kgPerMWh": 1.0,
    "lbsPerMWh": G_PER_LB / 1000.0,
}


def grams_per_kwh(value: float, unit: str) -> float:
    """``value`` of a carbon intensity in ``unit`` (a key of :data:`INTENSITY_UNITS`),
    in gCO2/kWh.  Raises ValueError for an unknown unit or a negative or non-finite value."""
    try:
        factor = INTENSITY_UNITS[unit]
    except KeyError:
        raise ValueError(
            f"unknown carbon intensity unit {unit!r}; one of {sorted(INTENSITY_UNITS)}"
        ) from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"carbon intensity must be finite and >= 0, got {value!r}")
    return value * factor


@dataclass(frozen=True)
class IntensityPoint:
    """Carbon intensity ``g_per_kwh`` (gCO2/kWh) over [``start_s``, ``start_s + duration_s``),
    times in seconds since the epoch."""

    start_s: float
    duration_s: float
    g_per_kwh: float

    @property
    def end_s(self) -> float:
        return self.start_s + self.duration_s


def resample_intensity(
    points: Sequence[IntensityPoint], start_s: float, step_s: float, steps: int,
) -> list[float]:
    """One intensity per planning step [start_s + i*step_s, start_s + (i+1)*step_s).

    Each step gets the time-weighted mean of the points that overlap it; a
    step no point covers holds the value of the nearest covered time (the last
    point before it, else the first after it), so a single "latest" reading
    becomes a constant series and a forecast shorter than the window holds its
    last value.  ``points`` must not be empty; they may be unordered.
    """
    if not points:
        raise ValueError("no intensity points to resample")
    if step_s <= 0 or steps < 1:
        raise ValueError("step_s must be > 0 and steps >= 1")
    ordered = sorted(points, key=lambda p: p.start_s)
    out: list[float] = []
    for i in range(steps):
        lo, hi = start_s + i * step_s, start_s + (i + 1) * step_s
        weight = total = 0.0
        for p in ordered:
            overlap = min(hi, p.end_s) - max(lo, p.start_s)
            if overlap > 0:
                weight += overlap
                total += overlap * p.g_per_kwh
        if weight > 0:
            out.append(total / weight)
            continue
        before = [p for p in ordered if p.start_s < hi]
        out.append((before[-1] if before else ordered[0]).g_per_kwh)
    return out


def horizon_s(points: Sequence[IntensityPoint], now_s: float) -> float:
    """Seconds from ``now_s`` that ``points`` cover (0 when they end before ``now_s``)."""
    return max(0.0, max((p.end_s for p in points), default=now_s) - now_s)
