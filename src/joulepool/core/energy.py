"""Energy and carbon unit conversions, once."""

from __future__ import annotations

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
