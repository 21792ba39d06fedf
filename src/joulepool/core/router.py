"""The per-pool request router as a pure state machine: route, report, tick, scrape.

No HTTP, no Kubernetes, no Prometheus here: the routing service
(:mod:`joulepool.router`) and the simulator's ``joulesched-router`` policy drive
the same :class:`PoolRouter`, so what the simulator evaluates is the deployed
router's code. Metrics leave through a :class:`RouterObserver` the caller
implements; time comes in as ``now`` (seconds, any monotonic origin).

State per pool is columnar (a :class:`core.scoring.EndpointState` over the
endpoints) so one decision is a handful of vector operations; the endpoint is
chosen by a routing profile of :mod:`joulepool.core.scoring` (``joulesched``
by default: core.routing's rule). Per endpoint:

  * energy: core.routing's marginal energy of joining the requests in flight
    there now (the ledger or the scraped counts, whichever is more), decode per
    output token plus prefill per prompt token, from the endpoint's serving
    profile (:class:`core.routing.EndpointModel`; X(b) at the clock each batch needs
    where the node agents' MIAD holds the step, see :mod:`joulepool.kube.pools`), scaled
    by the online estimator (:class:`core.online.EpsEstimator`) from reported joules,
    measured against eps at the batch the endpoint ran, and on a carbon-objective
    cluster by its site's carbon weight (:meth:`PoolRouter.set_site_intensities`);
  * throughput: the profile's at the endpoint's operating batch, the largest
    meeting the pool's TPOT SLO;
  * decode queue: the larger of the scraped estimate (waiting / running request
    counts via :func:`core.routing.queued_responses` x the mean response seen) and
    the ledger of tokens routed there that are not yet reported complete
    (entries expire after ``inflight_ttl_s``, so lost completions do not leak);
  * prompt work ahead: requests waiting for admission (scraped, or implied by the
    ledger beyond the engine's batch limit) x the mean prompt seen, plus the
    request's own prompt, as decode-token equivalents of their prefill time;
  * the first token (core.routing.prefill_queue / first_token_s, the engine's
    one-prefill-at-a-time chunked prefill): when the engine will have prefilled
    every prompt routed to it, a virtual clock that each routed prompt advances by
    its prefill time at the endpoint's batch and each scrape resets from the
    engine's waiting and running counts; plus a wait for a batch slot when the
    requests in flight fill the engine's batch. Endpoints predicted to miss the
    request's TTFT (or with no batch room) rank after the rest; among them those
    within their TPOT batch first or, when none is, by least-loaded's score
    ((outstanding + 1) / capacity), ties to the soonest first token
    (:func:`core.routing.overflow_rank`, docs/routing.md "Overflow").

Per pool: the sliding-window miss ratio (:class:`core.online.SlidingWindowRate`)
and lambda from :class:`core.controllers.PIController`, stepped every
``pi_every`` completions or ``pi_period_s`` seconds, whichever comes first, with
the miss rate of the completions since the last step; bulk requests see lambda x
``bulk_lambda_factor``.

This state is per instance of the class (per router replica): its ledger and eps
estimates learn only from the requests it routed and the completions reported to
it. With several replicas, the PI loop also takes the other replicas' completions
and misses (:meth:`PoolRouter.absorb_peers`, fed by :mod:`core.replicas` from the
counts the replicas publish) and moves to the replicas' mean lambda at each sync,
so every replica's lambda follows the pool-wide miss rate.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from joulepool.core.batching import first_token_after_s
from joulepool.core.classes import Tier
from joulepool.core.controllers import PIController
from joulepool.core.cost import BULK_LAMBDA_FACTOR, effective_lambda
from joulepool.core.online import EpsEstimator, ExpSmoothed, IncrementRatio, SlidingWindowRate
from joulepool.core.replicas import Counts, consensus_lambda
from joulepool.core.routing import (
    EndpointModel,
    carbon_weights,
    credited_slot_load,
    default_deadline,
    endpoint_queue_tokens,
    queued_responses,
    request_tokens,
    slot_load,
    slot_load_spread,
    waiting_requests_one,
)
from joulepool.core.scoring import EndpointState, RequestInfo, RoutingProfile, routing_profile

FloatArray = npt.NDArray[np.float64]

#: defaults of the PI step cadence, the miss window and the online eps estimate
PI_EVERY = 50
PI_PERIOD_S = 10.0
MISS_WINDOW_S = 60.0
EPS_HALF_LIFE_S = EpsEstimator.half_life_s  # core.estimators.EPS_HALF_LIFE_S
EPS_MIN_TOKENS = EpsEstimator.min_tokens
INFLIGHT_TTL_S = 300.0
#: generated tokens over which an endpoint's measured J/token is taken (one span)
MEASURED_EPS_MIN_TOKENS = 200.0


class UnknownPool(LookupError):
    """The pool is not known to the router."""


class NoEndpoints(RuntimeError):
    """The pool exists but has no endpoint that can serve."""


@dataclass(frozen=True)
class RouterConfig:
    """Tunables of one pool's router (seconds, tokens, joules; lambda in J per s late)."""

    fallbacks: int = 3
    kp: float = PIController.kp
    ki: float = PIController.ki
    target_miss_rate: float = PIController.target
    lambda_min: float = PIController.lam_min
    lambda_max: float = PIController.lam_max
    lambda_initial: float = PIController.lam
    pi_every: int = PI_EVERY
    pi_period_s: float = PI_PERIOD_S
    miss_window_s: float = MISS_WINDOW_S
    bulk_lambda_factor: float = BULK_LAMBDA_FACTOR
    hard_deadline: bool = False
    input_token_weight: float = 0.0
    mean_output_tokens: float = 256.0
    mean_input_tokens: float = 0.0  # prompt of a waiting request until requests tell
    eps_half_life_s: float = EPS_HALF_LIFE_S
    eps_min_tokens: float = EPS_MIN_TOKENS
    inflight_ttl_s: float = INFLIGHT_TTL_S
    default_eps: float = 1.0
    default_tps: float = 1000.0
    default_ttft_s: float = 1.0
    default_tpot_s: float = 0.1
    #: routing profile of core.scoring (joulesched, least-loaded, round-robin)
    routing: str = "joulesched"


