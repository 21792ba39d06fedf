"""The router's OpenAI-compatible proxy, driven by the real OpenAI SDK over loopback.

Fake engines (``joulepool.fakes.engine``) serve behind the router; the SDK talks
to the router only. Checked: sync and async clients, streaming and not, chat and
text completions; streamed bytes are exactly what the engine sent; outcomes the
proxy measured move the pool's miss ratio and PI lambda with no /v1/complete;
retries before the first byte; OpenAI-shaped 400/404/429/503; the token guards
/v1/complete but not the proxy.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from joulepool.api import contract
from joulepool.core.profiles import H100_8B
from joulepool.fakes.engine import FakeEngine, build_app
from joulepool.router.app import ROUTER, create_app
from joulepool.router.settings import Settings

MODEL = H100_8B.model
POOL = "ns.chat"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _engine(app: web.Application | None = None) -> TestServer:
    server = TestServer(app or build_app(FakeEngine(H100_8B)), host="127.0.0.1")
    await server.start_server()
    return server


def _write_endpoints(path: Path, addresses: list[str], tier: str = "interactive",
                     ttft: float = 5.0, tpot: float = 0.5) -> Path:
    path.write_text(json.dumps({"pools": {POOL: {
        "model": MODEL, "tier": tier,
        "slo": {"ttftSeconds": ttft, "tpotSeconds": tpot},
        "endpoints": [{"address": a, "joulesPerToken": 0.1 * (i + 1),
                       "tokensPerSecond": 1000} for i, a in enumerate(addresses)],
    }}}))
    return path


class Stack:
    def __init__(self, router: TestServer, engines: list[TestServer]) -> None:
        self.router = router
        self.engines = engines
        self.base_url = f"http://127.0.0.1:{router.port}/v1"

    @property
    def pool(self) -> Any:
        return self.router.app[ROUTER].router.pool(POOL)


async def _stack(tmp_path: Path, engines: list[TestServer], extra: list[str] = (),
                 **settings: Any) -> Stack:
    addresses = [f"127.0.0.1:{e.port}" for e in engines] + list(extra)
    s = Settings(cluster=False, scrape_interval_seconds=0, file_poll_seconds=0,
                 endpoints_file=_write_endpoints(tmp_path / "endpoints.json", addresses),
                 **settings)
    router = TestServer(create_app(s), host="127.0.0.1")
    await router.start_server()
    return Stack(router, engines)


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    engines = [await _engine(), await _engine()]
    st = await _stack(tmp_path, engines, pi_every=5)
    yield st
    await st.router.close()
    for e in engines:
        await e.close()


def _sdk(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0)


def _async_sdk(stack: Stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.base_url, api_key="unused", max_retries=0)


async def test_sync_sdk_completion_and_chat(stack: Stack) -> None:
    def run() -> tuple[Any, Any, Any]:
        client = _sdk(stack)
        text = client.completions.create(model=MODEL, prompt="hello " * 40, max_tokens=5)
        chat = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi there"}], max_tokens=4)
        models = client.models.list()
        return text, chat, models

    text, chat, models = await asyncio.to_thread(run)
    assert text.choices[0].text == " tok0 tok1 tok2 tok3 tok4"
    assert text.usage.completion_tokens == 5 and text.usage.prompt_tokens == 60
    assert chat.choices[0].message.content == " tok0 tok1 tok2 tok3"
    assert chat.usage.completion_tokens == 4
    assert [m.id for m in models.data] == [MODEL]
    pool = stack.pool
    assert pool.window.rate(time.monotonic()) == 0.0  # two completions, met
    assert sum(len(e.ledger) for e in pool.endpoints) == 0  # both learned, none leaked


async def test_async_sdk_streaming_text_and_chat(stack: Stack) -> None:
    client = _async_sdk(stack)
    stream = await client.completions.create(model=MODEL, prompt="abc", max_tokens=6,
                                             stream=True)
    texts = [c.choices[0].text async for c in stream if c.choices]
    assert "".join(texts) == "".join(f" tok{i}" for i in range(6))
    chat = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3, stream=True,
        stream_options={"include_usage": True})
    chunks = [c async for c in chat]
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == " tok0 tok1 tok2"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    await client.close()


async def test_stream_is_byte_for_byte_the_engines(stack: Stack) -> None:
    """The same request to the engine directly and through the proxy: identical bytes
    apart from the per-response id and creation time."""
    body = {"model": MODEL, "prompt": "p", "max_tokens": 8, "stream": True,
            "stream_options": {"include_usage": True}}
    engine_seen: list[bytes] = []
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{stack.base_url}/completions", json=body) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            served_by = resp.headers[contract.SERVED_BY_HEADER]
            proxied = await resp.read()
        async with http.post(f"http://{served_by}/v1/completions", json=body) as resp:
            engine_seen.append(await resp.read())
    events = proxied.split(b"\n\n")
    direct = engine_seen[0].split(b"\n\n")
    assert len(events) == len(direct) == 8 + 1 + 1 + 1  # tokens, usage, [DONE], ""
    for a, b in zip(events[:-2], direct[:-2], strict=True):
        ja, jb = json.loads(a[6:]), json.loads(b[6:])
        ja.pop("id"), jb.pop("id"), ja.pop("created"), jb.pop("created")
        assert ja == jb
    assert events[-2] == b"data: [DONE]"


async def test_stream_bytes_relayed_unchanged(tmp_path: Path) -> None:
    """An engine whose stream has odd framing (CRLF-free split chunks, comments): the
    client receives exactly its bytes."""
    payload = [b": keep-alive\n\n", b'data: {"choices":[{"index":0,"te',
               b'xt":"a"}]}\n\ndata: {"choices":[{"index":0,"text":"b"}]}\n\n',
               b"data: [DONE]\n\n"]

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for p in payload:
            await resp.write(p)
            await asyncio.sleep(0.01)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    engine = await _engine(app)
    st = await _stack(tmp_path, [engine])
    try:
        async with aiohttp.ClientSession() as http, http.post(f"{st.base_url}/completions",
                             json={"model": MODEL, "prompt": "x", "stream": True}) as r:
            got = await r.read()
        assert got == b"".join(payload)
        assert st.pool.window.rate(time.monotonic()) is not None  # the proxy learned
    finally:
        await st.router.close()
        await engine.close()


async def test_outcomes_move_lambda_without_callback(tmp_path: Path) -> None:
    """Requests that miss their deadline (1 ms, unmeetable) raise lambda; met ones
    lower it, all measured by the proxy."""
    engines = [await _engine(), await _engine()]
    st = await _stack(tmp_path, engines, pi_every=5)
    try:
        client = _async_sdk(st)
        lam0 = st.pool.pi.lam
        for _ in range(10):
            await client.completions.create(
                model=MODEL, prompt="x", max_tokens=3,
                extra_headers={contract.DEADLINE_HEADER: "1"})
        pool = st.pool
        assert pool.pi_updates == 2
        lam_missed = pool.pi.lam
        assert lam_missed > lam0
        assert pool.window.rate(time.monotonic()) == 1.0
        for _ in range(10):
            await client.completions.create(
                model=MODEL, prompt="x", max_tokens=3,
                extra_headers={contract.DEADLINE_HEADER: "60000"})
        assert pool.pi_updates == 4
        assert pool.pi.lam < lam_missed
        assert sum(len(e.ledger) for e in pool.endpoints) == 0
        await client.close()
    finally:
        await st.router.close()
        for e in engines:
            await e.close()


async def test_llmd_slo_headers_judge_ttft(tmp_path: Path) -> None:
    engines = [await _engine()]
    st = await _stack(tmp_path, engines, pi_every=4)
    try:
        client = _async_sdk(st)
        lam0 = st.pool.pi.lam
        for _ in range(4):  # a TTFT SLO no engine meets (0.001 ms)
            s = await client.completions.create(
                model=MODEL, prompt="x", max_tokens=3, stream=True,
                extra_headers={contract.LLMD_TTFT_HEADER: "0.001",
                               contract.LLMD_TPOT_HEADER: "60000"})
            _ = [c async for c in s]
        assert st.pool.pi_updates == 1 and st.pool.pi.lam > lam0
        await client.close()
    finally:
        await st.router.close()
        await engines[0].close()


async def test_retry_on_dead_endpoint_before_first_byte(tmp_path: Path) -> None:
    """The cheapest endpoint is a closed port: every request still succeeds elsewhere."""
    dead = f"127.0.0.1:{_free_port()}"
    engine = await _engine()
    # the dead address sorts first with the lowest J/token, so it is always picked first
    st = await _stack(tmp_path, [], extra=[dead, f"127.0.0.1:{engine.port}"])
    try:
        client = _async_sdk(st)
        for _ in range(5):
            out = await client.completions.create(model=MODEL, prompt="x", max_tokens=2)
            assert out.usage.completion_tokens == 2
        assert all(not e.ledger for e in st.pool.endpoints)
        await client.close()
    finally:
        await st.router.close()
        await engine.close()


async def test_openai_errors(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{_free_port()}"
    st = await _stack(tmp_path, [], extra=[dead])
    client = _async_sdk(st)
    try:
        with pytest.raises(openai.NotFoundError) as nf:
            await client.completions.create(model="no-such-model", prompt="x")
        assert "no-such-model" in nf.value.message
        with pytest.raises(openai.BadRequestError) as bad:
            await client.completions.create(model=MODEL, prompt="x", max_tokens=-3)
        assert "max_tokens" in bad.value.message
        with pytest.raises(openai.BadRequestError) as hdr:
            await client.completions.create(model=MODEL, prompt="x",
                                            extra_headers={contract.TIER_HEADER: "gold"})
        assert contract.TIER_HEADER in hdr.value.message
        with pytest.raises(openai.InternalServerError) as down:  # 503: none answered
            await client.completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert down.value.status_code == 503
        body = down.value.body
        assert isinstance(body, dict) and body["type"] == "service_unavailable"
        pool = st.pool
        pool.waiting[:] = 3  # the engine reports a queue: the pool is saturated
        with pytest.raises(openai.RateLimitError):
            await client.completions.create(model=MODEL, prompt="x", max_tokens=2,
                                            extra_headers={contract.TIER_HEADER: "bulk"})
        async with aiohttp.ClientSession() as http, http.post(  # not JSON: 400, the reason
                f"{st.base_url}/completions", data=b"{",
                headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400
            assert "malformed JSON" in (await r.json())["error"]["message"]
    finally:
        await client.close()
        await st.router.close()


async def test_token_guards_complete_not_proxy(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    engine = await _engine()
    st = await _stack(tmp_path, [engine], token_file=token)
    try:
        client = _async_sdk(st)  # no router token: the proxy is open
        out = await client.completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert out.usage.completion_tokens == 2
        async with aiohttp.ClientSession() as http:
            report = {"pool": POOL, "endpoint": "x:1", "deadlineMet": False}
            async with http.post(f"{st.base_url}/complete", json=report) as r:
                assert r.status == 401
            async with http.post(f"{st.base_url}/complete", json=report,
                                 headers={"Authorization": "Bearer s3cret"}) as r:
                assert r.status == 200
        await client.close()
    finally:
        await st.router.close()
        await engine.close()


async def test_health_answers_as_healthz_without_the_token(tmp_path: Path) -> None:
    """``GET /health`` (what vLLM serves and GuideLLM probes) is open like ``/healthz``
    when a token guards the rest, and answers the same."""
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    engine = await _engine()
    st = await _stack(tmp_path, [engine], token_file=token)
    root = st.base_url.removesuffix("/v1")
    try:
        async with aiohttp.ClientSession() as http:
            answers = []
            for path in ("/health", "/healthz"):
                async with http.get(f"{root}{path}") as r:
                    answers.append((r.status, await r.json()))
            async with http.get(f"{root}/metrics") as r:
                assert r.status == 401  # the token is in force
        assert answers[0] == answers[1] == (200, {"status": "ok"})
    finally:
        await st.router.close()
        await engine.close()


@pytest.mark.parametrize("engine_kind", ["vllm", "sglang"])
async def test_router_scrapes_current_engine_names(engine_kind: str) -> None:
    """The fake engine serves vLLM V1's (or SGLang's) names; the router's scrape reads
    the queue and the KV-cache usage by the pod label's spec or by detection."""
    from joulepool.fakes.engine import EngineMetrics
    from joulepool.kube.scrape import scrape_all

    metrics = EngineMetrics(MODEL, [], "H100", engine=engine_kind)
    engine = FakeEngine(H100_8B, metrics=metrics, kv_cache_tokens=64)
    server = await _engine(build_app(engine))
    url = f"http://127.0.0.1:{server.port}/metrics"
    try:
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1",
                                    api_key="x", max_retries=0)
        busy = asyncio.create_task(client.completions.create(
            model=MODEL, prompt="y" * 160, max_tokens=2000))
        for _ in range(200):  # until the request runs (40 prompt tokens of 64 in use)
            await asyncio.sleep(0.01)
            if engine.running:
                break
        async with aiohttp.ClientSession() as http:
            for label in (engine_kind, None):
                samples, failures = await scrape_all(
                    http, [(POOL, "a:1", url, label)], timeout_s=2.0, concurrency=2)
                assert failures == 0 and samples[0].running == 1.0
                assert samples[0].kv_cache is not None and 0.6 < samples[0].kv_cache <= 1.0
        busy.cancel()
        await client.close()
    finally:
        await server.close()


