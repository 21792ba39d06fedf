"""Planner windows for the planner policies: core's FREESH MILP on the run's workload.

Each window (default 30 min, 6 steps of 5 min) gets a
:class:`~joulepool.core.planner.PlanProblem`: classes SS/SL/LS/LL, the
cluster's plan modes and nodes, per (class, mode) the power and sustainable
rate from :meth:`ServingProfile.operating_point` (core's queueing model with
its default :class:`~joulepool.core.profiles.Headroom`, the same call
``joulepool plan`` and the operator make) at the class's mean prompt and
predicted response and the workload's SLO set (FREESH's by default), the
forecast per 5-min step and the sites' carbon.

The forecast of a step is what a per-minute forecaster that provisions for
the peak would give: the busiest minute of each class inside the step
(:data:`FORECAST_BIN_S`). With NHPP arrivals (the default) that is the
busiest minute of the process's own expected rate times the class's share of
the run, a perfect forecast (an assumption in the planner's favour, stated in
the output) that leaves the Poisson noise within a minute to the queueing
headroom; with replayed arrivals it is the busiest minute of the realised
arrivals. FREESH's alpha = 1.1 stays on top as headroom for forecast error.
Planning to the step mean instead leaves the busiest minute (about 1.26 x the
5-min mean on the default run) over capacity. A window the planner cannot
serve is reported with its binding reason and the best partial plan is used.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from joulepool.core.classes import (
    CLASS_NAMES,
    PLAN_ALPHA,
    PLAN_INTERVAL_S,
    PLAN_STEP_S,
    PromptLengths,
)
from joulepool.core.planner import Assignment, Mode, PlanProblem
from joulepool.core.problem import PoolSizes, ServiceClass, build_problem
from joulepool.core.profiles import DEFAULT_HEADROOM, Headroom, ServingPoint
from joulepool.core.sizing import POOL_ROUNDS, SizedPlan, plan_pooled
from joulepool.sim.cluster import SimCluster
from joulepool.sim.workload import Workload

FloatArray = npt.NDArray[np.float64]

#: forecast resolution: a step's forecast is the rate of its busiest bin of this length
#: (assumed: per-minute rates, the finest the bundled trace's shape is given at)
FORECAST_BIN_S = 60.0


def planner_assumptions(alpha: float = PLAN_ALPHA, headroom: Headroom | None = None) -> str:
    """One line for the run's printed assumptions."""
    hr = headroom or DEFAULT_HEADROOM
    return (
        f"planner: forecast per {PLAN_STEP_S:g}-s step = each class's busiest "
        f"{FORECAST_BIN_S:g}-s rate in the step (the arrival process's expected rate x the "
        "class's share; the realised arrivals when a trace is replayed): a perfect peak "
        f"forecast, in the planner's favour; demand = alpha {alpha:g} x forecast; L[r, m] = "
        f"core operating_point with queueing headroom: {hr.describe()}"
    )


@dataclass(frozen=True)
class PlannedInstances:
    node: str
    mode: str
    cls: int  # index into CLASS_NAMES: the class with the most load on them
    count: int
    #: shared instances: every class they serve (indices, ``cls`` first); empty: cls only
    serves: tuple[int, ...] = ()


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
    #: largest forecast (the step's busiest minute) over its step's mean rate, any class
    peak_to_mean: float = 1.0
    alpha: float = PLAN_ALPHA
    #: mode -> per class: core's serving point behind L[r, m] (rate, utilisation, binding)
    serving: dict[str, tuple[ServingPoint, ...]] = field(default_factory=dict)
    #: share of the queueing headroom the plan kept (core.sizing: 1 = all of it)
    headroom_scale: float = 1.0
    headroom_note: str = ""

    def describe(self) -> str:
        counts: dict[tuple[int, str, tuple[int, ...]], int] = {}
        for pi in self.instances:
            key = (pi.cls, pi.mode, pi.serves[1:])
            counts[key] = counts.get(key, 0) + pi.count
        parts = []
        for (c, m, guests), n in sorted(counts.items()):
            part = f"{CLASS_NAMES[c]}: {n} x {m}"
            if guests:
                part += f" shared with {'+'.join(CLASS_NAMES[g] for g in guests)}"
            sp = self.serving.get(m)
            if sp is not None and c < len(sp):
                part += (f" ({sp[c].rps:.2f} req/s each, {sp[c].utilisation:.0%} of throughput, "
                         f"{sp[c].binding}-bound)")
            parts.append(part)
        body = ", ".join(parts) or "nothing"
        head = f"plan @{self.start_s:.0f}s ({self.status}, {self.solve_time_s * 1e3:.0f} ms): "
        tail = "" if self.feasible else "; NOT FEASIBLE: " + "; ".join(self.problems)
        if self.headroom_note:
            tail = f"; {self.headroom_note}{tail}"
        burst = (f"; forecast = busiest minute, up to {self.peak_to_mean:.2f} x its step's mean; "
                 f"alpha {self.alpha:g}")
        return head + body + burst + tail


