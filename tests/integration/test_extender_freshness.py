"""filter over real HTTP when the pod watch is behind: a node that looks full only
because of a pod the API server already deleted is re-read and passes
(extender/freshness.py); bounded when the API is slow or failing. The same on the real
control plane: tests/realk8s/test_extender_placement.py."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from joulepool.extender.app import EXTENDER, Extender, create_app
from joulepool.extender.freshness import PodFreshness
from joulepool.extender.settings import Settings
from joulepool.kube import testing as T

POOL = "default.chat"


class FakeNodeReads:
    """What the API server answers for 'pods bound to node N' (a test double of the
    read, not of the extender): the truth, which the watch has not delivered yet."""

    def __init__(self) -> None:
        self.pods: dict[str, list[dict[str, Any]]] = {}
        self.calls: list[str] = []
        self.delay = 0.0
        self.fail = False
        self.lock = threading.Lock()

    def __call__(self, node: str) -> list[dict[str, Any]]:
        with self.lock:
            self.calls.append(node)
        if self.delay:
            time.sleep(self.delay)
        if self.fail:
            raise OSError("connection refused")
        return list(self.pods.get(node, []))


@pytest.fixture
async def client(aiohttp_client: Any) -> TestClient:
    app = create_app(Settings(cluster=False, scrape_interval_seconds=0))
    ext = app[EXTENDER]
    ext.state.replace_nodes([T.node("h100-a", "H100", 8), T.node("h100-b", "H100", 8)])
    # the pool's share on h100-a is 2 GPUs, held by old-0 -- which the API server has
    # already deleted (its replacement new-0 is what kube-scheduler asks about)
    ext.state.replace_pods([T.pod("old-0", node_name="h100-a", gpus=2, mode="2xH100"),
                            T.pod("other", node_name="h100-b", gpus=8, pool=None)])
    for src in ("nodes", "pods", "plan"):
        ext.state.mark_synced(src)
    ext.state.set_plan(T.plan({POOL: [("h100-a", "H100", 1, 2)]}))
    return await aiohttp_client(app)


def _ext(client: TestClient) -> Extender:
    return client.server.app[EXTENDER]


async def _filter(client: TestClient, names: list[str]) -> Any:
    body = T.extender_args(T.pod("new-0", gpus=2, mode="2xH100"), names=names)
    resp = await client.post("/scheduler/filter", data=json.dumps(body),
                             headers={"Content-Type": "application/json"})
    assert resp.status == 200
    return await resp.json()


async def test_without_a_fresh_read_the_stale_share_refuses(client: TestClient) -> None:
    out = await _filter(client, ["h100-a"])
    assert out["NodeNames"] == []
    assert out["FailedAndUnresolvableNodes"]["h100-a"] == (
        "pool default.chat mode 2xH100 would hold 4 GPUs here; plan v7 gives it 2")


async def test_a_fresh_read_lets_the_replacement_in(client: TestClient) -> None:
    ext = _ext(client)
    reads = FakeNodeReads()  # h100-a: no pods any more
    ext.freshness = PodFreshness(ext.state, reads, metrics=ext.metrics)
    out = await _filter(client, ["h100-a"])
    assert out["NodeNames"] == ["h100-a"] and out["FailedAndUnresolvableNodes"] == {}
    assert reads.calls == ["h100-a"] and ext.freshness.corrections == 1
    assert ext.metrics.registry.get_sample_value(
        "joulepool_extender_fresh_pod_reads_total", {"result": "corrected"}) == 1
    assert "default/old-0" not in ext.state.pods
    # the watch's late events about old-0 change nothing; its DELETED is a no-op
    ext.state.upsert_pod(T.pod("old-0", node_name="h100-a", gpus=2, mode="2xH100"))
    assert "default/old-0" not in ext.state.pods
    ext.state.delete_pod("default/old-0")


async def test_a_node_really_full_is_read_once_per_pod_and_interval(
        client: TestClient) -> None:
    ext = _ext(client)
    reads = FakeNodeReads()
    reads.pods["h100-a"] = [T.pod("old-0", node_name="h100-a", gpus=2, mode="2xH100")]
    ext.freshness = PodFreshness(ext.state, reads, min_interval_s=60, metrics=ext.metrics)
    for _ in range(3):
        out = await _filter(client, ["h100-a", "h100-b"])
        assert out["NodeNames"] == []
        assert "would hold 4 GPUs" in out["FailedAndUnresolvableNodes"]["h100-a"]
    # h100-b is outside the plan: never read; h100-a read once, then rate-limited
    assert reads.calls == ["h100-a"] and ext.freshness.corrections == 0
    assert ext.metrics.registry.get_sample_value(
        "joulepool_extender_fresh_pod_reads_total", {"result": "current"}) == 1
    # another pod's question gets its own read: a read made just before a deletion
    # must not stop the replacement's read just after it
    reads.pods["h100-a"] = []
    body = T.extender_args(T.pod("new-1", gpus=2, mode="2xH100"), names=["h100-a"])
    resp = await client.post("/scheduler/filter", data=json.dumps(body),
                             headers={"Content-Type": "application/json"})
    assert (await resp.json())["NodeNames"] == ["h100-a"]
    assert reads.calls == ["h100-a", "h100-a"]


async def test_reads_in_all_are_bounded_by_a_budget(client: TestClient) -> None:
    ext = _ext(client)
    reads = FakeNodeReads()
    reads.pods["h100-a"] = [T.pod("old-0", node_name="h100-a", gpus=2, mode="2xH100")]
    now = [0.0]
    ext.freshness = PodFreshness(ext.state, reads, reads_per_second=3, clock=lambda: now[0])
    for i in range(10):  # ten different pending pods, at the same instant
        body = T.extender_args(T.pod(f"p-{i}", gpus=2, mode="2xH100"), names=["h100-a"])
        await client.post("/scheduler/filter", data=json.dumps(body),
                          headers={"Content-Type": "application/json"})
    assert len(reads.calls) == 3
    now[0] = 1.0  # a second later the budget is back
    assert ext.freshness.due("p-0", ["h100-a"]) == ["h100-a"]


@pytest.mark.parametrize("fault", ["slow", "failing"])
async def test_a_slow_or_failing_api_keeps_the_first_answer(client: TestClient,
                                                           fault: str) -> None:
    ext = _ext(client)
    reads = FakeNodeReads()
    if fault == "slow":
        reads.delay = 3.0
    else:
        reads.fail = True
    ext.freshness = PodFreshness(ext.state, reads, timeout_s=0.3)
    t0 = time.monotonic()
    out = await _filter(client, ["h100-a"])
    assert time.monotonic() - t0 < 2.0  # bounded by the read timeout, not the API
    assert out["NodeNames"] == [] and "h100-a" in out["FailedAndUnresolvableNodes"]
    assert "default/old-0" in ext.state.pods


async def test_a_pod_that_passes_somewhere_reads_nothing(client: TestClient) -> None:
    ext = _ext(client)
    ext.state.delete_pod("default/other")  # h100-b has room now
    ext.state.set_plan(T.plan({POOL: [("h100-a", "H100", 1, 2), ("h100-b", "H100", 1, 2)]}))
    reads = FakeNodeReads()
    ext.freshness = PodFreshness(ext.state, reads)
    out = await _filter(client, ["h100-a", "h100-b"])
    assert out["NodeNames"] == ["h100-b"] and reads.calls == []