def _instant_engine() -> web.Application:
    """An engine that answers every OpenAI request at once (streamed when asked)."""

    async def answer(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") == "Bearer wrong-engine-key":
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        body = await request.json()
        if body.get("stream") is not True:
            return web.json_response({"object": "text_completion", "choices": [
                {"index": 0, "text": " hi", "finish_reason": "length"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices":[{"index":0,"text":" hi"}]}\n\ndata: [DONE]\n\n')
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", answer)
    app.router.add_post("/v1/chat/completions", answer)
    return app


async def test_proxy_survives_the_fuzzer(tmp_path: Path) -> None:
    """Mutated OpenAI requests: never a 5xx (the engine behind is healthy), never slow,
    and plausible mutations are still served."""
    from joulepool import fuzz

    engine = await _engine(_instant_engine())
    st = await _stack(tmp_path, [engine])
    try:
        endpoints = fuzz.proxy_endpoints(MODEL)
        report = await fuzz.run(st.base_url.removesuffix("/v1"), endpoints, 100, 12,
                                concurrency=8, max_latency_s=1.0)
        assert report.total == 100 * len(endpoints)
        assert report.ok, report.describe_violations()
        by_name = {r.name: r for r in report.results}
        for name in ("completions", "chat-completions"):
            statuses = by_name[name].statuses
            assert statuses[200] > 0 and statuses[400] > 0, (name, statuses)
        assert all(not e.ledger for e in st.pool.endpoints)  # nothing leaked
    finally:
        await st.router.close()
        await engine.close()


async def test_saturated_pool_holds_interactive_llf_and_sheds_bulk(tmp_path: Path) -> None:
    """With the engine's batch full, interactive requests wait in the proxy and go in
    least-laxity order; a bulk request is shed with 429 at once."""
    engine = await _engine()
    st = await _stack(tmp_path, [engine])
    room = st.router.app[ROUTER].room
    try:
        pool = st.pool
        pool.max_batch[:] = 2  # the engine takes two requests at a time
        client = _async_sdk(st)

        async def ask(deadline_ms: str, tokens: int) -> float:
            await client.completions.create(
                model=MODEL, prompt="x", max_tokens=tokens,
                extra_headers={contract.DEADLINE_HEADER: deadline_ms})
            return time.monotonic()

        running = [asyncio.create_task(ask("60000", 30)) for _ in range(2)]
        while sum(len(e.ledger) for e in pool.endpoints) < 2:
            await asyncio.sleep(0.005)
        loose = asyncio.create_task(ask("600000", 5))
        while room.waiting(POOL) < 1:
            await asyncio.sleep(0.005)
        tight = asyncio.create_task(ask("20000", 5))
        while room.waiting(POOL) < 2:
            await asyncio.sleep(0.005)
        assert sum(len(e.ledger) for e in pool.endpoints) == 2  # held, not sent
        with pytest.raises(openai.RateLimitError) as shed:
            await client.completions.create(model=MODEL, prompt="x", max_tokens=2,
                                            extra_headers={contract.TIER_HEADER: "bulk"})
        assert "bulk" in shed.value.message
        await asyncio.gather(*running)
        t_loose, t_tight = await loose, await tight
        assert t_tight < t_loose  # the tighter deadline went first although it came later
        assert room.waiting(POOL) == 0 and all(not e.ledger for e in pool.endpoints)
        await client.close()
    finally:
        await st.router.close()
        await engine.close()


async def test_engine_gone_under_load_costs_no_request(tmp_path: Path) -> None:
    """One of two engines shuts down while requests stream through the proxy: requests
    it had finish, later ones (on pooled connections it closed, or refused connections)
    are retried on the other engine, so every request succeeds and nothing leaks."""
    engines = [await _engine(), await _engine()]
    st = await _stack(tmp_path, engines)
    try:
        client = _async_sdk(st)
        done = 0
        failures = 0

        async def worker() -> None:
            nonlocal done, failures
            for _ in range(25):
                try:
                    out = await client.completions.create(model=MODEL, prompt="x",
                                                          max_tokens=3)
                    assert out.usage.completion_tokens == 3
                    done += 1
                except openai.APIError:
                    failures += 1

        load = [asyncio.create_task(worker()) for _ in range(6)]
        while done < 40:
            await asyncio.sleep(0.005)
        await engines[0].close()  # the cheaper engine, which takes most requests
        await asyncio.gather(*load)
        assert failures == 0 and done == 150
        assert all(not e.ledger for e in st.pool.endpoints)
        await client.close()
    finally:
        await st.router.close()
        await engines[1].close()


async def test_engine_failing_mid_answer(tmp_path: Path) -> None:
    """A buffered answer cut short is a 502 (nothing was sent yet); a stream cut short
    ends without [DONE] and counts as a missed deadline."""

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(b'data: {"choices":[{"index":0,"text":"a"}]}\n\n')
        else:
            resp = web.StreamResponse(headers={"Content-Type": "application/json",
                                               "Content-Length": "1000"})
            await resp.prepare(request)
            await resp.write(b'{"choices": [')
        assert request.transport is not None
        request.transport.close()  # the engine dies mid-answer
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    engine = await _engine(app)
    st = await _stack(tmp_path, [engine])
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{st.base_url}/completions",
                                 json={"model": MODEL, "prompt": "x"}) as r:
                assert r.status == 502
                assert "failed while answering" in (await r.json())["error"]["message"]
            async with http.post(f"{st.base_url}/completions",
                                 json={"model": MODEL, "prompt": "x", "stream": True}) as r:
                assert r.status == 200
                got = await r.read()
        assert got == b'data: {"choices":[{"index":0,"text":"a"}]}\n\n'
        assert st.pool.window.rate(time.monotonic()) == 1.0  # the cut stream missed
        assert all(not e.ledger for e in st.pool.endpoints)
    finally:
        await st.router.close()
        await engine.close()


async def test_client_api_key_reaches_the_engine(tmp_path: Path) -> None:
    """The SDK's API key is the engine's business: forwarded, and the engine's 401 comes
    back unchanged (not retried, nothing learned)."""
    engine = await _engine(_instant_engine())
    st = await _stack(tmp_path, [engine])
    try:
        client = openai.AsyncOpenAI(base_url=st.base_url, api_key="wrong-engine-key",
                                    max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await client.completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert st.pool.window.rate(time.monotonic()) is None  # no outcome learned
        assert all(not e.ledger for e in st.pool.endpoints)
        await client.close()
    finally:
        await st.router.close()
        await engine.close()


async def test_engine_cookie_never_reaches_another_client(tmp_path: Path) -> None:
    """A cookie an engine sets is the answer's (relayed to that client at most): the
    proxy's shared connection pool keeps none, so the next client's request carries
    only the cookies that client sent."""
    seen: list[str | None] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Cookie"))
        resp = web.json_response({"choices": [{"index": 0, "text": "x"}],
                                  "usage": {"completion_tokens": 1}})
        resp.set_cookie("engine_session", "client-a-secret")
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    engine = await _engine(app)
    # by host name: aiohttp's default cookie jar would keep this one (not an IP's)
    st = await _stack(tmp_path, [], extra=[f"localhost:{engine.port}"])
    st.engines.append(engine)
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    try:
        async with aiohttp.ClientSession() as a, a.post(f"{st.base_url}/completions",
                                                          json=body) as r:
            assert r.status == 200
        async with aiohttp.ClientSession() as b:
            async with b.post(f"{st.base_url}/completions", json=body) as r:
                assert r.status == 200
            async with b.post(f"{st.base_url}/completions", json=body,
                              headers={"Cookie": "mine=1"}) as r:
                assert r.status == 200
        assert seen == [None, None, "mine=1"]
    finally:
        await st.router.close()
        await engine.close()


async def test_engine_sees_the_clients_headers_and_no_proxy_defaults(tmp_path: Path) -> None:
    """The engine gets the client's end-to-end headers (less hop-by-hop ones) and none the
    proxy's HTTP client would add by itself: no ``Accept-Encoding`` the client did not
    send (so the engine compresses only for clients that asked), no aiohttp
    ``User-Agent`` or ``Accept``."""
    seen: list[dict[str, str]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append({k.lower(): v for k, v in request.headers.items()})
        return web.json_response({"choices": [{"index": 0, "text": "x"}],
                                  "usage": {"completion_tokens": 1}})

    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    engine = await _engine(app)
    st = await _stack(tmp_path, [engine])
    body = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1}).encode()
    try:
        async with aiohttp.ClientSession(skip_auto_headers=["Accept", "Accept-Encoding",
                                                             "User-Agent"]) as c:
            async with c.post(f"{st.base_url}/completions", data=body, headers={
                    "Content-Type": "application/json", "X-Trace": "t-1"}) as r:
                assert r.status == 200
            async with c.post(f"{st.base_url}/completions", data=body, headers={
                    "Content-Type": "application/json", "Accept-Encoding": "gzip",
                    "User-Agent": "OpenAI/Python 1.0"}) as r:
                assert r.status == 200
        first, second = seen
        assert first["x-trace"] == "t-1"
        assert first["content-type"] == "application/json"
        assert not {"accept", "accept-encoding", "user-agent"} & set(first)
        assert second["accept-encoding"] == "gzip"
        assert second["user-agent"] == "OpenAI/Python 1.0"
    finally:
        await st.router.close()
        await engine.close()
