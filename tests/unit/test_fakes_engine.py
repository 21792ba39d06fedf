"""The fake vLLM engine: OpenAI API, vLLM metrics, speed from the simulated GPU's clock."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp.test_utils import TestClient, TestServer

from joulepool.core.profiles import H100_8B, L4, L4_8B
from joulepool.fakes.engine import FakeEngine, build_app, count_prompt_tokens
from joulepool.fakes.gpus import SimulatedBackend, SimulatedGPUs
from joulepool.nodeagent.signals import parse_engine_metrics


class VirtualTime:
    """Injected clock and sleep: the engine's steps take virtual seconds, not real ones."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    async def sleep(self, dt: float) -> None:
        self.t += dt
        await asyncio.sleep(0)


async def client_for(engine: FakeEngine) -> TestClient:
    client = TestClient(TestServer(build_app(engine)))
    await client.start_server()
    return client


async def test_completion_non_streaming_and_metrics():
    engine = FakeEngine(H100_8B)
    client = await client_for(engine)
    try:
        r = await client.post("/v1/completions", json={
            "model": H100_8B.model, "prompt": "x" * 400, "max_tokens": 5})
        assert r.status == 200
        body = await r.json()
        assert body["object"] == "text_completion" and body["model"] == H100_8B.model
        assert body["choices"][0]["text"] == " tok0 tok1 tok2 tok3 tok4"
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"] == {"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105}
        text = await (await client.get("/metrics")).text()
        for name in ("vllm:num_requests_waiting", "vllm:num_requests_running",
                     "vllm:time_to_first_token_seconds_bucket",
                     "vllm:inter_token_latency_seconds_bucket", "vllm:kv_cache_usage_perc",
                     "vllm:generation_tokens_total"):
            assert name in text
        s = parse_engine_metrics(text)
        assert s.generation_tokens == 5
        assert s.ttft.counts[-1] == 1 and s.tpot.counts[-1] == 4
        assert (await client.get("/health")).status == 200
        models = await (await client.get("/v1/models")).json()
        assert models["data"][0]["id"] == H100_8B.model
    finally:
        await client.close()


async def test_completion_streaming_sse():
    client = await client_for(FakeEngine(H100_8B))
    try:
        r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3,
                                                       "stream": True})
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        raw = (await r.read()).decode()
        events = [e[len("data: "):] for e in raw.split("\n\n") if e.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert [c["choices"][0]["text"] for c in chunks] == [" tok0", " tok1", " tok2"]
        assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]
        assert len({c["id"] for c in chunks}) == 1
    finally:
        await client.close()


@pytest.mark.parametrize(("payload", "status"), [
    ("not json", 400),
    ([1, 2], 400),
    ({"model": "gpt-9", "prompt": "x"}, 404),
    ({"prompt": "x", "max_tokens": 0}, 400),
    ({"prompt": "x", "max_tokens": "ten"}, 400),
    ({"prompt": "x", "max_tokens": True}, 400),
    ({"prompt": {"a": 1}}, 400),
])
async def test_bad_requests_get_openai_errors(payload, status):
    client = await client_for(FakeEngine(H100_8B))
    try:
        if isinstance(payload, str):
            r = await client.post("/v1/completions", data=payload,
                                  headers={"Content-Type": "application/json"})
        else:
            r = await client.post("/v1/completions", json=payload)
        assert r.status == status
        assert "message" in (await r.json())["error"]
    finally:
        await client.close()


def test_prompt_token_count():
    assert count_prompt_tokens("a" * 40) == 10
    assert count_prompt_tokens([1, 2, 3]) == 3
    assert count_prompt_tokens(["abcdefgh"]) == 2
    assert count_prompt_tokens("") == 1


async def _generate_virtual(clock_mhz: float | None, tokens: int, batch: int = 1) -> float:
    vt = VirtualTime()
    gpus = SimulatedGPUs.open(None, "L4", 1, clock=vt)
    if clock_mhz is not None:
        SimulatedBackend(gpus).set_locked_clocks(0, L4.f_min_mhz.value, clock_mhz)
    engine = FakeEngine(L4_8B, gpus, [0], monotonic=vt, sleep=vt.sleep)

    async def one() -> int:
        return len([t async for t in engine.generate(4, tokens)])

    counts = await asyncio.gather(*(one() for _ in range(batch)))
    assert counts == [tokens] * batch
    await engine.close()
    return vt.t


async def test_lower_clock_slows_the_engine_by_the_profile_law():
    """Virtual time: exactly the core profile's decode-step law, (f_max / f) ** beta_decode."""
    fast = await _generate_virtual(None, 50)
    slow = await _generate_virtual(L4.f_min_mhz.value, 50)
    expected = float(L4_8B.itl_s(1, L4.f_min_mhz.value) / L4_8B.itl_s(1))
    # 49 decode steps and one prefill (which slows by beta_prefill): dominated by decode
    assert slow / fast == pytest.approx(expected, rel=0.02)
    assert slow / fast > 1.2


