"""The parts of a joulepool HTTP service that know the cluster, shared by two services.

The scheduler extender (:mod:`joulepool.extender.app`) and the routing service
(:mod:`joulepool.router.app`) both hold a :class:`ClusterService`: the cluster
cache (watched, or read from files), the pools as core router state
(:class:`kube.pools.Router`), the engines' scraped queue depth, bearer-token
auth, readiness, the error-handling middleware and the background work (1 s
tick, file polling, scraping, watches). Each service adds its own handlers.

Every error body is JSON ``{"error": msg}`` unless the service's ``error_body``
says otherwise (the extender answers its scheduler verbs with ``{"Error": msg}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import logging
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Literal, Protocol

import aiohttp
from aiohttp import web
from pydantic import ValidationError

from joulepool import httpserve
from joulepool.kube import files
from joulepool.kube.metrics import ServiceMetrics
from joulepool.kube.pools import PoolObserver, Router, RouterSettings
from joulepool.kube.scrape import fetch_energy, scrape_all, scrape_pages
from joulepool.kube.state import ClusterState

log = logging.getLogger(__name__)

OPEN_PATHS = ("/healthz", "/health", "/readyz")
#: paths the bearer token guards with ``token_scope: router``
ROUTER_PREFIXES = ("/v1/", "/metrics", "/debug")


class ServiceSettings(Protocol):
    """The settings a :class:`ClusterService` reads (both services' settings have them)."""

    host: str
    port: int
    tls_cert: Path | None
    tls_key: Path | None
    tls_client_ca: Path | None
    token_file: Path | None
    max_body_bytes: int
    read_timeout_seconds: float
    header_timeout_seconds: float
    drain_seconds: float
    cluster: bool
    kubeconfig: Path | None
    plan_configmap: str
    plan_file: Path | None
    nodes_file: Path | None
    endpoints_file: Path | None
    file_poll_seconds: float
    policy_poll_seconds: float
    watch_timeout_seconds: int
    scrape_interval_seconds: float
    scrape_timeout_seconds: float
    scrape_concurrency: int
    endpoint_port: int

    @property
    def event_loop(self) -> str: ...  # 'auto', 'uvloop' or 'asyncio'

    def plan_namespace(self) -> str: ...


#: a refused request (status and message); the middleware answers it as JSON
BadRequest = httpserve.HTTPProblem


class ClusterService:
    """Everything one running service holds besides its own handlers."""

    def __init__(self, settings: ServiceSettings, metrics: ServiceMetrics,
                 router_settings: RouterSettings, observer: PoolObserver | None = None,
                 token_scope: Literal["all", "router"] = "all") -> None:
        self.settings = settings
        self.metrics = metrics
        self.token_scope = token_scope
        self.state = ClusterState(default_port=settings.endpoint_port)
        self.router = Router(router_settings, self.state, observer)
        self.stop = threading.Event()
        self.watchers: list[Any] = []
        #: kubernetes ApiClient for the watches (loaded by the CLI, or on start)
        self.api_client: Any = None
        self._token: str | None = None
        self._token_mtime: float | None = None
        self._token_checked = 0.0
        self._file_mtimes: dict[str, float | None] = {}
        self.background_errors = 0
        #: set on SIGTERM: /readyz fails while requests still get served (drain_seconds)
        self.draining = False

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
        return self.state.ready and self.router.static_synced and not self.draining

    def not_ready_reasons(self) -> list[str]:
        return (self.state.not_synced() + ([] if self.router.static_synced else ["endpoints"])
                + (["shutdown"] if self.draining else []))

    def on_tick(self) -> None:
        """Work of the 1 s tick besides the router's housekeeping (services override)."""

    def on_watches_started(self) -> None:
        """Called once the watches run and :attr:`api_client` is set (services override)."""

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
        if self.token_scope == "all":
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


SERVICE = web.AppKey("service", ClusterService)


# --------------------------------------------------------------------------
# Helpers for handlers
# --------------------------------------------------------------------------
def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> web.Response:
    return httpserve.json_response(payload, status, headers)


def validation_message(exc: ValidationError) -> str:
    """A pydantic error as one line: where, what (and how many more)."""
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    if err["type"] == "json_invalid":
        return f"malformed JSON: {err['msg']}"
    return f"{loc}: {err['msg']}{more}" if loc else f"{err['msg']}{more}"


async def read_body(request: web.Request) -> bytes:
    """The request's body: application/json only, size and time bounded (httpserve)."""
    s = request.app[SERVICE].settings
    httpserve.require_json(request)
    return await httpserve.read_body(request, s.max_body_bytes, s.read_timeout_seconds)


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()


def timed(request: web.Request, verb: str, t0: tuple[float, float], resp: web.Response
          ) -> web.Response:
    """Record the decision's server time: histogram and ``Server-Timing`` header."""
    dt = time.perf_counter() - t0[0]
    cpu = time.thread_time() - t0[1]
    m = request.app[SERVICE].metrics
    m.child(m.decision_seconds, verb).observe(dt)
    resp.headers["Server-Timing"] = f"app;dur={dt * 1e3:.3f}, cpu;dur={cpu * 1e3:.3f}"
    return resp


async def handle_healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def handle_readyz(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    if svc.ready:
        return json_response({"status": "ready"})
    return json_response({"status": "not ready", "waitingFor": svc.not_ready_reasons()},
                         status=503)


async def handle_metrics(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    svc.metrics.nodes.set(len(svc.state.nodes))
    svc.metrics.pods.set(len(svc.state.pods))
    svc.metrics.plan_version.set(svc.state.plan.version if svc.state.plan else -1)
    return web.Response(body=svc.metrics.render(),
                        headers={"Content-Type": ServiceMetrics.content_type})


def add_operations_routes(app: web.Application) -> None:
    """``GET /healthz``, ``/readyz`` and ``/metrics``."""
    app.router.add_get("/healthz", handle_healthz, name="healthz")
    app.router.add_get("/readyz", handle_readyz, name="readyz")
    app.router.add_get("/metrics", handle_metrics, name="metrics")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: (verb, status, message, headers) -> the error answer in the service's shape
ErrorBody = Callable[[str, int, str, dict[str, str] | None], web.Response]
VerbOf = Callable[[web.Request], str]


def default_error(verb: str, status: int, message: str, headers: dict[str, str] | None = None
                  ) -> web.Response:
    return json_response({"error": message}, status, headers)


def route_verb(request: web.Request) -> str:
    """The matched route's name, "other" for unknown paths."""
    route = request.match_info.route
    return route.name if route is not None and route.name else "other"


def make_middleware(error: ErrorBody = default_error, verb_of: VerbOf = route_verb
                    ) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """Auth, refused requests and failures answered as JSON, requests counted by verb."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        svc = request.app[SERVICE]
        verb = verb_of(request)
        resp: web.StreamResponse
        try:
            if svc.guarded(request.path) and not svc.authorised(request):
                resp = error(verb, 401, "missing or wrong bearer token",
                             {"WWW-Authenticate": 'Bearer realm="joulepool"'})
            else:
                resp = await handler(request)
        except BadRequest as exc:
            resp = error(verb, exc.status, exc.message, None)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            resp = error(verb, exc.status, exc.reason, {
                k: v for k, v in exc.headers.items() if k.lower() == "allow"
            })
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("internal error on %s %s", request.method, request.path)
            resp = error(verb, 500, "internal error (logged)", None)
        svc.metrics.child(svc.metrics.requests, verb, str(resp.status)).inc()
        return resp

    return middleware


# --------------------------------------------------------------------------
# Background work
# --------------------------------------------------------------------------
async def _every(period: float, fn: Callable[[], Awaitable[None]], svc: ClusterService) -> None:
    while True:
        try:
            await fn()
        except asyncio.CancelledError:
            raise
        except Exception:
            svc.background_errors += 1
            log.exception("background task failed; continuing")
        await asyncio.sleep(period)


async def _scrape(svc: ClusterService, session: aiohttp.ClientSession) -> None:
    """One round: every engine's queue and token counter, and every energy page (node
    agents', DCGM exporters'), so each endpoint's measured J/token pairs readings of
    the same moment."""
    s = svc.settings
    targets = svc.router.scrape_targets()
    if not targets:
        return
    energy_urls = svc.router.energy_urls()
    (samples, failures), (energy, energy_failures) = await asyncio.gather(
        scrape_all(session, targets, s.scrape_timeout_seconds, s.scrape_concurrency),
        fetch_energy(session, energy_urls, s.scrape_timeout_seconds))
    now = time.monotonic()
    for smp in samples:
        svc.router.apply_scrape(smp.pool, smp.address, smp.waiting, smp.running, now,
                                smp.kv_cache, smp.generated_tokens)
    if energy:
        svc.router.apply_energy(energy)
    pages = len(scrape_pages(targets))  # a shared instance's page is read once
    svc.metrics.scrapes.labels("ok").inc(pages - failures + len(energy_urls) - energy_failures)
    svc.metrics.scrapes.labels("failed").inc(failures + energy_failures)


def _start_watches(svc: ClusterService) -> None:
    from joulepool.kube.watch import cluster_watchers, load_kube_config, loop_deliver

    s = svc.settings
    if svc.api_client is None:
        svc.api_client = load_kube_config(str(s.kubeconfig) if s.kubeconfig else None)
    svc.watchers = cluster_watchers(
        svc.api_client, svc.state, s.plan_namespace(), s.plan_configmap,
        s.watch_timeout_seconds, loop_deliver(asyncio.get_running_loop()), svc.stop,
        svc.metrics, nodes=s.nodes_file is None, plan=s.plan_file is None,
    )
    for w in svc.watchers:
        w.start()
    svc.on_watches_started()


def _policy_poller(svc: ClusterService) -> Any:
    from kubernetes import client

    from joulepool.kube.policy import EnergyPolicyPoller

    return EnergyPolicyPoller(client.CustomObjectsApi(svc.api_client), svc.router)


async def background(app: web.Application) -> AsyncIterator[None]:
    """aiohttp cleanup context: 1 s tick, file polling, engine scrapes and watches."""
    svc = app[SERVICE]
    s = svc.settings
    tasks: list[asyncio.Task[None]] = []
    session: aiohttp.ClientSession | None = None

    async def tick() -> None:
        svc.router.tick(time.monotonic())
        svc.on_tick()

    tasks.append(asyncio.create_task(_every(1.0, tick, svc)))
    if s.file_poll_seconds > 0 and (s.plan_file or s.nodes_file or s.endpoints_file):
        async def poll() -> None:
            svc.load_files()

        tasks.append(asyncio.create_task(_every(s.file_poll_seconds, poll, svc)))
    if s.scrape_interval_seconds > 0:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=s.scrape_concurrency, force_close=False)
        )
        live = session

        async def scrape() -> None:
            await _scrape(svc, live)

        tasks.append(asyncio.create_task(_every(s.scrape_interval_seconds, scrape, svc)))
    if s.cluster:
        _start_watches(svc)
        if s.policy_poll_seconds > 0:
            tasks.append(asyncio.create_task(_every(s.policy_poll_seconds,
                                                    _policy_poller(svc).poll, svc)))
    try:
        yield
    finally:
        svc.stop.set()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if session is not None:
            await session.close()


def new_app(svc: ClusterService, middleware: Any) -> web.Application:
    """An app holding ``svc``, with its files loaded (FileError if unreadable)."""
    svc.load_files(initial=True)
    svc.mark_unwatched_synced()
    app = web.Application(middlewares=[middleware],
                          client_max_size=svc.settings.max_body_bytes)
    app[SERVICE] = svc
    return app


# --------------------------------------------------------------------------
# Serving (the CLIs)
# --------------------------------------------------------------------------
def ssl_context(settings: ServiceSettings) -> ssl.SSLContext | None:
    """TLS for the listener (mTLS with ``tls_client_ca``); None without a certificate."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    if settings.tls_client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(str(settings.tls_client_ca))
    return ctx


class ServeError(Exception):
    """The service cannot start (the CLI's exit code 2)."""


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop factory of ``--event-loop`` (None: asyncio's default loop).
    ``uvloop`` and ``auto`` use uvloop when it is installed (``auto`` falls back to
    asyncio's loop without it; ``uvloop`` raises ServeError)."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ServeError("--event-loop uvloop: uvloop is not installed") from None
        return None
    return uvloop.new_event_loop


def serve(app: web.Application, name: str) -> None:
    """Run ``app`` until SIGINT or SIGTERM (ServeError if it cannot start)."""
    svc = app[SERVICE]
    settings = svc.settings
    if settings.cluster:
        from joulepool.kube.watch import load_kube_config

        try:
            svc.api_client = load_kube_config(
                str(settings.kubeconfig) if settings.kubeconfig else None)
        except Exception as exc:  # ConfigException, missing file, bad YAML
            raise ServeError(
                f"cannot load a Kubernetes configuration ({exc}); "
                "use --kubeconfig, run in a cluster, or --no-cluster with files") from None
    try:
        ctx = ssl_context(settings)
    except (OSError, ValueError) as exc:
        raise ServeError(f"TLS: {exc}") from None
    try:
        with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
            runner.run(_serve(app, name, ctx))
    except OSError as exc:
        raise ServeError(f"cannot listen on {settings.host}:{settings.port}: {exc}") from None


async def _serve(app: web.Application, name: str, ctx: ssl.SSLContext | None) -> None:
    s = app[SERVICE].settings
    # The ~90k objects of the imports and start-up live as long as the process: a full
    # collection walking them costs ~60 ms of CPU (a stall of the loop, on every
    # request in flight). Frozen, they are left out of every later collection.
    gc.collect()
    gc.freeze()

    def started(runner: web.AppRunner) -> None:
        listening = httpserve.urls(runner, tls=ctx is not None)
        print(f"joulepool {name} listening on {' '.join(listening)}", flush=True)
        logging.getLogger(f"joulepool.{name}").info("listening on %s", listening)

    async def drain() -> None:
        svc = app[SERVICE]
        svc.draining = True
        if s.drain_seconds > 0:
            logging.getLogger(f"joulepool.{name}").info(
                "stopping: not ready, serving %.1f s more before closing", s.drain_seconds)
            await asyncio.sleep(s.drain_seconds)

    await httpserve.serve_until_signalled(app, s.host, s.port, ssl_context=ctx,
                                          header_timeout_s=s.header_timeout_seconds,
                                          on_started=started, on_signal=drain)


def run_service(
    name: str,
    load_settings: Callable[[], Any],
    settings_error: type[Exception],
    create_app: Callable[[Any], web.Application],
) -> None:
    """Load a service's settings, check their source files and serve until signalled.

    The one start-up path of ``joulepool extender`` and ``joulepool router``: bad
    settings, unreadable source files and a service that cannot start all raise
    :class:`ServeError` with the message the CLI prints (exit code 2).
    """
    try:
        settings = load_settings()
        settings.check_sources()
        serve(create_app(settings), name)
    except (settings_error, files.FileError) as exc:
        raise ServeError(str(exc)) from None
