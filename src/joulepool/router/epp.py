"""GIE endpoint picker: Envoy ``ext_proc`` v3 over gRPC, picking with the core router.

The Gateway API Inference Extension's endpoint picker protocol (GIE proposal
004): a conformant gateway streams each request's headers and body to the picker;
the picker answers the chosen ``ip:port`` plus ordered fallbacks
(``a:p,b:p,...``) in the ``x-gateway-destination-endpoint`` request header AND
in the ``envoy.lb`` dynamic metadata (the same value in both). Per request:

* pool: the ``x-joulepool-pool`` header, else the pool holding the gateway's
  subset hint's endpoints, else the pool serving the body's ``model``, else the
  only pool; none -> ImmediateResponse 404;
* subset hint: filter metadata ``envoy.lb.subset_hint`` /
  ``x-gateway-destination-endpoint-subset`` (a list of ``ip:port``): only those may
  be picked; an empty list or one with no endpoint of the pool -> 503;
* no ready endpoint -> 503; a ``bulk`` request while every eligible endpoint
  already queues requests for admission -> 429 (shed before interactive);
* fail-open: a body that is not JSON is still routed (with the pool's mean
  request); the gateway's own fail-open on an unreachable picker is the
  InferencePool's ``endpointPickerRef.failureMode``;
* learning: the served endpoint the gateway reports in the metadata context
  (``envoy.lb`` / ``x-gateway-destination-endpoint-served``) moves the ledger
  entry; the response (status, SSE events, ``usage``) gives the tokens and the
  end-to-end time, reported to the pool once at the end of the response, so the PI
  lambda and eps learn with no ``/v1/complete`` callback. A stream that ends
  without a response, or an error status, is forgotten, not counted.

The picker closes the stream (status OK) as soon as the exchange is over: after its
reply to the last message of the response (a body chunk with ``end_of_stream``, the
trailers, or headers that end the response) and after an immediate response. Envoy's
protocol reads a clean close as "proceed without consulting the server"; nothing is
left to consult, and the stream needs one completion event fewer than waiting for
the gateway's half-close.

Body modes: ``BUFFERED`` and ``STREAMED`` (one reply per message) and
``FULL_DUPLEX_STREAMED`` (announced by ``protocol_config``: the headers' reply
waits for the whole request body, which is then sent back as a streamed body
mutation; response chunks are echoed back). gRPC health (``grpc.health.v1``):
``liveness`` always SERVING; ``readiness``, the ext_proc service name and ``""``
SERVING once the router has synced with the cluster.

Two gRPC front ends run this protocol with the same :class:`Exchange`: this module's
grpcio server (:func:`start_server`), and the compiled one
(:mod:`joulepool.router.epp_native`, ``native/eppnative.cc``), which holds the streams
in C++ and calls :meth:`Exchange.answer` once per request and :meth:`Exchange.response`
once per response.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from joulepool.api import contract
from joulepool.core.classes import Tier
from joulepool.core.router import NoEndpoints, PoolRouter, RouteDecision, UnknownPool
from joulepool.httpserve import HTTPProblem
from joulepool.kube.pools import Router
from joulepool.router import requests
from joulepool.router.proxy import error_body
from joulepool.router.requests import RequestSpec, ResponseMeter

log = logging.getLogger("joulepool.router.epp")

#: the ext_proc service's name, also a health service name (GIE proposal 004)
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
LIVENESS = "liveness"
READINESS = "readiness"
_FULL_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED


# --------------------------------------------------------------------------
# Reading the gateway's messages
# --------------------------------------------------------------------------
def header_map(headers: base_pb2.HeaderMap) -> dict[str, str]:
    """Lower-cased header names to values (``raw_value`` when the gateway sends bytes)."""
    out: dict[str, str] = {}
    for h in headers.headers:
        value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        out[h.key.lower()] = value
    return out


def _metadata_field(md: base_pb2.Metadata, namespace: str, key: str
                    ) -> struct_pb2.Value | None:
    if namespace not in md.filter_metadata:
        return None
    fields = md.filter_metadata[namespace].fields
    return fields.get(key)


def subset_hint(md: base_pb2.Metadata) -> frozenset[str] | None:
    """The gateway's subset (``ip:port`` strings), or None when it sent none."""
    value = _metadata_field(md, contract.EPP_SUBSET_NAMESPACE, contract.EPP_SUBSET_KEY)
    if value is None:
        return None
    if value.HasField("list_value"):
        return frozenset(v.string_value for v in value.list_value.values if v.string_value)
    if value.HasField("string_value"):  # tolerate a comma-separated string
        return frozenset(a.strip() for a in value.string_value.split(",") if a.strip())
    return frozenset()


