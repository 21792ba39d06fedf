"""One endpoint-scoring rule: the simulator's JouleSched and the production router agree.

The simulator's ``joulesched`` policy scores instances with core.routing's rule;
``joulesched-router`` drives core.router.PoolRouter, the routing service's own
state machine. Both must pick efficient GPUs without piling onto the busiest one
(the old router rule read eps at the live batch: -70 % energy, 98 % deadline
misses on joulesched-320).
"""

from __future__ import annotations

import numpy as np
import pytest
from sim_helpers import cluster

from joulepool.core.router import PoolRouter
from joulepool.core.routing import EndpointModel
from joulepool.sim.engine import simulate
from joulepool.sim.policies import POLICIES
from joulepool.sim.runner import TPOT_TARGET_S, model_tables, static_capacity
from joulepool.sim.trace import load_trace
from joulepool.sim.workload import build_workload


@pytest.fixture(scope="module")
def mixed():
    """2 H100 + 4 A100 + 2 L4 at half their static capacity (~23 req/s): the H100s
    alone cannot take it all at their TPOT-meeting batch, so lateness must spill."""
    cl = cluster([("h", "H100", 2), ("a", "A100", 4), ("l", "L4", 2)])
    tables = model_tables(cl)
    cap = static_capacity(cl, 1150.0, 210.0, tables)
    total = sum(cap.per_mode_rps[f"1x{p}"] * n for p, n in (("H100", 2), ("A100", 4), ("L4", 2)))
    wl = build_workload(load_trace(), 120.0, mode="rate", value=0.5 * total, seed=1)
    return cl, wl, tables, cap


def _miss(r, wl) -> float:
    return float(np.mean(~(r.t_done - wl.arrival_s <= wl.deadline_s)))


def test_sim_tables_read_the_rule_where_the_router_does():
    """The simulator's per-instance eps_n / mu_n are EndpointModel's operating point."""
    tables = model_tables(cluster([("h", "H100", 1), ("a", "A100", 1), ("l", "L4", 1)]))
    for tab in tables.values():
        for ci in (0, len(tab.clocks) // 2, tab.top):
            m = EndpointModel.from_profile(tab.profile, TPOT_TARGET_S, tab.clocks[ci])
            assert tab.operating_batch[ci] == m.batch
            assert tab.eps_j_per_token[ci] == pytest.approx(m.op_eps, rel=1e-12)
            assert tab.tps[ci][tab.operating_batch[ci]] == pytest.approx(m.op_tps, rel=1e-12)
            assert tab.prefill_s_per_token[ci] == pytest.approx(m.prefill_s_per_token, rel=1e-12)


def test_router_policy_runs_the_production_router(mixed, monkeypatch):
    cl, wl, tables, cap = mixed
    calls = {"decide": 0, "report": 0}
    decide, report = PoolRouter.decide, PoolRouter.report

    def counting_decide(self, *a, **kw):
        calls["decide"] += 1
        return decide(self, *a, **kw)

    def counting_report(self, *a, **kw):
        calls["report"] += 1
        return report(self, *a, **kw)

    monkeypatch.setattr(PoolRouter, "decide", counting_decide)
    monkeypatch.setattr(PoolRouter, "report", counting_report)
    r = simulate(cl, wl, POLICIES["joulesched-router"], tables,
                 static_capacity_rps=cap.per_mode_rps)
    assert calls["decide"] == wl.requests
    assert calls["report"] == int(np.isfinite(r.t_done).sum())
    assert any("production request router" in n for n in r.notes)
    assert r.lam_series and r.lam_series[0] == (0.0, 10.0)


def _ttft_ok(r, wl) -> float:
    return float(np.mean(r.t_first - wl.arrival_s <= wl.ttft_slo_s))


def test_both_paths_save_energy_without_piling_on(mixed):
    cl, wl, tables, cap = mixed
    js = simulate(cl, wl, POLICIES["joulesched"], tables, static_capacity_rps=cap.per_mode_rps)
    pr = simulate(cl, wl, POLICIES["joulesched-router"], tables,
                  static_capacity_rps=cap.per_mode_rps)
    h100 = js.products.index("H100")
    ll = simulate(cl, wl, POLICIES["least-loaded"], tables, static_capacity_rps=cap.per_mode_rps)
    for r in (js, pr):
        # at iso-SLO with least-loaded (the test: misses <= max(1 %, LL + 0.5 pp),
        # TTFT attainment within 0.5 pp): the first-token guard keeps each request off
        # endpoints whose prefill queue would make it late, so on this small cluster
        # (two H100s cannot prefill half the load within TTFT) the saving is a few %
        assert _miss(r, wl) <= max(0.01, _miss(ll, wl) + 0.005)
        assert _ttft_ok(r, wl) >= _ttft_ok(ll, wl) - 0.005
        # (b* from the engine-faithful serving model: one H100 sustains 6.6 req/s of this
        # trace at 1 % TTFT misses, 99.0 % measured on the engine, where the prefill-first
        # model's 7.9 req/s measured 97.5 %: less is packed onto the H100s, saving 3.9 %)
        assert r.energy_j < 0.97 * ll.energy_j
        # consolidation on the efficient GPU, more than least-loaded's
        assert (r.instance_product == h100).mean() > (ll.instance_product == h100).mean() + 0.05
        # no pile-on: both H100s carry a similar share of the work
        h_busy = [b for b, p in zip(r.gpu_busy_s, r.gpu_product, strict=True) if p == "H100"]
        assert min(h_busy) > 0.8 * max(h_busy)
    # same rule, different inputs (exact state vs the router's ledger, prefill clock
    # and scrapes; 3.4 % apart with the engine-faithful b*, which leaves more requests
    # past b* where the inputs differ)
    assert pr.energy_j == pytest.approx(js.energy_j, rel=0.04)


def test_router_policy_is_deterministic_and_static_only(mixed):
    cl, wl, tables, cap = mixed
    a = simulate(cl, wl, POLICIES["joulesched-router"], tables,
                 static_capacity_rps=cap.per_mode_rps)
    b = simulate(cl, wl, POLICIES["joulesched-router"], tables,
                 static_capacity_rps=cap.per_mode_rps)
    assert np.array_equal(a.t_done, b.t_done, equal_nan=True)
    assert np.array_equal(a.gpu_energy_j, b.gpu_energy_j)
    from dataclasses import replace

    with pytest.raises(ValueError, match="static only"):
        simulate(cl, wl, replace(POLICIES["joulesched-router"], pools="planner"), tables, [1])  # type: ignore[list-item]
