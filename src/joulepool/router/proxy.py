"""The OpenAI-compatible routing proxy of the router service.

Routes:

    POST /v1/completions        OpenAI completions, streamed (SSE) or not
    POST /v1/chat/completions   OpenAI chat completions, streamed (SSE) or not
    GET  /v1/models             the models the router's pools serve

Per request (:mod:`joulepool.router.requests`): the pool from the
``x-joulepool-pool`` header or the body's ``model``; the endpoint from the core
router; the body forwarded unchanged to the engine and the engine's answer
streamed back unchanged (status, content type, bytes). The proxy measures TTFT,
output tokens and time per output token as the bytes pass and reports the
outcome to the pool itself, so the ledger, the miss ratio and the PI lambda
learn with no ``/v1/complete`` call. An engine that fails before answering
(connection refused or reset, timeout, 5xx) is retried on the decision's next
fallback.

Errors are OpenAI-shaped ``{"error": {"message", "type", "param", "code"}}``:
400 bad body or header (the reason), 404 no pool serves the model, 429 a request
shed by the waiting room (:mod:`joulepool.router.admission`: while every endpoint
of the pool is saturated, interactive requests wait least-laxity-first and bulk
ones are shed), 502 the engine failed in the middle of its answer, 503 no endpoint
ready or none answered.

These paths are open (a gateway or client sends plain OpenAI requests); the
router's bearer token guards the low-level ``/v1/route``, ``/v1/complete``,
``/v1/pools`` and ``/metrics``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from joulepool import httpserve
from joulepool.api import contract
from joulepool.core.router import NoEndpoints, PoolRouter, RouteDecision, UnknownPool
from joulepool.kube.service import SERVICE, handle_healthz, json_response, read_body
from joulepool.router import requests
from joulepool.router.admission import Shed, WaitingRoom
from joulepool.router.settings import Settings

#: routes of this module (verb names in the request metrics)
PROXY_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models")
PROXY_VERBS = ("completions", "chat_completions", "models")
#: engine statuses that are retried on the next endpoint (nothing was served yet)
RETRY_STATUSES = frozenset({500, 502, 503, 504})
#: request headers not forwarded to the engine (hop-by-hop, or recomputed)
_DROP_REQUEST = frozenset({
    "host", "content-length", "connection", "keep-alive", "transfer-encoding", "te",
    "upgrade", "proxy-authorization", "proxy-connection", "expect",
})
#: request headers aiohttp's client would add when the client sent none
_NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent")
#: response headers passed back to the client
_PASS_RESPONSE = ("Content-Type", "Content-Encoding", "Cache-Control")

#: a non-streamed answer up to this size is relayed in one write
MAX_BUFFERED_BYTES = 1 << 20

SESSION = web.AppKey("proxy_session", aiohttp.ClientSession)
#: the per-pool LLF waiting room (the router service's)
ROOM = web.AppKey("waiting_room", WaitingRoom)

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                404: "invalid_request_error", 429: "rate_limit_exceeded",
                503: "service_unavailable"}
_ERROR_CODES = {404: "model_not_found", 429: "rate_limit_exceeded"}


def error_body(status: int, message: str) -> dict[str, Any]:
    """The OpenAI-shaped error document (also the endpoint picker's immediate answers)."""
    return {"error": {
        "message": message, "type": _ERROR_TYPES.get(status, "api_error"), "param": None,
        "code": _ERROR_CODES.get(status),
    }}


def openai_error(status: int, message: str, headers: dict[str, str] | None = None
                 ) -> web.Response:
    """An OpenAI-shaped error answer."""
    return json_response(error_body(status, message), status, headers)


def _forward_headers(request: web.Request) -> dict[str, str]:
    """The client's headers less hop-by-hop ones; ``Authorization`` is the client's
    API key for the engine (the proxy's paths take no router token) and goes along."""
    return {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST}


async def _open(session: aiohttp.ClientSession, pool: PoolRouter, decision: RouteDecision,
                request: web.Request, body: bytes
                ) -> tuple[str, aiohttp.ClientResponse] | None:
    """The first endpoint (decision's, then its fallbacks) that answers (the connect
    timeout is the session's); the ledger entry follows the endpoint tried. None if none
    answered (the entry is released)."""
    headers = _forward_headers(request)
    tried = decision.endpoint
    for ep in [decision.endpoint, *decision.fallbacks]:
        if ep != tried:
            pool.reassign(decision.request_id, tried, ep, decision.tokens, time.monotonic())
            tried = ep
        try:
            upstream = await session.post(f"http://{ep}{request.path}", data=body,
                                          headers=headers)
        except (aiohttp.ClientError, TimeoutError, OSError):
            continue
        if upstream.status in RETRY_STATUSES:
            upstream.release()
            continue
        return ep, upstream
    pool.release(tried, decision.request_id)
    return None


async def _relay(request: web.Request, upstream: aiohttp.ClientResponse, endpoint: str,
                 meter: requests.ResponseMeter) -> web.StreamResponse:
    """The engine's answer to the client, unchanged: a body of known length in one
    write (fewer socket sends), anything else streamed chunk by chunk as it comes."""
    headers = {name: upstream.headers[name] for name in _PASS_RESPONSE
               if name in upstream.headers}
    headers[contract.SERVED_BY_HEADER] = endpoint
    length = upstream.content_length
    if not meter.stream and length is not None and length <= MAX_BUFFERED_BYTES:
        data = await upstream.read()
        meter.feed(data, time.monotonic())
        return web.Response(body=data, status=upstream.status, reason=upstream.reason,
                            headers=headers)
    resp = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                              headers=headers)
    await resp.prepare(request)
    try:
        async for data in _chunks(upstream):
            meter.feed(data, time.monotonic())
            await resp.write(data)
    except (aiohttp.ClientError, TimeoutError):
        pass  # the engine failed mid-stream: the client's stream ends short (no [DONE])
    await resp.write_eof()
    return resp


