"""core.routing: endpoint and node inputs of the JouleSched cost, and the ranking rule."""

from __future__ import annotations

import numpy as np
import pytest

from joulepool.core.cost import joulesched_cost
from joulepool.core.profiles import A100_8B, H100_8B, L4_8B
from joulepool.core.routing import (
    EndpointModel,
    default_deadline,
    node_capacity_tps,
    node_load_tps,
    queue_tokens_estimate,
    rank_endpoints,
    replica_demand_tps,
    replica_point,
    request_tokens,
)


def test_queue_estimate_counts_running_half_done() -> None:
    q = queue_tokens_estimate([2, 0], [4, 0], 100.0)
    assert q.tolist() == [2 * 100 + 4 * 50, 0]
    assert queue_tokens_estimate([-1], [-3], 100.0).tolist() == [0.0]


def test_request_tokens_and_deadline() -> None:
    assert request_tokens(200) == 200
    assert request_tokens(200, 1000, 0.1) == pytest.approx(300)
    assert default_deadline(100, ttft_s=0.5, tpot_s=0.05) == pytest.approx(5.5)


def test_rank_prefers_cheap_then_index_and_drops_unusable() -> None:
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
    m = EndpointModel.from_profile(H100_8B)
    assert m.max_batch == 512
    eps, tps = m.at(0)  # alone: batch 1
    assert eps == pytest.approx(float(H100_8B.joules_per_token(1)))
    assert tps == pytest.approx(float(H100_8B.decode_tokens_per_s(1)))
    eps63, _ = m.at(63)
    assert eps63 == pytest.approx(float(H100_8B.joules_per_token(64)))
    assert m.at(10_000) == m.at(511)  # clamped at max batch
    c = EndpointModel.constant(0.3, 900)
    assert c.at(5) == (0.3, 900)


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
