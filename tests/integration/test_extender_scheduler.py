"""kube-scheduler extender verbs over real HTTP: filter and prioritize, both node-list forms."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from extender_http import extender_of, post_verb

from joulepool.extender.app import EXTENDER, create_app
from joulepool.extender.settings import Settings
from joulepool.kube import testing as T

POOL = "default.chat"
NODES = [
    T.node("h100-a", "H100", 8, "eu-west"),
    T.node("h100-b", "H100", 8, "eu-west"),
    T.node("a100-a", "A100", 8, "us-east"),
    T.node("l4-a", "L4", 4, "us-east"),
]


@pytest.fixture
async def client(aiohttp_client: Any) -> TestClient:
    app = create_app(Settings(cluster=False, scrape_interval_seconds=0,
                              reserve_placements=False))
    ext = app[EXTENDER]
    ext.state.replace_nodes(NODES)
    ext.state.replace_pods([
        # h100-b is nearly full: 7 of 8 GPUs requested by bound pods (one of another team)
        T.pod("chat-0", node_name="h100-b", gpus=4, ready=True, ip="10.0.1.1"),
        T.pod("train-0", namespace="ml", pool=None, node_name="h100-b", gpus=3),
        T.pod("chat-1", node_name="h100-a", gpus=1, ready=True, ip="10.0.0.1"),
        T.pod("chat-2", node_name="a100-a", gpus=1, ready=True, ip="10.0.2.1"),
    ])
    for src in ("nodes", "pods", "plan"):
        ext.state.mark_synced(src)
    ext.state.set_plan(T.plan({POOL: [("h100-a", "H100", 6), ("h100-b", "H100", 6),
                                      ("a100-a", "A100", 4)]}))
    return await aiohttp_client(app)




async def test_filter_full_nodes_honours_plan_and_gpu_capacity(client: TestClient) -> None:
    pod = T.pod("chat-3", gpus=2)
    out = await post_verb(client, "filter", T.extender_args(pod, nodes=NODES))
    assert set(out) == {"Nodes", "NodeNames", "FailedNodes", "FailedAndUnresolvableNodes",
                        "Error"}
    assert out["Error"] == "" and out["NodeNames"] is None
    # full Node objects come back unchanged
    kept = out["Nodes"]["items"]
    assert [n["metadata"]["name"] for n in kept] == ["h100-a", "a100-a"]
    assert kept[0] == NODES[0]
    assert out["Nodes"]["metadata"] == {}
    # l4-a is outside the plan (unresolvable); h100-b has 1 free GPU for a 2-GPU pod
    assert set(out["FailedAndUnresolvableNodes"]) == {"l4-a"}
    assert "does not assign pool default.chat" in out["FailedAndUnresolvableNodes"]["l4-a"]
    assert out["FailedNodes"] == {
        "h100-b": "insufficient nvidia.com/gpu: pod requests 2, 1 free "
                  "(8 allocatable, 7 requested by bound pods)"
    }


async def test_filter_node_names_form(client: TestClient) -> None:
    names = ["h100-a", "h100-b", "a100-a", "l4-a", "ghost"]
    out = await post_verb(client, "filter", T.extender_args(T.pod("chat-3", gpus=1), names=names))
    assert out["Nodes"] is None
    assert out["NodeNames"] == ["h100-a", "h100-b", "a100-a"]
    assert set(out["FailedAndUnresolvableNodes"]) == {"l4-a", "ghost"}
    assert out["FailedNodes"] == {}


async def test_filter_enforces_the_pools_planned_share(client: TestClient) -> None:
    # a100-a: the plan gives the pool 4 GPUs and it holds 1; a 4-GPU pod would make 5
    out = await post_verb(client, "filter", T.extender_args(T.pod("big", gpus=4),
                                                        names=["a100-a", "h100-a"]))
    assert out["NodeNames"] == ["h100-a"]
    assert out["FailedAndUnresolvableNodes"]["a100-a"] == (
        "pool default.chat would hold 5 GPUs here; plan v7 gives it 4"
    )


async def test_filter_counts_a_newly_bound_pod(client: TestClient) -> None:
    body = T.extender_args(T.pod("chat-4", gpus=3), names=["h100-a"])
    assert (await post_verb(client, "filter", body))["NodeNames"] == ["h100-a"]
    # the watch reports a pod of the pool bound to h100-a: with it the pool holds 4 of the
    # 6 GPUs the plan gives it there, so 3 more do not fit
    extender_of(client).state.upsert_pod(T.pod("chat-5", node_name="h100-a", gpus=3))
    out = await post_verb(client, "filter", body)
    assert out["NodeNames"] == [] and "h100-a" in out["FailedAndUnresolvableNodes"]


async def test_unlabelled_pods_pass_untouched(client: TestClient) -> None:
    pod = T.pod("web", pool=None, gpus=0)
    out = await post_verb(client, "filter", T.extender_args(pod, nodes=NODES))
    assert out["Nodes"]["items"] == NODES
    assert out["FailedNodes"] == {} and out["FailedAndUnresolvableNodes"] == {}
    out = await post_verb(client, "filter", T.extender_args(pod, names=["l4-a", "unknown"]))
    assert out["NodeNames"] == ["l4-a", "unknown"]
    scores = await post_verb(client, "prioritize", T.extender_args(pod, names=["l4-a", "h100-a"]))
    assert scores == [{"Host": "l4-a", "Score": 0}, {"Host": "h100-a", "Score": 0}]


async def test_pool_missing_from_plan(client: TestClient) -> None:
    pod = T.pod("x", pool="other.pool")
    out = await post_verb(client, "filter", T.extender_args(pod, names=["h100-a"]))
    assert out["NodeNames"] == []
    assert "no assignment for pool other.pool" in out["FailedAndUnresolvableNodes"]["h100-a"]


async def test_protocol_errors_use_the_error_field(client: TestClient) -> None:
    out = await post_verb(client, "filter", {"Pod": None, "Nodes": None, "NodeNames": ["a"]})
    assert out["Error"] == "ExtenderArgs.Pod is missing"
    out = await post_verb(client, "filter", {"Pod": T.pod("p"), "Nodes": None, "NodeNames": None})
    assert "neither Nodes nor NodeNames" in out["Error"]
    extender_of(client).state.mark_synced("pods", False)
    out = await post_verb(client, "filter", T.extender_args(T.pod("p"), names=["h100-a"]))
    assert out["Error"] == "node cache not synced yet (pods)"
    resp = await client.post("/scheduler/prioritize",
                             json=T.extender_args(T.pod("p"), names=["h100-a"]))
    assert resp.status == 200
    assert await resp.json() == [{"Host": "h100-a", "Score": 0}]
    assert resp.headers["X-Joulepool-Error"] == "node cache not synced yet (pods)"


async def test_empty_node_lists(client: TestClient) -> None:
    out = await post_verb(client, "filter", T.extender_args(T.pod("p"), names=[]))
    assert out["NodeNames"] == [] and out["Error"] == ""
    out = await post_verb(client, "filter", T.extender_args(T.pod("p"), nodes=[]))
    assert out["Nodes"]["items"] == []
    assert await post_verb(client, "prioritize", T.extender_args(T.pod("p"), names=[])) == []


async def test_prioritize_prefers_efficient_node_then_flips_under_queue(
    client: TestClient,
) -> None:
    body = T.extender_args(T.pod("chat-9", gpus=1), names=["a100-a", "h100-a", "l4-a"])
    light = await post_verb(client, "prioritize", body)
    assert [h["Host"] for h in light] == ["a100-a", "h100-a", "l4-a"]  # request order
    score = {h["Host"]: h["Score"] for h in light}
    # at light load the H100 (fewer J/token at the planned batch) wins; l4-a is not planned
    assert score == {"h100-a": 10, "a100-a": 0, "l4-a": 0}
    # the router sees a deep queue on h100-a's endpoint (2500 waiting x 256 tokens):
    # draining it within the 10 s horizon needs ~64k tokens/s, which pushes h100-a
    # (8 x ~9.6k tokens/s) past the 0.9 utilisation ceiling, and the placement flips
    router = extender_of(client).router
    assert router.apply_scrape(POOL, "10.0.0.1:8000", waiting=2500, running=64, now=0.0)
    flipped = {h["Host"]: h["Score"] for h in await post_verb(client, "prioritize", body)}
    assert flipped == {"h100-a": 0, "a100-a": 10, "l4-a": 0}
    # and back when the queue drains
    router.apply_scrape(POOL, "10.0.0.1:8000", waiting=0, running=1, now=1.0)
    again = {h["Host"]: h["Score"] for h in await post_verb(client, "prioritize", body)}
    assert again == score


async def test_prioritize_full_nodes_form_matches_names_form(client: TestClient) -> None:
    pod = T.pod("chat-9", gpus=1)
    by_name = await post_verb(client, "prioritize",
                          T.extender_args(pod, names=["h100-a", "h100-b", "a100-a"]))
    full = await post_verb(client, "prioritize", T.extender_args(pod, nodes=NODES[:3]))
    assert by_name == full
    s = {h["Host"]: h["Score"] for h in full}
    assert s == {"h100-a": 10, "h100-b": 10, "a100-a": 0}
    assert all(isinstance(h["Score"], int) and 0 <= h["Score"] <= 10 for h in full)
    # a queue on h100-b's endpoint counts in the full-Nodes form too
    extender_of(client).router.apply_scrape(POOL, "10.0.1.1:8000", waiting=3000, running=64,
                                            now=0.0)
    full = await post_verb(client, "prioritize", T.extender_args(pod, nodes=NODES[:3]))
    s = {h["Host"]: h["Score"] for h in full}
    assert s["h100-a"] == 10 and s["h100-b"] < 10
    assert full == await post_verb(client, "prioritize",
                               T.extender_args(pod, names=["h100-a", "h100-b", "a100-a"]))


async def test_prioritize_is_deterministic_with_ties(client: TestClient) -> None:
    ext = extender_of(client)
    ext.state.replace_nodes([*NODES, T.node("h100-c", "H100", 8)])
    plan = T.plan({POOL: [("h100-a", "H100", 4), ("h100-c", "H100", 4), ("a100-a", "A100", 4)]})
    ext.state.set_plan(plan)
    ext.state.replace_pods([])
    body = T.extender_args(T.pod("p", gpus=1), names=["h100-c", "a100-a", "h100-a"])
    first = await post_verb(client, "prioritize", body)
    assert {h["Host"]: h["Score"] for h in first} == {"h100-c": 10, "h100-a": 10, "a100-a": 0}
    for _ in range(3):
        assert await post_verb(client, "prioritize", body) == first


async def test_metrics_after_decisions(client: TestClient) -> None:
    await post_verb(client, "filter", T.extender_args(T.pod("p"), names=["h100-a", "l4-a"]))
    await post_verb(client, "prioritize", T.extender_args(T.pod("p"), names=["h100-a"]))
    text = await (await client.get("/metrics")).text()
    assert 'joulepool_extender_decision_seconds_count{verb="filter"} 1.0' in text
    assert 'joulepool_extender_decision_seconds_count{verb="prioritize"} 1.0' in text
    assert 'joulepool_extender_requests_total{code="200",verb="filter"} 1.0' in text
    assert 'joulepool_extender_filtered_nodes_total{reason="plan"} 1.0' in text
    assert "joulepool_extender_cache_nodes 4.0" in text
    assert "joulepool_extender_plan_version 7.0" in text
