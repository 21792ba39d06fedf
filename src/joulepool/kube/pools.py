"""The cluster's pools as core router state: one :class:`core.router.PoolRouter` per pool.

:class:`Router` keeps the pools in step with what the cluster says (the plan's
pools and their ready pods, from :class:`kube.state.ClusterState`) and with a
static endpoints file (:mod:`kube.files`): each endpoint's serving profile from
its node's GPU product and the pool's model, its metrics URL, what was learned
about addresses that stay. Both services build on it: the routing service
(:mod:`joulepool.router`) routes through its pools; the scheduler extender reads
the tokens queued on each node (:meth:`Router.node_queue_tokens`) for placement.
Neither imports the other; this module imports neither.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import numpy.typing as npt

from joulepool.api.models import EnergyPolicySpec
from joulepool.api.plan import PlannedMix, PlannedSLO
from joulepool.core.classes import StreamMix, Tier, merged_stream
from joulepool.core.controllers import MIADController, miad_step_target_s
from joulepool.core.feedback import corrected_profile
from joulepool.core.profiles import DEFAULT_PROFILES, ServingProfile, find_profile
from joulepool.core.replicas import Counts, PeerIncrements, ReplicaRecord, fresh_peers
from joulepool.core.router import (
    Endpoint,
    PoolRouter,
    RouterConfig,
    RouterObserver,
    UnknownPool,
    node_queue_tokens,
)
from joulepool.core.routing import EndpointModel
from joulepool.kube.files import EndpointsFile
from joulepool.kube.state import ClusterState, NodeTable

FloatArray = npt.NDArray[np.float64]

#: endpoint models kept for reuse (:meth:`Router.endpoint_model`), the oldest dropped
#: first: a plan's eps scales and traffic mixes are new floats at every replan, so an
#: unbounded cache would grow for as long as the router runs
MODEL_CACHE_ENTRIES = 512


@dataclass(frozen=True)
class RouterSettings(RouterConfig):
    """core's :class:`RouterConfig` plus where the engines' metrics are scraped."""

    metrics_path: str = "/metrics"
    metrics_port: int = 0
    #: pages publishing GPU energy per serving pod (node agents', DCGM exporters')
    energy_urls: tuple[str, ...] = ()
    #: the node agents' metrics port: their pages are read too (0: not discovered)
    energy_port: int = 0
    #: only node agents in this namespace (None: any)
    energy_namespace: str | None = None
    #: the node agents steer the serving GPUs' clocks (MIAD): each batch's decode energy
    #: X(b) is read at the clock it needs; False where nothing steers them (X at f_max)
    clocks_follow_load: bool = True


class PoolObserver(RouterObserver, Protocol):
    """core.router's observer, told also when a pool disappears."""

    def pool_removed(self, pool: str) -> None: ...


