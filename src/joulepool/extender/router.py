"""Request router: picks an endpoint per request by the JouleSched cost, learns online.

State per pool is columnar (numpy arrays over endpoints) so one decision is
a handful of vector operations. The scoring rule is core's, the one the
simulator evaluates (:mod:`joulepool.core.routing`):
:func:`core.routing.score_endpoints` then :func:`core.routing.rank_endpoints`
(lowest cost, then lowest ETA, then index).

Per endpoint:
  * eps and throughput: the serving profile at the endpoint's operating batch,
    the largest meeting the pool's TPOT SLO (:class:`core.routing.EndpointModel`),
    eps scaled by the online estimator (:class:`core.online.EpsEstimator`) from
    reported joules, measured against eps at the batch the endpoint ran;
  * decode queue: the larger of the scraped estimate (``vllm:num_requests_waiting``
    / ``_running`` via :func:`core.routing.queue_tokens_estimate`) and the router's
    ledger of tokens it routed there that are not yet reported complete
    (entries expire after ``inflight_ttl_s``, so lost completions do not leak);
  * prompt work ahead: requests waiting for admission (scraped, or implied by the
    ledger beyond the engine's batch limit) x the mean prompt seen, plus the
    request's own prompt, as decode-token equivalents of their prefill time.

Per pool: the sliding-window miss ratio (:class:`core.online.SlidingWindowRate`)
and lambda from :class:`core.controllers.PIController`, updated every
``pi_every`` completions or ``pi_period_s`` seconds, whichever comes first,
with the miss rate of the completions since the last update.

All of this state is per process (per router replica) and is not shared: the
in-flight ledger, the PI controller's lambda and the online eps scale learn
only from the requests this replica routed and the ``/v1/complete`` reports it
receives. A completion that reaches another replica is learnt from by the
wrong one (its eps scale and miss ratio; without a ``requestId`` it also drops
an unrelated ledger entry there), while the routing replica keeps counting the
request's tokens as queued until the ledger entry expires. The Helm chart
therefore runs one router replica by default and sets ``sessionAffinity:
ClientIP`` on the router Service, so that with more replicas a client's route
and complete calls (same source IP) reach the same replica.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from joulepool.core.classes import Tier
from joulepool.core.controllers import PIController
from joulepool.core.cost import BULK_LAMBDA_FACTOR, effective_lambda
from joulepool.core.online import EpsEstimator, ExpSmoothed, SlidingWindowRate
from joulepool.core.profiles import DEFAULT_PROFILES, ServingProfile, find_profile
from joulepool.core.routing import (
    EndpointModel,
    default_deadline,
    endpoint_queue_tokens,
    queued_responses,
    rank_endpoints,
    request_tokens,
    score_endpoints,
    waiting_requests_estimate,
)
from joulepool.extender.files import EndpointsFile
from joulepool.extender.metrics import Metrics
from joulepool.extender.state import ClusterState, NodeTable

FloatArray = npt.NDArray[np.float64]


class UnknownPool(LookupError):
    """The pool is not known to the router (HTTP 404)."""


class NoEndpoints(RuntimeError):
    """The pool exists but has no endpoint that can serve (HTTP 503)."""


# --------------------------------------------------------------------------
# HTTP bodies of /v1/route and /v1/complete
# --------------------------------------------------------------------------
MAX_TOKENS = 10_000_000


class RouteRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)
    pool: str = Field(min_length=1, max_length=253)
    # estimates (a length predictor may give fractions): numbers, not strings
    input_tokens: float = Field(default=0, alias="inputTokens", ge=0, le=MAX_TOKENS,
                                allow_inf_nan=False)
    output_tokens: float = Field(alias="outputTokens", ge=0, le=MAX_TOKENS, allow_inf_nan=False)
    tier: Tier | None = None
    deadline_seconds: float | None = Field(
        default=None, alias="deadlineSeconds", gt=0, le=7 * 86400, allow_inf_nan=False
    )


class CompleteRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)
    pool: str = Field(min_length=1, max_length=253)
    endpoint: str = Field(min_length=1, max_length=300)
    request_id: str | None = Field(default=None, alias="requestId", max_length=64)
    ttft_seconds: float | None = Field(
        default=None, alias="ttftSeconds", ge=0, le=7 * 86400, allow_inf_nan=False
    )
    e2e_seconds: float | None = Field(
        default=None, alias="e2eSeconds", ge=0, le=7 * 86400, allow_inf_nan=False
    )
    output_tokens: float = Field(default=0, alias="outputTokens", ge=0, le=MAX_TOKENS,
                                 allow_inf_nan=False)
    deadline_met: bool = Field(alias="deadlineMet")
    joules: float | None = Field(default=None, ge=0, le=1e12, allow_inf_nan=False)


@dataclass(frozen=True)
class RouterSettings:
    fallbacks: int = 3
    kp: float = PIController.kp
    ki: float = PIController.ki
    target_miss_rate: float = PIController.target
    lambda_min: float = PIController.lam_min
    lambda_max: float = PIController.lam_max
    lambda_initial: float = PIController.lam
    pi_every: int = 50
    pi_period_s: float = 10.0
    miss_window_s: float = 60.0
    bulk_lambda_factor: float = BULK_LAMBDA_FACTOR
    hard_deadline: bool = False
    input_token_weight: float = 0.0
    mean_output_tokens: float = 256.0
    mean_input_tokens: float = 0.0  # prompt of a waiting request until requests tell
    eps_half_life_s: float = 120.0
    eps_min_tokens: float = 1000.0
    inflight_ttl_s: float = 300.0
    default_eps: float = 1.0
    default_tps: float = 1000.0
    default_ttft_s: float = 1.0
    default_tpot_s: float = 0.1
    metrics_path: str = "/metrics"
    metrics_port: int = 0


# --------------------------------------------------------------------------
# Endpoints and pools
# --------------------------------------------------------------------------
class Endpoint:
    """One serving engine (``ip:port``) and what the router learned about it."""

    __slots__ = (
        "address", "eps_est", "ledger", "ledger_tokens", "metrics_url", "model", "node",
        "running", "scraped_at", "source", "static_queue", "waiting",
    )

    def __init__(
        self, address: str, model: EndpointModel, node: str = "", metrics_url: str | None = None,
        source: str = "cluster", waiting: float = 0.0, running: float = 0.0,
        static_queue: float = 0.0, eps_half_life_s: float = 120.0,
        eps_min_tokens: float = 1000.0,
    ) -> None:
        self.address = address
        self.model = model
        self.node = node
        self.metrics_url = metrics_url
        self.source = source
        self.waiting = waiting
        self.running = running
        self.static_queue = static_queue
        self.scraped_at: float | None = None
        self.eps_est = EpsEstimator(half_life_s=eps_half_life_s, min_tokens=eps_min_tokens)
        #: request id -> (expiry time, tokens), oldest first
        self.ledger: dict[str, tuple[float, float]] = {}
        self.ledger_tokens = 0.0  # sum of the ledger's tokens, kept as it changes

    def add_routed(self, rid: str, expiry: float, tokens: float) -> None:
        self.ledger[rid] = (expiry, tokens)
        self.ledger_tokens += tokens

    def drop_routed(self, rid: str) -> None:
        _, tokens = self.ledger.pop(rid)
        # exact zero when empty, so float residue never builds up
        self.ledger_tokens = self.ledger_tokens - tokens if self.ledger else 0.0


_ids = itertools.count(1)
_ID_PREFIX = os.urandom(3).hex()


def _next_id() -> str:
    return f"{_ID_PREFIX}-{next(_ids):x}"


@dataclass(frozen=True)
class RouteDecision:
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

    def to_wire(self) -> dict[str, Any]:
        return {
            "pool": self.pool,
            "endpoint": self.endpoint,
            "fallbacks": self.fallbacks,
            "requestId": self.request_id,
            "tier": str(self.tier),
            "deadlineSeconds": self.deadline_s,
            "cost": {
                "energyJoules": self.energy_j,
                "slackSeconds": self.slack_s,
                "lambda": self.lam,
                "etaSeconds": self.eta_s,
                "total": self.cost,
            },
        }


class PoolRouter:
    """Endpoints, lambda and miss rate of one pool."""

    def __init__(self, key: str, settings: RouterSettings, metrics: Metrics | None = None) -> None:
        self.key = key
        self.s = settings
        self.metrics = metrics
        self.model: str | None = None
        self.tier = Tier.INTERACTIVE
        self.ttft_s = settings.default_ttft_s
        self.tpot_s = settings.default_tpot_s
        self.deadline_s: float | None = None
        self.pi = PIController(
            kp=settings.kp, ki=settings.ki, target=settings.target_miss_rate,
            lam_min=settings.lambda_min, lam_max=settings.lambda_max,
            lam=settings.lambda_initial,
        )
        self.window = SlidingWindowRate(settings.miss_window_s)
        self.mean_out = ExpSmoothed(0.05)
        self.mean_in = ExpSmoothed(0.05)
        self.period_n = 0
        self.period_miss = 0
        self.last_pi_t: float | None = None
        self.pi_updates = 0
        self.endpoints: list[Endpoint] = []
        self.index: dict[str, int] = {}
        self._alloc(0)
        self._node_idx: npt.NDArray[np.int64] | None = None
        self._node_idx_table: NodeTable | None = None
        if metrics is not None:
            metrics.lam.labels(key).set(self.pi.lam)

    # -- arrays ------------------------------------------------------------------
    def _alloc(self, n: int) -> None:
        self.eps_model = np.zeros(n)  # eps_n before the online scale: operating batch
        self.tps = np.zeros(n)  # mu_n: operating batch
        self.weight = np.zeros(n)  # w_n: decode tokens per prompt token prefilled
        self.max_batch = np.ones(n)
        self.scale = np.ones(n)
        self.waiting = np.zeros(n)
        self.running = np.zeros(n)
        self._responses: FloatArray | None = None  # queued_responses(waiting, running)
        self.static_q = np.zeros(n)
        self.ledger_tokens = np.zeros(n)
        self.ledger_count = np.zeros(n)

    def _set_model(self, i: int) -> None:
        m = self.endpoints[i].model
        self.eps_model[i] = m.op_eps
        self.tps[i] = m.op_tps
        self.weight[i] = m.weight
        self.max_batch[i] = m.max_batch

    def _refresh(self, i: int) -> None:
        ep = self.endpoints[i]
        self.scale[i] = ep.eps_est.scale
        if self.waiting[i] != ep.waiting or self.running[i] != ep.running:
            self.waiting[i] = ep.waiting
            self.running[i] = ep.running
            self._responses = None
        self.static_q[i] = ep.static_queue
        self.ledger_count[i] = len(ep.ledger)
        self.ledger_tokens[i] = ep.ledger_tokens

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
        for i in range(len(fresh)):
            self._set_model(i)
            self._refresh(i)
        self._node_idx = None
        if self.metrics is not None:
            self.metrics.endpoints.labels(self.key).set(len(fresh))

    # -- the decision -------------------------------------------------------------
    def queue_tokens(self) -> FloatArray:
        """Decode tokens ahead on each endpoint."""
        # core.routing.queue_tokens_estimate, its per-endpoint factor kept by _refresh
        if self._responses is None:  # scraped counts changed
            self._responses = queued_responses(self.waiting, self.running)
        m = max(self.mean_out.get(self.s.mean_output_tokens), 0.0)
        q = self._responses * m
        q += self.static_q
        return np.maximum(q, self.ledger_tokens, out=q)

    def eta_queue_tokens(self) -> FloatArray:
        """q_n of the scoring rule: decode tokens ahead plus the prefill of the
        prompts waiting for admission, in decode-token equivalents."""
        q = self.queue_tokens()
        m_in = self.mean_in.get(self.s.mean_input_tokens)
        if m_in <= 0.0:  # no prompt seen yet: nothing to add
            return q
        waiting = waiting_requests_estimate(self.waiting, self.ledger_count, self.max_batch)
        return endpoint_queue_tokens(q, waiting * m_in, self.weight)

    def deadline_for(self, output_tokens: float) -> float:
        if self.deadline_s is not None:
            return self.deadline_s
        return default_deadline(output_tokens, self.ttft_s, self.tpot_s)

    def route(self, req: RouteRequest, now: float) -> RouteDecision:
        return self.decide(req.output_tokens, req.input_tokens, req.tier, req.deadline_seconds,
                           now)

    def decide(self, output_tokens: float, input_tokens: float, tier: Tier | None,
               deadline_seconds: float | None, now: float) -> RouteDecision:
        """:meth:`route` from the request's numbers (the simulator calls this directly)."""
        if not self.endpoints:
            raise NoEndpoints(f"pool {self.key!r} has no ready endpoints")
        tier = tier or self.tier
        tokens = request_tokens(output_tokens, input_tokens, self.s.input_token_weight)
        deadline = deadline_seconds or self.deadline_for(output_tokens)
        lam = effective_lambda(self.pi.lam, tier, self.s.bulk_lambda_factor)
        breakdown = score_endpoints(
            self.eps_model * self.scale, self.eta_queue_tokens(), self.tps, self.weight,
            tokens, input_tokens, deadline, lam,
        )
        hard = self.s.hard_deadline and tier is Tier.INTERACTIVE
        ranked = rank_endpoints(breakdown, self.s.fallbacks + 1, hard_deadline=hard)
        if not ranked:
            raise NoEndpoints(f"pool {self.key!r} has no endpoint that can serve")
        best = ranked[0]
        ep = self.endpoints[best]
        rid = _next_id()
        ep.add_routed(rid, now + self.s.inflight_ttl_s, tokens)
        self._refresh(best)
        if output_tokens > 0:
            self.mean_out.update(output_tokens)
        if input_tokens > 0:
            self.mean_in.update(input_tokens)
        decision = RouteDecision(
            pool=self.key,
            endpoint=ep.address,
            fallbacks=[self.endpoints[i].address for i in ranked[1:]],
            request_id=rid,
            tier=tier,
            deadline_s=float(deadline),
            tokens=tokens,
            eta_s=_finite(breakdown.eta_s[best]),
            energy_j=_finite(breakdown.energy_j[best]),
            slack_s=_finite(breakdown.slack_s[best]),
            lam=lam,
            cost=_finite(breakdown.cost[best]),
        )
        if self.metrics is not None:
            self.metrics.predicted_joules.labels(self.key, str(tier)).observe(decision.energy_j)
        return decision

    # -- feedback --------------------------------------------------------------------
    def complete(self, rep: CompleteRequest, now: float) -> dict[str, Any]:
        return self.report(rep.endpoint, rep.request_id, rep.output_tokens, rep.deadline_met,
                           rep.joules, now)

    def report(self, endpoint: str, request_id: str | None, output_tokens: float,
               deadline_met: bool, joules: float | None, now: float) -> dict[str, Any]:
        """:meth:`complete` from the report's numbers (the simulator calls this directly)."""
        i = self.index.get(endpoint)
        known = i is not None
        if i is not None:
            ep = self.endpoints[i]
            if joules is not None and output_tokens > 0:
                # drift reference: the profile's eps at the batch the endpoint ran at (this
                # request and the others in flight), not the rule's operating batch
                others = max(ep.waiting + ep.running, float(len(ep.ledger))) - 1.0
                modelled, _ = ep.model.at(others)
                ep.eps_est.observe(joules, output_tokens, modelled, now)
            if request_id is not None and request_id in ep.ledger:
                ep.drop_routed(request_id)
            elif request_id is None and ep.ledger:
                ep.drop_routed(next(iter(ep.ledger)))
            self._refresh(i)
        missed = not deadline_met
        self.window.add(now, missed)
        self.period_n += 1
        self.period_miss += missed
        if self.last_pi_t is None:
            self.last_pi_t = now
        if self.period_n >= self.s.pi_every:
            self.update_lambda(now)
        ratio = self.window.rate(now)
        if self.metrics is not None:
            self.metrics.miss_ratio.labels(self.key).set(ratio or 0.0)
            self.metrics.completions.labels(self.key, "missed" if missed else "met").inc()
            if joules is not None:
                self.metrics.measured_joules.labels(self.key).inc(joules)
        return {
            "pool": self.key,
            "endpointKnown": known,
            "lambda": self.pi.lam,
            "missRatio": ratio or 0.0,
            "epsScale": self.endpoints[i].eps_est.scale if i is not None else None,
        }

    def update_lambda(self, now: float) -> float:
        """One PI step with the miss rate of the completions since the last step."""
        if self.period_n > 0:
            self.pi.update(self.period_miss / self.period_n)
            self.pi_updates += 1
        self.period_n = 0
        self.period_miss = 0
        self.last_pi_t = now
        if self.metrics is not None:
            self.metrics.lam.labels(self.key).set(self.pi.lam)
        return self.pi.lam

    def tick(self, now: float) -> None:
        """Housekeeping: expire lost ledger entries, time-based PI step."""
        for i, ep in enumerate(self.endpoints):
            if not ep.ledger:
                continue
            expired = [rid for rid, (exp, _) in ep.ledger.items() if exp <= now]
            if expired:
                for rid in expired:
                    ep.drop_routed(rid)
                self._refresh(i)
        if (
            self.period_n > 0 and self.last_pi_t is not None
            and now - self.last_pi_t >= self.s.pi_period_s
        ):
            self.update_lambda(now)
        if self.metrics is not None:
            self.metrics.miss_ratio.labels(self.key).set(self.window.rate(now) or 0.0)

    def apply_scrape(self, address: str, waiting: float, running: float, now: float) -> bool:
        i = self.index.get(address)
        if i is None:
            return False
        ep = self.endpoints[i]
        ep.waiting, ep.running, ep.scraped_at = waiting, running, now
        self._refresh(i)
        return True

    def node_index(self, table: NodeTable) -> npt.NDArray[np.int64]:
        if self._node_idx is None or self._node_idx_table is not table:
            self._node_idx = np.array(
                [table.index.get(e.node, -1) for e in self.endpoints], dtype=np.int64
            )
            self._node_idx_table = table
        return self._node_idx

    def describe(self, now: float) -> dict[str, Any]:
        q = self.queue_tokens()
        return {
            "pool": self.key,
            "model": self.model,
            "tier": str(self.tier),
            "lambda": self.pi.lam,
            "missRatio": self.window.rate(now),
            "piUpdates": self.pi_updates,
            "endpoints": [
                {
                    "address": e.address,
                    "node": e.node,
                    "joulesPerToken": float(self.eps_model[i] * self.scale[i]),
                    "tokensPerSecond": float(self.tps[i]),
                    "queueTokens": float(q[i]),
                    "epsScale": e.eps_est.scale,
                    "inFlight": len(e.ledger),
                }
                for i, e in enumerate(self.endpoints)
            ],
        }


