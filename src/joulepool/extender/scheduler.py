"""kube-scheduler extender verbs: filter by the plan and GPUs, prioritize by placement cost.

Filter, for a pod labelled ``joulepool.dev/pool=<namespace>.<name>``:
  * node not assigned to the pool by the plan            -> FailedAndUnresolvableNodes
  * the pool would exceed the GPUs the plan gives it here -> FailedAndUnresolvableNodes
  * node unknown to the node cache (NodeNames form)       -> FailedNodes
  * fewer free ``nvidia.com/gpu`` than the pod requests    -> FailedNodes
    (free = allocatable - GPUs requested by non-terminal pods bound to the node)
Plan reasons are unresolvable: evicting pods (preemption) cannot change the
plan. A GPU shortage is resolvable. Pods without the label pass untouched.

A pod that also carries ``joulepool.dev/mode=<mode>`` (the operator runs one
Deployment per pool, serving mode and node) is held to that mode's part of the plan:
only the nodes with an assignment of that (pool, mode) with instances > 0, and
the share there is that mode's instances x gpusPerInstance, counted against the
GPUs held by the pool's bound pods of the same mode. Otherwise a 4xH100 pod
could take the GPUs the plan keeps for the pool's 8xA100 instance. A pod with a
pool label and no mode label gets the pool-level checks above.

Prioritize: :func:`joulepool.core.cost.placement_cost` per node, mapped to
0..10 by :func:`joulepool.core.cost.scores_from_costs` (best = 10, ties equal).
Nodes the plan does not assign to the pool, unknown nodes and products
without a profile score 0. Unlabelled pods get 0 everywhere (no opinion).

Protocol errors (no Pod, no node list, cache or plan not loaded yet) are
answered with HTTP 200: filter puts the message in ``Error`` (kube-scheduler
then retries the pod later); prioritize answers a neutral all-zero list,
because kube-scheduler ignores prioritize errors anyway.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import numpy as np
import numpy.typing as npt

from joulepool.api.plan import PlannedPool
from joulepool.core.cost import placement_cost, scores_from_costs
from joulepool.core.profiles import DEFAULT_PROFILES, ServingProfile, find_profile
from joulepool.core.routing import (
    ReplicaPoint,
    node_capacity_tps,
    node_load_tps,
    replica_demand_tps,
    replica_point,
)
from joulepool.extender.metrics import Metrics
from joulepool.extender.reservations import Reservations
from joulepool.extender.wire import (
    MAX_EXTENDER_PRIORITY,
    ExtenderArgs,
    ExtenderFilterResult,
    Node,
    Pod,
)
from joulepool.kube.pools import Router
from joulepool.kube.state import ClusterState, NodeRecord, NodeTable, host_prefix

FloatArray = npt.NDArray[np.float64]
_SCORE_SUFFIX = [f"{s}}}" for s in range(MAX_EXTENDER_PRIORITY + 1)]
#: entries per filter cache (pool and pool/mode keys) before it is cleared
_CACHE_LIMIT = 1024


class ProtocolError(ValueError):
    """A well-formed request the extender cannot answer; goes in ``Error``."""


@dataclass(frozen=True)
class PlacementSettings:
    lam: float = 1e4
    max_utilisation: float = 0.9
    replica_utilisation: float = 0.9
    queue_horizon_s: float = 10.0
    #: answer a pool pod's filter with one node and reserve its GPUs there until the
    #: binding shows (:mod:`joulepool.extender.reservations`); False: every node that
    #: passes is returned and only bound pods count against the plan's shares
    reserve: bool = True


@dataclass(frozen=True)
class FilterScope:
    """What a filter call checks a pod against: its pool, or its (pool, mode)."""

    key: str  #: cache key: the pool key, or ``<pool>|<mode>``
    pool: str
    mode: str | None
    what: str  #: ``pool <key>`` or ``pool <key> mode <mode>``, for reasons
    allowed: set[str]  #: nodes the plan assigns to it
    listing: str


def _listing(names: list[str], limit: int = 3, unit: str = "pool") -> str:
    """Short: kube-scheduler groups nodes by identical reason, so keep it the same for all."""
    if not names:
        return f"it assigns the {unit} no nodes"
    if len(names) <= limit:
        return "assigned: " + ", ".join(names)
    return f"{len(names)} nodes assigned"


class Scheduler:
    def __init__(
        self, state: ClusterState, router: Router | None = None,
        settings: PlacementSettings | None = None, metrics: Metrics | None = None,
        profiles: tuple[ServingProfile, ...] = DEFAULT_PROFILES,
    ) -> None:
        self.state = state
        self.router = router
        self.s = settings or PlacementSettings()
        self.metrics = metrics
        self.profiles = profiles
        self._points: dict[tuple[str, str, int, float], ReplicaPoint | None] = {}
        #: per (pool, plan version): assigned nodes, their listing, replica tokens/s
        self._pool_cache: dict[str, tuple[int, set[str], str, float]] = {}
        #: per (pool, mode, plan version): assigned nodes and their listing
        self._mode_cache: dict[tuple[str, str], tuple[int, set[str], str]] = {}
        #: per (pool, plan version, node table): which table rows the plan assigns
        self._mask_cache: dict[str, tuple[int, NodeTable, npt.NDArray[np.bool_]]] = {}
        self._table_cache: dict[str, tuple[int, NodeTable, FloatArray, FloatArray,
                                           FloatArray]] = {}
        #: placements sent to kube-scheduler whose binding the watch has not shown yet
        self.reservations = Reservations()
        state.pod_gone_hooks.append(self._pod_gone)
        self._arrays_cache: dict[str, tuple[tuple[int, int], NodeTable, npt.NDArray[np.float64],
                                            npt.NDArray[np.float64]]] = {}

    # -- helpers -------------------------------------------------------------------------
    def _pod_gone(self, pod_key: str) -> None:
        """The watch shows the pod deleted: it will never bind, release its reservation."""
        self.reservations.drop(pod_key)

    @staticmethod
    def _check(args: ExtenderArgs) -> Pod:
        if args.pod is None:
            raise ProtocolError("ExtenderArgs.Pod is missing")
        if args.nodes is None and args.node_names is None:
            raise ProtocolError("ExtenderArgs has neither Nodes nor NodeNames")
        return args.pod

    def _need_plan(self) -> None:
        if not self.state.synced["plan"]:
            raise ProtocolError("the plan ConfigMap has not been loaded yet")

    def _need_cache(self) -> None:
        missing = [s for s in ("nodes", "pods") if not self.state.synced[s]]
        if missing:
            raise ProtocolError(f"node cache not synced yet ({', '.join(missing)})")

    def point(self, product: str | None, pool: PlannedPool, gpus: int) -> ReplicaPoint | None:
        if not product:
            return None
        key = (product, pool.model, gpus, pool.slo.tpot_seconds)
        if key not in self._points:
            prof = find_profile(product, pool.model, gpus, self.profiles)
            self._points[key] = (
                replica_point(prof, pool.slo.tpot_seconds) if prof is not None else None
            )
        return self._points[key]

    def _pool_facts(self, key: str, pool: PlannedPool) -> tuple[set[str], str, float]:
        """Assigned nodes, a short listing of them, and the replica's tokens/s (cached)."""
        version = self.state.plan_version
        hit = self._pool_cache.get(key)
        if hit is None or hit[0] != version:
            allowed = pool.nodes()
            hit = (version, allowed, _listing(sorted(allowed)),
                   self._replica_tps(pool))
            self._pool_cache[key] = hit
        return hit[1], hit[2], hit[3]

    def _scope(self, pool_key: str, mode: str | None, planned: PlannedPool | None
               ) -> FilterScope:
        if mode is None:
            allowed, listing = (self._pool_facts(pool_key, planned)[:2] if planned
                                else (set(), ""))
            return FilterScope(pool_key, pool_key, None, f"pool {pool_key}", allowed, listing)
        version = self.state.plan_version
        hit = self._mode_cache.get((pool_key, mode))
        if hit is None or hit[0] != version:
            allowed = set(self.state.mode_shares(pool_key, mode))
            hit = (version, allowed, _listing(sorted(allowed), unit="mode"))
            if len(self._mode_cache) > _CACHE_LIMIT:
                self._mode_cache.clear()
            self._mode_cache[(pool_key, mode)] = hit
        return FilterScope(f"{pool_key}|{mode}", pool_key, mode,
                           f"pool {pool_key} mode {mode}", hit[1], hit[2])

    def _share_here(self, scope: FilterScope, node: str) -> tuple[int | None, int]:
        """(GPUs the plan gives the scope on ``node`` or None, GPUs it holds there)."""
        state = self.state
        if scope.mode is None:
            return (state.planned_share(scope.pool, node),
                    state.pool_gpus.get((node, scope.pool), 0))
        return (state.mode_shares(scope.pool, scope.mode).get(node),
                state.mode_gpus.get((node, scope.pool, scope.mode), 0))

    def _plan_mask(self, key: str, allowed: set[str], table: NodeTable
                   ) -> npt.NDArray[np.bool_]:
        version = self.state.plan_version
        hit = self._mask_cache.get(key)
        if hit is None or hit[0] != version or hit[1] is not table:
            mask = np.zeros(len(table.names) + 1, dtype=bool)  # last slot: unknown nodes
            for name in allowed:
                i = table.index.get(name)
                if i is not None:
                    mask[i] = True
            hit = (version, table, mask)
            if len(self._mask_cache) > _CACHE_LIMIT:  # keys come from pod labels: bound them
                self._mask_cache.clear()
            self._mask_cache[key] = hit
        return hit[2]

    def _gpus_per_instance(self, pod: Pod, pool: PlannedPool) -> int:
        g = pod.gpu_request()
        if g > 0:
            return g
        per = [a.gpus_per_instance for a in pool.assignments if a.gpus_per_instance > 0]
        return min(per) if per else 1

    # -- filter ------------------------------------------------------------------------------
    def filter(self, args: ExtenderArgs, raw: dict[str, Any]) -> ExtenderFilterResult:
        pod = self._check(args)
        pool_key = pod.pool
        full = args.nodes is not None
        items: list[Node] = (args.nodes.items or []) if args.nodes is not None else []
        names: list[str] = (
            [n.metadata.name for n in items] if full else list(args.node_names or [])
        )
        if pool_key is None:  # not ours: everything passes untouched
            return self._filter_result(args, raw, names, [True] * len(names), {}, {})
        if not full:
            self._need_cache()
        self._need_plan()
        state = self.state
        request = pod.gpu_request()
        planned = state.pool_plan(pool_key)
        failed: dict[str, str] = {}
        unresolvable: dict[str, str] = {}
        ok: list[bool] = []
        version = state.plan.version if state.plan else 0
        scope = self._scope(pool_key, pod.mode, planned)
        reserving = (self.s.reserve and request > 0 and planned is not None
                     and state.plan is not None)
        reserved: dict[str, int] = {}
        if reserving:  # this pod's earlier reservation (a retry) no longer holds
            self.reservations.prune(state)
            self.reservations.drop(pod.key)
            reserved = self.reservations.held(scope.pool, scope.mode)
        if not full and planned is not None and state.plan is not None:
            ok, failed, unresolvable = self._filter_names(names, scope, request, version,
                                                          reserved)
            if reserving:
                self._reserve_one(pod, scope, names, ok, failed, reserved)
            return self._filter_result(args, raw, names, ok, failed, unresolvable)
        for i, name in enumerate(names):
            reason, hard = self._node_verdict(
                name, items[i] if full else None, scope, planned, request, version, reserved,
            )
            if reason is None:
                ok.append(True)
                continue
            ok.append(False)
            (unresolvable if hard else failed)[name] = reason
            if self.metrics is not None:
                self.metrics.filtered_out.labels("plan" if hard else "capacity").inc()
        if reserving:
            self._reserve_one(pod, scope, names, ok, failed, reserved)
        return self._filter_result(args, raw, names, ok, failed, unresolvable)

    def refused_for_gpus(self, args: ExtenderArgs, result: ExtenderFilterResult) -> list[str]:
        """The candidates ``result`` refuses only for the GPUs counted there (the node's,
        or the plan's share of the pod's pool or mode), when it refuses every candidate:
        nodes the plan assigns and the node cache knows. Empty for pods that are not a
        pool's, and when some node passes (the pod is placed anyway)."""
        pod = args.pod
        if pod is None or pod.pool is None or result.error:
            return []
        if result.node_names or (result.nodes and result.nodes.get("items")):
            return []
        state = self.state
        planned = state.pool_plan(pod.pool)
        if planned is None or state.plan is None:
            return []
        allowed = self._scope(pod.pool, pod.mode, planned).allowed
        refused = [*result.failed_nodes, *result.failed_and_unresolvable_nodes]
        return [n for n in refused if n in allowed and n in state.nodes]

    def _reserve_one(self, pod: Pod, scope: FilterScope, names: list[str], ok: list[bool],
                     failed: dict[str, str], reserved: dict[str, int]) -> None:
        """Keep only the passing node with the most room left in the scope's planned share
        (first in request order on ties) and reserve the pod's GPUs there, so that the
        next pod's filter counts them before the binding shows in the watch
        (:mod:`joulepool.extender.reservations`). Edits ``ok`` and ``failed`` in place."""
        best, best_room = -1, 0.0
        for i, passed in enumerate(ok):
            if not passed:
                continue
            share, held = self._share_here(scope, names[i])
            room = (float("inf") if share is None
                    else share - held - reserved.get(names[i], 0))
            if best < 0 or room > best_room:
                best, best_room = i, room
        if best < 0:
            return
        chosen = names[best]
        for i, passed in enumerate(ok):
            if passed and i != best:
                ok[i] = False
                failed[names[i]] = (f"{scope.what}: this pod is reserved a place on "
                                    f"{chosen}, the node with most room in its share")
        self.reservations.add(pod.key, chosen, scope.pool, scope.mode, pod.gpu_request())

    def _share_arrays(self, scope: FilterScope, table: NodeTable
                      ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """(planned GPU share or NaN, GPUs held) per table row, for the pool or the
        (pool, mode) of ``scope``."""
        key = f"share:{scope.key}"
        state = self.state
        versions = (state.plan_version, state.pod_version)
        hit = self._arrays_cache.get(key)
        if hit is None or hit[0] != versions or hit[1] is not table:
            share = np.full(len(table.names), np.nan)
            held = np.zeros(len(table.names))
            pool_key, mode = scope.pool, scope.mode
            if mode is None:
                for i, name in enumerate(table.names):
                    s = state.planned_share(pool_key, name)
                    if s is not None:
                        share[i] = s
                for (node, pool), gpus in state.pool_gpus.items():
                    j = table.index.get(node)
                    if pool == pool_key and j is not None:
                        held[j] = gpus
            else:
                for name, s in state.mode_shares(pool_key, mode).items():
                    j = table.index.get(name)
                    if j is not None:
                        share[j] = s
                for (node, pool, m), gpus in state.mode_gpus.items():
                    j = table.index.get(node)
                    if pool == pool_key and m == mode and j is not None:
                        held[j] = gpus
            hit = (versions, table, share, held)
            if len(self._arrays_cache) > _CACHE_LIMIT:
                self._arrays_cache.clear()
            self._arrays_cache[key] = hit
        return hit[2], hit[3]

    def _filter_names(
        self, names: list[str], scope: FilterScope, request: int, version: int,
        reserved: dict[str, int],
    ) -> tuple[list[bool], dict[str, str], dict[str, str]]:
        """The NodeNames form, vectorised over the node table; same verdicts as
        :meth:`_node_verdict`, messages built only for rejected nodes. ``reserved``:
        GPUs of the scope reserved per node (placements not yet seen bound)."""
        table = self.state.table()
        n = len(names)
        idx = np.fromiter(map(table.index.get, names, repeat(-1)), dtype=np.int64, count=n)
        known = idx >= 0
        safe = np.where(known, idx, 0)
        allowed = scope.allowed
        mask = self._plan_mask(scope.key, allowed, table)
        in_plan = mask[idx]
        unknown_rows = np.flatnonzero(~known)
        for j in unknown_rows.tolist():  # nodes the plan names but the cache has not seen
            in_plan[j] = names[j] in allowed
        if len(table.names):
            alloc, used = table.allocatable[safe], table.used[safe]
            share_all, held_all = self._share_arrays(scope, table)
            share, held = share_all[safe], held_all[safe]
            if reserved:
                held = held + np.fromiter((reserved.get(name, 0) for name in names),
                                          dtype=np.float64, count=n)
        else:
            alloc = used = held = np.zeros(n)
            share = np.full(n, np.nan)
        short = known & (request > 0) & (alloc - used < request)
        over = known & (request > 0) & ~np.isnan(share) & (held + request > share)
        bad_plan = ~in_plan
        bad_cache = in_plan & ~known
        bad_cap = in_plan & known & short
        bad_share = in_plan & known & ~short & over
        ok_arr = ~(bad_plan | bad_cache | bad_cap | bad_share)
        failed: dict[str, str] = {}
        unresolvable: dict[str, str] = {}
        if bad_plan.any():
            msg = (f"plan v{version} does not assign {scope.what} to this node "
                   f"({scope.listing})")
            unresolvable.update(dict.fromkeys([names[i] for i in np.flatnonzero(bad_plan)], msg))
        if bad_cache.any():
            failed.update(dict.fromkeys([names[i] for i in np.flatnonzero(bad_cache)],
                                        "node not in the extender's node cache yet"))
        for i in np.flatnonzero(bad_cap).tolist():
            a, u = int(alloc[i]), int(used[i])
            failed[names[i]] = (
                f"insufficient nvidia.com/gpu: pod requests {request}, {max(a - u, 0)} "
                f"free ({a} allocatable, {u} requested by bound pods)"
            )
        for i in np.flatnonzero(bad_share).tolist():
            unresolvable[names[i]] = (
                f"{scope.what} would hold {int(held[i]) + request} GPUs here; "
                f"plan v{version} gives it {int(share[i])}"
            )
        if self.metrics is not None:
            hard, soft = int(bad_plan.sum() + bad_share.sum()), int(bad_cache.sum() + bad_cap.sum())
            if hard:
                self.metrics.filtered_out.labels("plan").inc(hard)
            if soft:
                self.metrics.filtered_out.labels("capacity").inc(soft)
        ok: list[bool] = ok_arr.tolist()
        return ok, failed, unresolvable

    def _node_verdict(
        self, name: str, node: Node | None, scope: FilterScope, planned: PlannedPool | None,
        request: int, version: int, reserved: dict[str, int],
    ) -> tuple[str | None, bool]:
        state = self.state
        if state.plan is None:
            return "no joulepool plan has been published yet", True
        if planned is None:
            return f"plan v{version} has no assignment for pool {scope.pool}", True
        if name not in scope.allowed:
            return (
                f"plan v{version} does not assign {scope.what} to this node "
                f"({scope.listing})", True
            )
        if node is not None:
            alloc = node.allocatable_gpus()
        else:
            rec = state.nodes.get(name)
            if rec is None:
                return "node not in the extender's node cache yet", False
            alloc = rec.allocatable_gpus
        used = state.used_gpus.get(name, 0)
        if request > 0 and alloc - used < request:
            return (
                f"insufficient nvidia.com/gpu: pod requests {request}, {max(alloc - used, 0)} "
                f"free ({alloc} allocatable, {used} requested by bound pods)", False
            )
        share, pool_used = self._share_here(scope, name)
        pool_used += reserved.get(name, 0)
        if share is not None and request > 0 and pool_used + request > share:
            return (
                f"{scope.what} would hold {pool_used + request} GPUs here; "
                f"plan v{version} gives it {share}", True
            )
        return None, False

    @staticmethod
    def _filter_result(
        args: ExtenderArgs, raw: dict[str, Any], names: list[str], ok: list[bool],
        failed: dict[str, str], unresolvable: dict[str, str],
    ) -> ExtenderFilterResult:
        nodes_out: dict[str, Any] | None = None
        if args.nodes is not None:
            raw_nodes = raw.get("Nodes") or {}
            raw_items = raw_nodes.get("items") or []
            nodes_out = {k: v for k, v in raw_nodes.items() if k != "items"}
            nodes_out["items"] = [it for it, good in zip(raw_items, ok, strict=False) if good]
        names_out = None
        if args.node_names is not None:
            names_out = [n for n, good in zip(names, ok, strict=True) if good]
        return ExtenderFilterResult(
            Nodes=nodes_out, NodeNames=names_out, FailedNodes=failed,
            FailedAndUnresolvableNodes=unresolvable,
        )

    # -- prioritize --------------------------------------------------------------------------
    def candidate_names(self, args: ExtenderArgs) -> list[str]:
        """The candidates, read as filter reads them: ``Nodes`` when it is present (even
        alongside ``NodeNames``, which kube-scheduler never sends together), else
        ``NodeNames``."""
        if args.nodes is not None:
            return [n.metadata.name for n in args.nodes.items or []]
        if args.node_names is not None:
            return list(args.node_names)
        return []

    def prioritize(self, args: ExtenderArgs) -> tuple[str, list[int]]:
        """(JSON HostPriorityList, scores) for the candidates, in request order."""
        pod = self._check(args)
        names = self.candidate_names(args)
        pool_key = pod.pool
        if pool_key is None or not names:
            return self.encode(names, None, [0] * len(names)), [0] * len(names)
        if args.nodes is None:
            self._need_cache()
        self._need_plan()
        planned = self.state.pool_plan(pool_key)
        if planned is None:
            return self.encode(names, None, [0] * len(names)), [0] * len(names)
        table = self.state.table()
        allowed, _, replica = self._pool_facts(pool_key, planned)
        if args.nodes is not None:
            idx, eps, cap, load = self._inputs_full(args.nodes.items or [], pod, planned, table)
            in_plan = np.fromiter((n in allowed for n in names), dtype=bool, count=len(names))
        else:
            idx, eps, cap, load = self._inputs_cached(names, pod, pool_key, planned, table)
            in_plan = self._plan_mask(pool_key, allowed, table)[idx]  # idx -1: the last slot
        with np.errstate(invalid="ignore", divide="ignore"):
            breakdown = placement_cost(
                eps, load, cap, replica, self.s.max_utilisation, self.s.lam
            )
        cost = np.where(in_plan & (cap > 0), breakdown.cost, np.inf)
        scores = scores_from_costs(cost)
        return self.encode(names, idx if args.node_names is not None else None, scores), scores

    def _product_luts(
        self, table: NodeTable, pool: PlannedPool, gpi: int
    ) -> tuple[FloatArray, FloatArray]:
        """eps (core.routing's marginal J/token of a replica at its batch) and instance
        tokens/s per product id (index 0: unknown product)."""
        eps = np.full(len(table.products) + 1, np.inf)
        tps = np.zeros(len(table.products) + 1)
        for i, product in enumerate(table.products):
            pt = self.point(product, pool, gpi)
            if pt is not None:
                eps[i + 1], tps[i + 1] = pt.marginal_eps, pt.tps
        return eps, tps

    def _replica_tps(self, pool: PlannedPool) -> float:
        tps, n = [], []
        for a in pool.assignments:
            pt = self.point(a.product, pool, a.gpus_per_instance)
            if pt is not None:
                tps.append(pt.tps)
                n.append(a.instances)
        return replica_demand_tps(tps, n, self.s.replica_utilisation)

    def _queue(self, table: NodeTable) -> FloatArray:
        if self.router is None:
            return np.zeros(len(table.names))
        return self.router.node_queue_tokens(table)

    def _table_arrays(
        self, pool_key: str, planned: PlannedPool, gpi: int, table: NodeTable
    ) -> tuple[FloatArray, FloatArray, FloatArray]:
        """eps, instance tokens/s and capacity per table row, plus a last row for
        unknown nodes (eps inf, capacity 0); cached per pool, plan and table."""
        key = f"{pool_key}/{gpi}"
        hit = self._table_cache.get(key)
        if hit is None or hit[0] != self.state.plan_version or hit[1] is not table:
            eps_lut, tps_lut = self._product_luts(table, planned, gpi)
            pid = np.append(table.product_ids + 1, 0)  # product 0: unknown
            eps, inst = eps_lut[pid], tps_lut[pid]
            cap = node_capacity_tps(np.append(table.allocatable, 0.0), gpi, inst)
            hit = (self.state.plan_version, table, eps, inst, cap)
            self._table_cache[key] = hit
        return hit[2], hit[3], hit[4]

    def _inputs_cached(
        self, names: list[str], pod: Pod, pool_key: str, planned: PlannedPool, table: NodeTable
    ) -> tuple[npt.NDArray[np.int64], FloatArray, FloatArray, FloatArray]:
        gpi = self._gpus_per_instance(pod, planned)
        idx = np.fromiter(map(table.index.get, names, repeat(-1)), dtype=np.int64,
                          count=len(names))  # -1 (unknown) reads the sentinel last row
        eps_t, inst_t, cap_t = self._table_arrays(pool_key, planned, gpi, table)
        queue_t = np.append(self._queue(table), 0.0)
        used_t = np.append(table.used, 0.0)
        load_t = node_load_tps(used_t, gpi, inst_t, self.s.replica_utilisation, queue_t,
                               self.s.queue_horizon_s)
        return idx, eps_t[idx], cap_t[idx], load_t[idx]

    def _inputs_full(
        self, nodes: list[Node], pod: Pod, planned: PlannedPool, table: NodeTable
    ) -> tuple[npt.NDArray[np.int64], FloatArray, FloatArray, FloatArray]:
        gpi = self._gpus_per_instance(pod, planned)
        n = len(nodes)
        eps = np.full(n, np.inf)
        inst = np.zeros(n)
        alloc = np.zeros(n)
        used = np.zeros(n)
        queue = np.zeros(n)
        queue_all = self._queue(table)
        for i, node in enumerate(nodes):
            rec = NodeRecord.from_node(node)
            pt = self.point(rec.product, planned, gpi)
            if pt is not None:
                eps[i], inst[i] = pt.marginal_eps, pt.tps
            alloc[i] = rec.allocatable_gpus
            used[i] = self.state.used_gpus.get(rec.name, 0)
            j = table.index.get(rec.name)
            if j is not None:
                queue[i] = queue_all[j]
        cap = node_capacity_tps(alloc, gpi, inst)
        load = node_load_tps(used, gpi, inst, self.s.replica_utilisation, queue,
                             self.s.queue_horizon_s)
        idx = np.full(n, -1, dtype=np.int64)
        return idx, eps, cap, load

    def encode(
        self, names: list[str], idx: npt.NDArray[np.int64] | None, scores: list[int]
    ) -> str:
        """HostPriorityList JSON, built from pre-encoded host prefixes when known."""
        suffix = _SCORE_SUFFIX
        if idx is not None and (idx.size == 0 or int(idx.min()) >= 0):
            encoded = self.state.table().host_scores()[idx, np.asarray(scores, dtype=np.int64)]
            return "[" + ",".join(encoded.tolist()) + "]"
        if idx is not None:
            prefixes = self.state.table().host_prefix
            parts = [
                (prefixes[i] if i >= 0 else host_prefix(n)) + suffix[s]
                for n, i, s in zip(names, idx.tolist(), scores, strict=True)
            ]
        else:
            parts = [host_prefix(n) + suffix[s] for n, s in zip(names, scores, strict=True)]
        return "[" + ",".join(parts) + "]"


def neutral_priorities(names: list[str]) -> str:
    return json.dumps([{"Host": n, "Score": 0} for n in names])
