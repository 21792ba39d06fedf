"""core.routing: endpoint and node inputs of the JouleSched cost, and the ranking rule."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from joulepool.core.cost import joulesched_cost
from joulepool.core.profiles import A100_8B, H100_8B, L4_8B
from joulepool.core.routing import (
    EndpointModel,
    default_deadline,
    endpoint_queue_tokens,
    node_capacity_tps,
    node_load_tps,
    prefill_weight,
    queue_tokens_estimate,
    rank_endpoints,
    replica_demand_tps,
    replica_point,
    request_tokens,
    score_endpoints,
    waiting_requests_estimate,
)


def test_queue_estimate_counts_running_half_done() -> None:
    q = queue_tokens_estimate([2, 0], [4, 0], 100.0)
    assert q.tolist() == [2 * 100 + 4 * 50, 0]
    assert queue_tokens_estimate([-1], [-3], 100.0).tolist() == [0.0]


def test_request_tokens_and_deadline() -> None:
    assert request_tokens(200) == 200
    assert request_tokens(200, 1000, 0.1) == pytest.approx(300)
    assert default_deadline(100, ttft_s=0.5, tpot_s=0.05) == pytest.approx(5.5)


def test_rank_prefers_cheap_then_eta_then_index_and_drops_unusable() -> None:
    b = joulesched_cost([1.0, 0.5, 0.5, 0.2], [0, 0, 0, 0], [10, 10, 10, 0], 10, 100, 1.0)
    # endpoint 3 has no throughput: infinite cost, never offered
    assert rank_endpoints(b, 10) == [1, 2, 0]
    assert rank_endpoints(b, 1) == [1]
    assert rank_endpoints(b, 0) == []


def test_rank_hard_deadline_puts_feasible_first() -> None:
    # endpoint 0: cheap but late (ETA 10 s > 2 s); endpoint 1: dearer, on time
    b = joulesched_cost([0.1, 1.0], [90, 0], [10, 10], 10, 2.0, lam=0.01)
    assert rank_endpoints(b, 2) == [0, 1]
    assert rank_endpoints(b, 2, hard_deadline=True) == [1, 0]


def test_endpoint_model_tables_match_profile() -> None:
    m = EndpointModel.from_profile(H100_8B, tpot_slo_s=0.05)
    assert m.max_batch == 512
    eps, tps = m.at(0)  # alone: batch 1 (the drift estimator's reference)
    assert eps == pytest.approx(float(H100_8B.joules_per_token(1)))
    assert tps == pytest.approx(float(H100_8B.decode_tokens_per_s(1)))
    eps63, _ = m.at(63)
    assert eps63 == pytest.approx(float(H100_8B.joules_per_token(64)))
    assert m.at(10_000) == m.at(511)  # clamped at max batch
    c = EndpointModel.constant(0.3, 900)
    assert c.at(5) == (0.3, 900)
    assert (c.op_eps, c.op_tps, c.weight) == (0.3, 900, 0.0)  # no prefill model


def test_endpoint_model_reads_the_rule_at_the_operating_batch() -> None:
    m = EndpointModel.from_profile(H100_8B, tpot_slo_s=0.05)
    pt = replica_point(H100_8B, 0.05)
    assert m.batch == pt.batch > 1
    assert m.op_eps == pytest.approx(pt.eps) and m.op_tps == pytest.approx(pt.tps)
    assert m.prefill_s_per_token == pytest.approx(float(H100_8B.prefill_s(1.0)))
    assert m.weight == pytest.approx(pt.tps * m.prefill_s_per_token)
    # a slower clock: a smaller (or equal) operating batch and fewer tokens/s
    slow = EndpointModel.from_profile(H100_8B, 0.05, clock_mhz=H100_8B.f_min)
    assert slow.batch <= m.batch and slow.op_tps < m.op_tps
    # a looser TPOT allows a bigger batch, which costs fewer joules per token
    loose = EndpointModel.from_profile(H100_8B, 0.15)
    assert loose.batch >= m.batch and loose.op_eps <= m.op_eps


def test_waiting_and_queue_with_prefill() -> None:
    w = waiting_requests_estimate([0, 3, 0], [10, 2, 600], [512, 512, 512])
    assert w.tolist() == [0.0, 3.0, 88.0]
    assert float(waiting_requests_estimate(0, 600, 512)) == 88.0
    assert prefill_weight(1000.0, 5e-5) == pytest.approx(0.05)
    q = endpoint_queue_tokens(np.array([100.0, 0.0]), np.array([2000.0, 0.0]),
                              np.array([0.05, 0.5]))
    assert q.tolist() == pytest.approx([200.0, 0.0])
    assert endpoint_queue_tokens(100.0, 2000.0, 0.05) == pytest.approx(200.0)  # floats too


def test_score_counts_the_requests_own_prefill() -> None:
    # ETA = (q + w * prompt + t) / mu = decode time + prefill time (prompt x s/token)
    mu, s_per_tok = np.array([1000.0, 1000.0]), np.array([1e-4, 1e-3])
    w = prefill_weight(mu, s_per_tok)
    b = score_endpoints([0.1, 0.1], np.zeros(2), mu, w, 200.0, 1000.0, 10.0, 1.0)
    assert b.eta_s.tolist() == pytest.approx([0.2 + 0.1, 0.2 + 1.0])
    assert rank_endpoints(b, 2) == [0, 1]  # equal cost: the faster prefill wins on ETA
    # no prompt: the paper's ETA
    b0 = score_endpoints([0.1, 0.1], np.zeros(2), mu, w, 200.0, 0.0, 10.0, 1.0)
    assert b0.eta_s.tolist() == pytest.approx([0.2, 0.2])


def test_rank_ties_go_to_lower_eta_then_index() -> None:
    b = joulesched_cost([0.1, 0.1, 0.1, 0.1], [500, 100, 100, 300], [1000] * 4, 200, 30, 10)
    assert rank_endpoints(b, 4) == [1, 2, 3, 0]
    assert rank_endpoints(b, 1) == [1]
    # a strictly cheaper endpoint wins whatever its ETA
    b = joulesched_cost([0.2, 0.1, 0.2], [0, 900, 0], [1000] * 3, 200, 30, 10)
    assert rank_endpoints(b, 3) == [1, 0, 2]
    # lambda = 0 and an endpoint that cannot serve: NaN cost, left out on both paths
    b = joulesched_cost([0.01, 0.5, 0.5], [0, 0, 0], [0, 100, 100], 10, 1.0, 0.0)
    assert np.isnan(b.cost[0])
    assert rank_endpoints(b, 1) == [1] and rank_endpoints(b, 3) == [1, 2]


@given(st.lists(st.tuples(st.sampled_from([0.07, 0.1, 0.16]), st.integers(0, 20),
                          st.sampled_from([300.0, 900.0, 1500.0])), min_size=1, max_size=300),
       st.floats(0, 100))
def test_rank_one_is_the_head_of_the_full_ranking(rows, lam) -> None:
    eps, q, mu = (np.array(x, dtype=np.float64) for x in zip(*rows, strict=True))
    b = joulesched_cost(eps, q * 100.0, mu, 200, 5.0, lam)
    full = rank_endpoints(b, len(rows))
    order = sorted(range(len(rows)), key=lambda i: (b.cost[i], b.eta_s[i], i))
    assert full == order
    assert rank_endpoints(b, 1) == order[:1]


@given(st.floats(0, 1e5), st.floats(0, 1e5), st.floats(0, 1e4), st.floats(0, 1e3))
def test_more_work_ahead_never_lowers_the_cost(q, extra, prompt, lam) -> None:
    """No positive feedback: with eps at the operating batch, load on an endpoint can
    only raise its cost (the live-batch eps made a busier endpoint look cheaper)."""
    m = EndpointModel.from_profile(H100_8B, 0.15)
    args = ([m.op_eps], [m.op_tps], [m.weight], 300.0, prompt, 20.0, lam)
    lo = score_endpoints(args[0], np.array([q]), *args[1:])
    hi = score_endpoints(args[0], np.array([q + extra]), *args[1:])
    assert hi.cost[0] >= lo.cost[0] and hi.eta_s[0] >= lo.eta_s[0]


def test_replica_point_meets_tpot() -> None:
    pt = replica_point(H100_8B, tpot_slo_s=0.05)
    assert float(H100_8B.itl_s(pt.batch)) <= 0.05
    assert pt.eps == pytest.approx(float(H100_8B.joules_per_token(pt.batch)))
    # an impossible TPOT still yields batch 1 rather than nothing
    assert replica_point(L4_8B, tpot_slo_s=1e-6).batch == 1
    # at their planned batches H100 is the more efficient product for 8B
    assert replica_point(H100_8B, 0.05).eps < replica_point(A100_8B, 0.05).eps


def test_node_capacity_and_load() -> None:
    cap = node_capacity_tps([8, 3, 0], 2, [100.0, 100.0, 100.0])
    assert cap.tolist() == [400.0, 100.0, 0.0]
    load = node_load_tps([4, 0, 0], 2, [100.0, 100.0, 100.0], 0.5, [0, 1000, 0], 10.0)
    assert load.tolist() == [100.0, 100.0, 0.0]


def test_replica_demand_is_weighted_mean() -> None:
    assert replica_demand_tps([100, 300], [3, 1], 0.5) == pytest.approx(0.5 * 600 / 4)
    assert replica_demand_tps([np.inf, 0], [1, 1], 0.9) == 0.0