def served_endpoint(md: base_pb2.Metadata) -> str | None:
    """The endpoint the gateway reports it sent the request to, if it says."""
    value = _metadata_field(md, contract.EPP_LB_NAMESPACE, contract.EPP_SERVED_KEY)
    if value is None or not value.string_value:
        return None
    return value.string_value.split(",")[0].strip()


def read_spec(body: bytes, headers: dict[str, str]) -> RequestSpec:
    """The request as :func:`requests.read_request` reads it (chat by the ``:path``);
    a body it cannot read is routed on the headers alone (fail-open), keeping a string
    ``model`` if there is one. HTTPProblem 400 for a bad header."""
    chat = headers.get(":path", "").split("?")[0].endswith("/chat/completions")
    try:
        doc = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        doc = None
    try:
        return requests.read_request(doc, headers, chat)
    except HTTPProblem:
        spec = requests.headers_only_request(headers)  # raises on a bad header
    model = doc.get("model") if isinstance(doc, dict) else None
    return dataclasses.replace(spec, model=model) if isinstance(model, str) else spec


def choose_pool(router: Router, spec: RequestSpec, subset: frozenset[str] | None
                ) -> PoolRouter:
    """The pool the request is for: the header's, else the one holding the most of the
    subset's endpoints (a shared instance's pod is in its guest pools too: the pool
    whose InferencePool the subset came from holds all of them; the first by key on a
    tie), else the one serving the model (:func:`requests.choose_pool`), else the only
    pool (fail-open). HTTPProblem 404 when none can be told."""
    if spec.pool_header:
        try:
            return router.pool(spec.pool_header)
        except UnknownPool as exc:
            raise HTTPProblem(404, str(exc)) from None
    router.sync()
    pools = [router.pools[k] for k in sorted(router.pools)]
    if subset:
        held = [sum(a in pool.index for a in subset) for pool in pools]
        most = max(held, default=0)
        if most > 0:
            return pools[held.index(most)]
    if spec.model is not None:
        try:
            return requests.choose_pool(router, spec)
        except UnknownPool as exc:
            if len(pools) != 1:
                raise HTTPProblem(404, str(exc)) from None
    if len(pools) == 1:
        return pools[0]
    raise HTTPProblem(404, f"cannot tell the pool: send {contract.POOL_HEADER} or a body "
                           "with the model of one pool")


# --------------------------------------------------------------------------
# Building the answers
# --------------------------------------------------------------------------
def destination_answer(value: str, phase: str) -> pb.ProcessingResponse:
    """The reply to the ``phase`` message (``request_headers`` or ``request_body``) that
    names the destination ``value`` in the header and in the ``envoy.lb`` metadata
    (``{"envoy.lb": {"x-gateway-destination-endpoint": value}}``). Filled field by
    field: about a third of the CPU of building the nested messages from keywords."""
    resp = pb.ProcessingResponse()
    common = getattr(resp, phase).response
    option = common.header_mutation.set_headers.add()
    option.header.key = contract.EPP_DESTINATION_HEADER
    option.header.raw_value = value.encode()
    option.append_action = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    lb = resp.dynamic_metadata.fields[contract.EPP_LB_NAMESPACE].struct_value
    lb.fields[contract.EPP_DESTINATION_HEADER].string_value = value
    return resp


# The replies that change nothing, built once (gRPC serialises a message per send and
# never changes it, so one instance serves every stream).
_CONTINUE_REQUEST_HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
_CONTINUE_REQUEST_BODY = pb.ProcessingResponse(request_body=pb.BodyResponse())
_CONTINUE_RESPONSE_HEADERS = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
_CONTINUE_RESPONSE_BODY = pb.ProcessingResponse(response_body=pb.BodyResponse())
_CONTINUE_REQUEST_TRAILERS = pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
_CONTINUE_RESPONSE_TRAILERS = pb.ProcessingResponse(response_trailers=pb.TrailersResponse())


def refusal_body(status: int, message: str) -> bytes:
    """The OpenAI-style JSON body of an immediate answer."""
    return json.dumps(error_body(status, message)).encode()


