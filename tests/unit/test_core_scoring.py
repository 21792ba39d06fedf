"""core.scoring: the Filter / Scorer / Picker plugins and their registry."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest

from joulepool.core.routing import (
    first_token_s,
    overflow_rank,
    rank_endpoints,
    score_endpoints,
    slo_infeasible,
)
from joulepool.core.scoring import (
    PROFILES,
    SCORERS,
    EndpointState,
    RequestInfo,
    RoutingProfile,
    Scores,
    register_scorer,
    routing_profile,
)


def _state(n: int, **cols: list[float]) -> EndpointState:
    st = EndpointState(n)
    for name, values in cols.items():
        setattr(st, name, np.asarray(values, dtype=np.float64))
    return st


REQ = RequestInfo(tokens=100.0, input_tokens=50.0, output_tokens=100.0, deadline_s=2.0,
                  lam=10.0)


def test_registered_profiles_by_name() -> None:
    assert {"joulesched", "least-loaded", "round-robin"} <= set(PROFILES)
    with pytest.raises(ValueError, match=r"unknown routing 'fastest'.*joulesched"):
        routing_profile("fastest")


def test_joulesched_profile_is_core_routing_rule() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        n = int(rng.integers(1, 12))
        st = _state(n, eps_j_per_token=rng.uniform(0.1, 1.0, n).tolist(),
                    tps=rng.uniform(50, 2000, n).tolist(),
                    prefill_weight=rng.uniform(0, 0.5, n).tolist(),
                    queue_tokens=rng.uniform(0, 5000, n).tolist(),
                    prefill_j_per_token=rng.uniform(0, 0.1, n).tolist(),
                    prefill_wait_s=rng.uniform(0, 0.5, n).tolist(),
                    prefill_step_s=rng.uniform(0, 0.05, n).tolist(),
                    prefill_chunk_tokens=rng.uniform(10, 8000, n).tolist(),
                    prefill_s_per_token=rng.uniform(0, 2e-4, n).tolist(),
                    batch_room=rng.integers(0, 3, n).astype(float).tolist())
        req = REQ._replace(lam=float(rng.uniform(0, 50)), ttft_slo_s=0.3)
        cb = score_endpoints(st.eps_j_per_token, st.queue_tokens, st.tps, st.prefill_weight,
                             req.tokens, req.input_tokens, req.deadline_s, req.lam,
                             st.prefill_j_per_token, req.output_tokens)
        first = first_token_s(st.prefill_wait_s, st.prefill_step_s, st.prefill_chunk_tokens,
                              st.prefill_s_per_token, req.input_tokens)
        late = slo_infeasible(first, st.batch_room, req.ttft_slo_s)
        for k in (1, 3):
            got, scores = routing_profile("joulesched").pick(req, st, k)
            assert got == rank_endpoints(cb, k, late=late, first_token=first)
            assert np.array_equal(scores.cost, cb.cost)
            feasible = [i for i in got if not late[i]]
            assert got[:len(feasible)] == feasible  # SLO-feasible endpoints first
            # among the late ones, the soonest first token first (least-loaded's choice)
            rest = got[len(feasible):]
            assert [first[i] for i in rest] == sorted(first[i] for i in rest)


def test_overflow_goes_where_the_batch_keeps_tpot_then_least_loaded() -> None:
    """Nobody keeps the SLO (every batch past b*): the request goes to an endpoint whose
    batch still meets TPOT (outstanding + 1 <= tpot_batch) before the soonest first
    token on a batch past it; when none can, to least-loaded's choice."""
    prof = routing_profile("joulesched")
    # endpoint 0: fastest prefill, 240 in flight, TPOT batch 100 (the pile-on)
    st = _state(3, eps_j_per_token=[0.1, 0.3, 0.3], tps=[2000.0, 500.0, 500.0],
                prefill_s_per_token=[2e-5, 1e-4, 1e-4], batch_room=[-193.0, 0.0, -1.0],
                outstanding=[240.0, 4.0, 5.0], tpot_batch=[100.0, 10.0, 5.0],
                inv_capacity=[0.05, 0.25, 0.25])
    req = REQ._replace(input_tokens=1000.0, ttft_slo_s=0.3)
    got, scores = prof.pick(req, st, 3)
    assert scores.late is not None and scores.late.all()
    assert scores.first_token_s is not None and scores.first_token_s.argmin() == 0
    assert got == [1, 0, 2]  # within TPOT first, then the soonest first token
    assert overflow_rank(st.outstanding, st.tpot_batch, st.inv_capacity).tolist() == [
        1.0, 0.0, 1.0]
    # no batch can take it within TPOT: (outstanding + 1) x 1 / capacity, as least-loaded
    st.tpot_batch[:] = [100.0, 4.0, 5.0]
    assert prof.pick(req, st, 3)[0] == [1, 2, 0]
    assert prof.pick(req, st, 1)[0] == routing_profile("least-loaded").pick(req, st, 1)[0]
    # unknown TPOT batches (inf, the default): the soonest first token, as before
    st.tpot_batch[:] = np.inf
    assert prof.pick(req, st, 1)[0] == [0]