def _step_edges(start_s: float, end_s: float, step_s: float, steps: int) -> list[FloatArray]:
    """Per step, edges of its forecast bins: FORECAST_BIN_S long, a short tail merged back."""
    out = []
    for k in range(steps):
        lo = start_s + k * step_s
        hi = min(lo + step_s, end_s) if k < steps - 1 else end_s
        hi = max(hi, lo + 1e-9)
        edges = [float(x) for x in np.arange(lo, hi, FORECAST_BIN_S)]
        edges.append(hi)
        if len(edges) > 2 and edges[-1] - edges[-2] < FORECAST_BIN_S / 2:
            del edges[-2]  # a bin under half a minute would make a noisy rate
        out.append(np.asarray(edges, dtype=np.float64))
    return out


def step_forecast(
    workload: Workload, start_s: float, end_s: float, step_s: float, steps: int
) -> tuple[FloatArray, FloatArray]:
    """(forecast, mean) req/s per class and step: the step's busiest minute, and its mean.

    With NHPP arrivals the forecaster knows the expected rate of every minute
    (``workload.minute_rate_rps``) and each class's share of the run: the
    forecast is the busiest minute of that rate, free of the Poisson noise
    the queueing headroom already covers. With replayed arrivals only the
    realised ones are known: the busiest minute of the realised counts.
    """
    R = len(CLASS_NAMES)
    peak = np.zeros((R, steps))
    mean = np.zeros((R, steps))
    t = workload.arrival_s
    intensity = workload.minute_rate_rps
    if intensity is not None:
        share = np.bincount(workload.cls, minlength=R)[:R] / max(workload.requests, 1)
    for k, edges in enumerate(_step_edges(start_s, end_s, step_s, steps)):
        lo, hi = float(edges[0]), float(edges[-1])
        if intensity is not None and intensity.size:
            first = min(int(lo // 60.0), intensity.size - 1)
            last = min(max(math.ceil(hi / 60.0 - 1e-9), first + 1), intensity.size)
            mins = np.arange(first, last)
            overlap = np.minimum(hi, 60.0 * (mins + 1)) - np.maximum(lo, 60.0 * mins)
            rates = intensity[mins]
            total_mean = float(np.sum(rates * np.maximum(overlap, 0.0)) / max(hi - lo, 1e-9))
            peak[:, k] = share * float(rates.max())
            mean[:, k] = share * total_mean
            continue
        sel = (t >= lo) & (t < hi)
        for r in range(R):
            counts, _ = np.histogram(t[sel & (workload.cls == r)], bins=edges)
            peak[r, k] = float((counts / np.diff(edges)).max())
            mean[r, k] = float(counts.sum()) / (hi - lo)
    return peak, mean


def plan_problem(
    cluster: SimCluster,
    workload: Workload,
    start_s: float,
    interval_s: float = PLAN_INTERVAL_S,
    step_s: float = PLAN_STEP_S,
    alpha: float = PLAN_ALPHA,
    time_limit_s: float = 10.0,
    headroom: Headroom | None = None,
    share_instances: bool = True,
) -> PlanProblem:
    """The window's MILP; its forecast is each step's busiest minute (module docstring).
    ``share_instances``: the classes (one model) may share instances (core's shared
    formulation); False: each class has instances of its own (FREESH's)."""
    problem, _, _ = _plan_problem(cluster, workload, start_s, interval_s, step_s, alpha,
                                  time_limit_s, headroom, share_instances)
    return problem


def _plan_problem(
    cluster: SimCluster,
    workload: Workload,
    start_s: float,
    interval_s: float,
    step_s: float,
    alpha: float,
    time_limit_s: float,
    headroom: Headroom | None,
    share_instances: bool = True,
    pool_sizes: PoolSizes | None = None,
) -> tuple[PlanProblem, dict[str, tuple[ServingPoint, ...]], float]:
    end = min(start_s + interval_s, workload.duration_s)
    steps = max(1, math.ceil((end - start_s) / step_s - 1e-9))
    modes = tuple(
        Mode(m, p.product.name, p.gpus)
        for m in cluster.plan_modes
        if (p := cluster.mode_profile(m)) is not None
    )
    mean_in, mean_out = workload.class_means()
    forecast, mean = step_forecast(workload, start_s, end, step_s, steps)
    classes = []
    for r, name in enumerate(CLASS_NAMES):
        slo = workload.slos.for_class(name)
        classes.append(ServiceClass(name, float(mean_in[r]), float(mean_out[r]), slo.ttft_s,
                                    slo.tpot_s, tuple(float(v) for v in forecast[r]),
                                    PromptLengths.from_samples(
                                        workload.input_tokens[workload.cls == r]),
                                    share_key=cluster.model if share_instances else None))
    built = build_problem(
        classes, modes, cluster.nodes, lambda r, mode: cluster.mode_profile(mode.name),
        step_s=step_s, alpha=alpha, objective=cluster.objective,
        carbon_g_per_kwh={s: cluster.carbon_window(s, start_s, steps, step_s)
                          for s in cluster.sites},
        headroom=headroom, pool_sizes=pool_sizes, time_limit_s=time_limit_s,
    )
    serving = {m: tuple(sp for sp in points if sp is not None)
               for m, points in built.serving.items()}
    ratio = np.divide(forecast, mean, out=np.ones_like(forecast), where=mean > 0)
    problem = built.problem
    return problem, serving, float(ratio.max()) if ratio.size else 1.0


def _planned(a: Assignment) -> PlannedInstances:
    """An assignment as the engine's instances of its classes."""
    serves = tuple(CLASS_NAMES.index(c) for c in a.serves)
    return PlannedInstances(a.node, a.mode, CLASS_NAMES.index(a.cls), a.instances,
                            serves if len(serves) > 1 else ())


def _sized_window(
    cluster: SimCluster,
    workload: Workload,
    start_s: float,
    interval_s: float,
    step_s: float,
    alpha: float,
    headroom: Headroom | None,
    share_instances: bool = True,
    pooled: bool = True,
) -> tuple[SizedPlan, dict[str, tuple[ServingPoint, ...]], float]:
    """Core's sizing (the most queueing headroom that fits; ``pooled``: at pool-level
    rates, one instance's L[r, m] in a pool of the size the plan deploys) on this
    window's problem."""
    built: list[tuple[PlanProblem, dict[str, tuple[ServingPoint, ...]], float]] = []

    def build(hr: Headroom, sizes: PoolSizes) -> PlanProblem:
        built.append(_plan_problem(cluster, workload, start_s, interval_s, step_s, alpha,
                                   10.0, hr, share_instances, sizes))
        return built[-1][0]

    sized = plan_pooled(build, headroom, pool_rounds=POOL_ROUNDS if pooled else 0)
    serving, peak_to_mean = next((sv, pk) for pb, sv, pk in built if pb is sized.problem)
    return sized, serving, peak_to_mean


def plan_windows(
    cluster: SimCluster,
    workload: Workload,
    interval_s: float = PLAN_INTERVAL_S,
    step_s: float = PLAN_STEP_S,
    alpha: float = PLAN_ALPHA,
    headroom: Headroom | None = None,
    share_instances: bool = True,
    pooled: bool = False,
) -> list[WindowPlan]:
    """One plan per window that starts inside the run (``share_instances``: see
    :func:`plan_problem`; ``pooled``: L[r, m] at the pool sizes the plan deploys, for a
    soonest-start router, else per instance: core.sizing.plan_pooled)."""
    plans: list[WindowPlan] = []
    start = 0.0
    while start < workload.duration_s:
        t0 = time.perf_counter()
        sized, serving, peak_to_mean = _sized_window(cluster, workload, start, interval_s,
                                                     step_s, alpha, headroom,
                                                     share_instances, pooled)
        sizing_s = time.perf_counter() - t0
        problem, res = sized.problem, sized.result
        chosen = res.plan
        problems = [f"{s.cls}: short {s.shortfall_rps:.2f} of {s.demand_rps:.2f} req/s "
                    f"({s.reason})" for s in res.shortfalls] + list(res.binding)
        plans.append(
            WindowPlan(
                start_s=start,
                instances=tuple(_planned(a) for a in chosen),
                feasible=res.feasible,
                status=res.status,
                objective=res.objective,
                unit=res.unit,
                solve_time_s=sizing_s if sized.solves > 1 else res.solve_time_s,
                forecast_peak_rps=tuple(float(v) for v in problem.forecast_rps.max(axis=1)),
                problems=tuple(problems),
                capacity_rps={
                    m.name: tuple(float(v) for v in problem.capacity_rps[:, j])
                    for j, m in enumerate(problem.modes)
                },
                peak_to_mean=peak_to_mean,
                alpha=alpha,
                serving=serving,
                headroom_scale=sized.scale,
                headroom_note=sized.note(),
            )
        )
        start += interval_s
    return plans

