"""The routing service over real HTTP: route/complete loop, PI lambda, scraping, static files."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from joulepool.extender import app as extender_app
from joulepool.extender import settings as extender_settings
from joulepool.kube import testing as T
from joulepool.router.app import ROUTER, create_app
from joulepool.router.settings import Settings

EFFICIENT, FAST = "10.0.0.1:8000", "10.0.0.2:8000"


def _endpoints_file(tmp_path: Path, extra: dict[str, Any] | None = None) -> Path:
    doc = {"pools": {"ns.chat": {
        "tier": "interactive",
        "slo": {"ttftSeconds": 0.5, "tpotSeconds": 0.05},
        "endpoints": [
            {"address": EFFICIENT, "joulesPerToken": 0.1, "tokensPerSecond": 100},
            {"address": FAST, "joulesPerToken": 0.5, "tokensPerSecond": 1000},
        ],
    }, **(extra or {})}}
    path = tmp_path / "endpoints.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture
async def client(aiohttp_client: Any, tmp_path: Path) -> TestClient:
    settings = Settings(cluster=False, endpoints_file=_endpoints_file(tmp_path),
                        scrape_interval_seconds=0, pi_every=20, file_poll_seconds=0,
                        eps_min_tokens=100)
    return await aiohttp_client(create_app(settings))


async def _route(client: TestClient, **body: Any) -> dict[str, Any]:
    resp = await client.post("/v1/route", json={"pool": "ns.chat", "inputTokens": 50,
                                                "outputTokens": 100, **body})
    assert resp.status == 200, await resp.text()
    return dict(await resp.json())


async def _complete(client: TestClient, endpoint: str, met: bool, **body: Any
                    ) -> dict[str, Any]:
    resp = await client.post("/v1/complete", json={
        "pool": "ns.chat", "endpoint": endpoint, "ttftSeconds": 0.2, "e2eSeconds": 3.0,
        "outputTokens": 100, "deadlineMet": met, **body})
    assert resp.status == 200, await resp.text()
    return dict(await resp.json())


async def test_route_answer_shape(client: TestClient) -> None:
    out = await _route(client, deadlineSeconds=2.0)
    assert out["endpoint"] == EFFICIENT and out["fallbacks"] == [FAST]
    assert set(out["cost"]) == {"energyJoules", "slackSeconds", "lambda", "etaSeconds", "total"}
    assert out["cost"]["energyJoules"] == pytest.approx(10.0)
    assert out["cost"]["lambda"] == 10.0 and out["tier"] == "interactive"
    assert out["requestId"]
    # without a deadline the pool's SLO gives one: TTFT + tokens x TPOT
    assert (await _route(client))["deadlineSeconds"] == pytest.approx(0.5 + 100 * 0.05)


async def test_route_complete_loop_moves_lambda(client: TestClient) -> None:
    """Misses push lambda up, which moves traffic to the endpoint that meets deadlines."""
    lam0 = (await _route(client, deadlineSeconds=2.0))["cost"]["lambda"]
    chosen = []
    for _ in range(20):
        d = await _route(client, deadlineSeconds=2.0)
        chosen.append(d["endpoint"])
        # requests on the slow, efficient endpoint miss; the fast one meets them
        await _complete(client, d["endpoint"], met=d["endpoint"] == FAST,
                        requestId=d["requestId"])
    pools = await (await client.get("/v1/pools")).json()
    lam1 = pools["pools"]["ns.chat"]["lambda"]
    assert lam1 > lam0
    assert pools["pools"]["ns.chat"]["missRatio"] > 0
    # with the higher lambda a modest queue on the efficient endpoint already tips the choice
    held = [await _route(client, deadlineSeconds=2.0) for _ in range(3)]
    assert held[-1]["endpoint"] == FAST
    assert held[-1]["cost"]["lambda"] == lam1
    metrics = await (await client.get("/metrics")).text()
    assert f'joulepool_router_lambda{{pool="ns.chat"}} {lam1}' in metrics
    assert 'joulepool_router_deadline_miss_ratio{pool="ns.chat"}' in metrics
    assert 'joulepool_router_predicted_joules_count{pool="ns.chat",tier="interactive"}' in metrics


async def test_all_met_lowers_lambda(client: TestClient) -> None:
    for _ in range(20):
        d = await _route(client, deadlineSeconds=100.0)
        out = await _complete(client, d["endpoint"], met=True, requestId=d["requestId"])
    assert out["lambda"] < 10.0 and out["missRatio"] == 0.0


async def test_bulk_tier_chases_efficiency(client: TestClient) -> None:
    for _ in range(6):
        assert (await _route(client, tier="bulk", deadlineSeconds=2.0))["endpoint"] == EFFICIENT
    assert (await _route(client, deadlineSeconds=2.0))["endpoint"] == FAST
    bulk = await _route(client, tier="bulk", deadlineSeconds=2.0)
    assert bulk["endpoint"] == EFFICIENT and bulk["tier"] == "bulk"
    assert bulk["cost"]["slackSeconds"] > 0


async def test_joules_feedback_updates_eps(client: TestClient) -> None:
    out = await _complete(client, EFFICIENT, met=True, joules=20.0)  # 0.2 J/token measured
    assert out["epsScale"] == pytest.approx(2.0)  # against the modelled 0.1
    pool = await (await client.get("/v1/pools/ns.chat")).json()
    ep = {e["address"]: e for e in pool["endpoints"]}
    assert ep[EFFICIENT]["joulesPerToken"] == pytest.approx(0.2)
    text = await (await client.get("/metrics")).text()
    assert 'joulepool_router_measured_joules_total{pool="ns.chat"} 20.0' in text


async def test_unknown_pool_and_no_endpoints(aiohttp_client: Any, tmp_path: Path) -> None:
    path = _endpoints_file(tmp_path, {"ns.empty": {"endpoints": []}})
    client = await aiohttp_client(create_app(Settings(
        cluster=False, endpoints_file=path, scrape_interval_seconds=0)))
    resp = await client.post("/v1/route", json={"pool": "nope", "outputTokens": 1})
    assert resp.status == 404 and "unknown pool" in (await resp.json())["error"]
    resp = await client.post("/v1/complete", json={"pool": "nope", "endpoint": "a:1",
                                                   "deadlineMet": True})
    assert resp.status == 404
    resp = await client.post("/v1/route", json={"pool": "ns.empty", "outputTokens": 1})
    assert resp.status == 503 and "no ready endpoints" in (await resp.json())["error"]
    assert (await client.get("/v1/pools/nope")).status == 404


async def test_scraped_queue_steers_routing(aiohttp_client: Any, tmp_path: Path) -> None:
    """A stand-in vLLM server reports a long queue; the router moves away from it."""
    waiting = {"value": 0}

    async def metrics(_: web.Request) -> web.Response:
        text = (
            "# HELP vllm:num_requests_running Number of requests currently running.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            'vllm:num_requests_running{model_name="llama"} 2.0\n'
            "# HELP vllm:num_requests_waiting Number of requests waiting.\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{model_name="llama"}} {waiting["value"]}.0\n'
            "# TYPE vllm:time_to_first_token_seconds histogram\n"
            'vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="llama"} 3.0\n'
        )
        return web.Response(text=text)

    engine = web.Application()
    engine.router.add_get("/metrics", metrics)
    engine_client = await aiohttp_client(engine)
    url = f"http://127.0.0.1:{engine_client.port}/metrics"
    doc = {"pools": {"ns.chat": {"endpoints": [
        {"address": EFFICIENT, "joulesPerToken": 0.1, "tokensPerSecond": 100, "metricsUrl": url},
        {"address": FAST, "joulesPerToken": 0.5, "tokensPerSecond": 1000},
    ]}}}
    path = tmp_path / "ep.yaml"
    path.write_text(json.dumps(doc))
    client = await aiohttp_client(create_app(Settings(
        cluster=False, endpoints_file=path, scrape_interval_seconds=0.05)))
    body = {"pool": "ns.chat", "outputTokens": 100, "deadlineSeconds": 2.0}

    async def pool_state() -> dict[str, Any]:
        return dict(await (await client.get("/v1/pools/ns.chat")).json())

    for _ in range(100):
        if (await pool_state())["endpoints"][0]["queueTokens"] > 0:
            break
        await asyncio.sleep(0.02)
    assert (await (await client.post("/v1/route", json=body)).json())["endpoint"] == EFFICIENT
    waiting["value"] = 50
    for _ in range(100):
        if (await pool_state())["endpoints"][0]["queueTokens"] > 50 * 100:
            break
        await asyncio.sleep(0.02)
    assert (await (await client.post("/v1/route", json=body)).json())["endpoint"] == FAST
    text = await (await client.get("/metrics")).text()
    assert 'joulepool_router_scrapes_total{result="ok"}' in text


async def test_files_mode_with_plan_nodes_and_reload(aiohttp_client: Any, tmp_path: Path) -> None:
    """The router and the scheduler extender read the same plan and nodes files."""
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(T.plan({"default.chat": [("h0", "H100", 2)]}).to_json())
    nodes_path = tmp_path / "nodes.json"
    nodes_path.write_text(json.dumps({"kind": "List", "items": [
        T.node("h0", "H100"), T.node("a0", "A100"),
        T.pod("chat-0", node_name="h0", ready=True, ip="10.1.0.1"),
    ]}))
    files = {"cluster": False, "plan_file": plan_path, "nodes_file": nodes_path,
             "file_poll_seconds": 0.05, "scrape_interval_seconds": 0}
    client = await aiohttp_client(create_app(Settings(**files)))
    ext = await aiohttp_client(extender_app.create_app(extender_settings.Settings(**files)))
    assert (await client.get("/readyz")).status == 200
    assert (await ext.get("/readyz")).status == 200
    out = await (await client.post("/v1/route", json={"pool": "default.chat",
                                                      "outputTokens": 10})).json()
    assert out["endpoint"] == "10.1.0.1:8000"
    args = T.extender_args(T.pod("chat-1"), names=["h0", "a0"])
    out = await (await ext.post("/scheduler/filter", json=args)).json()
    assert out["NodeNames"] == ["h0"]
    # the operator moves the pool to a0; the new plan file is picked up
    plan_path.write_text(T.plan({"default.chat": [("a0", "A100", 2)]}, version=8).to_json())
    os.utime(plan_path, ns=(1, 10**18))
    for _ in range(100):
        out = await (await ext.post("/scheduler/filter", json=args)).json()
        if out["NodeNames"] == ["a0"]:
            break
        await asyncio.sleep(0.02)
    assert out["NodeNames"] == ["a0"]
    # a broken plan file keeps the last good plan
    plan_path.write_text("{broken")
    os.utime(plan_path, ns=(1, 2 * 10**18))
    await asyncio.sleep(0.2)
    out = await (await ext.post("/scheduler/filter", json=args)).json()
    assert out["NodeNames"] == ["a0"]
    text = await (await ext.get("/metrics")).text()
    assert "joulepool_extender_plan_errors_total 1.0" in text
    # the router kept the last good plan (version 8) too; the ready pod still serves
    out = await (await client.post("/v1/route", json={"pool": "default.chat",
                                                      "outputTokens": 10})).json()
    assert out["endpoint"] == "10.1.0.1:8000"
    text = await (await client.get("/metrics")).text()
    assert "joulepool_router_plan_errors_total 1.0" in text
    assert "joulepool_router_plan_version 8.0" in text


async def test_readyz_waits_for_sources(aiohttp_client: Any) -> None:
    app = create_app(Settings(cluster=True, scrape_interval_seconds=0), background=False)
    client = await aiohttp_client(app)
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["waitingFor"] == ["nodes", "pods", "plan"]
    assert (await client.get("/healthz")).status == 200
    for src in ("nodes", "pods", "plan"):
        app[ROUTER].state.mark_synced(src)
    assert (await client.get("/readyz")).status == 200
