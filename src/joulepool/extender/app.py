"""The aiohttp service: scheduler extender verbs, router API and operations endpoints.

Routes (``<prefix>`` defaults to ``/scheduler``):

    POST <prefix>/filter       ExtenderArgs -> ExtenderFilterResult
    POST <prefix>/prioritize   ExtenderArgs -> HostPriorityList
    POST /v1/route             {pool, inputTokens, outputTokens, tier?, deadlineSeconds?}
    POST /v1/complete          {pool, endpoint, requestId?, ttftSeconds, e2eSeconds,
                                outputTokens, deadlineMet, joules?}
    GET  /v1/pools[/{pool}]    what the router knows (debugging)
    GET  /metrics  /healthz  /readyz

Status codes. Every error body is JSON: ``{"Error": msg}`` on the scheduler
verbs (the extender's own field), ``{"error": msg}`` elsewhere.

    400  body is not JSON (RFC 8259: no NaN/Infinity, finite numbers, nesting <= 64),
         not an object, or has a field of the wrong type/range (a resource quantity
         that is not one, or over 2^63)
         (kube-scheduler never sends such a body; the status tells other clients)
    401  bearer token missing or wrong (--token-file)
    408  body not received within --read-timeout-seconds (slow clients hold no worker)
    415  a POST body that is not ``Content-Type: application/json``
    404  unknown path, or /v1 request for a pool the router does not know
    405  wrong method
    413  body over --max-body-bytes, or more than --max-nodes candidate nodes
    503  /v1/route: the pool has no endpoint that can serve; /readyz: not synced
    200  scheduler verbs otherwise, including protocol errors (no Pod, no node list,
         cache or plan not synced): filter reports them in ``Error`` (kube-scheduler
         treats any non-200 as an extender failure and would lose the message);
         prioritize answers all-zero scores plus an ``X-Joulepool-Error`` header.

Each decision's server time (body already read; parse, decide, encode) is in
the ``Server-Timing: app;dur=<ms>, cpu;dur=<ms>`` header (wall clock, and CPU
time of the event-loop thread) and the ``joulepool_extender_decision_seconds``
histogram (wall clock).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from pydantic import ValidationError

from joulepool import httpserve
from joulepool.extender import files
from joulepool.extender.metrics import Metrics
from joulepool.extender.router import (
    CompleteRequest,
    NoEndpoints,
    Router,
    RouteRequest,
    RouterSettings,
    UnknownPool,
    decision_to_wire,
)
from joulepool.extender.scheduler import (
    PlacementSettings,
    ProtocolError,
    Scheduler,
    neutral_priorities,
)
from joulepool.extender.scrape import scrape_all
from joulepool.extender.settings import Settings
from joulepool.extender.state import ClusterState
from joulepool.extender.wire import ExtenderArgs, ExtenderFilterResult

log = logging.getLogger(__name__)

SCHEDULER_VERBS = ("filter", "prioritize")
ROUTER_PREFIXES = ("/v1/", "/metrics", "/debug")
OPEN_PATHS = ("/healthz", "/readyz")


class Extender:
    """Everything one running service holds; tests reach in through ``app[EXTENDER]``."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.state = ClusterState(default_port=settings.endpoint_port)
        self.router = Router(router_settings(settings), self.state, self.metrics)
        self.scheduler = Scheduler(
            self.state, self.router, placement_settings(settings), self.metrics
        )
        self.stop = threading.Event()
        self.watchers: list[Any] = []
        #: kubernetes ApiClient for the watches (loaded by the CLI, or on start)
        self.api_client: Any = None
        self._token: str | None = None
        self._token_mtime: float | None = None
        self._token_checked = 0.0
        self._file_mtimes: dict[str, float | None] = {}
        self.background_errors = 0

    # -- static sources ---------------------------------------------------------------
    def load_files(self, initial: bool = False) -> None:
        """(Re)load the files whose mtime changed. Bad files keep the last good state."""
        s = self.settings
        for kind, path in (("plan", s.plan_file), ("nodes", s.nodes_file),
                           ("endpoints", s.endpoints_file)):
            if path is None:
                continue
            mt = files.mtime(path)
            if not initial and mt == self._file_mtimes.get(kind):
                continue
            self._file_mtimes[kind] = mt
            try:
                self._load(kind, path)
            except files.FileError as exc:
                if initial:
                    raise
                log.error("%s; keeping the previous contents", exc)
                if kind == "plan":
                    self.metrics.plan_errors.inc()

    def _load(self, kind: str, path: Path) -> None:
        if kind == "plan":
            if not self.state.set_plan_json(files.load_plan_text(path)):
                raise files.FileError(f"{path}: {self.state.plan_error}")
            self.state.mark_synced("plan")
        elif kind == "nodes":
            nodes, pods = files.load_objects(path)
            self.state.replace_nodes(nodes)
            self.state.replace_pods(pods)
            self.state.mark_synced("nodes")
            self.state.mark_synced("pods")
        else:
            self.router.set_static(files.load_endpoints_file(path))

    def mark_unwatched_synced(self) -> None:
        """Sources with neither a file nor a watch are empty and so trivially synced."""
        s = self.settings
        if not s.cluster:
            if s.nodes_file is None:
                self.state.mark_synced("nodes")
                self.state.mark_synced("pods")
            if s.plan_file is None:
                self.state.mark_synced("plan")

    @property
    def ready(self) -> bool:
        return self.state.ready and self.router.static_synced

    # -- auth -------------------------------------------------------------------------------
    def token(self) -> str | None:
        path = self.settings.token_file
        if path is None:
            return None
        now = time.monotonic()
        if self._token is None or now - self._token_checked >= 1.0:
            self._token_checked = now
            mt = files.mtime(path)
            if self._token is None or mt != self._token_mtime:
                try:
                    self._token = path.read_text().strip()
                    self._token_mtime = mt
                except OSError as exc:
                    log.error("cannot read token file: %s", exc)
        return self._token or None

    def guarded(self, path: str) -> bool:
        if self.settings.token_file is None or path in OPEN_PATHS:
            return False
        if self.settings.token_scope == "all":
            return True
        return path.startswith(ROUTER_PREFIXES)

    def authorised(self, request: web.Request) -> bool:
        expected = self.token()
        if expected is None:
            return False  # configured but unreadable or empty: fail closed
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode(), expected.encode())


