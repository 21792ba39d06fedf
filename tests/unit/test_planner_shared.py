"""Shared instances in the pool planner (PlanProblem.share_group): classes of one share
group share an instance's capacity, pay its idle power once, and do not starve each other."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from test_planner import check_plan, factor, tiny_problems

from joulepool.core.planner import Mode, PlanNode, PlanProblem, PlanResult, solve

A4, A8 = Mode("4xA100", "A100", 4), Mode("8xA100", "A100", 8)
H4 = Mode("4xH100", "H100", 4)


def wake(power: np.ndarray, rps: np.ndarray, idle: np.ndarray) -> np.ndarray:
    """J per request on a lightly loaded instance: twice the operating point's J above
    idle per request (a batch of one costs more per request than a full batch)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(rps > 0, 2.0 * (power - idle[None, :]) / rps, 0.0)


def shared(problem: PlanProblem) -> PlanProblem:
    """``problem`` with every class in one share group; idle power 40 % of the cheapest
    class's power on each mode (never above any class's)."""
    idle = np.array([0.4 * float(problem.power_w[:, m].min())
                     for m in range(len(problem.modes))])
    return replace(problem, share_group=("model",) * len(problem.classes), idle_power_w=idle,
                   wake_j_per_request=wake(problem.power_w, problem.capacity_rps, idle))


def check_shared_plan(problem: PlanProblem, result: PlanResult) -> dict[str, float]:
    """Every constraint of a shared plan, recomputed from the assignments alone: GPUs per
    node, each class only on modes it may use, capacity (an instance of one class serves
    its rate; on shared ones the sum of each class's req/s over its rate is at most the
    instances), demand met, power (P per instance of one class; idle plus each request's
    wake energy on shared ones) and objective."""
    nodes = {n.name: n for n in problem.nodes}
    ci = {c: i for i, c in enumerate(problem.classes)}
    mi = {m.name: i for i, m in enumerate(problem.modes)}
    assert problem.idle_power_w is not None and problem.wake_j_per_request is not None
    used: dict[str, int] = defaultdict(int)
    served: dict[str, float] = defaultdict(float)
    objective = 0.0
    for a in result.plan:
        m = mi[a.mode]
        used[a.node] += a.gpus
        assert a.gpus == a.instances * problem.modes[m].gpus
        assert len(a.serves) == len(a.class_rps) and a.serves[:1] in ((a.cls,), ())
        if not a.serves:  # instances of one class (FREESH's)
            r = ci[a.cls]
            assert problem.servable[r, m], f"{a.mode} is not eligible for {a.cls}"
            power = a.instances * problem.power_w[r, m]
            served[a.cls] += a.instances * problem.capacity_rps[r, m]
            assert a.served_rps == pytest.approx(a.instances * problem.capacity_rps[r, m])
        load = 0.0
        if a.serves:
            power = a.instances * problem.idle_power_w[m]
        for cls, rps in zip(a.serves, a.class_rps, strict=True):
            r = ci[cls]
            assert problem.servable[r, m], f"{a.mode} is not eligible for {cls}"
            assert rps > 0
            load += rps / problem.capacity_rps[r, m]
            power += rps * problem.wake_j_per_request[r, m]
            served[cls] += rps
        assert load <= a.instances * (1 + 1e-6), f"{a} carries more than its capacity"
        assert a.power_w == pytest.approx(power, rel=1e-9)
        objective += power * problem.step_s * factor(problem, a.site)
    for name, n in used.items():
        assert n <= nodes[name].gpus, f"node {name} over capacity"
    if result.feasible:
        peak = problem.alpha * problem.forecast_rps.max(axis=1)
        for r, cls in enumerate(problem.classes):
            assert served[cls] >= peak[r] * (1 - 1e-6) - 1e-9, (cls, served[cls], peak[r])
            assert result.served_rps(cls) == pytest.approx(served[cls])
    assert result.objective == pytest.approx(objective, rel=1e-6, abs=1e-9)
    return dict(served)


def low_load_problem(**kw: object) -> PlanProblem:
    """Three classes at a few per cent of an instance each; one 8-GPU A100 node at a clean
    site and a 4-GPU H100 node at a dirty one."""
    return PlanProblem(
        classes=("chat", "rag", "batch"),
        modes=(A4, A8, H4),
        nodes=(PlanNode("clean-a100", "clean", "A100", 8),
               PlanNode("dirty-h100", "dirty", "H100", 4)),
        power_w=np.array([[900.0, 1500.0, 1400.0]] * 3),
        capacity_rps=np.array([[2.0, 4.0, 6.0], [1.0, 2.5, 3.0], [0.0, 1.5, 2.0]]),
        forecast_rps=np.array([[0.10, 0.12], [0.05, 0.04], [0.02, 0.03]]),
        objective="carbon",
        carbon_g_per_kwh={"clean": (100.0,), "dirty": (450.0,)},
        share_group=("llama",) * 3,
        idle_power_w=np.array([240.0, 480.0, 300.0]),
        wake_j_per_request=wake(np.array([[900.0, 1500.0, 1400.0]] * 3),
                                np.array([[2.0, 4.0, 6.0], [1.0, 2.5, 3.0], [0.0, 1.5, 2.0]]),
                                np.array([240.0, 480.0, 300.0])),
        mip_rel_gap=0.0,
        **kw,
    )


