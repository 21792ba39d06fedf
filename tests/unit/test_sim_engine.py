"""The simulator's engine: hand-computed answers, conservation laws, determinism."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from itertools import pairwise

import numpy as np
import pytest
from sim_helpers import cluster, workload

from joulepool.core.planner import PlanNode
from joulepool.core.profiles import H100_8B, L4_8B
from joulepool.sim.cluster import SimCluster, freesh_3site
from joulepool.sim.engine import EngineParams, Simulator, simulate
from joulepool.sim.instance import Instance
from joulepool.sim.planning import plan_windows
from joulepool.sim.policies import POLICIES
from joulepool.sim.runner import model_tables, static_capacity
from joulepool.sim.trace import load_trace
from joulepool.sim.workload import Workload, build_workload

RR, LL, JS = POLICIES["round-robin"], POLICIES["least-loaded"], POLICIES["joulesched"]
RECORD = EngineParams(record_power=True)


def _run(cl, wl, policy, plans=None, **kw):
    tables = model_tables(cl)
    return simulate(cl, wl, policy, tables, plans, **kw)


# ------------------------------------------------------------------ known answers
def test_one_gpu_two_requests_by_hand():
    """H100, llama-3.1-8b, f_max. Profile numbers: prefill 20,000 tok/s at 688 W (the
    b=512 point); decode b=1: 6.775 ms at 420 W; b=2 (step time linear in batch to
    b=8's 7.3 ms, power linear in log2(batch) to its 486 W): 6.85 ms at 442 W; idle 75 W.

    A (1000 in, 10 out) at 0: prefill 0 -> 0.05, first token at 0.05.
    B (500 in, 5 out) at 0.01 waits; chunked prefill (budget 8192 tokens per step) mixes
    all of B's 500 prompt tokens into A's next decode step: 6.775 ms + 500 x 0.05 ms =
    31.775 ms, B's first token at 0.081775, A has 1 token more (8 to go).
    Both decode at b=2 from 0.081775: B's 4 tokens end at + 4 x 6.85 ms = 0.109175;
    A's last 4 at b=1: 0.109175 + 4 x 6.775 ms = 0.136275.
    Energy to 1 s (the mixed step draws each part's power for its part):
    688 x 0.05 + (420 x 0.006775 + 688 x 0.025) + 442 x 0.0274 + 420 x 0.0271
    + 75 x 0.863725 = 142.717675 J (the same as prefill-then-decode: energy adds up).
    (Before chunked prefill B's prefill paused A: first tokens 0.05, 0.075; physics changed.)
    """
    cl = cluster([("n", "H100", 1)])
    wl = workload([0.0, 0.01], [1000, 500], [10, 5], duration=1.0)
    r = _run(cl, wl, RR)
    assert r.t_first == pytest.approx([0.05, 0.081775], abs=1e-9)
    assert r.t_done == pytest.approx([0.136275, 0.109175], abs=1e-8)
    assert r.energy_j == pytest.approx(142.717675, abs=1e-4)
    assert r.tokens_in_window == pytest.approx(15)
    assert r.gpu_busy_s[0] == pytest.approx(0.136275, abs=1e-8)


def test_two_gpu_types_one_request_by_hand():
    """An L4 (listed first) and an H100; one request (200 in, 3 out) at t = 0.1, T = 1 s.

    On the H100: prefill 0.01 s at 688 W, 2 tokens x 6.775 ms at 420 W, idle 75 W
    otherwise; the L4 idles at 16 W: 7.5 + 6.88 + 5.691 + 65.73375 + 16 = 101.80475 J.
    On the L4: prefill 200/2500 = 0.08 s at 71 W, 2 x 53.333 ms at 45 W, 16 W idle
    otherwise; the H100 idles at 75 W: 1.6 + 5.68 + 4.8 + 16 x 0.713333 + 75 = 98.4933 J.
    JouleSched's marginal energy (above idle) sees that the L4 adds less: (71 - 16) x
    0.08 + (45 - 16) x 0.10667 = 7.49 J vs (688 - 75) x 0.01 + (420 - 75) x 0.01355 =
    10.80 J, and picks it, as round-robin does by turn.
    """
    cl = cluster([("a-l4", "L4", 1), ("b-h100", "H100", 1)])
    wl = workload([0.1], [200], [3], duration=1.0)
    js = _run(cl, wl, JS)
    assert js.products[js.instance_product[0]] == "L4"
    assert js.t_done[0] - 0.1 == pytest.approx(0.08 + 2 * 16.0 / 300.0, abs=1e-9)
    assert js.energy_j == pytest.approx(98.493333, abs=1e-5)
    assert js.energy_j < 101.80475  # the H100 alternative, by hand above
    rr = _run(cl, wl, RR)
    assert rr.products[rr.instance_product[0]] == "L4"
    assert rr.t_done[0] - 0.1 == pytest.approx(0.08 + 2 * 16.0 / 300.0, abs=1e-9)
    assert rr.energy_j == pytest.approx(98.493333, abs=1e-5)


def test_profile_numbers_used_by_hand_tests():
    # guard: the hand computations above rest on these core values
    assert float(H100_8B.prefill_s(1000)) == pytest.approx(0.05)
    assert float(H100_8B.prefill_power_w()) == pytest.approx(688)
    assert float(H100_8B.itl_s(1)) == pytest.approx(0.006775)
    assert float(H100_8B.itl_s(2)) == pytest.approx(0.00685)
    assert float(H100_8B.power_w(2)) == pytest.approx(442)
    assert float(L4_8B.itl_s(1)) == pytest.approx(16 / 300)
    assert float(L4_8B.prefill_power_w()) == pytest.approx(71)


def test_table_prefill_is_core_prefill():
    tables = model_tables(cluster([("n", "H100", 1)]))
    tab = tables["1xH100"]
    for ci in (0, len(tab.clocks) // 2, tab.top):
        for tokens in (1, 137, 4000):
            assert tab.prefill_s_per_token[ci] * tokens == pytest.approx(
                float(tab.profile.prefill_s(tokens, tab.clocks[ci])), rel=1e-12)


# ------------------------------------------------------------------ independent ledger
# The engine integrates each instance's draw as it settles and adds idle power for free
# GPUs when they change hands; its per-GPU, per-site and carbon totals all come from that
# one ledger. The checks below recompute every GPU's energy another way: from the engine's
# log of power settings and GPU hand-overs alone, with idle power taken from the cluster,
# each GPU's draw rebuilt as a step function and integrated over any interval.
def _gpu_power_steps(r, cl):
    """Per GPU: [(t, W)], W drawn from t until the next entry (later entries win ties)."""
    assert r.power_log is not None and r.holder_log is not None, "run with record_power"
    draws = defaultdict(list)
    for t, k, w in r.power_log:
        draws[k].append((t, w))
    share = Counter(k for _, _, k in r.holder_log if k >= 0)  # each instance activates once
    hands = defaultdict(list)
    for t, g, k in r.holder_log:
        hands[g].append((t, k))
    steps = []
    for g, product in enumerate(r.gpu_product):
        idle = cl.idle_w(product)
        pts = [(0.0, idle)]
        for j, (t, k) in enumerate(hands[g]):
            if k < 0:
                pts.append((t, idle))
                continue
            end = hands[g][j + 1][0] if j + 1 < len(hands[g]) else math.inf
            pts += [(ts, w / share[k]) for ts, w in draws[k] if t <= ts < end]
        assert all(a[0] <= b[0] for a, b in pairwise(pts))
        steps.append(pts)
    return steps


def _integrate(pts, lo, hi):
    total = 0.0
    for (t0, w), (t1, _) in zip(pts, [*pts[1:], (math.inf, 0.0)], strict=True):
        a, b = max(t0, lo), min(t1, hi)
        if b > a:
            total += w * (b - a)
    return total


def _never_held(r):
    held = {g for _, g, k in r.holder_log if k >= 0}
    return [g for g in range(len(r.gpu_product)) if g not in held]


def _peak_w_per_gpu(tab):
    return max(max(max(row) for row in tab.power_w), *tab.prefill_power_w) / tab.gpus


def assert_energy_ledger(r, cl, tables):
    T = r.duration_s
    steps = _gpu_power_steps(r, cl)
    per_gpu = np.array([_integrate(p, 0.0, T) for p in steps])
    # 1. every GPU's energy, recomputed, is what the engine reports
    assert r.gpu_energy_j == pytest.approx(per_gpu, rel=1e-9, abs=1e-6)
    # 2. per site and carbon step, recomputed on the step boundaries
    edges = [k * cl.carbon_step_s for k in range(math.ceil(T / cl.carbon_step_s))] + [T]
    carbon = 0.0
    for site in cl.sites:
        ids = [g for g, s in enumerate(r.gpu_site) if s == site]
        buckets = [sum(_integrate(steps[g], a, b) for g in ids)
                   for a, b in pairwise(edges)]
        assert r.site_energy_j[site] == pytest.approx(buckets, rel=1e-9, abs=1e-6)
        carbon += sum(e * cl.carbon_at(site, a) / 3.6e6
                      for e, a in zip(buckets, edges, strict=False))
    assert r.carbon_g == pytest.approx(carbon, rel=1e-9)
    # 3. bounds: idle power x T <= each GPU <= its hungriest profiled draw x T
    for g, product in enumerate(r.gpu_product):
        peak = max([_peak_w_per_gpu(tab) for tab in tables.values()
                    if tab.profile.product.name == product] + [cl.idle_w(product)])
        assert cl.idle_w(product) * T - 1e-6 <= r.gpu_energy_j[g] <= peak * T + 1e-6
    # 4. GPUs that never held an instance drew exactly idle power for the whole window
    idle_ids = _never_held(r)
    idle_sum = sum(cl.idle_w(r.gpu_product[g]) for g in idle_ids) * T
    assert r.gpu_energy_j[idle_ids].sum() == pytest.approx(idle_sum, rel=1e-12)
    # 5. and the total is the sum of the per-GPU energies computed the other way
    assert r.energy_j == pytest.approx(per_gpu.sum(), rel=1e-9)
    return idle_ids


# ------------------------------------------------------------------ invariants
@pytest.fixture(scope="module")
def small_run():
    cl = cluster([("h", "H100", 4), ("a", "A100", 4), ("l", "L4", 2)])
    tables = model_tables(cl)
    trace = load_trace()
    # 8 req/s: every instance type stable even under round-robin (the L4s at ~45 %)
    wl = build_workload(trace, 240.0, mode="rate", value=8.0, seed=3)
    cap = static_capacity(cl, 1150.0, 210.0, tables)
    return cl, wl, tables, cap


@pytest.mark.parametrize("policy", ["round-robin", "joulesched", "miad-only"])
def test_energy_conservation_and_littles_law(small_run, policy):
    cl, wl, tables, cap = small_run
    r = simulate(cl, wl, POLICIES[policy], tables, params=RECORD,
                 static_capacity_rps=cap.per_mode_rps)
    # per GPU, per site and step, carbon: recomputed from the power log (see above)
    assert_energy_ledger(r, cl, tables)
    # the engine's own count of requests in the system, integrated over the window,
    # agrees with the arrival and completion times it recorded ...
    sojourn = r.t_done - wl.arrival_s
    assert not np.isnan(sojourn).any()
    in_window = np.minimum(r.t_done, wl.duration_s) - wl.arrival_s
    assert r.little_l * wl.duration_s == pytest.approx(in_window.sum(), rel=1e-9)
    # ... and Little's law holds: time-average number in system == arrival rate x mean
    # sojourn (up to the requests still in the system when the window closes)
    lam_w = wl.requests / wl.duration_s * sojourn.mean()
    assert r.little_l == pytest.approx(lam_w, rel=0.05)


def test_unused_gpus_draw_exactly_idle_power():
    # freesh-3site has 2 H100 at site-2 that no 70B mode fits: they idle all run long
    cl = freesh_3site()
    wl = build_workload(load_trace(), 120.0, mode="rate", value=2.0, seed=1)
    r = _run(cl, wl, RR, params=RECORD)
    idle_ids = [g for g, (s, p) in enumerate(zip(r.gpu_site, r.gpu_product, strict=True))
                if s == "site-2" and p == "H100"]
    assert len(idle_ids) == 2
    assert r.gpu_energy_j[idle_ids] == pytest.approx([75.0 * 120.0] * 2, rel=1e-12)
    assert assert_energy_ledger(r, cl, model_tables(cl)) == idle_ids


def test_planner_policies_pass_the_ledger_with_idle_gpus(small_run):
    # the planner leaves GPUs unheld (idle power only) and hands GPUs over at replans
    cl, _, tables, cap = small_run
    wl = build_workload(load_trace(), 180.0, mode="rate", value=15.0, seed=2)
    plans = plan_windows(cl, wl, interval_s=60.0)
    for name in ("freesh", "combined", "planner-only"):
        r = simulate(cl, wl, POLICIES[name], tables, plans, params=RECORD,
                     static_capacity_rps=cap.per_mode_rps)
        idle_ids = assert_energy_ledger(r, cl, tables)
        assert idle_ids, name  # the idle-only check above was not vacuous


def test_recording_power_changes_nothing(small_run):
    cl, wl, tables, cap = small_run
    a = simulate(cl, wl, JS, tables, static_capacity_rps=cap.per_mode_rps)
    b = simulate(cl, wl, JS, tables, params=RECORD, static_capacity_rps=cap.per_mode_rps)
    assert a.power_log is None and a.holder_log is None
    assert np.array_equal(a.t_done, b.t_done, equal_nan=True)
    assert np.array_equal(a.gpu_energy_j, b.gpu_energy_j)
    assert a.carbon_g == b.carbon_g


def test_deterministic_for_a_seed(small_run):
    cl, _, tables, cap = small_run
    trace = load_trace()
    runs = []
    for seed in (7, 7, 8):
        wl = build_workload(trace, 60.0, mode="rate", value=20.0, seed=seed)
        runs.append(simulate(cl, wl, POLICIES["combined"], tables, plan_windows(cl, wl),
                             static_capacity_rps=cap.per_mode_rps))
    a, b, c = runs
    assert np.array_equal(a.t_done, b.t_done, equal_nan=True)
    assert np.array_equal(a.gpu_energy_j, b.gpu_energy_j)
    assert a.energy_j != c.energy_j


def test_identical_gpus_joulesched_consolidates_at_the_same_slo():
    """Identical GPUs: joining a running batch costs a fraction of waking an idle one
    (core.routing's marginal energy), so JouleSched fills running instances up to the
    batch they carry within the SLO instead of spreading as least-loaded does: less
    energy, deadline misses within max(1 %, least-loaded's + 0.5 pp)."""
    cl = cluster([("h", "H100", 8)])
    tables = model_tables(cl)
    wl = build_workload(load_trace(), 300.0, mode="rate", value=40.0, seed=5)
    js = simulate(cl, wl, JS, tables)
    ll = simulate(cl, wl, LL, tables)
    miss_js = float(np.mean(~(js.t_done - wl.arrival_s <= wl.deadline_s)))
    miss_ll = float(np.mean(~(ll.t_done - wl.arrival_s <= wl.deadline_s)))
    assert js.energy_j < 0.95 * ll.energy_j
    assert miss_js <= max(0.01, miss_ll + 0.005)
    # consolidated: the busiest GPU worked clearly longer than the least busy one
    assert js.gpu_busy_s.min() < 0.8 * js.gpu_busy_s.max()


def test_heterogeneous_joulesched_prefers_efficient_gpus(small_run):
    cl, wl, tables, cap = small_run
    js = simulate(cl, wl, JS, tables, static_capacity_rps=cap.per_mode_rps)
    rr = simulate(cl, wl, RR, tables, static_capacity_rps=cap.per_mode_rps)
    h100 = js.products.index("H100")
    assert (js.instance_product == h100).mean() > 0.9
    assert js.energy_j < rr.energy_j


def test_miad_lowers_idle_clocks_and_max_clock_holds(small_run):
    cl, _, tables, cap = small_run
    wl = workload([0.5], [100], [5], duration=60.0)
    miad = simulate(cl, wl, POLICIES["miad-only"], tables, static_capacity_rps=cap.per_mode_rps)
    for name, clocks in miad.samples_clock.items():
        product = name.split("(")[1].split(",")[0]
        tab = next(t for t in tables.values() if t.profile.product.name == product)
        assert clocks[-1] == pytest.approx(tab.clocks[0])  # idle: walked down to f_min
    rr = simulate(cl, wl, RR, tables)
    for clocks in rr.samples_clock.values():
        assert np.ptp(clocks) == 0


def test_planner_policy_uses_only_planned_gpus_and_replans(small_run):
    cl, _, tables, cap = small_run
    wl = build_workload(load_trace(), 180.0, mode="rate", value=15.0, seed=2)
    plans = plan_windows(cl, wl, interval_s=60.0)
    assert len(plans) == 3
    r = simulate(cl, wl, POLICIES["freesh"], tables, plans, params=RECORD,
                 static_capacity_rps=cap.per_mode_rps)
    planned_gpus = sum(p.count for p in plans[0].instances)  # 1-GPU modes
    assert sum(1 for n in r.notes if n.startswith("plan @")) == 3
    assert f"{10 - planned_gpus} of 10 GPUs hold no instance" in " ".join(r.notes)
    assert not np.isnan(r.t_done).any()
    assert_energy_ledger(r, cl, tables)


def test_replan_with_multi_gpu_modes_drains_and_conserves_energy():
    nodes = (PlanNode("a0", "s1", "A100", 8), PlanNode("h0", "s2", "H100", 4))
    cl = SimCluster("t", "llama-3.1-70b", nodes, {"s1": (300.0,), "s2": (100.0, 500.0)}, 60.0,
                    {"A100": 4, "H100": 4}, ("2xA100", "4xA100", "8xA100", "4xH100"), "carbon",
                    180.0)
    tables = model_tables(cl)
    wl = build_workload(load_trace(), 180.0, mode="rate", value=1.5, seed=4)
    plans = plan_windows(cl, wl, interval_s=60.0)
    r = simulate(cl, wl, POLICIES["combined"], tables, plans, params=RECORD)
    assert_energy_ledger(r, cl, tables)
    assert max(Counter(k for _, _, k in r.holder_log if k >= 0).values()) > 1  # multi-GPU
    # carbon follows the site series step by step
    s2 = r.site_energy_j["s2"]
    expected = sum(e * (100.0 if k % 2 == 0 else 500.0) for k, e in enumerate(s2)) / 3.6e6
    expected += r.site_energy_j["s1"].sum() * 300.0 / 3.6e6
    assert r.carbon_g == pytest.approx(expected, rel=1e-9)


def test_ledger_across_drains_and_pending_instances():
    """Hand-made plans that force hand-overs: 4 x 2xA100, then 1 x 8xA100 (pending until
    all four drain) with the H100 node joining, then 2 x 4xA100 and the H100s idle again."""
    from joulepool.sim.planning import PlannedInstances, WindowPlan

    nodes = (PlanNode("a0", "s1", "A100", 8), PlanNode("h0", "s2", "H100", 4))
    cl = SimCluster("t", "llama-3.1-70b", nodes, {"s1": (300.0,), "s2": (100.0, 500.0)}, 45.0,
                    {"A100": 4, "H100": 4}, ("2xA100", "4xA100", "8xA100", "4xH100"), "carbon",
                    180.0)
    tables = model_tables(cl)
    wl = build_workload(load_trace(), 180.0, mode="rate", value=2.0, seed=4)

    def plan(t, *inst):
        return WindowPlan(t, tuple(PlannedInstances(*x) for x in inst), True, "hand", 0.0, "J",
                          0.0, (0.0,) * 4, ())

    plans = [
        plan(0.0, ("a0", "2xA100", 0, 1), ("a0", "2xA100", 1, 1), ("a0", "2xA100", 2, 1),
             ("a0", "2xA100", 3, 1)),
        plan(60.0, ("a0", "8xA100", 0, 1), ("h0", "4xH100", 2, 1)),
        plan(120.0, ("a0", "4xA100", 0, 1), ("a0", "4xA100", 2, 1)),
    ]
    r = simulate(cl, wl, POLICIES["planner-only"], tables, plans, params=RECORD)
    assert_energy_ledger(r, cl, tables)
    log = r.holder_log
    released = [t for t, _, k in log if k < 0]
    assert min(released) == 60.0 and max(released) > 60.0  # idle ones at once, busy drain
    eight = {k for _, _, k in log if k >= 0 and Counter(kk for _, _, kk in log)[k] == 8}
    assert eight  # the 8xA100 instance started, once its GPUs were free
    started = min(t for t, _, k in log if k in eight)
    assert 60.0 < started < 120.0
    assert any(t > 120.0 for t, _, k in log if k < 0)  # and it drained at 120 s in turn


def test_eps_at_current_clock_option_changes_routing(small_run):
    cl, wl, tables, cap = small_run
    plans = plan_windows(cl, wl)
    base = simulate(cl, wl, POLICIES["combined"], tables, plans,
                    static_capacity_rps=cap.per_mode_rps)
    live = simulate(cl, wl, POLICIES["combined"], tables, plans,
                    params=EngineParams(eps_at_current_clock=True),
                    static_capacity_rps=cap.per_mode_rps)
    assert not np.array_equal(base.t_done, live.t_done, equal_nan=True)


def test_every_policy_spends_at_least_the_energy_floor(small_run):
    from joulepool.sim.runner import floor_for, window_work_floor

    cl, wl, tables, cap = small_run
    floor = floor_for(cl, wl)
    assert floor.feasible
    plans = plan_windows(cl, wl)
    for name in ("round-robin", "joulesched", "freesh", "combined", "miad-only"):
        r = simulate(cl, wl, POLICIES[name], tables, plans, static_capacity_rps=cap.per_mode_rps)
        assert r.energy_j / r.tokens_in_window >= floor.joules_per_token
        # and its window energy is at least the floor of the work it did in the window
        work = window_work_floor(cl, wl, r)
        assert work.feasible and r.energy_j >= work.energy_j
        assert work.energy_j <= floor.energy_j * (1 + 1e-9)  # less work, no dearer


def test_window_work_floor_counts_only_what_the_run_did_in_the_window(small_run):
    from joulepool.sim.runner import floor_demands

    cl, wl, tables, cap = small_run
    r = simulate(cl, wl, POLICIES["combined"], tables, plan_windows(cl, wl),
                 static_capacity_rps=cap.per_mode_rps)
    prefilled = r.t_first <= r.duration_s
    done = floor_demands(wl, done=(prefilled, r.window_output_tokens))
    assert sum(d.output_tokens for d in done) == pytest.approx(r.tokens_in_window)
    assert sum(d.requests for d in done) == int(prefilled.sum())
    assert sum(d.input_tokens for d in done) == pytest.approx(
        float(wl.input_tokens[prefilled].sum()))
    # a request not yet finished at the window's end counts its tokens so far only
    late = np.isnan(r.t_done) | (r.t_done > r.duration_s)
    assert (r.window_output_tokens[late] < wl.output_tokens[late]).all()
    assert (r.window_output_tokens[~late] == wl.output_tokens[~late]).all()
    assert sum(d.output_tokens for d in floor_demands(wl)) == pytest.approx(
        float(wl.output_tokens.sum()))


def test_a_plan_with_no_instances_drops_requests_without_crashing():
    from joulepool.sim.planning import WindowPlan

    cl = cluster([("n", "H100", 2)])
    wl = workload([0.1, 0.2], [100, 100], [5, 5], duration=1.0)
    empty = WindowPlan(0.0, (), False, "infeasible", 0.0, "J", 0.0, (0.0,) * 4, ("nothing",))
    r = _run(cl, wl, POLICIES["planner-only"], [empty])
    assert np.isnan(r.t_done).all()
    assert any("never served" in n for n in r.notes)
    assert r.energy_j == pytest.approx(2 * 75.0)


def test_an_instance_moved_to_another_class_takes_that_class_b_star():
    """A plan that moves an instance (same node and mode) to another request class
    relabels it; its b*_n must then be the new class's sustainable batch, not the old."""
    from joulepool.sim.engine import Simulator
    from joulepool.sim.planning import PlannedInstances, WindowPlan

    cl = cluster([("n", "H100", 1)])
    tables = model_tables(cl)
    wl = build_workload(load_trace(), 120.0, mode="rate", value=1.0, seed=5)
    mode = next(iter(tables))

    def plan(t, cls):
        return WindowPlan(t, (PlannedInstances("n", mode, cls, 1),), True, "hand", 0.0, "J",
                          0.0, (0.0,) * 4, ())

    sim = Simulator(cl, wl, POLICIES["combined"], tables, [plan(0.0, 0), plan(60.0, 3)])
    before, after = sim._sustainable_batch(mode, 0), sim._sustainable_batch(mode, 3)
    assert before != after  # the classes' requests differ, so do their b*
    sim.run()
    (inst,) = [i for i in sim.instances if i.cls == 3]
    assert inst.opb == after


def test_miad_keeps_tpot_before_any_request_completes():
    """Long responses (80 s) finish long after MIAD starts lowering clocks: MIAD must
    read the steps the batch runs now (as the node agent reads the engine's inter-token
    latency), not wait for completed requests' mean TPOT, or every one of them misses."""
    cl = cluster([("n", "H100", 1)])
    tables = model_tables(cl)
    profile = tables["1xH100"].profile
    n = 40
    wl = workload([0.01 * i for i in range(n)], [100] * n, [8000] * n, duration=60.0)
    tpot = float(profile.itl_s(n, max(tables["1xH100"].clocks))) / 0.85
    assert float(profile.itl_s(n, min(tables["1xH100"].clocks))) > tpot  # lowest clock misses
    wl = wl.__class__(**{**wl.__dict__, "tpot_slo_s": np.full(n, tpot)})
    r = _run(cl, wl, POLICIES["miad-only"])
    got = (r.t_done - r.t_first) / (wl.output_tokens - 1)
    assert np.isfinite(got).all()
    assert (got <= tpot).mean() >= 0.99
    assert r.energy_j < _run(cl, wl, POLICIES["least-loaded"]).energy_j  # still lowers clocks


def test_a_request_no_endpoint_can_serve_is_refused_and_the_run_goes_on():
    """When the routing profile ranks no endpoint of the pool (every cost NaN or
    infinite: here an infinite lambda and deadlines no endpoint meets), the request is
    refused, as the router refuses it (core.router.NoEndpoints): never served, counted
    as missed, named in the notes; the run goes on (it indexed an empty ranking)."""
    import dataclasses

    from joulepool.sim.engine import Simulator

    cl = cluster([("h", "H100", 2)])
    tight = dataclasses.replace(workload([0.1, 0.2, 5.0], [100, 2000, 300], [20, 50, 8], 30.0),
                                ttft_slo_s=np.full(3, 1e-6), tpot_slo_s=np.full(3, 1e-6))
    sim = Simulator(cl, tight, JS, model_tables(cl))
    sim.pi.lam = math.inf  # no PI step moves it: no request completes
    run = sim.run()
    assert np.isnan(run.t_first).all() and np.isnan(run.t_done).all()
    assert (run.instance_product == -1).all()
    assert any(n.startswith("3 requests found no endpoint of their pool") for n in run.notes)
    assert run.gpu_energy_j.sum() > 0.0  # the idle instances drew power all along
    served = Simulator(cl, tight, JS, model_tables(cl)).run()  # a finite lambda: served
    assert not np.isnan(served.t_done).any()


def test_the_routing_guard_sees_a_finished_prefill(monkeypatch):
    """When an instance's prefill ends (its first token) and nothing waits to be admitted,
    its row in the JouleSched candidate index is refreshed: the guard's predicted wait for
    the prefill slot is 0, as the engine's. A row left as of the prefill's start makes the
    guard predict a late first token there and send the request to a truly later
    instance (freesh-3site, decode-heavy, load 0.2: docs/marginal-energy.md)."""
    stale: list[tuple[int, float]] = []
    pick = Simulator._pick_instance

    def checked(self: Simulator, rid: int, t: float) -> Instance | None:
        for pool in self.pools:
            if pool.index is None:
                continue
            for pos, inst in enumerate(pool.members):
                row = pool.index.rows.get(pos)
                if row is not None and inst.prefill_rid < 0 and inst.nwait == 0 and row[7] > 0:
                    stale.append((inst.idx, row[7]))
        return pick(self, rid, t)

    monkeypatch.setattr(Simulator, "_pick_instance", checked)
    two = cluster([("n", "H100", 2)])
    rng = np.random.default_rng(3)
    n = 200  # ~8 req/s, prompts of 200 and 6,000 tokens (long prefills), TTFT 0.5 s
    arrival = np.cumsum(rng.exponential(1 / 8.0, n))
    inp = np.where(rng.random(n) < 0.2, 6000, 200).astype(np.int64)
    out = rng.integers(1, 300, n).astype(np.int64)
    wl = Workload(
        arrival_s=arrival, input_tokens=inp, output_tokens=out, predicted_tokens=out.copy(),
        category=np.zeros(n, dtype=np.int64), bulk=np.zeros(n, dtype=np.bool_),
        cls=np.zeros(n, dtype=np.int64), ttft_slo_s=np.full(n, 0.5),
        tpot_slo_s=np.full(n, 0.05), deadline_s=0.5 + out * 0.5,
        duration_s=float(arrival[-1]), scale=1.0)
    sim = Simulator(two, wl, POLICIES["joulesched"], model_tables(two))
    assert sim.pools[0].index is not None  # the JouleSched rule through the index
    sim.run()
    assert sim.done == n
    assert not stale, stale[:5]


def _sorted_mix_workload(n: int, seed: int) -> Workload:
    """Half long prompts with short responses, half the other way round (~20 req/s)."""
    rng = np.random.default_rng(seed)
    arrival = np.cumsum(rng.exponential(1 / 20.0, n))
    heavy = rng.random(n) < 0.5
    inp = np.where(heavy, 4000, 300).astype(np.int64)
    out = np.where(heavy, 40, 400).astype(np.int64)
    return Workload(
        arrival_s=arrival, input_tokens=inp, output_tokens=out, predicted_tokens=out.copy(),
        category=np.zeros(n, dtype=np.int64), bulk=np.zeros(n, dtype=np.bool_),
        cls=np.zeros(n, dtype=np.int64), ttft_slo_s=np.full(n, 1.0),
        tpot_slo_s=np.full(n, 0.15), deadline_s=1.0 + out * 0.15,
        duration_s=float(arrival[-1]), scale=1.0)


def test_a_members_batch_room_is_sized_at_the_slot_load_it_is_credited_with(monkeypatch):
    """Each JouleSched member's TPOT batch is core.routing.room_at_slot_load at the slot
    load core.routing.SlotLoadMoments.credible gives it (its unfinished requests' mean
    slot load with the Buhlmann-Straub credibility of the pool's members' spread, the
    pool's for the rest), its b*_n within its pool's TTFT bound (core.routing.member_rooms).
    Checked against the sums recomputed from the requests each member holds, whenever a
    member's requests change (its rooms keep the pool's spread as of then until its
    next change)."""
    from joulepool.core.routing import (
        SlotLoadMoments,
        member_rooms,
        room_at_slot_load,
        slot_load,
        slot_load_bin,
        sustainable_batch,
        tpot_gate,
    )

    checked: list[tuple[float, int, int]] = []  # (Z, b*_n, TPOT batch)
    sync = Simulator._sync

    last_n: dict[int, int] = {}

    def check(self: Simulator, inst: Instance, t: float) -> None:
        sync(self, inst, t)
        if inst.pos < 0 or last_n.get(inst.idx) == inst.n_out:
            return  # rooms are read when the member's requests change
        last_n[inst.idx] = inst.n_out
        req = self.req
        done = np.asarray(req.t_done[:self.next_rid], dtype=np.float64)  # routed so far
        where = np.asarray(req.where[:self.next_rid])
        held = np.flatnonzero(np.isnan(done))
        pool = self.pools[0]
        sums = []
        for member in pool.members:
            mine = held[where[held] == member.idx]
            loads = [slot_load(float(req.input[r]), float(req.predicted[r])) for r in mine]
            sums.append((len(loads), math.fsum(loads), math.fsum(x * x for x in loads)))
        moments = SlotLoadMoments.of(sums)
        prior, mean_out = self._pool_mix(0)
        n, total, _ = sums[inst.pos]
        assert inst.n_out == n
        assert inst.sl_sum == pytest.approx(total, rel=1e-9, abs=1e-6)
        if not n:
            return
        load = moments.credible(n, total, prior)
        z = (load - prior) / (total / n - prior) if total / n != prior else 0.0
        k = slot_load_bin(load, prior)
        profile = self.tables[inst.table.mode].profile
        pool_batch = self._sustainable_batch(inst.table.mode, 0)
        # the sums kept as members change round differently: a bin either side
        # (the TPOT batch overflow_rank reads is core.routing.tpot_gate of the mean one)
        pool_tpot = self._sustainable_batch(inst.table.mode, 0, False)

        def gated(rooms: tuple[int, int]) -> tuple[int, int]:
            return rooms[0], tpot_gate(profile, rooms[1], 0.15)

        want = {gated(member_rooms(pool_batch, pool_tpot,
                                   room_at_slot_load(profile, b, prior, mean_out, 0.15))
                      if b else (pool_batch, pool_tpot)) for b in (k - 1, k, k + 1)}
        assert (inst.room, inst.tpot_batch) in want, (n, load, k)
        checked.append((z, inst.room, inst.tpot_batch))

    monkeypatch.setattr(Simulator, "_sync", check)
    two = cluster([("n", "H100", 2)])
    wl = _sorted_mix_workload(300, 5)
    tables = model_tables(two)
    sim = Simulator(two, wl, POLICIES["joulesched"], tables)
    assert sim.pools[0].index is not None
    sim.run()
    assert sim.done == wl.arrival_s.size
    profile = tables[sim.instances[0].table.mode].profile
    pool_tpot = sustainable_batch(profile, float(wl.input_tokens.mean()),
                                  float(wl.output_tokens.mean()), math.inf, 0.15)
    assert checked
    # the router sorted this pool's requests by mix, and the spread showed it: some
    # member was credited with its own load; one holding the long prompts had less room
    # within TPOT than the pool's mean mix gives, one holding the others more; b*_n never
    # above the pool's
    assert max(z for z, _, _ in checked) > 0.5
    pool_gate = tpot_gate(profile, pool_tpot, 0.15)  # overflow_rank's, of the mean one
    assert min(tb for _, _, tb in checked) < pool_gate < max(tb for _, _, tb in checked)
    pool_batch = sim._sustainable_batch(sim.instances[0].table.mode, 0)
    assert all(room <= pool_batch for _, room, _ in checked)
    assert min(room for _, room, _ in checked) < pool_batch


def test_members_of_identical_gpus_serving_one_stream_keep_the_pools_room(monkeypatch):
    """On identical GPUs taking requests of one stream, the members' spread of slot loads
    is mostly sampling: members are credited with little of their own mean and most rows
    carry the pool's rooms, so one long prompt with a short answer does not make a
    member look full (a member's own mean, capped at the pool's room, spread the load
    over idle GPUs: docs/experiments/marginal-energy.md, "Per-member room")."""
    cl = cluster([("h", "H100", 8)])
    wl = build_workload(load_trace(), 120.0, mode="rate", value=40.0, seed=5)
    rows: list[tuple[float, bool]] = []  # (credibility, the pool's rooms)
    rooms = Simulator._member_rooms

    def noted(self: Simulator, inst: Instance, credibility: float) -> tuple[int, int]:
        got = rooms(self, inst, credibility)
        mode = inst.table.mode
        pool_tpot = self._sustainable_batch(mode, inst.cls, False)
        rows.append((credibility, got == (self._sustainable_batch(mode, inst.cls),
                                          self._tpot_gate(mode, inst.cls, pool_tpot))))
        return got

    monkeypatch.setattr(Simulator, "_member_rooms", noted)
    simulate(cl, wl, JS, model_tables(cl))
    assert rows
    zs = np.array([z for z, _ in rows])
    # (measured: mean credibility 0.22, 0 in 40 % of the rows, the pool's rooms in 89 %;
    # a member credited with its own mean throughout: 1.0 and 69 %)
    assert zs.mean() < 0.3
    assert np.mean([same for _, same in rows]) > 0.8
