"""Runs every (policy, repeat) of an experiment, in parallel processes when asked.

Each repeat draws its own workload from ``seed + repeat``; all policies of a
repeat serve that same workload (common random numbers), so their
differences are not sampling noise. Planner windows and the energy floor
depend only on the workload and are computed once per repeat.
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import numpy.typing as npt

import joulepool
from joulepool.core.bound import FloorDemand, FloorGPUs, FloorResult, energy_floor
from joulepool.core.classes import CLASS_NAMES, FREESH_SLOS, ClassBoundaries, SLOSet
from joulepool.core.energy import megajoules_per_hour
from joulepool.core.profiles import DEFAULT_HEADROOM, ServingProfile, assumed
from joulepool.sim.cluster import DEFAULT_LOAD, SimCluster
from joulepool.sim.engine import (
    EngineParams,
    FloatArray,
    RunResult,
    simulate,
    static_deployment,
)
from joulepool.sim.planning import PLAN_ALPHA, WindowPlan, plan_windows, planner_assumptions
from joulepool.sim.policies import POLICIES, PolicySpec
from joulepool.sim.tables import ProfileTable, build_table
from joulepool.sim.trace import Trace
from joulepool.sim.workload import (
    DEFAULT_BULK_SLACK,
    DEFAULT_MIX,
    DEFAULT_PREDICTOR_MAE,
    Workload,
    build_workload,
)
from joulepool.workers import require_parent_package, submit_all, worker_context

#: the tightest TPOT of any class under FREESH's SLOs (150 ms): fixes each profile's
#: operating batch unless an experiment's SLO set says otherwise
TPOT_TARGET_S = FREESH_SLOS.tpot_s

ArrivalMode = Literal["replay", "scale", "rate", "load"]


@dataclass(frozen=True)
class Experiment:
    cluster: SimCluster
    trace: Trace
    duration_s: float
    arrival_mode: ArrivalMode = "load"
    arrival_value: float = DEFAULT_LOAD
    policies: tuple[str, ...] = tuple(POLICIES)
    seed: int = 0
    repeat: int = 1
    jobs: int = 1
    mix: tuple[float, float, float] = DEFAULT_MIX
    predictor_mae: float = DEFAULT_PREDICTOR_MAE
    bulk_slack: float = DEFAULT_BULK_SLACK
    alpha: float = PLAN_ALPHA
    #: share of core's default queueing headroom the planner sizes pools with (1 = all)
    headroom_scale: float = 1.0
    #: the classes may share instances (core.planner's share_group); False: FREESH's
    #: instances of one class each
    share_instances: bool = True
    params: EngineParams = field(default_factory=EngineParams)
    #: interactive-tier SLO targets of every class (deadlines, attainment, planner,
    #: routers, the operating batch behind eps, the capacity ``load`` is relative to)
    slos: SLOSet = FREESH_SLOS


@dataclass(frozen=True)
class Capacity:
    """Sustainable request rates of the static deployment at the trace's mean tokens."""

    per_mode_rps: dict[str, float]  # saturation throughput per instance (TPOT-bound batch)
    instances: dict[str, int]
    total_rps: float
    rr_stable_rps: float  # instances x slowest instance's rate
    #: per instance, req/s it sustains within SLO (:func:`capacity_at_slo`)
    per_mode_slo_rps: dict[str, float] = field(default_factory=dict)
    slo_rps: float = 0.0  # the whole static deployment's capacity at SLO, req/s


@dataclass
class RepeatData:
    seed: int
    workload: Workload
    #: the plan windows: at pool-level rates when a planner policy routes soonest-start
    #: (PolicySpec.pooled_ttft), else per instance
    plans: list[WindowPlan]
    floor: FloorResult
    #: per-instance plans for the planner policies that route least-loaded, when the run
    #: also has soonest-start ones; None: ``plans`` serve every policy
    instance_plans: list[WindowPlan] | None = None

    def plans_for(self, policy: PolicySpec) -> list[WindowPlan]:
        """The plan windows ``policy`` runs on."""
        if self.instance_plans is not None and not policy.pooled_ttft:
            return self.instance_plans
        return self.plans


