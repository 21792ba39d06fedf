"""GPU power limits: the SM clock a power cap leaves, from a profile's power law.

Under ``nvmlDeviceSetPowerManagementLimit`` the driver lowers the clock until
board power fits the limit. With the clock law of
:class:`~joulepool.core.profiles.ServingProfile` (``power_w(batch, clock)``,
non-decreasing in the clock) that clock is the highest one whose power fits;
it never goes below the profile's lowest modelled clock (``f_min``), where a
real GPU would throttle further and the model has no data.
"""

from __future__ import annotations

from joulepool.core.profiles import ServingProfile


def clock_under_power_cap(profile: ServingProfile, batch: float, cap_w: float,
                          f_max_mhz: float | None = None, tolerance_mhz: float = 0.5) -> float:
    """Highest SM clock (MHz, at most ``f_max_mhz``, at least f_min) at which an instance of
    ``profile`` at ``batch`` draws at most ``cap_w`` watts (the whole instance's power)."""
    lo = profile.product.f_min_mhz.value
    hi = profile.product.f_max_mhz.value if f_max_mhz is None else min(
        f_max_mhz, profile.product.f_max_mhz.value)
    hi = max(hi, lo)

    def power(f: float) -> float:
        return float(profile.power_w(batch, f))

    if power(hi) <= cap_w:
        return hi
    if power(lo) > cap_w:
        return lo
    while hi - lo > tolerance_mhz:  # power(lo) <= cap < power(hi)
        mid = 0.5 * (lo + hi)
        if power(mid) <= cap_w:
            lo = mid
        else:
            hi = mid
    return lo


def power_limit_range_w(tdp_w: float) -> tuple[float, float]:
    """The (min, max) power limit a GPU accepts, as NVML's limit constraints report them,
    for a product whose constraints we do not know: 30 % of TDP to TDP (H100 SXM: 200-700 W
    per nvidia-smi; A100 SXM: 100-400 W)."""
    return round(0.3 * tdp_w), float(tdp_w)


def power_cap_for_clock(profile: ServingProfile, clock_mhz: float) -> float:
    """The lowest power cap (W, the whole instance's) under which an instance of
    ``profile`` keeps at least ``clock_mhz`` whatever it runs: decoding at any batch up to
    its largest, or prefilling (the inverse of :func:`clock_under_power_cap`, power being
    non-decreasing in the clock and the batch)."""
    f = float(clock_mhz)
    return max(float(profile.power_w(profile.max_batch.value, f)),
               float(profile.prefill_power_w(f)))