def immediate(status: int, message: str) -> pb.ProcessingResponse:
    """An OpenAI-style error answered by the picker itself."""
    return pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=status),
        headers=pb.HeaderMutation(set_headers=[base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key="content-type", raw_value=b"application/json"),
        )]),
        body=refusal_body(status, message),
        details=message,
    ))


# --------------------------------------------------------------------------
# One ext_proc stream = one HTTP request
# --------------------------------------------------------------------------
@dataclass
class Flight:
    """One picked request until its outcome is reported once (seconds, one clock):
    measured and learned by :mod:`joulepool.router.requests`, as the proxy does."""

    pool: PoolRouter
    spec: RequestSpec
    decision: RouteDecision
    started: float
    served: str = ""
    meter: ResponseMeter | None = None
    done: bool = False

    def served_by(self, address: str) -> None:
        """The gateway sent it to ``address`` (a fallback): the ledger entry follows."""
        current = self.served or self.decision.endpoint
        if (address and address != current
                and self.pool.move_routed(self.decision.request_id, current, address)):
            self.served = address

    def finish(self, now: float) -> None:
        if self.done or self.meter is None:
            return
        self.done = True
        measured = self.meter.finish(now)
        requests.learn(self.pool, self.served or self.decision.endpoint, self.decision,
                       self.spec, measured, now)

    def abandon(self) -> None:
        """No (usable) response: forgotten, counted neither met nor missed."""
        if not self.done:
            self.done = True
            self.pool.release(self.served or self.decision.endpoint, self.decision.request_id)