@dataclass
class ExperimentResult:
    experiment: Experiment
    tables: dict[str, ProfileTable]
    capacity: Capacity
    repeats: list[RepeatData]
    runs: dict[str, list[RunResult]]  # policy -> one per repeat
    description: list[str]
    wall_s: float


# ------------------------------------------------------------------ sensitivity
SENSITIVE = ("gamma", "beta_decode", "beta_prefill", "memory_power_share", "voltage_knee",
             "bandwidth_clock", "prefill_scale", "idle_w.<PRODUCT>")


def apply_assumptions(
    profiles: Sequence[ServingProfile], settings: dict[str, float]
) -> tuple[ServingProfile, ...]:
    """Profiles with assumed figures replaced (docs/calibration.md: the sensitivity option).

    Keys: ``gamma``, ``beta_decode``, ``beta_prefill``, ``memory_power_share``,
    ``voltage_knee`` and ``bandwidth_clock`` (ratios of f_max, every product) (the clock
    law, docs/clock-law.md),
    ``prefill_scale`` (multiplies every prefill rate) and ``idle_w.H100`` etc.
    """
    out = []
    for p in profiles:
        q = p
        for key, value in settings.items():
            why = f"sensitivity run: {key}={value:g}"
            if key == "gamma":
                q = replace(q, gamma=assumed(value, why))
            elif key == "beta_decode":
                q = replace(q, beta_decode=assumed(value, why))
            elif key == "beta_prefill":
                q = replace(q, beta_prefill=assumed(value, why))
            elif key == "memory_power_share":
                q = replace(q, memory_power_share=assumed(value, why))
            elif key == "voltage_knee":
                q = replace(q, product=replace(q.product, voltage_knee_ratio=assumed(value, why)))
            elif key == "bandwidth_clock":
                q = replace(q, product=replace(q.product,
                                               bandwidth_clock_ratio=assumed(value, why)))
            elif key == "prefill_scale":
                q = replace(q, prefill_tokens_per_s=assumed(
                    q.prefill_tokens_per_s.value * value, why))
            elif key.startswith("idle_w."):
                if key.split(".", 1)[1] == q.product.name:
                    q = replace(q, product=replace(q.product, idle_w=assumed(value, why)))
            else:
                raise ValueError(f"unknown assumption {key!r}; known: {', '.join(SENSITIVE)}")
        out.append(q)
    return tuple(out)


# ------------------------------------------------------------------ building blocks
def model_tables(cluster: SimCluster, tpot_s: float = TPOT_TARGET_S) -> dict[str, ProfileTable]:
    """Each mode's table; ``tpot_s`` (the tightest TPOT SLO) fixes the batch behind eps."""
    modes: dict[str, ProfileTable] = {}
    for p in cluster.profiles:
        if p.model == cluster.model:
            modes[p.mode] = build_table(p, tpot_s)  # later profiles win
    return modes


def capacity_at_slo(profile: ServingProfile, mean_input_tokens: float,
                    mean_output_tokens: float, slos: SLOSet = FREESH_SLOS,
                    boundaries: ClassBoundaries | None = None) -> float:
    """Requests/s one instance of ``profile`` sustains within ``slos`` for requests of these
    mean token counts: core's ``ServingProfile.serving_point`` (the planner's L[r, m],
    queueing headroom included) at the SLO of the class such a request falls in.

    Summed over a deployment this is what least-loaded can serve at SLO, the rate
    ``--load`` is a fraction of (docs/simulator.md, "Offered load").
    """
    bounds = boundaries or ClassBoundaries()
    slo = slos.for_class(bounds.classify(round(mean_input_tokens), round(mean_output_tokens)))
    return profile.serving_point(mean_input_tokens, mean_output_tokens, slo.ttft_s,
                                 slo.tpot_s).rps


