"""The marginal-energy rule's two inputs added for issue 11's dominated cells
(docs/experiments/marginal-energy.md, "Dominated cells"): X(b) at the clock each batch needs on an
endpoint whose clock follows its load (core.routing.excess_at_needed_clock), and marginal
carbon on a carbon-objective cluster (core.routing.carbon_weights), in the production
router and the simulator."""

from __future__ import annotations

import argparse
import math
from typing import Any

import numpy as np
import pytest

from joulepool.core.classes import CLASS_NAMES, ClassBoundaries, freesh_slo
from joulepool.core.planner import PlanNode
from joulepool.core.profiles import DEFAULT_PROFILES, find_profile
from joulepool.core.routing import (
    EndpointModel,
    carbon_weights,
    excess_at_needed_clock,
)
from joulepool.kube import testing as T
from joulepool.kube.policy import EnergyPolicyPoller
from joulepool.kube.pools import Router, RouterSettings
from joulepool.kube.state import ClusterState
from joulepool.router.models import RouteRequest, route
from joulepool.sim.cluster import SimCluster
from joulepool.sim.engine import simulate
from joulepool.sim.policies import POLICIES
from joulepool.sim.runner import model_tables
from joulepool.sim.tables import build_table
from joulepool.sim.workload import Workload

H100 = find_profile("H100", "llama-3.1-8b", 1, DEFAULT_PROFILES)


# -- X(b) at the clock the batch needs ---------------------------------------------------
def test_excess_at_needed_clock_takes_the_lowest_clock_meeting_the_step() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        clocks, batches = int(rng.integers(1, 8)), int(rng.integers(1, 30))
        # step time falls with the clock, rises with the batch
        itl = np.sort(rng.uniform(0.01, 0.2, (clocks, batches)), axis=0)[::-1]
        itl = np.sort(itl, axis=1)
        x = rng.uniform(1.0, 50.0, (clocks, batches))
        target = float(rng.uniform(0.0, 0.25))
        got = excess_at_needed_clock(itl, x, target)
        for b in range(batches):
            ok = [c for c in range(clocks) if itl[c, b] <= target]
            assert got[b] == x[ok[0] if ok else clocks - 1, b]


def test_router_and_simulator_read_the_same_needed_clock_row() -> None:
    """One formula: the production router's X(b) (EndpointModel with a step target) is the
    simulator's ProfileTable.excess_needed_j for MIAD's target (1 - margin) x TPOT."""
    assert H100 is not None
    tpot = 0.02  # tight enough that larger batches need higher clocks
    table = build_table(H100, tpot)
    m = EndpointModel.from_profile(H100, tpot, step_target_s=0.9 * tpot)
    np.testing.assert_allclose(m.excess_table[1:], table.excess_needed_j[1:], rtol=1e-12)
    fixed = np.asarray(table.excess_step_j[0])  # X(b) at f_min
    needed = np.asarray(table.excess_needed_j)
    rises = np.flatnonzero(needed[1:] > fixed[1:] * (1 + 1e-9)) + 1
    assert rises.size, "no batch needs more than f_min at this TPOT"
    k = int(rises[0]) - 1  # joining k requests pushes the clock up for all of them
    assert needed[k + 1] - needed[k] > fixed[k + 1] - fixed[k]