@dataclass
class Exchange:
    """The state of one HTTP request's ext_proc stream."""

    router: Router
    clock: Callable[[], float]
    headers: dict[str, str] = field(default_factory=dict)
    body: list[bytes] = field(default_factory=list)
    subset: frozenset[str] | None = None
    duplex_request: bool = False
    duplex_response: bool = False
    flight: Flight | None = None
    #: called with each answer's HTTP status (200: picked), e.g. to count it
    on_answer: Callable[[int], None] | None = None
    #: the exchange is over (response ended, or answered immediately): nothing more
    #: will be asked of the picker, so the stream may close
    over: bool = False

    def handle(self, req: pb.ProcessingRequest) -> Iterator[pb.ProcessingResponse]:
        """The replies to one message from the gateway (none while buffering in
        full-duplex mode)."""
        self._note_metadata(req)
        kind = req.WhichOneof("request")
        if kind == "request_headers":
            self.headers = header_map(req.request_headers.headers)
            if req.request_headers.end_of_stream:
                yield from self._decide(headers_only=True)
            elif not self.duplex_request:
                yield _CONTINUE_REQUEST_HEADERS
        elif kind == "request_body":
            self.body.append(req.request_body.body)
            if req.request_body.end_of_stream:
                yield from self._decide(headers_only=False)
            elif not self.duplex_request:
                yield _CONTINUE_REQUEST_BODY
        elif kind == "response_headers":
            headers = header_map(req.response_headers.headers)
            self._response_started(headers.get(":status", "200"),
                                   headers.get("content-type", ""))
            if req.response_headers.end_of_stream:
                self._response_done()
                self.over = True
            yield _CONTINUE_RESPONSE_HEADERS
        elif kind == "response_body":
            yield from self._response_chunk(req.response_body)
        elif kind == "request_trailers":
            yield _CONTINUE_REQUEST_TRAILERS
        elif kind == "response_trailers":
            self._response_done()
            self.over = True
            yield _CONTINUE_RESPONSE_TRAILERS

    def _note_metadata(self, req: pb.ProcessingRequest) -> None:
        if req.HasField("protocol_config"):
            cfg = req.protocol_config
            self.duplex_request = cfg.request_body_mode == _FULL_DUPLEX
            self.duplex_response = cfg.response_body_mode == _FULL_DUPLEX
        if not req.HasField("metadata_context"):
            return
        hint = subset_hint(req.metadata_context)
        if hint is not None:
            self.subset = hint
        served = served_endpoint(req.metadata_context)
        if served:
            self.served(served)

    def served(self, address: str) -> None:
        """The gateway reports it sent the request to ``address``."""
        if self.flight is not None:
            self.flight.served_by(address)

    def answer(self, body: bytes) -> str | HTTPProblem:
        """Pick for the whole request ``body`` (``on_answer`` told): the destination
        value ``ip:port,ip:port,...`` (endpoint, then fallbacks), or the refusal to
        answer immediately (the exchange is then over). A second request on the stream
        (a gateway that sends another body's end) replaces the first, which is forgotten
        (:meth:`close`): its ledger entry would otherwise stay in flight for good."""
        self.close()
        try:
            self.flight = self.pick(body)
        except HTTPProblem as exc:
            if self.on_answer is not None:
                self.on_answer(exc.status)
            self.over = True
            return exc
        if self.on_answer is not None:
            self.on_answer(200)
        d = self.flight.decision
        return ",".join([d.endpoint, *d.fallbacks])

    def _decide(self, headers_only: bool) -> Iterator[pb.ProcessingResponse]:
        body = b"".join(self.body)
        value = self.answer(body)
        if isinstance(value, HTTPProblem):
            yield immediate(value.status, str(value))
            return
        if headers_only or self.duplex_request:
            yield destination_answer(value, "request_headers")
            if not headers_only:  # full duplex: the held body goes on, unchanged
                yield pb.ProcessingResponse(request_body=pb.BodyResponse(
                    response=pb.CommonResponse(body_mutation=pb.BodyMutation(
                        streamed_response=pb.StreamedBodyResponse(body=body,
                                                                  end_of_stream=True)))))
            return
        yield destination_answer(value, "request_body")

    def pick(self, body: bytes) -> Flight:
        """Route the request with the core router (HTTPProblem: the immediate answer)."""
        spec = read_spec(body, self.headers)
        if self.subset is not None and not self.subset:
            raise HTTPProblem(503, f"the gateway's subset hint {contract.EPP_SUBSET_KEY} is "
                                   "empty")
        pool = choose_pool(self.router, spec, self.subset)
        if (spec.tier or pool.tier) is Tier.BULK and pool.saturated(self.subset):
            raise HTTPProblem(429, f"pool {pool.key!r} is saturated on every eligible "
                                   "endpoint: bulk requests are shed first")
        now = self.clock()
        try:
            decision = requests.pick(pool, spec, now, self.subset)
        except NoEndpoints as exc:
            raise HTTPProblem(503, str(exc)) from None
        return Flight(pool, spec, decision, now)

    def _response_started(self, status: str, content_type: str) -> None:
        """The response's headers: its ``:status`` (``"200"`` when absent) and
        ``content-type`` (``""``)."""
        flight = self.flight
        if flight is None:
            return
        if not status.isdigit() or int(status) >= 400:
            flight.abandon()  # the gateway may retry elsewhere; no latency to learn
            return
        stream = "text/event-stream" in content_type
        flight.meter = ResponseMeter(flight.started, stream)

    def _feed(self, chunk: bytes) -> None:
        flight = self.flight
        if flight is not None and flight.meter is not None and not flight.done:
            flight.meter.feed(chunk, self.clock())

    def response(self, status: str | None, content_type: str, chunk: bytes | None,
                 end: bool) -> None:
        """The response as the compiled front end reports it, in one call where it can:
        its headers (``status`` None: told before, or none came), a body ``chunk``, and
        ``end``: the exchange is over (learned, then closed)."""
        if status is not None:
            self._response_started(status, content_type)
        if chunk is not None:
            self._feed(chunk)
        if end:
            self._response_done()
            self.over = True
            self.close()

    def _response_chunk(self, chunk: pb.HttpBody) -> Iterator[pb.ProcessingResponse]:
        self._feed(chunk.body)
        if chunk.end_of_stream:
            self._response_done()
            self.over = True
        if self.duplex_response:
            yield pb.ProcessingResponse(response_body=pb.BodyResponse(
                response=pb.CommonResponse(body_mutation=pb.BodyMutation(
                    streamed_response=pb.StreamedBodyResponse(
                        body=chunk.body, end_of_stream=chunk.end_of_stream)))))
        else:
            yield _CONTINUE_RESPONSE_BODY

    def _response_done(self) -> None:
        if self.flight is not None:
            self.flight.finish(self.clock())

    def close(self) -> None:
        """The stream ended: a request that got no complete response is forgotten."""
        if self.flight is not None:
            self.flight.abandon()


# --------------------------------------------------------------------------
# Server-side latency (both front ends), exported as Prometheus histograms
# --------------------------------------------------------------------------
#: upper bounds (seconds) of the picker's latency histograms: fine around the 2 ms
#: target, so that histogram_quantile's p99 is read to a tenth of a millisecond there
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00015, 0.0002, 0.0003, 0.0004, 0.0005, 0.00075, 0.001, 0.00125, 0.0015,
    0.00175, 0.002, 0.0025, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25,
    1.0)
