"""Pool planner (FREESH MILP): plans are valid, optimal, and honest about infeasibility."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from joulepool.core import planner
from joulepool.core.planner import (
    NO_ELIGIBLE_MODE,
    Mode,
    PlanNode,
    PlanProblem,
    PlanResult,
    freesh_published_problem,
    solve,
)

SS_ROW = 0  # FREESH table row of short-prompt / short-response requests
A2, A4, A8 = Mode("2xA100", "A100", 2), Mode("4xA100", "A100", 4), Mode("8xA100", "A100", 8)
H4 = Mode("4xH100", "H100", 4)


# ---------------------------------------------------------------------- helpers


def factor(problem: PlanProblem, site: str) -> float:
    """Objective units per W per step second, computed independently of the planner."""
    steps = problem.forecast_rps.shape[1]
    if problem.objective == "energy":
        return float(steps)
    assert problem.carbon_g_per_kwh is not None
    series = list(problem.carbon_g_per_kwh[site])
    total = series[0] * steps if len(series) == 1 else sum(series)
    return total / 3.6e6


def plan_objective(problem: PlanProblem, plan: list[tuple[str, str, str, int]]) -> float:
    """Objective of a hand-built plan [(node, class, mode, instances)]."""
    nodes = {n.name: n for n in problem.nodes}
    ci = {c: i for i, c in enumerate(problem.classes)}
    mi = {m.name: i for i, m in enumerate(problem.modes)}
    return sum(
        n * problem.power_w[ci[c], mi[m]] * problem.step_s * factor(problem, nodes[node].site)
        for node, c, m, n in plan
    )


def check_plan(problem: PlanProblem, result: PlanResult) -> dict[str, float]:
    """Assert every hard constraint on the result's plan; return served req/s per class."""
    nodes = {n.name: n for n in problem.nodes}
    modes = {m.name: m for m in problem.modes}
    ci = {c: i for i, c in enumerate(problem.classes)}
    mi = {m.name: i for i, m in enumerate(problem.modes)}
    used: Counter[str] = Counter()
    served: dict[str, float] = defaultdict(float)
    objective = 0.0
    if not result.feasible:
        assert result.assignments == ()
    for a in result.plan:
        node, mode = nodes[a.node], modes[a.mode]
        r, m = ci[a.cls], mi[a.mode]
        assert a.instances > 0
        assert mode.product == node.product == a.product, a
        assert a.site == node.site
        assert mode.gpus <= node.gpus, f"{a.mode} does not fit node {a.node}"
        assert a.gpus == a.instances * mode.gpus
        assert problem.capacity_rps[r, m] > 0, f"{a.mode} is not eligible for {a.cls}"
        assert a.power_w == pytest.approx(a.instances * problem.power_w[r, m])
        assert a.served_rps == pytest.approx(a.instances * problem.capacity_rps[r, m])
        used[a.node] += a.gpus
        served[a.cls] += a.instances * problem.capacity_rps[r, m]
        objective += a.instances * problem.power_w[r, m] * problem.step_s * factor(problem, a.site)
    for node in problem.nodes:
        assert used[node.name] <= node.gpus, f"node {node.name} over capacity"
    if result.feasible:
        demand = problem.alpha * problem.forecast_rps
        for r, cls in enumerate(problem.classes):
            for t in range(demand.shape[1]):
                need = demand[r, t]
                assert served[cls] >= need - 1e-6 * max(1.0, need), (cls, t, served[cls], need)
        assert result.shortfalls == ()
    else:
        assert result.shortfalls, "an infeasible result must name the unmet classes"
    assert result.objective == pytest.approx(objective, rel=1e-9, abs=1e-9)
    totals: Counter[tuple[str, str]] = Counter()
    used_by: Counter[tuple[str, str]] = Counter()
    for node in problem.nodes:
        totals[(node.site, node.product)] += node.gpus
        used_by[(node.site, node.product)] += used[node.name]
    assert dict(result.capacity) == {k: (used_by[k], totals[k]) for k in totals}
    return dict(served)