def test_the_needed_clock_row_follows_the_engines_miad_margin() -> None:
    """MIAD holds the step at (1 - margin) x TPOT: a wider margin needs other clocks, and
    the simulator's table (build_table, ProfileTable.with_miad_margin, the Simulator's
    tables under EngineParams.miad_margin) and its production router
    (ProductionRouter's endpoint models) read X(b) at the clock for the run's margin."""
    from sim_helpers import cluster, workload

    from joulepool.sim.engine import EngineParams, Simulator
    from joulepool.sim.production import ProductionRouter

    assert H100 is not None
    tpot = 0.02
    default = build_table(H100, tpot)
    wide = build_table(H100, tpot, miad_margin=0.3)
    assert wide.miad_margin == 0.3 and wide.excess_needed_j != default.excess_needed_j
    m = EndpointModel.from_profile(H100, tpot, step_target_s=0.7 * tpot)
    np.testing.assert_allclose(m.excess_table[1:], wide.excess_needed_j[1:], rtol=1e-12)
    assert default.with_miad_margin(default.miad_margin) is default
    assert default.with_miad_margin(0.3).excess_needed_j == wide.excess_needed_j
    sim = Simulator(cluster([("h", "H100", 1)]), workload([0.0], [100], [10], 10.0),
                    POLICIES["miad-only"], {H100.mode: default},
                    params=EngineParams(miad_margin=0.3))
    assert sim.tables[H100.mode].excess_needed_j == wide.excess_needed_j
    for margin, table in ((0.1, default), (0.3, wide)):
        router = ProductionRouter([(0, "h", H100)], 1.0, tpot, miad_margin=margin)
        np.testing.assert_allclose(router.pool.endpoints[0].model.excess_table[1:],
                                   table.excess_needed_j[1:], rtol=1e-12)


# -- marginal carbon ---------------------------------------------------------------------
def test_carbon_weights() -> None:
    np.testing.assert_allclose(carbon_weights([300.0, 100.0, 200.0]), [1.5, 0.5, 1.0])
    np.testing.assert_allclose(carbon_weights([300.0, math.nan, 100.0]), [1.5, 1.0, 0.5])
    np.testing.assert_array_equal(carbon_weights([math.nan, math.nan]), [1.0, 1.0])
    np.testing.assert_array_equal(carbon_weights([-5.0, 0.0]), [1.0, 1.0])
    assert carbon_weights([]).size == 0


def test_without_clock_steering_the_router_reads_decode_energy_at_the_top_clock() -> None:
    """`joulepool router --no-clocks-follow-load` (the chart's setting without node
    agents): X(b) is the profile's at f_max, not at the clock each batch needs."""
    from joulepool.router.settings import add_arguments, load_settings

    assert H100 is not None
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    off = load_settings(parser.parse_args(["--no-cluster", "--no-clocks-follow-load"]),
                        environ={}).router_settings()
    on = load_settings(parser.parse_args(["--no-cluster"]), environ={}).router_settings()
    assert on.clocks_follow_load and not off.clocks_follow_load
    tpot = 0.02  # tight enough that larger batches need higher clocks
    fixed = Router(off).endpoint_model("H100", "llama-3.1-8b", 1, tpot_s=tpot)
    steered = Router(on).endpoint_model("H100", "llama-3.1-8b", 1, tpot_s=tpot)
    np.testing.assert_allclose(fixed.excess_table,
                               EndpointModel.from_profile(H100, tpot).excess_table)
    np.testing.assert_allclose(
        steered.excess_table,
        EndpointModel.from_profile(H100, tpot, step_target_s=0.9 * tpot).excess_table)
    assert not np.allclose(fixed.excess_table, steered.excess_table)


def _carbon_router() -> tuple[Router, ClusterState]:
    """Two identical H100 endpoints, the first (by address) at a dirty site."""
    s = ClusterState()
    s.replace_nodes([T.node("h-dirty", "H100", region="dirty"),
                     T.node("h-clean", "H100", region="clean")])
    s.replace_pods([T.pod("a", node_name="h-dirty", ready=True, ip="10.0.0.1"),
                    T.pod("b", node_name="h-clean", ready=True, ip="10.0.0.2")])
    s.set_plan(T.plan({"default.chat": [("h-dirty", "H100", 1), ("h-clean", "H100", 1)]}))
    return Router(RouterSettings(), s), s


class _Policy:
    def __init__(self, obj: dict[str, Any]) -> None:
        self.obj = obj

    def get_cluster_custom_object(self, *a: Any, **kw: Any) -> dict[str, Any]:
        return self.obj


def _policy(objective: str) -> _Policy:
    return _Policy({"apiVersion": "joulepool.dev/v1alpha1", "kind": "EnergyPolicy",
                    "metadata": {"name": "default"},
                    "spec": {"objective": objective, "carbon": [
                        {"site": "dirty", "gramsPerKWh": 600.0},
                        {"site": "clean", "gramsPerKWh": 100.0}]}})


