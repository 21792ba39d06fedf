"""The per-request fast paths of the JouleSched rule give exactly the rule's numbers.

The simulator scores every request on every endpoint, so core's cost and ranking
take shortcuts in the common case (every endpoint serves, a finite positive lambda,
one endpoint wanted). These tests hold the shortcuts to the rule as documented, on
random endpoints with the awkward values mixed in: NaN and infinite queues, zero,
negative and NaN throughputs, lambda 0, negative or infinite, cost ties, SLO-late
endpoints.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from joulepool.core.batching import first_token_after_s
from joulepool.core.cost import Scratch, joulesched_cost
from joulepool.core.routing import (
    endpoint_late,
    first_token_s,
    marginal_energy_floor,
    marginal_energy_floors,
    marginal_energy_j,
    rank_endpoints,
    score_endpoint,
    score_endpoints,
    slo_infeasible,
    waiting_requests_estimate,
    waiting_requests_one,
)

AWKWARD = (math.nan, math.inf, 0.0, -1.0)


def _column(rng: np.random.Generator, n: int, lo: float, hi: float, odd: float,
            coarse: bool = True) -> np.ndarray:
    """Values in [lo, hi] (coarse: few distinct ones, so ties happen), a share ``odd``
    of them replaced by awkward values."""
    x = (rng.integers(0, 4, n) * (hi - lo) / 3 + lo) if coarse else rng.uniform(lo, hi, n)
    bad = rng.random(n) < odd
    x[bad] = rng.choice(AWKWARD, int(bad.sum()))
    return x


def _by_the_rule(eps: np.ndarray, q: np.ndarray, mu: np.ndarray, tokens: float,
                 deadline: float, lam: float) -> tuple[list[float], list[float], list[float]]:
    """ETA, slack and cost one endpoint at a time, as core.cost's docstring states them:
    ETA = (q + t) / mu (infinite where mu <= 0 or NaN), slack = max(0, ETA - D) (NaN
    stays NaN), cost = eps * t + lambda * slack where slack > 0 (else + 0); lambda = 0
    makes an infinite slack NaN (cannot serve)."""
    etas, slacks, costs = [], [], []
    for e, qq, m in zip(eps, q, mu, strict=True):
        eta = (qq + tokens) / m if m > 0 else math.inf
        slack = eta - deadline
        slack = slack if (slack != slack or slack > 0) else 0.0
        if lam == 0.0:
            late = math.nan if slack == math.inf else 0.0
        else:
            late = slack * lam if slack > 0 else 0.0
        etas.append(eta)
        slacks.append(slack)
        costs.append(late + e * tokens)
    return etas, slacks, costs


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # inf / inf, as numpy says
@pytest.mark.parametrize("lam", [0.0, 3.0, 1e-300, -2.0, math.inf])
@pytest.mark.parametrize("odd", [0.0, 0.2])
def test_cost_is_the_rule_endpoint_by_endpoint(lam: float, odd: float) -> None:
    rng = np.random.default_rng(abs(hash((lam, odd))) % 2**32)
    for _ in range(30):
        n = int(rng.integers(1, 40))
        eps = _column(rng, n, 0.1, 0.4, 0.0)
        q = _column(rng, n, 0.0, 3000.0, odd)
        mu = _column(rng, n, 100.0, 2000.0, odd)
        tokens, deadline = float(rng.uniform(1, 400)), float(rng.uniform(0.1, 5))
        cb = joulesched_cost(eps, q, mu, tokens, deadline, lam)
        eta, slack, cost = _by_the_rule(eps, q, mu, tokens, deadline, lam)
        np.testing.assert_array_equal(cb.eta_s, eta)
        np.testing.assert_array_equal(cb.slack_s, slack)
        np.testing.assert_array_equal(cb.cost, cost)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("hard_deadline", [False, True])
def test_first_choice_is_the_full_rankings_first(hard_deadline: bool) -> None:
    """k = 1 takes no sort; it must name the endpoint the full ranking puts first."""
    rng = np.random.default_rng(5 + hard_deadline)
    for trial in range(600):
        n = int(rng.integers(1, 30))
        odd = 0.0 if trial % 3 else 0.15
        eps = _column(rng, n, 0.1, 0.4, 0.0)
        q = _column(rng, n, 0.0, 3000.0, odd)
        mu = _column(rng, n, 500.0, 2000.0, odd)
        lam = float(rng.choice([0.0, 5.0, 40.0]))
        cb = joulesched_cost(eps, q, mu, 200.0, float(rng.uniform(0.5, 4)), lam)
        late, first_token = None, None
        if trial % 2:
            first_token = _column(rng, n, 0.1, 0.7, 0.0)
            late = slo_infeasible(first_token, rng.integers(0, 3, n).astype(float), 0.3)
        full = rank_endpoints(cb, n, hard_deadline=hard_deadline, late=late,
                              first_token=first_token)
        first = rank_endpoints(cb, 1, hard_deadline=hard_deadline, late=late,
                               first_token=first_token)
        assert first == full[:1], (trial, cb, late)
        # and the full ranking is the documented order: (late, past the deadline, cost
        # or, if late, first token, ETA, index)
        marked = np.zeros(n, dtype=bool) if late is None else late
        over = (cb.slack_s > 0) if hard_deadline else np.zeros(n, dtype=bool)
        usable = [i for i in range(n) if math.isfinite(cb.cost[i])]
        eta = cb.eta_s  # NaN sorts last

        within = cb.cost if first_token is None else np.where(marked, first_token, cb.cost)
        keys = {i: (marked[i], over[i], within[i], bool(np.isnan(eta[i])),
                    0.0 if np.isnan(eta[i]) else eta[i], i) for i in usable}
        assert full == sorted(usable, key=keys.__getitem__)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("hard_deadline", [False, True])
def test_top_k_from_the_cheapest_rows_is_the_full_sorts(hard_deadline: bool,
                                                        monkeypatch) -> None:
    """Past CHEAPEST_ROWS_MIN endpoints rank_endpoints sorts only the rows that can hold
    its top k: the same endpoints in the same order as sorting every row, with exact
    ties (identical idle endpoints) in cost and ETA, NaN and infinite ETAs, endpoints
    marked late (some, or all but a few) and the overflow rank."""
    import joulepool.core.routing as routing

    rng = np.random.default_rng(11 + hard_deadline)
    for trial in range(300):
        n = int(rng.integers(routing.CHEAPEST_ROWS_MIN, 700))
        kinds = rng.integers(0, 1 + trial % 6, n)  # a few kinds of identical endpoints
        eps = np.array([0.12, 0.2, 0.45, 0.3, 0.25, 0.5])[kinds]
        q = (np.floor(rng.uniform(0, 4, n)) * 100.0 if trial % 2
             else rng.uniform(0, 3000, n))
        mu = np.array([2400.0, 1500.0, 700.0, 900.0, 1100.0, 600.0])[kinds]
        if trial % 5 == 0:
            mu[rng.random(n) < 0.05] = 0.0  # cannot serve: infinite ETA
        if trial % 7 == 0:
            # a NaN ETA at a finite cost (at times all but a few)
            q[rng.random(n) < (0.03 if trial % 14 else 0.995)] = math.nan
        lam = float(rng.choice([0.0, 5.0, 40.0]))
        cb = joulesched_cost(eps, q, mu, 200.0, float(rng.uniform(0.2, 3)), lam)
        late, first_token, overflow = None, None, None
        if trial % 3:
            first_token = rng.uniform(0.1, 0.7, n)
            share = float(rng.choice([0.05, 0.5, 0.99, 1.0]))
            late = rng.random(n) < share
            overflow = rng.integers(0, 2, n).astype(float)
        for k in (1, 2, 4, 6):
            args = {"hard_deadline": hard_deadline, "late": late,
                    "first_token": first_token, "overflow": overflow}
            fast = rank_endpoints(cb, k, **args)
            monkeypatch.setattr(routing, "CHEAPEST_ROWS_MIN", 10**9)
            full = rank_endpoints(cb, k, **args)
            monkeypatch.setattr(routing, "CHEAPEST_ROWS_MIN", 128)
            assert fast == full, (trial, k)


# --------------------------------------------------------------------------------------
# Scalar forms of the rule (one endpoint at a time): bit for bit the vectorised numbers
# --------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
@pytest.mark.parametrize("lam", [0.0, 3.0, 1e-300, -2.0, math.inf, math.nan])
@pytest.mark.parametrize("odd", [0.0, 0.2])
def test_score_endpoint_is_score_endpoints_one_endpoint_at_a_time(lam: float,
                                                                    odd: float) -> None:
    rng = np.random.default_rng(abs(hash((lam, odd, "one"))) % 2**32)
    for trial in range(40):
        n = int(rng.integers(1, 30))
        eps = _column(rng, n, 0.01, 0.4, odd)
        q = _column(rng, n, 0.0, 3000.0, odd)
        mu = _column(rng, n, 100.0, 2000.0, odd)
        w = _column(rng, n, 0.0, 0.5, odd, coarse=False)
        pi = _column(rng, n, 0.001, 0.01, odd)
        wake = _column(rng, n, 0.2, 1.0, odd)
        left = _column(rng, n, 0.0, 400.0, odd)
        left[rng.random(n) < 0.1] = 0.0  # idle endpoints
        prompt = 0.0 if trial % 5 == 0 else float(rng.integers(1, 4000))
        out = float(rng.integers(1, 600))
        deadline = float(rng.uniform(0.1, 30))
        cb = score_endpoints(eps, q, mu, w, out, prompt, deadline, lam, pi, out, wake, left)
        one = [score_endpoint(*row, out, prompt, deadline, lam, p, out, k, r)
               for row, p, k, r in zip(zip(eps, q, mu, w, strict=True), pi, wake, left,
                                      strict=True)]
        np.testing.assert_array_equal(cb.cost, [c for c, _ in one])
        np.testing.assert_array_equal(cb.eta_s, [e for _, e in one])


def _prefill_columns(rng: np.random.Generator, n: int, odd: float
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(wait s, step s, chunk tokens, prefill s/token) of ``n`` endpoints, core.routing.
    first_token_s's inputs: a share ``odd`` awkward, about 1 in 10 chunks -0.0."""
    wait = _column(rng, n, 0.0, 0.5, odd)
    step = _column(rng, n, 0.0, 0.05, odd)
    chunk = _column(rng, n, 1.0, 8192.0, odd)
    chunk[rng.random(n) < 0.1] = -0.0
    pf_s = _column(rng, n, 1e-5, 1e-4, odd)
    return wait, step, chunk, pf_s


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
@pytest.mark.parametrize("odd", [0.0, 0.25])
def test_endpoint_late_is_slo_infeasible_of_first_token_s(odd: float) -> None:
    rng = np.random.default_rng(17 + int(odd * 100))
    for trial in range(200):
        n = int(rng.integers(1, 30))
        wait, step, chunk, pf_s = _prefill_columns(rng, n, odd)
        room = _column(rng, n, -1.0, 3.0, odd)
        prompt = float(rng.choice([0.0, 1.0, float(rng.integers(2, 9000))]))
        ttft = float(rng.uniform(0.05, 0.7))
        late = slo_infeasible(first_token_s(wait, step, chunk, pf_s, prompt), room, ttft)
        one = [endpoint_late(*row, prompt, ttft)
               for row in zip(wait, step, chunk, pf_s, room, strict=True)]
        assert late.tolist() == one, trial


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
@pytest.mark.parametrize("odd", [0.0, 0.25])
def test_first_token_s_over_endpoints_is_first_token_after_s_bit_for_bit(odd: float) -> None:
    """core.routing.first_token_s (the router's, over arrays of endpoints) and
    core.batching.first_token_after_s (one endpoint: the simulator's candidate search,
    endpoint_late, the prefill clock floor) are one formula: the same value bit for bit,
    NaN, infinities and a zero chunk included."""
    rng = np.random.default_rng(29 + int(odd * 100))
    for trial in range(200):
        n = int(rng.integers(1, 30))
        wait, step, chunk, pf_s = _prefill_columns(rng, n, odd)
        chunk[rng.random(n) < 0.05] = 0.0  # +0.0 too: numpy's x / 0 keeps the sign
        prompt = float(rng.choice([0.0, 1.0, float(rng.integers(2, 9000)), math.inf]))
        many = first_token_s(wait, step, chunk, pf_s, prompt)
        one = [first_token_after_s(*row, prompt)
               for row in zip(wait.tolist(), step.tolist(), chunk.tolist(), pf_s.tolist(),
                              strict=True)]
        np.testing.assert_array_equal(many, one, err_msg=str(trial))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_marginal_energy_floor_is_below_the_energy_at_any_batch_left() -> None:
    """The bound holds for the numbers marginal_energy_j computes, whatever R_n >= 0,
    and it is tight: the least energy over R_n is within 1e-8 of the terms' size."""
    rng = np.random.default_rng(3)
    for trial in range(2000):
        eps = float(rng.choice([rng.uniform(-0.1, 2.0), rng.uniform(0.0, 1e-6), 0.0]))
        wake = float(rng.choice([rng.uniform(0.0, 2.0), eps]))
        pi = float(rng.uniform(-0.01, 0.05))
        out = float(rng.choice([0.0, 1.0, float(rng.integers(2, 3000))]))
        prompt = float(rng.choice([0.0, float(rng.integers(1, 9000))]))
        left = np.concatenate([[0.0, out, math.inf], rng.uniform(0.0, 2 * out + 1, 20)])
        energy = marginal_energy_j(np.full(left.size, eps), np.full(left.size, pi), out,
                                   prompt, np.full(left.size, wake), left)
        floor = marginal_energy_floor(eps, pi, out, prompt, wake)
        assert np.all(floor <= energy), (trial, eps, wake, pi, out, prompt)
        size = max(abs(eps), abs(wake)) * out + abs(pi * prompt)
        assert energy.min() - floor <= 1e-8 * size
    for no_bound in ((math.nan, 0.1, 10.0, 10.0, 0.5), (0.1, 0.1, 10.0, 10.0, math.nan),
                     (math.inf, 0.1, 10.0, 10.0, math.inf), (0.1, math.nan, 10.0, 10.0, 0.5)):
        assert marginal_energy_floor(*no_bound) == -math.inf