class RouterObserver(Protocol):
    """What a shell learns as the router works (e.g. to export Prometheus metrics)."""

    def endpoints_changed(self, pool: str, count: int) -> None: ...

    def lambda_changed(self, pool: str, lam: float) -> None: ...

    def routed(self, pool: str, decision: RouteDecision) -> None: ...

    def completed(self, pool: str, missed: bool, joules: float | None, miss_ratio: float
                  ) -> None: ...

    def ticked(self, pool: str, miss_ratio: float) -> None: ...


class Endpoint:
    """One serving engine (``ip:port``) and what the router learned about it."""

    __slots__ = (
        "address", "engine", "eps_est", "generated_tokens", "home", "kv_cache", "ledger",
        "ledger_tokens", "measured_eps", "metrics_url", "model", "node", "peers", "pod",
        "running", "scraped_at", "site", "slot_load_squares", "slot_loads", "source",
        "static_queue", "waiting",
    )

    def __init__(
        self, address: str, model: EndpointModel, node: str = "", metrics_url: str | None = None,
        source: str = "cluster", waiting: float = 0.0, running: float = 0.0,
        static_queue: float = 0.0, eps_half_life_s: float = EPS_HALF_LIFE_S,
        eps_min_tokens: float = EPS_MIN_TOKENS, engine: str | None = None,
        pod: str | None = None, site: str = "",
    ) -> None:
        self.address = address
        #: the site (region) of its node: its grid's carbon intensity weighs its marginal
        #: energy on a carbon-objective cluster ("" : unknown)
        self.site = site
        #: ``namespace/name`` of the serving pod: its GPUs' energy is published under it
        self.pod = pod
        #: the engine's generated-token counter at the last scrape (None: not read)
        self.generated_tokens: float | None = None
        #: J/token measured: GPU energy increments over generated-token increments
        self.measured_eps = IncrementRatio(MEASURED_EPS_MIN_TOKENS)
        #: serving engine (metric names) from the pod label; None: detect from the page
        self.engine = engine
        #: fraction of the engine's KV cache in use, 0..1 (NaN until scraped)
        self.kv_cache = math.nan
        self.model = model
        self.node = node
        self.metrics_url = metrics_url
        self.source = source
        self.waiting = waiting
        self.running = running
        self.static_queue = static_queue
        self.scraped_at: float | None = None
        self.eps_est = EpsEstimator(half_life_s=eps_half_life_s, min_tokens=eps_min_tokens)
        #: request id -> (expiry time, tokens, slot load), oldest first (the slot load:
        #: core.routing.slot_load of its prompt and response)
        self.ledger: dict[str, tuple[float, float, float]] = {}
        self.ledger_tokens = 0.0  # sum of the ledger's tokens, kept as it changes
        #: the ledger's slot loads: their sum and the sum of their squares (its credible
        #: slot load, core.routing.SlotLoadMoments)
        self.slot_loads = 0.0
        self.slot_load_squares = 0.0
        #: a pod several pools share (a shared instance): the same pod's endpoint in each
        #: of the other pools, with that pool. Its rows count every pool's ledger: one
        #: engine, one batch (set by whoever builds the pools: kube.pools.Router)
        self.peers: tuple[tuple[PoolRouter, Endpoint], ...] = ()
        #: the pool whose slot-load spread credits it, when that is another pool than the
        #: one holding this endpoint (its home pool, for a guest's copy); None: its own
        self.home: PoolRouter | None = None

    def add_routed(self, rid: str, expiry: float, tokens: float, load: float = 0.0) -> None:
        self.ledger[rid] = (expiry, tokens, load)
        self.ledger_tokens += tokens
        self.slot_loads += load
        self.slot_load_squares += load * load

    def drop_routed(self, rid: str) -> float:
        """Forget request ``rid``; returns its slot load."""
        _, tokens, load = self.ledger.pop(rid)
        # exact zero when empty, so float residue never builds up
        if self.ledger:
            self.ledger_tokens -= tokens
            self.slot_loads -= load
            self.slot_load_squares -= load * load
        else:
            self.ledger_tokens = self.slot_loads = self.slot_load_squares = 0.0
        return load


_ids = itertools.count(1)
_ID_PREFIX = os.urandom(3).hex()


def _next_id() -> str:
    return f"{_ID_PREFIX}-{next(_ids):x}"


@dataclass(frozen=True)
class RouteDecision:
    """One routing decision: the endpoint, its fallbacks and the cost terms of the pick
    (seconds, joules, lambda in J per s late)."""

    pool: str
    endpoint: str
    fallbacks: list[str]
    request_id: str
    tier: Tier
    deadline_s: float
    tokens: float
    eta_s: float
    energy_j: float
    slack_s: float
    lam: float
    cost: float


@dataclass(frozen=True)
class CompletionOutcome:
    """What a completion report changed: the pool's lambda and miss ratio now, and the
    endpoint's eps scale (None when the endpoint is unknown)."""

    pool: str
    endpoint_known: bool
    lam: float
    miss_ratio: float
    eps_scale: float | None


