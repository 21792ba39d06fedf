"""core.energy: the unit conversions every report and plot goes through."""

from __future__ import annotations

import numpy as np
import pytest

from joulepool.core import classes, routing
from joulepool.core.classes import SLO, default_deadline, freesh_slo
from joulepool.core.energy import (
    grams_co2,
    grams_co2_per_hour,
    megajoules,
    megajoules_per_hour,
    per_hour,
)


def test_megajoules_per_hour_known_values():
    # 1 kW for an hour is 3.6 MJ, whatever window it is measured over
    assert megajoules_per_hour(1000.0 * 3600.0, 3600.0) == pytest.approx(3.6)
    assert megajoules_per_hour(1000.0 * 120.0, 120.0) == pytest.approx(3.6)
    # 1 MJ over 30 min is 2 MJ/h
    assert megajoules_per_hour(1e6, 1800.0) == pytest.approx(2.0)
    assert megajoules_per_hour(0.0, 10.0) == 0.0
    assert megajoules(2.5e6) == pytest.approx(2.5)
    assert per_hour(10.0, 60.0) == pytest.approx(600.0)
    with pytest.raises(ValueError):
        per_hour(1.0, 0.0)
    with pytest.raises(ValueError):
        megajoules_per_hour(1.0, -1.0)


def test_megajoules_per_hour_is_bit_identical_to_the_inline_formula_it_replaced():
    # reports written before the move must not change by a single ulp
    for j, t in ((123456.789, 120.0), (9.87e9, 3600.0), (1.0, 0.3)):
        assert megajoules_per_hour(j, t) == j / t * 3600.0 / 1e6
        assert per_hour(j, t) == j / t * 3600.0


def test_rates_agree_with_the_carbon_conversions():
    # a constant 500 W at 400 g/kWh: grams per hour two ways
    w, g = 500.0, 400.0
    j_per_h = w * 3600.0
    assert grams_co2_per_hour(w, g) == pytest.approx(per_hour(grams_co2(w * 60.0, g), 60.0))
    assert megajoules_per_hour(j_per_h, 3600.0) == pytest.approx(1.8)


def test_default_deadline_lives_once_in_core():
    # core.routing re-exports core.classes' formula (the extender imports it from there)
    assert routing.default_deadline is classes.default_deadline
    assert default_deadline(100, ttft_s=0.5, tpot_s=0.05) == pytest.approx(5.5)
    assert default_deadline(100, 0.5, 0.05, slack_factor=2.0) == pytest.approx(11.0)
    assert default_deadline(-5, 0.5, 0.05) == pytest.approx(0.5)  # negative -> 0 tokens
    assert isinstance(default_deadline(10, 0.3, 0.15), float)
    # elementwise on arrays, per-request SLOs included, same values as the scalar form
    tokens = np.array([0, 1, 444, 2000])
    ttft = np.array([0.3, 0.6, 0.3, 3.0])
    tpot = np.array([0.15, 0.15, 1.5, 0.15])
    got = default_deadline(tokens, ttft, tpot)
    assert got.dtype == np.float64
    assert got.tolist() == [
        default_deadline(float(n), float(a), float(b)) for n, a, b in zip(tokens, ttft, tpot,
                                                                           strict=True)
    ]
    assert got.tolist() == (ttft + tokens * tpot).tolist()


def test_slo_deadline_for_uses_the_core_formula():
    slo = freesh_slo("LS")
    assert slo.deadline_for(100) == default_deadline(100, slo.ttft_s, slo.tpot_s)
    assert slo.deadline_for(100, 3.0) == default_deadline(100, 0.6, 0.15, 3.0)
    arr = slo.deadline_for(np.array([10, 20]))
    assert isinstance(arr, np.ndarray)
    assert arr.tolist() == pytest.approx([0.6 + 1.5, 0.6 + 3.0])
    # an explicit deadline wins over the formula
    assert SLO(0.3, 0.15, deadline_s=9.0).deadline_for(10_000) == 9.0


# ------------------------------------------------------------ carbon intensity units and grid
def test_intensity_units_normalise_to_grams_per_kwh():
    from joulepool.core.energy import G_PER_LB, grams_per_kwh

    assert grams_per_kwh(1000, "lbsPerMWh") == pytest.approx(453.59237)
    assert grams_per_kwh(0.4, "kgPerKWh") == pytest.approx(400)
    assert grams_per_kwh(400_000, "gPerMWh") == pytest.approx(400)
    assert grams_per_kwh(400, "kgPerMWh") == 400 and grams_per_kwh(7, "gPerKWh") == 7
    assert pytest.approx(1, rel=1e-6) == G_PER_LB / 1000 * 2.2046226
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            grams_per_kwh(bad, "gPerKWh")
    with pytest.raises(ValueError, match="unknown carbon intensity unit"):
        grams_per_kwh(1, "tonsPerYear")


def test_resample_weights_by_overlap_and_holds_beyond_the_data():
    from joulepool.core.energy import IntensityPoint, horizon_s, resample_intensity

    pts = [IntensityPoint(0, 300, 100), IntensityPoint(300, 300, 300)]
    assert resample_intensity(pts, 0, 600, 1) == [200]
    assert resample_intensity(pts, 150, 300, 3) == [200, 300, 300]
    assert resample_intensity(list(reversed(pts)), -600, 300, 2) == [100, 100]  # before: first
    assert resample_intensity([IntensityPoint(0, 3600, 50)], 7200, 300, 2) == [50, 50]
    assert horizon_s(pts, 100) == 500 and horizon_s(pts, 900) == 0
    with pytest.raises(ValueError):
        resample_intensity([], 0, 300, 1)