def router_settings(s: Settings) -> RouterSettings:
    return RouterSettings(
        fallbacks=s.fallbacks, kp=s.pi_kp, ki=s.pi_ki, target_miss_rate=s.target_miss_rate,
        lambda_min=s.lambda_min, lambda_max=s.lambda_max, lambda_initial=s.lambda_initial,
        pi_every=s.pi_every, pi_period_s=s.pi_period_seconds,
        miss_window_s=s.miss_window_seconds, bulk_lambda_factor=s.bulk_lambda_factor,
        hard_deadline=s.hard_deadline, input_token_weight=s.input_token_weight,
        mean_output_tokens=s.mean_output_tokens, eps_half_life_s=s.eps_half_life_seconds,
        eps_min_tokens=s.eps_min_tokens,
        inflight_ttl_s=s.inflight_ttl_seconds, default_eps=s.default_joules_per_token,
        default_tps=s.default_tokens_per_second, metrics_path=s.metrics_path,
        metrics_port=s.metrics_port,
    )


def placement_settings(s: Settings) -> PlacementSettings:
    return PlacementSettings(
        lam=s.placement_lambda, max_utilisation=s.max_utilisation,
        replica_utilisation=s.replica_utilisation, queue_horizon_s=s.queue_horizon_seconds,
        reserve=s.reserve_placements,
    )


EXTENDER = web.AppKey("extender", Extender)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------
def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return httpserve.json_response(payload, status, headers)


def _error(verb: str, status: int, message: str, headers: dict[str, str] | None = None
           ) -> web.Response:
    key = "Error" if verb in SCHEDULER_VERBS else "error"
    return _json({key: message}, status, headers)


#: a refused request (status and message); the middleware answers it in the verb's shape
BadRequest = httpserve.HTTPProblem


