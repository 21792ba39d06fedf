"""The aiohttp service of the kube-scheduler extender: its verbs and operations endpoints.

Routes (``<prefix>`` defaults to ``/scheduler``):

    POST <prefix>/filter       ExtenderArgs -> ExtenderFilterResult
    POST <prefix>/prioritize   ExtenderArgs -> HostPriorityList
    GET  /metrics  /healthz  /readyz

The cluster cache, the engines' queue depth (scraped, for the placement cost's
load term), auth, readiness and background work are :mod:`joulepool.kube.service`'s,
shared with the routing service (:mod:`joulepool.router`).

Status codes. Every error body is JSON: ``{"Error": msg}`` on the scheduler
verbs (the extender's own field), ``{"error": msg}`` elsewhere.

    400  body is not JSON (RFC 8259: no NaN/Infinity, finite numbers, nesting <= 64),
         not an object, or has a field of the wrong type/range (a resource quantity
         that is not one, or over 2^63)
         (kube-scheduler never sends such a body; the status tells other clients)
    401  bearer token missing or wrong (--token-file)
    408  body not received within --read-timeout-seconds (slow clients hold no worker)
    415  a POST body that is not ``Content-Type: application/json``
    404  unknown path
    405  wrong method
    413  body over --max-body-bytes, or more than --max-nodes candidate nodes
    503  /readyz: not synced
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

from typing import Any

from aiohttp import web
from pydantic import ValidationError

from joulepool import httpserve
from joulepool.extender.freshness import PodFreshness
from joulepool.extender.metrics import Metrics
from joulepool.extender.scheduler import (
    PlacementSettings,
    ProtocolError,
    Scheduler,
    neutral_priorities,
)
from joulepool.extender.settings import Settings
from joulepool.extender.wire import ExtenderArgs, ExtenderFilterResult
from joulepool.kube import service
from joulepool.kube.service import BadRequest, clock, read_body, timed, validation_message
from joulepool.kube.watch import node_pods_lister

SCHEDULER_VERBS = ("filter", "prioritize")


class Extender(service.ClusterService):
    """Everything one running extender holds; tests reach in through ``app[EXTENDER]``."""

    metrics: Metrics

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        super().__init__(settings, metrics or Metrics(), settings.router_settings(),
                         token_scope=settings.token_scope)
        self.settings: Settings = settings
        self.scheduler = Scheduler(
            self.state, self.router, placement_settings(settings), self.metrics
        )
        #: re-reads the pods of nodes a filter finds full (cluster mode, once the
        #: watches start; :mod:`joulepool.extender.freshness`)
        self.freshness: PodFreshness | None = None

    def on_watches_started(self) -> None:
        """Cluster mode, once the watches run: filter may re-read full nodes' pods."""
        s = self.settings
        t = s.fresh_read_timeout_seconds
        if t > 0 and self.api_client is not None:
            self.freshness = PodFreshness(
                self.state, node_pods_lister(self.api_client, t), timeout_s=t,
                min_interval_s=s.fresh_read_min_interval_seconds,
                max_nodes=s.fresh_read_max_nodes, reads_per_second=s.fresh_reads_per_second,
                metrics=self.metrics)

    def on_tick(self) -> None:
        if self.state.synced["nodes"]:
            self.state.table().host_scores()  # warm the prioritize encoder after node changes


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


def _verb(request: web.Request) -> str:
    """The route's name; 404/405 on a scheduler path still answer in the extender's shape."""
    verb = service.route_verb(request)
    if verb == "other":
        head, _, last = request.path.rpartition("/")
        if last in SCHEDULER_VERBS and head == request.app[EXTENDER].settings.prefix:
            verb = last
    return verb


def _extender_args(body: bytes, max_nodes: int) -> tuple[ExtenderArgs, dict[str, Any]]:
    """Validated args, and the raw JSON object when full Nodes must be echoed back."""
    obj = httpserve.parse_json(body)
    try:
        args = ExtenderArgs.model_validate(obj)
    except ValidationError as exc:
        if exc.errors()[0]["type"] == "model_type":
            raise BadRequest(400, "ExtenderArgs must be a JSON object") from None
        raise BadRequest(400, validation_message(exc)) from None
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
    body = await read_body(request)
    t0 = clock()
    args, raw = _extender_args(body, ext.settings.max_nodes)
    try:
        result = ext.scheduler.filter(args, raw)
        full = ext.scheduler.refused_for_gpus(args, result)
        if (full and ext.freshness is not None and args.pod is not None
                and await ext.freshness.refresh(args.pod.key, full)):
            result = ext.scheduler.filter(args, raw)  # the watch was behind: decide again
    except ProtocolError as exc:
        result = ExtenderFilterResult(Error=str(exc))
    return timed(request, "filter", t0, _json(result.to_wire()))


async def handle_prioritize(request: web.Request) -> web.Response:
    ext = request.app[EXTENDER]
    body = await read_body(request)
    t0 = clock()
    args, _ = _extender_args(body, ext.settings.max_nodes)
    try:
        text, _scores = ext.scheduler.prioritize(args)
        resp = _json(text)
    except ProtocolError as exc:
        names = ext.scheduler.candidate_names(args)
        resp = _json(neutral_priorities(names), headers={"X-Joulepool-Error": str(exc)[:512]})
    return timed(request, "prioritize", t0, resp)


def create_app(settings: Settings, *, background: bool = True,
               metrics: Metrics | None = None) -> web.Application:
    """The service. Files given in ``settings`` are loaded now (FileError if unreadable)."""
    ext = Extender(settings, metrics)
    app = service.new_app(ext, service.make_middleware(_error, _verb))
    app[EXTENDER] = ext
    p = settings.prefix
    app.router.add_post(f"{p}/filter", handle_filter, name="filter")
    app.router.add_post(f"{p}/prioritize", handle_prioritize, name="prioritize")
    service.add_operations_routes(app)
    if background:
        app.cleanup_ctx.append(service.background)
    return app
