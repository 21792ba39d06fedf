"""The aiohttp service of the request router: routing API and operations endpoints.

Routes:

    POST /v1/route             {pool, inputTokens?, outputTokens, tier?, deadlineSeconds?}
                               -> {pool, endpoint, fallbacks, requestId, tier,
                                   deadlineSeconds, cost: {energyJoules, slackSeconds,
                                   lambda, etaSeconds, total}}
    POST /v1/complete          {pool, endpoint, requestId?, ttftSeconds?, e2eSeconds?,
                                outputTokens?, deadlineMet, joules?}
                               -> {pool, endpointKnown, lambda, missRatio, epsScale}
    GET  /v1/pools[/{pool}]    what the router knows (debugging)
    POST /v1/completions, /v1/chat/completions, GET /v1/models
                               the OpenAI-compatible routing proxy
                               (:mod:`joulepool.router.proxy`; open, OpenAI-shaped errors)
    GET  /metrics  /healthz  /readyz
    GET  /health               as /healthz (what OpenAI-compatible servers answer)

With ``--epp-port``, the same process also serves the Gateway API Inference
Extension's endpoint picker (Envoy ext_proc over gRPC, :mod:`joulepool.router.epp`)
on the same event loop and the same per-pool routers, so what a gateway routes and
what ``/v1/route`` routes share one ledger, one lambda and one eps estimate.

Each pool is a :class:`joulepool.core.router.PoolRouter`, the object the
simulator's ``joulesched-router`` policy drives; the pools follow the cluster
(plan + ready pods) or a static endpoints file (:mod:`joulepool.kube.pools`).
The cluster cache, engine scrapes, auth, readiness and background work are
:mod:`joulepool.kube.service`'s, shared with the scheduler extender.

Status codes (every error body is JSON ``{"error": msg}``):

    400  body is not JSON (RFC 8259), not an object, or has a field of the wrong
         type or range
    401  bearer token missing or wrong (--token-file; every path but the probes and
         the proxy's)
    404  unknown path, or a pool the router does not know
    405  wrong method
    408  body not received within --read-timeout-seconds
    413  body over --max-body-bytes
    415  a POST body that is not ``Content-Type: application/json``
    503  /v1/route: the pool has no endpoint that can serve; /readyz: not synced

Each decision's server time is in the ``Server-Timing`` header and the
``joulepool_router_decision_seconds`` histogram.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from aiohttp import web
from pydantic import ValidationError

from joulepool import httpserve
from joulepool.core.router import NoEndpoints, UnknownPool
from joulepool.kube import service
from joulepool.kube.service import (
    BadRequest,
    clock,
    json_response,
    read_body,
    timed,
    validation_message,
)
from joulepool.router import models, proxy, replicas
from joulepool.router.admission import WaitingRoom
from joulepool.router.metrics import Metrics, MetricsObserver
from joulepool.router.settings import Settings


class RouterService(service.ClusterService):
    """Everything one running router holds; tests reach in through ``app[ROUTER]``."""

    metrics: Metrics

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        m = metrics or Metrics()
        super().__init__(settings, m, settings.router_settings(), MetricsObserver(m))
        self.settings: Settings = settings
        self.room = WaitingRoom(settings.proxy_max_waiting, settings.proxy_max_wait_seconds)

    def on_tick(self) -> None:
        """Let held requests go where pools have room again (e.g. after a scrape)."""
        self.room.release_all(self.router.pools)

    def guarded(self, path: str) -> bool:
        """The bearer token guards every path but the probes and the OpenAI proxy's."""
        return path not in proxy.PROXY_PATHS and super().guarded(path)


def error_body(verb: str, status: int, message: str, headers: dict[str, str] | None = None
               ) -> web.Response:
    """OpenAI-shaped errors on the proxy's routes, ``{"error": msg}`` elsewhere."""
    if verb in proxy.PROXY_VERBS:
        return proxy.openai_error(status, message, headers)
    return service.default_error(verb, status, message, headers)


