"""The event-driven cluster simulator.

Each serving instance (one model replica on ``gpus`` GPUs) runs continuous
batching as vLLM does by default:

* a request routed to an instance waits in its queue (FCFS or LLF);
* whenever fewer than ``max_batch`` requests are decoding and nothing is
  prefilling, the next queued request is admitted and prefilled; prefill
  takes ``prefill_s(prompt, clock)`` and pauses decoding (prefill first, as
  vLLM's default scheduler does); its end produces the first token (TTFT);
* decoding requests each gain one token per step of ``itl_s(batch, clock)``.

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
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from joulepool.core.classes import Tier, default_deadline
from joulepool.core.controllers import MIADController, PIController, SLOSignal
from joulepool.core.cost import effective_lambda
from joulepool.core.llf import LLFQueue, llf_deadline
from joulepool.core.router import PI_PERIOD_S
from joulepool.core.routing import endpoint_queue_tokens, prefill_weight
from joulepool.core.scoring import EndpointState, RequestInfo, RoutingProfile, routing_profile
from joulepool.sim.cluster import SimCluster
from joulepool.sim.planning import WindowPlan
from joulepool.sim.policies import PolicySpec
from joulepool.sim.tables import ProfileTable
from joulepool.sim.workload import Workload

if TYPE_CHECKING:
    from joulepool.sim.production import ProductionRouter

FloatArray = npt.NDArray[np.float64]
INF = math.inf
NAN = math.nan

ACTIVE, DRAINING, PENDING, RETIRED = 0, 1, 2, 3


@dataclass(frozen=True)
class EngineParams:
    tick_s: float = 1.0  # FREESH: MIAD every 1 s
    pi_period_s: float = PI_PERIOD_S
    miad_k_inc: float = MIADController.k_inc  # FREESH defaults (ARCHITECTURE.md 1.2)
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
    tokens_in_window: float
    # per request
    t_first: FloatArray
    t_done: FloatArray
    instance_product: npt.NDArray[np.int64]  # index into products, -1 = never served
    products: tuple[str, ...]
    # controls and samples
    little_l: float  # time-average requests in the system over the window
    lam_series: list[tuple[float, float]] = field(default_factory=list)
    samples_t: FloatArray = field(default_factory=lambda: np.zeros(0))
    samples_clock: dict[str, FloatArray] = field(default_factory=dict)
    samples_power: dict[str, FloatArray] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    events: int = 0
    #: with EngineParams.record_power: (t, instance, W) each time an instance's draw is
    #: set (its GPUs share it equally), and (t, GPU, instance or -1 for none) each time a
    #: GPU changes hands; a free GPU draws its product's idle power
    power_log: list[tuple[float, int, float]] | None = None
    holder_log: list[tuple[float, int, int]] | None = None

    @property
    def energy_j(self) -> float:
        return float(self.gpu_energy_j.sum())


class _Inst:
    """One serving instance; plain attributes for speed in the event loop."""

    __slots__ = (
        "V", "b", "busy_t", "ci", "cls", "energy", "eps", "eps_live", "gpu_ids", "gpus", "heap",
        "idx", "inv_cap", "itl", "itl_row", "last_t", "maxb", "mu", "n_out", "node", "nwait",
        "pf_pow", "pf_tok", "pf_w", "pool", "pos", "pow_row", "power", "prefill_end",
        "prefill_rid", "q_tok", "req_tps", "site", "state", "table", "tp_max", "tps_row",
        "tt_max", "version", "wait_in", "waiting",
    )

    def __init__(self, idx: int, table: ProfileTable, node: str, site: str, cls: int,
                 llf: bool, inv_cap: float, eps_live: bool) -> None:
        self.idx = idx
        self.inv_cap = inv_cap
        self.eps_live = eps_live
        self.table = table
        self.node = node
        self.site = site
        self.cls = cls
        self.gpus = table.gpus
        self.gpu_ids: tuple[int, ...] = ()
        self.state = PENDING
        self.pool = -1
        self.pos = -1
        self.maxb = table.max_batch
        self.b = 0
        self.V = 0.0
        self.last_t = 0.0
        self.energy = 0.0
        self.busy_t = 0.0
        self.heap: list[tuple[float, int]] = []
        self.waiting: Any = LLFQueue() if llf else deque()
        self.nwait = 0
        self.prefill_rid = -1
        self.prefill_end = INF
        self.version = 0
        self.n_out = 0
        self.q_tok = 0.0  # predicted decode tokens of the requests routed here, unfinished
        self.wait_in = 0.0  # prompt tokens of the requests waiting for admission
        self.tt_max = -1.0
        self.tp_max = -1.0
        self.set_clock(table.top)
        self.power = self.pow_row[0]
        self.itl = 0.0

    def set_clock(self, ci: int) -> None:
        t = self.table
        self.ci = ci
        self.itl_row = t.itl_s[ci]
        self.pow_row = t.power_w[ci]
        self.tps_row = t.tps[ci]
        self.pf_tok = t.prefill_s_per_token[ci]
        self.pf_pow = t.prefill_power_w[ci]
        op = t.operating_batch[ci]
        # core.routing's rule: mu_n = profiled tokens/s at the operating batch (largest
        # meeting TPOT) at the current clock; eps_n = profiled J/token at the operating
        # batch, at f_max unless asked to follow the clock (then the router chases MIAD's
        # down-clocked GPUs; see EngineParams); w_n converts prompt tokens to decode tokens
        self.mu = self.tps_row[op]
        self.eps = t.eps_j_per_token[ci if self.eps_live else t.top]
        self.pf_w = prefill_weight(self.mu, self.pf_tok)
        # LLF: a request is served at the per-request rate of the operating batch
        self.req_tps = 1.0 / self.itl_row[op]


class _Pool:
    """A pool's instances as core.scoring's endpoint columns, and its routing profile
    (core's plugins, the ones the routing service runs)."""

    __slots__ = ("eps", "members", "mu", "out", "profile", "q", "state", "w")

    def __init__(self, members: list[_Inst], profile: RoutingProfile) -> None:
        self.members = members
        self.profile = profile
        self.state = st = EndpointState(len(members))
        self.out = st.outstanding  # least-loaded: (out + 1) x inv_capacity
        self.q = st.queue_tokens
        self.mu = st.tps
        self.eps = st.eps_j_per_token
        self.w = st.prefill_weight
        for pos, inst in enumerate(members):
            inst.pos = pos
            self.out[pos] = inst.n_out
            st.inv_capacity[pos] = inst.inv_cap
            self.set_rule(inst)

    def set_rule(self, inst: _Inst) -> None:
        """eps_n, mu_n, w_n and q_n of ``inst`` (after a clock change or a rebuild)."""
        pos = inst.pos
        self.eps[pos] = inst.eps
        self.mu[pos] = inst.mu
        self.w[pos] = inst.pf_w
        self.q[pos] = endpoint_queue_tokens(inst.q_tok, inst.wait_in, inst.pf_w)


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
    prm = params or EngineParams()
    wall0 = time.perf_counter()
    T = workload.duration_s
    llf = policy.queue == "llf"
    use_router = policy.routing == "joulesched-router"
    use_js = policy.routing == "joulesched"
    use_miad = policy.clock == "miad"
    if policy.uses_planner and not plans:
        raise ValueError(f"policy {policy.name} needs planner windows")
    notes: list[str] = []

    # ---------------------------------------------------------------- requests
    arr = workload.arrival_s.tolist()
    inp = workload.input_tokens.tolist()
    out = workload.output_tokens.tolist()
    pred = workload.predicted_tokens.tolist()
    ttft_slo = workload.ttft_slo_s.tolist()
    tpot_slo = workload.tpot_slo_s.tolist()
    deadline = workload.deadline_s.tolist()
    # the router's deadline is core's default one, from the predicted response length
    route_deadline = default_deadline(
        workload.predicted_tokens, workload.ttft_slo_s, workload.tpot_slo_s
    ).tolist()
    bulk = workload.bulk.tolist()
    req_cls = workload.cls.tolist()
    llf_dl = [llf_deadline(a, f, p, 1.0 / s) for a, f, p, s in
              zip(arr, ttft_slo, pred, tpot_slo, strict=True)] if llf else []
    N = len(arr)
    t_first = [NAN] * N
    t_done = [NAN] * N
    where = [-1] * N

    # ---------------------------------------------------------------- GPUs
    gpu_site: list[str] = []
    gpu_product: list[str] = []
    gpu_idle: list[float] = []
    node_gpus: dict[str, list[int]] = {}
    node_site: dict[str, str] = {}
    for n in cluster.nodes:
        ids = list(range(len(gpu_site), len(gpu_site) + n.gpus))
        node_gpus[n.name] = ids
        node_site[n.name] = n.site
        gpu_site += [n.site] * n.gpus
        gpu_product += [n.product] * n.gpus
        gpu_idle += [cluster.idle_w(n.product)] * n.gpus
    G = len(gpu_site)
    gpu_holder: list[_Inst | None] = [None] * G
    gpu_free_since = [0.0] * G
    gpu_energy = [0.0] * G
    gpu_busy = [0.0] * G
    node_free: dict[str, list[int]] = {k: list(v) for k, v in node_gpus.items()}
    node_pending: dict[str, deque[_Inst]] = {k: deque() for k in node_gpus}
    products = tuple(dict.fromkeys(gpu_product))
    product_index = {p: i for i, p in enumerate(products)}

    instances: list[_Inst] = []
    n_pools = 4 if policy.uses_planner else 1
    routing = "joulesched" if use_router else policy.routing
    pools: list[_Pool] = [_Pool([], routing_profile(routing)) for _ in range(n_pools)]
    no_request = RequestInfo(0.0, 0.0, 0.0, INF, 0.0)  # least-loaded and round-robin

    evq: list[tuple[float, int, int]] = []
    heappush = heapq.heappush
    heappop = heapq.heappop

    controllers: dict[str, MIADController] = {}
    if use_miad:
        for mode, tab in tables.items():
            # tails are fed as fractions of each request's own SLO, so targets are 1.0
            controllers[mode] = MIADController(
                supported_mhz=tab.clocks, ttft_target_s=1.0, tpot_target_s=1.0,
                k_inc=prm.miad_k_inc, step_mhz=prm.miad_step_mhz, margin=prm.miad_margin,
            )
    pi = PIController(kp=prm.pi_kp, ki=prm.pi_ki, target=prm.pi_target, lam=prm.pi_lam0)
    lam_series: list[tuple[float, float]] = [(0.0, pi.lam)] if use_js else []
    if use_router and policy.uses_planner:
        raise ValueError("joulesched-router drives one production router pool: static only")
    prouter: ProductionRouter | None = None
    plog: list[tuple[float, int, float]] | None = [] if prm.record_power else None
    hlog: list[tuple[float, int, int]] | None = [] if prm.record_power else None

    # ------------------------------------------------------------ instance ops
    def settle(inst: _Inst, t: float) -> None:
        dt = t - inst.last_t
        if dt > 0.0:
            inst.energy += inst.power * dt
            if inst.itl > 0.0:
                inst.V += dt / inst.itl
                inst.busy_t += dt
            elif inst.prefill_rid >= 0:
                inst.busy_t += dt
            inst.last_t = t

    def set_power(inst: _Inst, t: float) -> None:
        if inst.prefill_rid >= 0:
            inst.power = inst.pf_pow
            inst.itl = 0.0
        elif inst.b > 0:
            inst.power = inst.pow_row[inst.b]
            inst.itl = inst.itl_row[inst.b]
        else:
            inst.power = inst.pow_row[0]
            inst.itl = 0.0
        if plog is not None:
            plog.append((t, inst.idx, inst.power))

    def resched(inst: _Inst, t: float) -> None:
        inst.version += 1
        if inst.prefill_rid >= 0:
            heappush(evq, (inst.prefill_end, inst.idx, inst.version))
        elif inst.b > 0:
            heappush(evq, (t + (inst.heap[0][0] - inst.V) * inst.itl, inst.idx, inst.version))

    def start_prefill(inst: _Inst, t: float) -> None:
        rid = inst.waiting.pop() if llf else inst.waiting.popleft()
        inst.nwait -= 1
        inst.wait_in -= inp[rid]
        inst.prefill_rid = rid
        inst.prefill_end = t + inst.pf_tok * inp[rid]

    def sync(inst: _Inst) -> None:
        pos = inst.pos
        if inst.state != ACTIVE or pos < 0:
            return
        p = pools[inst.pool]
        p.out[pos] = inst.n_out
        if use_js:
            p.q[pos] = endpoint_queue_tokens(inst.q_tok, inst.wait_in, inst.pf_w)

    def activate(inst: _Inst, t: float) -> bool:
        free = node_free[inst.node]
        if len(free) < inst.gpus:
            return False
        ids = tuple(free[: inst.gpus])
        del free[: inst.gpus]
        for g in ids:
            gpu_energy[g] += gpu_idle[g] * (t - gpu_free_since[g])
            gpu_holder[g] = inst
        inst.gpu_ids = ids
        inst.state = ACTIVE
        inst.last_t = t
        if plog is not None and hlog is not None:
            plog.append((t, inst.idx, inst.power))
            hlog.extend((t, g, inst.idx) for g in ids)
        return True

    def release(inst: _Inst, t: float) -> None:
        settle(inst, t)
        share = inst.energy / inst.gpus
        busy = inst.busy_t
        for g in inst.gpu_ids:
            gpu_energy[g] += share
            gpu_busy[g] += busy
            gpu_holder[g] = None
            gpu_free_since[g] = t
        if hlog is not None:
            hlog.extend((t, g, -1) for g in inst.gpu_ids)
        free = node_free[inst.node]
        free.extend(inst.gpu_ids)
        free.sort()
        inst.state = RETIRED
        inst.version += 1
        activated = False
        pend = node_pending[inst.node]
        while pend and activate(pend[0], t):
            pend.popleft()
            activated = True
        if activated:
            rebuild_pools()

    def rebuild_pools() -> None:
        members: list[list[_Inst]] = [[] for _ in range(n_pools)]
        for inst in instances:
            if inst.state == ACTIVE:
                p = inst.cls if policy.uses_planner else 0
                inst.pool = p
                members[p].append(inst)
            else:
                inst.pos = -1
        for p in range(n_pools):
            pools[p] = _Pool(members[p], pools[p].profile)  # round-robin keeps its turn

    def inv_capacity(mode: str, cls: int) -> float:
        if policy.uses_planner:
            cap = plan_capacity.get(mode, (0.0,) * 4)[cls]
        elif not static_capacity:
            return 1.0  # no capacities given: plain fewest outstanding requests
        else:
            cap = static_capacity.get(mode, 0.0)
        return 1.0 / cap if cap > 0 else 1e9

    def new_instance(node: str, mode: str, cls: int, t: float) -> None:
        inst = _Inst(len(instances), tables[mode], node, node_site[node], cls, llf,
                     inv_capacity(mode, cls), prm.eps_at_current_clock)
        instances.append(inst)
        if not activate(inst, t):
            node_pending[node].append(inst)

    def retire(inst: _Inst, t: float) -> None:
        if inst.state == PENDING:
            inst.state = RETIRED
            node_pending[inst.node].remove(inst)
            return
        inst.state = DRAINING
        inst.pos = -1
        if inst.n_out == 0 and inst.prefill_rid < 0:
            release(inst, t)

    def apply_plan(plan: WindowPlan, t: float) -> None:
        plan_capacity.clear()
        plan_capacity.update(plan.capacity_rps)
        want: dict[tuple[str, str], list[int]] = {}
        for pi_ in plan.instances:
            want.setdefault((pi_.node, pi_.mode), []).extend([pi_.cls] * pi_.count)
        have: dict[tuple[str, str], list[_Inst]] = {}
        for inst in instances:
            if inst.state in (ACTIVE, PENDING):
                have.setdefault((inst.node, inst.table.mode), []).append(inst)
        for key in sorted(set(want) | set(have)):
            wanted = sorted(want.get(key, []))
            current = sorted(have.get(key, []), key=lambda i: (i.state != ACTIVE, i.idx))
            rest: list[_Inst] = []
            for inst in current:  # keep instances whose class is still wanted
                if inst.cls in wanted:
                    wanted.remove(inst.cls)
                else:
                    rest.append(inst)
            for inst in rest:  # relabel (same GPUs, same mode) or drain
                if wanted:
                    inst.cls = wanted.pop(0)
                    inst.inv_cap = inv_capacity(inst.table.mode, inst.cls)
                else:
                    retire(inst, t)
            for c in wanted:
                new_instance(key[0], key[1], c, t)
        rebuild_pools()

    # --------------------------------------------------------------- deploy
    plan_capacity: dict[str, tuple[float, ...]] = {}
    static_capacity = dict(static_capacity_rps or {})
    if policy.uses_planner:
        assert plans is not None
        plan_queue = sorted(plans, key=lambda p: p.start_s)
        first = plan_queue.pop(0)
        apply_plan(first, 0.0)
        notes.append(first.describe())
    else:
        plan_queue = []
        for node, mode, count in static_deployment(cluster, tables):
            for _ in range(count):
                new_instance(node, mode, 0, 0.0)
        rebuild_pools()
    if use_router:  # the extender's router itself, over the static instances
        from joulepool.sim.production import ProductionRouter

        interactive = ~workload.bulk
        slo_from = interactive if interactive.any() else np.ones(N, dtype=np.bool_)
        prouter = ProductionRouter(
            [(x.idx, x.node, x.table.profile) for x in pools[0].members],
            ttft_s=float(workload.ttft_slo_s[slo_from].max()) if N else 1.0,
            tpot_s=float(workload.tpot_slo_s[slo_from].min()) if N else 0.15,
        )
        lam_series.append((0.0, prouter.lam))
        notes.append("the production request router "
                     "(extender.router.PoolRouter, default settings) routed every request")

        def engine_counts(idx: int) -> tuple[float, float]:
            x = instances[idx]  # vLLM counts a prefilling request as running
            return float(x.nwait), float(x.b + (x.prefill_rid >= 0))
    unused = sum(1 for h in gpu_holder if h is None)
    if unused:
        notes.append(f"{unused} of {G} GPUs hold no instance at t=0 and draw idle power")

    # sample GPUs for the clock/power plots: one per (site, product), busy ones first
    sample_ids: list[int] = []
    pairs = list(dict.fromkeys(zip(gpu_site, gpu_product, strict=True)))
    for site, prod in pairs:
        ids = [g for g in range(G) if gpu_site[g] == site and gpu_product[g] == prod]
        held = [g for g in ids if gpu_holder[g] is not None]
        sample_ids.append((held or ids)[0])
    sample_ids.sort(key=lambda g: (gpu_holder[g] is None, g))
    sample_ids = sorted(sample_ids[: prm.sample_gpus])
    sample_names = [f"GPU {g} ({gpu_product[g]}, {gpu_site[g]})" for g in sample_ids]
    samples_t: list[float] = []
    samples_clock: list[list[float]] = [[] for _ in sample_ids]
    samples_power: list[list[float]] = [[] for _ in sample_ids]
    sample_prev = [0.0 for _ in sample_ids]

    def gpu_cumulative(g: int, t: float) -> float:
        h = gpu_holder[g]
        if h is None:
            return gpu_energy[g] + gpu_idle[g] * (t - gpu_free_since[g])
        settle(h, t)
        return gpu_energy[g] + h.energy / h.gpus

    # ---------------------------------------------------------------- marks
    step = cluster.carbon_step_s
    marks: list[tuple[float, int]] = [(k * step, 0) for k in range(1, math.ceil(T / step))
                                      if k * step < T]
    marks += [(p.start_s, 1) for p in plan_queue if p.start_s < T]
    marks.append((T, 2))
    marks.sort()
    site_names = cluster.sites
    site_cum_prev = dict.fromkeys(site_names, 0.0)
    site_buckets: dict[str, list[float]] = {s: [] for s in site_names}
    bucket_starts: list[float] = [0.0]
    window_gpu_energy: list[float] = []
    window_busy: list[float] = []
    tokens_window = 0.0
    little_area = 0.0
    n_sys = 0
    t_sys = 0.0

    def close_bucket(t: float) -> None:
        per_site = dict.fromkeys(site_names, 0.0)
        for g in range(G):
            per_site[gpu_site[g]] += gpu_cumulative(g, t)
        for s in site_names:
            site_buckets[s].append(per_site[s] - site_cum_prev[s])
            site_cum_prev[s] = per_site[s]
        bucket_starts.append(t)

    # ---------------------------------------------------------------- loop
    i = 0
    done = 0
    events = 0
    tick_k = 1
    tick = prm.tick_s
    next_tick = tick
    pi_every = max(1, round(prm.pi_period_s / tick))
    prog_every = max(1, round(prm.progress_every_s / tick))
    period_done = 0
    period_miss = 0
    ended = False
    stop_at = T + prm.drain_s
    mark_i = 0
    next_mark = marks[0][0]
    fallback_routes = 0
    dropped = 0
    lam_for_pi = math.nan
    lam_tier = (0.0, 0.0)

    while True:
        ta = arr[i] if i < N else INF
        te = evq[0][0] if evq else INF
        if next_mark <= ta and next_mark <= te and next_mark <= next_tick:
            tm, kind = marks[mark_i]
            mark_i += 1
            next_mark = marks[mark_i][0] if mark_i < len(marks) else INF
            if kind == 0:
                close_bucket(tm)
            elif kind == 1:
                plan = plan_queue.pop(0)
                apply_plan(plan, tm)
                notes.append(plan.describe())
            else:
                close_bucket(tm)
                window_gpu_energy = [gpu_cumulative(g, tm) for g in range(G)]
                window_busy = [
                    gpu_busy[g] + (h.busy_t if (h := gpu_holder[g]) is not None else 0.0)
                    for g in range(G)
                ]
                little_area += n_sys * (tm - t_sys)
                t_sys = tm
                for rid in range(i):
                    td = t_done[rid]
                    if td <= tm:
                        tokens_window += out[rid]
                for inst in instances:
                    if inst.state in (ACTIVE, DRAINING):
                        for fv, rid in inst.heap:
                            tokens_window += out[rid] - max(fv - inst.V, 0.0)
                ended = True
                if done == N:
                    break
            continue
        if next_tick <= ta and next_tick <= te:
            t = next_tick
            if ended and (done == N or t > stop_at or (not evq and i >= N)):
                break
            if use_miad:
                for inst in instances:
                    if inst.state != ACTIVE and inst.state != DRAINING:
                        continue
                    ctrl = controllers[inst.table.mode]
                    sig = SLOSignal(
                        inst.tt_max if inst.tt_max >= 0.0 else None,
                        inst.tp_max if inst.tp_max >= 0.0 else None,
                        inst.nwait,
                    )
                    inst.tt_max = -1.0
                    inst.tp_max = -1.0
                    cur = inst.table.clocks[inst.ci]
                    nxt, _ = ctrl.step(cur, sig)
                    if nxt != cur:
                        settle(inst, t)
                        old_pf = inst.pf_tok
                        inst.set_clock(inst.table.clocks.index(nxt))
                        if inst.prefill_rid >= 0:
                            inst.prefill_end = t + (inst.prefill_end - t) * inst.pf_tok / old_pf
                        set_power(inst, t)
                        resched(inst, t)
                        if inst.state == ACTIVE and inst.pos >= 0:
                            pools[inst.pool].set_rule(inst)
            if use_js and tick_k % pi_every == 0:
                if period_done:
                    pi.update(period_miss / period_done)
                    lam_series.append((t, pi.lam))
                period_done = 0
                period_miss = 0
            if prouter is not None:
                prouter.tick(t, engine_counts)
                if tick_k % pi_every == 0:
                    lam_series.append((t, prouter.lam))
            if t <= T:
                samples_t.append(t)
                for k, g in enumerate(sample_ids):
                    cum = gpu_cumulative(g, t)
                    samples_power[k].append((cum - sample_prev[k]) / tick)
                    sample_prev[k] = cum
                    h = gpu_holder[g]
                    samples_clock[k].append(h.table.clocks[h.ci] if h is not None else NAN)
            if progress is not None and tick_k % prog_every == 0:
                progress(min(t, T))
            tick_k += 1
            next_tick = tick_k * tick
            continue

        if ta <= te:
            # ---------------------------------------------------- arrival
            rid = i
            i += 1
            t = ta
            p_idx = req_cls[rid] if policy.uses_planner else 0
            pool = pools[p_idx]
            members = pool.members
            if not members:
                # no instance planned for this class right now: least-loaded over all
                live = [x for x in instances if x.state == ACTIVE]
                if not live:
                    dropped += 1  # nothing runs at all: never served, counted as missed
                    done += 1
                    continue
                fallback_routes += 1
                inst = min(live, key=lambda x: ((x.n_out + 1) * x.inv_cap, x.idx))
            elif prouter is not None:
                inst = instances[prouter.route(rid, inp[rid], pred[rid], route_deadline[rid],
                                            bulk[rid], t)]
            else:  # core.scoring's profile, as the routing service picks
                if use_js:
                    if lam_for_pi != pi.lam:  # tiers: bulk weighs lateness less (core)
                        lam_for_pi = pi.lam
                        lam_tier = (effective_lambda(pi.lam, Tier.INTERACTIVE),
                                    effective_lambda(pi.lam, Tier.BULK))
                    req = RequestInfo(pred[rid], inp[rid], pred[rid], route_deadline[rid],
                                      lam_tier[bulk[rid]])
                else:
                    req = no_request
                inst = members[pool.profile.pick(req, pool.state)[0][0]]
            if t <= T:
                little_area += n_sys * (t - t_sys)
                t_sys = t
            n_sys += 1
            where[rid] = inst.idx
            inst.n_out += 1
            inst.q_tok += pred[rid]
            inst.wait_in += inp[rid]
            if llf:
                inst.waiting.push(rid, llf_dl[rid], pred[rid], inst.req_tps)
            else:
                inst.waiting.append(rid)
            inst.nwait += 1
            if inst.prefill_rid < 0 and inst.b < inst.maxb:
                settle(inst, t)
                start_prefill(inst, t)
                set_power(inst, t)
                resched(inst, t)
            sync(inst)
            continue

        # -------------------------------------------------------- instance event
        te, idx, ver = heappop(evq)
        inst = instances[idx]
        if ver != inst.version:
            continue
        events += 1
        t = te
        settle(inst, t)
        completed: list[int] = []
        if inst.prefill_rid >= 0:
            rid = inst.prefill_rid
            inst.prefill_rid = -1
            t_first[rid] = t
            r = (t - arr[rid]) / ttft_slo[rid]
            if r > inst.tt_max:
                inst.tt_max = r
            if out[rid] <= 1:
                completed.append(rid)
            else:
                heappush(inst.heap, (inst.V + (out[rid] - 1), rid))
                inst.b += 1
        else:
            rh = inst.heap
            if rh[0][0] > inst.V:
                inst.V = rh[0][0]
            lim = inst.V + 1e-7
            while rh and rh[0][0] <= lim:
                completed.append(heappop(rh)[1])
            inst.b -= len(completed)
        for rid in completed:
            t_done[rid] = t
            done += 1
            inst.n_out -= 1
            inst.q_tok -= pred[rid]
            o = out[rid]
            if o > 1:
                r = (t - t_first[rid]) / (o - 1) / tpot_slo[rid]
                if r > inst.tp_max:
                    inst.tp_max = r
            if t - arr[rid] > deadline[rid]:
                period_miss += 1
            period_done += 1
            if prouter is not None:
                prouter.complete(rid, o, t - arr[rid] <= deadline[rid], t)
            if t <= T:
                little_area += n_sys * (t - t_sys)
                t_sys = t
            n_sys -= 1
        admitted = False
        if inst.nwait and inst.prefill_rid < 0 and inst.b < inst.maxb:
            start_prefill(inst, t)
            admitted = True
        set_power(inst, t)
        resched(inst, t)
        if completed or admitted:  # admission moves a prompt out of q_n's prefill term
            sync(inst)
        if completed and inst.state == DRAINING and inst.n_out == 0 and inst.prefill_rid < 0:
            release(inst, t)
        if ended and done == N:
            break

    if fallback_routes:
        notes.append(f"{fallback_routes} requests found their class pool empty and went to "
                     "the least-loaded instance of any pool")
    if dropped:
        notes.append(f"{dropped} requests arrived when no instance was running at all and "
                     "were never served: counted as SLO and deadline misses")
    unfinished = N - done
    if unfinished:
        notes.append(f"{unfinished} requests unfinished {prm.drain_s:.0f} s after the window: "
                     "counted as SLO and deadline misses")
    inst_product = np.array(
        [product_index[gpu_product[instances[w].gpu_ids[0]]] if w >= 0 else -1 for w in where],
        dtype=np.int64,
    )
    carbon_g = 0.0
    from joulepool.core.energy import grams_co2

    for s in site_names:
        for k, e in enumerate(site_buckets[s]):
            carbon_g += grams_co2(e, cluster.carbon_at(s, bucket_starts[k]))
    return RunResult(
        policy=policy.name,
        seed=seed,
        duration_s=T,
        gpu_energy_j=np.asarray(window_gpu_energy, dtype=np.float64),
        gpu_site=tuple(gpu_site),
        gpu_product=tuple(gpu_product),
        gpu_busy_s=np.asarray(window_busy, dtype=np.float64),
        site_energy_j={s: np.asarray(v) for s, v in site_buckets.items()},
        carbon_g=carbon_g,
        tokens_in_window=tokens_window,
        t_first=np.asarray(t_first, dtype=np.float64),
        t_done=np.asarray(t_done, dtype=np.float64),
        instance_product=inst_product,
        products=products,
        little_l=little_area / T,
        lam_series=lam_series,
        samples_t=np.asarray(samples_t),
        samples_clock={n: np.asarray(v) for n, v in zip(sample_names, samples_clock, strict=True)},
        samples_power={n: np.asarray(v) for n, v in zip(sample_names, samples_power, strict=True)},
        notes=notes,
        wall_s=time.perf_counter() - wall0,
        events=events,
        power_log=plog,
        holder_log=hlog,
    )