async def _chunks(upstream: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    async for data in upstream.content.iter_any():
        yield data


async def handle_completion(request: web.Request, chat: bool) -> web.StreamResponse:
    """One proxied completion (module docstring)."""
    svc = request.app[SERVICE]
    start = time.monotonic()
    body = await read_body(request)
    spec = requests.read_request(httpserve.parse_json(body), request.headers, chat)
    try:
        pool = requests.choose_pool(svc.router, spec)
    except UnknownPool as exc:
        raise httpserve.HTTPProblem(404, str(exc).strip("'\"")) from None
    room = request.app[ROOM]
    output_tokens = requests.output_tokens_estimate(pool, spec)
    deadline = requests.deadline_of(spec, output_tokens) or pool.deadline_for(output_tokens)
    try:
        await room.enter(pool, spec.tier or pool.tier, deadline, output_tokens, start)
    except Shed as exc:
        raise httpserve.HTTPProblem(429, str(exc)) from None
    try:
        return await _serve(request, pool, spec, body, start)
    finally:
        room.release(pool)


async def _serve(request: web.Request, pool: PoolRouter, spec: requests.RequestSpec,
                 body: bytes, start: float) -> web.StreamResponse:
    try:
        decision = requests.pick(pool, spec, time.monotonic())
    except NoEndpoints as exc:
        raise httpserve.HTTPProblem(503, str(exc)) from None
    opened = await _open(request.app[SESSION], pool, decision, request, body)
    if opened is None:
        raise httpserve.HTTPProblem(503, f"no endpoint of pool {pool.key!r} answered")
    endpoint, upstream = opened
    meter = requests.ResponseMeter(start, spec.stream)
    learned = False
    try:
        async with upstream:
            try:
                resp = await _relay(request, upstream, endpoint, meter)
            except (aiohttp.ClientError, TimeoutError) as exc:
                # the engine failed mid-answer before anything was sent (a buffered
                # answer); a stream already begun ends short in _relay instead
                raise httpserve.HTTPProblem(
                    502, f"engine {endpoint} failed while answering: {type(exc).__name__}"
                ) from None
        if upstream.status < 400:
            requests.learn(pool, endpoint, decision, spec, meter.finish(time.monotonic()),
                           time.monotonic())
            learned = True
        return resp
    finally:
        if not learned:  # client error, client gone or engine failed mid-answer
            pool.release(endpoint, decision.request_id)


async def handle_completions(request: web.Request) -> web.StreamResponse:
    return await handle_completion(request, chat=False)


async def handle_chat_completions(request: web.Request) -> web.StreamResponse:
    return await handle_completion(request, chat=True)


async def handle_models(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    svc.router.sync()
    names = sorted({n for k, p in svc.router.pools.items() for n in p.model_names() or (k,)})
    return json_response({"object": "list", "data": [
        {"id": n, "object": "model", "created": 0, "owned_by": "joulepool"} for n in names]})


async def session_ctx(app: web.Application) -> AsyncIterator[None]:
    """aiohttp cleanup context: the connection pool to the engines (kept alive). No
    cookie jar: a cookie an engine sets belongs to that request's client, never to the
    next client's request (the client's own ``Cookie`` header is forwarded). No headers
    of aiohttp's own (``Accept``, ``Accept-Encoding``, ``User-Agent``): the engine sees
    the client's, so it compresses only for a client that asked (the answer's bytes are
    relayed as they are, never decompressed)."""
    s = svc_settings(app)
    app[SESSION] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=s.engine_connections, keepalive_timeout=30.0),
        auto_decompress=False,
        skip_auto_headers=_NO_AUTO_HEADERS,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=s.engine_connect_timeout_seconds,
                                      sock_read=None),
    )
    try:
        yield
    finally:
        await app[SESSION].close()
        await asyncio.sleep(0)


def svc_settings(app: web.Application) -> Settings:
    s = app[SERVICE].settings
    assert isinstance(s, Settings)  # the router service's
    return s


def add_routes(app: web.Application) -> None:
    """The proxy's routes, and ``GET /health`` (what vLLM and other OpenAI-compatible
    servers answer, and load generators such as GuideLLM probe): the same answer as
    ``/healthz``, open like it."""
    app.router.add_post("/v1/completions", handle_completions, name="completions")
    app.router.add_post("/v1/chat/completions", handle_chat_completions,
                        name="chat_completions")
    app.router.add_get("/v1/models", handle_models, name="models")
    app.router.add_get("/health", handle_healthz, name="health")
    app.cleanup_ctx.append(session_ctx)
