"""The cluster watches against a stand-in API server, with the real kubernetes client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from joulepool.core.router import NoEndpoints
from joulepool.extender.app import EXTENDER, Extender, create_app
from joulepool.extender.settings import Settings
from joulepool.kube import testing as T


class FakeAPI:
    """Just enough of the Kubernetes API: list and watch of nodes, pods, one ConfigMap."""

    def __init__(self) -> None:
        self.objects: dict[str, list[dict[str, Any]]] = {"nodes": [], "pods": [],
                                                          "configmaps": []}
        self.queues: dict[str, list[asyncio.Queue[dict[str, Any] | None]]] = {
            k: [] for k in self.objects}
        self.lists: dict[str, int] = dict.fromkeys(self.objects, 0)
        self.queries: list[dict[str, str]] = []
        self.node_reads: list[str] = []
        self.rv = 100
        app = web.Application()
        app.router.add_get("/api/v1/nodes", self.handler("nodes"))
        app.router.add_get("/api/v1/pods", self.handler("pods"))
        app.router.add_get("/api/v1/namespaces/{ns}/configmaps", self.handler("configmaps"))
        self.app = app

    def handler(self, kind: str) -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            self.queries.append({"kind": kind, **request.query})
            if request.query.get("watch") not in ("true", "True", "1"):
                items = self.objects[kind]
                node = request.query.get("fieldSelector", "").partition("spec.nodeName=")[2]
                if node:  # filter's fresh read of one node's pods (extender.freshness)
                    self.node_reads.append(node)
                    items = [o for o in items if o["spec"].get("nodeName") == node]
                else:
                    self.lists[kind] += 1
                return web.json_response({"kind": "List", "metadata": {
                    "resourceVersion": str(self.rv)}, "items": items})
            resp = web.StreamResponse()
            resp.content_type = "application/json"
            await resp.prepare(request)
            q: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
            self.queues[kind].append(q)
            try:
                while True:
                    # streams end after a short while, as a server-side watch timeout
                    # does: the watcher must resume from the last resourceVersion
                    try:
                        ev = await asyncio.wait_for(q.get(), 0.5)
                    except TimeoutError:
                        break
                    if ev is None:
                        break
                    await resp.write(json.dumps(ev).encode() + b"\n")
            finally:
                self.queues[kind].remove(q)
            return resp

        return handle

    def send(self, kind: str, typ: str, obj: dict[str, Any]) -> None:
        self.rv += 1
        if typ != "ERROR":
            obj.setdefault("metadata", {})["resourceVersion"] = str(self.rv)
            name = obj["metadata"]["name"]
            self.objects[kind] = [o for o in self.objects[kind]
                                  if o["metadata"]["name"] != name]
            if typ != "DELETED":
                self.objects[kind].append(obj)
        for q in self.queues[kind]:
            q.put_nowait({"type": typ, "object": obj})


async def _until(cond: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not await cond():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.02)


@dataclass
class Watched:
    """An extender in cluster mode, watching ``api`` (node h0 with 6 of its 8 GPUs held
    by chat-0; the plan gives default.chat h0 and h1, which the API does not know yet)."""

    api: FakeAPI
    client: TestClient
    ext: Extender

    async def filter_names(self, pod: str = "chat-1") -> list[str]:
        args = T.extender_args(T.pod(pod, gpus=4), names=["h0", "h1"])
        resp = await self.client.post("/scheduler/filter", json=args)
        return list((await resp.json())["NodeNames"])

    def pod_watches(self) -> list[dict[str, str]]:
        return [q for q in self.api.queries if q["kind"] == "pods" and q.get("watch")]


async def _watched(aiohttp_client: Any, tmp_path: Path, **settings: Any) -> Watched:
    api = FakeAPI()
    api.objects["nodes"] = [T.node("h0", "H100", 8)]
    api.objects["pods"] = [T.pod("chat-0", node_name="h0", gpus=6, ready=True, ip="10.0.0.5")]
    plan = T.plan({"default.chat": [("h0", "H100", 8), ("h1", "H100", 8)]})
    api.objects["configmaps"] = [{"kind": "ConfigMap", "metadata": {
        "name": "joulepool-plan", "namespace": "jp"}, "data": {"plan.json": plan.to_json()}}]
    api_client = await aiohttp_client(api.app)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": f"http://127.0.0.1:{api_client.port}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
    }))
    app = create_app(Settings(kubeconfig=kubeconfig, namespace="jp", scrape_interval_seconds=0,
                              watch_timeout_seconds=30, reserve_placements=False, **settings))
    client: TestClient = await aiohttp_client(app)
    ext = app[EXTENDER]
    for w in ext.watchers:
        w.backoff_initial = w.backoff_max = 0.05

    async def ready() -> bool:
        return (await client.get("/readyz")).status == 200

    await _until(ready)
    await _until(lambda: _watching(api))
    return Watched(api, client, ext)


@pytest.fixture
async def watched(aiohttp_client: Any, tmp_path: Path) -> AsyncIterator[Watched]:
    w = await _watched(aiohttp_client, tmp_path)
    yield w
    w.ext.stop.set()
    for kind in w.api.queues:
        for q in list(w.api.queues[kind]):
            q.put_nowait(None)


async def test_lists_and_watches_select_what_the_extender_needs(watched: Watched) -> None:
    selectors = {q["kind"]: q.get("fieldSelector") for q in watched.api.queries}
    assert selectors["configmaps"] == "metadata.name=joulepool-plan"
    assert selectors["pods"] == "status.phase!=Succeeded,status.phase!=Failed"


async def test_node_and_pod_events_reach_filter_and_the_pools(watched: Watched) -> None:
    api, ext = watched.api, watched.ext
    # h0 has 2 free GPUs, h1 is not known yet
    assert await watched.filter_names() == []
    assert api.node_reads == ["h0"]  # the pods filling h0 re-read: they are still there
    api.send("nodes", "ADDED", T.node("h1", "H100", 8))

    async def h1_in() -> bool:
        return await watched.filter_names() == ["h1"]

    await _until(h1_in)
    api.send("pods", "DELETED", T.pod("chat-0", node_name="h0", gpus=6))

    async def both() -> bool:
        return await watched.filter_names() == ["h0", "h1"]

    await _until(both)
    # the endpoint of the deleted pod is gone from the pools' state too (the queue the
    # placement cost reads; the routing service builds the same kube.pools.Router)
    pool = ext.router.pool("default.chat")
    assert pool.endpoints == []
    with pytest.raises(NoEndpoints):
        pool.decide(5, 0, None, None, now=0.0)


async def test_410_gone_on_the_node_watch_lists_again(watched: Watched) -> None:
    api = watched.api
    lists_before = api.lists["nodes"]
    api.send("nodes", "ERROR", {"kind": "Status", "code": 410, "reason": "Expired",
                                "message": "too old"})

    async def relisted() -> bool:
        return api.lists["nodes"] > lists_before

    await _until(relisted)
    assert "expired" in next(w for w in watched.ext.watchers if w.name == "nodes").restarts


async def test_a_broken_plan_update_keeps_the_last_good_plan(watched: Watched) -> None:
    api, ext = watched.api, watched.ext
    api.send("nodes", "ADDED", T.node("h1", "H100", 8))

    async def h1_in() -> bool:
        return await watched.filter_names() == ["h1"]

    await _until(h1_in)
    api.send("configmaps", "MODIFIED", {"kind": "ConfigMap", "metadata": {
        "name": "joulepool-plan", "namespace": "jp"}, "data": {"plan.json": "{oops"}})

    async def plan_error() -> bool:
        return bool(ext.state.plan_error)

    await _until(plan_error)
    assert await watched.filter_names() == ["h1"]
    assert ext.state.plan is not None and "default.chat" in ext.state.plan.pools


async def test_watches_resume_from_the_last_version_seen(watched: Watched) -> None:
    """Each pod watch after a stream ends (they end after 0.5 s without events, as a
    server-side timeout does) starts from the last resourceVersion the extender saw:
    the list's until the deletion is delivered, the deletion's after; never a new list."""
    api = watched.api
    api.send("pods", "DELETED", T.pod("chat-0", node_name="h0", gpus=6))
    deleted_rv = str(api.rv)

    async def deleted_seen() -> bool:
        return "default/chat-0" not in watched.ext.state.pods

    await _until(deleted_seen)

    async def resumed_after_the_deletion() -> bool:
        return any(q["resourceVersion"] == deleted_rv for q in watched.pod_watches())

    await _until(resumed_after_the_deletion)
    versions = [q["resourceVersion"] for q in watched.pod_watches()]
    assert versions[0] == "100"  # from the list
    first_after = versions.index(deleted_rv)
    assert set(versions[:first_after]) == {"100"}
    assert set(versions[first_after:]) == {deleted_rv}  # from the last event
    assert api.lists["pods"] == 1


async def test_fresh_read_limits_come_from_the_settings(aiohttp_client: Any,
                                                        tmp_path: Path) -> None:
    """--fresh-read-* reach the reader filter uses: with one node per call and a long
    interval, two full nodes are read one per call, then neither again for that pod."""
    w = await _watched(aiohttp_client, tmp_path, fresh_read_timeout_seconds=3,
                       fresh_read_max_nodes=1, fresh_read_min_interval_seconds=600,
                       fresh_reads_per_second=50)
    try:
        fresh = w.ext.freshness
        assert fresh is not None
        assert (fresh.timeout_s, fresh.max_nodes, fresh.min_interval_s,
                fresh.reads_per_second) == (3, 1, 600, 50)
        w.api.send("nodes", "ADDED", T.node("h1", "H100", 8))
        w.api.send("pods", "ADDED", T.pod("chat-9", node_name="h1", gpus=6, ready=True,
                                          ip="10.0.0.9"))

        async def h1_full() -> bool:
            return w.ext.state.used_gpus.get("h1") == 6

        await _until(h1_full)
        reads = []
        for _ in range(3):
            assert await w.filter_names() == []
            reads.append(list(w.api.node_reads))
        assert reads == [["h0"], ["h0", "h1"], ["h0", "h1"]]
    finally:
        w.ext.stop.set()
        for kind in w.api.queues:
            for q in list(w.api.queues[kind]):
                q.put_nowait(None)


async def _watching(api: FakeAPI) -> bool:
    return all(api.queues[k] for k in ("nodes", "pods", "configmaps"))