def static_capacity(cluster: SimCluster, mean_in: float, mean_out: float,
                    tables: dict[str, ProfileTable], slos: SLOSet = FREESH_SLOS) -> Capacity:
    """The static deployment's rates at these mean token counts: saturation throughput at
    ``slos``'s TPOT (weighs least-loaded routing) and the capacity within ``slos``."""
    per_mode: dict[str, float] = {}
    per_mode_slo: dict[str, float] = {}
    instances: dict[str, int] = {}
    for _, mode, count in static_deployment(cluster, tables):
        prof = tables[mode].profile
        # saturation throughput (TPOT-limited batch, prefill included, no queueing
        # headroom): weighs least-loaded routing
        per_mode[mode] = prof.throughput_rps(mean_in, mean_out, slos.tpot_s)
        per_mode_slo[mode] = capacity_at_slo(prof, mean_in, mean_out, slos)
        instances[mode] = instances.get(mode, 0) + count
    if not instances:
        return Capacity({}, {}, 0.0, 0.0)
    total = sum(per_mode[m] * n for m, n in instances.items())
    n_inst = sum(instances.values())
    slowest = min(per_mode[m] for m in instances)
    slo_total = sum(per_mode_slo[m] * n for m, n in instances.items())
    return Capacity(per_mode, instances, total, n_inst * slowest, per_mode_slo, slo_total)


def trace_capacity(cluster: SimCluster, trace: Trace, slos: SLOSet = FREESH_SLOS,
                   tables: dict[str, ProfileTable] | None = None) -> Capacity:
    """:func:`static_capacity` of ``cluster`` at ``trace``'s mean prompt and response."""
    return static_capacity(cluster, float(trace.input_tokens.mean()),
                           float(trace.output_tokens.mean()),
                           tables if tables is not None else model_tables(cluster, slos.tpot_s),
                           slos)


#: prompt-length parts of each class and tier in the energy floor (equal counts): each
#: part's prefill must fit its requests x TTFT, so long prompts cannot borrow the short
#: ones' slack (docs/marginal-energy.md, "Is the floor a floor?")
FLOOR_PROMPT_PARTS = 4


def floor_demand_name(cls: int, bulk: bool) -> str:
    """The name of class index ``cls``'s floor demand of one tier, e.g.
    ``"LS/interactive"`` (:func:`floor_demands`)."""
    return f"{CLASS_NAMES[cls]}/{'bulk' if bulk else 'interactive'}"


def floor_demands(workload: Workload, prompt_parts: int = 1,
                  done: tuple[npt.NDArray[np.bool_], FloatArray] | None = None,
                  ) -> list[FloorDemand]:
    """The energy floor's demands of ``workload``: per class and tier (name
    ``"<class>/<tier>"``, e.g. ``"LS/interactive"``), its tokens, requests and SLOs; with
    ``prompt_parts`` > 1, each split by prompt length into that many parts of about equal
    counts, under the same name.

    ``done``: (requests whose prompt was prefilled, output tokens each generated) to
    count only that work, e.g. what a run did inside its window; None: all that the
    requests ask."""
    if prompt_parts < 1:
        raise ValueError(f"prompt_parts must be >= 1, got {prompt_parts}")
    served, outputs = done if done is not None else (
        np.ones(workload.requests, dtype=bool), workload.output_tokens)
    demands = []
    for ci, name in enumerate(CLASS_NAMES):
        base = workload.slos.for_class(name)
        for bulk in (False, True):
            sel = np.flatnonzero((workload.cls == ci) & (workload.bulk == bulk) & served)
            if not sel.size:
                continue
            k = workload.tpot_slo_s[sel[0]] / base.tpot_s
            by_prompt = sel[np.argsort(workload.input_tokens[sel], kind="stable")]
            for part in np.array_split(by_prompt, min(prompt_parts, sel.size)):
                demands.append(FloorDemand(
                    name=floor_demand_name(ci, bulk),
                    output_tokens=float(outputs[part].sum()),
                    input_tokens=float(workload.input_tokens[part].sum()),
                    mean_input_tokens=float(workload.input_tokens[part].mean()),
                    ttft_s=base.ttft_s * k,
                    tpot_s=base.tpot_s * k,
                    requests=float(part.size),
                ))
    return demands