def node_choices(
    problem: PlanProblem, node: PlanNode, opts: list[tuple[int, int]]
) -> list[tuple[list[float], float]]:
    """Every packing of (class, mode) options onto one node: (served req/s, cost)."""
    L, P = problem.capacity_rps, problem.power_w
    site_factor = factor(problem, node.site)
    choices: list[tuple[list[float], float]] = []

    def rec(i: int, free: int, served: list[float], cost: float) -> None:
        if i == len(opts):
            choices.append((served, cost))
            return
        r, m = opts[i]
        g = problem.modes[m].gpus
        for k in range(free // g + 1):
            nxt = list(served)
            nxt[r] += k * L[r, m]
            rec(i + 1, free - k * g, nxt, cost + k * P[r, m] * problem.step_s * site_factor)

    rec(0, node.gpus, [0.0] * len(problem.classes), 0.0)
    return choices


def brute_force(problem: PlanProblem) -> float | None:
    """Exact optimum of a tiny problem by enumerating every per-node packing."""
    R = len(problem.classes)
    L = problem.capacity_rps
    demand = problem.alpha * problem.forecast_rps.max(axis=1) if R else np.zeros(0)
    tol = 1e-6 * np.maximum(1.0, demand)
    states: dict[tuple[float, ...], float] = {(0.0,) * R: 0.0}
    for node in problem.nodes:
        opts = [
            (r, m)
            for r in range(R)
            for m, mode in enumerate(problem.modes)
            if L[r, m] > 0
            and demand[r] > 0
            and mode.product == node.product
            and mode.gpus <= node.gpus
        ]
        choices = node_choices(problem, node, opts)
        new: dict[tuple[float, ...], float] = {}
        for state, c0 in states.items():
            for served, c1 in choices:
                key = tuple(round(min(demand[r], state[r] + served[r]), 9) for r in range(R))
                if c0 + c1 < new.get(key, math.inf):
                    new[key] = c0 + c1
        states = new
    feasible = [c for s, c in states.items() if all(s[r] >= demand[r] - tol[r] for r in range(R))]
    return min(feasible) if feasible else None


def make(
    classes: tuple[str, ...],
    modes: tuple[Mode, ...],
    nodes: tuple[PlanNode, ...],
    power: Any,
    rps: Any,
    forecast: Any,
    **kw: Any,
) -> PlanProblem:
    return PlanProblem(
        classes=classes,
        modes=modes,
        nodes=nodes,
        power_w=np.asarray(power, dtype=float),
        capacity_rps=np.asarray(rps, dtype=float),
        forecast_rps=np.asarray(forecast, dtype=float),
        **kw,
    )


def freesh_rows(*rows: int) -> tuple[np.ndarray, np.ndarray]:
    return planner.FREESH_POWER_W[list(rows)], planner.FREESH_CAPACITY_RPS[list(rows)]


# ----------------------------------------------------------- random small problems


@st.composite
def tiny_problems(draw: st.DrawFn) -> PlanProblem:
    n_cls = draw(st.integers(1, 2))
    n_modes = draw(st.integers(1, 3))
    n_nodes = draw(st.integers(1, 4))
    steps = draw(st.integers(1, 3))
    products = st.sampled_from(["A100", "H100"])
    modes = tuple(
        Mode(f"m{i}", draw(products), draw(st.sampled_from([2, 3, 4, 8]))) for i in range(n_modes)
    )
    nodes = tuple(
        PlanNode(
            f"n{i}",
            draw(st.sampled_from(["s0", "s1"])),
            draw(products),
            draw(st.sampled_from([0, 4, 6, 8])),
        )
        for i in range(n_nodes)
    )
    rps = [
        [draw(st.sampled_from([0.0, 0.5, 1.0, 2.5, 4.0, 7.0])) for _ in modes] for _ in range(n_cls)
    ]
    power = [[draw(st.integers(10, 1000)) for _ in modes] for _ in range(n_cls)]
    forecast = [
        [draw(st.sampled_from([0.0, 0.3, 1.0, 2.0, 3.7, 6.0, 11.0])) for _ in range(steps)]
        for _ in range(n_cls)
    ]
    objective = draw(st.sampled_from(["energy", "carbon"]))
    carbon = {
        s: [draw(st.integers(10, 600)) for _ in range(draw(st.sampled_from([1, steps])))]
        for s in ("s0", "s1")
    }
    return make(
        tuple(f"c{i}" for i in range(n_cls)),
        modes,
        nodes,
        power,
        rps,
        forecast,
        objective=objective,
        carbon_g_per_kwh=carbon,
        mip_rel_gap=0.0,
    )


def assert_matches_brute_force(problem: PlanProblem) -> None:
    result = solve(problem)
    best = brute_force(problem)
    check_plan(problem, result)
    assert result.feasible == (best is not None), (result, best)
    if best is not None:
        assert result.status == "optimal"
        assert result.objective == pytest.approx(best, rel=1e-6, abs=1e-9)
    else:
        assert result.status == "infeasible"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tiny_problems())
def test_random_plans_are_valid_and_optimal(problem: PlanProblem) -> None:
    """Demand, node capacity, products and eligibility hold; cost equals brute force."""
    assert_matches_brute_force(problem)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tiny_problems())
def test_default_gap_stays_within_one_percent(problem: PlanProblem) -> None:
    problem = make(
        problem.classes,
        problem.modes,
        problem.nodes,
        problem.power_w,
        problem.capacity_rps,
        problem.forecast_rps,
        objective=problem.objective,
        carbon_g_per_kwh=problem.carbon_g_per_kwh,
    )
    assert problem.mip_rel_gap == planner.DEFAULT_MIP_REL_GAP
    result = solve(problem)
    check_plan(problem, result)
    best = brute_force(problem)
    assert result.feasible == (best is not None)
    if best is not None:
        assert best - 1e-9 <= result.objective <= best * (1 + planner.DEFAULT_MIP_REL_GAP) + 1e-9


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tiny_problems())
def test_volume_only_aggregation_falls_back_to_per_node(problem: PlanProblem) -> None:
    """Force the volume row even for sizes that do not divide: the node-level re-plan fixes it."""
    with mock.patch.object(planner, "_volume_exact", lambda *args: True):
        assert_matches_brute_force(problem)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tiny_problems())
