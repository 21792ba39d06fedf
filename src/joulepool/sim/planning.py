"""Planner windows for the planner policies: core's FREESH MILP on the run's workload.

Each window (default 30 min, 6 steps of 5 min) gets a
:class:`~joulepool.core.planner.PlanProblem`: classes SS/SL/LS/LL, the
cluster's plan modes and nodes, per (class, mode) the power and sustainable
rate from :meth:`ServingProfile.operating_point` at the class's mean prompt
and predicted response and FREESH's SLO, the forecast per 5-min step and the
sites' carbon. The forecast is the run's own arrival counts per step
(a perfect forecast: an assumption in the planner's favour, stated in the
output). A window the planner cannot serve is reported with its binding
reason and the best partial plan is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from joulepool.core.classes import CLASS_NAMES, freesh_slo
from joulepool.core.planner import Mode, PlanNode, PlanProblem, solve
from joulepool.sim.cluster import SimCluster
from joulepool.sim.workload import Workload

PLAN_INTERVAL_S = 1800.0  # FREESH: pools re-planned every 30 min
PLAN_STEP_S = 300.0  # FREESH: 6 steps of 5 min per window
PLAN_ALPHA = 1.1  # FREESH headroom


@dataclass(frozen=True)
class PlannedInstances:
    node: str
    mode: str
    cls: int  # index into CLASS_NAMES
    count: int


@dataclass(frozen=True)
class WindowPlan:
    start_s: float
    instances: tuple[PlannedInstances, ...]
    feasible: bool
    status: str
    objective: float
    unit: str
    solve_time_s: float
    forecast_peak_rps: tuple[float, ...]  # per class
    problems: tuple[str, ...]  # binding reasons / shortfalls when infeasible
    #: mode -> sustainable req/s of one instance per class (the planner's L[r, m])
    capacity_rps: dict[str, tuple[float, ...]] = field(default_factory=dict)
    #: busiest minute of any class over its step's forecast (the planner sees step means)
    peak_minute_ratio: float = 1.0
    alpha: float = PLAN_ALPHA

    def describe(self) -> str:
        counts: dict[tuple[str, str], int] = {}
        for pi in self.instances:
            key = (CLASS_NAMES[pi.cls], pi.mode)
            counts[key] = counts.get(key, 0) + pi.count
        body = ", ".join(f"{c}: {n} x {m}" for (c, m), n in sorted(counts.items())) or "nothing"
        head = f"plan @{self.start_s:.0f}s ({self.status}, {self.solve_time_s * 1e3:.0f} ms): "
        tail = "" if self.feasible else "; NOT FEASIBLE: " + "; ".join(self.problems)
        burst = (f"; busiest minute {self.peak_minute_ratio:.2f} x its step's forecast "
                 f"(headroom alpha {self.alpha:g})")
        return head + body + burst + tail


def plan_problem(
    cluster: SimCluster,
    workload: Workload,
    start_s: float,
    interval_s: float = PLAN_INTERVAL_S,
    step_s: float = PLAN_STEP_S,
    alpha: float = PLAN_ALPHA,
    time_limit_s: float = 10.0,
) -> PlanProblem:
    end = min(start_s + interval_s, workload.duration_s)
    steps = max(1, math.ceil((end - start_s) / step_s - 1e-9))
    modes = tuple(
        Mode(m, p.product.name, p.gpus)
        for m in cluster.plan_modes
        if (p := cluster.mode_profile(m)) is not None
    )
    mean_in, mean_out = workload.class_means()
    R, M = len(CLASS_NAMES), len(modes)
    power = np.zeros((R, M))
    cap = np.zeros((R, M))
    for r, name in enumerate(CLASS_NAMES):
        slo = freesh_slo(name)
        for m, mode in enumerate(modes):
            prof = cluster.mode_profile(mode.name)
            assert prof is not None
            if mean_out[r] <= 0:
                power[r, m], cap[r, m] = float(prof.power_w(1)), 0.0
                continue
            power[r, m], cap[r, m] = prof.operating_point(
                float(mean_in[r]), float(mean_out[r]), slo.ttft_s, slo.tpot_s
            )
    t = workload.arrival_s
    sel = (t >= start_s) & (t < start_s + steps * step_s)
    step_idx = np.minimum(((t[sel] - start_s) // step_s).astype(np.int64), steps - 1)
    counts = np.zeros((R, steps))
    np.add.at(counts, (workload.cls[sel], step_idx), 1.0)
    # the last step may be cut short by the end of the run
    lengths = np.minimum(step_s, np.maximum(end - (start_s + step_s * np.arange(steps)), 1e-9))
    forecast = counts / lengths[None, :]
    carbon = {s: cluster.carbon_window(s, start_s, steps, step_s) for s in cluster.sites}
    return PlanProblem(
        classes=CLASS_NAMES,
        modes=modes,
        nodes=tuple(PlanNode(n.name, n.site, n.product, n.gpus) for n in cluster.nodes),
        power_w=power,
        capacity_rps=cap,
        forecast_rps=forecast,
        step_s=step_s,
        alpha=alpha,
        objective=cluster.objective,
        carbon_g_per_kwh=carbon,
        time_limit_s=time_limit_s,
    )


def peak_minute_ratio(problem: PlanProblem, workload: Workload, start_s: float) -> float:
    """Largest (class, minute) arrival rate over the forecast of the step holding it."""
    steps = problem.steps
    step_s = problem.step_s
    t = workload.arrival_s
    sel = (t >= start_s) & (t < start_s + steps * step_s)
    minute = ((t[sel] - start_s) // 60.0).astype(np.int64)
    n_min = math.ceil(steps * step_s / 60.0)
    counts = np.zeros((len(CLASS_NAMES), n_min))
    np.add.at(counts, (workload.cls[sel], minute), 1.0)
    lengths = np.clip(workload.duration_s - (start_s + 60.0 * np.arange(n_min)), 0.0, 60.0)
    rates = np.divide(counts, lengths, out=np.zeros_like(counts), where=lengths > 0)
    step_of = np.minimum((60.0 * np.arange(n_min)) // step_s, steps - 1).astype(np.int64)
    fc = problem.forecast_rps[:, step_of]
    ratio = np.divide(rates, fc, out=np.zeros_like(rates), where=fc > 0)
    return float(ratio.max()) if ratio.size else 1.0


def plan_windows(
    cluster: SimCluster,
    workload: Workload,
    interval_s: float = PLAN_INTERVAL_S,
    step_s: float = PLAN_STEP_S,
    alpha: float = PLAN_ALPHA,
) -> list[WindowPlan]:
    """One plan per window that starts inside the run."""
    plans: list[WindowPlan] = []
    start = 0.0
    while start < workload.duration_s:
        problem = plan_problem(cluster, workload, start, interval_s, step_s, alpha)
        res = solve(problem)
        chosen = res.plan
        problems = [f"{s.cls}: short {s.shortfall_rps:.2f} of {s.demand_rps:.2f} req/s "
                    f"({s.reason})" for s in res.shortfalls] + list(res.binding)
        plans.append(
            WindowPlan(
                start_s=start,
                instances=tuple(
                    PlannedInstances(a.node, a.mode, CLASS_NAMES.index(a.cls), a.instances)
                    for a in chosen
                ),
                feasible=res.feasible,
                status=res.status,
                objective=res.objective,
                unit=res.unit,
                solve_time_s=res.solve_time_s,
                forecast_peak_rps=tuple(float(v) for v in problem.forecast_rps.max(axis=1)),
                problems=tuple(problems),
                capacity_rps={
                    m.name: tuple(float(v) for v in problem.capacity_rps[:, j])
                    for j, m in enumerate(problem.modes)
                },
                peak_minute_ratio=peak_minute_ratio(problem, workload, start),
                alpha=alpha,
            )
        )
        start += interval_s
    return plans