def floor_for(cluster: SimCluster, workload: Workload,
              done: tuple[npt.NDArray[np.bool_], FloatArray] | None = None) -> FloorResult:
    """The energy floor (core.bound.energy_floor, J) of ``workload`` on ``cluster``'s
    GPUs over its duration: its demands split into :data:`FLOOR_PROMPT_PARTS` prompt
    parts, the cluster model's profiles, each product's idle power. ``done``: only that
    work (:func:`floor_demands`)."""
    demands = floor_demands(workload, FLOOR_PROMPT_PARTS, done)
    gpus = [FloorGPUs(s, p, n) for (s, p), n in cluster.gpu_counts().items()]
    profiles = [p for p in cluster.profiles if p.model == cluster.model]
    idle = {p: cluster.idle_w(p) for (_, p) in cluster.gpu_counts()}
    return energy_floor(demands, gpus, profiles, workload.duration_s, idle_w=idle)


def window_work_floor(cluster: SimCluster, workload: Workload, run: RunResult) -> FloorResult:
    """The energy floor of the work ``run`` did inside its window: the prompts it
    prefilled there (a first token by the window's end) and the output tokens it
    generated there. A run's window energy over this floor compares the same work; a
    run that leaves tokens for after the window is neither charged nor credited for
    them (docs/marginal-energy.md, "The floor of the work done")."""
    prefilled = run.t_first <= run.duration_s  # NaN (no first token) compares False
    return floor_for(cluster, workload, (prefilled, run.window_output_tokens))


def resolve_rate(exp: Experiment, capacity: Capacity) -> tuple[Literal["replay", "scale", "rate"],
                                                                  float, list[str]]:
    """(arrival mode, value, notes): ``load`` F becomes the rate F x ``capacity.slo_rps``."""
    notes = []
    if exp.arrival_mode == "load":
        rate = exp.arrival_value * capacity.slo_rps
        if rate <= 0:
            raise ValueError(
                "no static instance of the cluster serves the trace's mean request within "
                f"the SLOs ({exp.slos.describe()}), so there is no capacity to size --load "
                "by: give --rate or --scale")
        per = ", ".join(f"{n} x {m} at {capacity.per_mode_slo_rps[m]:.2f}"
                        for m, n in sorted(capacity.instances.items()))
        notes.append(
            f"load {exp.arrival_value:g} x the static deployment's capacity at SLO "
            f"({per} req/s = {capacity.slo_rps:.1f} req/s, core's serving_point at the "
            f"trace's mean request) = {rate:.1f} req/s"
        )
        return "rate", rate, notes
    return exp.arrival_mode, exp.arrival_value, notes


def utilisation_note(workload: Workload, capacity: Capacity) -> str:
    """The run's mean offered rate as a share of the capacity at SLO, for every mode."""
    if capacity.slo_rps <= 0:
        return (f"offered {workload.mean_rate_rps:.1f} req/s; no static instance serves the "
                "trace's mean request within the SLOs")
    return (f"offered {workload.mean_rate_rps:.1f} req/s on average = "
            f"{workload.mean_rate_rps / capacity.slo_rps:.0%} of the static deployment's "
            f"capacity at SLO ({capacity.slo_rps:.1f} req/s)")


# ------------------------------------------------------------------ parallel plumbing
#: what each pool worker needs beyond its task: the experiment, its tables, capacity and
#: repeats, and the queue progress goes back on; set in the worker by :func:`_init_worker`
_SHARED: dict[str, object] = {}


def _simulate_repeat(exp: Experiment, tables: dict[str, ProfileTable], capacity: Capacity,
                     policy: str, rep: RepeatData,
                     progress: Callable[[float], None] | None) -> RunResult:
    """One run of ``policy`` on repeat ``rep``, with the floor of its window's work."""
    spec = POLICIES[policy]
    res = simulate(exp.cluster, rep.workload, spec, tables, rep.plans_for(spec), exp.params,
                   seed=rep.seed, progress=progress,
                   static_capacity_rps=capacity.per_mode_rps)
    res.work_floor = window_work_floor(exp.cluster, rep.workload, res)
    return res


def _init_worker(parent_package_file: str, exp: Experiment, tables: dict[str, ProfileTable],
                 capacity: Capacity, repeats: list[RepeatData], progress_q: object) -> None:
    """Pool initializer: check the worker runs the parent's ``joulepool``
    (:func:`~joulepool.workers.require_parent_package`), then keep the experiment's shared
    inputs (sent once per worker)."""
    require_parent_package(parent_package_file)
    _SHARED.update(exp=exp, tables=tables, repeats=repeats, capacity=capacity,
                   progress=progress_q)


