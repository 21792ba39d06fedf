"""Online estimators: counter deltas, histogram quantiles, J/token smoothing."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from joulepool.core.estimators import (
    EnergyPerTokenEstimator,
    bucket_delta,
    counter_delta,
    histogram_quantile,
    trapezoid_energy_j,
)
from joulepool.core.profiles import H100_8B

INF = math.inf


def test_counter_delta_and_reset():
    assert counter_delta(10.0, None) == 0.0
    assert counter_delta(15.0, 10.0) == 5.0
    assert counter_delta(3.0, 10.0) == 3.0  # reset: restarted from 0


def test_bucket_delta_reset_and_shape_change():
    assert bucket_delta([2, 5, 9], [1, 3, 4]) == [1, 2, 5]
    assert bucket_delta([1, 1, 2], [1, 3, 4]) == [1, 1, 2]  # a drop: reset
    assert bucket_delta([1, 2], [1, 2, 3]) == [1, 2]
    assert bucket_delta([1, 2], None) == [1, 2]


def test_histogram_quantile_matches_promql_rules():
    bounds = [0.1, 0.2, 0.4, INF]
    # 10 observations: 2 in (0,0.1], 6 in (0.1,0.2], 2 in (0.2,0.4]
    cum = [2, 8, 10, 10]
    assert histogram_quantile(0.5, bounds, cum) == pytest.approx(0.1 + 0.1 * (5 - 2) / 6)
    assert histogram_quantile(0.1, bounds, cum) == pytest.approx(0.05)  # first bucket from 0
    assert histogram_quantile(1.0, bounds, cum) == pytest.approx(0.4)
    assert histogram_quantile(0.9, bounds, [0, 0, 0, 0]) is None
    # everything in +Inf: the highest finite bound
    assert histogram_quantile(0.9, bounds, [0, 0, 0, 5]) == 0.4
    with pytest.raises(ValueError):
        histogram_quantile(1.5, bounds, cum)
    with pytest.raises(ValueError):
        histogram_quantile(0.5, bounds, [1, 2])


@given(st.lists(st.integers(0, 50), min_size=4, max_size=4), st.floats(0.0, 1.0))
def test_histogram_quantile_stays_inside_the_observed_range(per_bucket, q):
    bounds = [0.01, 0.05, 0.1, INF]
    cum = []
    total = 0
    for c in per_bucket:
        total += c
        cum.append(total)
    v = histogram_quantile(q, bounds, cum)
    if total == 0:
        assert v is None
    else:
        assert v is not None and 0.0 <= v <= 0.1


@given(st.floats(0.0, 0.98), st.floats(0.001, 0.02))
def test_histogram_quantile_is_monotonic_in_q(q, dq):
    bounds = [0.01, 0.05, 0.1, 1.0, INF]
    cum = [3, 10, 12, 30, 31]
    a = histogram_quantile(q, bounds, cum)
    b = histogram_quantile(min(q + dq, 1.0), bounds, cum)
    assert a is not None and b is not None and a <= b + 1e-12


def test_trapezoid_energy():
    assert trapezoid_energy_j(100.0, 200.0, 2.0) == 300.0
    with pytest.raises(ValueError):
        trapezoid_energy_j(1.0, 1.0, -1.0)


def test_eps_estimator_recovers_the_profile_value():
    """Feed the estimator what a GPU at a steady batch would spend: it returns the profile's eps."""
    est = EnergyPerTokenEstimator(half_life_s=30.0)
    batch, clock = 8, 1500.0
    p, tps = float(H100_8B.power_w(batch, clock)), float(H100_8B.decode_tokens_per_s(batch, clock))
    for _ in range(100):
        est.update(p * 1.0, tps * 1.0, 1.0)
    assert est.value == pytest.approx(float(H100_8B.joules_per_token(batch, clock)), rel=1e-9)
    assert est.samples == pytest.approx(100 * tps, rel=0.01)


def test_eps_estimator_ignores_idle_periods_and_tracks_drift():
    est = EnergyPerTokenEstimator(half_life_s=10.0)
    assert est.update(50.0, 0.0, 1.0) is None  # idle: no estimate, idle energy not counted
    for _ in range(20):
        est.update(100.0, 100.0, 1.0)  # 1 J/token
    assert est.value == pytest.approx(1.0)
    for _ in range(5):
        est.update(500.0, 0.0, 1.0)  # idle draw between requests does not pollute it
    assert est.value == pytest.approx(1.0)
    for _ in range(60):
        est.update(200.0, 100.0, 1.0)  # drift to 2 J/token
    assert est.value == pytest.approx(2.0, rel=0.02)


def test_eps_estimator_validates():
    with pytest.raises(ValueError):
        EnergyPerTokenEstimator(half_life_s=0)
    with pytest.raises(ValueError):
        EnergyPerTokenEstimator().update(-1.0, 1.0, 1.0)
