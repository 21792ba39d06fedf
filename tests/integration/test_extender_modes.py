"""Filter honours the serving mode label (one Deployment per pool and mode), over real HTTP.

The repro: pool ``default.rag`` is planned as 1 x 4xH100 on h0 and 1 x 8xA100 on a0.
Judged by the pool alone, the 4xH100 pod fits on a0 too (the pool has 8 GPUs there),
and once it lands there the 8xA100 pod can never fit anywhere.
"""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from extender_http import extender_of, post_verb

from joulepool.extender.app import EXTENDER, create_app
from joulepool.extender.settings import Settings
from joulepool.kube import testing as T

POOL = "default.rag"
NODES = [
    T.node("h0", "H100", 8),
    T.node("a0", "A100", 8),
    T.node("l0", "L4", 4),
]
NAMES = [n["metadata"]["name"] for n in NODES]


@pytest.fixture
async def client(aiohttp_client: Any) -> TestClient:
    app = create_app(Settings(cluster=False, scrape_interval_seconds=0,
                              reserve_placements=False))
    ext = app[EXTENDER]
    ext.state.replace_nodes(NODES)
    ext.state.replace_pods([])
    for src in ("nodes", "pods", "plan"):
        ext.state.mark_synced(src)
    # (node, product, instances, GPUs per instance): modes 4xH100 and 8xA100
    ext.state.set_plan(T.plan({POOL: [("h0", "H100", 1, 4), ("a0", "A100", 1, 8)]}))
    return await aiohttp_client(app)




def _h100_pod(name: str = "rag-4xh100-0", **kw: Any) -> dict[str, Any]:
    return T.pod(name, pool=POOL, mode="4xH100", gpus=4, **kw)


def _a100_pod(name: str = "rag-8xa100-0", **kw: Any) -> dict[str, Any]:
    return T.pod(name, pool=POOL, mode="8xA100", gpus=8, **kw)


def _kept(out: dict[str, Any]) -> list[str]:
    if out["NodeNames"] is not None:
        return list(out["NodeNames"])
    return [n["metadata"]["name"] for n in out["Nodes"]["items"]]


@pytest.mark.parametrize("form", ["nodes", "names"])
async def test_mode_pod_only_passes_on_its_modes_nodes(client: TestClient, form: str) -> None:
    def args(pod: dict[str, Any]) -> dict[str, Any]:
        return (T.extender_args(pod, nodes=NODES) if form == "nodes"
                else T.extender_args(pod, names=NAMES))

    out = await post_verb(client, "filter", args(_h100_pod()))
    assert out["Error"] == ""
    assert _kept(out) == ["h0"]
    assert out["FailedNodes"] == {}
    assert out["FailedAndUnresolvableNodes"] == {
        "a0": "plan v7 does not assign pool default.rag mode 4xH100 to this node "
              "(assigned: h0)",
        "l0": "plan v7 does not assign pool default.rag mode 4xH100 to this node "
              "(assigned: h0)",
    }
    if form == "nodes":
        assert out["Nodes"]["items"] == [NODES[0]]  # Node objects come back unchanged

    out = await post_verb(client, "filter", args(_a100_pod()))
    assert _kept(out) == ["a0"]
    assert set(out["FailedAndUnresolvableNodes"]) == {"h0", "l0"}
    assert "mode 8xA100 to this node (assigned: a0)" in out["FailedAndUnresolvableNodes"]["h0"]


@pytest.mark.parametrize("form", ["nodes", "names"])
async def test_repro_both_modes_fit_in_turn(client: TestClient, form: str) -> None:
    def args(pod: dict[str, Any]) -> dict[str, Any]:
        return (T.extender_args(pod, nodes=NODES) if form == "nodes"
                else T.extender_args(pod, names=NAMES))

    ext = extender_of(client)
    assert _kept(await post_verb(client, "filter", args(_h100_pod()))) == ["h0"]
    ext.state.upsert_pod(_h100_pod(node_name="h0"))  # kube-scheduler binds it there
    # a0 is still whole for the 8xA100 instance
    assert _kept(await post_verb(client, "filter", args(_a100_pod()))) == ["a0"]
    ext.state.upsert_pod(_a100_pod(node_name="a0"))
    # a second 4xH100 pod: h0 has 4 free GPUs, but the plan gives the mode 4 and it holds 4
    out = await post_verb(client, "filter", args(_h100_pod("rag-4xh100-1")))
    assert _kept(out) == []
    assert out["FailedAndUnresolvableNodes"]["h0"] == (
        "pool default.rag mode 4xH100 would hold 8 GPUs here; plan v7 gives it 4"
    )
    assert out["FailedNodes"] == {}