class PoolRouter:
    """Endpoints, lambda and miss rate of one pool."""

    def __init__(self, key: str, config: RouterConfig | None = None,
                 observer: RouterObserver | None = None) -> None:
        self.key = key
        self.s = config = config or RouterConfig()
        self.observer = observer
        self.profile: RoutingProfile = routing_profile(config.routing)
        self.model: str | None = None
        #: the names requests may give as ``model`` (the pool's servedModelNames)
        self.served_names: tuple[str, ...] = ()
        self.tier = Tier.INTERACTIVE
        self.ttft_s = config.default_ttft_s
        self.tpot_s = config.default_tpot_s
        self.deadline_s: float | None = None
        self.pi = PIController(
            kp=config.kp, ki=config.ki, target=config.target_miss_rate,
            lam_min=config.lambda_min, lam_max=config.lambda_max, lam=config.lambda_initial,
        )
        self.window = SlidingWindowRate(config.miss_window_s)
        self.mean_out = ExpSmoothed(0.05)
        self.mean_in = ExpSmoothed(0.05)
        self.period_n = 0
        self.period_miss = 0
        self.last_pi_t: float | None = None
        self.pi_updates = 0
        #: this replica's cumulative completions and misses per tier (published to peers)
        self.counts: dict[str, Counts] = {}
        self.endpoints: list[Endpoint] = []
        self.index: dict[str, int] = {}
        self.mix_rooms = False
        #: rows credited by another pool's slot-load spread (Endpoint.home)
        self._homes: dict[int, PoolRouter] = {}
        #: rows of pods other pools share too (Endpoint.peers)
        self.shared_rows: tuple[int, ...] = ()
        #: gCO2/kWh per site (set_site_intensities; empty: the energy objective)
        self.site_g: dict[str, float] = {}
        self._alloc(0)
        self._node_idx: npt.NDArray[np.int64] | None = None
        self._node_idx_of: Mapping[str, int] | None = None
        if observer is not None:
            observer.lambda_changed(key, self.pi.lam)

    # -- arrays ------------------------------------------------------------------
    def _alloc(self, n: int) -> None:
        self.state = EndpointState(n)  # the scoring plugins' input
        self.eps_model = np.zeros(n)  # eps_n before the online scale: operating batch
        self.max_batch = np.ones(n)
        self.op_batch = np.ones(n)  # b*_n: the TPOT-meeting batch of the endpoint's profile
        self.prefill_s = np.zeros(n)  # s per prompt token prefilled
        self.scale = np.ones(n)
        #: marginal carbon over marginal energy per endpoint (core.routing.carbon_weights
        #: of its site's intensity; 1 on an energy objective)
        self.carbon_w = np.ones(n)
        self.waiting = self.state.waiting
        self.running = self.state.running
        self._responses: FloatArray | None = None  # queued_responses(waiting, running)
        #: nan_to_num(waiting + running, nan=0): the scraped requests in flight (0 where
        #: nothing was scraped), kept by _refresh so the decision does not recompute it
        self.scraped = np.zeros(n)
        self.static_q = np.zeros(n)
        self.ledger_tokens = np.zeros(n)
        self.ledger_count = self.state.outstanding
        #: per endpoint, kept by _refresh: the requests held (the ledger or the scraped
        #: counts, whichever is more), the requests waiting for admission
        #: (core.routing.waiting_requests_estimate) and, unless the rooms follow slot
        #: loads, the room left within b*_n (_batch_room)
        self.requests_held = np.zeros(n)
        self.waiting_est = np.zeros(n)
        self.room = np.full(n, np.inf)
        self._room_view = _read_only(self.room)  # what the scorers get (state.batch_room)
        #: the decision's per-request columns, rewritten by every decision (q_n, the
        #: prefill wait, R_n) and R_n where nothing has steps left (never written)
        self._queue_buf = np.empty(n)
        self._wait_buf = np.empty(n)
        self._left_buf = np.empty(n)
        self._no_steps_left = _read_only(np.zeros(n))
        #: the ledgers' slot loads (core.routing.slot_load): sums and sums of squares
        self.slot_loads = np.zeros(n)
        self.slot_load_squares = np.zeros(n)
        #: each endpoint's pool TPOT batch (EndpointModel.tpot_batch_limit)
        self.pool_tpot_batch = np.full(n, np.inf)
        #: when each engine will have prefilled every prompt routed to it (the router's
        #: clock, s; core.routing.prefill_queue at each scrape, advanced per route)
        self.prefilled_at = np.full(n, -math.inf)
        #: when the longest request routed to each engine will be done (the router's
        #: clock, s): the marginal energy's R_n, the steps the running batch has left
        self.busy_until = np.full(n, -math.inf)
        self.slot_wait = np.zeros(n)  # s waiting for a batch slot (prefill_queue)
        #: endpoints with a step model and requests in flight (routed or scraped): those
        #: whose R_n is counted (_batch_left)
        self._steps_left_rows = np.zeros(n, dtype=bool)

    def model_names(self) -> tuple[str, ...]:
        """The model names the pool answers to: its served names, else its model (none
        when it has neither)."""
        if self.served_names:
            return self.served_names
        return (self.model,) if self.model else ()

    @property
    def tps(self) -> FloatArray:
        """mu_n of every endpoint: tokens/s at the operating batch."""
        return self.state.tps

    @property
    def weight(self) -> FloatArray:
        """w_n of every endpoint: decode tokens forgone per prompt token prefilled."""
        return self.state.prefill_weight

    def _set_model(self, i: int) -> None:
        m = self.endpoints[i].model
        self.eps_model[i] = m.op_eps
        self.state.tps[i] = m.op_tps
        self.state.prefill_weight[i] = m.weight
        self.max_batch[i] = m.max_batch
        self.op_batch[i] = m.batch_limit
        self.state.tpot_batch[i] = self.pool_tpot_batch[i] = m.tpot_batch_limit
        self.prefill_s[i] = m.prefill_s_per_token

    def _refresh(self, i: int, peers: bool = True) -> None:
        """Row ``i`` of the columns from endpoint ``i``'s state (its ledger, scrape, eps
        scale): called whenever that state changes, so a decision reads the columns as
        they are. A shared pod's row counts the ledgers of every pool it serves
        (``Endpoint.peers``), and its rows in those pools follow (``peers``)."""
        ep = self.endpoints[i]
        st = self.state
        model = ep.model
        waiting, running = ep.waiting, ep.running
        self.scale[i] = eps_scale = ep.eps_est.scale
        if self.waiting[i] != waiting or self.running[i] != running:
            self.waiting[i] = waiting
            self.running[i] = running
            self._responses = None
            self.scraped[i] = _nan_to_num(waiting + running)
        self.static_q[i] = ep.static_queue
        st.kv_cache_usage[i] = ep.kv_cache
        self.ledger_count[i] = len(ep.ledger)
        self.ledger_tokens[i] = ep.ledger_tokens
        self.slot_loads[i] = ep.slot_loads
        self.slot_load_squares[i] = ep.slot_load_squares
        if ep.peers:
            self._count_peers(i, ep, peers)
        self.waiting_est[i] = waiting_requests_one(waiting, float(self.ledger_count[i]),
                                                   float(self.max_batch[i]))
        # the requests in flight now: the router's ledger or the engine's scraped
        # counts, whichever is more (what core.routing's marginal energy joins)
        in_flight = max(float(self.ledger_count[i]), float(self.scraped[i]))
        self.requests_held[i] = in_flight
        self.room[i] = float(self.op_batch[i]) - in_flight
        # (x the site's carbon weight: marginal carbon on a carbon-objective cluster)
        scale = float(eps_scale * self.carbon_w[i])
        st.eps_j_per_token[i] = model.marginal_eps(in_flight) * scale
        st.prefill_j_per_token[i] = model.prefill_excess * scale
        st.wake_j_per_token[i] = model.excess_table[1] * scale
        # the step a new prompt's prefill runs in, at the batch in flight, and the wait
        # for a batch slot when that fills the engine's batch (core.routing.prefill_queue)
        m_out = self.mean_out.get(self.s.mean_output_tokens)
        slot, step, chunk = model.prefill_queue(in_flight, 0.0, 0.0, 0.0, m_out)
        self.slot_wait[i] = slot
        st.prefill_step_s[i] = step
        st.prefill_chunk_tokens[i] = chunk
        st.prefill_s_per_token[i] = model.prefill_s_per_token
        # R_n is counted where a step is modelled and something is in flight (_batch_left)
        self._steps_left_rows[i] = step > 0 and in_flight > 0

    def _count_peers(self, i: int, ep: Endpoint, propagate: bool) -> None:
        """Row ``i`` of a shared pod: its ledger columns over every pool's ledger of it;
        with ``propagate``, the pod's rows in the other pools too."""
        for pool, peer in ep.peers:
            self.ledger_count[i] += len(peer.ledger)
            self.ledger_tokens[i] += peer.ledger_tokens
            self.slot_loads[i] += peer.slot_loads
            self.slot_load_squares[i] += peer.slot_load_squares
            if propagate:
                j = pool.index.get(peer.address)
                if j is not None and pool.endpoints[j] is peer:
                    pool._refresh(j, peers=False)

    def _share_clocks(self, i: int, ep: Endpoint) -> None:
        """Row ``i`` holds a shared pod: its prefill and busy clocks are the engine's,
        so its rows in the other pools it serves take them (a prompt routed from any
        pool queues before the next one, from any pool)."""
        for pool, peer in ep.peers:
            j = pool.index.get(peer.address)
            if j is not None and pool.endpoints[j] is peer:
                pool.prefilled_at[j] = self.prefilled_at[i]
                pool.busy_until[j] = self.busy_until[i]

    def shared_changed(self) -> None:
        """Endpoints' ``peers`` / ``home`` were (re)set: refresh the rows shared before or
        now (a row that stops being shared drops its former peers' ledgers)."""
        was = self.shared_rows
        self._index_shared()
        for i in sorted(set(was).union(self.shared_rows)):  # (set_endpoints re-indexes)
            self._refresh(i, peers=False)

    def _index_shared(self) -> None:
        """``_homes`` and ``shared_rows`` from the endpoints' ``home`` and ``peers``."""
        self._homes = {i: e.home for i, e in enumerate(self.endpoints)
                       if e.home is not None and e.home is not self}
        self.shared_rows = tuple(i for i, e in enumerate(self.endpoints) if e.peers)
        self._note_shared_ttft()

    def _note_shared_ttft(self) -> None:
        """The state's ``shared_ttft_s`` column: per guest row (a shared pod whose home
        is another pool, ``_homes``), the tightest TTFT SLO of the other interactive
        pools the pod serves (``peers``; a bulk pool's requests have none, as
        :meth:`decide` reads them); inf on the pool's own pods."""
        self.state.shared_ttft_s[:] = [
            min((pool.ttft_s for pool, _ in e.peers if pool.tier is Tier.INTERACTIVE),
                default=math.inf) if i in self._homes else math.inf
            for i, e in enumerate(self.endpoints)]

    def set_endpoints(self, endpoints: Iterable[Endpoint]) -> None:
        """Replace the endpoint set, keeping what was learned about known addresses."""
        fresh: list[Endpoint] = []
        seen: set[str] = set()
        for ep in endpoints:
            if ep.address in seen:
                continue
            seen.add(ep.address)
            old = self.endpoints[self.index[ep.address]] if ep.address in self.index else None
            if old is not None:
                old.model, old.node, old.metrics_url = ep.model, ep.node, ep.metrics_url
                old.engine, old.pod, old.site = ep.engine, ep.pod, ep.site
                if ep.source == "file":
                    if old.scraped_at is None:  # scraped numbers beat the file's
                        old.waiting, old.running = ep.waiting, ep.running
                    old.static_queue = ep.static_queue
                old.source = ep.source
                fresh.append(old)
            else:
                fresh.append(ep)
        fresh.sort(key=lambda e: e.address)
        self.endpoints = fresh
        self.index = {e.address: i for i, e in enumerate(fresh)}
        self._alloc(len(fresh))
        self._index_shared()  # (into the new state's shared_ttft_s column)
        if self.site_g:  # the new endpoints weigh by their sites' intensities
            self.carbon_w = self._carbon_weights()
        self.state.models = tuple(e.model for e in fresh)
        #: some endpoint's rooms are sized at a stream: rooms follow credible slot loads
        self.mix_rooms = any(e.model.mix is not None for e in fresh)
        for i in range(len(fresh)):
            self._set_model(i)
            self._refresh(i)
        self._node_idx = None
        if self.observer is not None:
            self.observer.endpoints_changed(self.key, len(fresh))

    def set_site_intensities(self, g_per_kwh: Mapping[str, float] | None) -> None:
        """Grid carbon intensity per site now (gCO2/kWh), on a carbon-objective cluster:
        each endpoint's marginal energy is weighed by its site's
        (core.routing.carbon_weights), so the rule ranks marginal carbon. None or empty:
        energy (every weight 1). Endpoints at a site not listed weigh 1."""
        self.site_g = dict(g_per_kwh or {})
        self.carbon_w = self._carbon_weights()
        for i in range(len(self.endpoints)):
            self._refresh(i)

    def _carbon_weights(self) -> FloatArray:
        """core.routing.carbon_weights of each endpoint's site intensity in ``site_g``
        (NaN, weight 1, for a site not listed or with ``site_g`` empty)."""
        return carbon_weights([self.site_g.get(e.site, math.nan) for e in self.endpoints])

    # -- the decision -------------------------------------------------------------
    def queue_tokens(self, out: FloatArray | None = None) -> FloatArray:
        """Decode tokens ahead on each endpoint (written into ``out`` where given)."""
        # core.routing.queue_tokens_estimate, its per-endpoint factor kept by _refresh
        if self._responses is None:  # scraped counts changed
            self._responses = queued_responses(self.waiting, self.running)
        m = max(self.mean_out.get(self.s.mean_output_tokens), 0.0)
        q = np.multiply(self._responses, m, out=out)
        q += self.static_q
        return np.maximum(q, self.ledger_tokens, out=q)

    def eta_queue_tokens(self, out: FloatArray | None = None) -> FloatArray:
        """q_n of the scoring rule: decode tokens ahead plus the prefill of the
        prompts waiting for admission, in decode-token equivalents (written into
        ``out`` where given)."""
        q = self.queue_tokens(out)
        m_in = self.mean_in.get(self.s.mean_input_tokens)
        if m_in <= 0.0:  # no prompt seen yet: nothing to add
            return q
        # (core.routing.waiting_requests_estimate, each row kept by _refresh)
        return endpoint_queue_tokens(q, self.waiting_est * m_in, self.weight)

    def _batch_room(self) -> FloatArray:
        """Requests each endpoint can still take within b*_n: the ledger or the scraped
        counts, whichever is more, are in flight. Where the endpoints' rooms are sized at
        a stream (EndpointModel's ``serving``), b*_n and the TPOT batch are those of the
        slot load each is credited with (:meth:`_credible_rooms`)."""
        if not self.mix_rooms:
            return self._room_view  # op_batch - requests_held, each row kept by _refresh
        room: FloatArray = self._credible_rooms() - self.requests_held
        return room

    def _credible_rooms(self) -> FloatArray:
        """b*_n of every endpoint at the slot load it is credited with
        (core.routing.SlotLoadMoments.credible over the pool's ledgers, against each
        endpoint's stream), as the simulator sizes its members; sets the TPOT batches
        (``state.tpot_batch``) likewise. Vectorised but for the endpoints credited with
        a load off their pool's bin (none while the members' spread is sampling). A
        guest's copy of a shared pod is credited by its home pool's spread
        (:meth:`_credit_from_homes`)."""
        limit = self.op_batch.copy()
        tpot = self.state.tpot_batch
        tpot[:] = self.pool_tpot_batch
        spread = self._held_spread()
        if spread is not None:
            held_rows, epv, vhm = spread
            n, s = self.ledger_count, self.slot_loads
            for i in held_rows.tolist():  # (SlotLoadMoments.credible, written out)
                k = float(n[i])
                z = k * vhm / (k * vhm + epv)
                m = self.endpoints[i].model
                limit[i], tpot[i] = m.rooms_at_slot_load(
                    z * (float(s[i]) / k) + (1.0 - z) * m.pool_slot_load)
        if self._homes:
            self._credit_from_homes(limit)
        return limit

    def _held_spread(self) -> tuple[npt.NDArray[np.intp], float, float] | None:
        """(rows holding requests with a slot load, EPV, VHM) of the pool's ledgers
        (core.routing.slot_load_spread); None while fewer than two members hold any, or
        the members' means differ no more than sampling explains (VHM <= 0)."""
        n, s = self.ledger_count, self.slot_loads
        members = np.count_nonzero(n > 0)
        held_rows = np.flatnonzero((n > 0) & (s > 0.0))
        if members < 2 or not held_rows.size:
            return None
        nh, sh = n[held_rows], s[held_rows]
        epv, vhm = slot_load_spread(
            float(n.sum()), float(members), float(s.sum()),
            float(self.slot_load_squares.sum()), float((sh * sh / nh).sum()),
            float((n * n).sum()))
        return (held_rows, epv, vhm) if vhm > 0.0 else None

    def slot_load_spread(self) -> tuple[float, float]:
        """(EPV, VHM) of the pool's ledgers (core.routing.slot_load_spread; (0, 0) where
        :meth:`_held_spread` gives none): what credits its members' slot loads, its
        shared pods' in the guest pools too."""
        spread = self._held_spread()
        return (0.0, 0.0) if spread is None else (spread[1], spread[2])

    def _credit_from_homes(self, limit: FloatArray) -> None:
        """The rows of shared pods whose home is another pool: b*_n and the TPOT batch at
        the slot load their home pool's spread credits them with
        (core.routing.credited_slot_load over every pool's requests on the pod), so the
        engine has one room in every pool it serves, as the simulator's shared instance;
        their stream's rooms where it credits nothing."""
        tpot = self.state.tpot_batch
        n, s = self.ledger_count, self.slot_loads
        spreads: dict[int, tuple[float, float]] = {}  # each home pool's, read once per call
        for i, home in self._homes.items():
            m = self.endpoints[i].model
            k, total = float(n[i]), float(s[i])
            if k > 0.0 and total > 0.0:
                spread = spreads.get(id(home))
                if spread is None:
                    spread = spreads[id(home)] = home.slot_load_spread()
                load = credited_slot_load(k, total, m.pool_slot_load, *spread)
                limit[i], tpot[i] = m.rooms_at_slot_load(load)
            else:
                limit[i], tpot[i] = self.op_batch[i], self.pool_tpot_batch[i]

    def _batch_left(self, now: float) -> FloatArray:
        """R_n: decode steps the requests in flight on each endpoint have left (by the
        router's busy clock, at the step time of the batch in flight; 0 when idle or
        without a step model: the rows :meth:`_refresh` marks in ``_steps_left_rows``)."""
        rows = self._steps_left_rows
        if not np.logical_or.reduce(rows):  # (ufunc reduction: cheaper than rows.any())
            return self._no_steps_left
        left: FloatArray = np.subtract(self.busy_until, now, out=self._left_buf)
        np.maximum(left, 0.0, out=left)
        np.divide(left, self.state.prefill_step_s, out=left, where=rows)
        np.copyto(left, 0.0, where=~rows)
        return left

    def _join_step_s(self, i: int) -> float:
        """Decode step time at endpoint ``i``'s batch with one more request, s (0: no
        step model)."""
        m = self.endpoints[i].model
        if m.itl is None:
            return 0.0
        b = min(int(self.ledger_count[i]) + 1, m.max_batch)
        return float(m.itl[b])

    def deadline_for(self, output_tokens: float) -> float:
        """The pool's deadline, or core's default from its TTFT and TPOT SLOs."""
        if self.deadline_s is not None:
            return self.deadline_s
        return default_deadline(output_tokens, self.ttft_s, self.tpot_s)

    def decide(self, output_tokens: float, input_tokens: float, tier: Tier | None,
               deadline_seconds: float | None, now: float,
               subset: Collection[str] | None = None) -> RouteDecision:
        """Route one request (token counts, tier, deadline in s or None for the pool's):
        picks by the routing profile, records it in the ledger; NoEndpoints if none.

        ``subset``: only these addresses may be picked (a gateway's subset hint);
        NoEndpoints when none of them is an endpoint of the pool."""
        if not self.endpoints:
            raise NoEndpoints(f"pool {self.key!r} has no ready endpoints")
        eligible = self._eligible(subset) if subset is not None else None
        tier = tier or self.tier
        tokens = request_tokens(output_tokens, input_tokens, self.s.input_token_weight)
        deadline = deadline_seconds or self.deadline_for(output_tokens)
        lam = effective_lambda(self.pi.lam, tier, self.s.bulk_lambda_factor)
        self.state.queue_tokens = self.eta_queue_tokens(self._queue_buf)
        self.state.batch_room = self._batch_room()
        self.state.batch_left_tokens = self._batch_left(now)
        # core.routing.first_token_s's wait: the engine's prefill queue, then a slot
        wait = np.subtract(self.prefilled_at, now, out=self._wait_buf)
        np.maximum(wait, 0.0, out=wait)
        self.state.prefill_wait_s = np.add(wait, self.slot_wait, out=wait)
        ttft = self.ttft_s if tier is Tier.INTERACTIVE else math.inf  # bulk: no TTFT SLO
        request = RequestInfo(tokens, float(input_tokens), float(output_tokens), deadline, lam,
                              self.s.hard_deadline and tier is Tier.INTERACTIVE, ttft)
        ranked, scores = self.profile.pick(request, self.state, self.s.fallbacks + 1, eligible)
        if not ranked:
            raise NoEndpoints(f"pool {self.key!r} has no endpoint that can serve")
        best = ranked[0]
        ep = self.endpoints[best]
        st = self.state  # its prompt joins the engine's prefill queue
        own = first_token_after_s(0.0, float(st.prefill_step_s[best]),
                                  float(st.prefill_chunk_tokens[best]),
                                  float(st.prefill_s_per_token[best]), float(input_tokens))
        self.prefilled_at[best] = first = max(float(self.prefilled_at[best]), now) + own
        done = first + max(float(output_tokens) - 1.0, 0.0) * self._join_step_s(best)
        self.busy_until[best] = max(float(self.busy_until[best]), done)
        rid = _next_id()
        ep.add_routed(rid, now + self.s.inflight_ttl_s, tokens,
                      slot_load(float(input_tokens), float(output_tokens)))
        self._refresh(best)
        if ep.peers:
            self._share_clocks(best, ep)
        if output_tokens > 0:
            self.mean_out.update(output_tokens)
        if input_tokens > 0:
            self.mean_in.update(input_tokens)
        cb = scores.breakdown
        decision = RouteDecision(
            pool=self.key,
            endpoint=ep.address,
            fallbacks=[self.endpoints[i].address for i in ranked[1:]],
            request_id=rid,
            tier=tier,
            deadline_s=float(deadline),
            tokens=tokens,
            eta_s=_finite(cb.eta_s[best]) if cb is not None else math.nan,
            energy_j=_finite(cb.energy_j[best]) if cb is not None else math.nan,
            slack_s=_finite(cb.slack_s[best]) if cb is not None else math.nan,
            lam=lam,
            cost=_finite(scores.cost[best]),
        )
        if self.observer is not None:
            self.observer.routed(self.key, decision)
        return decision

    def saturated(self, subset: Collection[str] | None = None) -> bool:
        """Every (eligible) endpoint has requests waiting for admission to its batch
        (scraped, or implied by the ledger beyond its batch limit): a new request can
        only queue. False when there is no endpoint (that is NoEndpoints' case)."""
        if not self.endpoints:
            return False
        waiting = self.waiting_est  # (core.routing.waiting_requests_estimate, kept)
        if subset is not None:
            keep = np.array([a in subset for a in (e.address for e in self.endpoints)])
            waiting = waiting[keep]
        return bool(waiting.size) and bool((waiting > 0).all())

    def _eligible(self, subset: Collection[str]) -> npt.NDArray[np.bool_]:
        keep = np.zeros(len(self.endpoints), dtype=bool)
        for address in subset:
            i = self.index.get(address)
            if i is not None:
                keep[i] = True
        if not keep.any():
            raise NoEndpoints(f"pool {self.key!r} has no ready endpoint in the subset")
        return keep

    # -- feedback --------------------------------------------------------------------
    def move_routed(self, request_id: str, picked: str, served: str) -> bool:
        """The request ``request_id`` routed to ``picked`` was served by ``served`` (a
        gateway's fallback): its ledger entry moves; False if either is unknown."""
        i, j = self.index.get(picked), self.index.get(served)
        if i is None or j is None or request_id not in self.endpoints[i].ledger:
            return False
        expiry, tokens, load = self.endpoints[i].ledger[request_id]
        self.endpoints[i].drop_routed(request_id)
        self.endpoints[j].add_routed(request_id, expiry, tokens, load)
        self._refresh(i)
        self._refresh(j)
        return True

    def report(self, endpoint: str, request_id: str | None, output_tokens: float,
               deadline_met: bool, joules: float | None, now: float,
               tier: Tier | None = None) -> CompletionOutcome:
        """A completed request of ``tier`` (None: the pool's): drops its ledger entry (the
        oldest one of the endpoint without ``request_id``), learns eps from ``joules``
        and the miss ratio."""
        i = self.index.get(endpoint)
        if i is not None:
            self._learn(i, request_id, output_tokens, joules, now)
        missed = not deadline_met
        key = str(tier or self.tier)
        self.counts[key] = self.counts.get(key, Counts()) + Counts(1, int(missed))
        self.window.add(now, missed)
        self._count_period(1, int(missed), now)
        ratio = self.window.rate(now) or 0.0
        if self.observer is not None:
            self.observer.completed(self.key, missed, joules, ratio)
        return CompletionOutcome(
            self.key, i is not None, self.pi.lam, ratio,
            self.endpoints[i].eps_est.scale if i is not None else None,
        )

    def _learn(self, i: int, request_id: str | None, output_tokens: float,
               joules: float | None, now: float) -> None:
        ep = self.endpoints[i]
        if joules is not None and output_tokens > 0:
            # drift reference: the profile's eps at the batch the endpoint ran at (this
            # request and the others in flight: a shared pod's from every pool it
            # serves, as its row counts them), not the rule's operating batch
            others = max(ep.waiting + ep.running, float(self.ledger_count[i])) - 1.0
            modelled, _ = ep.model.at(others)
            ep.eps_est.observe(joules, output_tokens, modelled, now)
        if request_id is not None and request_id in ep.ledger:
            ep.drop_routed(request_id)
        elif request_id is None and ep.ledger:
            ep.drop_routed(next(iter(ep.ledger)))
        self._refresh(i)

    def reassign(self, request_id: str, old: str, new: str, tokens: float, now: float) -> bool:
        """Move a routed request's ledger entry from endpoint ``old`` to ``new`` (a retry
        elsewhere); False if ``new`` is unknown (the entry is then just dropped)."""
        i = self.index.get(old)
        held = self.endpoints[i].ledger.get(request_id) if i is not None else None
        self.release(old, request_id)
        j = self.index.get(new)
        if j is None:
            return False
        self.endpoints[j].add_routed(request_id, now + self.s.inflight_ttl_s, tokens,
                                     held[2] if held is not None else 0.0)
        self._refresh(j)
        return True

    def release(self, endpoint: str, request_id: str) -> bool:
        """Forget a routed request that will never complete (shed, refused by the
        engine, or aborted before it answered) without counting it as a completion: no
        outcome to learn from; False if ``endpoint`` does not hold it."""
        i = self.index.get(endpoint)
        if i is None or request_id not in self.endpoints[i].ledger:
            return False
        self.endpoints[i].drop_routed(request_id)
        self._refresh(i)
        return True

    def absorb_peers(self, increment: Counts, peer_lambdas: tuple[float, ...], now: float
                     ) -> None:
        """One sync with the other replicas: lambda moves to the mean of this replica's
        and the fresh peers' (``peer_lambdas``), then the peers' completions and misses
        since the last sync (``increment``) join this PI period, stepping it when full
        (core.replicas)."""
        pi = self.pi
        if peer_lambdas:
            lam = consensus_lambda(pi.lam, peer_lambdas, pi.lam_min, pi.lam_max)
            if lam != pi.lam:
                pi.lam = lam
                if self.observer is not None:
                    self.observer.lambda_changed(self.key, lam)
        if increment.completions <= 0:
            return
        self._count_period(increment.completions,
                           min(increment.misses, increment.completions), now)

    def _count_period(self, completions: int, misses: int, now: float) -> None:
        """Add completions and misses (this replica's or its peers') to the current PI
        period, which starts at the first of them (``now``, s); step lambda once the
        period holds ``pi_every`` completions."""
        self.period_n += completions
        self.period_miss += misses
        if self.last_pi_t is None:
            self.last_pi_t = now
        if self.period_n >= self.s.pi_every:
            self.update_lambda(now)

    def update_lambda(self, now: float) -> float:
        """One PI step with the miss rate of the completions since the last step (this
        replica's and, with several replicas, its peers')."""
        if self.period_n > 0:
            self.pi.update(self.period_miss / self.period_n)
            self.pi_updates += 1
        self.period_n = 0
        self.period_miss = 0
        self.last_pi_t = now
        if self.observer is not None:
            self.observer.lambda_changed(self.key, self.pi.lam)
        return self.pi.lam

    def reconfigure(self, config: RouterConfig) -> None:
        """Adopt new tunables (e.g. the EnergyPolicy's PI gains and bulk factor).

        Gains, target and clamps apply from the next PI step; lambda is kept, clamped
        into the new [lambda_min, lambda_max]; the bulk factor applies to the next request.
        """
        self.s = config
        pi = self.pi
        pi.kp, pi.ki, pi.target = config.kp, config.ki, config.target_miss_rate
        pi.lam_min, pi.lam_max = config.lambda_min, config.lambda_max
        pi.lam = min(max(pi.lam, pi.lam_min), pi.lam_max)
        if self.observer is not None:
            self.observer.lambda_changed(self.key, pi.lam)

    def tick(self, now: float) -> None:
        """Housekeeping: expire lost ledger entries, time-based PI step."""
        for i, ep in enumerate(self.endpoints):
            if not ep.ledger:
                continue
            expired = [rid for rid, (exp, _, _) in ep.ledger.items() if exp <= now]
            if expired:
                for rid in expired:
                    ep.drop_routed(rid)
                self._refresh(i)
        if (
            self.period_n > 0 and self.last_pi_t is not None
            and now - self.last_pi_t >= self.s.pi_period_s
        ):
            self.update_lambda(now)
        if self.observer is not None:
            self.observer.ticked(self.key, self.window.rate(now) or 0.0)

    def apply_scrape(self, address: str, waiting: float, running: float, now: float,
                     kv_cache: float | None = None, generated_tokens: float | None = None
                     ) -> bool:
        """The engine's waiting and running request counts, KV-cache usage (0..1; None:
        not reported) and generated-token counter (None: not read); False if unknown
        address."""
        i = self.index.get(address)
        if i is None:
            return False
        ep = self.endpoints[i]
        ep.waiting, ep.running, ep.scraped_at = waiting, running, now
        ep.kv_cache = math.nan if kv_cache is None else kv_cache
        ep.generated_tokens = generated_tokens
        # the engine's prefill queue as scraped: it will have prefilled the waiting
        # prompts (x the mean prompt seen) after core.routing.prefill_queue's wait
        m_in = max(self.mean_in.get(self.s.mean_input_tokens), 0.0)
        wait, _, _ = ep.model.prefill_queue(running, waiting, waiting * m_in)
        self.prefilled_at[i] = now + wait
        if not (running > 0 or waiting > 0):  # the engine is idle: its busy period is over
            self.busy_until[i] = now
        self._refresh(i)
        return True

    def apply_energy(self, joules_by_pod: Mapping[str, float]) -> int:
        """The cumulative GPU energy (J) of serving pods (``namespace/name`` -> joules, as
        the node agents or DCGM publish it), read in the same round as the engines'
        token counters: each endpoint's measured J/token takes the increments of both.
        Returns how many endpoints had both."""
        n = 0
        for ep in self.endpoints:
            joules = joules_by_pod.get(ep.pod) if ep.pod else None
            if joules is None or ep.generated_tokens is None:
                continue
            ep.measured_eps.update(joules, ep.generated_tokens)
            n += 1
        return n

    def measured_joules(self, endpoint: str, output_tokens: float) -> float | None:
        """Energy of ``output_tokens`` generated on ``endpoint`` at its measured J/token
        (:meth:`apply_energy`); None until one was measured, or for an unknown endpoint:
        what a proxied completion reports as its joules."""
        i = self.index.get(endpoint)
        eps = self.endpoints[i].measured_eps.value if i is not None else None
        if eps is None or output_tokens <= 0:
            return None
        return eps * output_tokens

    def node_index(self, index: Mapping[str, int]) -> npt.NDArray[np.int64]:
        """Each endpoint's row in ``index`` (node name -> row; -1 if absent), cached per
        mapping object."""
        if self._node_idx is None or self._node_idx_of is not index:
            self._node_idx = np.array(
                [index.get(e.node, -1) for e in self.endpoints], dtype=np.int64
            )
            self._node_idx_of = index
        return self._node_idx

    def describe(self, now: float) -> dict[str, Any]:
        """What the router knows about the pool, for people (JSON-able)."""
        q = self.queue_tokens()
        return {
            "pool": self.key,
            "model": self.model,
            "servedModelNames": list(self.served_names),
            "tier": str(self.tier),
            "routing": self.profile.name,
            "lambda": self.pi.lam,
            "missRatio": self.window.rate(now),
            "piUpdates": self.pi_updates,
            "endpoints": [
                {
                    "address": e.address,
                    "node": e.node,
                    "joulesPerToken": float(self.eps_model[i] * self.scale[i]),
                    "marginalJoulesPerToken": float(self.state.eps_j_per_token[i]),
                    "prefillJoulesPerToken": float(self.state.prefill_j_per_token[i]),
                    "tokensPerSecond": float(self.tps[i]),
                    "queueTokens": float(q[i]),
                    "epsScale": e.eps_est.scale,
                    "measuredJoulesPerToken": e.measured_eps.value,
                    "inFlight": len(e.ledger),
                }
                for i, e in enumerate(self.endpoints)
            ],
        }