def _bits(x: np.ndarray) -> bytes:
    return np.ascontiguousarray(x).tobytes()


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
@pytest.mark.parametrize("lam", [0.0, 3.0, 1e-300, -2.0, math.inf, math.nan])
@pytest.mark.parametrize("odd", [0.0, 0.2])
def test_the_rule_written_into_scratch_is_the_rule_bit_for_bit(lam: float, odd: float) -> None:
    """score_endpoints, first_token_s and slo_infeasible with ``out`` (a pool's scratch
    arrays, reused from one request to the next) give the bits they give allocating,
    whatever the scratch held before."""
    rng = np.random.default_rng(41 + int(odd * 100))
    for trial in range(150):
        n = int(rng.integers(1, 40))
        scratch = Scratch(n)
        for field in ("eta", "energy", "slack", "cost", "first", "spare"):
            getattr(scratch, field)[:] = rng.choice([math.nan, -math.inf, 7.0], n)
        scratch.late[:] = rng.random(n) < 0.5
        cols = [_column(rng, n, lo, hi, odd) for lo, hi in (
            (0.05, 0.5), (0.0, 5000.0), (100.0, 3000.0), (0.0, 0.2), (0.0, 0.3),
            (0.05, 0.6), (0.0, 900.0))]
        eps, q, mu, weight, pi, wake, left = cols
        out_tokens = float(rng.choice([0.0, 1.0, float(rng.integers(2, 900))]))
        prompt = float(rng.choice([0.0, 1.0, float(rng.integers(2, 9000))]))
        tokens, deadline = out_tokens + 0.5 * prompt, float(rng.uniform(0.5, 30.0))
        args = (eps, q, mu, weight, tokens, prompt, deadline, lam, pi, out_tokens, wake, left)
        fresh, kept = score_endpoints(*args), score_endpoints(*args, out=scratch)
        for name in ("eta_s", "energy_j", "slack_s", "cost"):
            assert _bits(getattr(kept, name)) == _bits(getattr(fresh, name)), (trial, name)
        wait, step, chunk, pf_s = _prefill_columns(rng, n, odd)
        room = _column(rng, n, -1.0, 3.0, odd)
        first = first_token_s(wait, step, chunk, pf_s, prompt)
        assert _bits(first_token_s(wait, step, chunk, pf_s, prompt, scratch)) == _bits(first)
        late = slo_infeasible(first, room, 0.4)
        assert slo_infeasible(scratch.first, room, 0.4, scratch).tolist() == late.tolist()


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # inf - inf
def test_waiting_requests_one_is_the_estimate_row_by_row() -> None:
    """The router keeps core.routing.waiting_requests_estimate's column one row at a
    time with waiting_requests_one: the same numbers, NaN included."""
    rng = np.random.default_rng(5)
    waiting = rng.choice([0.0, 1.0, 3.0, 17.0, math.nan, math.inf], 400)
    in_flight = rng.choice([0.0, 1.0, 4.0, 40.0, 256.0, math.inf], 400)
    max_batch = rng.choice([1.0, 4.0, 64.0, 256.0, math.inf], 400)
    column = waiting_requests_estimate(waiting, in_flight, max_batch)
    rows = [waiting_requests_one(w, f, b) for w, f, b in zip(
        waiting.tolist(), in_flight.tolist(), max_batch.tolist(), strict=True)]
    np.testing.assert_array_equal(column, rows)


def test_marginal_energy_floors_bound_each_group_of_one_request() -> None:
    """marginal_energy_floors (every energy group of a pool for one request, as the
    simulator's candidate search reads them) gives each group the floor it has alone,
    NaN and unbounded groups among finite ones included."""
    rng = np.random.default_rng(5)
    groups = [(float(rng.uniform(-0.1, 2.0)), float(rng.uniform(-0.01, 0.05)),
               float(rng.uniform(0.0, 2.0))) for _ in range(40)]
    groups[7] = (math.nan, 0.1, 0.5)
    groups[19] = (math.inf, 0.1, math.inf)
    for out, prompt in ((0.0, 0.0), (1.0, 0.0), (250.0, 3000.0), (-3.0, 12.0)):
        floors = marginal_energy_floors(groups, out, prompt)
        assert floors == [marginal_energy_floor(eps, pi, out, prompt, wake)
                          for eps, pi, wake in groups]
        assert floors[7] == floors[19] == -math.inf