#: the histograms: name in a latency snapshot -> (Prometheus name, help)
LATENCY_METRICS: dict[str, tuple[str, str]] = {
    "decision": ("joulepool_router_epp_decision_seconds",
                 "GIE endpoint picker, per request: from the request's end (its last body "
                 "message, or headers ending it) read by the picker's gRPC server to the "
                 "answer (destination or immediate response) written to the gateway's "
                 "stream"),
    "pick": ("joulepool_router_epp_pick_seconds",
             "GIE endpoint picker, per request: the Python decision within "
             "joulepool_router_epp_decision_seconds (read the body, choose the pool, core "
             "router decide, answer)"),
    "queue": ("joulepool_router_epp_queue_seconds",
              "GIE endpoint picker (native front end), per request: the pick waiting for "
              "the router's event loop (eventfd wake-up and the loop's other work) within "
              "joulepool_router_epp_decision_seconds"),
}
#: a latency snapshot: name -> (count per bucket of LATENCY_BUCKETS, the last one above
#: every bound; sum of the observations in seconds)
LatencySnapshot = Mapping[str, tuple[list[int], float]]


class Latency:
    """The Python front end's latency histograms (the compiled front end counts its own
    in C++): counts per bucket of :data:`LATENCY_BUCKETS`."""

    def __init__(self, names: Iterable[str] = ("decision", "pick")) -> None:
        self.counts = {n: [0] * (len(LATENCY_BUCKETS) + 1) for n in names}
        self.sums = dict.fromkeys(self.counts, 0.0)

    def observe(self, name: str, seconds: float) -> None:
        """Count one ``seconds`` long observation in histogram ``name`` (a bucket holds
        what is at most its bound, as Prometheus' ``le``)."""
        self.counts[name][bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sums[name] += seconds

    def snapshot(self) -> dict[str, tuple[list[int], float]]:
        """A copy of every histogram (:data:`LatencySnapshot`)."""
        return {n: (list(c), self.sums[n]) for n, c in self.counts.items()}


class LatencyCollector(Collector):
    """Prometheus collector of a front end's latency histograms, read at scrape time
    (``snapshot``: the server's ``latency``)."""

    def __init__(self, snapshot: Callable[[], LatencySnapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[HistogramMetricFamily]:
        for name, (counts, total) in sorted(self.snapshot().items()):
            metric, text = LATENCY_METRICS[name]
            cumulative, buckets = 0, []
            for bound, count in zip([*map(str, LATENCY_BUCKETS), "+Inf"], counts,
                                    strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            yield HistogramMetricFamily(metric, text, buckets=buckets, sum_value=total)


def _ends_request(req: pb.ProcessingRequest) -> bool:
    """Whether ``req`` is the request's last message (the pick follows it)."""
    kind = req.WhichOneof("request")
    if kind == "request_body":
        return req.request_body.end_of_stream
    return kind == "request_headers" and req.request_headers.end_of_stream


# --------------------------------------------------------------------------
# The gRPC services
# --------------------------------------------------------------------------
class EndpointPicker(pb_grpc.ExternalProcessorServicer):
    """``envoy.service.ext_proc.v3.ExternalProcessor`` over a :class:`Router`.

    Runs on the router service's event loop (the core router is not thread-safe and
    needs no lock there)."""

    def __init__(self, router: Router, clock: Callable[[], float] = time.monotonic,
                 on_answer: Callable[[int], None] | None = None,
                 latency: Latency | None = None) -> None:
        self.router = router
        self.clock = clock
        self.on_answer = on_answer
        self.latency = latency or Latency()

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest],
        context: grpc.aio.ServicerContext[pb.ProcessingRequest, pb.ProcessingResponse],
    ) -> None:
        """One stream: ``context.read``/``context.write`` rather than iterating
        ``request_iterator`` and yielding (grpc.aio wraps every message of an async
        generator in more awaits; the picker's streams are short and many). Returns
        (status OK) once the exchange is over, without waiting for the gateway's
        half-close."""
        exchange = Exchange(self.router, self.clock, on_answer=self.on_answer)
        try:
            while not exchange.over and (req := await context.read()) is not grpc.aio.EOF:
                if _ends_request(req):
                    await self._answer(exchange, req, context)
                    continue
                for resp in exchange.handle(req):
                    await context.write(resp)
        finally:
            exchange.close()

    async def _answer(
        self, exchange: Exchange, req: pb.ProcessingRequest,
        context: grpc.aio.ServicerContext[pb.ProcessingRequest, pb.ProcessingResponse],
    ) -> None:
        """The request's last message: pick and answer, timed (:data:`LATENCY_METRICS`)."""
        started = time.perf_counter()
        replies = list(exchange.handle(req))
        picked = time.perf_counter()
        for i, resp in enumerate(replies):
            await context.write(resp)
            if i == 0:
                self.latency.observe("decision", time.perf_counter() - started)
        self.latency.observe("pick", picked - started)


class HealthStatus:
    """The gRPC health services of GIE proposal 004, following a readiness predicate
    (on grpcio's health servicer; the compiled front end's subclass sets its C++ server's)."""

    def __init__(self, ready: Callable[[], bool],
                 servicer: health.aio.HealthServicer | None = None) -> None:
        self.servicer = servicer
        self.ready = ready
        self.last: bool | None = None

    async def _set(self, name: str, serving: bool) -> None:
        assert self.servicer is not None
        await self.servicer.set(name, health_pb2.HealthCheckResponse.SERVING if serving
                                else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def refresh(self) -> None:
        ready = self.ready()
        if ready == self.last:
            return
        self.last = ready
        await self._set(LIVENESS, True)
        for name in (READINESS, EXT_PROC_SERVICE, ""):
            await self._set(name, ready)


#: the gRPC server option that makes binding a port another server listens on fail:
#: SO_REUSEPORT, on by default in grpcio and grpc++, lets a second server bind it and
#: silently share its connections (a stale second router on the EPP port, two
#: benchmark servers on one port). Every gRPC server here listening on TCP sets it.
NO_SHARED_PORT: tuple[str, int] = ("grpc.so_reuseport", 0)

#: grpc.aio server options of the picker (``joulepool bench grpc_floor`` measures them,
#: ``docs/gateway.md`` "Performance"): channelz, on by default in grpcio, records every
#: call and stream of the server for introspection nobody here reads (its cost per
#: exchange was below the development machine's noise: kept as work not needed); and
#: :data:`NO_SHARED_PORT`.
SERVER_OPTIONS: tuple[tuple[str, int | str], ...] = (
    ("grpc.enable_channelz", 0),
    NO_SHARED_PORT,
)


class PickerServer(Protocol):
    """A started picker front end, as :func:`start_server` and
    :func:`joulepool.router.epp_native.start_server` return it."""

    async def stop(self, grace: float | None) -> None:
        """Stop accepting streams; those still open after ``grace`` s are cancelled."""

    def latency(self) -> LatencySnapshot:
        """The server-side latency histograms so far (:data:`LATENCY_METRICS`)."""


class PythonServer:
    """The grpcio front end's server and its latency histograms."""

    def __init__(self, server: grpc.aio.Server, latency: Latency) -> None:
        self.server = server
        self._latency = latency

    async def stop(self, grace: float | None) -> None:
        await self.server.stop(grace)

    def latency(self) -> LatencySnapshot:
        return self._latency.snapshot()


def new_server() -> grpc.aio.Server:
    """A grpc.aio server with :data:`SERVER_OPTIONS` (the benchmark's do-nothing
    server is built here too, so the two are compared on the same settings)."""
    return grpc.aio.server(options=SERVER_OPTIONS)


async def start_server(router: Router, ready: Callable[[], bool], host: str, port: int,
                       clock: Callable[[], float] = time.monotonic,
                       on_answer: Callable[[int], None] | None = None,
                       ) -> tuple[PythonServer, int, HealthStatus]:
    """A started gRPC server with the picker and health services; the bound port.
    ``on_answer`` sees each answer's HTTP status (200: an endpoint picked)."""
    server = new_server()
    latency = Latency()
    pb_grpc.add_ExternalProcessorServicer_to_server(
        EndpointPicker(router, clock, on_answer, latency), server)
    status = HealthStatus(ready, health.aio.HealthServicer())
    health_pb2_grpc.add_HealthServicer_to_server(status.servicer, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:  # grpcio raises RuntimeError where it cannot bind (older ones returned 0)
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen on {address} (gRPC)")
    await status.refresh()
    await server.start()
    log.info("endpoint picker (ext_proc, python front end) serving gRPC on %s:%d", host,
             bound)
    return PythonServer(server, latency), bound, status


async def keep_health(status: HealthStatus, period_s: float = 1.0) -> None:
    """Follow readiness until cancelled."""
    while True:
        await asyncio.sleep(period_s)
        with contextlib.suppress(Exception):
            await status.refresh()