class Router:
    """Pools from the cluster (plan + ready pods) and from a static endpoints file."""

    def __init__(
        self, settings: RouterSettings | None = None, state: ClusterState | None = None,
        observer: PoolObserver | None = None,
        profiles: tuple[ServingProfile, ...] = DEFAULT_PROFILES,
    ) -> None:
        self.s = settings or RouterSettings()
        #: the settings without any EnergyPolicy (flags > env > file > defaults)
        self.base_settings = self.s
        self.state = state
        self.observer = observer
        self.profiles = profiles
        self.pools: dict[str, PoolRouter] = {}
        self.static: EndpointsFile | None = None
        self.static_synced = True
        self._models: dict[tuple[str | None, str | None, int, float, float, float | None,
                                 tuple[float, float, float] | None], EndpointModel] = {}
        self._static_dirty = False
        #: the EnergyPolicy's objective and grid intensity per site (gCO2/kWh, now)
        self.objective = "energy"
        self.site_g: dict[str, float] = {}
        #: MIAD's margin: the node agents hold each decode step at (1 - margin) x TPOT
        self.miad_margin = MIADController.margin
        self.peer_increments = PeerIncrements()
        #: fresh peer replicas at the last :meth:`absorb_peers`
        self.peers = 0

    # -- sources -------------------------------------------------------------------------
    def apply_policy(self, spec: EnergyPolicySpec | None,
                     site_g_per_kwh: Mapping[str, float] | None = None) -> None:
        """EnergyPolicy ``spec.pi`` and ``bulkLambdaFactor`` override the base settings while
        the policy exists (None: it does not); every pool adopts them at once. Its
        ``objective``, MIAD ``margin`` and the grid intensity per site now
        (``site_g_per_kwh``, gCO2/kWh: :meth:`EnergyPolicy.site_intensities`) set how the
        pools weigh marginal energy (:meth:`PoolRouter.set_site_intensities`, the clock
        each batch needs in :meth:`endpoint_model`)."""
        objective = spec.objective if spec is not None else "energy"
        margin = spec.miad.margin if spec is not None else MIADController.margin
        site_g = dict(site_g_per_kwh or {})
        if margin != self.miad_margin:
            self.miad_margin = margin
            self._static_dirty = True  # every pool re-reads its endpoints' models
        if (objective, site_g) != (self.objective, self.site_g):
            self.objective, self.site_g = objective, site_g
            for pool in self.pools.values():  # what each pool learned stays
                pool.set_site_intensities(self._site_g_if_carbon_objective())
        new = self.base_settings
        if spec is not None:
            pi = spec.pi
            new = replace(new, kp=pi.kp, ki=pi.ki, target_miss_rate=pi.target_miss_rate,
                          lambda_min=pi.lambda_min, lambda_max=pi.lambda_max,
                          bulk_lambda_factor=spec.bulk_lambda_factor)
        if new == self.s:
            return
        self.s = new
        for pool in self.pools.values():
            pool.reconfigure(new)

    def set_static(self, doc: EndpointsFile | None) -> None:
        self.static = doc
        self._static_dirty = True
        self.static_synced = True

    def endpoint_model(
        self, product: str | None, model: str | None, gpus: int,
        eps: float | None = None, tps: float | None = None, tpot_s: float | None = None,
        stream: StreamMix | None = None, held_tpot_s: float | None = None,
    ) -> EndpointModel:
        """The endpoint's profile; its operating batch is the largest meeting ``tpot_s``
        (the pool's TPOT SLO; the router's default TPOT when None). ``stream``: the
        requests it serves (:meth:`stream_of`); its rooms are then sized at them and follow
        the slot load each endpoint is credited with (core.routing.EndpointModel's
        ``serving``, core.router.PoolRouter's credible rooms), as the simulator sizes its
        instances, and its TPOT is the stream's. ``held_tpot_s``: the TPOT the node agent
        holds the endpoint's step to (:meth:`held_tpot_s`; None: its TPOT)."""
        if eps is not None and tps is not None:
            return EndpointModel.constant(eps, tps)
        if stream is not None:
            tpot_s = stream.tpot_s
        serving = stream.serving if stream is not None else None
        tpot = self.s.default_tpot_s if tpot_s is None else float(tpot_s)
        prof = None
        if product and model:
            prof = find_profile(product, model, gpus, self.profiles) or find_profile(
                product, model, None, self.profiles
            )
        scale = self.eps_scale(prof)
        # the node agents' MIAD holds the step at (1 - margin) x TPOT: X(b) at the clock
        # each batch needs (core.routing.excess_at_needed_clock); at f_max where no agent
        # steers the clocks
        held = tpot if held_tpot_s is None else float(held_tpot_s)
        target = (miad_step_target_s(held, self.miad_margin) if self.s.clocks_follow_load
                  else None)
        key = (product, model, gpus, tpot, scale, target, serving)
        em = self._models.get(key)
        if em is None:
            em = (
                EndpointModel.from_profile(corrected_profile(prof, scale), tpot,
                                           serving=serving, step_target_s=target)
                if prof is not None
                else EndpointModel.constant(self.s.default_eps, self.s.default_tps)
            )
            if len(self._models) >= MODEL_CACHE_ENTRIES:
                del self._models[next(iter(self._models))]
            self._models[key] = em
        if eps is not None or tps is not None:
            # one number given: override it across the profile's batch table
            e = em.eps if eps is None else np.full_like(em.eps, eps)
            t = em.tps if tps is None else np.full_like(em.tps, tps)
            return EndpointModel(e, t, em.batch, em.prefill_s_per_token,
                                 None if eps is not None else em.excess, em.prefill_excess)
        return em

    def eps_scale(self, profile: ServingProfile | None) -> float:
        """The plan's measured-over-profile eps scale of ``profile`` (core.feedback), 1 if none.

        The operator computes it from the node agents' measurements and publishes it in
        the plan (``epsScales``); each endpoint's online estimate learns what remains."""
        plan = self.state.plan if self.state is not None else None
        if profile is None or plan is None:
            return 1.0
        return plan.eps_scales.get(profile.key, 1.0)

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
            if self.observer is not None:
                self.observer.pool_removed(gone)
        todo = keys if dirty is None or self._static_dirty else (dirty & keys) | (
            keys - set(self.pools)
        )
        if dirty and state is not None:  # a pool borrowing a changed pool's instances
            todo |= {guest for host in dirty for guest in self._guests(host)} & keys
        self._static_dirty = False
        for key in sorted(todo):
            self._sync_pool(key)
        self._link_shared()

    def _link_shared(self) -> None:
        """Tie each pod that serves several pools (a shared instance) across them: each
        pool's endpoint of it counts every pool's ledger (``Endpoint.peers``), and the
        guests' copies are credited by the host pool's slot-load spread
        (``Endpoint.home``): one engine, one batch and one room, as the simulator's
        shared instance (docs/experiments/marginal-energy.md, "Per-member room")."""
        state = self.state
        by_pod: dict[str, list[tuple[PoolRouter, Endpoint]]] = {}
        for pool in self.pools.values():
            for ep in pool.endpoints:
                if ep.pod is not None and state is not None and ep.pod in state.pods:
                    by_pod.setdefault(ep.pod, []).append((pool, ep))
                else:
                    ep.peers, ep.home = (), None
        for pod, copies in by_pod.items():
            host = self.pools.get(state.pods[pod].pool or "") if state is not None else None
            for pool, ep in copies:
                ep.peers = tuple((p, e) for p, e in copies if e is not ep)
                ep.home = host if host is not None and host is not pool else None
        for pool in self.pools.values():
            pool.shared_changed()

    def _sync_pool(self, key: str) -> None:
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = PoolRouter(key, self.s, self.observer)
        state = self.state
        planned = state.pool_plan(key) if state is not None else None
        entry = self.static.pools.get(key) if self.static else None
        pool.model = (planned.model if planned else None) or (entry.model if entry else None)
        pool.served_names = tuple(
            (planned.served_model_names if planned else None)
            or (entry.served_model_names if entry else None) or ())
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
            stream = (_stream(entry.mix, entry.slo, entry.tier)
                      if entry.mix is not None and entry.slo is not None else None)
            for e in entry.endpoints:
                model = self.endpoint_model(
                    e.product, e.model or pool.model, e.gpus, e.joules_per_token,
                    e.tokens_per_second, pool.tpot_s, stream=stream,
                )
                eps_list.append(Endpoint(
                    e.address, model, e.node, e.metrics_url, source="file", pod=e.pod,
                    site=self._site_of(e.node),
                    waiting=e.waiting, running=e.running, static_queue=e.queue_tokens,
                    eps_half_life_s=self.s.eps_half_life_s,
                    eps_min_tokens=self.s.eps_min_tokens,
                ))
        if state is not None:
            for pod_key, serves in self._pool_pods(key):
                rec = state.pods.get(pod_key)
                if rec is None or not rec.ready or not rec.ip:
                    continue
                node = state.nodes.get(rec.node)
                model = self.endpoint_model(
                    node.product if node else None, pool.model, max(rec.gpus, 1),
                    tpot_s=pool.tpot_s, stream=self.stream_of(serves),
                    held_tpot_s=self.held_tpot_s(serves),
                )
                host = f"[{rec.ip}]" if ":" in rec.ip else rec.ip
                eps_list.append(Endpoint(
                    f"{host}:{rec.port}", model, rec.node, self._metrics_url(rec.ip, rec.port),
                    eps_half_life_s=self.s.eps_half_life_s,
                    eps_min_tokens=self.s.eps_min_tokens, engine=rec.engine, pod=pod_key,
                    site=node.site if node else "",
                ))
        pool.set_endpoints(eps_list)
        pool.set_site_intensities(self._site_g_if_carbon_objective())

    def _guests(self, host: str) -> set[str]:
        """Pools the plan lets use some of ``host``'s instances (``sharedWith``)."""
        planned = self.state.pool_plan(host) if self.state is not None else None
        return {g for a in planned.assignments for g in a.shared_with} if planned else set()

    def _pool_pods(self, key: str) -> list[tuple[str, tuple[str, ...]]]:
        """The pods serving pool ``key``, each with the pools it serves (its own pool
        first): ``key``'s own, then the serving pods of other pools that the plan shares
        with it (``sharedWith``; they answer to the same model names): as many of the
        host's ready pods on that node and mode as it shares instances there, never the
        host's pods of instances of its own
        (:meth:`~joulepool.api.plan.PlannedPool.guests_by_pod`), sorted by pod."""
        state = self.state
        assert state is not None
        plan = state.plan
        pods = dict(self._shared_pods(key))
        pods.update({pod: (key,) for pod in state.pool_pods.get(key, ()) if pod not in pods})
        for host, planned in (plan.pools.items() if plan is not None else ()):
            if host == key or not any(key in a.shared_with for a in planned.assignments):
                continue
            pods.update({pod: serves for pod, serves in self._shared_pods(host).items()
                         if key in serves})
        return sorted(pods.items())

    def _shared_pods(self, host: str) -> dict[str, tuple[str, ...]]:
        """``host``'s ready serving pods that the plan shares with other pools, each with
        the pools it serves (``host`` first; :meth:`PlannedPool.guests_by_pod`)."""
        state = self.state
        assert state is not None
        planned = state.pool_plan(host)
        if planned is None or not any(a.shared_with for a in planned.assignments):
            return {}
        serving = [(rec.key, rec.node, rec.mode)
                   for rec in (state.pods.get(k) for k in state.pool_pods.get(host, ()))
                   if rec is not None and rec.ready and rec.ip]
        return {pod: (host, *guests)
                for pod, guests in planned.guests_by_pod(serving).items()}

    def held_tpot_s(self, pools: tuple[str, ...]) -> float | None:
        """The TPOT the node agent holds an engine serving ``pools`` (its own first, then
        the guests of the shared instance it fills) to: the tightest of their SLOs
        (PlanDocument.held_slo, as nodeagent.agent reads it); None without a plan."""
        plan = self.state.plan if self.state is not None else None
        held = plan.held_slo(pools) if plan is not None else None
        return held[1] if held is not None else None

    def stream_of(self, pools: tuple[str, ...]) -> StreamMix | None:
        """The requests an endpoint serving ``pools`` receives, from the plan's mixes
        (``PlannedPool.mix``: each pool's planned rate, mean prompt and response, and its
        SLO and tier), merged (core.classes.merged_stream); None when the plan does not
        give every one of them (no plan, a plan of an earlier release, a static pool)."""
        state = self.state
        parts = []
        for key in pools:
            planned = state.pool_plan(key) if state is not None else None
            if planned is None or planned.mix is None:
                return None
            parts.append(_stream(planned.mix, planned.slo, planned.tier))
        return merged_stream(parts) if parts else None

    def _site_g_if_carbon_objective(self) -> dict[str, float] | None:
        """Grid intensity per site the pools weigh marginal energy by: the EnergyPolicy's,
        on a carbon objective; None (energy) otherwise."""
        return self.site_g if self.objective == "carbon" else None

    def _site_of(self, node: str | None) -> str:
        """The site (region label) of ``node`` as the cluster state knows it, else ""."""
        rec = self.state.nodes.get(node) if self.state is not None and node else None
        return rec.site if rec is not None else ""

    # -- API -----------------------------------------------------------------------------
    def pool(self, key: str) -> PoolRouter:
        self.sync()
        pool = self.pools.get(key)
        if pool is None:
            raise UnknownPool(f"unknown pool {key!r}")
        return pool

    def tick(self, now: float) -> None:
        self.sync()
        for pool in self.pools.values():
            pool.tick(now)

    def scrape_targets(self) -> list[tuple[str, str, str, str | None]]:
        """(pool, address, metrics URL, engine label or None) of every endpoint that has
        a metrics URL."""
        self.sync()
        return [
            (p.key, e.address, e.metrics_url, e.engine)
            for p in self.pools.values() for e in p.endpoints if e.metrics_url
        ]

    def apply_scrape(self, pool: str, address: str, waiting: float, running: float,
                     now: float, kv_cache: float | None = None,
                     generated_tokens: float | None = None) -> bool:
        p = self.pools.get(pool)
        return p.apply_scrape(address, waiting, running, now, kv_cache, generated_tokens) \
            if p is not None else False

    def energy_urls(self) -> list[str]:
        """The pages to read serving pods' GPU energy from: the configured ones, and the
        ready node agents' (in ``energy_namespace``) when ``energy_port`` is set."""
        urls = list(self.s.energy_urls)
        state = self.state
        if state is None or self.s.energy_port <= 0:
            return urls
        prefix = f"{self.s.energy_namespace}/" if self.s.energy_namespace else ""
        for key in sorted(state.node_agents):
            rec = state.pods.get(key)
            if rec is None or not rec.ready or not rec.ip or not key.startswith(prefix):
                continue
            host = f"[{rec.ip}]" if ":" in rec.ip else rec.ip
            urls.append(f"http://{host}:{self.s.energy_port}/metrics")
        return urls

    def apply_energy(self, joules_by_pod: dict[str, float]) -> int:
        """Serving pods' cumulative GPU energy (``namespace/name`` -> J) to every pool's
        endpoints (core.router.PoolRouter.apply_energy); how many endpoints took it."""
        return sum(p.apply_energy(joules_by_pod) for p in self.pools.values())

    def replica_counts(self) -> tuple[dict[str, dict[str, Counts]], dict[str, float]]:
        """This replica's cumulative counts per pool and tier, and its lambda per pool
        (what it publishes to the other replicas; kube.leases)."""
        self.sync()
        return ({k: dict(p.counts) for k, p in self.pools.items()},
                {k: p.pi.lam for k, p in self.pools.items()})

    def absorb_peers(self, records: list[ReplicaRecord], me: str, wall_now: float,
                     now: float) -> int:
        """Feed every pool's PI loop the other replicas' completions and misses since
        the last call and their lambdas (core.replicas), from the fresh records among
        ``records`` (``wall_now``: the records' clock; ``now``: the pools').
        Returns how many fresh peers there were."""
        self.sync()
        peers = fresh_peers(records, me, wall_now)
        increments = self.peer_increments.absorb(peers)
        for key, pool in self.pools.items():
            lambdas = tuple(r.lambdas[key] for r in peers if key in r.lambdas)
            pool.absorb_peers(increments.get(key, Counts()), lambdas, now)
        self.peers = len(peers)
        return self.peers

    def node_queue_tokens(self, table: NodeTable) -> FloatArray:
        """Tokens queued on each node of ``table`` (summed over its endpoints)."""
        self.sync()
        return node_queue_tokens(self.pools.values(), table.index, len(table.names))


def _stream(mix: PlannedMix, slo: PlannedSLO, tier: str) -> StreamMix:
    """One pool's requests (core.classes.StreamMix) from its planned mix, SLO and tier."""
    return StreamMix(mix.requests_per_second, mix.mean_input_tokens, mix.mean_output_tokens,
                     slo.ttft_seconds, slo.tpot_seconds, bulk=tier == Tier.BULK)
