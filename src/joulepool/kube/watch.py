"""List + watch of Nodes, Pods and the plan ConfigMap, in threads, into the node cache.

Each resource runs the usual informer loop with the synchronous kubernetes
client in a daemon thread:

    list (resourceVersion R) -> replace the cache's copy -> mark synced
    watch from R, tracking R from every event and BOOKMARK
    stream ends (server timeout)          -> watch again from R
    410 Gone / ERROR event with code 410  -> list again at once
    any other error                       -> back off (1 s doubling to 30 s, jittered), list again

Events are applied on the event loop thread (``call_soon_threadsafe``), so the
cache is only ever mutated there. Objects are handled as raw JSON dicts
(``_preload_content=False``) and validated by :mod:`joulepool.kube.objects`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from joulepool.api.plan import PLAN_KEY
from joulepool.kube.metrics import ServiceMetrics as Metrics
from joulepool.kube.state import ClusterState

log = logging.getLogger(__name__)

Event = dict[str, Any]
ListFn = Callable[[], tuple[list[dict[str, Any]], str]]
WatchFn = Callable[[str], Iterable[Event]]


class Expired(Exception):
    """The resourceVersion is too old (HTTP 410 Gone): list again."""


class WatchError(Exception):
    pass


@dataclass
class Handlers:
    """Callbacks run on the event loop thread."""

    replace: Callable[[list[dict[str, Any]]], None]
    upsert: Callable[[dict[str, Any]], None]
    delete: Callable[[dict[str, Any]], None]
    synced: Callable[[], None]


class Watcher:
    """One resource's list/watch loop in a daemon thread."""

    def __init__(
        self, name: str, list_fn: ListFn, watch_fn: WatchFn, handlers: Handlers,
        deliver: Callable[..., None], stop: threading.Event, metrics: Metrics | None = None,
        backoff_initial: float = 1.0, backoff_max: float = 30.0,
    ) -> None:
        self.name = name
        self.list_fn = list_fn
        self.watch_fn = watch_fn
        self.h = handlers
        self.deliver = deliver
        self.stop = stop
        self.metrics = metrics
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.restarts: list[str] = []
        self.thread = threading.Thread(target=self.run, name=f"watch-{name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _restart(self, reason: str) -> None:
        self.restarts.append(reason)
        if self.metrics is not None:
            self.metrics.watch_restarts.labels(self.name, reason).inc()

    def run(self) -> None:
        backoff = self.backoff_initial
        while not self.stop.is_set():
            try:
                items, rv = self.list_fn()
                self.deliver(self.h.replace, items)
                self.deliver(self.h.synced)
                backoff = self.backoff_initial
                while not self.stop.is_set():
                    rv = self._watch(rv)
            except Expired:
                log.info("watch %s: resourceVersion expired, listing again", self.name)
                self._restart("expired")
            except Exception as exc:
                if self.stop.is_set():
                    break
                log.warning("watch %s failed (%s); retrying in %.1fs", self.name, exc, backoff)
                self._restart("error")
                self.stop.wait(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, self.backoff_max)

    def _watch(self, rv: str) -> str:
        for ev in self.watch_fn(rv):
            if self.stop.is_set():
                break
            kind = ev.get("type")
            obj = ev.get("object")
            if not isinstance(obj, dict):
                continue
            if kind == "ERROR":
                if obj.get("code") == 410:
                    raise Expired()
                raise WatchError(f"{obj.get('reason')}: {obj.get('message')}")
            meta = obj.get("metadata") or {}
            rv = str(meta.get("resourceVersion") or rv)
            if kind in ("ADDED", "MODIFIED"):
                self.deliver(self.h.upsert, obj)
            elif kind == "DELETED":
                self.deliver(self.h.delete, obj)
        return rv


def loop_deliver(loop: asyncio.AbstractEventLoop) -> Callable[..., None]:
    """Run a callback on the loop thread, logging (not raising) malformed objects."""

    def safe(fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:
            log.warning("ignoring event: %s", exc)

    def deliver(fn: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # loop closed during shutdown
            loop.call_soon_threadsafe(safe, fn, *args)

    return deliver


# --------------------------------------------------------------------------
# Handlers into the node cache
# --------------------------------------------------------------------------
def _key(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def _plan_text(obj: dict[str, Any] | None) -> str | None:
    if obj is None:
        return None
    data = obj.get("data") or {}
    text = data.get(PLAN_KEY)
    return text if isinstance(text, str) else None


def node_handlers(state: ClusterState) -> Handlers:
    return Handlers(
        replace=state.replace_nodes,
        upsert=state.upsert_node,
        delete=lambda o: state.delete_node(str((o.get("metadata") or {}).get("name", ""))),
        synced=lambda: state.mark_synced("nodes"),
    )


def pod_handlers(state: ClusterState) -> Handlers:
    return Handlers(
        replace=state.replace_pods,
        upsert=state.upsert_pod,
        delete=lambda o: state.delete_pod(_key(o)),
        synced=lambda: state.mark_synced("pods"),
    )


def plan_handlers(state: ClusterState, metrics: Metrics | None = None) -> Handlers:
    def load(text: str | None) -> None:
        if not state.set_plan_json(text) and metrics is not None:
            metrics.plan_errors.inc()

    return Handlers(
        replace=lambda items: load(_plan_text(items[0]) if items else None),
        upsert=lambda o: load(_plan_text(o)),
        delete=lambda o: load(None),
        synced=lambda: state.mark_synced("plan"),
    )


# --------------------------------------------------------------------------
# The kubernetes client side
# --------------------------------------------------------------------------
def _iter_events(resp: Any) -> Iterator[Event]:
    from kubernetes.watch.watch import iter_resp_lines

    try:
        for line in iter_resp_lines(resp):
            if line and not line.isspace():
                yield json.loads(line)
    finally:
        resp.close()
        resp.release_conn()


def kube_list_watch(
    fn: Callable[..., Any], timeout_s: int, **kwargs: Any
) -> tuple[ListFn, WatchFn]:
    """List and watch functions over one CoreV1Api list method (raw JSON)."""
    from kubernetes.client.exceptions import ApiException

    def list_fn() -> tuple[list[dict[str, Any]], str]:
        resp = fn(_preload_content=False, _request_timeout=(10, 120), **kwargs)
        body = json.loads(resp.data)
        return list(body.get("items") or []), str((body.get("metadata") or {}).get(
            "resourceVersion", ""))

    def watch_fn(rv: str) -> Iterator[Event]:
        try:
            resp = fn(
                watch=True, resource_version=rv, allow_watch_bookmarks=True,
                timeout_seconds=timeout_s, _preload_content=False,
                _request_timeout=(10, timeout_s + 30), **kwargs,
            )
        except ApiException as exc:
            if exc.status == 410:
                raise Expired() from None
            raise
        yield from _iter_events(resp)

    return list_fn, watch_fn


def load_kube_config(kubeconfig: str | None) -> Any:
    """An ApiClient: in-cluster config, else the kubeconfig."""
    from kubernetes import client, config

    if kubeconfig is None:
        try:
            config.load_incluster_config()
            return client.ApiClient()
        except config.ConfigException:
            pass
    cfg = client.Configuration()
    config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    return client.ApiClient(cfg)


def cluster_watchers(
    api_client: Any, state: ClusterState, namespace: str, configmap: str, timeout_s: int,
    deliver: Callable[..., None], stop: threading.Event, metrics: Metrics | None = None,
    nodes: bool = True, plan: bool = True,
) -> list[Watcher]:
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    out: list[Watcher] = []
    if nodes:
        lf, wf = kube_list_watch(core.list_node, timeout_s)
        out.append(Watcher("nodes", lf, wf, node_handlers(state), deliver, stop, metrics))
        lf, wf = kube_list_watch(
            core.list_pod_for_all_namespaces, timeout_s,
            field_selector="status.phase!=Succeeded,status.phase!=Failed",
        )
        out.append(Watcher("pods", lf, wf, pod_handlers(state), deliver, stop, metrics))
    if plan:
        lf, wf = kube_list_watch(
            core.list_namespaced_config_map, timeout_s, namespace=namespace,
            field_selector=f"metadata.name={configmap}",
        )
        out.append(Watcher("plan", lf, wf, plan_handlers(state, metrics), deliver, stop, metrics))
    return out


def node_pods_lister(api_client: Any, timeout_s: float) -> Callable[[str], list[dict[str, Any]]]:
    """A function listing every pod bound to one node (raw JSON), read from the API
    server itself (no ``resourceVersion``: a quorum read, newer than any watch event
    already delivered). Blocking: call it from a thread."""
    from kubernetes import client

    core = client.CoreV1Api(api_client)

    def list_node(node: str) -> list[dict[str, Any]]:
        resp: Any = core.list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={node}", _preload_content=False,
            _request_timeout=(timeout_s, timeout_s))
        return list(json.loads(resp.data).get("items") or [])

    return list_node