def _finite(x: Any) -> float:
    v = float(x)
    return v if math.isfinite(v) else 1e300


# --------------------------------------------------------------------------
# All pools
# --------------------------------------------------------------------------
class Router:
    """Pools from the cluster (plan + ready pods) and from a static endpoints file."""

    def __init__(
        self, settings: RouterSettings | None = None, state: ClusterState | None = None,
        metrics: Metrics | None = None,
        profiles: tuple[ServingProfile, ...] = DEFAULT_PROFILES,
    ) -> None:
        self.s = settings or RouterSettings()
        self.state = state
        self.metrics = metrics
        self.profiles = profiles
        self.pools: dict[str, PoolRouter] = {}
        self.static: EndpointsFile | None = None
        self.static_synced = True
        self._models: dict[tuple[str | None, str | None, int, float], EndpointModel] = {}
        self._static_dirty = False

    # -- sources -------------------------------------------------------------------------
    def set_static(self, doc: EndpointsFile | None) -> None:
        self.static = doc
        self._static_dirty = True
        self.static_synced = True

    def endpoint_model(
        self, product: str | None, model: str | None, gpus: int,
        eps: float | None = None, tps: float | None = None, tpot_s: float | None = None,
    ) -> EndpointModel:
        """The endpoint's profile; its operating batch is the largest meeting ``tpot_s``
        (the pool's TPOT SLO; the router's default TPOT when None)."""
        if eps is not None and tps is not None:
            return EndpointModel.constant(eps, tps)
        tpot = self.s.default_tpot_s if tpot_s is None else float(tpot_s)
        key = (product, model, gpus, tpot)
        em = self._models.get(key)
        if em is None:
            prof = None
            if product and model:
                prof = find_profile(product, model, gpus, self.profiles) or find_profile(
                    product, model, None, self.profiles
                )
            em = (
                EndpointModel.from_profile(prof, tpot) if prof is not None
                else EndpointModel.constant(self.s.default_eps, self.s.default_tps)
            )
            self._models[key] = em
        if eps is not None or tps is not None:
            # one number given: override it across the profile's batch table
            e = em.eps if eps is None else np.full_like(em.eps, eps)
            t = em.tps if tps is None else np.full_like(em.tps, tps)
            return EndpointModel(e, t, em.batch, em.prefill_s_per_token)
        return em

    def _metrics_url(self, ip: str, port: int) -> str:
        host = f"[{ip}]" if ":" in ip else ip
        p = self.s.metrics_port or port
        return f"http://{host}:{p}{self.s.metrics_path}"

    def sync(self) -> None:
        """Bring pools up to date with the cluster state and the static file (cheap if clean)."""
        state = self.state
        dirty = state.take_dirty_pools() if state is not None else set()
        if dirty is not None and not dirty and not self._static_dirty:
            return
        static_pools = self.static.pools if self.static else {}
        keys: set[str] = set(static_pools)
        if state is not None:
            if state.plan is not None:
                keys |= set(state.plan.pools)
            keys |= set(state.pool_pods)
        for gone in set(self.pools) - keys:
            del self.pools[gone]
            if self.metrics is not None:
                self.metrics.forget_pool(gone)
        todo = keys if dirty is None or self._static_dirty else (dirty & keys) | (
            keys - set(self.pools)
        )
        self._static_dirty = False
        for key in sorted(todo):
            self._sync_pool(key)

    def _sync_pool(self, key: str) -> None:
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = PoolRouter(key, self.s, self.metrics)
        state = self.state
        planned = state.pool_plan(key) if state is not None else None
        entry = self.static.pools.get(key) if self.static else None
        pool.model = (planned.model if planned else None) or (entry.model if entry else None)
        tier_name = planned.tier if planned else (entry.tier if entry else Tier.INTERACTIVE)
        try:
            pool.tier = Tier(tier_name)
        except ValueError:
            pool.tier = Tier.INTERACTIVE
        slo = planned.slo if planned else (entry.slo if entry else None)
        if slo is not None:
            pool.ttft_s, pool.tpot_s = slo.ttft_seconds, slo.tpot_seconds
            pool.deadline_s = slo.deadline_seconds
        eps_list: list[Endpoint] = []
        if entry is not None:
            for e in entry.endpoints:
                model = self.endpoint_model(
                    e.product, e.model or pool.model, e.gpus, e.joules_per_token,
                    e.tokens_per_second, pool.tpot_s,
                )
                eps_list.append(Endpoint(
                    e.address, model, e.node, e.metrics_url, source="file",
                    waiting=e.waiting, running=e.running, static_queue=e.queue_tokens,
                    eps_half_life_s=self.s.eps_half_life_s,
                    eps_min_tokens=self.s.eps_min_tokens,
                ))
        if state is not None:
            for pod_key in sorted(state.pool_pods.get(key, ())):
                rec = state.pods.get(pod_key)
                if rec is None or not rec.ready or not rec.ip:
                    continue
                node = state.nodes.get(rec.node)
                model = self.endpoint_model(
                    node.product if node else None, pool.model, max(rec.gpus, 1),
                    tpot_s=pool.tpot_s,
                )
                host = f"[{rec.ip}]" if ":" in rec.ip else rec.ip
                eps_list.append(Endpoint(
                    f"{host}:{rec.port}", model, rec.node, self._metrics_url(rec.ip, rec.port),
                    eps_half_life_s=self.s.eps_half_life_s,
                    eps_min_tokens=self.s.eps_min_tokens,
                ))
        pool.set_endpoints(eps_list)

    # -- API -----------------------------------------------------------------------------
    def pool(self, key: str) -> PoolRouter:
        self.sync()
        pool = self.pools.get(key)
        if pool is None:
            raise UnknownPool(f"unknown pool {key!r}")
        return pool

    def route(self, req: RouteRequest, now: float) -> RouteDecision:
        return self.pool(req.pool).route(req, now)

    def complete(self, rep: CompleteRequest, now: float) -> dict[str, Any]:
        return self.pool(rep.pool).complete(rep, now)

    def tick(self, now: float) -> None:
        self.sync()
        for pool in self.pools.values():
            pool.tick(now)

    def scrape_targets(self) -> list[tuple[str, str, str]]:
        """(pool, address, metrics URL) of every endpoint that has one."""
        self.sync()
        return [
            (p.key, e.address, e.metrics_url)
            for p in self.pools.values() for e in p.endpoints if e.metrics_url
        ]

    def apply_scrape(self, pool: str, address: str, waiting: float, running: float,
                     now: float) -> bool:
        p = self.pools.get(pool)
        return p.apply_scrape(address, waiting, running, now) if p is not None else False

    def node_queue_tokens(self, table: NodeTable) -> FloatArray:
        """Tokens queued on each node of ``table`` (summed over its endpoints)."""
        self.sync()
        n = len(table.names)
        total = np.zeros(n)
        for p in self.pools.values():
            if not p.endpoints:
                continue
            idx = p.node_index(table)
            ok = idx >= 0
            if ok.any():
                total += np.bincount(idx[ok], weights=p.queue_tokens()[ok], minlength=n)
        return total
