"""The GIE endpoint picker over a real gRPC channel on loopback, with Envoy's own
ext_proc v3 messages: this test plays the gateway's side of the protocol (GIE
proposal 004) against ``joulepool router --epp-port``, on both front ends (the
compiled one, ``native``, where ``make native`` built it; and grpcio's, ``python``):
every test runs against each, with the same assertions."""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import json_format, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from joulepool.core.router import PoolRouter
from joulepool.httpserve import HTTPProblem
from joulepool.router import epp, epp_native
from joulepool.router.app import EPP_PORT, ROUTER, create_app
from joulepool.router.settings import Settings

EFFICIENT, FAST = "10.0.0.1:8000", "10.0.0.2:8000"
POOL = "ns.chat"
DEST = "x-gateway-destination-endpoint"
DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED


def _endpoints_file(tmp_path: Path, waiting: float = 0.0) -> Path:
    doc = {"pools": {POOL: {
        "tier": "interactive", "model": "llama-3-8b",
        "slo": {"ttftSeconds": 0.5, "tpotSeconds": 0.05},
        "endpoints": [
            {"address": EFFICIENT, "joulesPerToken": 0.1, "tokensPerSecond": 100,
             "waiting": waiting},
            {"address": FAST, "joulesPerToken": 0.5, "tokensPerSecond": 1000,
             "waiting": waiting},
        ],
    }}}
    path = tmp_path / "endpoints.json"
    path.write_text(json.dumps(doc))
    return path


class Gateway:
    """The data plane's side: one ext_proc stream per HTTP request."""

    def __init__(self, channel: grpc.aio.Channel, pool: PoolRouter, http: Any,
                 port: int) -> None:
        self.stub = pb_grpc.ExternalProcessorStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)
        self.pool = pool
        self.http = http  # the router's aiohttp test client (/metrics)
        self.port = port  # the picker's gRPC port

    def stream(self) -> Any:
        return self.stub.Process()


@pytest.fixture(params=["native", "python"])
def front_end(request: pytest.FixtureRequest) -> str:
    """The picker's gRPC front end under test."""
    if request.param == "native" and epp_native.UNAVAILABLE is not None:
        pytest.skip(epp_native.UNAVAILABLE)
    return str(request.param)


@pytest.fixture
async def gateway(aiohttp_client: Any, tmp_path: Path, request: pytest.FixtureRequest,
                  front_end: str) -> AsyncIterator[Gateway]:
    waiting = getattr(request, "param", 0.0)
    settings = Settings(cluster=False, endpoints_file=_endpoints_file(tmp_path, waiting),
                        scrape_interval_seconds=0, pi_every=1, file_poll_seconds=0,
                        host="127.0.0.1", epp_port=0, picker_front_end=front_end)
    client = await aiohttp_client(create_app(settings))
    app = client.server.app
    metrics = await (await client.get("/metrics")).text()
    assert f'joulepool_router_epp_front_end_info{{front_end="{front_end}"}} 1.0' in metrics
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app[EPP_PORT]}") as channel:
        yield Gateway(channel, app[ROUTER].router.pool(POOL), client, app[EPP_PORT])


def _headers(extra: dict[str, str] | None = None, end: bool = False
             ) -> pb.ProcessingRequest:
    pairs = {":method": "POST", ":path": "/v1/completions", ":authority": "gw",
             "content-type": "application/json", **(extra or {})}
    return pb.ProcessingRequest(request_headers=pb.HttpHeaders(
        headers=base_pb2.HeaderMap(headers=[
            base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]),
        end_of_stream=end))


def _body(payload: bytes, end: bool = True) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=payload, end_of_stream=end))


def _completion(max_tokens: int = 50) -> bytes:
    return json.dumps({"model": "llama-3-8b", "prompt": "hello " * 40,
                       "max_tokens": max_tokens, "stream": True}).encode()


