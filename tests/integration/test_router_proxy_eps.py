"""The proxy learns eps, not only lambda, with no callback: responses carry no joules,
so each completion's energy is the tokens the proxy measured x the endpoint's measured
J/token, the increments of its pod's GPU energy counter (as the node agent publishes it,
``joulepool_gpu_energy_joules{pod, namespace}``) over the engine's generated-token
counter (``vllm:generation_tokens_total``), both read by the router's scrape.

The engines are fake vLLM servers; the energy page is the node agent's own exporter
(``nodeagent.metrics.AgentMetrics``) whose GPUs draw 2.5 x the J/token the router's
profile assumes for every token the engine generated. Requests go through the real
OpenAI SDK; nothing calls ``/v1/complete``.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from joulepool.core.profiles import H100_8B
from joulepool.fakes.engine import FakeEngine, build_app
from joulepool.nodeagent.metrics import AgentMetrics, GPUSample
from joulepool.router.app import ROUTER, create_app
from joulepool.router.settings import Settings

MODEL = H100_8B.model
POOL = "ns.chat"
PROFILE_EPS = 0.1  # the endpoints file's J/token: the router's model of each engine
TRUE_FACTOR = 2.5  # what the GPUs really draw, per token, over the model


def _generated(engine: FakeEngine) -> float:
    return float(engine.metrics.generation_tokens.labels(MODEL)._value.get())


async def _energy_page(engines: dict[str, FakeEngine]) -> TestServer:
    """A node agent's /metrics: each serving pod's GPU energy so far, per token generated."""
    metrics = AgentMetrics("node-a")

    def samples() -> list[GPUSample]:
        return [GPUSample((str(i), f"GPU-{i}", "NVIDIA H100", "H100", "node-a", pod, "ns",
                           "engine"),
                          300.0, TRUE_FACTOR * PROFILE_EPS * _generated(engine), 1.98e9)
                for i, (pod, engine) in enumerate(sorted(engines.items()))]

    metrics.gpu_samples = samples

    async def page(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", page)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


async def test_proxied_outcomes_move_eps_with_no_callback(tmp_path: Path) -> None:
    engines = {f"chat-{i}": FakeEngine(H100_8B) for i in range(2)}
    servers = {pod: TestServer(build_app(e), host="127.0.0.1") for pod, e in engines.items()}
    for s in servers.values():
        await s.start_server()
    energy = await _energy_page(engines)
    (tmp_path / "endpoints.json").write_text(json.dumps({"pools": {POOL: {
        "model": MODEL, "slo": {"ttftSeconds": 5.0, "tpotSeconds": 0.5},
        "endpoints": [{"address": f"127.0.0.1:{s.port}", "pod": f"ns/{pod}",
                       "metricsUrl": f"http://127.0.0.1:{s.port}/metrics",
                       "joulesPerToken": PROFILE_EPS, "tokensPerSecond": 1000}
                      for pod, s in servers.items()]}}}))
    router = TestServer(create_app(Settings(
        cluster=False, scrape_interval_seconds=0.2, file_poll_seconds=0, eps_min_tokens=100,
        endpoints_file=tmp_path / "endpoints.json",
        energy_metrics_urls=[f"http://127.0.0.1:{energy.port}/metrics"])), host="127.0.0.1")
    await router.start_server()
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{router.port}/v1",
                                api_key="unused", max_retries=0)
    pool = router.app[ROUTER].router.pool(POOL)
    try:
        async def burst(n: int, stream: bool) -> None:
            async def one(i: int) -> None:
                if stream:
                    chunks = await client.completions.create(
                        model=MODEL, prompt=f"p{i}", max_tokens=24, stream=True)
                    assert len([c async for c in chunks]) == 24
                else:
                    out = await client.completions.create(model=MODEL, prompt=f"p{i}",
                                                          max_tokens=24)
                    assert out.usage is not None and out.usage.completion_tokens == 24
            await asyncio.gather(*(one(i) for i in range(n)))

        assert all(e.eps_est.scale == 1.0 for e in pool.endpoints)
        # until the router has read two energy pages a span apart, nothing is measured
        deadline = time.monotonic() + 30
        while not any(e.measured_eps.value for e in pool.endpoints):
            assert time.monotonic() < deadline, "no J/token measured"
            await burst(8, stream=False)
            await asyncio.sleep(0.3)
        for _ in range(4):
            await burst(8, stream=False)
            await burst(8, stream=True)
    finally:
        await client.close()
        await router.close()
        await energy.close()
        for s in servers.values():
            await s.close()
    learned = [e for e in pool.endpoints if e.eps_est.samples > 0]
    assert learned, "no endpoint learned eps from proxied completions"
    for e in learned:
        assert e.measured_eps.value == pytest.approx(TRUE_FACTOR * PROFILE_EPS, rel=1e-6)
        assert e.eps_est.scale == pytest.approx(TRUE_FACTOR, rel=0.02)
    # the routing cost uses it: the pool's marginal J/token is the learned one
    described = {d["address"]: d for d in pool.describe(time.monotonic())["endpoints"]}
    for e in learned:
        assert described[e.address]["epsScale"] == pytest.approx(TRUE_FACTOR, rel=0.02)
        assert described[e.address]["joulesPerToken"] == pytest.approx(
            TRUE_FACTOR * PROFILE_EPS, rel=0.02)