def _run_task(task: tuple[str, int]) -> tuple[str, int, RunResult]:
    policy, r = task
    exp = _SHARED["exp"]
    tables = _SHARED["tables"]
    repeats = _SHARED["repeats"]
    capacity = _SHARED["capacity"]
    progress_q = _SHARED.get("progress")
    assert isinstance(exp, Experiment) and isinstance(repeats, list)
    assert isinstance(tables, dict) and isinstance(capacity, Capacity)
    rep = repeats[r]
    assert isinstance(rep, RepeatData)
    last = [0.0]

    def progress(t: float) -> None:
        if progress_q is not None:
            progress_q.put(t - last[0])  # type: ignore[attr-defined]
        last[0] = t

    res = _simulate_repeat(exp, tables, capacity, policy, rep, progress)
    if progress_q is not None:
        progress_q.put(exp.duration_s - last[0])  # type: ignore[attr-defined]
    return policy, r, res


_Progress = Callable[[float, float], None] | None
_Log = Callable[[str], None] | None
_Runs = dict[str, list[RunResult | None]]


def _prepare_repeats(
    exp: Experiment, mode: Literal["replay", "scale", "rate"], value: float,
    description: list[str],
) -> list[RepeatData]:
    """Workload, plans (if a policy needs them) and energy floor of every repeat; the
    first repeat's workload and planner assumptions are appended to ``description``."""
    planners = [POLICIES[p] for p in exp.policies if POLICIES[p].uses_planner]
    need_plans = bool(planners)
    # pooled first (EngineParams.pool_ttft: pool-level TTFT for soonest-start routers)
    kinds = sorted({p.pooled_ttft and exp.params.pool_ttft for p in planners}, reverse=True)
    repeats: list[RepeatData] = []
    for r in range(exp.repeat):
        seed = exp.seed + r
        wl = build_workload(
            exp.trace, exp.duration_s, mode=mode, value=value, seed=seed, mix=exp.mix,
            predictor_mae=exp.predictor_mae, bulk_slack=exp.bulk_slack, slos=exp.slos,
        )
        headroom = DEFAULT_HEADROOM.scaled(exp.headroom_scale)
        plans = [plan_windows(exp.cluster, wl, alpha=exp.alpha, headroom=headroom,
                              share_instances=exp.share_instances, pooled=pooled)
                 for pooled in kinds]
        repeats.append(RepeatData(seed, wl, plans[0] if plans else [],
                                  floor_for(exp.cluster, wl),
                                  plans[1] if len(plans) > 1 else None))
        if r == 0:
            description += list(wl.description)
            if need_plans:
                description.append(planner_assumptions(exp.alpha, headroom))
    return repeats


def _run_in_process(exp: Experiment, tasks: list[tuple[str, int]], runs: _Runs,
                    shared: tuple[dict[str, ProfileTable], Capacity, list[RepeatData]],
                    progress: _Progress, log: _Log) -> None:
    """Run ``tasks`` (policy, repeat) one after another in this process."""
    tables, cap, repeats = shared
    total = exp.duration_s * len(tasks)
    for k, (policy, r) in enumerate(tasks):
        base = k * exp.duration_s

        def step(t: float, base: float = base) -> None:
            if progress:
                progress(base + t, total)

        rep = repeats[r]
        res = _simulate_repeat(exp, tables, cap, policy, rep, step)
        runs[policy][r] = res
        if progress:
            progress(base + exp.duration_s, total)
        if log:
            log(f"{policy} (repeat {r}): {rep.workload.requests / res.wall_s:,.0f} "
                f"simulated req/s")


class WorkerStartError(RuntimeError):
    """A worker process of :func:`run_experiment` (``jobs`` > 1) failed to start or
    died: its initializer or the unpickling of the experiment raised (the worker's
    traceback is on stderr), or the process was killed."""