def _metadata(namespace: str, fields: dict[str, Any]) -> base_pb2.Metadata:
    md = base_pb2.Metadata()
    s = struct_pb2.Struct()
    s.update(fields)
    md.filter_metadata[namespace].CopyFrom(s)
    return md


def _subset(addresses: list[str]) -> base_pb2.Metadata:
    return _metadata("envoy.lb.subset_hint",
                     {"x-gateway-destination-endpoint-subset": addresses})


def _destination(resp: pb.ProcessingResponse, part: str) -> tuple[str, str]:
    """(header value, envoy.lb metadata value) of a reply to ``part``."""
    common = getattr(resp, part).response
    header = [o.header for o in common.header_mutation.set_headers if o.header.key == DEST]
    assert len(header) == 1, resp
    md = json_format.MessageToDict(resp.dynamic_metadata)
    return header[0].raw_value.decode(), md["envoy.lb"][DEST]


async def _pick(gw: Gateway, extra: dict[str, str] | None = None,
                metadata: base_pb2.Metadata | None = None, body: bytes | None = None
                ) -> tuple[Any, pb.ProcessingResponse]:
    call = gw.stream()
    first = _headers(extra)
    if metadata is not None:
        first.metadata_context.CopyFrom(metadata)
    await call.write(first)
    assert (await call.read()).HasField("request_headers")
    await call.write(_body(_completion() if body is None else body))
    return call, await call.read()


async def test_pick_in_header_and_envoy_lb_metadata(gateway: Gateway) -> None:
    call, resp = await _pick(gateway)
    metrics = await (await gateway.http.get("/metrics")).text()
    assert 'joulepool_router_epp_answers_total{code="200"} 1.0' in metrics
    header, md = _destination(resp, "request_body")
    assert header == md  # the protocol forbids two different values
    picked = header.split(",")
    assert sorted(picked) == sorted([EFFICIENT, FAST])  # primary then ordered fallbacks
    assert len(gateway.pool.endpoints[gateway.pool.index[picked[0]]].ledger) == 1
    await call.done_writing()


async def _histograms(gw: Gateway) -> dict[str, dict[str, Any]]:
    """The picker's latency histograms on the router's /metrics: name -> {"buckets":
    [(le, cumulative count)], "count", "sum"}."""
    text = await (await gw.http.get("/metrics")).text()
    out: dict[str, dict[str, Any]] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in {m for m, _ in epp.LATENCY_METRICS.values()}:
            continue
        assert family.type == "histogram"
        h: dict[str, Any] = {"buckets": []}
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                h["buckets"].append((float(sample.labels["le"]), sample.value))
            else:
                h[sample.name.rsplit("_", 1)[1]] = sample.value
        out[family.name] = h
    return out


async def _counted(gw: Gateway, requests: int) -> dict[str, dict[str, Any]]:
    """The histograms once the decision one counts ``requests`` (the C++ server counts
    a write's completion, which may follow the gateway's read by a moment)."""
    decision = "joulepool_router_epp_decision_seconds"
    for _ in range(200):
        hists = await _histograms(gw)
        if hists[decision]["count"] >= requests:
            return hists
        await asyncio.sleep(0.025)
    raise AssertionError(f"{decision} never counted {requests}: {hists}")


async def test_server_side_latency_histograms_are_exported_and_move(
        gateway: Gateway, front_end: str) -> None:
    names = {"joulepool_router_epp_decision_seconds", "joulepool_router_epp_pick_seconds"}
    if front_end == "native":  # the wait for the event loop exists only there
        names.add("joulepool_router_epp_queue_seconds")
    before = await _histograms(gateway)
    assert set(before) == names
    assert all(h["count"] == 0 and h["sum"] == 0 for h in before.values())
    call, resp = await _pick(gateway)
    assert _destination(resp, "request_body")[0]
    await call.done_writing()
    refused, resp = await _pick(gateway, metadata=_subset([]))  # an immediate answer counts
    assert resp.immediate_response.status.code == 503
    await refused.done_writing()
    after = await _counted(gateway, 2)
    for name in names:
        h = after[name]
        assert h["count"] == 2, (name, h)
        les = [le for le, _ in h["buckets"]]
        assert les == [*epp.LATENCY_BUCKETS, float("inf")]
        counts = [c for _, c in h["buckets"]]
        assert counts == sorted(counts) and counts[-1] == h["count"]
        assert 0 < h["sum"] < 10
    decision = after["joulepool_router_epp_decision_seconds"]["sum"]
    assert after["joulepool_router_epp_pick_seconds"]["sum"] <= decision
    if front_end == "native":
        assert after["joulepool_router_epp_queue_seconds"]["sum"] <= decision


