"""PI lambda control and MIAD clock control."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from joulepool.core.controllers import (
    Direction,
    MIADController,
    PeriodLatencies,
    PIController,
    SLOSignal,
    miad_signal,
)
from joulepool.core.profiles import H100


def test_pi_brings_toy_queueing_plant_to_one_percent():
    """Plant: more lambda -> fewer requests on the slow efficient server -> fewer misses."""
    rng = np.random.default_rng(7)
    pi = PIController()
    rates = []
    for _ in range(400):
        p_miss = 0.3 * np.exp(-pi.lam / 50.0)
        miss = rng.binomial(2000, p_miss) / 2000
        rates.append(miss)
        pi.update(miss)
    assert abs(np.mean(rates[-150:]) - 0.01) <= 0.005


def test_pi_clamps_and_unwinds_quickly():
    pi = PIController(lam_max=100.0, lam=50.0)
    for _ in range(200):
        pi.update(1.0)  # miss everything: lambda pinned at the top
    assert pi.lam == 100.0
    pi.update(0.0)
    assert pi.lam < 100.0  # no wound-up sum: leaves the bound at once


def test_pi_short_burst_of_misses_does_not_keep_raising_lambda():
    pi = PIController(lam=100.0)
    pi.update(0.01)
    pi.update(1.0)
    pi.update(1.0)
    peak = pi.lam
    history = [pi.update(0.0) for _ in range(50)]
    assert all(b <= a for a, b in itertools.pairwise([peak, *history]))
    assert history[-1] < peak


def test_pi_rejects_bad_bounds():
    with pytest.raises(ValueError):
        PIController(lam_min=2, lam_max=1)


@pytest.mark.parametrize("kw", [{"lam": math.nan}, {"lam_max": math.nan}, {"kp": math.nan},
                                {"ki": math.nan}])
def test_pi_rejects_nan_rather_than_carrying_it(kw):
    """NaN passes every ordered comparison as False, so a NaN lambda would pass the clamp
    and every cost built on it would be NaN; it is refused at construction instead."""
    with pytest.raises(ValueError):
        PIController(**kw)


CLOCKS = H100.supported_clocks()


def _miad(**kw):
    return MIADController(CLOCKS, ttft_target_s=0.3, tpot_target_s=0.05, **kw)


violate = SLOSignal(ttft_tail_s=0.5, mean_itl_s=0.02, waiting=0)
calm = SLOSignal(ttft_tail_s=0.1, mean_itl_s=0.02, waiting=0)


@given(st.floats(500, 2500), st.booleans(), st.integers(0, 3))
def test_miad_stays_in_bounds_on_supported_clocks(f, risky, waiting):
    m = _miad()
    sig = violate if risky else SLOSignal(0.1, 0.02, waiting)
    nxt, _ = m.step(f, sig)
    assert m.lowest <= nxt <= m.highest
    assert nxt in set(CLOCKS.tolist())


def test_miad_multiplicative_up_additive_down():
    m = _miad()
    f, d = m.step(1200.0, violate)
    assert d is Direction.UP and f == m.snap_up(1800.0) and f >= 1200 * 1.5
    f2, d2 = m.step(1800.0, calm)
    assert d2 is Direction.DOWN and 1800 - 30 - 15 < f2 <= 1770
    assert m.step(m.highest, violate) == (m.highest, Direction.HOLD)
    assert m.step(m.lowest, calm) == (m.lowest, Direction.HOLD)


def test_miad_margin_and_queue_count_as_risk():
    m = _miad(margin=0.1)
    assert m.at_risk(SLOSignal(0.28, None, 0))  # above 0.3 * 0.9
    assert not m.at_risk(SLOSignal(0.26, None, 0))
    assert m.at_risk(SLOSignal(None, None, 1))


def test_miad_walks_down_to_floor_then_recovers():
    m = _miad()
    f = m.highest
    for _ in range(100):
        f, _ = m.step(f, calm)
    assert f == m.lowest
    f, d = m.step(f, violate)
    assert d is Direction.UP and f >= m.lowest * 1.5 - 15


def test_miad_validates_parameters():
    with pytest.raises(ValueError):
        _miad(k_inc=1.0)
    with pytest.raises(ValueError):
        MIADController([], 0.3, 0.05)


def test_prefill_clock_floor_by_hand():
    from joulepool.core.controllers import prefill_clock_floor

    # prefill of the prompt: 1 s at 1000 MHz, inversely with the clock
    def at(f):
        return 1000.0 / f

    clocks = [2000.0, 1000.0, 1250.0, 1600.0]
    # within 0.9 x 1 s: 1000/f <= 0.9 -> f >= 1111: the lowest such clock is 1250
    assert prefill_clock_floor(at, clocks, 1.0, 0.1) == 1250.0
    assert prefill_clock_floor(at, clocks, 2.0, 0.0) == 1000.0  # every clock fits
    assert prefill_clock_floor(at, clocks, 0.1, 0.1) == 2000.0  # none fits: the highest
    with pytest.raises(ValueError):
        prefill_clock_floor(at, [], 1.0)


def test_miad_signal_reads_the_period_mean_itl():
    """TPOT side: the ITL histogram's sum over its count for the period, not its tail;
    TTFT and queue as observed."""
    # 100 gaps of 10 ms and one 300-ms mixed step: mean 13 ms, not the step's 300 ms
    p = PeriodLatencies(itl_sum=100 * 0.01 + 0.3, itl_count=101, ttft_tail=0.2, waiting=3)
    assert p.mean_itl == pytest.approx(1.3 / 101)
    assert miad_signal(p) == SLOSignal(0.2, pytest.approx(1.3 / 101), 3)
    idle = miad_signal(PeriodLatencies(waiting=-2))
    assert idle == SLOSignal(None, None, 0)  # nothing decoded: no TPOT; a negative gauge is 0
    assert PeriodLatencies().mean_itl is None
    # requests ran the whole period and no gap completed: TPOT at least the period
    assert miad_signal(PeriodLatencies(stalled=1.0)).mean_itl_s == 1.0
    assert miad_signal(PeriodLatencies(itl_sum=0.02, itl_count=1, stalled=1.0)
                       ).mean_itl_s == 0.02  # a completed gap is the signal itself


def test_miad_on_the_period_signal_holds_through_rare_long_steps():
    """MIAD fed miad_signal lowers the clock through a long mixed step that a decode-only
    batch's mean absorbs, and raises it when the mean itself crosses the margin."""
    ctrl = MIADController(H100.supported_clocks(), ttft_target_s=0.6, tpot_target_s=0.05)
    f = ctrl.highest
    rare = PeriodLatencies(itl_sum=99 * 0.02 + 0.4, itl_count=100)  # mean 23.8 ms
    nxt, d = ctrl.step(f, miad_signal(rare))
    assert d is Direction.DOWN and nxt < f
    slow = PeriodLatencies(itl_sum=100 * 0.046, itl_count=100)  # 46 ms > 0.9 x 50 ms
    assert ctrl.step(nxt, miad_signal(slow))[1] is Direction.UP


@given(st.floats(500, 2500), st.floats(0.0, 1.0), st.floats(0.0, 0.1), st.integers(0, 3))
def test_miad_next_clock_is_the_step_once_the_signal_is_read(f, ttft, itl, waiting):
    """The simulator keeps next_clock's answers by (clock, at risk): step must be a
    function of those two alone."""
    m = _miad()
    sig = SLOSignal(ttft, itl, waiting)
    assert m.next_clock(f, m.at_risk(sig)) == m.step(f, sig)
