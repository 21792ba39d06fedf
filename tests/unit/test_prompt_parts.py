"""Prompt-length parts with per-part TTFT miss levels (core.problem's ``split_prompts``,
the planner's alternative flows and miss-group rows; docs/planner.md, "Prompt parts")."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from joulepool.core import planner
from joulepool.core.classes import PromptLengths
from joulepool.core.planner import Mode, PlanNode, PlanProblem, solve
from joulepool.core.problem import (
    ALT_MISS_LEVELS,
    ServiceClass,
    build_problem,
    prompt_parts,
    prompt_prefill_s,
    prompt_tail_miss,
)
from joulepool.core.profiles import DEFAULT_HEADROOM, find_profile

H100, A100 = Mode("1xH100", "H100", 1), Mode("1xA100", "A100", 1)
NODES = [PlanNode("h", "s", "H100", 2), PlanNode("a", "s", "A100", 4)]
#: half the prompts 100 tokens, half 3,000, TTFT 0.35 s: a 1xA100 prefills the short half
#: in time and not the long half; a 1xH100 prefills both
BIMODAL = PromptLengths((100.0,) * 500 + (3000.0,) * 500)
TAIL = ServiceClass("tail", 1550.0, 200.0, 0.35, 0.1, (0.5, 0.8), BIMODAL, share_key="m")
#: prompts every mode prefills in time
SHORT = ServiceClass("short", 300.0, 200.0, 1.0, 0.1, (1.0, 1.2),
                     PromptLengths(tuple(np.linspace(100.0, 500.0, 1000))), share_key="m")


def _profile(r: int, mode: Mode):  # type: ignore[no-untyped-def]
    return find_profile(mode.product, "llama-3.1-8b", mode.gpus)


def _build(classes: list[ServiceClass], split: bool):  # type: ignore[no-untyped-def]
    return build_problem(classes, [H100, A100], NODES, _profile, step_s=300.0, alpha=1.1,
                         objective="energy", split_prompts=split)


def _same(a: PlanProblem, b: PlanProblem) -> bool:
    return (a.classes == b.classes and np.array_equal(a.capacity_rps, b.capacity_rps)
            and np.array_equal(a.power_w, b.power_w) and a.share_group == b.share_group
            and np.array_equal(a.forecast_rps, b.forecast_rps))


def test_a_class_no_mode_excludes_plans_exactly_as_before() -> None:
    parted, whole = _build([SHORT], True), _build([SHORT], False)
    assert whole.problem.capacity_rps.all()  # no mode is excluded
    assert parted.parent == () and _same(parted.problem, whole.problem)
    assert parted.problem.alt_capacity_rps is None and parted.problem.miss_group is None
    a, b = solve(parted.problem), solve(whole.problem)
    assert a.feasible and a.objective == b.objective and a.plan == b.plan


def test_a_tail_excluded_class_is_cut_where_the_excluded_mode_stops() -> None:
    whole = _build([TAIL, SHORT], False).problem
    assert whole.capacity_rps[0, 1] == 0.0  # the tail excludes the A100 for the class
    built = _build([TAIL, SHORT], True)
    p = built.problem
    assert p.classes == ("tail#1", "tail#2", "short") and built.parent == (0, 0, 1)
    assert p.miss_group == ("tail", "tail", "")
    assert p.share_group == ("parts:tail", "parts:tail", "key:m")
    np.testing.assert_allclose(p.forecast_rps[:2].sum(axis=0), TAIL.forecast_rps)
    assert p.capacity_rps[0, 1] > 0.0  # the short half on the A100
    assert p.capacity_rps[1, 1] == 0.0  # the long half: never in time there
    assert p.capacity_rps[1, 0] > 0.0
    # the untouched class keeps its matrices
    assert np.array_equal(p.capacity_rps[2], whole.capacity_rps[1])


def test_each_alternative_rate_keeps_its_parts_misses_at_its_level() -> None:
    """Each column's rate is sound alone: the part's own prompts (M/G/1 with their own
    moments) miss at most its unavoidable share plus its level x the budget there."""
    built = _build([TAIL], True)
    p = built.problem
    assert p.alt_capacity_rps is not None and p.alt_miss_excess is not None
    budget = DEFAULT_HEADROOM.ttft_miss.value
    part = prompt_parts(TAIL, [500])
    for r in range(2):
        for m, mode in enumerate(p.modes):
            sp = built.serving[mode.name][r]
            if sp is None:
                continue
            assert part[r].prompt_tokens is not None
            service = prompt_prefill_s(_profile(r, mode), part[r].prompt_tokens, sp.batch)
            unavoidable = min(prompt_tail_miss(service, TAIL.ttft_s, 0.0), 1.0)
            for k, level in enumerate(ALT_MISS_LEVELS):
                rate = p.alt_capacity_rps[k, r, m]
                if rate > 0:
                    assert p.alt_miss_excess[k, r, m] == pytest.approx((level - 1) * budget)
                    assert prompt_tail_miss(service, TAIL.ttft_s, rate) <= (
                        unavoidable + level * budget + 1e-9)
            looser = [p.alt_capacity_rps[k, r, m] for k, lv in enumerate(ALT_MISS_LEVELS)
                      if lv > 1]
            tighter = [p.alt_capacity_rps[k, r, m] for k, lv in enumerate(ALT_MISS_LEVELS)
                       if lv < 1]
            base = p.capacity_rps[r, m]
            assert all(x == 0 or x > base for x in looser)
            assert all(x < base for x in tighter if x > 0)


def _group_problem(b_excess: float, a_tight: bool) -> PlanProblem:
    """One 4-GPU node, one mode; parts A (short) and B (long) of class c. Base rates A 10,
    B 1 req/s; alternatives: B at 2 req/s with ``b_excess`` more misses per request, A at
    8 req/s with 0.0075 fewer (only if ``a_tight``). Demand A 4, B 1 req/s: at base rates
    they need 1.4 instances, so the one instance fits only with B's alternative, and
    only where A's tighter flow offsets B's extra misses."""
    mode = Mode("4xA100", "A100", 4)
    alt = np.zeros((2, 2, 1))
    excess = np.zeros((2, 2, 1))
    alt[0, 1, 0], excess[0, 1, 0] = 2.0, b_excess
    if a_tight:
        alt[1, 0, 0], excess[1, 0, 0] = 8.0, -0.0075
    return PlanProblem(
        classes=("c#1", "c#2"), modes=(mode,), nodes=(PlanNode("n", "s", "A100", 4),),
        power_w=np.array([[400.0], [400.0]]), capacity_rps=np.array([[10.0], [1.0]]),
        forecast_rps=np.array([[4.0], [1.0]]), alpha=1.0, share_group=("g", "g"),
        idle_power_w=np.array([200.0]), wake_j_per_request=np.array([[20.0], [60.0]]),
        alt_capacity_rps=alt, alt_miss_excess=excess, miss_group=("c", "c"))


def _flows(problem: PlanProblem) -> tuple[planner._Model, np.ndarray, np.ndarray]:
    """The hard-demand model's solution: (model, instances y, flows f)."""
    model = planner._Model(problem, frozenset())
    run = model.solve(10.0)
    assert run.x is not None
    return model, np.rint(run.x[: model.n_y]), run.x[model.n_int : model.n_x]