async def test_subset_hint_restricts_pick(gateway: Gateway) -> None:
    picks = set()
    for _ in range(3):
        call, resp = await _pick(gateway, metadata=_subset([FAST]))
        header, md = _destination(resp, "request_body")
        assert header == md == FAST  # only the subset, no fallback outside it
        picks.add(header)
        await call.done_writing()
    assert picks == {FAST}


@pytest.mark.parametrize("subset", [[], ["10.9.9.9:8000"]])
async def test_empty_or_ineligible_subset_is_503(gateway: Gateway, subset: list[str]
                                                  ) -> None:
    call, resp = await _pick(gateway, metadata=_subset(subset))
    metrics = await (await gateway.http.get("/metrics")).text()
    assert 'joulepool_router_epp_answers_total{code="503"} 1.0' in metrics
    assert resp.immediate_response.status.code == 503
    error = json.loads(resp.immediate_response.body)["error"]  # OpenAI-shaped, as the proxy's
    assert error["type"] == "service_unavailable" and "subset" in error["message"]
    await call.done_writing()


async def test_fail_open_on_unreadable_body(gateway: Gateway) -> None:
    call, resp = await _pick(gateway, body=b"\x00not json{")
    header, md = _destination(resp, "request_body")
    assert header == md and header.split(",")[0] in (EFFICIENT, FAST)
    await call.done_writing()


async def test_headers_only_request_is_routed_on_headers(gateway: Gateway) -> None:
    call = gateway.stream()
    await call.write(_headers({":method": "GET"}, end=True))
    resp = await call.read()
    header, md = _destination(resp, "request_headers")
    assert header == md
    await call.done_writing()


async def test_served_report_and_stream_teach_the_pool(gateway: Gateway) -> None:
    pool = gateway.pool
    lam0 = pool.pi.lam
    call, resp = await _pick(gateway, extra={"x-joulepool-deadline-ms": "60000"})
    picked = _destination(resp, "request_body")[0].split(",")
    other = picked[1]
    served = _metadata("envoy.lb", {"x-gateway-destination-endpoint-served": other})
    msg = pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=":status", raw_value=b"200"),
                 base_pb2.HeaderValue(key="content-type", raw_value=b"text/event-stream")])))
    msg.metadata_context.CopyFrom(served)
    await call.write(msg)
    assert (await call.read()).HasField("response_headers")
    # the gateway served the fallback: the in-flight entry follows it
    assert len(pool.endpoints[pool.index[other]].ledger) == 1
    assert len(pool.endpoints[pool.index[picked[0]]].ledger) == 0
    events = [{"choices": [{"text": f"t{i}"}]} for i in range(5)]
    events.append({"choices": [], "usage": {"completion_tokens": 7}})
    sse = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    await call.write(pb.ProcessingRequest(response_body=pb.HttpBody(body=sse[:37])))
    assert (await call.read()).HasField("response_body")
    await call.write(pb.ProcessingRequest(response_body=pb.HttpBody(
        body=sse[37:] + b"data: [DONE]\n\n", end_of_stream=True)))
    assert (await call.read()).HasField("response_body")
    await call.done_writing()
    assert len(pool.endpoints[pool.index[other]].ledger) == 0
    assert pool.pi_updates == 1 and pool.window.rate(pool.last_pi_t or 0.0) == 0.0
    assert pool.pi.lam < lam0  # a met deadline lowers lambda: learned with no callback