async def test_bigger_batch_steps_slower_but_makes_more_tokens_per_second():
    one = await _generate_virtual(None, 20, batch=1)
    many = await _generate_virtual(None, 20, batch=16)
    assert many > one  # each step is slower at batch 16 ...
    assert 16 * 20 / many > 20 / one  # ... but throughput is higher


async def test_engine_writes_its_batch_and_reads_the_agents_clock(tmp_path):
    path = tmp_path / "gpu.json"
    gpus = SimulatedGPUs.open(path, "L4", 2)
    engine = FakeEngine(L4_8B, SimulatedGPUs.open(path), [1], clock_refresh_s=0.0)
    client = await client_for(engine)
    try:
        tasks = [asyncio.create_task(client.post("/v1/completions", json={
            "prompt": "hello", "max_tokens": 6})) for _ in range(3)]
        for _ in range(100):
            await asyncio.sleep(0.02)
            if gpus.gpu(1)["batch"] == 3.0:
                break
        assert gpus.gpu(1)["batch"] == 3.0
        assert gpus.gpu(1)["model"] == L4_8B.model
        assert gpus.gpu(0)["batch"] == 0.0  # not our GPU
        await asyncio.gather(*tasks)
        await asyncio.sleep(0.05)
        assert gpus.gpu(1)["batch"] == 0.0
        text = await (await client.get("/metrics")).text()
        assert parse_engine_metrics(text).gpus == frozenset({1})
    finally:
        await client.close()


async def test_the_agents_lock_in_the_shared_state_file_slows_the_engines_steps(tmp_path):
    """The agent's clock lock, written to the shared state file by its own handle,
    slows the steps of an engine that reads the file, and its reset speeds them up
    again. Virtual time: the engine sleeps to a schedule of its steps' times, and the
    injected clock and sleep add up exactly the durations it sleeps to."""
    path = tmp_path / "gpu.json"
    agent_side = SimulatedBackend(SimulatedGPUs.open(path, "L4", 1))
    vt = VirtualTime()
    engine = FakeEngine(L4_8B, SimulatedGPUs.open(path), [0], clock_refresh_s=0.0,
                        monotonic=vt, sleep=vt.sleep)

    async def scheduled(n: int) -> float:
        t0 = vt.t
        assert len([t async for t in engine.generate(4, n)]) == n
        return vt.t - t0

    fast = await scheduled(50)
    agent_side.set_locked_clocks(0, L4.f_min_mhz.value, L4.f_min_mhz.value)
    slow = await scheduled(50)
    agent_side.reset_locked_clocks(0)
    again = await scheduled(50)
    await engine.close()
    expected = float(L4_8B.itl_s(1, L4.f_min_mhz.value) / L4_8B.itl_s(1))  # ~1.4
    # 49 decode steps and one prefill (which slows by beta_prefill): dominated by decode
    assert slow / fast == pytest.approx(expected, rel=0.02)
    assert slow / fast > 1.2
    assert again == pytest.approx(fast)


async def test_max_batch_queues_requests():
    vt = VirtualTime()
    engine = FakeEngine(H100_8B, max_batch=2, monotonic=vt, sleep=vt.sleep)
    seen_waiting = []

    async def one() -> None:
        async for _ in engine.generate(4, 5):
            seen_waiting.append(engine.metrics.registry.get_sample_value(
                "vllm:num_requests_waiting", {"model_name": H100_8B.model}))

    await asyncio.gather(*(one() for _ in range(5)))
    assert max(seen_waiting) >= 1  # three had to wait for a slot
    await engine.close()


@pytest.mark.parametrize(("body", "headers", "status"), [
    (b'{"prompt": "x"}', {"Content-Type": "text/plain"}, 415),
    (b'{"prompt": "x"}', {}, 415),
    (b'{"prompt": "x", "max_tokens": NaN}', {"Content-Type": "application/json"}, 400),
    (b'{"prompt": "x", "temperature": 1e999}', {"Content-Type": "application/json"}, 400),
])
async def test_json_only_as_application_json_and_rfc8259(body, headers, status):
    """Cross-site posts (text/plain, untyped) never reach the engine; NaN/Infinity are
    not JSON (httpserve's contract, as on every joulepool service)."""
    client = await client_for(FakeEngine(H100_8B))
    try:
        r = await client.post("/v1/completions", data=body, headers=headers,
                              skip_auto_headers=["Content-Type"])
        assert r.status == status
        assert "message" in (await r.json())["error"]
    finally:
        await client.close()