def test_pattern_explosion_splits_groups_into_nodes(problem: PlanProblem) -> None:
    with mock.patch.object(planner, "MAX_PATTERNS", 0):
        assert_matches_brute_force(problem)


# ------------------------------------------------------------------ exactness


def three_gpu_problem(b_forecast: float) -> PlanProblem:
    """Two 4-GPU nodes: class a needs two 3-GPU instances, class b one 2-GPU one."""
    modes = (Mode("3x", "A100", 3), Mode("2x", "A100", 2))
    nodes = (PlanNode("n0", "s", "A100", 4), PlanNode("n1", "s", "A100", 4))
    return make(
        ("a", "b"),
        modes,
        nodes,
        [[300, 200], [300, 200]],
        [[1.0, 0.0], [0.0, 1.0]],
        [[2.0 / 1.1], [b_forecast]],
        mip_rel_gap=0.0,
    )


def test_non_divisible_sizes_are_not_packed_by_volume_alone() -> None:
    """3 + 3 + 2 GPUs fit 8 GPUs by volume but not two 4-GPU nodes."""
    result = solve(three_gpu_problem(b_forecast=0.5))
    assert not result.feasible
    check_plan(three_gpu_problem(0.5), result)
    ok = three_gpu_problem(b_forecast=0.0)
    result = solve(ok)
    assert result.feasible
    check_plan(ok, result)
    assert sorted((a.node, a.instances) for a in result.assignments) == [("n0", 1), ("n1", 1)]