def _run_in_pool(exp: Experiment, tasks: list[tuple[str, int]], runs: _Runs, jobs: int,
                 shared: tuple[dict[str, ProfileTable], Capacity, list[RepeatData]],
                 progress: _Progress, log: _Log) -> None:
    """Run ``tasks`` (policy, repeat) in ``jobs`` worker processes; each gets ``exp``,
    ``tables``, ``capacity`` and ``repeats`` once, as it starts (:func:`_init_worker`).
    :class:`WorkerStartError` as soon as a worker fails to start or dies."""
    tables, capacity, repeats = shared
    total = exp.duration_s * len(tasks)
    done = 0.0
    ctx = worker_context([__name__])
    pq = ctx.Queue()
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker,
                             initargs=(joulepool.__file__, exp, tables, capacity, repeats,
                                       pq)) as pool:
        try:
            pending: set[Future[tuple[str, int, RunResult]]] = set(
                submit_all(pool, _run_task, tasks))
            while pending:
                finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                try:
                    while True:
                        done += float(pq.get_nowait())
                        if progress:
                            progress(min(done, total), total)
                except queue.Empty:
                    pass
                for f in finished:
                    policy, r, res = f.result()
                    runs[policy][r] = res
                    if log:
                        log(f"{policy} (repeat {r}): "
                            f"{repeats[r].workload.requests / res.wall_s:,.0f} "
                            "simulated req/s")
        except BrokenProcessPool as exc:
            raise WorkerStartError(
                f"a simulator worker process failed to start or died ({exc}); its error, "
                "if it printed one, is above") from exc
        finally:  # on an error, start no more runs
            pool.shutdown(wait=True, cancel_futures=True)


def run_experiment(
    exp: Experiment,
    progress: Callable[[float, float], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> ExperimentResult:
    """Run everything; ``progress(done_sim_s, total_sim_s)`` is called as runs advance.

    With ``exp.jobs`` > 1 the runs go to worker processes that import the simulator
    afresh (``forkserver``, else ``spawn``; never a fork of this process) and get the
    experiment once each, pickled: a script calling this must guard its own entry point
    with ``if __name__ == "__main__":``, as workers import the main module. Workers take
    ``joulepool`` and the environment (variables, logging set-up) from when the fork
    server started (``PYTHONPATH``, the installed package), not from ``sys.path`` or
    ``os.environ`` edits made later in this process: a worker whose ``joulepool`` is
    not this process's stops the run (:class:`WorkerStartError`, the reason on stderr).
    """
    t0 = time.perf_counter()
    tables = model_tables(exp.cluster, exp.slos.tpot_s)
    cap = trace_capacity(exp.cluster, exp.trace, exp.slos, tables)
    mode, value, notes = resolve_rate(exp, cap)
    description = exp.cluster.describe() + notes
    repeats = _prepare_repeats(exp, mode, value, description)
    description.append(utilisation_note(repeats[0].workload, cap))
    tasks = [(p, r) for r in range(exp.repeat) for p in exp.policies]
    runs: _Runs = {p: [None] * exp.repeat for p in exp.policies}
    jobs = max(1, min(exp.jobs, len(tasks)))
    if jobs == 1:
        _run_in_process(exp, tasks, runs, (tables, cap, repeats), progress, log)
    else:
        _run_in_pool(exp, tasks, runs, jobs, (tables, cap, repeats), progress, log)
    final = {p: [x for x in v if x is not None] for p, v in runs.items()}
    return ExperimentResult(exp, tables, cap, repeats, final, description,
                            time.perf_counter() - t0)


def default_jobs() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, n)


def summarise_floor(floor: FloorResult) -> str:
    if not floor.feasible:
        return f"energy floor: none ({floor.status})"
    use = ", ".join(f"{k} {100 * v:.0f} %" for k, v in sorted(floor.usage.items()))
    relaxed = f"; SLO relaxed for {', '.join(floor.slo_relaxed)}" if floor.slo_relaxed else ""
    return (
        f"energy floor (LP): {megajoules_per_hour(floor.energy_j, floor.horizon_s):.1f} MJ/h, "
        f"{floor.joules_per_token:.3f} J/token, of which idle "
        f"{100 * floor.idle_j / floor.energy_j:.0f} %; GPU-time used: {use or 'none'}{relaxed}"
    )
