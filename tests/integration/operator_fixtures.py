"""Test harness for the operator: a kmock API server (HTTP, real watch streams) and
the real operator (kopf.operator in a task of the same event loop) talking to it.

Kept operator-specific and out of conftest.py; the benchmark reuses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import attrs
import jsonpatch
import kmock
from kmock._internal.k8s import KubernetesError, KubernetesObjectNotFoundError

from joulepool.api.plan import PLAN_CONFIGMAP, PLAN_KEY, PlanDocument
from joulepool.operator.app import Operator
from joulepool.operator.config import OperatorConfig

OP_NAMESPACE = "joulepool-system"
API = "joulepool.dev/v1alpha1"

RESOURCES: dict[str, kmock.ResourceInfo] = {
    "joulepool.dev/v1alpha1/inferencepools": kmock.ResourceInfo(
        kind="InferencePool", singular="inferencepool", namespaced=True,
        shortnames={"jpool"}, subresources={"status"},
        verbs={"get", "list", "watch", "create", "update", "patch", "delete"}),
    "joulepool.dev/v1alpha1/gpuprofiles": kmock.ResourceInfo(
        kind="GPUProfile", singular="gpuprofile", namespaced=False,
        verbs={"get", "list", "watch", "create", "update", "patch", "delete"}),
    "joulepool.dev/v1alpha1/energypolicies": kmock.ResourceInfo(
        kind="EnergyPolicy", singular="energypolicy", namespaced=False,
        verbs={"get", "list", "watch", "create", "update", "patch", "delete"}),
    "v1/nodes": kmock.ResourceInfo(
        kind="Node", singular="node", namespaced=False,
        verbs={"get", "list", "watch", "create", "update", "patch", "delete"}),
    "v1/configmaps": kmock.ResourceInfo(
        kind="ConfigMap", singular="configmap", namespaced=True,
        verbs={"get", "list", "watch", "create", "update", "patch", "delete"}),
    "v1/events": kmock.ResourceInfo(
        kind="Event", singular="event", namespaced=True, verbs={"create", "list"}),
    "v1/namespaces": kmock.ResourceInfo(
        kind="Namespace", singular="namespace", namespaced=False,
        verbs={"get", "list", "watch"}),
    "apps/v1/deployments": kmock.ResourceInfo(
        kind="Deployment", singular="deployment", namespaced=True,
        verbs={"get", "list", "watch", "create", "update", "patch", "delete"}),
}


@dataclass
class Fault:
    """Answer matching requests with an error, before the emulator touches any state."""

    method: str
    path_contains: str
    status: int
    times: int = 1
    hits: int = 0

    def matches(self, request: Any) -> bool:
        return (self.hits < self.times and str(request.method).upper().endswith(self.method)
                and self.path_contains in str(request.url.path))


_CURRENT_REQUEST: contextvars.ContextVar[Any] = contextvars.ContextVar("kmock_request")


@attrs.define(kw_only=True)
class FaultyEmulator(kmock.KubernetesEmulator):  # type: ignore[misc]
    """kmock's emulator, a little closer to a real API server, with injectable faults.

    * ``metadata.resourceVersion`` on every write, ``uid``/``generation``/
      ``creationTimestamp`` (and a name from ``generateName``) on create,
      ``generation`` bumped when a patch touches ``spec`` (kopf's JSON patches
      test the resourceVersion; a failed test is answered 422, as kube-apiserver
      does); a watch from a resourceVersion replays only newer objects;
    * O(1) per request (kmock 0.8 scans its whole request history and every
      object on each request: minutes for the benchmark);
    * ``faults``: answer matching requests with an error *before* any state
      changes (a real API server that answers 409 or 500 has applied nothing).
    """

    faults: list[Fault] = attrs.field(factory=list)
    #: seeded random faults (operator_chaos.Chaos): ``verdict(request)`` -> None,
    #: ("error", status), ("after", status): applied, then answered with the error, or
    #: ("slow", seconds)
    chaos: Any = None
    requests_served: int = 0
    _last_rv: int = 1000

    def __iter__(self) -> Iterator[Any]:
        # kmock 0.8 matches every request against its reactions by scanning the whole
        # request history (O(n) per request, O(n^2) in all: minutes for a few thousand
        # requests). The reactions here are only the emulator's own fallbacks, which need
        # just the request at hand: the one this task is serving.
        current = _CURRENT_REQUEST.get(None)
        if current is not None:
            yield current

    def _next_rv(self) -> str:
        self._last_rv += 1
        return str(self._last_rv)

    async def _serve_list(self, request: Any) -> Any:
        rv = str(self._last_rv)  # before the snapshot: a change in between is replayed, not lost
        result = await super()._serve_list(request)
        result["metadata"]["resourceVersion"] = rv
        return result

    # kmock 0.8 finds the one object of a fetch/create/patch/delete by scanning all objects;
    # these look it up by key (same answers, O(1)).
    def _lookup(self, request: Any, namespace: str | None, name: str | None) -> Any:
        key = (request.resource, namespace, name)
        obj = self.objects[key] if key in self.objects else None  # noqa: SIM401 (no .get)
        if obj is None or (obj.deleted and request.action == kmock.action.FETCH):
            raise KubernetesObjectNotFoundError()
        return obj

    async def _serve_fetch(self, request: Any) -> Any:
        return self._lookup(request, request.namespace, request.name).raw

    async def _serve_create(self, request: Any) -> Any:
        meta = (request.data or {}).get("metadata") or {}
        obj = self._lookup(request, request.namespace or meta.get("namespace"),
                           request.name or meta.get("name"))
        return obj.raw

    async def _serve_update(self, request: Any) -> Any:
        return self._lookup(request, request.namespace, request.name).last.raw

    async def _serve_delete(self, request: Any) -> Any:
        return self._lookup(request, request.namespace, request.name).last.raw

    async def _serve_watch(self, request: Any) -> AsyncIterator[Any]:
        """Like kmock's, but a watch from a resourceVersion replays only newer objects
        (kmock replays every object, so kopf would see stale bodies after its own patches)."""
        yield b""
        since = str(request.params.get("resourceVersion") or "")
        bus = self._buses[request.resource]
        async with self._lock:
            marker = await bus.mark()
            events = []
            for (res, ns, _name), obj in self.objects.items():
                if res != request.resource or obj.deleted:
                    continue
                if request.namespace is not None and ns != request.namespace:
                    continue
                raw = obj.raw
                rv = str((raw.get("metadata") or {}).get("resourceVersion") or "0")
                if since.isdigit() and rv.isdigit() and int(rv) <= int(since):
                    continue
                events.append({"type": "ADDED", "object": raw})
        # No explicit bus.unmark(): awaiting in a closing generator's finally can fail when the
        # server shuts down; the mark is released when the generator is garbage-collected.
        for event in events:
            yield event
        async for event in bus.stream(since=marker):
            ns = ((event.get("object") or {}).get("metadata") or {}).get("namespace")
            if request.namespace is None or ns == request.namespace:
                yield event

    async def _error(self, status: int) -> Any:
        reason = {409: "Conflict", 422: "Invalid", 429: "TooManyRequests",
                  500: "InternalError", 503: "ServiceUnavailable"}
        resp = await self._render_error(KubernetesError(
            status=status, reason=reason.get(status, "Injected"),
            message=f"injected fault {status}", details={}))
        if status == 429:
            resp.headers["Retry-After"] = "1"
        return resp

    async def _handle(self, request: Any) -> Any:
        _CURRENT_REQUEST.set(request)
        self.requests_served += 1
        for f in self.faults:
            if f.matches(request):
                f.hits += 1
                return await self._error(f.status)
        verdict = self.chaos.verdict(request) if self.chaos is not None else None
        if verdict is not None and verdict[0] == "error":
            return await self._error(verdict[1])
        if verdict is not None and verdict[0] == "slow":
            await asyncio.sleep(verdict[1])
        if request.resource is not None and request.data is not None:
            self._apply_as_create(request)
            request = self._stamp(request)
        try:
            response = await super()._handle(request)
        except jsonpatch.JsonPatchTestFailed as exc:  # a failed "test" op: 422, as kube-apiserver
            return await self._render_error(KubernetesError(
                status=422, reason="Invalid", message=str(exc), details={}))
        if verdict is not None and verdict[0] == "after":  # applied, then the answer is lost
            return await self._error(verdict[1])
        return response

    def vanish(self, plural: str, namespace: str | None, name: str) -> None:
        """Delete an object with no watch event: as if deleted while the watch was down."""
        for (res, ns, n), obj in list(self.objects.items()):
            if res.plural == plural and ns == namespace and n == name and not obj.deleted:
                obj.delete()
                return
        raise KeyError((plural, namespace, name))

    async def expire_watches(self, plural: str) -> int:
        """End every open watch of ``plural`` with ``410 Gone`` (resource version too old):
        clients must list again. Returns how many resources' streams were ended."""
        gone = {"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410,
            "reason": "Expired", "message": "too old resource version"}}
        ended = 0
        for res, bus in list(self._buses.items()):
            if res.plural == plural:
                await bus.put(gone)
                ended += 1
        return ended

    def _apply_as_create(self, request: Any) -> None:
        """Server-side apply (``application/apply-patch+yaml``) of an absent object creates
        it, as kube-apiserver does; of a present one it is served as a merge (kmock has no
        field managers: enough for the operator, which always applies whole objects)."""
        ctype = str(request.headers.get("Content-Type", ""))
        if request.action != kmock.action.UPDATE or not ctype.startswith(
                "application/apply-patch"):
            return
        key = (request.resource, request.namespace, request.name)
        current = self.objects[key] if key in self.objects else None  # noqa: SIM401
        if current is None or current.deleted:
            object.__setattr__(request, "action", kmock.action.CREATE)

    def _stamp(self, request: Any) -> Any:
        rv = self._next_rv()
        data = copy.deepcopy(request.data)
        if request.action == kmock.action.CREATE and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):  # e.g. kopf's Events
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("generation", 1)
            meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            meta["resourceVersion"] = rv
        elif request.action == kmock.action.UPDATE:
            key = (request.resource, request.namespace, request.name)
            current = self.objects[key] if key in self.objects else None  # noqa: SIM401
            gen = None
            if current is not None and not current.deleted:
                gen = int((current.get("metadata") or {}).get("generation") or 1)
            if isinstance(data, dict):
                meta = data.setdefault("metadata", {}) or {}
                data["metadata"] = meta
                meta["resourceVersion"] = rv
                if gen is not None and not request.subresource and "spec" in data:
                    meta["generation"] = gen + 1
            elif isinstance(data, list):
                data.append({"op": "add", "path": "/metadata/resourceVersion", "value": rv})
                if gen is not None and any(str(op.get("path", "")).startswith("/spec")
                                           for op in data):
                    data.append({"op": "add", "path": "/metadata/generation", "value": gen + 1})
        else:
            return request
        # kmock matches reactions by the recorded request object: amend it in place
        object.__setattr__(request, "data", data)
        return request


