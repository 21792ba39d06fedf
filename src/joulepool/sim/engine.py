"""The event-driven cluster simulator.

Each serving instance (one model replica on ``gpus`` GPUs) runs continuous
batching as vLLM does by default:

* a request routed to an instance waits in its queue (FCFS or LLF);
* whenever fewer than ``max_batch`` requests are decoding, nothing is
  prefilling and the KV cache has room for the prompt, the next queued
  request is admitted and prefilled in chunks mixed into the decode steps
  (vLLM V1's chunked prefill under ``max_num_batched_tokens``): a step
  carries every decoding request's token and up to the rest of the budget
  in prompt tokens, and takes ``itl_s(batch) + chunk x prefill_s(1)``; the
  last chunk's step produces the first token (TTFT);
* decoding requests each gain one token per step;
* when the decoding requests' KV cache outgrows the instance's capacity
  (GPU memory x ``gpu_memory_utilization`` less the weights, over the
  model's KV bytes per token) the request admitted last is preempted and
  recomputed later (vLLM V1's default), its prompt and output so far
  prefilled again;
* a prompt at or over the model's context (cut to the KV capacity) is
  rejected, an output that would run past it is truncated;
* an instance the planner starts after t = 0 loads its model first
  (``core.profiles.startup``: weights / load bandwidth plus warm-up), holding
  its GPUs and drawing power while serving nothing.

All decoding requests of an instance advance at the same token rate, so the
instance keeps a *virtual token clock* V (tokens per request generated so
far) and each request's finishing value of V in a heap: a batch-size or
clock change re-times only the instance's next event, and per-request work
happens only at arrival, first token and completion. Power is piecewise
constant between events (``power_w(batch, clock)``, ``prefill_power_w``,
idle at batch 0) and integrated exactly; GPUs outside any instance draw idle
power. Every number comes from the tabulated core profiles
(:mod:`joulepool.sim.tables`).

Control runs on a 1 s tick: MIAD per instance, the PI controller for
JouleSched's lambda every ``pi_period_s``, samples of a few GPUs for the
plots. Energy is reported for the window [0, duration]; requests that
arrived in it are served to completion (up to ``drain_s`` longer) for the
latency figures.

:class:`Simulator` runs it, one handler per event kind; :func:`simulate` is the
entry point. How it is built and what a change must keep: docs/simulator.md.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from heapq import heappop, heappush
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from joulepool.core.batching import unqueued_first_token_s
from joulepool.core.bound import FloorResult
from joulepool.core.classes import CLASS_NAMES, Tier, default_deadline
from joulepool.core.controllers import (
    MIAD_TTFT_WINDOW_S,
    MIADController,
    PeriodLatencies,
    PIController,
    held_slo,
    miad_signal,
    prefill_clock_floor,
    prefill_floor_quantile,
)
from joulepool.core.cost import effective_lambda
from joulepool.core.llf import llf_deadline
from joulepool.core.profiles import (
    GPU_MEMORY_UTILIZATION,
    kv_capacity_tokens,
    max_model_len,
    startup,
)
from joulepool.core.router import PI_PERIOD_S
from joulepool.core.routing import (
    carbon_weights,
    credibility_at,
    gated_room,
    member_rooms,
    room_at_slot_load,
    slot_load,
    slot_load_bin,
    sustainable_batch,
    tpot_gate,
)
from joulepool.core.scoring import RequestInfo, routing_profile
from joulepool.sim.cluster import SimCluster
from joulepool.sim.instance import (
    ACTIVE,
    DRAINING,
    PENDING,
    RETIRED,
    STARTING,
    Instance,
    InstanceState,
    Pool,
)
from joulepool.sim.ledger import GPULedger, GPUSamples, SiteBuckets
from joulepool.sim.planning import WindowPlan
from joulepool.sim.policies import PolicySpec
from joulepool.sim.tables import ProfileTable
from joulepool.sim.workload import Workload

if TYPE_CHECKING:
    from joulepool.sim.production import ProductionRouter

FloatArray = npt.NDArray[np.float64]
INF = math.inf
NAN = math.nan

__all__ = [
    "EngineParams", "InstanceState", "Mark", "RunResult", "Simulator", "simulate",
    "static_deployment",
]


class Mark(IntEnum):
    """Scheduled points of the run besides arrivals, instance events and ticks.

    At equal times marks are handled in this order (they sort as (time, kind)).
    """

    CARBON_STEP = 0  #: close every site's energy bucket for the carbon step that ends
    PLAN_WINDOW = 1  #: apply the planner's next window
    WINDOW_END = 2  #: the measured window [0, duration] ends


@dataclass(frozen=True)
class EngineParams:
    tick_s: float = 1.0  # FREESH: MIAD every 1 s
    pi_period_s: float = PI_PERIOD_S
    miad_k_inc: float = MIADController.k_inc  # FREESH defaults (core.controllers)
    miad_step_mhz: float = MIADController.step_mhz
    miad_margin: float = MIADController.margin
    drain_s: float = 600.0
    sample_gpus: int = 4
    progress_every_s: float = 10.0
    pi_kp: float = PIController.kp
    pi_ki: float = PIController.ki
    pi_target: float = PIController.target
    pi_lam0: float = PIController.lam
    #: evaluate JouleSched's eps at each GPU's current clock instead of f_max: with MIAD
    #: the router then prefers the GPUs MIAD slowed down (a finding; off by default)
    eps_at_current_clock: bool = False
    #: keep RunResult.power_log and holder_log (for tests: an independent energy ledger)
    record_power: bool = False
    #: vLLM's max_num_batched_tokens (decode tokens + prompt chunk per step); None: vLLM
    #: V1's default for the GPU (core.profiles.default_batched_tokens)
    max_num_batched_tokens: int | None = None
    #: vLLM's gpu_memory_utilization: share of GPU memory for weights and KV cache
    gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION.value
    #: model the KV-cache capacity (admission, preemption) and the context bound
    kv_cache: bool = True
    #: instances the planner starts after t = 0 load their model first (time and energy)
    startup: bool = True
    #: MIAD's TPOT signal from the period's mean inter-token latency (the increments of
    #: the ITL histogram's sum and count, core.controllers.miad_signal, as the node agent
    #: reads them) instead of the step running at the tick, and (JouleSched) the
    #: first-token guard at MIAD's margin (1 - miad_margin) x TTFT; False: the step
    #: running at the tick and the guard at 1.0 x TTFT (docs/marginal-energy.md,
    #: "Where the joules go")
    miad_period_signal: bool = True
    #: seconds of first tokens MIAD's TTFT tail looks back over, the node agent's
    #: ``--window`` (core.controllers.MIAD_TTFT_WINDOW_S; up to one tick: the period)
    miad_ttft_window_s: float = MIAD_TTFT_WINDOW_S
    #: pool-level TTFT for JouleSched-routed pools (PolicySpec.pooled_ttft): the planner
    #: sizes them at the pool size its plan deploys (an M/G/n prefill queue,
    #: core.queueing; docs/planner.md, "Pool-level TTFT"), as the operator plans them;
    #: False: per instance (an M/G/1 prefill queue each)
    pool_ttft: bool = True
    #: JouleSched's room b*_n at its pool's size too (core.routing.sustainable_batch's
    #: pool_size), else per instance; off by default: measured, it packs requests until
    #: first tokens slip and strengthens the static joulesched baseline more than combined
    pool_room: bool = False

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if not self.miad_ttft_window_s >= 0.0:
            raise ValueError("miad_ttft_window_s must be >= 0")


@dataclass
class RunResult:
    """Raw outcome of one run; :mod:`joulepool.sim.report` turns it into metrics."""

    policy: str
    seed: int
    duration_s: float
    # energy in the window, J
    gpu_energy_j: FloatArray  # per GPU
    gpu_site: tuple[str, ...]
    gpu_product: tuple[str, ...]
    gpu_busy_s: FloatArray  # per GPU: time its instance was prefilling or decoding
    site_energy_j: dict[str, FloatArray]  # per site, per carbon step
    carbon_g: float
    #: per request, output tokens generated inside the window
    window_output_tokens: FloatArray
    # per request
    t_first: FloatArray  # NaN: never got a token (rejected, dropped or unfinished)
    t_done: FloatArray
    instance_product: npt.NDArray[np.int64]  # index into products, -1 = never served
    products: tuple[str, ...]
    # controls and samples
    little_l: float  # time-average requests in the system over the window
    lam_series: list[tuple[float, float]] = field(default_factory=list)
    #: per site, gCO2 of each carbon step (its energy at the site's intensity then);
    #: step k starts at ``carbon_step_starts_s[k]``
    site_carbon_g: dict[str, FloatArray] = field(default_factory=dict)
    carbon_step_starts_s: FloatArray = field(default_factory=lambda: np.zeros(0))
    samples_t: FloatArray = field(default_factory=lambda: np.zeros(0))
    samples_clock: dict[str, FloatArray] = field(default_factory=dict)
    samples_power: dict[str, FloatArray] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: engine outcomes: prompts rejected over the context, outputs truncated to it,
    #: preemptions (KV cache full), instances started with a model load
    rejected: int = 0
    truncated: int = 0
    preemptions: int = 0
    startups: int = 0
    wall_s: float = 0.0
    events: int = 0
    #: with EngineParams.record_power: (t, instance, W) each time an instance's draw is
    #: set (its GPUs share it equally), and (t, GPU, instance or -1 for none) each time a
    #: GPU changes hands; a free GPU draws its product's idle power
    power_log: list[tuple[float, int, float]] | None = None
    holder_log: list[tuple[float, int, int]] | None = None
    #: the energy floor of the work done inside the window (set by the experiment
    #: runner, :func:`joulepool.sim.runner.window_work_floor`); None: not computed
    work_floor: FloorResult | None = None

    @property
    def energy_j(self) -> float:
        return float(self.gpu_energy_j.sum())

    @property
    def tokens_in_window(self) -> float:
        """Output tokens generated inside the window, all requests together."""
        return float(self.window_output_tokens.sum())


def static_deployment(
    cluster: SimCluster, tables: dict[str, ProfileTable]
) -> list[tuple[str, str, int]]:
    """(node, mode, count) for the non-planner policies: every node filled with its static mode."""
    out = []
    for n in cluster.nodes:
        g = cluster.static_modes.get(n.product)
        mode = f"{g}x{n.product}"
        if g is None or mode not in tables or n.gpus < g:
            continue
        out.append((n.name, mode, n.gpus // g))
    return out




_NOTHING: tuple[int, ...] = ()


class _Requests:
    """The workload as per-request Python lists (the event loop indexes them by id),
    and what happened to each request (NaN / -1 until it does)."""

    __slots__ = (
        "arrival", "bulk", "cls", "deadline", "input", "llf_deadline", "n", "output",
        "pf_len", "predicted", "produced", "route_deadline", "t_done", "t_first", "tpot_slo",
        "ttft_slo", "where",
    )

    def __init__(self, workload: Workload, llf: bool) -> None:
        self.arrival: list[float] = workload.arrival_s.tolist()  # s
        self.input: list[float] = workload.input_tokens.tolist()
        self.output: list[float] = workload.output_tokens.tolist()
        self.pf_len: list[float] = list(self.input)  # tokens to prefill (+ output on recompute)
        self.produced = [0.0] * len(self.input)  # output tokens before a preemption
        self.predicted: list[float] = workload.predicted_tokens.tolist()
        self.ttft_slo: list[float] = workload.ttft_slo_s.tolist()
        self.tpot_slo: list[float] = workload.tpot_slo_s.tolist()
        self.deadline: list[float] = workload.deadline_s.tolist()  # s after arrival
        # the router's deadline is core's default one, from the predicted response length
        self.route_deadline: list[float] = default_deadline(
            workload.predicted_tokens, workload.ttft_slo_s, workload.tpot_slo_s
        ).tolist()
        self.bulk: list[bool] = workload.bulk.tolist()
        self.cls: list[int] = workload.cls.tolist()
        self.llf_deadline = [
            llf_deadline(a, f, p, 1.0 / s)
            for a, f, p, s in zip(self.arrival, self.ttft_slo, self.predicted, self.tpot_slo,
                                  strict=True)
        ] if llf else []
        self.n = n = len(self.arrival)
        self.t_first = [NAN] * n  # s, first token
        self.t_done = [NAN] * n  # s, last token
        self.where = [-1] * n  # instance that served it


#: what least-loaded and round-robin are told about a request (they read no field of it)
_NO_REQUEST = RequestInfo(0.0, 0.0, 0.0, INF, 0.0)


class Simulator:
    """One run of a policy on a workload: the event loop and one handler per event kind.

    Events, earliest first (at equal times: mark, tick, arrival, instance event):

    * a :class:`Mark` (carbon step, plan window, window end): :meth:`_on_mark`;
    * the control tick every ``tick_s`` (MIAD, PI, the production router's
      housekeeping, plot samples): :meth:`_on_tick` (marks and ticks are both
      dispatched by :meth:`_on_control`);
    * a request's arrival: :meth:`_on_arrival` (routing in :meth:`_pick_instance`);
    * an instance's next event, a prefill's end or decode completions:
      :meth:`_on_instance_event`.

    Single use: build it, call :meth:`run` once.
    """

    __slots__ = (
        "T",
        "carbon_t",
        "class_sets",
        "class_ttfts",
        "clock_floors",
        "cluster",
        "controllers",
        "done",
        "dropped",
        "ended",
        "events",
        "evq",
        "fallback_routes",
        "floor_prompts",
        "gpus",
        "guard_keep",
        "hlog",
        "instances",
        "lam_for_pi",
        "lam_series",
        "lam_tier",
        "limits",
        "little_area",
        "llf",
        "load_columns",
        "mark_i",
        "marks",
        "miad_next",
        "mix_rooms",
        "n_pools",
        "n_sys",
        "next_control",
        "next_mark",
        "next_rid",
        "next_tick",
        "notes",
        "period_done",
        "period_miss",
        "pi",
        "pi_every",
        "plan_capacity",
        "plan_queue",
        "planner_pools",
        "plog",
        "policy",
        "pool_mix",
        "pool_requests",
        "pool_sizes",
        "pools",
        "preemptions",
        "prm",
        "prog_every",
        "progress",
        "prouter",
        "rejected",
        "req",
        "samples",
        "seed",
        "site_buckets",
        "slo_batches",
        "startups",
        "static_capacity",
        "stop_at",
        "t_sys",
        "tables",
        "tick_k",
        "tightest_slos",
        "tpot_gates",
        "truncated",
        "ttft_periods",
        "unroutable",
        "use_js",
        "use_miad",
        "wall0",
        "window_busy",
        "window_gpu_energy",
        "window_outputs",
        "workload",
    )

    def __init__(
        self,
        cluster: SimCluster,
        workload: Workload,
        policy: PolicySpec,
        tables: dict[str, ProfileTable],
        plans: Sequence[WindowPlan] | None = None,
        params: EngineParams | None = None,
        seed: int = 0,
        progress: Callable[[float], None] | None = None,
        static_capacity_rps: dict[str, float] | None = None,
    ) -> None:
        self.wall0 = time.perf_counter()
        self.prm = prm = params or EngineParams()
        if policy.uses_planner and not plans:
            raise ValueError(f"policy {policy.name} needs planner windows")
        use_router = policy.routing == "joulesched-router"
        if use_router and policy.uses_planner:
            raise ValueError("joulesched-router drives one production router pool: static only")
        self.cluster, self.workload, self.policy = cluster, workload, policy
        # X(b) at the clock each batch needs, for this run's MIAD margin
        self.tables = {m: t.with_miad_margin(prm.miad_margin) for m, t in tables.items()}
        self.slo_batches: dict[tuple[str, int, bool, int], int] = {}
        #: (mode, class, slot-load bin, pool rooms) -> (b*_n, TPOT batch) at that credible
        #: slot load
        self.mix_rooms: dict[tuple[str, int, int, tuple[int, int]], tuple[int, int]] = {}
        #: (mode, class, mean TPOT batch) -> core.routing.tpot_gate (:meth:`_tpot_gate`)
        self.tpot_gates: dict[tuple[str, int, int], int] = {}
        #: (mode, class) -> instances in that pool, for a router that sends prompts where
        #: they start soonest (their prefills one M/G/n queue: core.routing's b*_n);
        #: empty for the others (each instance sized alone)
        self.pool_sizes: dict[tuple[str, int], int] = {}
        #: class -> (slot load, mean predicted response) of the requests its pool serves
        self.pool_mix: dict[int, tuple[float, float]] = {}
        #: class -> (:meth:`_pool_requests`, the part whose SLOs size its rooms)
        self.pool_requests: dict[int, tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]] = {}
        #: class -> its tightest TTFT SLO as the router reads it (:meth:`_class_ttft`)
        self.class_ttfts: dict[int, float] = {}
        self.seed, self.progress = seed, progress
        self.T = workload.duration_s
        self.llf = policy.queue == "llf"
        self.planner_pools = policy.uses_planner
        self.use_js = policy.routing == "joulesched"
        self.use_miad = policy.clock == "miad"
        self.notes: list[str] = []
        self.req = _Requests(workload, self.llf)
        self.gpus = GPULedger(cluster)
        self.instances: list[Instance] = []
        self.n_pools = len(CLASS_NAMES) if self.planner_pools else 1
        #: the request classes an instance serves, by its ``cls``: the single classes
        #: first, then each set of classes the planner lets share an instance
        self.class_sets: list[tuple[int, ...]] = [(c,) for c in range(len(CLASS_NAMES))]
        routing = "joulesched" if use_router else policy.routing
        self.pools: list[Pool] = [Pool([], routing_profile(routing), self.use_js)
                                  for _ in range(self.n_pools)]
        #: whether routing reads the pools' load columns (round-robin's picker does not)
        self.load_columns = self.pools[0].profile.picker.reads_scores
        self.evq: list[tuple[float, int, int]] = []  # (t, instance, instance version)
        self.controllers = self._miad_controllers()
        #: (mode, clock index, at risk) -> the clock MIAD steps to (before the floor)
        self.miad_next: dict[tuple[str, int, bool], float] = {}
        self.clock_floors: dict[tuple[str, int, int], float] = {}
        self.floor_prompts: dict[int, tuple[float, float]] = {}
        #: (class, sizing) -> (TTFT, TPOT) s, the tightest SLO of its requests
        #: (:meth:`_tightest_slo`)
        self.tightest_slos: dict[tuple[int, bool], tuple[float, float]] = {}
        #: MIAD periods its TTFT tail looks back over (this one included)
        self.ttft_periods = max(1, round(self.prm.miad_ttft_window_s / self.prm.tick_s))
        self.pi = PIController(kp=prm.pi_kp, ki=prm.pi_ki, target=prm.pi_target,
                               lam=prm.pi_lam0)
        self.lam_series: list[tuple[float, float]] = [(0.0, self.pi.lam)] if self.use_js else []
        self.prouter: ProductionRouter | None = None
        self.plog: list[tuple[float, int, float]] | None = [] if prm.record_power else None
        self.hlog: list[tuple[float, int, int]] | None = [] if prm.record_power else None
        self.plan_capacity: dict[str, tuple[float, ...]] = {}
        self.static_capacity = dict(static_capacity_rps or {})
        self.limits = self._engine_limits()
        #: start of the carbon step in force (s): JouleSched weighs marginal energy by the
        #: sites' intensities then, on a carbon-objective cluster (_weigh_carbon)
        self.carbon_t = 0.0
        self._init_counters()
        self.plan_queue = self._deploy(plans)
        if use_router:
            self._start_router()
        unused = sum(1 for h in self.gpus.holder if h is None)
        if unused:
            self.notes.append(f"{unused} of {self.gpus.n} GPUs hold no instance at t=0 and "
                              "draw idle power")
        self.samples = GPUSamples(self.gpus, prm.sample_gpus)
        self.site_buckets = SiteBuckets(cluster.sites)
        self.marks = self._marks()
        self.mark_i = 0
        self.next_mark = self.marks[0][0]
        self.next_control = min(self.next_mark, self.next_tick)  # next mark or tick

    def _init_counters(self) -> None:
        prm = self.prm
        self.next_rid = 0  # next request to arrive
        self.done = 0  # requests finished (or dropped)
        self.events = 0  # instance events handled
        self.period_done = 0  # completions since the last PI step
        self.period_miss = 0  # of which past their deadline
        self.fallback_routes = 0
        self.dropped = 0
        self.unroutable = 0  # requests no endpoint of their pool could serve (refused)
        self.rejected = 0  # prompts at or over the context
        self.truncated = 0  # outputs cut at the context
        self.preemptions = 0
        self.startups = 0
        #: share of each TTFT SLO the routing guard fills: with MIAD, its margin is left
        #: free, or the router packs first tokens into the band where MIAD raises clocks
        self.guard_keep = (1.0 - self.prm.miad_margin
                           if self.use_miad and self.prm.miad_period_signal else 1.0)
        self.lam_for_pi = NAN  # the PI lambda lam_tier was computed for
        self.lam_tier = (0.0, 0.0)  # effective lambda (interactive, bulk)
        self.little_area = 0.0  # integral of requests in the system over the window
        self.n_sys = 0  # requests in the system
        self.t_sys = 0.0  # when n_sys last changed (within the window)
        self.window_outputs = np.zeros(self.req.n)
        self.window_gpu_energy: list[float] = []
        self.window_busy: list[float] = []
        self.ended = False  # the measured window is over; draining
        self.stop_at = self.T + prm.drain_s
        self.tick_k = 1
        self.next_tick = prm.tick_s
        self.pi_every = max(1, round(prm.pi_period_s / prm.tick_s))
        self.prog_every = max(1, round(prm.progress_every_s / prm.tick_s))

    # ------------------------------------------------------------------ setup
    def _engine_limits(self) -> dict[str, tuple[int | None, float, float, tuple[float, float]]]:
        """Per mode: (token budget per step, KV-cache tokens, longest sequence, start-up
        (s, W)) from core's engine model and the run's EngineParams."""
        prm = self.prm
        out = {}
        for mode, tab in self.tables.items():
            kv = (kv_capacity_tokens(tab.profile, prm.gpu_memory_utilization)
                  if prm.kv_cache else INF)
            max_len = max_model_len(tab.profile, kv) if prm.kv_cache else INF
            out[mode] = (prm.max_num_batched_tokens, kv, max_len, startup(tab.profile))
            if kv <= 0.0:
                self.notes.append(f"{mode}: the weights of {tab.profile.model} do not fit in "
                                  f"{prm.gpu_memory_utilization:g} of its GPU memory: it "
                                  "serves nothing")
        return out

    def _miad_controllers(self) -> dict[str, MIADController]:
        if not self.use_miad:
            return {}
        prm = self.prm
        # tails are fed as fractions of each request's own SLO, so targets are 1.0
        return {
            mode: MIADController(
                supported_mhz=tab.clocks, ttft_target_s=1.0, tpot_target_s=1.0,
                k_inc=prm.miad_k_inc, step_mhz=prm.miad_step_mhz, margin=prm.miad_margin,
            )
            for mode, tab in self.tables.items()
        }

    def _deploy(self, plans: Sequence[WindowPlan] | None) -> list[WindowPlan]:
        """Instances at t = 0: the first plan window's, or the static deployment.
        Returns the plan windows still to come, by start time."""
        if self.planner_pools:
            assert plans is not None
            queue = sorted(plans, key=lambda p: p.start_s)
            first = queue.pop(0)
            self._apply_plan(first, 0.0)
            self.notes.append(first.describe())
            return queue
        static = static_deployment(self.cluster, self.tables)
        self._set_pool_sizes((mode, 0) for _, mode, count in static for _ in range(count))
        for node, mode, count in static:
            for _ in range(count):
                self._new_instance(node, mode, 0, 0.0)
        self._rebuild_pools()
        return []

    def _start_router(self) -> None:
        """The routing service's state machine itself, over the static instances."""
        from joulepool.sim.production import ProductionRouter

        wl, n = self.workload, self.req.n
        # one pool, of every class; the router sizes at the interactive SLOs (pool 0's
        # tightest is every request's: joulesched-router runs no planner pools, __init__)
        ttft_s, tpot_s = self._tightest_slo(0, sizing=True) if n else (1.0, 0.15)
        self.prouter = ProductionRouter(
            [(x.idx, x.node, x.table.profile) for x in self.pools[0].members],
            ttft_s=ttft_s, tpot_s=tpot_s,
            mean_tokens=(float(wl.input_tokens.mean()), float(wl.predicted_tokens.mean()))
            if n else None,
            sites=[x.site for x in self.pools[0].members],
            clock_follows_load=self.use_miad,
            miad_margin=self.prm.miad_margin,
            pool_room=self.prm.pool_room,
        )
        self._router_carbon()
        self.lam_series.append((0.0, self.prouter.lam))
        self.notes.append("the production request router "
                          "(core.router.PoolRouter, default settings) routed every request")

    def _marks(self) -> list[tuple[float, Mark]]:
        T, step = self.T, self.cluster.carbon_step_s
        marks = [(k * step, Mark.CARBON_STEP) for k in range(1, math.ceil(T / step))
                 if k * step < T]
        marks += [(p.start_s, Mark.PLAN_WINDOW) for p in self.plan_queue if p.start_s < T]
        marks.append((T, Mark.WINDOW_END))
        marks.sort()
        return marks

    # ------------------------------------------------------------------- loop
    def run(self) -> RunResult:
        """Run to the end of the drain and return the raw outcome."""
        arrival, n, evq, instances = self.req.arrival, self.req.n, self.evq, self.instances
        on_arrival, on_instance_event = self._on_arrival, self._on_instance_event
        while True:
            i = self.next_rid
            ta = arrival[i] if i < n else INF
            te = evq[0][0] if evq else INF
            tc = self.next_control
            if tc <= ta and tc <= te:
                if self._on_control():
                    break
            elif ta <= te:
                on_arrival(i, ta)
            else:  # instance events, up to the next arrival or control point
                until = ta if ta < tc else tc
                while True:
                    _, idx, version = heappop(evq)
                    inst = instances[idx]
                    # an event is stale once its instance was re-timed (version bumped)
                    if version == inst.version and on_instance_event(inst, te):
                        return self._result()
                    te = evq[0][0] if evq else INF
                    if not te < until:  # (arrivals, then instance events at equal times)
                        break
        return self._result()

    def _on_control(self) -> bool:
        """The next mark or tick (a mark first at equal times); True when the run is over."""
        if self.next_mark <= self.next_tick:
            over = self._on_mark()
        else:
            over = self._on_tick(self.next_tick)
        self.next_control = min(self.next_mark, self.next_tick)
        return over

    # ------------------------------------------------------------------ marks
    def _on_mark(self) -> bool:
        """Handle the next mark; True when the run is over."""
        tm, kind = self.marks[self.mark_i]
        self.mark_i += 1
        self.next_mark = self.marks[self.mark_i][0] if self.mark_i < len(self.marks) else INF
        if kind == Mark.CARBON_STEP:
            self.site_buckets.close(tm, self.gpus)
            self.carbon_t = tm
            self._router_carbon()
            if self._weigh_pools_carbon():
                for pool in self.pools:
                    for inst in pool.members:
                        if inst.state == ACTIVE and inst.pos >= 0:
                            pool.set_rule(inst)
        elif kind == Mark.PLAN_WINDOW:
            self._on_plan_window(tm)
        else:
            return self._on_window_end(tm)
        return False

    def _on_plan_window(self, t: float) -> None:
        plan = self.plan_queue.pop(0)
        self._apply_plan(plan, t)
        self.notes.append(plan.describe())

    def _on_window_end(self, t: float) -> bool:
        """Freeze the window's energy, busy time, Little's integral and tokens."""
        gpus = self.gpus
        self.site_buckets.close(t, gpus)
        self.window_gpu_energy = [gpus.cumulative_j(g, t) for g in range(gpus.n)]
        self.window_busy = [gpus.busy_s(g) for g in range(gpus.n)]
        self.little_area += self.n_sys * (t - self.t_sys)
        self.t_sys = t
        self.window_outputs = self._outputs_by(t)
        self.ended = True
        return self.done == self.req.n

    def _outputs_by(self, t: float) -> FloatArray:
        """Output tokens each request generated by ``t``: all of a finished request's,
        a decoding one's so far, none of any other's."""
        req = self.req
        tokens = np.zeros(req.n)
        for rid in range(self.next_rid):
            if req.t_done[rid] <= t:
                tokens[rid] = req.output[rid]
        for inst in self.instances:
            if inst.state in (ACTIVE, DRAINING):
                for fv, rid in inst.heap:
                    tokens[rid] = req.output[rid] - max(fv - inst.V, 0.0)
        return tokens

    # ------------------------------------------------------------------- tick
    def _on_tick(self, t: float) -> bool:
        """The control tick at ``t``; True when the run is over (drained or out of time)."""
        n = self.req.n
        if self.ended and (self.done == n or t > self.stop_at
                           or (not self.evq and self.next_rid >= n)):
            return True
        if self.use_miad:
            self._miad_step(t)
        if self.use_js and self.tick_k % self.pi_every == 0:
            self._pi_step(t)
        if self.prouter is not None:
            self.prouter.tick(t, self._engine_counts)
            if self.tick_k % self.pi_every == 0:
                self.lam_series.append((t, self.prouter.lam))
        if t <= self.T:
            self.samples.take(t, self.prm.tick_s, self.gpus)
        if self.progress is not None and self.tick_k % self.prog_every == 0:
            self.progress(min(t, self.T))
        self.tick_k += 1
        self.next_tick = self.tick_k * self.prm.tick_s
        return False

    def _miad_step(self, t: float) -> None:
        """MIAD on every instance with GPUs, from what its engine's metrics would show
        over the period (:meth:`_period_latencies`), turned into MIAD's signal by
        ``core.controllers.miad_signal``, the node agent's function; the clock is held at
        or above the instance's prefill floor."""
        for inst in self.instances:
            if inst.state != ACTIVE and inst.state != DRAINING:
                continue
            tab = inst.table
            ctrl = self.controllers[tab.mode]
            risk = ctrl.at_risk(miad_signal(self._period_latencies(inst, t)))
            inst.tt_max = -1.0
            cur = tab.clocks[inst.ci]
            key = (tab.mode, inst.ci, risk)
            nxt = self.miad_next.get(key)
            if nxt is None:  # MIADController.step's answer: a function of these alone
                nxt = self.miad_next[key] = ctrl.next_clock(cur, risk)[0]
            floor = self._clock_floor(inst)
            if nxt < floor:
                nxt = floor
            if nxt != cur:
                inst.change_clock(tab.clock_index(nxt), t, self.evq)
                if inst.state == ACTIVE and inst.pos >= 0:
                    for p in self._pools_of(inst):
                        self.pools[p].set_rule(inst)

    def _period_latencies(self, inst: Instance, t: float) -> PeriodLatencies:
        """What ``inst``'s engine metrics would show since the last MIAD step, in
        fractions of the SLO (MIAD's targets are 1.0): the increments of its
        inter-token-latency histogram's sum and count (:meth:`Instance.period_itl`) over
        the TPOT it is held to (:meth:`_held_tpot_s`), as the node agent divides by its
        pod's pools'; the worst first
        token over each request's own TTFT SLO (:meth:`_ttft_tail`); the waiting queue;
        the period over the SLO when requests ran at both of its ends and no gap
        completed (``stalled``, as the node agent reads its running gauge). Without
        ``EngineParams.miad_period_signal`` the ITL side is the step running at the tick
        (one gap), the tail of a short ITL window."""
        tpot_slo = self._held_tpot_s(inst.cls)
        ttft = self._ttft_tail(inst)
        running = inst.b + (inst.prefill_rid >= 0)  # vLLM's gauge (_engine_counts)
        ran_before, inst.miad_running = inst.miad_running, running
        if tpot_slo <= 0.0:
            return PeriodLatencies(ttft_tail=ttft, waiting=inst.nwait)
        if self.prm.miad_period_signal:
            itl_sum, itl_count = inst.period_itl(t)
        elif inst.b:
            itl_sum, itl_count = inst.itl, 1.0
        else:
            itl_sum, itl_count = 0.0, 0.0
        stalled = (self.prm.tick_s / tpot_slo
                   if itl_count == 0.0 and running and ran_before else 0.0)
        return PeriodLatencies(itl_sum=itl_sum / tpot_slo, itl_count=itl_count, ttft_tail=ttft,
                               waiting=inst.nwait, stalled=stalled)

    def _held_tpot_s(self, cls: int) -> float:
        """s: the TPOT MIAD holds an instance serving ``cls`` to, that of
        :meth:`_tightest_slo` over all its requests; 0 without requests."""
        tpot = self._tightest_slo(cls)[1]
        return tpot if tpot < math.inf else 0.0

    def _tightest_slo(self, cls: int, sizing: bool = False) -> tuple[float, float]:
        """(TTFT, TPOT) s, core.controllers.held_slo (the tightest) over the SLOs of the
        requests an instance serving ``cls`` gets (:meth:`_pool_slo_requests`: its
        classes', every class's without planner pools); (inf, inf) without requests.

        Without ``sizing``, over all of them, bulk ones too: what MIAD holds the
        instance's step time (:meth:`_held_tpot_s`) and its clock floor
        (:meth:`_floor_prompt`) to, as the node agent holds a pod to every pool it
        serves (``PlanDocument.held_slo``). With ``sizing``, over the interactive ones
        (all when none is): the TPOT its rooms are sized at, as the routing service
        sizes a shared pod at its pools' interactive SLOs (a bulk guest's tighter TPOT
        does not shrink them). Cached per (``cls``, ``sizing``)."""
        key = (cls, sizing)
        hit = self.tightest_slos.get(key)
        if hit is None:
            wl = self.workload
            mine, interactive = self._pool_slo_requests(cls)
            of = interactive if sizing else mine
            held = held_slo([(float(wl.ttft_slo_s[of].min()), float(wl.tpot_slo_s[of].min()))]
                            if of.any() else [])
            hit = self.tightest_slos[key] = held if held is not None else (math.inf, math.inf)
        return hit

    def _ttft_tail(self, inst: Instance) -> float | None:
        """The worst first token / TTFT SLO of ``inst`` over the last
        ``EngineParams.miad_ttft_window_s`` (this period's and the periods' before it in
        the window; None when there was none), as the node agent reads the engine's TTFT
        histogram over its ``--window``."""
        if self.ttft_periods == 1:
            return inst.tt_max if inst.tt_max >= 0.0 else None
        ring = inst.tt_ring
        if ring is None:
            ring = inst.tt_ring = deque(maxlen=self.ttft_periods)
        ring.append(inst.tt_max)
        worst = max(ring)
        return worst if worst >= 0.0 else None

    def _pi_step(self, t: float) -> None:
        """JouleSched's PI lambda from the deadline-miss ratio of the period's completions."""
        if self.period_done:
            self.pi.update(self.period_miss / self.period_done)
            self.lam_series.append((t, self.pi.lam))
        self.period_done = 0
        self.period_miss = 0

    def _engine_counts(self, idx: int) -> tuple[float, float]:
        """(waiting, running) of instance ``idx`` as vLLM's metrics count them."""
        x = self.instances[idx]  # vLLM counts a prefilling request as running
        return float(x.nwait), float(x.b + (x.prefill_rid >= 0))

    # ---------------------------------------------------------------- arrival
    def _on_arrival(self, rid: int, t: float) -> None:
        """Request ``rid`` arrives at ``t``: route it, queue it, admit it if there is room."""
        self.next_rid = rid + 1
        inst = self._pick_instance(rid, t)
        if inst is None:
            return
        if t <= self.T:
            self.little_area += self.n_sys * (t - self.t_sys)
            self.t_sys = t
        self.n_sys += 1
        req = self.req
        req.where[rid] = inst.idx
        if req.input[rid] + 1.0 > inst.max_len:  # vLLM answers 400: prompt over the context
            self._reject(rid, t)
            return
        if req.input[rid] + req.output[rid] > inst.max_len:  # finish_reason "length"
            req.output[rid] = inst.max_len - req.input[rid]
            self.truncated += 1
        if self.llf:
            inst.enqueue(rid, req.input[rid], req.predicted[rid], req.llf_deadline[rid],
                         req.arrival[rid] + req.ttft_slo[rid])
        else:
            inst.enqueue(rid, req.input[rid], req.predicted[rid], 0.0)
        if self.use_js:
            inst.extend_busy(t, req.predicted[rid] - 1.0)  # the first comes with the prefill
        if inst.admit_next(t, req.pf_len):
            inst.retime(t, self.evq)
        if self.load_columns:
            self._sync(inst, t)

    def _reject(self, rid: int, t: float) -> None:
        """The engine rejects request ``rid`` at ``t`` (its prompt is over the context):
        never served, counted as missed; it leaves the system at once (Little's count),
        and the core router forgets it as the proxy does on the engine's 400."""
        self.rejected += 1
        self.done += 1
        self.period_done += 1
        self.period_miss += 1
        if t <= self.T:
            self.little_area += self.n_sys * (t - self.t_sys)
            self.t_sys = t
        self.n_sys -= 1
        if self.prouter is not None:
            self.prouter.release(rid)

    def _pick_instance(self, rid: int, t: float) -> Instance | None:
        """The instance the policy routes request ``rid`` to; None when nothing serves it:
        no instance runs at all (dropped), or no endpoint of its pool can (the routing
        profile ranks none: every cost NaN or infinite), which the router refuses
        (core.router's NoEndpoints) and this counts as refused."""
        req = self.req
        pool = self.pools[req.cls[rid] if self.planner_pools else 0]
        members = pool.members
        if not members:
            return self._fallback_instance()
        if self.prouter is not None:
            return self.instances[self.prouter.route(
                rid, req.input[rid], req.predicted[rid], req.route_deadline[rid],
                req.bulk[rid], t)]
        # core.scoring's profile, as the routing service picks
        if self.use_js:
            if self.lam_for_pi != self.pi.lam:  # tiers: bulk weighs lateness less (core)
                lam = self.lam_for_pi = self.pi.lam
                self.lam_tier = (effective_lambda(lam, Tier.INTERACTIVE),
                                 effective_lambda(lam, Tier.BULK))
            info = RequestInfo(req.predicted[rid], req.input[rid], req.predicted[rid],
                               req.route_deadline[rid], self.lam_tier[req.bulk[rid]],
                               False, req.ttft_slo[rid] * self.guard_keep)
            if pool.index is not None:  # the rule's choice from a few candidates
                best = pool.index.best(info, pool.endpoints)
                if best is not None:
                    return members[best]
        else:
            info = _NO_REQUEST
        ranked = pool.profile.pick(info, pool.state)[0]
        if not ranked:  # never served: counted as missed, as a dropped request
            self.unroutable += 1
            self.done += 1
            return None
        return members[ranked[0]]

    def _fallback_instance(self) -> Instance | None:
        """No instance planned for the request's class right now: least-loaded over all."""
        live = [x for x in self.instances if x.state == ACTIVE]
        if not live:
            self.dropped += 1  # nothing runs at all: never served, counted as missed
            self.done += 1
            return None
        self.fallback_routes += 1
        return min(live, key=lambda x: ((x.n_out + 1) * x.inv_cap, x.idx))

    def _sync(self, inst: Instance, t: float) -> None:
        """Refresh ``inst``'s routing columns after its load changed."""
        if inst.state != ACTIVE or inst.pos < 0:
            return
        if not self.use_js:
            self.pools[inst.pool].sync_load(inst)
            if inst.cls >= self.n_pools:  # a shared instance: its guest pools' too
                for p in self.class_sets[inst.cls][1:]:
                    self.pools[p].sync_load(inst)
            return
        pool = self.pools[inst.pool]
        n_out = inst.n_out
        mixed = n_out != inst.mix_n
        if mixed:
            # its requests changed: its terms of its home pool's slot-load sums, and its
            # rooms at the slot load it is now credited with. eps_n stays at the pool's
            # b*_n: the engine does not stop a batch at b*_n, so what joining costs
            # follows the pool's sizing; the room says whether the member keeps the SLO
            # with one more
            inst.mix_n = n_out
            epv, vhm = pool.note_mix(inst)  # (Pool.credibility written out)
            inst.room, inst.tpot_batch = self._member_rooms(
                inst, credibility_at(n_out, epv, vhm))
        row = inst.row(t)
        pool.put(inst, row)
        if inst.cls >= self.n_pools:  # a shared instance: its rows in its guest pools too
            for p in self.class_sets[inst.cls][1:]:
                guest = self.pools[p]
                if mixed:  # (its rooms: its home pool's spread, above)
                    guest.note_mix(inst)
                guest.put(inst, row)

    def _pools_of(self, inst: Instance) -> tuple[int, ...]:
        """The pools ``inst`` is a member of: its home pool, then those it is a guest in."""
        return self.class_sets[inst.cls] if self.planner_pools else (inst.pool,)

    def _class_set(self, classes: Sequence[int]) -> int:
        """The ``cls`` of an instance serving ``classes`` (the first is its home pool)."""
        key = tuple(classes)
        if len(key) == 1:
            return key[0]
        if key not in self.class_sets:
            self.class_sets.append(key)
        return self.class_sets.index(key)

    # --------------------------------------------------------- instance event
    def _on_instance_event(self, inst: Instance, t: float) -> bool:
        """``inst``'s next event is due at ``t``: decoding requests finish, its prefill's
        last chunk is done (first token), or its KV cache is full (preemption); or it has
        loaded its model. Then admit the next waiting request if there is room.
        True when the run is over."""
        self.events += 1
        inst.settle(t)
        if inst.state == STARTING:
            self._started(inst, t)
            return False
        completed: Sequence[int] = _NOTHING
        prefilled = inst.prefill_rid >= 0 and inst.prefill_end <= t  # a first token now
        if inst.b and inst.dec_end <= t:  # before a first token can join the heap
            completed = inst.pop_finished()
            if prefilled:
                completed += self._first_token(inst, t)
            self._complete(inst, completed, t)
        elif prefilled:
            completed = self._first_token(inst, t)
            if completed:
                self._complete(inst, completed, t)
        preempted = inst.kv_end <= t and self._preempt(inst, t)
        # no admission in a step that preempted (vLLM V1's scheduler)
        admitted = not preempted and inst.nwait > 0 and inst.admit_next(t, self.req.pf_len)
        inst.retime(t, self.evq)
        if (completed or admitted or preempted or prefilled) and self.load_columns:
            # admission moves a prompt out of q_n's prefill term; a finished prefill
            # frees the prefill slot (the routing guard's predicted wait drops to 0)
            self._sync(inst, t)
        if completed and inst.state == DRAINING and inst.n_out == 0 and inst.prefill_rid < 0:
            self._release(inst, t)
        return self.ended and self.done == self.req.n

    def _started(self, inst: Instance, t: float) -> None:
        """``inst`` has loaded its model at ``t``: it serves from now on."""
        inst.state = ACTIVE
        inst.retime(t, self.evq)  # idle draw
        self._rebuild_pools()

    def _preempt(self, inst: Instance, t: float) -> bool:
        """``inst``'s KV cache is full at ``t``: preempt the requests admitted last (the
        prefilling one first) until the next step fits; they wait at the head of the
        queue to be recomputed (prompt and output so far prefilled again)."""
        req = self.req
        n = 0
        while inst.kv_fixed + inst.b * (inst.V + 1.0) > inst.kv_full and (
                inst.b > 1 or inst.prefill_rid >= 0):
            if inst.prefill_rid >= 0:
                rid = inst.drop_prefill()
            else:
                rid = inst.latest_decoding()
                req.produced[rid] += 1.0 + inst.drop_decoding(rid, req.pf_len[rid])
                req.pf_len[rid] = req.input[rid] + req.produced[rid]
            first_by = req.arrival[rid] + req.ttft_slo[rid] if req.t_first[rid] != req.t_first[
                rid] else INF  # NaN: no first token yet
            inst.requeue(rid, req.pf_len[rid], req.llf_deadline[rid] if self.llf else 0.0,
                         req.predicted[rid] - req.produced[rid], first_by)
            n += 1
        self.preemptions += n
        return n > 0

    def _first_token(self, inst: Instance, t: float) -> Sequence[int]:
        """The prefill's last chunk is done at ``t``: a token (the first, unless the
        request was preempted and recomputed); the request joins the decode batch (or is
        done). Returns the requests completed."""
        req = self.req
        rid = inst.prefill_rid
        if req.t_first[rid] != req.t_first[rid]:  # NaN: its first token
            req.t_first[rid] = t
            r = (t - req.arrival[rid]) / req.ttft_slo[rid]
            if r > inst.tt_max:
                inst.tt_max = r
        remaining = req.output[rid] - req.produced[rid] - 1.0
        if remaining <= 0:
            inst.drop_prefill()
            return [rid]
        inst.join(rid, req.pf_len[rid], remaining)
        return _NOTHING

    def _complete(self, inst: Instance, completed: Sequence[int], t: float) -> None:
        """Requests ``completed`` finish on ``inst`` at ``t``: latency, SLO and load
        accounts, the PI period's counts, the core router's completion reports."""
        req = self.req
        t_done, arrival, deadline = req.t_done, req.arrival, req.deadline
        predicted, output = req.predicted, req.output
        prouter = self.prouter
        n = len(completed)
        if n and t <= self.T:  # Little's integral up to t (the rest of them add n x 0 s)
            self.little_area += self.n_sys * (t - self.t_sys)
            self.t_sys = t
        self.n_sys -= n
        inst.n_out -= n
        for rid in completed:
            t_done[rid] = t
            inst.q_tok -= predicted[rid]
            load = slot_load(req.input[rid], predicted[rid])
            inst.sl_sum -= load
            inst.sl_sq -= load * load
            o = output[rid]
            if t - arrival[rid] > deadline[rid]:
                self.period_miss += 1
            if prouter is not None:
                prouter.complete(rid, o, t - arrival[rid] <= deadline[rid], t)
        if inst.n_out == 0:  # (no rounding left over from the sums)
            inst.sl_sum = inst.sl_sq = 0.0
        self.done += n
        self.period_done += n

    # ------------------------------------------------------- instance life cycle
    def _inv_capacity(self, mode: str, cls: int) -> float:
        """1 / req/s an instance of ``mode`` sustains for class ``cls`` (least-loaded)."""
        if self.planner_pools:
            home = self.class_sets[cls][0]  # a shared instance: its first class's
            cap = self.plan_capacity.get(mode, (0.0,) * len(CLASS_NAMES))[home]
        elif not self.static_capacity:
            return 1.0  # no capacities given: plain fewest outstanding requests
        else:
            cap = self.static_capacity.get(mode, 0.0)
        return 1.0 / cap if cap > 0 else 1e9

    def _new_instance(self, node: str, mode: str, cls: int, t: float) -> None:
        budget, kv, max_len, start = self.limits[mode]
        inst = Instance(len(self.instances), self.tables[mode], node, self.gpus.node_site[node],
                        cls, self.llf, self._inv_capacity(mode, cls),
                        self.prm.eps_at_current_clock, self.plog, budget, kv, max_len, start,
                        follows_load=self.use_miad)
        self._size_at_pool(inst)
        self.instances.append(inst)
        if not self._activate(inst, t):
            self.gpus.node_pending[node].append(inst)

    def _size_at_pool(self, inst: Instance) -> None:
        """``inst``'s b*_n and TPOT batch at its pool's stream (:meth:`_sustainable_batch`),
        kept as its pool's rooms (:meth:`_member_rooms` starts from them); its batch room
        none where no batch keeps TPOT (core.routing.gated_room)."""
        mode, cls = inst.table.mode, inst.cls
        inst.set_carry(self._sustainable_batch(mode, cls))
        tpot_batch = self._tpot_gate(mode, cls, self._sustainable_batch(mode, cls, ttft=False))
        inst.tpot_batch = tpot_batch
        inst.room = gated_room(inst.opb, tpot_batch)
        inst.pool_rooms = (inst.room, tpot_batch)

    def _tpot_gate(self, mode: str, cls: int, mean_batch: int) -> int:
        """core.routing.tpot_gate of ``mode`` at the pool's tightest TPOT: the batch
        overflow_rank counts an instance full at, from its mean TPOT batch."""
        key = (mode, cls, mean_batch)
        hit = self.tpot_gates.get(key)
        if hit is None:
            hit = self.tpot_gates[key] = tpot_gate(
                self.tables[mode].profile, mean_batch, self._tightest_slo(cls, sizing=True)[1])
        return hit

    def _pool_requests(self, cls: int) -> npt.NDArray[np.bool_]:
        """Mask of the workload's requests an instance serving ``cls`` gets: its classes'
        under planner pools (all if they have none), all otherwise."""
        return self._pool_slo_requests(cls)[0]

    def _pool_slo_requests(self, cls: int) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
        """(:meth:`_pool_requests` of ``cls``, the part of it whose SLOs size the pool's
        rooms: its interactive requests, all of it when it has none); computed once per
        ``cls`` (a pass over the whole workload; room look-ups miss their caches often)."""
        hit = self.pool_requests.get(cls)
        if hit is None:
            wl = self.workload
            mine: npt.NDArray[np.bool_] | None = None
            if self.planner_pools:
                mine = np.isin(wl.cls, self.class_sets[cls])
            if mine is None or not mine.any():
                mine = np.ones(wl.cls.size, dtype=bool)
            interactive = mine & ~wl.bulk
            hit = self.pool_requests[cls] = (mine, interactive if interactive.any() else mine)
        return hit

    def _sustainable_batch(self, mode: str, cls: int, ttft: bool = True) -> int:
        """core.routing.sustainable_batch of ``mode`` for the requests its pool serves
        (the class's under planner pools, all otherwise): their mean prompt and
        predicted response, the interactive ones' mean TTFT and tightest TPOT SLO.
        Without ``ttft``: the batch it carries within TPOT whatever the first token
        (core.routing.overflow_rank's TPOT batch)."""
        n = self.pool_sizes.get((mode, cls), 1) if ttft else 1
        key = (mode, cls, ttft, n)
        hit = self.slo_batches.get(key)
        if hit is None:
            wl = self.workload
            mine, slo = self._pool_slo_requests(cls)
            hit = self.slo_batches[key] = sustainable_batch(
                self.tables[mode].profile, float(wl.input_tokens[mine].mean()),
                float(wl.predicted_tokens[mine].mean()),
                float(wl.ttft_slo_s[slo].mean()) if ttft else math.inf,
                self._tightest_slo(cls, sizing=True)[1], pool_size=n)
        return hit

    def _set_pool_sizes(self, members: Iterable[tuple[str, int]]) -> set[tuple[str, int]]:
        """Count each (mode, class) pool's ``members`` as its size, for a soonest-start
        router (PolicySpec.pooled_ttft) with EngineParams.pool_room; the pools whose
        size changed."""
        if not (self.prm.pool_room and self.policy.pooled_ttft):
            return set()
        sizes = dict(Counter(members))
        changed = {k for k in sizes.keys() | self.pool_sizes.keys()
                   if sizes.get(k) != self.pool_sizes.get(k)}
        self.pool_sizes = sizes
        return changed

    def _member_rooms(self, inst: Instance, credibility: float) -> tuple[int, int]:
        """``inst``'s (b*_n, TPOT batch) by core.routing.member_rooms: its TPOT batch
        (core.routing.overflow_rank's) at the slot load it is credited with
        (core.routing.SlotLoadMoments.credible: its requests' mean slot load with
        ``credibility`` Z, its pool's for the rest; core.routing.room_at_slot_load on
        the grid relative to its pool's load), and b*_n the lesser of that and its
        pool's TTFT bound. Its
        pool's rooms (:meth:`_sustainable_batch`) at Z = 0 or in the pool's bin. Once the
        router sorts requests by mix, a member that takes the pool's long prompts with
        short responses carries far fewer within TPOT than the pool's mean mix allows,
        and the members' spread of loads shows it (docs/experiments/marginal-energy.md, "Per-member
        room")."""
        pool_rooms = inst.pool_rooms
        if credibility <= 0.0 or inst.sl_sum <= 0.0:
            return pool_rooms
        mode, cls = inst.table.mode, inst.cls
        prior, mean_out = self.pool_mix.get(cls) or self._pool_mix(cls)
        k = slot_load_bin(credibility * (inst.sl_sum / inst.n_out)
                          + (1.0 - credibility) * prior, prior)
        if k == 0:
            return pool_rooms
        key = (mode, cls, k, pool_rooms)
        hit = self.mix_rooms.get(key)
        if hit is None:
            tpot_batch = room_at_slot_load(self.tables[mode].profile, k, prior, mean_out,
                                           self._tightest_slo(cls, sizing=True)[1])
            # the rooms compare mean TPOT batches; the gate is read from the member's
            room, mean = member_rooms(pool_rooms[0],
                                      self._sustainable_batch(mode, cls, ttft=False), tpot_batch)
            gate = self._tpot_gate(mode, cls, mean)
            hit = self.mix_rooms[key] = (gated_room(room, gate), gate)
        return hit

    def _pool_mix(self, cls: int) -> tuple[float, float]:
        """(slot load, mean predicted response) of the requests a pool serving ``cls``
        gets (:meth:`_pool_requests`): core.routing.slot_load of their mean prompt and
        mean predicted response, the load its pool's rooms are sized at."""
        hit = self.pool_mix.get(cls)
        if hit is None:
            wl = self.workload
            mine = self._pool_requests(cls)
            out = float(wl.predicted_tokens[mine].mean())
            hit = self.pool_mix[cls] = (
                slot_load(float(wl.input_tokens[mine].mean()), out), out)
        return hit

    def _clock_floor(self, inst: Instance) -> float:
        """MHz below which MIAD does not take ``inst`` now: core.controllers.
        prefill_clock_floor for the prompt at the headroom's TTFT-miss quantile of the
        requests its pool serves (all outside planner pools), at their tightest TTFT SLO,
        its first token (``core.batching.unqueued_first_token_s``) mixed into steps
        beside the batch decoding now, after the step in progress; 0 without MIAD."""
        if not self.use_miad:
            return 0.0
        tab = inst.table
        b = inst.b
        key = (tab.mode, inst.cls, b)
        hit = self.clock_floors.get(key)
        if hit is None:
            prompt, ttft = self._floor_prompt(inst.cls)
            budget = inst.budget
            itl = tab.itl_s
            pf = tab.prefill_s_per_token
            index = {f: ci for ci, f in enumerate(tab.clocks)}

            def first_token(f: float) -> float:
                ci = index[f]
                return unqueued_first_token_s(budget, b, prompt, itl[ci][b], pf[ci])

            hit = self.clock_floors[key] = prefill_clock_floor(
                first_token, tab.clocks, ttft, self.prm.miad_margin)
        return hit

    def _floor_prompt(self, cls: int) -> tuple[float, float]:
        """(tokens, s): the prompt at the TTFT-miss quantile of the requests a pool
        serving ``cls`` gets (core.controllers.prefill_floor_quantile) and the TTFT of
        :meth:`_tightest_slo`."""
        hit = self.floor_prompts.get(cls)
        if hit is None:
            mine = self._pool_requests(cls)
            prompt = float(np.quantile(self.workload.input_tokens[mine],
                                       prefill_floor_quantile()))
            hit = self.floor_prompts[cls] = (prompt, self._tightest_slo(cls)[0])
        return hit

    def _activate(self, inst: Instance, t: float) -> bool:
        """Start ``inst`` on free GPUs of its node at ``t``; False if too few are free."""
        ids = self.gpus.take(inst, t)
        if ids is None:
            return False
        inst.gpu_ids = ids
        inst.last_t = t
        if t > 0.0 and self.prm.startup and inst.start_s > 0.0:
            # a re-planned instance loads its model first: GPUs held, nothing served
            inst.state = STARTING
            inst.power = inst.start_w
            inst.version += 1
            heappush(self.evq, (t + inst.start_s, inst.idx, inst.version))
            self.startups += 1
        else:
            inst.state = ACTIVE
        if self.plog is not None and self.hlog is not None:
            self.plog.append((t, inst.idx, inst.power))
            self.hlog.extend((t, g, inst.idx) for g in ids)
        return True

    def _release(self, inst: Instance, t: float) -> None:
        """``inst`` is drained: retire it, free its GPUs, start what waited for them."""
        inst.settle(t)
        self.gpus.give_back(inst, t)
        if self.hlog is not None:
            self.hlog.extend((t, g, -1) for g in inst.gpu_ids)
        inst.state = RETIRED
        inst.version += 1
        activated = False
        pend = self.gpus.node_pending[inst.node]
        while pend and self._activate(pend[0], t):
            pend.popleft()
            activated = True
        if activated:
            self._rebuild_pools()

    def _retire(self, inst: Instance, t: float) -> None:
        """Take ``inst`` out of service: drop it if pending, else drain it."""
        if inst.state == PENDING:
            inst.state = RETIRED
            self.gpus.node_pending[inst.node].remove(inst)
            return
        inst.state = DRAINING
        inst.pos = -1
        if inst.n_out == 0 and inst.prefill_rid < 0:
            self._release(inst, t)

    def _router_carbon(self) -> None:
        """The production router's site intensities at the carbon step in force, on a
        carbon-objective cluster (as the routing service reads them from the EnergyPolicy)."""
        if self.prouter is not None and self.cluster.objective == "carbon":
            t = self.carbon_t
            self.prouter.set_site_intensities(
                {s: self.cluster.carbon_at(s, t) for s in self.cluster.sites})

    def _weigh_carbon(self, members: Sequence[Instance]) -> bool:
        """On a carbon-objective cluster with JouleSched routing, each instance's carbon
        weight (core.routing.carbon_weights over its pool, at the carbon step in force):
        the rule then ranks marginal carbon. True when a weight changed."""
        if not self.use_js or self.cluster.objective != "carbon" or not members:
            return False
        t = self.carbon_t
        weights = carbon_weights([self.cluster.carbon_at(x.site, t) for x in members])
        changed = False
        for inst, w in zip(members, weights.tolist(), strict=True):
            if inst.cw != w:
                inst.cw = w
                changed = True
        return changed

    def _rebuild_pools(self) -> None:
        """Pools from the active instances (per class with the planner), keeping turns."""
        members: list[list[Instance]] = [[] for _ in range(self.n_pools)]
        for inst in self.instances:
            if inst.state == ACTIVE:
                pools = self._pools_of(inst) if self.planner_pools else (0,)
                inst.pool = pools[0]
                for p in pools:
                    members[p].append(inst)
            else:
                inst.pos = -1
        self._weigh_pools_carbon(members)
        for p in range(self.n_pools):
            # round-robin keeps its turn
            self.pools[p] = Pool(members[p], self.pools[p].profile, self.use_js,
                                 home=p if self.planner_pools else None,
                                 shared_ttft=self._shared_ttfts(p, members[p]))

    def _shared_ttfts(self, pool: int, members: Sequence[Instance]) -> list[float] | None:
        """Per member of ``pool``: where it is a guest here (a shared instance whose home
        is another class's pool), the tightest TTFT SLO (:meth:`_class_ttft`) of the
        other classes it serves; inf on the pool's own members; None without guests."""
        if not (self.planner_pools and self.use_js) or all(x.pool == pool for x in members):
            return None
        return [math.inf if x.pool == pool else
                min((self._class_ttft(c) for c in self._pools_of(x) if c != pool),
                    default=math.inf) for x in members]

    def _class_ttft(self, cls: int) -> float:
        """The tightest TTFT SLO of class ``cls``'s interactive requests (all of its
        requests if none is interactive; inf if it has none), on the router's scale
        (``guard_keep``, as the request's ttft_slo_s the rule compares it with)."""
        hit = self.class_ttfts.get(cls)
        if hit is None:
            wl = self.workload
            mine = wl.cls == cls
            slo = mine & ~wl.bulk
            slo = slo if slo.any() else mine
            hit = self.class_ttfts[cls] = (
                float(wl.ttft_slo_s[slo].min()) * self.guard_keep if slo.any() else math.inf)
        return hit

    def _weigh_pools_carbon(self, members: Sequence[Sequence[Instance]] | None = None
                            ) -> bool:
        """:meth:`_weigh_carbon` per pool (``members``: the pools' members, default the
        pools'), or over every active instance when instances are shared (one weight
        each). True when a weight changed."""
        if members is None:
            members = [pool.members for pool in self.pools]
        active = [x for x in self.instances if x.state == ACTIVE]
        if self.planner_pools and any(x.cls >= self.n_pools for x in active):
            return self._weigh_carbon(active)
        changed = False
        for m in members:
            changed = self._weigh_carbon(m) or changed
        return changed

    def _apply_plan(self, plan: WindowPlan, t: float) -> None:
        """Move to ``plan``'s instances at ``t``: keep instances whose (node, mode, class)
        is still wanted, relabel the rest to wanted classes, drain what is left over,
        start what is missing (pending until its node's GPUs are free)."""
        self.plan_capacity.clear()
        self.plan_capacity.update(plan.capacity_rps)
        want: dict[tuple[str, str], list[int]] = {}
        for pi_ in plan.instances:
            cls = self._class_set(pi_.serves or (pi_.cls,))
            want.setdefault((pi_.node, pi_.mode), []).extend([cls] * pi_.count)
        resized = self._set_pool_sizes((mode, c) for (_, mode), cs in want.items() for c in cs)
        have: dict[tuple[str, str], list[Instance]] = {}
        for inst in self.instances:
            if inst.state in (ACTIVE, PENDING, STARTING):
                have.setdefault((inst.node, inst.table.mode), []).append(inst)
        for key in sorted(set(want) | set(have)):
            wanted = sorted(want.get(key, []))
            current = sorted(have.get(key, []), key=lambda i: (i.state != ACTIVE, i.idx))
            rest: list[Instance] = []
            for inst in current:  # keep instances whose class is still wanted
                if inst.cls in wanted:
                    wanted.remove(inst.cls)
                else:
                    rest.append(inst)
            for inst in rest:  # relabel (same GPUs, same mode) or drain
                if wanted:
                    inst.cls = wanted.pop(0)
                    inst.inv_cap = self._inv_capacity(inst.table.mode, inst.cls)
                    self._size_at_pool(inst)
                else:
                    self._retire(inst, t)
            for c in wanted:
                self._new_instance(key[0], key[1], c, t)
        for inst in self.instances:  # kept instances of a pool that grew or shrank
            if inst.state in (ACTIVE, PENDING, STARTING) and (inst.table.mode,
                                                               inst.cls) in resized:
                self._size_at_pool(inst)
        self._rebuild_pools()

    # ----------------------------------------------------------------- result
    def _closing_notes(self) -> None:
        if self.fallback_routes:
            self.notes.append(f"{self.fallback_routes} requests found their class pool empty "
                              "and went to the least-loaded instance of any pool")
        if self.dropped:
            self.notes.append(f"{self.dropped} requests arrived when no instance was running "
                              "at all and were never served: counted as SLO and deadline misses")
        if self.unroutable:
            self.notes.append(f"{self.unroutable} requests found no endpoint of their pool "
                              "that could serve them (every routing cost NaN or infinite) and "
                              "were refused, as the router refuses them (NoEndpoints): "
                              "counted as SLO and deadline misses")
        if self.rejected:
            self.notes.append(f"{self.rejected} requests had a prompt at or over the model's "
                              "context (cut to the KV cache) and were rejected: counted as "
                              "SLO and deadline misses")
        if self.truncated:
            self.notes.append(f"{self.truncated} responses were cut at the model's context")
        if self.preemptions:
            self.notes.append(f"{self.preemptions} preemptions (KV cache full; recomputed)")
        if self.startups:
            self.notes.append(f"{self.startups} instances started during the run, each "
                              "loading its model before serving")
        unfinished = self.req.n - self.done
        if unfinished:
            self.notes.append(f"{unfinished} requests unfinished {self.prm.drain_s:.0f} s after "
                              "the window: counted as SLO and deadline misses")

    def _result(self) -> RunResult:
        self._closing_notes()
        gpus, req = self.gpus, self.req
        products = tuple(dict.fromkeys(gpus.product))
        product_index = {p: i for i, p in enumerate(products)}
        inst_product = np.array(
            [product_index[gpus.product[self.instances[w].gpu_ids[0]]] if w >= 0 else -1
             for w in req.where],
            dtype=np.int64,
        )
        samples = self.samples
        return RunResult(
            policy=self.policy.name,
            seed=self.seed,
            duration_s=self.T,
            gpu_energy_j=np.asarray(self.window_gpu_energy, dtype=np.float64),
            gpu_site=tuple(gpus.site),
            gpu_product=tuple(gpus.product),
            gpu_busy_s=np.asarray(self.window_busy, dtype=np.float64),
            site_energy_j={s: np.asarray(v) for s, v in self.site_buckets.buckets.items()},
            carbon_g=self.site_buckets.carbon_g(self.cluster),
            window_output_tokens=self.window_outputs,
            t_first=np.asarray(req.t_first, dtype=np.float64),
            t_done=np.asarray(req.t_done, dtype=np.float64),
            instance_product=inst_product,
            products=products,
            little_l=self.little_area / self.T,
            lam_series=self.lam_series,
            site_carbon_g={s: np.asarray(v) for s, v in
                           self.site_buckets.carbon_series_g(self.cluster).items()},
            carbon_step_starts_s=np.asarray(self.site_buckets.starts[:-1], dtype=np.float64),
            samples_t=np.asarray(samples.t),
            samples_clock={n: np.asarray(v)
                           for n, v in zip(samples.names, samples.clock, strict=True)},
            samples_power={n: np.asarray(v)
                           for n, v in zip(samples.names, samples.power, strict=True)},
            notes=self.notes,
            rejected=self.rejected,
            truncated=self.truncated,
            preemptions=self.preemptions,
            startups=self.startups,
            wall_s=time.perf_counter() - self.wall0,
            events=self.events,
            power_log=self.plog,
            holder_log=self.hlog,
        )


def simulate(
    cluster: SimCluster,
    workload: Workload,
    policy: PolicySpec,
    tables: dict[str, ProfileTable],
    plans: Sequence[WindowPlan] | None = None,
    params: EngineParams | None = None,
    seed: int = 0,
    progress: Callable[[float], None] | None = None,
    static_capacity_rps: dict[str, float] | None = None,
) -> RunResult:
    """Run ``policy`` on ``workload``; ``plans`` are required for planner policies.

    Least-loaded routing is weighted least-connections: the instance with the
    fewest outstanding requests per req/s it sustains (``static_capacity_rps``
    per mode for static instances, the planner's L[r, m] in planner pools);
    on identical instances that is simply the fewest outstanding requests.
    """
    return Simulator(cluster, workload, policy, tables, plans, params, seed, progress,
                     static_capacity_rps).run()