def _validation_message(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    if err["type"] == "json_invalid":
        return f"malformed JSON: {err['msg']}"
    return f"{loc}: {err['msg']}{more}" if loc else f"{err['msg']}{more}"


async def _body(request: web.Request) -> bytes:
    """The request's body: application/json only, size and time bounded (httpserve)."""
    s = request.app[EXTENDER].settings
    httpserve.require_json(request)
    return await httpserve.read_body(request, s.max_body_bytes, s.read_timeout_seconds)


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()


def _timed(request: web.Request, verb: str, t0: tuple[float, float], resp: web.Response
           ) -> web.Response:
    dt = time.perf_counter() - t0[0]
    cpu = time.thread_time() - t0[1]
    request.app[EXTENDER].metrics.decision_seconds.labels(verb).observe(dt)
    resp.headers["Server-Timing"] = f"app;dur={dt * 1e3:.3f}, cpu;dur={cpu * 1e3:.3f}"
    return resp


def _extender_args(body: bytes, max_nodes: int) -> tuple[ExtenderArgs, dict[str, Any]]:
    """Validated args, and the raw JSON object when full Nodes must be echoed back."""
    obj = httpserve.parse_json(body)
    try:
        args = ExtenderArgs.model_validate(obj)
    except ValidationError as exc:
        if exc.errors()[0]["type"] == "model_type":
            raise BadRequest(400, "ExtenderArgs must be a JSON object") from None
        raise BadRequest(400, _validation_message(exc)) from None
    n = max(len(args.node_names or []), len(args.nodes.items or []) if args.nodes else 0)
    if n > max_nodes:
        raise BadRequest(413, f"{n} candidate nodes is over the --max-nodes limit {max_nodes}")
    raw: dict[str, Any] = obj if args.nodes is not None else {}
    return args, raw


# --------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------
async def handle_filter(request: web.Request) -> web.Response:
    ext = request.app[EXTENDER]
    body = await _body(request)
    t0 = _clock()
    args, raw = _extender_args(body, ext.settings.max_nodes)
    try:
        result = ext.scheduler.filter(args, raw)
    except ProtocolError as exc:
        result = ExtenderFilterResult(Error=str(exc))
    return _timed(request, "filter", t0, _json(result.to_wire()))


async def handle_prioritize(request: web.Request) -> web.Response:
    ext = request.app[EXTENDER]
    body = await _body(request)
    t0 = _clock()
    args, _ = _extender_args(body, ext.settings.max_nodes)
    try:
        text, _scores = ext.scheduler.prioritize(args)
        resp = _json(text)
    except ProtocolError as exc:
        names = ext.scheduler.candidate_names(args)
        resp = _json(neutral_priorities(names), headers={"X-Joulepool-Error": str(exc)[:512]})
    return _timed(request, "prioritize", t0, resp)


async def handle_route(request: web.Request) -> web.Response:
    ext = request.app[EXTENDER]
    body = await _body(request)
    t0 = _clock()
    try:
        httpserve.parse_json(body)  # RFC 8259 only: no NaN/Infinity, bounded depth
        req = RouteRequest.model_validate_json(body)
    except ValidationError as exc:
        raise BadRequest(400, _validation_message(exc)) from None
    try:
        decision = ext.router.route(req, time.monotonic())
    except UnknownPool as exc:
        raise BadRequest(404, str(exc)) from None
    except NoEndpoints as exc:
        raise BadRequest(503, str(exc)) from None
    return _timed(request, "route", t0, _json(decision_to_wire(decision)))


async def handle_complete(request: web.Request) -> web.Response:
    ext = request.app[EXTENDER]
    body = await _body(request)
    t0 = _clock()
    try:
        httpserve.parse_json(body)
        rep = CompleteRequest.model_validate_json(body)
    except ValidationError as exc:
        raise BadRequest(400, _validation_message(exc)) from None
    try:
        out = ext.router.complete(rep, time.monotonic())
    except UnknownPool as exc:
        raise BadRequest(404, str(exc)) from None
    return _timed(request, "complete", t0, _json(out))


async def handle_pools(request: web.Request) -> web.Response:
    ext = request.app[EXTENDER]
    ext.router.sync()
    now = time.monotonic()
    name = request.match_info.get("pool")
    if name is not None:
        pool = ext.router.pools.get(name)
        if pool is None:
            raise BadRequest(404, f"unknown pool {name!r}")
        return _json(pool.describe(now))
    return _json({
        "pools": {
            k: {"lambda": p.pi.lam, "missRatio": p.window.rate(now), "endpoints": len(p.endpoints),
                "model": p.model, "tier": str(p.tier)}
            for k, p in sorted(ext.router.pools.items())
        }
    })


async def handle_healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def handle_readyz(request: web.Request) -> web.Response:
    ext = request.app[EXTENDER]
    if ext.ready:
        return _json({"status": "ready"})
    missing = ext.state.not_synced() + ([] if ext.router.static_synced else ["endpoints"])
    return _json({"status": "not ready", "waitingFor": missing}, status=503)


async def handle_metrics(request: web.Request) -> web.Response:
    ext = request.app[EXTENDER]
    ext.metrics.nodes.set(len(ext.state.nodes))
    ext.metrics.pods.set(len(ext.state.pods))
    ext.metrics.plan_version.set(ext.state.plan.version if ext.state.plan else -1)
    return web.Response(body=ext.metrics.render(), headers={"Content-Type": Metrics.content_type})


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    ext = request.app[EXTENDER]
    route = request.match_info.route
    verb = route.name if route is not None and route.name else "other"
    if verb == "other":  # 404/405 on a scheduler path still answer in the extender's shape
        head, _, last = request.path.rpartition("/")
        if last in SCHEDULER_VERBS and head == ext.settings.prefix:
            verb = last
    resp: web.StreamResponse
    try:
        if ext.guarded(request.path) and not ext.authorised(request):
            resp = _error(verb, 401, "missing or wrong bearer token",
                          {"WWW-Authenticate": 'Bearer realm="joulepool"'})
        else:
            resp = await handler(request)
    except BadRequest as exc:
        resp = _error(verb, exc.status, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        resp = _error(verb, exc.status, exc.reason, {
            k: v for k, v in exc.headers.items() if k.lower() == "allow"
        })
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        resp = _error(verb, 500, "internal error (logged)")
    ext.metrics.requests.labels(verb, str(resp.status)).inc()
    return resp


# --------------------------------------------------------------------------
# Background work
# --------------------------------------------------------------------------
async def _every(period: float, fn: Callable[[], Awaitable[None]], ext: Extender) -> None:
    while True:
        try:
            await fn()
        except asyncio.CancelledError:
            raise
        except Exception:
            ext.background_errors += 1
            log.exception("background task failed; continuing")
        await asyncio.sleep(period)


async def _background(app: web.Application) -> AsyncIterator[None]:
    ext = app[EXTENDER]
    s = ext.settings
    tasks: list[asyncio.Task[None]] = []
    session: aiohttp.ClientSession | None = None

    async def tick() -> None:
        ext.router.tick(time.monotonic())
        if ext.state.synced["nodes"]:
            ext.state.table().host_scores()  # warm the prioritize encoder after node changes

    tasks.append(asyncio.create_task(_every(1.0, tick, ext)))

    if s.file_poll_seconds > 0 and (s.plan_file or s.nodes_file or s.endpoints_file):
        async def poll() -> None:
            ext.load_files()

        tasks.append(asyncio.create_task(_every(s.file_poll_seconds, poll, ext)))

    if s.scrape_interval_seconds > 0:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=s.scrape_concurrency, force_close=False)
        )

        async def scrape() -> None:
            assert session is not None
            targets = ext.router.scrape_targets()
            if not targets:
                return
            samples, failures = await scrape_all(
                session, targets, s.scrape_timeout_seconds, s.scrape_concurrency
            )
            now = time.monotonic()
            for smp in samples:
                ext.router.apply_scrape(smp.pool, smp.address, smp.waiting, smp.running, now)
            ext.metrics.scrapes.labels("ok").inc(len(samples))
            ext.metrics.scrapes.labels("failed").inc(failures)

        tasks.append(asyncio.create_task(_every(s.scrape_interval_seconds, scrape, ext)))

    if s.cluster:
        from joulepool.extender.watch import cluster_watchers, load_kube_config, loop_deliver

        if ext.api_client is None:
            ext.api_client = load_kube_config(str(s.kubeconfig) if s.kubeconfig else None)
        ext.watchers = cluster_watchers(
            ext.api_client, ext.state, s.plan_namespace(), s.plan_configmap,
            s.watch_timeout_seconds, loop_deliver(asyncio.get_running_loop()), ext.stop,
            ext.metrics, nodes=s.nodes_file is None, plan=s.plan_file is None,
        )
        for w in ext.watchers:
            w.start()
        if s.policy_poll_seconds > 0:
            from kubernetes import client

            from joulepool.extender.policy import EnergyPolicyPoller

            poller = EnergyPolicyPoller(client.CustomObjectsApi(ext.api_client), ext.router)
            tasks.append(asyncio.create_task(_every(s.policy_poll_seconds, poller.poll, ext)))
    try:
        yield
    finally:
        ext.stop.set()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if session is not None:
            await session.close()


def create_app(settings: Settings, *, background: bool = True,
               metrics: Metrics | None = None) -> web.Application:
    """The service. Files given in ``settings`` are loaded now (FileError if unreadable)."""
    ext = Extender(settings, metrics)
    ext.load_files(initial=True)
    ext.mark_unwatched_synced()
    app = web.Application(middlewares=[middleware], client_max_size=settings.max_body_bytes)
    app[EXTENDER] = ext
    p = settings.prefix
    app.router.add_post(f"{p}/filter", handle_filter, name="filter")
    app.router.add_post(f"{p}/prioritize", handle_prioritize, name="prioritize")
    app.router.add_post("/v1/route", handle_route, name="route")
    app.router.add_post("/v1/complete", handle_complete, name="complete")
    app.router.add_get("/v1/pools", handle_pools, name="pools")
    app.router.add_get("/v1/pools/{pool}", handle_pools, name="pool")
    app.router.add_get("/healthz", handle_healthz, name="healthz")
    app.router.add_get("/readyz", handle_readyz, name="readyz")
    app.router.add_get("/metrics", handle_metrics, name="metrics")
    if background:
        app.cleanup_ctx.append(_background)
    return app


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    if settings.tls_client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(str(settings.tls_client_ca))
    return ctx