ROUTER = web.AppKey("router", RouterService)
#: the endpoint picker's bound gRPC port, once listening
EPP_PORT = web.AppKey("epp_port", int)


async def handle_route(request: web.Request) -> web.Response:
    svc = request.app[ROUTER]
    body = await read_body(request)
    t0 = clock()
    try:
        httpserve.parse_json(body)  # RFC 8259 only: no NaN/Infinity, bounded depth
        req = models.RouteRequest.model_validate_json(body)
    except ValidationError as exc:
        raise BadRequest(400, validation_message(exc)) from None
    try:
        decision = models.route(svc.router, req, time.monotonic())
    except UnknownPool as exc:
        raise BadRequest(404, str(exc)) from None
    except NoEndpoints as exc:
        raise BadRequest(503, str(exc)) from None
    return timed(request, "route", t0, json_response(models.decision_to_wire(decision)))


async def handle_complete(request: web.Request) -> web.Response:
    svc = request.app[ROUTER]
    body = await read_body(request)
    t0 = clock()
    try:
        httpserve.parse_json(body)
        rep = models.CompleteRequest.model_validate_json(body)
    except ValidationError as exc:
        raise BadRequest(400, validation_message(exc)) from None
    try:
        out = models.complete(svc.router, rep, time.monotonic())
    except UnknownPool as exc:
        raise BadRequest(404, str(exc)) from None
    return timed(request, "complete", t0, json_response(out))


async def handle_pools(request: web.Request) -> web.Response:
    svc = request.app[ROUTER]
    svc.router.sync()
    now = time.monotonic()
    name = request.match_info.get("pool")
    if name is not None:
        pool = svc.router.pools.get(name)
        if pool is None:
            raise BadRequest(404, f"unknown pool {name!r}")
        return json_response(pool.describe(now))
    return json_response({
        "pools": {
            k: {"lambda": p.pi.lam, "missRatio": p.window.rate(now), "endpoints": len(p.endpoints),
                "model": p.model, "tier": str(p.tier), "routing": p.profile.name}
            for k, p in sorted(svc.router.pools.items())
        }
    })


def create_app(settings: Settings, *, background: bool = True,
               metrics: Metrics | None = None) -> web.Application:
    """The service. Files given in ``settings`` are loaded now (FileError if unreadable)."""
    svc = RouterService(settings, metrics)
    app = service.new_app(svc, service.make_middleware(error_body))
    app[ROUTER] = svc
    app[proxy.ROOM] = svc.room
    proxy.add_routes(app)
    app.router.add_post("/v1/route", handle_route, name="route")
    app.router.add_post("/v1/complete", handle_complete, name="complete")
    app.router.add_get("/v1/pools", handle_pools, name="pools")
    app.router.add_get("/v1/pools/{pool}", handle_pools, name="pool")
    service.add_operations_routes(app)
    if background:
        app.cleanup_ctx.append(service.background)
    if background:
        app.cleanup_ctx.append(replicas.replica_sharing)
    if settings.epp_port >= 0:
        app.cleanup_ctx.append(endpoint_picker)
    return app


async def endpoint_picker(app: web.Application) -> AsyncIterator[None]:
    """aiohttp cleanup context: the GIE endpoint picker's gRPC listener (--epp-port) on
    this service's event loop and router; its bound port in ``app[EPP_PORT]``."""
    from joulepool.router import epp, epp_native

    svc = app[ROUTER]
    m = svc.metrics
    front_end = epp_native.front_end(svc.settings.picker_front_end)
    start = epp_native.start_server if front_end == "native" else epp.start_server
    server, port, status = await start(
        svc.router, lambda: svc.ready, svc.settings.host, svc.settings.epp_port,
        on_answer=lambda code: m.child(m.epp_answers, str(code)).inc())
    m.child(m.epp_front_end, front_end).set(1)
    latency = epp.LatencyCollector(server.latency)
    m.registry.register(latency)
    app[EPP_PORT] = port
    health = asyncio.create_task(epp.keep_health(status))
    try:
        yield
    finally:
        m.registry.unregister(latency)
        health.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await health
        await server.stop(grace=1.0)