def six_gpu_problem() -> PlanProblem:
    """Three 6-GPU nodes: by volume 3x4 + 2x3 GPUs fit (18), on the nodes they do not."""
    modes = (Mode("4x", "A100", 4), Mode("3x", "A100", 3), Mode("2x", "A100", 2))
    nodes = tuple(PlanNode(f"n{i}", "s", "A100", 6) for i in range(3))
    power = [[100.0, 0.0, 0.0], [0.0, 100.0, 500.0]]
    rps = [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
    return make(("a", "b"), modes, nodes, power, rps, [[3.0], [2.0]], alpha=1.0, mip_rel_gap=0.0)


SIX_GPU_OPTIMUM = (3 * 100.0 + 2 * 500.0) * 300.0  # the 3-GPU mode never fits beside a 4x


def count_models() -> Any:
    return mock.patch.object(planner, "_Model", wraps=planner._Model)


def test_patterns_make_non_divisible_groups_exact_in_one_solve() -> None:
    problem = six_gpu_problem()
    with count_models() as model:
        result = solve(problem)
    assert model.call_count == 1
    check_plan(problem, result)
    assert result.objective == pytest.approx(SIX_GPU_OPTIMUM)


def test_volume_aggregation_that_does_not_pack_is_re_planned_per_node() -> None:
    """The brief's volume-only aggregation, forced: decomposition fails, the re-plan fixes it."""
    problem = six_gpu_problem()
    with mock.patch.object(planner, "_volume_exact", lambda *args: True), count_models() as model:
        result = solve(problem)
    assert model.call_count == 2
    assert result.feasible
    check_plan(problem, result)
    assert result.objective == pytest.approx(SIX_GPU_OPTIMUM)
    assert result.objective == pytest.approx(brute_force(problem))
    tight = three_gpu_problem(b_forecast=0.5)  # volume says 3 + 3 + 2 <= 8: it is not
    with mock.patch.object(planner, "_volume_exact", lambda *args: True):
        result = solve(tight)
    assert not result.feasible and result.status == "infeasible"
    check_plan(tight, result)


@pytest.mark.parametrize(
    ("gpus", "count", "sizes", "exact"),
    [
        (8, 3, (8, 4, 2), True),
        (8, 3, (4, 2, 1), True),
        (6, 2, (4, 2), False),  # 4 does not divide 6
        (12, 2, (6, 4), False),  # 4 does not divide 6
        (6, 1, (4, 2), True),  # one node: volume is exact
        (6, 4, (3, 2), False),
    ],
)
def test_volume_exactness_rule(gpus: int, count: int, sizes: tuple[int, ...], exact: bool) -> None:
    assert planner._volume_exact(gpus, count, sizes) is exact


def test_many_identical_nodes_decompose_onto_real_nodes() -> None:
    """Aggregated groups (incl. 6-GPU nodes that need patterns) come back as valid nodes."""
    rng = np.random.default_rng(7)
    nodes = tuple(
        PlanNode(f"n{i}", f"s{i % 3}", "A100" if i % 2 else "H100", int(rng.choice([2, 4, 6, 8])))
        for i in range(300)
    )
    modes = (A2, A4, A8, H4, Mode("8xH100", "H100", 8))
    power = rng.uniform(500, 3000, size=(6, 5))
    rps = rng.uniform(1, 12, size=(6, 5))
    forecast = rng.uniform(20, 60, size=(6, 4))
    carbon = {f"s{i}": [100.0 * (i + 1)] for i in range(3)}
    problem = make(
        tuple(f"c{i}" for i in range(6)),
        modes,
        nodes,
        power,
        rps,
        forecast,
        objective="carbon",
        carbon_g_per_kwh=carbon,
    )
    result = solve(problem)
    assert result.feasible
    check_plan(problem, result)
    assert len({a.node for a in result.assignments}) > 20


# ------------------------------------------------------------------- objectives


def test_energy_objective_picks_lowest_joules_per_request_mode() -> None:
    power, rps = freesh_rows(SS_ROW)  # SS J/request: 4xH100 79, 4xA100 130, 2xA100 136
    modes = (A2, A4, A8, H4)
    nodes = tuple(PlanNode(f"h{i}", "s", "H100", 4) for i in range(4)) + tuple(
        PlanNode(f"a{i}", "s", "A100", 8) for i in range(4)
    )
    problem = make(("SS",), modes, nodes, power, rps, [[3 * 16.38 / 1.1]])
    result = solve(problem)
    check_plan(problem, result)
    assert {a.mode for a in result.assignments} == {"4xH100"}
    assert result.instances("SS") == 3
    no_h100 = make(("SS",), modes, nodes[4:], power, rps, [[4 * 11.25 / 1.1]])
    result = solve(no_h100)
    check_plan(no_h100, result)
    assert {a.mode for a in result.assignments} == {"4xA100"}


def test_carbon_objective_moves_load_to_low_carbon_site() -> None:
    power, rps = freesh_rows(SS_ROW)
    nodes = (
        PlanNode("dirty-0", "dirty", "H100", 4),
        PlanNode("dirty-1", "dirty", "H100", 4),
        PlanNode("clean-0", "clean", "H100", 4),
        PlanNode("clean-1", "clean", "H100", 4),
    )
    carbon = {"dirty": [500.0, 520.0], "clean": [50.0, 40.0]}
    kw: dict[str, Any] = {"objective": "carbon", "carbon_g_per_kwh": carbon}
    fits = make(("SS",), (H4,), nodes, power[:, 3:], rps[:, 3:], [[10.0, 25.0]], **kw)
    result = solve(fits)
    check_plan(fits, result)
    assert result.instances("SS") == 2
    assert {a.site for a in result.assignments} == {"clean"}
    assert result.unit == "gCO2"
    spill = make(("SS",), (H4,), nodes, power[:, 3:], rps[:, 3:], [[10.0, 40.0]], **kw)
    result = solve(spill)
    check_plan(spill, result)
    assert result.capacity[("clean", "H100")] == (8, 8)
    assert result.capacity[("dirty", "H100")] == (4, 8)  # only the remainder is dirty


def test_carbon_and_energy_units() -> None:
    nodes = (PlanNode("n", "s", "H100", 4),)
    kw: dict[str, Any] = {"step_s": 3600.0, "alpha": 1.0}
    energy = make(("c",), (H4,), nodes, [[1000.0]], [[1.0]], [[1.0]], **kw)
    assert solve(energy).objective == pytest.approx(3.6e6)  # 1 kW for 1 h, in J
    carbon = make(
        ("c",), (H4,), nodes, [[1000.0]], [[1.0]], [[1.0, 1.0]],
        objective="carbon", carbon_g_per_kwh={"s": [100.0, 300.0]}, **kw,
    )  # fmt: skip
    result = solve(carbon)
    assert result.objective == pytest.approx(400.0)  # 1 kWh at 100 g + 1 kWh at 300 g
    assert result.power_w() == pytest.approx(1000.0)
    assert result.served_rps("c") == pytest.approx(1.0)


def test_hand_built_freesh_plan_is_no_better() -> None:
    problem = freesh_published_problem()
    result = solve(problem)
    hand = [
        ("site-1-h100-0", "SS", "4xH100", 1),
        ("site-3-a100-0", "LS", "8xA100", 1),
        ("site-2-a100-0", "SL", "4xA100", 2),
        ("site-2-a100-1", "LL", "4xA100", 1),
        ("site-1-a100-0", "LL", "4xA100", 1),
    ]
    assert result.objective <= plan_objective(problem, hand)
    hand_2 = [  # only short-prompt work on H100, everything else on 8-GPU nodes
        ("site-1-h100-0", "SS", "4xH100", 1),
        ("site-2-a100-0", "SL", "8xA100", 1),
        ("site-3-a100-0", "LL", "8xA100", 1),
        ("site-2-a100-1", "LS", "2xA100", 2),
    ]
    assert result.objective <= plan_objective(problem, hand_2)


# --------------------------------------------------------------- infeasibility


def test_demand_beyond_capacity_reports_shortfall_without_raising() -> None:
    power, rps = freesh_rows(SS_ROW)
    nodes = (PlanNode("h0", "eu-west", "H100", 4),)
    problem = make(("SS",), (H4,), nodes, power[:, 3:], rps[:, 3:], [[10.0, 30.0, 20.0]])
    result = solve(problem)
    check_plan(problem, result)
    assert not result.feasible and result.status == "infeasible"
    assert result.assignments == ()
    (short,) = result.shortfalls
    assert short.cls == "SS"
    assert short.step == 1
    assert short.demand_rps == pytest.approx(33.0)
    assert short.servable_rps == pytest.approx(16.38)
    assert short.shortfall_rps == pytest.approx(33.0 - 16.38)
    assert "site eu-west H100: 4/4 GPUs used" in short.reason
    assert short.sites == ("eu-west",)
    assert result.max_alpha == pytest.approx(16.38 / 30.0)  # one instance, peak forecast 30
    assert result.binding == (
        "site eu-west H100: 4/4 GPUs used",
        "the forecast itself does not fit (largest alpha that fits: 0.546 < 1), "
        "whatever the headroom alpha 1.1",
    )
    assert [(a.node, a.instances) for a in result.partial_assignments] == [("h0", 1)]
    assert result.instances("SS") == 1  # describes the partial plan


def test_partial_plan_keeps_a_class_that_fits_alone_beside_an_oversized_one() -> None:
    """The slack model weighs relative shortfall: a 100x larger class cannot starve a small one.

    Minimising total unmet req/s gave every GPU to the big class (each instance
    cuts the same req/s whichever class it serves); the small class fits alone.
    """
    power, rps = freesh_rows(SS_ROW, SS_ROW)
    nodes = (PlanNode("h0", "s", "H100", 8),)
    problem = make(("small", "huge"), (H4,), nodes, power[:, 3:], rps[:, 3:], [[10.0], [1000.0]])
    result = solve(problem)
    check_plan(problem, result)
    assert not result.feasible
    assert [s.cls for s in result.shortfalls] == ["huge"]
    assert result.served_rps("small") >= 11.0  # alpha * 10, met in full
    assert result.instances("huge") == 1  # the rest still serves the oversized class


def test_class_without_eligible_mode_is_named() -> None:
    power, rps = freesh_rows(0, 3)  # SS and LL; LL cannot run on 4xH100
    problem = make(
        ("SS", "LL"), (H4,), (PlanNode("h0", "s", "H100", 8),),
        power[:, 3:], rps[:, 3:], [[5.0], [1.0]],
    )  # fmt: skip
    result = solve(problem)
    check_plan(problem, result)
    assert not result.feasible
    (short,) = result.shortfalls
    assert (short.cls, short.reason, short.servable_rps) == ("LL", NO_ELIGIBLE_MODE, 0.0)
    assert short.shortfall_rps == pytest.approx(1.1)
    assert result.served_rps("SS") >= 5.5  # the servable class is still planned


def test_without_partial_an_infeasible_window_has_no_partial_plan() -> None:
    """core.sizing's probes only ask whether a window fits: no second (slack) solve."""
    power, rps = freesh_rows(SS_ROW)
    nodes = (PlanNode("h0", "eu-west", "H100", 4),)
    problem = make(("SS",), (H4,), nodes, power[:, 3:], rps[:, 3:], [[10.0, 30.0, 20.0]])
    result = solve(problem, partial=False)
    assert not result.feasible and result.status == "infeasible"
    assert result.partial_assignments == () and result.assignments == ()
    assert result.shortfalls[0].shortfall_rps == pytest.approx(33.0)  # nothing placed
    fits = make(("SS",), (H4,), nodes, power[:, 3:], rps[:, 3:], [[10.0]])
    assert solve(fits, partial=False).feasible  # a window that fits is planned as usual
    power2, rps2 = freesh_rows(0, 3)  # LL cannot run on 4xH100: trivially infeasible
    trivial = make(("SS", "LL"), (H4,), (PlanNode("h0", "s", "H100", 8),),
                   power2[:, 3:], rps2[:, 3:], [[5.0], [1.0]])
    result = solve(trivial, partial=False)
    assert not result.feasible and result.partial_assignments == ()
    assert {s.cls for s in result.shortfalls} == {"SS", "LL"}


def test_eight_gpu_mode_stays_off_four_gpu_nodes() -> None:
    power, rps = planner.FREESH_POWER_W[[3]], planner.FREESH_CAPACITY_RPS[[3]]  # LL
    rps = rps * np.array([[0, 0, 1, 0]])  # only 8xA100 eligible
    nodes = (
        PlanNode("clean-0", "clean", "A100", 4),
        PlanNode("clean-1", "clean", "A100", 4),
        PlanNode("dirty-0", "dirty", "A100", 8),
    )
    kw: dict[str, Any] = {
        "objective": "carbon",
        "carbon_g_per_kwh": {"clean": [10.0], "dirty": [800.0]},
    }
    problem = make(("LL",), (A2, A4, A8, H4), nodes, power, rps, [[3.0]], **kw)
    result = solve(problem)
    check_plan(problem, result)
    assert [(a.node, a.mode) for a in result.assignments] == [("dirty-0", "8xA100")]
    only_small = make(("LL",), (A2, A4, A8, H4), nodes[:2], power, rps, [[3.0]], **kw)
    result = solve(only_small)
    assert not result.feasible
    (short,) = result.shortfalls
    assert short.reason.startswith("no node can host an eligible mode")
    assert "8xA100 needs 8 A100 GPUs on one node" in short.reason


def test_fragmented_capacity_is_reported_as_binding() -> None:
    """12 free GPUs in 6-GPU nodes cannot host two more 4-GPU instances."""
    nodes = (PlanNode("a", "s", "A100", 6), PlanNode("b", "s", "A100", 6))
    problem = make(("c",), (A4,), nodes, [[1000.0]], [[1.0]], [[3.0 / 1.1]])
    result = solve(problem)
    check_plan(problem, result)
    assert not result.feasible
    assert result.binding[0] == (
        "site s A100: 8/12 GPUs used, no node has 4 free GPUs for another instance"
    )
    assert result.max_alpha == pytest.approx(2.0 / (3.0 / 1.1))  # two instances fit


# ------------------------------------------------------------------- edge cases


def test_empty_classes_give_an_empty_feasible_plan() -> None:
    problem = make((), (H4,), (PlanNode("h", "s", "H100", 4),), np.zeros((0, 1)),
                   np.zeros((0, 1)), np.zeros((0, 6)))  # fmt: skip
    result = solve(problem)
    assert result.feasible and result.status == "optimal"
    assert result.assignments == () and result.objective == 0.0
    assert result.capacity == {("s", "H100"): (0, 4)}


def test_zero_forecast_plans_no_instances() -> None:
    power, rps = freesh_rows(0, 1)
    problem = make(("SS", "SL"), (H4,), (PlanNode("h", "s", "H100", 4),),
                   power[:, 3:], rps[:, 3:], np.zeros((2, 6)))  # fmt: skip
    result = solve(problem)
    assert result.feasible and result.assignments == ()
    assert result.instances("SS") == 0 and result.power_w() == 0.0


def test_no_nodes_at_all_is_infeasible_not_an_error() -> None:
    power, rps = freesh_rows(SS_ROW)
    result = solve(make(("SS",), (H4,), (), power[:, 3:], rps[:, 3:], [[1.0]]))
    assert not result.feasible
    assert result.shortfalls[0].reason.startswith("no node can host")


@contextmanager
def fake_time_limit(drop_hard_incumbent: bool) -> Iterator[list[dict[str, Any]]]:
    """Run the real HiGHS but report HiGHS's time-limit status (1) for the hard model."""
    real = planner.milp
    seen: list[dict[str, Any]] = []

    def fake(c: Any, **kw: Any) -> Any:
        seen.append(kw["options"])
        res = real(c, **kw)
        if len(seen) == 1:
            res.status, res.mip_gap = 1, 0.0375
            if drop_hard_incumbent:
                res.x = None
        return res

    with mock.patch.object(planner, "milp", fake):
        yield seen


def test_time_limit_with_incumbent_returns_feasible_plan() -> None:
    problem = freesh_published_problem()
    problem = make(problem.classes, problem.modes, problem.nodes, problem.power_w,
                   problem.capacity_rps, problem.forecast_rps, time_limit_s=7.5)  # fmt: skip
    with fake_time_limit(drop_hard_incumbent=False) as seen:
        result = solve(problem)
    assert 0 < seen[0]["time_limit"] <= 7.5
    assert result.feasible and result.status == "time_limit"
    assert result.mip_gap == pytest.approx(0.0375)
    check_plan(problem, result)


def test_time_limit_without_incumbent_falls_back_to_slack_model() -> None:
    problem = freesh_published_problem()
    with fake_time_limit(drop_hard_incumbent=True) as seen:
        result = solve(problem)
    # the hard model, 3 bisection probes over the 4 class demands, the water level,
    # the partial plan (which found slack 0: a proven optimum) and the largest alpha
    assert len(seen) == 7
    assert result.feasible and result.status == "optimal"
    check_plan(problem, result)


def test_freesh_published_problem_solves_feasibly() -> None:
    problem = freesh_published_problem()
    assert problem.classes == ("SS", "SL", "LS", "LL")
    assert sum(n.gpus for n in problem.nodes if n.product == "A100") == 24
    assert sum(n.gpus for n in problem.nodes if n.product == "H100") == 6
    assert problem.forecast_rps.shape == (4, 6) and problem.step_s == 300.0
    assert max(n.gpus for n in problem.nodes) <= 8
    for objective in ("energy", "carbon"):
        p = freesh_published_problem(objective=objective)
        result = solve(p)
        assert result.feasible and result.status == "optimal", result
        check_plan(p, result)
        assert result.solve_time_s < 5.0
        assert result.objective == pytest.approx(brute_force(p), rel=1e-6)


def test_freesh_table_is_the_published_one() -> None:
    assert planner.FREESH_POWER_W[0].tolist() == [746, 1466, 2423, 1295]
    assert planner.FREESH_CAPACITY_RPS[3].tolist() == [0.0, 1.44, 5.04, 0.0]
    assert planner.FREESH_CAPACITY_RPS[1, 0] == 0.0  # SL cannot run on 2xA100
    with pytest.raises(ValueError):
        planner.FREESH_POWER_W[0, 0] = 1.0


# -------------------------------------------------------------------- validation


def _base(**over: Any) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "classes": ("a", "b"),
        "modes": (H4,),
        "nodes": (PlanNode("h", "s", "H100", 4),),
        "power_w": [[100.0], [200.0]],
        "capacity_rps": [[1.0], [2.0]],
        "forecast_rps": [[1.0, 2.0], [3.0, 4.0]],
    }
    kw.update(over)
    return kw


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"forecast_rps": [[1.0, 2.0], [3.0]]}, "class 'b' has 1 entries but class 'a' has 2"),
        ({"forecast_rps": [[1.0, 2.0]]}, "forecast_rps must have shape"),
        ({"forecast_rps": [[1.0, -2.0], [3.0, 4.0]]}, r"forecast_rps\['a', 1\]"),
        ({"forecast_rps": [[1.0, float("nan")], [3.0, 4.0]]}, "finite"),
        ({"forecast_rps": [[], []]}, "at least one step"),
        ({"power_w": [[100.0, 1.0], [200.0, 1.0]]}, r"power_w must have shape \(2, 1\)"),
        ({"capacity_rps": [[1.0], [-2.0]]}, "capacity_rps"),
        ({"classes": ("a", "a")}, "duplicate"),
        ({"nodes": (PlanNode("h", "s", "H100", 4),) * 2}, "duplicate"),
        ({"objective": "carbon"}, "needs carbon_g_per_kwh"),
        ({"objective": "carbon", "carbon_g_per_kwh": {"x": [1.0]}}, "no series for site"),
        ({"objective": "carbon", "carbon_g_per_kwh": {"s": [1.0, 2.0, 3.0]}}, "need 1 or 2"),
        ({"carbon_g_per_kwh": {"s": [float("nan")]}}, "must be finite"),
        ({"objective": "joules"}, "objective must be"),
        ({"step_s": 0.0}, "step_s"),
        ({"alpha": -1.0}, "alpha"),
        ({"time_limit_s": float("inf")}, "time_limit_s"),
        ({"mip_rel_gap": 1.0}, "mip_rel_gap"),
    ],
)
def test_malformed_input_raises_value_error(over: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PlanProblem(**_base(**over))


def test_bad_modes_and_nodes_raise() -> None:
    with pytest.raises(ValueError, match="gpus"):
        Mode("0x", "H100", 0)
    with pytest.raises(ValueError, match="gpus"):
        PlanNode("n", "s", "H100", -1)
    with pytest.raises(ValueError, match="steps"):
        freesh_published_problem(steps=0)


def test_problem_arrays_are_frozen_copies() -> None:
    forecast = np.array([[1.0, 2.0], [3.0, 4.0]])
    problem = PlanProblem(**_base(forecast_rps=forecast))
    forecast[0, 0] = 99.0
    assert problem.forecast_rps[0, 0] == 1.0
    with pytest.raises(ValueError):
        problem.forecast_rps[0, 0] = 5.0


# ------------------------------------------- fairness, SLO mask, gaps, negative carbon


def test_partial_plan_gives_the_only_slot_to_the_large_class_not_the_tiny_one() -> None:
    """One instance fits; a class with 0.2 % of the demand must not take it from one with 62 %.

    Weighting shortfall relative to demand (the previous model) gave the slot to
    the tiny class: it covers 100 % of that class's demand. Neither class can be
    served while the other is, so max-min share is 0 either way and the fewest
    unmet req/s decides.
    """
    nodes = (PlanNode("h0", "s", "H100", 4),)
    problem = make(("tiny", "big"), (H4,), nodes, [[900.0], [900.0]], [[2.0], [2.0]],
                   [[0.005], [1.55]])  # fmt: skip
    result = solve(problem)
    check_plan(problem, result)
    assert not result.feasible
    assert result.instances("big") == 1 and result.instances("tiny") == 0
    assert result.max_alpha == 0.0  # no alpha > 0 serves both classes at once


def test_partial_plan_serves_the_max_min_fair_floor_first() -> None:
    """Three slots, a 20x larger class: fewest unmet req/s alone gives it all three.

    The max-min fair floor serves the small class in full (its 1.1 req/s is
    below the water level) and the big one at the level, 2 slots = 4 req/s.
    """
    nodes = (PlanNode("h0", "s", "H100", 4), PlanNode("h1", "s", "H100", 8))
    problem = make(("small", "big"), (H4,), nodes, [[900.0], [900.0]], [[2.0], [2.0]],
                   [[1.0], [20.0]])  # fmt: skip
    result = solve(problem)
    check_plan(problem, result)
    assert not result.feasible
    assert (result.instances("small"), result.instances("big")) == (1, 2)
    assert [s.cls for s in result.shortfalls] == ["big"]
    assert result.shortfalls[0].sites == ("s",)


def test_infeasible_window_says_when_the_headroom_is_the_cause() -> None:
    """The forecast fits, alpha = 1.1 times it does not: max_alpha says how much does."""
    power, rps = freesh_rows(SS_ROW)
    nodes = (PlanNode("h0", "eu", "H100", 4),)
    problem = make(("SS",), (H4,), nodes, power[:, 3:], rps[:, 3:], [[15.0, 15.6]])
    result = solve(problem)
    assert not result.feasible
    (short,) = result.shortfalls
    assert (short.cls, short.step, short.sites) == ("SS", 1, ("eu",))
    assert result.max_alpha == pytest.approx(16.38 / 15.6)
    assert result.binding[-1] == ("the headroom is the cause: alpha 1.1 does not fit, "
                                  "alpha 1.05 is the largest that does")
    smaller = make(("SS",), (H4,), nodes, power[:, 3:], rps[:, 3:], [[15.0, 15.6]],
                   alpha=result.max_alpha)  # fmt: skip
    assert solve(smaller).feasible


def test_slo_mask_makes_a_mode_ineligible_whatever_its_rate() -> None:
    modes = (A4, H4)
    nodes = (PlanNode("a", "s", "A100", 4), PlanNode("h", "s", "H100", 4))
    power = [[500.0, 900.0], [500.0, 900.0]]
    rps = [[10.0, 10.0], [10.0, 10.0]]
    # class "fast" needs TTFT 0.1 s: only the H100 mode meets it; "slow" meets both
    mask = planner.slo_mask([[0.2, 0.05], [0.2, 0.05]], [[0.03, 0.02], [0.03, 0.02]],
                            [0.1, 0.5], [0.05, 0.05])
    assert mask.tolist() == [[False, True], [True, True]]
    problem = make(("fast", "slow"), modes, nodes, power, rps, [[1.0], [1.0]], eligible=mask)
    result = solve(problem)
    check_plan(problem, result)
    assert result.feasible
    assert {(a.cls, a.mode) for a in result.plan} == {("fast", "4xH100"), ("slow", "4xA100")}
    unmasked = solve(make(("fast", "slow"), modes, nodes, power, rps, [[1.0], [1.0]]))
    assert {(a.cls, a.mode) for a in unmasked.plan} != {(a.cls, a.mode) for a in result.plan}
    none = np.zeros((2, 2), dtype=bool)
    blocked = solve(make(("fast", "slow"), modes, nodes, power, rps, [[1.0], [1.0]],
                         eligible=none))  # fmt: skip
    assert {s.reason for s in blocked.shortfalls} == {NO_ELIGIBLE_MODE}
    with pytest.raises(ValueError, match="eligible must be a boolean array"):
        make(("fast", "slow"), modes, nodes, power, rps, [[1.0], [1.0]], eligible=[[True]])


def test_plan_stopped_at_a_positive_gap_is_not_called_optimal() -> None:
    real = planner.milp

    def at_gap(c: Any, **kw: Any) -> Any:
        res = real(c, **kw)
        res.mip_gap = 0.004
        return res

    with mock.patch.object(planner, "milp", at_gap):
        result = solve(freesh_published_problem())
    assert result.feasible and result.status == "within_gap"
    assert result.mip_gap == pytest.approx(0.004)
    exact = solve(freesh_published_problem())
    assert exact.status == "optimal" and exact.mip_gap <= planner.OPTIMAL_GAP


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tiny_problems(), st.lists(st.integers(-600, 600), min_size=3, max_size=3))
def test_negative_carbon_plans_are_valid_and_optimal(
    problem: PlanProblem, series: list[int]
) -> None:
    """Negative marginal intensities (per step or over the window) keep the model bounded."""
    carbon = {"s0": series[: problem.steps], "s1": [-abs(v) for v in series[: problem.steps]]}
    problem = make(problem.classes, problem.modes, problem.nodes, problem.power_w,
                   problem.capacity_rps, problem.forecast_rps, objective="carbon",
                   carbon_g_per_kwh=carbon, mip_rel_gap=0.0)  # fmt: skip
    assert_matches_brute_force(problem)


def test_partial_plan_falls_back_to_the_fair_floor_plan_when_its_solve_finds_none() -> None:
    """The fewest-unmet solve ran out of time with no plan: the floor's own plan serves."""
    nodes = (PlanNode("h0", "s", "H100", 4), PlanNode("h1", "s", "H100", 8))
    problem = make(("small", "big"), (H4,), nodes, [[900.0], [900.0]], [[2.0], [2.0]],
                   [[1.0], [20.0]])  # fmt: skip
    real = planner.milp

    def no_partial_plan(c: Any, **kw: Any) -> Any:
        res = real(c, **kw)
        if int((kw["integrality"] == 0).sum()) == 2:  # the slack model: one s per class
            res.x, res.status = None, 1
        return res

    with mock.patch.object(planner, "milp", no_partial_plan):
        result = solve(problem)
    check_plan(problem, result)
    assert not result.feasible and result.partial_assignments
    assert result.served_rps("small") >= 1.1  # the floor: small in full, big at the level
    assert result.served_rps("big") >= 1.1