async def test_missed_deadline_raises_lambda(gateway: Gateway) -> None:
    pool = gateway.pool
    lam0 = pool.pi.lam
    call, _ = await _pick(gateway, extra={"x-joulepool-deadline-ms": "0.001"})
    await call.write(pb.ProcessingRequest(response_headers=pb.HttpHeaders(
        headers=base_pb2.HeaderMap(headers=[
            base_pb2.HeaderValue(key=":status", raw_value=b"200")]))))
    await call.read()
    body = json.dumps({"choices": [{"text": "x"}], "usage": {"completion_tokens": 3}})
    await call.write(pb.ProcessingRequest(response_body=pb.HttpBody(
        body=body.encode(), end_of_stream=True)))
    await call.read()
    await call.done_writing()
    assert pool.pi_updates == 1 and pool.pi.lam > lam0


async def test_request_without_response_is_forgotten(gateway: Gateway) -> None:
    call, _ = await _pick(gateway)
    assert sum(len(e.ledger) for e in gateway.pool.endpoints) == 1
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF
    assert sum(len(e.ledger) for e in gateway.pool.endpoints) == 0
    assert gateway.pool.pi_updates == 0  # neither met nor missed


@pytest.mark.parametrize("gateway", [3.0], indirect=True)
async def test_bulk_shed_with_429_when_every_endpoint_queues(gateway: Gateway) -> None:
    call, resp = await _pick(gateway, extra={"x-joulepool-tier": "bulk"})
    assert resp.immediate_response.status.code == 429
    await call.done_writing()
    call, resp = await _pick(gateway, extra={"x-joulepool-tier": "interactive"})
    assert _destination(resp, "request_body")[0]
    await call.done_writing()


@pytest.mark.parametrize(("extra", "status"), [
    ({"x-joulepool-pool": "ns.nope"}, 404),
    ({"x-joulepool-tier": "urgent"}, 400),
    ({"x-llm-d-slo-ttft-ms": "-5", "x-llm-d-slo-tpot-ms": "10"}, 400),
])
async def test_bad_requests_get_immediate_errors(gateway: Gateway, extra: dict[str, str],
                                                  status: int) -> None:
    call, resp = await _pick(gateway, extra=extra)
    assert resp.immediate_response.status.code == status
    assert json.loads(resp.immediate_response.body)["error"]["message"]
    await call.done_writing()


async def test_unknown_model_with_one_pool_routes_there(gateway: Gateway) -> None:
    body = json.dumps({"model": "gpt-unknown", "prompt": "hi"}).encode()
    call, resp = await _pick(gateway, body=body)
    # one pool only: routed to it (fail open) rather than refused
    assert _destination(resp, "request_body")[0]
    await call.done_writing()


async def test_full_duplex_holds_headers_and_streams_body_back(gateway: Gateway) -> None:
    call = gateway.stream()
    first = _headers()
    first.protocol_config.request_body_mode = DUPLEX
    first.protocol_config.response_body_mode = DUPLEX
    await call.write(first)
    payload = _completion()
    await call.write(_body(payload[:20], end=False))
    await call.write(_body(payload[20:], end=True))
    head = await call.read()
    header, md = _destination(head, "request_headers")
    assert header == md
    body = await call.read()
    streamed = body.request_body.response.body_mutation.streamed_response
    assert streamed.body == payload and streamed.end_of_stream
    await call.write(pb.ProcessingRequest(response_headers=pb.HttpHeaders(
        headers=base_pb2.HeaderMap(headers=[
            base_pb2.HeaderValue(key=":status", raw_value=b"200")]))))
    await call.read()
    await call.write(pb.ProcessingRequest(response_body=pb.HttpBody(body=b"{}",
                                                                    end_of_stream=True)))
    echoed = (await call.read()).response_body.response.body_mutation.streamed_response
    assert echoed.body == b"{}" and echoed.end_of_stream
    await call.done_writing()