def test_classes_share_one_instance_at_low_load() -> None:
    problem = low_load_problem()
    result = solve(problem)
    assert result.feasible and result.status == "optimal"
    served = check_shared_plan(problem, result)
    # one instance on the clean node serves all three classes (batch cannot use 4xA100)
    assert [(a.node, a.mode, a.instances) for a in result.plan] == [("clean-a100", "8xA100", 1)]
    assert set(result.plan[0].serves) == {"chat", "rag", "batch"}
    assert result.plan[0].cls == "chat"  # the class with the most load on it comes first
    for r, cls in enumerate(problem.classes):
        assert served[cls] == pytest.approx(1.1 * problem.forecast_rps[r].max())
    # FREESH's per-class formulation needs an instance per class for the same demand
    alone = solve(replace(problem, share_group=None))
    assert alone.feasible and sum(a.instances for a in alone.plan) == 3
    assert result.objective < alone.objective


def test_each_class_keeps_its_eligibility_on_a_shared_instance() -> None:
    # "batch" may not use 4xA100: a 4xA100 may serve chat and rag, never batch; chat and
    # rag carry enough load that the clean site's idle power pays for itself
    problem = replace(low_load_problem(), nodes=(PlanNode("clean-a100", "clean", "A100", 4),
                                                 PlanNode("dirty-h100", "dirty", "H100", 4)),
                      forecast_rps=np.array([[0.6, 0.5], [0.3, 0.25], [0.02, 0.03]]))
    result = solve(problem)
    check_shared_plan(problem, result)
    by_mode = {a.mode: a for a in result.plan}
    assert set(by_mode) == {"4xA100", "4xH100"}
    assert "batch" not in by_mode["4xA100"].serves
    assert by_mode["4xH100"].serves == ("batch",)  # the others are cheaper on the clean site


def test_shared_classes_do_not_starve_each_other_when_capacity_is_short() -> None:
    # one 4xH100: 3 req/s of a big class alone fill it; a small class needs 0.2 of it
    problem = PlanProblem(
        classes=("big", "small"),
        modes=(H4,),
        nodes=(PlanNode("h", "s", "H100", 4),),
        power_w=np.array([[1400.0], [1400.0]]),
        capacity_rps=np.array([[3.0], [1.0]]),
        forecast_rps=np.array([[5.0], [0.2]]),
        alpha=1.0,
        share_group=("m", "m"),
        idle_power_w=np.array([300.0]),
        wake_j_per_request=np.array([[600.0], [1800.0]]),
    )
    result = solve(problem)
    assert not result.feasible and result.plan
    served = check_shared_plan(problem, result)
    # the max-min fair floor first: the small class fits in full; the big one gets the rest
    assert served["small"] == pytest.approx(0.2, rel=1e-6)
    assert served["big"] == pytest.approx(3.0 * (1 - 0.2), rel=1e-6)
    assert {s.cls for s in result.shortfalls} == {"big"}


def test_a_class_outside_the_group_keeps_instances_of_its_own() -> None:
    problem = replace(low_load_problem(), share_group=("llama", "llama", "other"))
    result = solve(problem)
    check_shared_plan(problem, result)
    for a in result.plan:
        assert "batch" not in a.serves or a.serves == ("batch",)
    assert result.served_rps("batch") == pytest.approx(1.1 * 0.03)


def test_sharing_needs_idle_power_and_a_group_per_class() -> None:
    base = low_load_problem()
    with pytest.raises(ValueError, match="needs idle_power_w and wake_j_per_request"):
        replace(base, idle_power_w=None)
    with pytest.raises(ValueError, match="needs idle_power_w and wake_j_per_request"):
        replace(base, wake_j_per_request=None)
    with pytest.raises(ValueError, match="one group name per class"):
        replace(base, share_group=("llama",))
    with pytest.raises(ValueError, match="idle_power_w must be 3 finite"):
        replace(base, idle_power_w=np.array([1.0, -2.0, 3.0]))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tiny_problems())
def test_sharing_never_costs_more_than_instances_of_their_own(problem: PlanProblem) -> None:
    """A per-class plan is a shared plan too (each class's flow on its own instances), and
    with the same cost: the shared optimum is never above FREESH's per-class one, and
    whatever fits without sharing fits with it."""
    own = solve(problem)
    check_plan(problem, own)
    problem_s = shared(problem)
    both = solve(problem_s)
    check_shared_plan(problem_s, both)
    if own.feasible:  # (sharing may also fit a window that instances of their own do not)
        assert both.feasible
        assert both.objective <= own.objective * (1 + 1e-6) + 1e-9