def node_queue_tokens(pools: Iterable[PoolRouter], index: Mapping[str, int], n: int
                      ) -> FloatArray:
    """Decode tokens queued on each of ``n`` nodes (``index``: node name -> row), summed
    over the endpoints of ``pools`` there: the scheduler extender's view of load. A pod
    several pools share is one engine: each of its rows counts every pool's requests
    on it, so it counts once, at the most any of its rows queues."""
    total = np.zeros(n)
    shared: dict[str, tuple[int, float]] = {}  # pod -> (node row, tokens queued)
    for p in pools:
        if not p.endpoints:
            continue
        idx = p.node_index(index)
        ok = idx >= 0
        q = p.queue_tokens()
        for i in p.shared_rows:
            if ok[i]:
                ok[i] = False
                ep = p.endpoints[i]
                key = ep.pod or ep.address
                held = shared.get(key)
                shared[key] = (int(idx[i]), max(float(q[i]), held[1] if held else 0.0))
        if ok.any():
            total += np.bincount(idx[ok], weights=q[ok], minlength=n)
    for row, tokens in shared.values():
        total[row] += tokens
    return total


def _read_only(a: FloatArray) -> FloatArray:
    """A view of ``a`` that cannot be written through (``a`` itself still can)."""
    v = a.view()
    v.flags.writeable = False
    return v


def _nan_to_num(x: float) -> float:
    """``np.nan_to_num(x, nan=0.0)`` of one float (infinities to the largest finite)."""
    if x != x:
        return 0.0
    return max(min(x, sys.float_info.max), -sys.float_info.max)


def _finite(x: Any) -> float:
    v = float(x)
    return v if math.isfinite(v) else 1e300