async def test_health_services(gateway: Gateway) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    for name in ("liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor", ""):
        resp = await gateway.health.Check(health_pb2.HealthCheckRequest(service=name))
        assert resp.status == serving, name
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gateway.health.Check(health_pb2.HealthCheckRequest(service="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_readiness_follows_the_router_sync(front_end: str) -> None:
    from joulepool.kube.pools import Router

    synced = [False]
    start = epp_native.start_server if front_end == "native" else epp.start_server
    server, port, status = await start(Router(), lambda: synced[0], "127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def check(name: str) -> int:
                resp = await health.Check(health_pb2.HealthCheckRequest(service=name))
                return int(resp.status)

            serving = health_pb2.HealthCheckResponse.SERVING
            not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
            assert await check("liveness") == serving  # alive before the sync
            assert await check("readiness") == not_serving
            assert await check(epp.EXT_PROC_SERVICE) == not_serving
            assert await check("") == not_serving
            watch = health.Watch(health_pb2.HealthCheckRequest(service="readiness"))
            unknown = health.Watch(health_pb2.HealthCheckRequest(service="nope"))
            assert (await asyncio.wait_for(watch.read(), 10)).status == not_serving
            assert (await asyncio.wait_for(unknown.read(), 10)).status == (
                health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            synced[0] = True
            await status.refresh()
            assert await check("readiness") == serving
            assert await check(epp.EXT_PROC_SERVICE) == serving
            assert (await asyncio.wait_for(watch.read(), 10)).status == serving
            watch.cancel()  # `unknown` stays open: stopping ends it, no hang
    finally:
        await asyncio.wait_for(server.stop(0), 10)


async def _closed(call: Any) -> bool:
    """The picker ended the stream (EOF within 10 s, without the gateway's half-close)."""
    return bool(await asyncio.wait_for(call.read(), 10) == grpc.aio.EOF)


def _response_headers() -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=":status", raw_value=b"200"),
                 base_pb2.HeaderValue(key="content-type", raw_value=b"application/json")])))


def _usage_body(end: bool) -> pb.ProcessingRequest:
    body = json.dumps({"choices": [{"text": "x"}], "usage": {"completion_tokens": 3}})
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=body.encode(),
                                                          end_of_stream=end))


async def test_the_picker_closes_the_stream_once_the_response_ended(gateway: Gateway
                                                                     ) -> None:
    # Envoy: a stream the server closes cleanly means "proceed without the server";
    # after the response's last message nothing is left to ask, so the picker does not
    # wait for the gateway's half-close (one gRPC message event fewer per request)
    call, _ = await _pick(gateway, extra={"x-joulepool-deadline-ms": "60000"})
    await call.write(_response_headers())
    assert (await call.read()).HasField("response_headers")
    await call.write(_usage_body(end=True))
    assert (await call.read()).HasField("response_body")
    assert await _closed(call)  # no done_writing from the gateway
    assert await call.code() == grpc.StatusCode.OK
    assert gateway.pool.pi_updates == 1  # learned before closing
    assert sum(len(e.ledger) for e in gateway.pool.endpoints) == 0


async def test_the_stream_stays_open_for_the_response_trailers(gateway: Gateway) -> None:
    call, _ = await _pick(gateway)
    await call.write(_response_headers())
    await call.read()
    await call.write(_usage_body(end=False))  # trailers follow: not over yet
    assert (await call.read()).HasField("response_body")
    await call.write(pb.ProcessingRequest(response_trailers=pb.HttpTrailers()))
    assert (await call.read()).HasField("response_trailers")
    assert await _closed(call)
    assert await call.code() == grpc.StatusCode.OK
    assert gateway.pool.pi_updates == 1


async def test_an_immediate_answer_closes_the_stream(gateway: Gateway) -> None:
    call, resp = await _pick(gateway, extra={"x-joulepool-tier": "urgent"})
    assert resp.immediate_response.status.code == 400
    assert await _closed(call)
    assert await call.code() == grpc.StatusCode.OK


