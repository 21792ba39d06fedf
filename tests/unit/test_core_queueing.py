"""core.queueing: the prefill wait of a pool of n instances behind a soonest-start router."""

from __future__ import annotations

import heapq
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from joulepool.core.queueing import (
    conditional_wait_s,
    erlang_c,
    pool_mean_wait_s,
    pool_wait_tail,
    wait_probability,
)


def _erlang_c_by_recursion(n: int, a: float) -> float:
    """Erlang C from the textbook Erlang B recursion B(k) = a B(k-1) / (k + a B(k-1))."""
    b = 1.0
    for k in range(1, n + 1):
        b = a * b / (k + a * b)
    return b / (1.0 - (a / n) * (1.0 - b))


def test_erlang_c_known_values() -> None:
    assert erlang_c(1, 0.7) == 0.7  # M/M/1: P(wait) = rho, exactly
    assert erlang_c(2, 1.0) == pytest.approx(1.0 / 3.0, rel=1e-12)  # M/M/2 at rho 1/2
    # M/M/2 at rho: 2 rho^2 / (1 + rho)
    assert erlang_c(2, 1.6) == pytest.approx(2 * 0.8**2 / 1.8, rel=1e-12)
    assert erlang_c(3, 0.0) == 0.0 and erlang_c(3, 3.0) == 1.0 and erlang_c(3, 5.0) == 1.0
    with pytest.raises(ValueError):
        erlang_c(0, 0.5)


@pytest.mark.parametrize("n", [2, 3, 10, 50, 400])
@pytest.mark.parametrize("rho", [0.05, 0.5, 0.9, 0.99])
def test_erlang_c_equals_the_erlang_b_recursion(n: int, rho: float) -> None:
    assert erlang_c(n, n * rho) == pytest.approx(_erlang_c_by_recursion(n, n * rho),
                                                rel=1e-9, abs=1e-300)


def test_erlang_c_costs_no_more_at_ten_thousand_servers() -> None:
    c = erlang_c(10_000, 9_900.0)  # rho 0.99: the recursion would take 10,000 steps
    assert 0.0 < c < 1.0 and math.isfinite(c)
    assert c == pytest.approx(_erlang_c_by_recursion(10_000, 9_900.0), rel=1e-8)


def test_one_server_is_the_mg1_model_the_pool_replaces() -> None:
    rho, slack, mean_s, scv = 0.6, 0.4, 0.1, 0.8
    mg1 = rho * math.exp(-2.0 * (1.0 - rho) * slack / (mean_s * (1.0 + scv)))
    assert pool_wait_tail(1, rho, slack, mean_s, scv) == mg1
    assert pool_mean_wait_s(1, rho, mean_s, scv) == rho * mean_s * (1 + scv) / (2 * (1 - rho))
    # and the n-server form agrees with it at n = 1 up to rounding
    assert wait_probability(1, rho) * math.exp(
        -slack / conditional_wait_s(1, rho, mean_s, scv)) == pytest.approx(mg1, rel=1e-12)


@given(n=st.integers(1, 300), rho=st.floats(0.01, 0.98), slack=st.floats(0.0, 2.0),
       scv=st.floats(0.0, 4.0))
def test_tail_falls_with_pool_size_and_rises_with_utilisation(n: int, rho: float,
                                                               slack: float, scv: float
                                                               ) -> None:
    tail = pool_wait_tail(n, rho, slack, 0.1, scv)
    assert 0.0 <= tail <= 1.0
    assert pool_wait_tail(n + 1, rho, slack, 0.1, scv) <= tail * (1 + 1e-12)
    assert pool_wait_tail(n, min(rho * 1.01, 0.99), slack, 0.1, scv) >= tail * (1 - 1e-12)
    assert pool_wait_tail(n, rho, slack + 0.05, 0.1, scv) <= tail
    assert pool_wait_tail(n, 1.0, slack, 0.1, scv) == 1.0
    assert pool_mean_wait_s(n + 1, rho, 0.1, scv) <= pool_mean_wait_s(n, rho, 0.1, scv) * (
        1 + 1e-12)


def _fcfs_waits(n: int, rate: float, service: np.ndarray, rng: np.random.Generator
                ) -> np.ndarray:
    """Waits of a first-come first-served queue with n servers: each arrival starts on
    the server free soonest (what a soonest-start router does with n instances)."""
    arrivals = np.cumsum(rng.exponential(1.0 / rate, service.size))
    free = [0.0] * n
    waits = np.empty(service.size)
    for i, (t, s) in enumerate(zip(arrivals, service, strict=True)):
        start = max(t, heapq.heappop(free))
        waits[i] = start - t
        heapq.heappush(free, start + s)
    return waits[service.size // 10:]  # the empty start left out


@pytest.mark.parametrize(("n", "rho", "scv"), [(4, 0.7, 1.0), (8, 0.8, 1.0), (4, 0.7, 0.25),
                                               (16, 0.85, 0.5)])
def test_tail_against_a_discrete_event_queue(n: int, rho: float, scv: float) -> None:
    rng = np.random.default_rng(11)
    mean_s, requests = 0.1, 200_000
    shape = 1.0 / scv  # gamma service times with this SCV
    service = rng.gamma(shape, mean_s / shape, requests)
    waits = _fcfs_waits(n, n * rho / mean_s, service, rng)
    assert float(np.mean(waits > 0)) == pytest.approx(wait_probability(n, rho),
                                                      rel=0.02 if scv == 1.0 else 0.05)
    assert float(waits.mean()) == pytest.approx(pool_mean_wait_s(n, rho, mean_s, scv),
                                                rel=0.05 if scv == 1.0 else 0.07)
    for slack in (0.02, 0.05, 0.1):
        model = pool_wait_tail(n, rho, slack, mean_s, scv)
        seen = float(np.mean(waits > slack))
        if scv == 1.0:  # M/M/n: exact but for the run's noise
            assert seen == pytest.approx(model, rel=0.1, abs=2e-3)
        else:  # M/G/n: Allen-Cunneen's scaling, measured within about 11 % either way
            assert seen == pytest.approx(model, rel=0.15, abs=2e-3)