def test_the_class_miss_row_binds() -> None:
    assert solve(_group_problem(0.01, a_tight=True)).feasible
    # B's extra misses need 1.33 req/s of A's tighter flow: without it, or when they are
    # more than A's whole demand can offset (0.04 x 1 > 0.0075 x 4), nothing fits
    assert not solve(_group_problem(0.01, a_tight=False)).feasible
    assert not solve(_group_problem(0.04, a_tight=True)).feasible
    model, _, f = _flows(_group_problem(0.01, a_tight=True))
    assert float(model.f_excess @ f) <= 1e-9
    assert float(f[model.f_excess < 0].sum()) >= 0.01 / 0.0075 - 1e-6


@st.composite
def grouped_problems(draw: st.DrawFn) -> PlanProblem:
    """Two or three parts of one class plus a class of its own on one or two modes, with
    random base and alternative rates and miss excesses."""
    n_parts = draw(st.integers(2, 3))
    n_modes = draw(st.integers(1, 2))
    R = n_parts + 1
    rates = st.floats(0.2, 5.0)
    cap = np.array([[draw(rates) for _ in range(n_modes)] for _ in range(R)])
    alt = np.zeros((2, R, n_modes))
    excess = np.zeros((2, R, n_modes))
    for r in range(n_parts):
        for m in range(n_modes):
            if draw(st.booleans()):
                alt[0, r, m], excess[0, r, m] = cap[r, m] * draw(st.floats(1.1, 4.0)), draw(
                    st.floats(0.001, 0.05))
            if draw(st.booleans()):
                alt[1, r, m], excess[1, r, m] = cap[r, m] * draw(st.floats(0.2, 0.9)), -draw(
                    st.floats(0.001, 0.01))
    modes = tuple(Mode(f"m{i}", "A100", 4) for i in range(n_modes))
    return PlanProblem(
        classes=tuple(f"c#{r}" for r in range(n_parts)) + ("other",), modes=modes,
        nodes=(PlanNode("n0", "s", "A100", 8), PlanNode("n1", "s", "A100", 4)),
        power_w=np.full((R, n_modes), 300.0), capacity_rps=cap,
        forecast_rps=np.array([[draw(st.floats(0.1, 4.0))] for _ in range(R)]), alpha=1.0,
        share_group=("g",) * R, idle_power_w=np.full(n_modes, 100.0),
        wake_j_per_request=np.full((R, n_modes), 30.0), alt_capacity_rps=alt,
        alt_miss_excess=excess, miss_group=("c",) * n_parts + ("",))