def node(name: str, product: str = "NVIDIA-H100-80GB-HBM3", gpus: int = 8,
         site: str = "us-east") -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {
            "nvidia.com/gpu.product": product, "topology.kubernetes.io/region": site}},
        "status": {"allocatable": {"nvidia.com/gpu": str(gpus)},
                   "capacity": {"nvidia.com/gpu": str(gpus)}},
    }


def pool(name: str, namespace: str = "default", rps: float = 4.0, *,
         model: str = "llama-3.1-8b", uid: str | None = None, generation: int = 1,
         template: bool = True, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": API, "kind": "InferencePool",
        "metadata": {"name": name, "namespace": namespace, "uid": uid or f"uid-{namespace}-{name}",
                     "generation": generation},
        "spec": {
            "model": model,
            "slo": {"ttftSeconds": 1.0, "tpotSeconds": 0.1},
            "demand": {"requestsPerSecond": rps, "meanInputTokens": 1000,
                       "meanOutputTokens": 200},
            **spec,
        },
    }
    if template:
        body["spec"]["template"] = {
            "metadata": {"labels": {"app": name}},
            "spec": {"containers": [{"name": "engine", "image": "vllm/vllm-openai:v0.6.0"}]},
        }
    return body


def collection(obj: dict[str, Any]) -> str:
    """The URL to POST ``obj`` to."""
    api = obj["apiVersion"]
    base = "/api/v1" if api == "v1" else f"/apis/{api}"
    plural = {"InferencePool": "inferencepools", "GPUProfile": "gpuprofiles",
              "EnergyPolicy": "energypolicies", "Node": "nodes", "ConfigMap": "configmaps",
              "Deployment": "deployments"}[obj["kind"]]
    ns = obj["metadata"].get("namespace")
    return f"{base}/namespaces/{ns}/{plural}" if ns else f"{base}/{plural}"