async def test_the_picker_server_is_built_without_channelz() -> None:
    # grpcio's channelz (on by default) tracks every server, call and stream;
    # epp.SERVER_OPTIONS turns it off. A plain server shows the check can fail.
    from grpc._cython import cygrpc

    def servers() -> int:
        return len(json.loads(cygrpc.channelz_get_servers(0)).get("server", []))

    before = servers()
    picker = epp.new_server()
    picker.add_insecure_port("127.0.0.1:0")
    await picker.start()
    plain = grpc.aio.server()
    plain.add_insecure_port("127.0.0.1:0")
    await plain.start()
    try:
        assert servers() == before + 1  # the plain one only
    finally:
        await picker.stop(0)
        await plain.stop(0)


async def _pick_ends_with_unknown(gw: Gateway) -> None:
    """A request's pick ends its stream with gRPC status UNKNOWN, no entry left in
    flight."""
    call = gw.stream()
    await call.write(_headers())
    await call.read()
    await call.write(_body(_completion()))
    with pytest.raises(grpc.aio.AioRpcError):
        await asyncio.wait_for(call.read(), 10)
    assert await call.code() == grpc.StatusCode.UNKNOWN
    assert sum(len(e.ledger) for e in gw.pool.endpoints) == 0


async def test_a_failing_pick_ends_the_stream_with_unknown(
        gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    # a bug in the picker is the stream's gRPC error (the gateway's failureMode then
    # decides), not a hang and not a half-routed request
    def broken(self: epp.Exchange, body: bytes) -> epp.Flight:
        raise RuntimeError("broken picker")

    monkeypatch.setattr(epp.Exchange, "pick", broken)
    await _pick_ends_with_unknown(gateway)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
async def test_a_destination_that_cannot_be_sent_ends_the_stream_with_unknown(
        gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    # the pick succeeded (a ledger entry) but its destination value cannot be encoded
    # (a lone surrogate): the stream's gRPC error, the entry released, never an empty
    # destination sent to the gateway; the failure is handled (logged), not left to
    # sys.unraisablehook
    answer = epp.Exchange.answer

    def unencodable(self: epp.Exchange, body: bytes) -> str | HTTPProblem:
        value = answer(self, body)
        return value + "\udc80" if isinstance(value, str) else value

    monkeypatch.setattr(epp.Exchange, "answer", unencodable)
    await _pick_ends_with_unknown(gateway)


async def test_a_second_request_on_one_stream_leaves_nothing_in_flight(gateway: Gateway
                                                                       ) -> None:
    # a gateway that sends a second request body's end on the same stream: each gets a
    # pick, and once the stream closes no ledger entry is left in flight (the first
    # one was kept for good before)
    call = gateway.stream()
    await call.write(_headers())
    await call.read()
    for _ in range(2):
        await call.write(_body(_completion()))
        assert _destination(await asyncio.wait_for(call.read(), 10), "request_body")[0]
    assert sum(len(e.ledger) for e in gateway.pool.endpoints) == 1
    await call.done_writing()
    with contextlib.suppress(grpc.aio.AioRpcError, StopAsyncIteration):
        await asyncio.wait_for(call.read(), 10)
    for _ in range(100):  # the stream's close reaches the loop
        if sum(len(e.ledger) for e in gateway.pool.endpoints) == 0:
            break
        await asyncio.sleep(0.02)
    assert sum(len(e.ledger) for e in gateway.pool.endpoints) == 0


async def test_stopping_the_server_forgets_the_open_exchanges(front_end: str,
                                                               tmp_path: Path) -> None:
    # a request picked and still in flight when the router stops: the stream is
    # cancelled within the grace period and its ledger entry released
    settings = Settings(cluster=False, endpoints_file=_endpoints_file(tmp_path),
                        scrape_interval_seconds=0, pi_every=1, file_poll_seconds=0)
    router = create_app(settings)[ROUTER].router
    start = epp_native.start_server if front_end == "native" else epp.start_server
    server, port, _ = await start(router, lambda: True, "127.0.0.1", 0)
    pool = router.pool(POOL)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        gw = Gateway(channel, pool, None, port)
        call, resp = await _pick(gw)
        assert _destination(resp, "request_body")[0]
        assert sum(len(e.ledger) for e in pool.endpoints) == 1
        await asyncio.wait_for(server.stop(0.2), 10)
        assert sum(len(e.ledger) for e in pool.endpoints) == 0
        assert pool.pi_updates == 0
        call.cancel()


async def test_an_address_it_cannot_listen_on_is_an_oserror(front_end: str) -> None:
    from joulepool.kube.pools import Router

    start = epp_native.start_server if front_end == "native" else epp.start_server
    with pytest.raises(OSError, match="cannot listen"):
        await start(Router(), lambda: True, "192.0.2.1", 0)  # TEST-NET: not this host's


async def test_a_port_another_picker_holds_is_an_oserror(front_end: str) -> None:
    # gRPC turns SO_REUSEPORT on by default: without epp.NO_SHARED_PORT the second
    # server would bind the first's port and silently share its streams
    from joulepool.kube.pools import Router

    start = epp_native.start_server if front_end == "native" else epp.start_server
    first, port, _ = await start(Router(), lambda: True, "127.0.0.1", 0)
    try:
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            second, _, _ = await start(Router(), lambda: True, "127.0.0.1", port)
            await second.stop(0)
    finally:
        await first.stop(0)


async def _one_of_many(gw: Gateway, i: int) -> None:
    """One gateway behaviour out of several, chosen by ``i``: the full exchange, the
    request only, a refusal, or the stream cancelled at some point of the exchange."""
    kind = i % 6
    call = gw.stream()
    try:
        await call.write(_headers({"x-joulepool-tier": "urgent"} if kind == 2 else None))
        await call.read()
        if kind == 3:  # cancelled before the body
            call.cancel()
            return
        await call.write(_body(_completion()))
        answer = await call.read()
        if kind == 4:  # cancelled after the pick, before any response
            call.cancel()
            return
        if kind in (1, 2) or answer.HasField("immediate_response"):
            await call.done_writing()
            await call.read()
            return
        await call.write(_response_headers())
        await call.read()
        if kind == 5:  # cancelled in the middle of the response
            call.cancel()
            return
        await call.write(_usage_body(end=True))
        await call.read()
    except grpc.aio.AioRpcError:  # a refusal's stream may already be closed
        pass


async def test_many_concurrent_and_cancelled_streams_leave_no_request_in_flight(
        gateway: Gateway) -> None:
    # the gateway's streams at once, some cancelled at every point of the exchange:
    # every in-flight entry is released or learned, and the picker still answers
    for start in range(0, 240, 48):
        await asyncio.gather(*(_one_of_many(gateway, i) for i in range(start, start + 48)))
    for _ in range(100):  # the cancellations reach the picker asynchronously
        if sum(len(e.ledger) for e in gateway.pool.endpoints) == 0:
            break
        await asyncio.sleep(0.05)
    assert sum(len(e.ledger) for e in gateway.pool.endpoints) == 0
    assert gateway.pool.pi_updates == 240 // 6  # the full exchanges, each learned once
    call, resp = await _pick(gateway)
    assert _destination(resp, "request_body")[0]
    await call.done_writing()


class _OneThreadAtATime:
    """Wraps a pool's ``decide`` and ``report``: records the thread of every call and
    fails the call that starts while another one is running (the core router's state
    is not thread-safe: the picker must never touch it from two threads at once)."""

    def __init__(self, pool: PoolRouter) -> None:
        self.threads: set[int] = set()
        self.calls = 0
        self._inside = 0
        for name in ("decide", "report"):
            setattr(pool, name, self._wrap(getattr(pool, name)))

    def _wrap(self, method: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self._inside += 1
            self.calls += 1
            self.threads.add(threading.get_ident())
            try:
                assert self._inside == 1, "the router entered from two threads at once"
                time.sleep(0)  # let another thread in, were one able to come
                return method(*args, **kwargs)
            finally:
                self._inside -= 1
        return call


async def _pick_in_subset(gw: Gateway, address: str) -> None:
    """A full exchange whose subset hint names ``address`` alone: the answer must name
    it (so an answer given to the wrong stream shows)."""
    call, resp = await _pick(gw, metadata=_subset([address]))
    assert _destination(resp, "request_body")[0].split(",")[0] == address
    await call.write(_response_headers())
    assert (await call.read()).HasField("response_headers")
    await call.write(_usage_body(end=True))
    assert (await call.read()).HasField("response_body")
    assert await _closed(call)


async def test_every_concurrent_stream_gets_its_own_answer_from_one_thread(
        gateway: Gateway) -> None:
    # many streams at once, each pinned by its subset hint to one endpoint: every answer
    # is its own stream's, and the router is entered from the event loop's thread alone,
    # one call at a time, picks and learning alike
    watch = _OneThreadAtATime(gateway.pool)
    addresses = [EFFICIENT, FAST]
    for start in range(0, 192, 64):
        await asyncio.gather(*(_pick_in_subset(gateway, addresses[i % 2])
                               for i in range(start, start + 64)))
    assert watch.threads == {threading.get_ident()}  # the loop's: this test runs on it
    assert watch.calls == 2 * 192  # a decide and a report per exchange
    assert gateway.pool.pi_updates == 192
    assert sum(len(e.ledger) for e in gateway.pool.endpoints) == 0


def _sync_stream(stub: Any) -> tuple[queue.Queue[Any], Any]:
    """A stream on grpcio's synchronous client: its request queue (None ends it) and
    its response iterator."""
    requests: queue.Queue[Any] = queue.Queue()
    return requests, stub.Process(iter(requests.get, None))


async def test_a_long_pick_does_not_hold_the_messages_that_need_no_decision(
        gateway: Gateway, front_end: str) -> None:
    # the compiled front end's completion-queue thread stands aside while the event loop
    # runs the picks it queued, but only for a bounded time: a pick that takes long does
    # not hold another stream's request headers (answered "continue" without Python)
    if front_end != "native":
        pytest.skip("the Python front end answers every message on the event loop")
    decide = gateway.pool.decide
    pick_started = threading.Event()

    def slow_decide(*args: Any, **kwargs: Any) -> Any:
        pick_started.set()
        time.sleep(0.6)  # the event loop held inside the pick
        return decide(*args, **kwargs)

    gateway.pool.decide = slow_decide  # type: ignore[method-assign]
    took: dict[str, Any] = {}
    failed: list[BaseException] = []

    def gateway_side() -> None:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
                stub = pb_grpc.ExternalProcessorStub(channel)
                first, first_replies = _sync_stream(stub)
                first.put(_headers())
                assert next(first_replies).HasField("request_headers")
                first.put(_body(_completion()))  # its pick runs on the event loop, slowly
                assert pick_started.wait(10), "the pick never started"
                other, other_replies = _sync_stream(stub)
                t0 = time.monotonic()
                other.put(_headers())
                assert next(other_replies).HasField("request_headers")
                took["other"] = time.monotonic() - t0
                answer = next(first_replies)
                took["pick"] = time.monotonic() - t0
                took["destination"] = _destination(answer, "request_body")[0]
                for q in (first, other):
                    q.put(None)
        except BaseException as e:  # re-raised by the test below
            failed.append(e)

    thread = threading.Thread(target=gateway_side)
    thread.start()
    for _ in range(200):
        if not thread.is_alive():
            break
        await asyncio.sleep(0.05)
    thread.join(1)
    assert not thread.is_alive(), "the gateway side did not finish"
    if failed:
        raise failed[0]
    assert took["other"] < 0.3, took  # not held until the pick was over
    assert took["pick"] > 0.3 and took["destination"], took  # the pick did take long
