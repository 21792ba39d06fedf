"""The node cache: Nodes, Pods (GPU accounting, endpoints) and the plan.

Fed by the Kubernetes watches (``watch.py``), by static files (``files.py``)
or directly by tests. Every mutation runs on the event loop thread (the watch
threads hand events over with ``call_soon_threadsafe``), so readers never see
a half-applied event and need no locks.

Hot paths (prioritize over thousands of nodes) read :class:`NodeTable`, a
columnar snapshot rebuilt only when nodes or pods change.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import ValidationError

from joulepool.api.contract import ENGINE_PORT, GPU_PRODUCT_LABEL, REGION_LABEL
from joulepool.api.plan import PlanDocument, PlannedPool
from joulepool.core.cost import MAX_SCORE as MAX_EXTENDER_PRIORITY
from joulepool.core.profiles import product_for_label
from joulepool.kube.objects import Node, Pod

log = logging.getLogger(__name__)

SOURCES = ("nodes", "pods", "plan")
#: pods remembered as confirmed gone or terminating (:meth:`ClusterState.confirm_pods`)
_CONFIRMED_LIMIT = 4096


@dataclass(frozen=True)
class NodeRecord:
    name: str
    product: str | None  # core product name (H100, A100, L4) or None if unknown
    product_label: str
    site: str
    allocatable_gpus: int

    @classmethod
    def from_node(cls, node: Node) -> NodeRecord:
        label = node.label(GPU_PRODUCT_LABEL)
        product = product_for_label(label) if label else None
        return cls(
            name=node.metadata.name,
            product=product.name if product else None,
            product_label=label,
            site=node.label(REGION_LABEL),
            allocatable_gpus=node.allocatable_gpus(),
        )


@dataclass(frozen=True)
class PodRecord:
    key: str
    node: str
    pool: str | None
    gpus: int
    ready: bool
    ip: str
    port: int
    #: serving mode label (``4xH100``); None when absent. Last field: keeps positional order
    mode: str | None = None
    #: serving engine label (``vllm``, ``sglang``); None: detect from the metrics page
    engine: str | None = None
    #: deletion requested (``metadata.deletionTimestamp`` set): the pod is going away
    terminating: bool = False
    #: ``metadata.uid``: tells this pod from a later one of the same name
    uid: str = ""
    #: a joulepool node agent (it publishes the GPU energy of the serving pods)
    node_agent: bool = False

    @classmethod
    def from_pod(cls, pod: Pod, default_port: int) -> PodRecord:
        return cls(
            key=pod.key,
            node=pod.spec.node_name,
            pool=pod.pool,
            gpus=pod.gpu_request(),
            ready=pod.ready,
            ip=pod.status.pod_ip,
            port=pod.serving_port(default_port),
            mode=pod.mode if pod.pool else None,
            engine=pod.engine,
            terminating=pod.metadata.deletion_timestamp is not None,
            uid=pod.metadata.uid,
            node_agent=pod.node_agent,
        )

    @property
    def holds_gpus(self) -> bool:
        """Bound and requesting GPUs: counted on its node until it is deleted (as
        kube-scheduler counts it, terminating or not)."""
        return bool(self.node) and self.gpus > 0

    @property
    def holds_share(self) -> bool:
        """Counted against its pool's (and mode's) planned share: bound, requesting GPUs
        and not terminating, so a replacement of a deleted pod gets its place at once."""
        return self.holds_gpus and not self.terminating


@dataclass
class NodeTable:
    """Columnar snapshot of the node cache for vectorised scoring."""

    names: list[str]
    index: dict[str, int]
    allocatable: npt.NDArray[np.float64]
    used: npt.NDArray[np.float64]
    product_ids: npt.NDArray[np.int64]  # into ``products``; -1 unknown
    products: list[str]
    #: pre-encoded ``{"Host":"<name>","Score":`` per node, for fast responses
    host_prefix: list[str] = field(repr=False)
    _host_scores: npt.NDArray[np.object_] | None = field(default=None, repr=False)

    def host_scores(self) -> npt.NDArray[np.object_]:
        """``{"Host":"<name>","Score":<s>}`` for every node (rows) and score 0..10 (columns)."""
        if self._host_scores is None:
            table = np.empty((len(self.names), MAX_EXTENDER_PRIORITY + 1), dtype=object)
            for i, prefix in enumerate(self.host_prefix):
                table[i, :] = [f"{prefix}{s}}}" for s in range(MAX_EXTENDER_PRIORITY + 1)]
            self._host_scores = table
        return self._host_scores


def host_prefix(name: str) -> str:
    return '{"Host":' + json.dumps(name) + ',"Score":'


class ClusterState:
    """Everything a service knows about the cluster, and when it last changed."""

    def __init__(self, default_port: int = ENGINE_PORT) -> None:
        self.default_port = default_port
        self.nodes: dict[str, NodeRecord] = {}
        self.pods: dict[str, PodRecord] = {}
        self.plan: PlanDocument | None = None
        self.synced: dict[str, bool] = dict.fromkeys(SOURCES, False)
        self.plan_error: str = ""
        self.node_version = 0
        self.pod_version = 0
        self.plan_version = 0
        # aggregates kept incrementally from pod events
        #: GPUs requested per node by bound pods, terminating ones included
        self.used_gpus: dict[str, int] = {}
        #: GPUs held per (node, pool) by bound pods that are not terminating
        self.pool_gpus: dict[tuple[str, str], int] = {}
        #: the same per (node, pool, mode), for pods carrying both labels
        self.mode_gpus: dict[tuple[str, str, str], int] = {}
        self.pool_pods: dict[str, set[str]] = {}
        #: keys of the node agent pods
        self.node_agents: set[str] = set()
        #: per (pool, mode): plan version and the GPUs the plan gives it per node
        self._mode_shares: dict[tuple[str, str], tuple[int, dict[str, int]]] = {}
        #: called with the key of every pod that leaves the cache (deleted, terminal,
        #: missing from a re-list), e.g. to release what was held for it
        self.pod_gone_hooks: list[Callable[[str], None]] = []
        #: uid -> what a fresh read of the API server showed about a pod the watch has not
        #: caught up with yet ("gone" or "terminating"; :meth:`confirm_pods`); older watch
        #: events about that pod are not allowed to undo it
        self._confirmed: dict[str, str] = {}
        #: pools whose endpoints changed since the router last looked (None: all)
        self._dirty_pools: set[str] | None = None
        self._table: NodeTable | None = None
        self._table_versions = (-1, -1)

    # -- readiness -----------------------------------------------------------
    def mark_synced(self, source: str, synced: bool = True) -> None:
        if source not in self.synced:
            raise ValueError(f"unknown source {source!r}")
        self.synced[source] = synced

    @property
    def ready(self) -> bool:
        return all(self.synced.values())

    def not_synced(self) -> list[str]:
        return [s for s, ok in self.synced.items() if not ok]

    # -- nodes -----------------------------------------------------------------
    def upsert_node(self, obj: Node | Mapping[str, Any]) -> None:
        node = obj if isinstance(obj, Node) else Node.model_validate(obj)
        if not node.metadata.name:
            return
        rec = NodeRecord.from_node(node)
        if self.nodes.get(rec.name) != rec:
            self.nodes[rec.name] = rec
            self._node_changed()

    def delete_node(self, name: str) -> None:
        if self.nodes.pop(name, None) is not None:
            self._node_changed()

    def replace_nodes(self, objs: Iterable[Node | Mapping[str, Any]]) -> None:
        """A fresh list (initial list or re-list after 410): forget nodes not in it."""
        recs: dict[str, NodeRecord] = {}
        for obj in objs:
            try:
                node = obj if isinstance(obj, Node) else Node.model_validate(obj)
            except ValidationError as exc:
                log.warning("ignoring malformed Node: %s", exc.errors()[0]["msg"])
                continue
            if node.metadata.name:
                recs[node.metadata.name] = NodeRecord.from_node(node)
        if recs != self.nodes:
            self.nodes = recs
            self._node_changed()

    def _node_changed(self) -> None:
        self.node_version += 1
        self._dirty_pools = None

    # -- pods ------------------------------------------------------------------
    def _account(self, rec: PodRecord, sign: int) -> None:
        if rec.holds_gpus:
            self.used_gpus[rec.node] = self.used_gpus.get(rec.node, 0) + sign * rec.gpus
            if self.used_gpus[rec.node] == 0:
                del self.used_gpus[rec.node]
        if rec.pool and rec.holds_share:
            k = (rec.node, rec.pool)
            self.pool_gpus[k] = self.pool_gpus.get(k, 0) + sign * rec.gpus
            if self.pool_gpus[k] == 0:
                del self.pool_gpus[k]
            if rec.mode:
                m = (rec.node, rec.pool, rec.mode)
                self.mode_gpus[m] = self.mode_gpus.get(m, 0) + sign * rec.gpus
                if self.mode_gpus[m] == 0:
                    del self.mode_gpus[m]
        if rec.node_agent:
            if sign > 0:
                self.node_agents.add(rec.key)
            else:
                self.node_agents.discard(rec.key)
        if rec.pool:
            members = self.pool_pods.setdefault(rec.pool, set())
            if sign > 0:
                members.add(rec.key)
            else:
                members.discard(rec.key)
                if not members:
                    del self.pool_pods[rec.pool]
            if self._dirty_pools is not None:
                self._dirty_pools.add(rec.pool)

    def upsert_pod(self, obj: Pod | Mapping[str, Any]) -> None:
        pod = obj if isinstance(obj, Pod) else Pod.model_validate(obj)
        if not pod.metadata.name:
            return
        if pod.terminal:  # Succeeded/Failed pods hold no resources
            self.delete_pod(pod.key)
            return
        rec = PodRecord.from_pod(pod, self.default_port)
        seen = self._confirmed.get(rec.uid) if rec.uid else None
        if seen == "gone":  # an event older than what the API server already said
            return
        if seen == "terminating" and not rec.terminating:
            rec = replace(rec, terminating=True)
        old = self.pods.get(rec.key)
        if old == rec:
            return
        if old is not None:
            self._account(old, -1)
        self.pods[rec.key] = rec
        self._account(rec, +1)
        self.pod_version += 1

    def delete_pod(self, key: str) -> None:
        old = self.pods.pop(key, None)
        if old is not None:
            self._account(old, -1)
            self.pod_version += 1
            if self._confirmed.get(old.uid) == "terminating":
                del self._confirmed[old.uid]
        self._pod_gone(key)

    def pods_holding_gpus(self, node: str) -> dict[str, str]:
        """key -> uid of the pods the cache counts on ``node``'s GPUs."""
        return {r.key: r.uid for r in self.pods.values() if r.node == node and r.holds_gpus}

    def confirm_pods(self, seen: Mapping[str, str], fresh: Iterable[Mapping[str, Any]]
                     ) -> int:
        """Correct the cache with a read of the API server newer than the watch.

        ``seen``: key -> uid of pods the cache held *before* the read was issued;
        ``fresh``: the pods the read returned (raw JSON; e.g. every pod bound to one node).
        A pod of ``seen`` missing from ``fresh`` has been deleted, one there with a
        ``deletionTimestamp`` (or terminal) is going away: the cache drops it, or marks it
        terminating, now rather than when the watch delivers those events (which stay
        harmless: events older than the read cannot bring it back). Pods the cache came
        to hold after the read began are untouched. Returns the number of corrections.
        """
        now: dict[str, tuple[bool, bool]] = {}  # uid -> (terminating, terminal)
        for obj in fresh:
            meta = obj.get("metadata") or {}
            uid = str(meta.get("uid") or "")
            phase = (obj.get("status") or {}).get("phase")
            now[uid] = (meta.get("deletionTimestamp") is not None,
                        phase in ("Succeeded", "Failed"))
        fixed = 0
        for key, uid in seen.items():
            rec = self.pods.get(key)
            if rec is None or not uid or rec.uid != uid:
                continue  # already gone or replaced by a later pod of the same name
            terminating, terminal = now.get(uid, (False, True))
            if terminal:
                self._remember(uid, "gone")
                self.delete_pod(key)
                fixed += 1
            elif terminating and not rec.terminating:
                self._remember(uid, "terminating")
                self._account(rec, -1)
                rec = replace(rec, terminating=True)
                self.pods[key] = rec
                self._account(rec, +1)
                self.pod_version += 1
                fixed += 1
        return fixed

    def _remember(self, uid: str, what: str) -> None:
        if len(self._confirmed) >= _CONFIRMED_LIMIT:  # forget the oldest
            del self._confirmed[next(iter(self._confirmed))]
        self._confirmed[uid] = what

    def _pod_gone(self, key: str) -> None:
        for hook in self.pod_gone_hooks:
            hook(key)

    def replace_pods(self, objs: Iterable[Pod | Mapping[str, Any]]) -> None:
        fresh: dict[str, PodRecord] = {}
        for obj in objs:
            try:
                pod = obj if isinstance(obj, Pod) else Pod.model_validate(obj)
            except ValidationError as exc:
                log.warning("ignoring malformed Pod: %s", exc.errors()[0]["msg"])
                continue
            if pod.metadata.name and not pod.terminal:
                fresh[pod.key] = PodRecord.from_pod(pod, self.default_port)
        self._confirmed.clear()  # a full list is newer than every earlier read
        for key in set(self.pods) - set(fresh):
            self._pod_gone(key)
        if fresh == self.pods:
            return
        self.pods = {}
        self.used_gpus.clear()
        self.pool_gpus.clear()
        self.mode_gpus.clear()
        self.pool_pods.clear()
        self.node_agents.clear()
        for rec in fresh.values():
            self.pods[rec.key] = rec
            self._account(rec, +1)
        self.pod_version += 1
        self._dirty_pools = None

    # -- plan --------------------------------------------------------------------
    def set_plan(self, plan: PlanDocument | None) -> None:
        self.plan = plan
        self.plan_error = ""
        self.plan_version += 1
        self._dirty_pools = None

    def set_plan_json(self, text: str | None) -> bool:
        """Load the plan from ConfigMap/file text; on bad input keep the last good plan."""
        if text is None:
            self.set_plan(None)
            return True
        try:
            plan = PlanDocument.from_json(text)
        except (ValidationError, ValueError) as exc:
            msg = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
            self.plan_error = f"invalid plan, keeping the previous one: {msg}"
            log.error("%s", self.plan_error)
            return False
        self.set_plan(plan)
        return True

    def pool_plan(self, pool: str) -> PlannedPool | None:
        return self.plan.pools.get(pool) if self.plan else None

    def planned_share(self, pool: str, node: str) -> int | None:
        """GPUs the plan gives ``pool`` on ``node`` (None when the plan says nothing)."""
        if self.plan is None:
            return None
        pn = self.plan.nodes.get(node)
        if pn is not None and pool in pn.pools:
            return pn.pools[pool]
        pp = self.plan.pools.get(pool)
        if pp is None:
            return None
        total = [a.gpus for a in pp.assignments if a.node == node and a.instances > 0]
        return sum(total) if total else None

    def mode_shares(self, pool: str, mode: str) -> dict[str, int]:
        """GPUs the plan gives ``(pool, mode)`` per node: instances x gpusPerInstance
        summed over that mode's assignments with instances > 0 (cached per plan).

        Its keys are the nodes the plan lets pods of that mode use; empty when the
        plan or the pool is missing or the pool has no such mode."""
        hit = self._mode_shares.get((pool, mode))
        if hit is not None and hit[0] == self.plan_version:
            return hit[1]
        shares: dict[str, int] = {}
        pp = self.pool_plan(pool)
        for a in pp.assignments if pp is not None else ():
            if a.mode == mode and a.instances > 0:
                shares[a.node] = shares.get(a.node, 0) + a.instances * a.gpus_per_instance
        if len(self._mode_shares) > 4096:  # pools and modes churn with plans: bound it
            self._mode_shares.clear()
        self._mode_shares[(pool, mode)] = (self.plan_version, shares)
        return shares

    # -- derived -------------------------------------------------------------------
    def take_dirty_pools(self) -> set[str] | None:
        """Pools whose endpoints may have changed (None: all of them); resets the set."""
        dirty = self._dirty_pools
        self._dirty_pools = set()
        return dirty

    def table(self) -> NodeTable:
        versions = (self.node_version, self.pod_version)
        if self._table is not None and self._table_versions == versions:
            return self._table
        old = self._table
        if old is not None and self._table_versions[0] == self.node_version:
            used = np.fromiter(
                (self.used_gpus.get(n, 0) for n in old.names), dtype=np.float64,
                count=len(old.names),
            )
            self._table = NodeTable(
                old.names, old.index, old.allocatable, used, old.product_ids, old.products,
                old.host_prefix, old._host_scores,
            )
        else:
            names = sorted(self.nodes)
            products = sorted({r.product for r in self.nodes.values() if r.product})
            pid = {p: i for i, p in enumerate(products)}
            recs = [self.nodes[n] for n in names]
            self._table = NodeTable(
                names=names,
                index={n: i for i, n in enumerate(names)},
                allocatable=np.array([r.allocatable_gpus for r in recs], dtype=np.float64),
                used=np.array([self.used_gpus.get(n, 0) for n in names], dtype=np.float64),
                product_ids=np.array(
                    [pid[r.product] if r.product else -1 for r in recs], dtype=np.int64
                ),
                products=products,
                host_prefix=[host_prefix(n) for n in names],
            )
        self._table_versions = versions
        return self._table