def test_overflow_ranks_endpoints_that_delay_a_tighter_class_last() -> None:
    """Property over random pools: with a ``delays_tighter`` mask, while some endpoint is
    within its TPOT batch, within ranks before past it, and in each of those groups the
    unmarked before the marked; when none is within, every unmarked before every marked,
    each part in least-loaded's order; a mask with none marked changes nothing."""
    rng = np.random.default_rng(5)
    for _ in range(400):
        n = int(rng.integers(1, 12))
        out = rng.choice([0.0, 3.0, 8.0, 40.0], n)
        batch = rng.choice([0.0, 4.0, 9.0, 50.0, np.inf], n)
        inv = rng.choice([0.1, 0.25, 1.0], n)
        marked = rng.random(n) < 0.4
        keys = overflow_rank(out, batch, inv, marked)
        plain = overflow_rank(out, batch, inv)
        assert overflow_rank(out, batch, inv, np.zeros(n, bool)).tolist() == plain.tolist()
        within = out + 1.0 <= batch
        score = (out + 1.0) * inv
        for i in range(n):
            for j in range(n):
                if within.any():
                    if within[i] and not within[j]:
                        assert keys[i] < keys[j]
                    if within[i] == within[j] and not marked[i] and marked[j]:
                        assert keys[i] < keys[j]
                else:
                    if not marked[i] and marked[j]:
                        assert keys[i] < keys[j]
                    if marked[i] == marked[j]:
                        assert (keys[i] < keys[j]) == (score[i] < score[j])


def test_a_late_request_keeps_its_prefill_from_a_tighter_class() -> None:
    """Every endpoint late: endpoint 0, shared with a class whose TTFT is tighter than
    the request's, gives the soonest first token, but the request goes to endpoint 1;
    shared with a class no tighter than the request, endpoint 0 keeps it."""
    prof = routing_profile("joulesched")
    st = _state(2, eps_j_per_token=[0.1, 0.3], tps=[2000.0, 500.0],
                prefill_s_per_token=[2e-5, 1e-4], outstanding=[1.0, 1.0],
                tpot_batch=[8.0, 8.0])
    req = REQ._replace(input_tokens=20_000.0, ttft_slo_s=0.35)
    assert prof.pick(req, st, 2)[0] == [0, 1]  # soonest first token: the shared one
    st.shared_ttft_s[:] = [0.3, np.inf]
    got, scores = prof.pick(req, st, 2)
    assert scores.late is not None and scores.late.all()
    assert got == [1, 0]
    st.shared_ttft_s[:] = [0.35, np.inf]  # as tight as the request's own: no reason
    assert prof.pick(req, st, 2)[0] == [0, 1]


def test_least_loaded_fewest_outstanding_per_capacity_first_on_ties() -> None:
    prof = routing_profile("least-loaded")
    st = _state(3, outstanding=[2, 1, 1])
    assert prof.pick(REQ, st, 3)[0] == [1, 2, 0]
    # a faster endpoint (twice the req/s) carries twice the requests before it loses
    st = _state(2, outstanding=[3, 1], inv_capacity=[0.5, 1.0])
    assert prof.pick(REQ, st)[0] == [0]  # (3+1)/2 = 2 ties (1+1)/1 = 2: the first
    st = _state(2, outstanding=[4, 1], inv_capacity=[0.5, 1.0])
    assert prof.pick(REQ, st)[0] == [1]  # 2.5 > 2


def test_least_loaded_never_picks_an_endpoint_that_cannot_serve() -> None:
    st = _state(3, outstanding=[0, 4, 5], inv_capacity=[np.nan, 1.0, 1.0])
    assert routing_profile("least-loaded").pick(REQ, st, 3)[0] == [1, 2]


def test_round_robin_takes_turns_and_offers_the_next_as_fallbacks() -> None:
    prof = routing_profile("round-robin")
    st = EndpointState(3)
    assert [prof.pick(REQ, st)[0][0] for _ in range(5)] == [0, 1, 2, 0, 1]
    assert prof.pick(REQ, st, 3)[0] == [2, 0, 1]
    assert routing_profile("round-robin").pick(REQ, st)[0] == [0]  # its own turn


class _KVScorer:
    """A scorer added later, reading a column every caller may fill: no signature change."""

    name: ClassVar[str] = "kv-test"

    def score(self, request: RequestInfo, endpoints: EndpointState) -> Scores:
        return Scores(np.nan_to_num(endpoints.kv_cache_usage, nan=0.0) * 100.0)


class _NotFull:
    name: ClassVar[str] = "kv-not-full"

    def filter(self, request: RequestInfo, endpoints: EndpointState) -> np.ndarray:
        return ~(endpoints.kv_cache_usage >= 0.99)


def test_new_scorer_and_filter_plug_in_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(SCORERS, "kv-test", _KVScorer)
    register_scorer(_KVScorer)
    assert SCORERS["kv-test"] is _KVScorer
    js, kv = SCORERS["joulesched"](), SCORERS["kv-test"]()
    st = _state(3, eps_j_per_token=[0.1, 0.2, 0.3], tps=[1000.0] * 3,
                kv_cache_usage=[1.0, 0.5, 0.0])
    joulesched_only = RoutingProfile("js", ((js, 1.0),), routing_profile("joulesched").picker)
    assert joulesched_only.pick(REQ, st)[0] == [0]  # 10 J < 20 J < 30 J
    with_kv = RoutingProfile("js+kv", ((js, 1.0), (kv, 0.5)),
                             routing_profile("joulesched").picker)
    # costs 10 + 50, 20 + 25, 30 + 0 J: the emptier cache wins
    got, scores = with_kv.pick(REQ, st, 3)
    assert got == [2, 1, 0]
    assert scores.breakdown is not None and np.allclose(scores.breakdown.cost, [60, 45, 30])
    filtered = RoutingProfile("js|kv", ((js, 1.0),), routing_profile("joulesched").picker,
                              filters=(_NotFull(),))
    assert filtered.pick(REQ, st, 3)[0] == [1, 2]  # the full one is never offered