FEASIBLE: list[int] = []


@given(grouped_problems())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_misses_add_up_to_the_class_budget(problem: PlanProblem) -> None:
    """Whatever the plan, its parts' flows miss at most the class's budget in expectation
    (sum of excess x req/s <= 0), every shared instance carries at most its capacity at
    each flow's own rate, and each class gets its demand when the plan is feasible."""
    result = solve(problem)
    if not result.feasible:
        return
    FEASIBLE.append(1)
    model, y, f = _flows(problem)
    assert float(model.f_excess @ f) <= 1e-7
    load = np.zeros(model.n_y)
    np.add.at(load, model.f_y, f * model.f_inv_cap)
    assert np.all(load <= y + 1e-6)
    for cls in problem.classes:
        r = problem.classes.index(cls)
        assert result.served_rps(cls) >= problem.demand_rps[r].max() * (1 - 1e-6) - 1e-9


def test_a_problem_without_groups_solves_as_before() -> None:
    """No alternative column and no miss group: the same plan as the plain problem."""
    base = replace(_group_problem(0.01, a_tight=True), alt_capacity_rps=None,
                   alt_miss_excess=None, miss_group=None,
                   forecast_rps=np.array([[2.0], [0.3]]))
    grouped = replace(base, miss_group=("c", "c"))
    a, b = solve(base), solve(grouped)
    assert a.feasible and b.feasible and a.plan == b.plan and a.objective == b.objective


def test_bad_alternatives_are_refused() -> None:
    good = _group_problem(0.01, a_tight=True)
    with pytest.raises(ValueError, match="share_group"):
        replace(good, share_group=None)
    with pytest.raises(ValueError, match="miss_group"):
        replace(good, miss_group=("c", ""))
    with pytest.raises(ValueError, match="alt_miss_excess"):
        replace(good, alt_miss_excess=np.zeros((1, 2, 1)))
    with pytest.raises(ValueError, match="alt_capacity_rps"):
        replace(good, alt_capacity_rps=-np.ones((2, 2, 1)))
    with pytest.raises(ValueError, match="alt_miss_excess needs"):
        replace(good, alt_capacity_rps=None, miss_group=None)


def test_a_split_plan_serves_every_part_and_maps_back_to_its_class() -> None:
    built = _build([TAIL, SHORT], True)
    result = solve(built.problem)
    assert result.feasible
    served = [0.0, 0.0]
    for i, cls in enumerate(built.problem.classes):
        served[built.parent_of(i)] += result.served_rps(cls)
    demand = 1.1 * np.array([max(TAIL.forecast_rps), max(SHORT.forecast_rps)])
    assert np.all(np.array(served) >= demand * (1 - 1e-6))


def test_the_property_test_sees_feasible_plans() -> None:
    """test_misses_add_up_to_the_class_budget is not vacuous (it ran first)."""
    if not FEASIBLE:
        pytest.skip("run with test_misses_add_up_to_the_class_budget")
    assert len(FEASIBLE) >= 5