async def test_the_router_ranks_marginal_carbon_on_a_carbon_objective() -> None:
    r, _ = _carbon_router()
    req = RouteRequest.model_validate({"pool": "default.chat", "outputTokens": 50,
                                       "inputTokens": 100})
    # energy objective: equal energy, the first endpoint (the dirty site)
    assert route(r, req, now=0.0).endpoint == "10.0.0.1:8000"
    await EnergyPolicyPoller(_policy("energy"), r).poll()
    pool = r.pool("default.chat")
    np.testing.assert_array_equal(pool.carbon_w, [1.0, 1.0])
    await EnergyPolicyPoller(_policy("carbon"), r).poll()
    pool = r.pool("default.chat")
    assert [e.site for e in pool.endpoints] == ["dirty", "clean"]
    np.testing.assert_allclose(pool.carbon_w, [600 / 350, 100 / 350])
    st = pool.state  # the same profile, six times the grid intensity
    assert st.wake_j_per_token[0] / st.wake_j_per_token[1] == pytest.approx(6.0)
    assert st.prefill_j_per_token[0] / st.prefill_j_per_token[1] == pytest.approx(6.0)
    r2, _ = _carbon_router()
    await EnergyPolicyPoller(_policy("carbon"), r2).poll()
    assert route(r2, req, now=0.0).endpoint == "10.0.0.2:8000"
    # the policy gone: energy again
    r2.apply_policy(None)
    np.testing.assert_array_equal(r2.pool("default.chat").carbon_w, [1.0, 1.0])


def _two_site_cluster(objective: str) -> SimCluster:
    nodes = tuple(PlanNode(f"{site}-{k}", site, "H100", 1)
                  for site in ("dirty", "clean") for k in range(2))
    return SimCluster(
        name="two-site", model="llama-3.1-8b", nodes=nodes,
        carbon_g_per_kwh={"dirty": (600.0,), "clean": (100.0,)}, carbon_step_s=300.0,
        static_modes={"H100": 1}, plan_modes=("1xH100",), objective=objective,  # type: ignore[arg-type]
        duration_s=60.0)


def _stream(n: int, duration: float) -> Workload:
    rng = np.random.default_rng(7)
    a = np.sort(rng.uniform(0.0, duration, n))
    i = rng.integers(100, 400, n)
    o = rng.integers(50, 300, n)
    cls = ClassBoundaries().classify_many(i, o).astype(np.int64)
    ttft = np.array([freesh_slo(CLASS_NAMES[c]).ttft_s for c in cls])
    return Workload(arrival_s=a, input_tokens=i, output_tokens=o, predicted_tokens=o.copy(),
                    category=np.zeros(n, dtype=np.int64), bulk=np.zeros(n, dtype=np.bool_),
                    cls=cls, ttft_slo_s=ttft, tpot_slo_s=np.full(n, 0.15),
                    deadline_s=ttft + o * 0.15, duration_s=duration, scale=1.0)


@pytest.mark.parametrize("policy", ["joulesched", "joulesched-router"])
def test_joulesched_moves_work_to_the_clean_site_on_a_carbon_objective(policy: str) -> None:
    """The simulator's rule and the production router in the simulator weigh marginal
    energy by the site's intensity on a carbon-objective cluster (nothing else differs
    between the two runs): the clean site does most of the work and the run emits less."""
    wl = _stream(600, 30.0)
    runs = {}
    for objective in ("energy", "carbon"):
        c = _two_site_cluster(objective)
        runs[objective] = simulate(c, wl, POLICIES[policy], model_tables(c))
    energy, carbon = runs["energy"], runs["carbon"]
    clean = {k: float(r.site_energy_j["clean"].sum()) for k, r in runs.items()}
    dirty = {k: float(r.site_energy_j["dirty"].sum()) for k, r in runs.items()}
    assert clean["carbon"] > dirty["carbon"]
    assert dirty["carbon"] < dirty["energy"]
    assert carbon.carbon_g < 0.95 * energy.carbon_g
