"""core.online: smoothing, sliding-window rates and the online eps estimator."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from joulepool.core.online import EpsEstimator, ExpSmoothed, SlidingWindowRate


def test_exp_smoothed_seeds_then_moves_by_alpha() -> None:
    s = ExpSmoothed(0.5)
    assert s.get(7.0) == 7.0
    assert s.update(10.0) == 10.0
    assert s.update(20.0) == 15.0
    assert s.update(math.nan) == 15.0  # ignored
    assert s.samples == 2


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5])
def test_exp_smoothed_rejects_bad_alpha(alpha: float) -> None:
    with pytest.raises(ValueError):
        ExpSmoothed(alpha)


def test_sliding_window_rate_forgets_old_events() -> None:
    w = SlidingWindowRate(window_s=10.0)
    assert w.rate(0.0) is None
    w.add(0.0, True)
    w.add(1.0, False)
    w.add(2.0, False)
    w.add(3.0, True)
    assert w.rate(3.0) == pytest.approx(0.5)
    # at t=10.5 the event at t=0 has left the window
    assert w.rate(10.5) == pytest.approx(1 / 3)
    assert w.count(10.5) == 3
    assert w.rate(100.0) is None


def test_sliding_window_rate_bounded_memory() -> None:
    w = SlidingWindowRate(window_s=1e9, max_events=10)
    for i in range(100):
        w.add(float(i), i % 2 == 0)
    assert w.count(100.0) == 10
    assert w.rate(100.0) == pytest.approx(0.5)


@given(st.lists(st.tuples(st.floats(0, 1e3), st.booleans()), max_size=200))
def test_sliding_window_rate_matches_brute_force(events: list[tuple[float, bool]]) -> None:
    w = SlidingWindowRate(window_s=50.0)
    events = sorted(events)
    for t, hit in events:
        w.add(t, hit)
    now = events[-1][0] if events else 0.0
    inside = [h for t, h in events if t >= now - 50.0]
    got = w.rate(now)
    if not inside:
        assert got is None
    else:
        assert got == pytest.approx(sum(inside) / len(inside))


def test_eps_estimator_ratio_of_measured_to_modelled_energy() -> None:
    est = EpsEstimator(half_life_s=10.0, min_tokens=100.0, min_scale=0.5, max_scale=3.0)
    assert est.scale == 1.0
    # 50 tokens at 0.2 J/token measured against a modelled 0.1: not enough tokens yet
    est.observe(joules=10.0, tokens=50, modelled_eps=0.1, now=0.0)
    assert est.scale == 1.0
    est.observe(joules=10.0, tokens=50, modelled_eps=0.1, now=0.0)
    assert est.scale == pytest.approx(2.0)
    assert est.eps(0.1) == pytest.approx(0.2)
    # the model is batch-aware: the same measurement against a dearer model point
    # pulls the ratio towards 1 in proportion to the tokens
    est.observe(joules=20.0, tokens=100, modelled_eps=0.2, now=0.0)
    assert est.scale == pytest.approx(40.0 / 30.0)
    # old samples fade: long after, a new measurement dominates
    est.observe(joules=100.0, tokens=1000, modelled_eps=0.1, now=1000.0)
    assert est.scale == pytest.approx(1.0, abs=1e-3)
    # outliers are clipped
    est.observe(joules=1e9, tokens=1000, modelled_eps=0.1, now=2000.0)
    assert est.scale == 3.0
    before = est.scale
    for bad in [(0.0, 10, 0.1), (5.0, 0, 0.1), (5.0, 10, 0.0), (math.inf, 10, 0.1)]:
        est.observe(*bad, now=3000.0)
    assert est.scale == before