def url_of(obj: dict[str, Any]) -> str:
    return f"{collection(obj)}/{obj['metadata']['name']}"


class Cluster:
    """Client side of a test: talks HTTP to the kmock server like kubectl would."""

    def __init__(self, server: FaultyEmulator, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.session = session

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        async with self.session.post(collection(obj), json=obj) as r:
            assert r.status < 300, await r.text()
            return await r.json()  # type: ignore[no-any-return]

    async def patch(self, obj_or_url: dict[str, Any] | str, body: dict[str, Any]) -> Any:
        url = obj_or_url if isinstance(obj_or_url, str) else url_of(obj_or_url)
        async with self.session.patch(url, json=body, headers={
                "Content-Type": "application/merge-patch+json"}) as r:
            assert r.status < 300, await r.text()
            return await r.json()

    async def delete(self, obj_or_url: dict[str, Any] | str) -> None:
        url = obj_or_url if isinstance(obj_or_url, str) else url_of(obj_or_url)
        async with self.session.delete(url) as r:
            assert r.status < 300, await r.text()

    async def get(self, url: str) -> dict[str, Any] | None:
        async with self.session.get(url) as r:
            if r.status == 404:
                return None
            assert r.status < 300, await r.text()
            return await r.json()  # type: ignore[no-any-return]

    async def items(self, url: str) -> list[dict[str, Any]]:
        async with self.session.get(url) as r:
            if r.status == 404:
                return []
            return list((await r.json()).get("items", []))

    # shortcuts
    async def pool(self, name: str, namespace: str = "default") -> dict[str, Any] | None:
        return await self.get(f"/apis/{API}/namespaces/{namespace}/inferencepools/{name}")

    async def deployments(self, namespace: str = "default") -> dict[str, dict[str, Any]]:
        items = await self.items(f"/apis/apps/v1/namespaces/{namespace}/deployments")
        return {d["metadata"]["name"]: d for d in items}

    async def plan(self) -> tuple[dict[str, Any] | None, PlanDocument | None]:
        cm = await self.get(f"/api/v1/namespaces/{OP_NAMESPACE}/configmaps/{PLAN_CONFIGMAP}")
        if cm is None:
            return None, None
        return cm, PlanDocument.from_json(cm["data"][PLAN_KEY])

    async def events(self) -> list[dict[str, Any]]:
        # events are cluster-wide listable in kmock (all namespaces)
        return await self.items("/api/v1/events")


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c  # type: ignore[no-any-return]
    return None


#: deadline of every wait, seconds: generous, because a loaded 2-core machine (load 15)
#: slows the operator's start and passes many times over; a wait that is met costs nothing
LOADED = 90.0


async def eventually(
    check: Callable[[], Any], timeout: float = LOADED, interval: float = 0.1, what: str = "",
) -> Any:
    """Poll an (async) check until it returns a truthy value; fail with its last result."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what or check}: {last!r}")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def emulator() -> AsyncIterator[FaultyEmulator]:
    """A kmock Kubernetes emulator on a local HTTP port with joulepool's resources declared."""
    async with FaultyEmulator() as server, kmock.Server(server):
        for key, info in RESOURCES.items():
            server.resources[key] = info
        yield server


@contextlib.asynccontextmanager
async def operator_running(
    server: FaultyEmulator, **overrides: Any,
) -> AsyncIterator[Operator]:
    """Run the real operator against ``server`` until the context exits.

    The operator gets its own thread and event loop (as in production, it shares
    nothing with the API server but HTTP); kopf's shutdown would otherwise wait
    for, and then cancel, the emulator's open watch-stream tasks.
    """
    import kopf

    settings: dict[str, Any] = {
        "namespace": OP_NAMESPACE, "debounce_seconds": 0.2, "max_delay_seconds": 2.0,
        "retry_delays": (0.05, 0.1, 0.2, 0.4), "resync_after_error_seconds": 0.5,
        "connection": kopf.ConnectionInfo(server=str(server.url).rstrip("/")),
    }
    config = OperatorConfig(**{**settings, **overrides})
    op = Operator(config)
    op.settings.queueing.exit_timeout = 0.5
    stop, ready = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def main() -> None:
        try:
            asyncio.run(op.run(stop_flag=stop, ready_flag=ready))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=main, name="joulepool-operator", daemon=True)
    thread.start()
    try:
        if not await asyncio.to_thread(ready.wait, 20):
            raise AssertionError(f"operator did not start: {errors}")
        yield op
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 20)
    assert not thread.is_alive(), "operator did not stop"
    assert not errors, errors


@contextlib.asynccontextmanager
async def cluster_and_operator(**overrides: Any) -> AsyncIterator[tuple[Cluster, Operator]]:
    async with emulator() as server, aiohttp.ClientSession(
        base_url=str(server.url)
    ) as session, operator_running(server, **overrides) as op:
        yield Cluster(server, session), op
