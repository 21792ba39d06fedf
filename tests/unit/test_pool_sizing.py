"""Pool-level TTFT sizing: serving points of one instance in a pool of n, and the planner's
fixed point over pool sizes (core.profiles, core.problem, core.sizing, core.routing)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from joulepool.core.planner import Mode, PlanNode, PlanProblem
from joulepool.core.problem import PoolSizes, ServiceClass, build_problem
from joulepool.core.profiles import H100_8B, L4_8B, ServingProfile
from joulepool.core.routing import EndpointModel, sustainable_batch
from joulepool.core.sizing import plan_pooled, plan_with_headroom, pool_sizes, pools_hold

# long prompts close to the TTFT (FREESH's LS class on an H100): TTFT-bound
LONG = (2000.0, 200.0, 0.6, 0.15)
H100_MODE = Mode("1xH100", "H100", 1)


@pytest.mark.parametrize("prof", [H100_8B, L4_8B])
def test_a_pool_of_one_is_the_per_instance_serving_point(prof: ServingProfile) -> None:
    assert prof.serving_point(*LONG, pool_size=1) == prof.serving_point(*LONG)
    with pytest.raises(ValueError):
        prof.serving_point(*LONG, pool_size=0)


def test_rate_per_instance_grows_with_the_pool_and_saturates() -> None:
    rates = [H100_8B.serving_point(*LONG, pool_size=n).rps for n in (1, 2, 4, 8, 16, 64)]
    assert all(b >= a for a, b in itertools.pairwise(rates)), rates
    assert rates[2] > 2.0 * rates[0]  # TTFT-bound: a pool of 4 carries > 2x per instance
    sp = H100_8B.serving_point(*LONG, pool_size=64)
    assert sp.rps <= sp.throughput_rps and sp.ttft_miss <= 0.01 + 1e-9
    # a TPOT- or KV-bound class gains nothing from pooling the prefills
    tpot_bound = (200.0, 600.0, 2.0, 0.05)
    one = H100_8B.serving_point(*tpot_bound)
    assert one.binding == "tpot"
    assert H100_8B.serving_point(*tpot_bound, pool_size=8).rps == pytest.approx(one.rps,
                                                                              rel=0.02)


def test_the_room_follows_the_pools_rate_in_one_place() -> None:
    rooms = [sustainable_batch(H100_8B, *LONG, pool_size=n) for n in (1, 4, 16)]
    assert rooms[0] < rooms[1] <= rooms[2]
    assert rooms[1] == max(int(H100_8B.serving_point(*LONG, pool_size=4).batch), 1)
    model = EndpointModel.from_profile(H100_8B, LONG[3], serving=LONG[:3], pool_size=4)
    assert model.carry_batch == min(rooms[1], model.max_batch)
    assert EndpointModel.from_profile(H100_8B, LONG[3], serving=LONG[:3]).carry == rooms[0]


def _builder(rps: float, gpus: int = 32):
    cls = ServiceClass("LS", *LONG, forecast_rps=(rps,))
    seen: list[PoolSizes] = []

    def build(hr, sizes: PoolSizes | None = None) -> PlanProblem:
        seen.append(dict(sizes or {}))
        return build_problem([cls], [H100_MODE], [PlanNode("h0", "s", "H100", gpus)],
                             lambda r, m: H100_8B, step_s=300.0, alpha=1.1,
                             objective="energy", headroom=hr, pool_sizes=sizes).problem

    return build, seen


@pytest.mark.parametrize("rps", [10.0, 20.0, 60.0])
def test_pooled_plan_deploys_fewer_instances_and_its_pools_hold(rps: float) -> None:
    build, seen = _builder(rps)
    alone = plan_with_headroom(lambda hr: build(hr))
    pooled = plan_pooled(build)
    assert alone.result.feasible and pooled.result.feasible
    n_alone, n_pooled = alone.result.instances("LS"), pooled.result.instances("LS")
    assert n_pooled < n_alone, (n_pooled, n_alone)
    assert pooled.solves >= 2 and len(seen) >= 3  # n = 1, then at least one pooled round
    # sound: the pool it deploys sustains, at its actual size, the rate it counted on ...
    n = pool_sizes(pooled.result)[("LS", "1xH100")]
    assert n == n_pooled
    planned = float(pooled.problem.capacity_rps[0, 0])
    assert H100_8B.serving_point(*LONG, pool_size=n).rps >= planned * (1 - 1e-6)
    assert pools_hold(pooled.problem, pooled.result, build(pooled.headroom, {("LS", "1xH100"): n}))
    # ... and carries the demand with the TTFT tail within its target at that size
    assert n * H100_8B.serving_point(*LONG, pool_size=n).rps >= 1.1 * rps * (1 - 1e-6)
    # the n = 1 plan was the fallback, never better
    assert pooled.result.objective <= alone.result.objective


def test_a_pooled_plan_whose_pool_would_not_hold_is_not_used() -> None:
    """A build whose rates rise with the pool so steeply that every pooled plan shrinks
    its pool below the size it was rated at: the fixed point keeps the n = 1 plan."""
    def build(hr, sizes: PoolSizes | None = None) -> PlanProblem:
        n = (sizes or {}).get(("A", "1xH100"), 1)
        return PlanProblem(classes=("A",), modes=(H100_MODE,),
                           nodes=(PlanNode("h0", "s", "H100", 64),),
                           power_w=np.array([[300.0]]),
                           capacity_rps=np.array([[1.0 * n]]),  # n instances: n req/s each
                           forecast_rps=np.array([[16.0]]), alpha=1.0)

    sized = plan_pooled(build)
    assert sized.result.feasible and sized.result.instances("A") == 16  # the n = 1 plan
    assert sized.solves >= 2  # pooled rounds ran, and were refused


def test_a_class_whose_bound_is_not_ttft_is_planned_as_before() -> None:
    cls = ServiceClass("X", 200.0, 600.0, 2.0, 0.05, forecast_rps=(60.0,))

    def build(hr, sizes: PoolSizes | None = None) -> PlanProblem:
        return build_problem([cls], [H100_MODE], [PlanNode("h0", "s", "H100", 32)],
                             lambda r, m: H100_8B, step_s=300.0, alpha=1.1,
                             objective="energy", headroom=hr, pool_sizes=sizes).problem

    alone = plan_with_headroom(lambda hr: build(hr))
    pooled = plan_pooled(build)
    assert pooled.result.instances("X") == alone.result.instances("X")


def test_a_window_that_fits_only_at_pool_level_keeps_its_full_headroom() -> None:
    # 27.5 req/s on 8 H100: one instance alone sustains 2.8 (8 carry 22.6), a pool of 8
    # 7.7 each
    build, _ = _builder(25.0, gpus=8)
    alone = plan_with_headroom(lambda hr: build(hr))
    assert alone.relaxed  # per instance, the cluster cannot carry the full headroom
    pooled = plan_pooled(build)
    assert pooled.result.feasible and not pooled.relaxed, pooled.note()
    n = pooled.result.instances("LS")
    assert n * H100_8B.serving_point(*LONG, pool_size=n).rps >= 1.1 * 25.0 * (1 - 1e-6)
    assert H100_8B.serving_point(*LONG, pool_size=n).rps >= (
        float(pooled.problem.capacity_rps[0, 0]) * (1 - 1e-6))