@pytest.mark.parametrize("form", ["nodes", "names"])
async def test_mode_share_counts_only_pods_of_the_same_mode(client: TestClient,
                                                            form: str) -> None:
    ext = extender_of(client)
    plan = T.plan({POOL: [("h0", "H100", 1, 4), ("h0", "H100", 2, 1)]})
    ext.state.set_plan(plan)
    # two 1xH100 pods of the pool hold 2 GPUs on h0: the 4xH100 share there is untouched
    ext.state.replace_pods([T.pod(f"rag-1x-{i}", pool=POOL, mode="1xH100", gpus=1,
                                  node_name="h0") for i in range(2)])
    pod = _h100_pod()
    body = (T.extender_args(pod, nodes=NODES[:1]) if form == "nodes"
            else T.extender_args(pod, names=["h0"]))
    assert _kept(await post_verb(client, "filter", body)) == ["h0"]
    # a third 1xH100 pod would exceed the 2 GPUs planned for that mode on h0
    pod = T.pod("rag-1x-2", pool=POOL, mode="1xH100", gpus=1)
    body = (T.extender_args(pod, nodes=NODES[:1]) if form == "nodes"
            else T.extender_args(pod, names=["h0"]))
    out = await post_verb(client, "filter", body)
    assert out["FailedAndUnresolvableNodes"] == {
        "h0": "pool default.rag mode 1xH100 would hold 3 GPUs here; plan v7 gives it 2"
    }


@pytest.mark.parametrize("form", ["nodes", "names"])
async def test_node_free_gpus_still_apply(client: TestClient, form: str) -> None:
    # another team's job holds 6 of h0's 8 GPUs: the 4xH100 pod does not fit (resolvable)
    extender_of(client).state.upsert_pod(T.pod("train", namespace="ml", pool=None, gpus=6,
                                        node_name="h0"))
    pod = _h100_pod()
    body = (T.extender_args(pod, nodes=NODES) if form == "nodes"
            else T.extender_args(pod, names=NAMES))
    out = await post_verb(client, "filter", body)
    assert _kept(out) == []
    assert out["FailedNodes"] == {
        "h0": "insufficient nvidia.com/gpu: pod requests 4, 2 free "
              "(8 allocatable, 6 requested by bound pods)"
    }
    assert set(out["FailedAndUnresolvableNodes"]) == {"a0", "l0"}


@pytest.mark.parametrize("form", ["nodes", "names"])
async def test_pod_without_mode_label_keeps_pool_level_filter(client: TestClient,
                                                              form: str) -> None:
    pod = T.pod("rag-legacy", pool=POOL, gpus=4)
    body = (T.extender_args(pod, nodes=NODES) if form == "nodes"
            else T.extender_args(pod, names=NAMES))
    out = await post_verb(client, "filter", body)
    assert _kept(out) == ["h0", "a0"]  # the pool's nodes and GPU shares, as before
    assert out["FailedAndUnresolvableNodes"] == {
        "l0": "plan v7 does not assign pool default.rag to this node (assigned: a0, h0)"
    }


@pytest.mark.parametrize("form", ["nodes", "names"])
async def test_mode_the_plan_does_not_know(client: TestClient, form: str) -> None:
    pod = T.pod("rag-l4", pool=POOL, mode="1xL4", gpus=1)
    body = (T.extender_args(pod, nodes=NODES) if form == "nodes"
            else T.extender_args(pod, names=[*NAMES, "ghost"]))
    out = await post_verb(client, "filter", body)
    assert _kept(out) == []
    reasons = set(out["FailedAndUnresolvableNodes"].values())
    assert reasons == {"plan v7 does not assign pool default.rag mode 1xL4 to this node "
                       "(it assigns the mode no nodes)"}
    assert out["FailedNodes"] == {}


async def test_mode_follows_a_new_plan(client: TestClient) -> None:
    ext = extender_of(client)
    body = T.extender_args(_h100_pod(), names=NAMES)
    assert (await post_verb(client, "filter", body))["NodeNames"] == ["h0"]
    # the planner moves the 4xH100 instance to a0's neighbour h1 (a new node)
    ext.state.upsert_node(T.node("h1", "H100", 8))
    plan = T.plan({POOL: [("h1", "H100", 1, 4), ("a0", "A100", 1, 8)]}, version=8)
    ext.state.set_plan(plan)
    out = await post_verb(client, "filter", T.extender_args(_h100_pod(), names=[*NAMES, "h1"]))
    assert out["NodeNames"] == ["h1"]
    assert out["FailedAndUnresolvableNodes"]["h0"] == (
        "plan v8 does not assign pool default.rag mode 4xH100 to this node (assigned: h1)"
    )
