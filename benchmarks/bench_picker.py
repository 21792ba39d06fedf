"""Benchmark of the GIE endpoint picker (``joulepool router --epp-port``) at 1,000 endpoints.

The router runs as its own process (``joulepool router --no-cluster``) with one pool of
``--endpoints`` endpoints from a generated endpoints file (joules per token and tokens
per second spread over three GPU kinds). Load generators in their own processes play
the gateway over a real gRPC channel on loopback with Envoy's ext_proc v3 messages, one
stream per request: request headers, request body (an OpenAI completions body) ->
the pick; response headers and a JSON body with ``usage`` -> the router learns. So each
decision also pays for its learning.

Two kinds of load, as GIE's own figures are given: throughput at saturation and
latency at a stated offered rate (p99 at saturation is queueing, not the picker):

* saturated (closed loop): ``--clients`` processes x ``--concurrency`` streams, each
  starting its next request as soon as the last one ends; full exchanges, then
  request-only ones (the gateway's processing mode skips the response: nothing
  learned);
* offered rates (open loop, each rate of ``--rate`` in turn, requests/s, Poisson
  arrivals with seed 0, each request on its own stream whatever the others do): the
  full exchange, one client.

The load generator (``--load-generator``) is the compiled one (``native/eppload.cc``,
``build/native/eppload``, built by ``make native``: grpc++, one thread, the messages
serialised by this script, so the client costs the machine little CPU beside the
server), or where it is not built this script's asyncio one (grpc.aio; ``python``
asks for it). Both write the same JSON.

Figures per run (``--runs`` runs of ``--seconds`` each; medians quoted):

    decisions/s            completed exchanges per wall-clock second
    decisions/s per core   exchanges / CPU seconds of the router process (user + system
                           from /proc; the load generator's CPU is not counted): the
                           rate one core sustains, whatever else the machine runs
    wait p50/p99 ms        client-side time from sending the request headers to reading
                           the answer with x-gateway-destination-endpoint (what a request
                           waits at the gateway for the picker; gRPC both ways)
    server_decision_p50/p99_ms
                           server-side, from the picker's own Prometheus histogram over
                           the same window (joulepool_router_epp_decision_seconds from
                           the router's /metrics; the native floor's own counts): the
                           request's end read by the server to its answer handed to
                           gRPC, interpolated within buckets as histogram_quantile;
                           server_pick_* (Python's decision) and server_queue_* (the
                           wait for the event loop, native front end) likewise
    request_only_*         saturated, the response not sent to the picker
    paced_<rate>_*         at that offered rate
    in-process pick p50/p99 ms
                           the picker's own work per decision (read body, choose pool,
                           core router decide, answer built), no gRPC: a loop in this
                           process over the same 1,000 endpoints

With ``--baseline-src DIR`` (the ``src`` folder of another checkout, e.g. ``git
worktree add /tmp/ref main``), every run also measures a router started from that
source (same interpreter and packages, ``PYTHONPATH=DIR``), alternating with this
checkout's, so the two are compared side by side under the same machine load; the
``baseline_*`` figures and the ratios are that router's.

``--floor`` also measures, in each run, an ext_proc server that decides nothing
(every message answered "continue", on grpc.aio and uvloop like the router, built by
the picker's own ``epp.new_server`` with its options, and closing the stream after the
response's last message as the picker does): what gRPC itself costs per exchange on
this machine, the ceiling of any Python picker.
``--sync-floor`` measures the same server on grpcio's synchronous server (a thread
pool with a worker per stream, since each ext_proc stream holds its worker until the
HTTP request ends).

``--cpu N`` runs every router and floor server on CPU N alone (its threads, grpc's
included, hand over on one core, as a Guaranteed pod with ``cpu: 1`` runs under the
kubelet's static CPU manager); by default they run where the kernel puts them.

``--client-cpu M`` runs every load generator on CPU M alone (with ``--cpu N``, N != M:
the client does not take the server's core). ``--fifo PRIORITY`` runs the servers and
load generators of the offered-rate runs (never the saturated ones) under SCHED_FIFO:
on a machine shared with other work, the nearest thing to the dedicated cores a
Guaranteed pod gets under the static CPU manager (nothing else delays their wake-ups;
the kernel's real-time throttling still leaves the rest 5 % of the CPU).
``--saturated-client-fifo PRIORITY`` runs the load generators (not the servers) of the
saturated runs under SCHED_FIFO: their messages then come as soon as they are due, as
from a gateway on cores of its own; at normal priority on a busy machine they come in
bursts, which batches the server's work by itself (docs/gateway.md, "One thread at a
time").

``--clients N`` spreads the load over N processes (each with ``--concurrency``
streams), so that one client process's CPU does not cap the wall figures.

Targets (issue 12) at 1,000 endpoints: >= 2,500 decisions/s per core (saturated, full
exchange) and p99 <= 2 ms (client-observed, at every offered rate; ``--check`` exits 1
when missed).

    .venv/bin/joulepool bench picker [--runs 3 --seconds 5 --concurrency 16 --clients 1]
        [--rate 200,500,1000] [--floor] [--sync-floor] [--cpu N] [--client-cpu M]
        [--fifo PRIORITY] [--saturated-client-fifo PRIORITY]
        [--load-generator auto|native|python]
        [--baseline-src /tmp/ref/src]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

POOL = "default.chat"
#: the ``src`` of :func:`_start_router` that starts the do-nothing server instead
FLOOR = Path("<floor>")
#: ... the do-nothing server on grpcio's synchronous server (a thread per stream)
SYNC_FLOOR = Path("<sync-floor>")
#: ... the compiled front end's server deciding nothing (every message "continue")
NATIVE_FLOOR = Path("<native-floor>")
#: the picker's gRPC front ends (``joulepool router --picker-front-end``)
FRONT_ENDS = ("native", "python")
KINDS = ((0.12, 2400.0), (0.2, 1500.0), (0.45, 700.0))  # (J/token, tokens/s): H100, A100, L4
#: the compiled load generator (native/eppload.cc), built by ``make native``
LOADGEN = Path(__file__).resolve().parent.parent / "build" / "native" / "eppload"


def endpoints_file(path: Path, n: int) -> None:
    eps = [{"address": f"10.{i // 65000}.{(i // 250) % 250}.{i % 250 + 1}:8000",
            "joulesPerToken": KINDS[i % 3][0], "tokensPerSecond": KINDS[i % 3][1]}
           for i in range(n)]
    doc = {"pools": {POOL: {"model": "llama-3-8b", "tier": "interactive",
                            "slo": {"ttftSeconds": 1.0, "tpotSeconds": 0.1},
                            "endpoints": eps}}}
    path.write_text(json.dumps(doc))


def _free_port() -> int:
    """A port free now; another process may take it before a server binds it (it comes
    from the range the kernel also gives outgoing connections): start servers with
    :func:`_on_free_port`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: starts of a server tried on fresh ports when its port was taken before it bound it
START_TRIES = 4
_PORT_TAKEN = ("address already in use", "failed to bind", "cannot listen on")


def _on_free_port(start: Callable[[int], T]) -> tuple[int, T]:
    """``start(port)`` on a :func:`_free_port`, again on another port (up to
    :data:`START_TRIES` in all) when it fails because the port (or another it picked
    itself) was taken in between: (port, what ``start`` returned)."""
    for attempt in range(START_TRIES):
        port = _free_port()
        try:
            return port, start(port)
        except RuntimeError as e:
            if attempt + 1 == START_TRIES or not any(
                    taken in str(e).lower() for taken in _PORT_TAKEN):
                raise
    raise AssertionError("unreachable")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _messages(i: int) -> tuple[Any, Any, Any, Any]:
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    body = json.dumps({"model": "llama-3-8b", "prompt": "word " * (50 + i % 400),
                       "max_tokens": 64 + (i * 37) % 512}).encode()
    headers = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in (
            (":method", "POST"), (":path", "/v1/completions"),
            ("content-type", "application/json"),
            ("x-joulepool-tier", "bulk" if i % 4 == 0 else "interactive"))])))
    req_body = pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True))
    resp_headers = pb.ProcessingRequest(response_headers=pb.HttpHeaders(
        headers=base_pb2.HeaderMap(headers=[
            base_pb2.HeaderValue(key=":status", raw_value=b"200"),
            base_pb2.HeaderValue(key="content-type", raw_value=b"application/json")])))
    resp_body = pb.ProcessingRequest(response_body=pb.HttpBody(
        body=json.dumps({"choices": [{"text": "x"}],
                         "usage": {"completion_tokens": 64}}).encode(),
        end_of_stream=True))
    return headers, req_body, resp_headers, resp_body


async def _exchange(stub: Any, messages: tuple[Any, Any, Any, Any], respond: bool) -> float:
    """One request's ext_proc stream as a gateway plays it; the seconds from sending the
    request headers to reading the answer that names the destination (what the request
    waits at the gateway for the picker)."""
    h, b, rh, rb = messages
    call = stub.Process()
    t0 = time.perf_counter()
    await call.write(h)
    await call.read()
    await call.write(b)
    answer = await call.read()
    waited = time.perf_counter() - t0
    if respond and not answer.HasField("immediate_response"):
        await call.write(rh)
        await call.read()
        await call.write(rb)
        await call.read()
    await call.done_writing()
    return waited


async def _load(port: int, seconds: float, concurrency: int, respond: bool = True,
                rate: float = 0.0) -> tuple[int, list[float]]:
    """Closed loop (``rate`` 0: ``concurrency`` streams back to back, the picker
    saturated) or open loop (Poisson arrivals at ``rate`` requests/s, seed 0, each on
    its own stream whatever the ones before it do). Completed exchanges, waits (s)."""
    import grpc
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

    prepared = [_messages(i) for i in range(256)]
    latencies: list[float] = []
    stop = time.perf_counter() + seconds
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)

        async def worker(w: int) -> None:
            i = w
            while time.perf_counter() < stop:
                latencies.append(await _exchange(stub, prepared[i % len(prepared)], respond))
                i += concurrency

        async def one(i: int) -> None:
            latencies.append(await _exchange(stub, prepared[i % len(prepared)], respond))

        if rate <= 0:
            await asyncio.gather(*(worker(w) for w in range(concurrency)))
            return len(latencies), latencies
        gaps = np.random.default_rng(0).exponential(1.0 / rate, int(seconds * rate * 2) + 8)
        arrivals = np.cumsum(gaps) + time.perf_counter()
        tasks = []
        for i, at in enumerate(arrivals):
            if at >= stop:
                break
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    return len(latencies), latencies


def _in_process_router(path: Path) -> Any:
    from joulepool.router.app import ROUTER, create_app
    from joulepool.router.settings import Settings

    app = create_app(Settings(cluster=False, endpoints_file=path, scrape_interval_seconds=0,
                              file_poll_seconds=0), background=False)
    return app[ROUTER].router


def in_process_pick(path: Path, decisions: int) -> tuple[float, float, float]:
    """p50, p99 (ms, wall clock) and p99 (ms, CPU time of this thread: without the time
    the process sat preempted on a busy machine) of reading the request and answering the
    pick (Exchange.handle on headers and body), no gRPC."""
    from joulepool.router.epp import Exchange

    router = _in_process_router(path)
    prepared = [_messages(i) for i in range(256)]
    times, cpu = [], []
    for i in range(decisions):
        h, b, _, _ = prepared[i % len(prepared)]
        ex = Exchange(router, time.monotonic)
        t0, c0 = time.perf_counter(), time.thread_time()
        replies = list(ex.handle(h)) + list(ex.handle(b))
        cpu.append(time.thread_time() - c0)
        times.append(time.perf_counter() - t0)
        assert replies[-1].HasField("request_body") or replies[-1].HasField(
            "immediate_response")
        if ex.flight is not None:
            ex.flight.abandon()
    arr = np.array(times) * 1000
    return (float(np.percentile(arr, 50)), float(np.percentile(arr, 99)),
            float(np.percentile(np.array(cpu) * 1000, 99)))


@dataclass(frozen=True)
class Clients:
    """How the load is generated: the compiled load generator (``native/eppload.cc``,
    built by ``make native``) or this script's asyncio one (``python``), on CPU ``cpu``
    alone when given."""

    kind: str = "python"
    cpu: int | None = None
    #: SCHED_FIFO priority of the servers and load generators of the offered-rate runs
    fifo: int | None = None
    #: SCHED_FIFO priority of the load generators alone (not the servers; ``fifo`` wins)
    client_fifo: int | None = None


def loadgen_unavailable() -> str | None:
    """Why the compiled load generator cannot run here (None: it can)."""
    if LOADGEN.is_file() and os.access(LOADGEN, os.X_OK):
        return None
    return f"{LOADGEN} is not built (make native)"


def messages_file(path: Path, sets: int = 256) -> Path:
    """The compiled load generator's messages: ``sets`` x :func:`_messages` serialised,
    each a 4-byte little-endian length then its bytes (written once per path)."""
    if not path.exists():
        with path.open("wb") as f:
            for i in range(sets):
                for msg in _messages(i):
                    data = msg.SerializeToString()
                    f.write(struct.pack("<I", len(data)) + data)
    return path


def _client(port: int, seconds: float, concurrency: int, respond: bool, rate: float,
            out: Path, clients: Clients = Clients()) -> subprocess.Popen[bytes]:
    """A load generator in its own process: the compiled one, or this script with
    ``--client`` (the same arguments and the same JSON out)."""
    if clients.kind == "native":
        cmd = [str(LOADGEN), str(port), str(seconds), str(rate), str(concurrency),
               "1" if respond else "0", str(messages_file(out.parent / "messages.bin")),
               str(out)]
    else:
        cmd = [sys.executable, __file__, "--client", str(port), str(seconds),
               str(concurrency), "1" if respond else "0", str(rate), str(out)]
    fifo = clients.fifo if clients.fifo is not None else clients.client_fifo
    return subprocess.Popen(_pinned(cmd, clients.cpu, fifo))


def _run_client(argv: Sequence[str]) -> None:
    import uvloop

    port, seconds, concurrency, respond, rate, out = argv
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        done, lat = runner.run(_load(int(port), float(seconds), int(concurrency),
                                     respond == "1", float(rate)))
    Path(out).write_text(json.dumps({"done": done, "errors": 0, "latencies": lat}))


def _continue_replies() -> dict[str, Any]:
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    return {kind: pb.ProcessingResponse(**{kind: cls()}) for kind, cls in (
        ("request_headers", pb.HeadersResponse), ("request_body", pb.BodyResponse),
        ("response_headers", pb.HeadersResponse), ("response_body", pb.BodyResponse))}


def _last_message(req: Any) -> bool:
    """Whether ``req`` ends the response (the floor then closes the stream, as the
    picker does: ``epp.Exchange.over``)."""
    return req.HasField("response_body") and req.response_body.end_of_stream


def _serve_sync_floor(argv: Sequence[str]) -> None:
    """The do-nothing ext_proc server on grpcio's synchronous server: a thread pool of
    ``argv[1]`` workers, each holding one stream (one HTTP request) while it lasts."""
    from concurrent import futures

    import grpc
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

    from joulepool.router import epp

    replies = _continue_replies()

    class Continue(pb_grpc.ExternalProcessorServicer):
        def Process(self, request_iterator: Any, context: Any) -> Any:
            for req in request_iterator:
                yield replies[req.WhichOneof("request")]
                if _last_message(req):
                    return

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=int(argv[1])),
                         options=epp.SERVER_OPTIONS)
    pb_grpc.add_ExternalProcessorServicer_to_server(Continue(), server)
    server.add_insecure_port(f"127.0.0.1:{argv[0]}")
    server.start()
    print("sync floor listening on", argv[0], flush=True)
    server.wait_for_termination()


def _serve_floor(argv: Sequence[str]) -> None:
    """An ext_proc server that decides nothing (each message answered "continue"), on
    grpc.aio and uvloop as the router: the gRPC floor of a Python picker."""
    import grpc
    import uvloop
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

    from joulepool.router import epp

    replies = _continue_replies()

    class Continue(pb_grpc.ExternalProcessorServicer):
        async def Process(self, request_iterator: Any, context: Any) -> None:
            while (req := await context.read()) is not grpc.aio.EOF:
                await context.write(replies[req.WhichOneof("request")])
                if _last_message(req):
                    return

    async def serve() -> None:
        server = epp.new_server()
        pb_grpc.add_ExternalProcessorServicer_to_server(Continue(), server)
        server.add_insecure_port(f"127.0.0.1:{argv[0]}")
        await server.start()
        print("floor listening on", argv[0], flush=True)
        await server.wait_for_termination()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve())


def _serve_native_floor(argv: Sequence[str]) -> None:
    """The compiled front end's C++ server with no bridge: every message answered
    "continue", the stream closed after the response's last message, no Python per
    message (what the compiled transport alone costs per exchange). On SIGUSR1 it
    writes its latency histograms (``server.latency()``) as JSON to ``argv[2]``."""
    import signal

    from joulepool.router import epp_native

    server = epp_native.new_server(None, "127.0.0.1", int(argv[0]))
    print("native floor listening on", server.port, flush=True)
    dump = Path(argv[2]) if len(argv) > 2 else None
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    while signal.sigwait({signal.SIGTERM, signal.SIGINT, signal.SIGUSR1}) == signal.SIGUSR1:
        if dump is not None:
            tmp = dump.with_suffix(".tmp")
            tmp.write_text(json.dumps(server.latency()))
            tmp.replace(dump)


#: ``python -c _PIN CPU FIFO CMD...``: confines itself to CPU and runs under SCHED_FIFO at
#: priority FIFO ("-": leave as is), then execs CMD, which keeps both. A ``preexec_fn``
#: would do the same in the forked child, but makes ``subprocess`` fork (not vfork) this
#: process, which has loaded gRPC: gRPC's fork handlers then restart its poller in the
#: child, ``close_fds`` closes the poller's epoll fd under it and the child aborts
#: (tests/unit/test_cli_hostile_input.py, ``_LIMITED``).
_PIN = ("import os, sys\n"
        "cpu, fifo = sys.argv[1:3]\n"
        "if cpu != '-': os.sched_setaffinity(0, {int(cpu)})\n"
        "if fifo != '-': os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(int(fifo)))\n"
        "os.execvp(sys.argv[3], sys.argv[3:])\n")


def _pinned(cmd: list[str], cpu: int | None, fifo: int | None = None) -> list[str]:
    """``cmd`` confined, with every thread it starts, to ``cpu`` (as the kubelet's static
    CPU manager confines a Guaranteed pod with ``cpu: 1``; None: free) and, with ``fifo``,
    run under SCHED_FIFO at that priority (needs CAP_SYS_NICE): nothing else on the
    machine then delays their wake-ups, as on dedicated cores (the kernel's real-time
    throttling still leaves the others 5 %). Through :data:`_PIN`, no ``preexec_fn``."""
    if cpu is None and fifo is None:
        return cmd
    return [sys.executable, "-c", _PIN, "-" if cpu is None else str(cpu),
            "-" if fifo is None else str(fifo), *cmd]


def _start_router(path: Path, port: int, src: Path | None, workers: int = 16,
                  cpu: int | None = None, front_end: str | None = None
                  ) -> subprocess.Popen[str]:
    """The router of this checkout (``src`` None; ``front_end``: its
    ``--picker-front-end``, else its default), of another source folder, or a floor
    server (:data:`FLOOR`, :data:`SYNC_FLOOR`, :data:`NATIVE_FLOOR`)."""
    return _start_server(path, port, src, workers, cpu, front_end).proc


@dataclass
class Server:
    """A started server and where its server-side latency histograms are read (None:
    it has none)."""

    proc: subprocess.Popen[str]
    latency: Callable[[], dict[str, tuple[list[int], float]]] | None = None


def _start_server(path: Path, port: int, src: Path | None, workers: int = 16,
                  cpu: int | None = None, front_end: str | None = None,
                  fifo: int | None = None) -> Server:
    """:func:`_start_router` (``fifo``: see :func:`_pinned`), with the reader of its latency
    histograms: the router's ``/metrics``, the native floor's SIGUSR1 dump."""
    if src in (FLOOR, SYNC_FLOOR, NATIVE_FLOOR):
        flag = {FLOOR: "--serve-floor", SYNC_FLOOR: "--serve-sync-floor",
                NATIVE_FLOOR: "--serve-native-floor"}[src]
        dump = path.parent / f"floor-latency-{port}.json"
        cmd = [sys.executable, __file__, flag, str(port), str(workers), str(dump)]
        proc = _started(subprocess.Popen(_pinned(cmd, cpu, fifo), stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True))
        if src is NATIVE_FLOOR:
            return Server(proc, lambda: _floor_latency(proc, dump))
        return Server(proc)
    env = dict(os.environ)
    if src is not None:  # the baseline checkout's source first on the path
        env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [
            env.get("PYTHONPATH")])])
    http_port = _free_port()
    proc = subprocess.Popen(_pinned(
        [sys.executable, "-m", "joulepool.cli", "router", "--no-cluster",
         "--host", "127.0.0.1",
         "--port", str(http_port), "--epp-port", str(port), "--endpoints-file", str(path),
         "--scrape-interval-seconds", "0", "--file-poll-seconds", "0",
         *(["--picker-front-end", front_end] if front_end else [])], cpu, fifo),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    return Server(_started(proc), lambda: _router_latency(http_port))


def _router_latency(http_port: int) -> dict[str, tuple[list[int], float]]:
    """The router's picker latency histograms from its ``/metrics`` (per-bucket counts,
    sum), as ``server.latency()`` gives them; {} for a router without them."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from joulepool.router import epp

    names = {metric: name for name, (metric, _) in epp.LATENCY_METRICS.items()}
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name in names:
            cumulative = [x.value for x in family.samples if x.name.endswith("_bucket")]
            total = next(x.value for x in family.samples if x.name.endswith("_sum"))
            counts = [int(c - b) for c, b in zip(cumulative, [0.0, *cumulative[:-1]],
                                                 strict=True)]
            out[names[family.name]] = (counts, total)
    return out


def _floor_latency(proc: subprocess.Popen[str], dump: Path
                   ) -> dict[str, tuple[list[int], float]]:
    """The native floor's latency histograms (it dumps them on SIGUSR1)."""
    dump.unlink(missing_ok=True)
    proc.send_signal(signal.SIGUSR1)
    for _ in range(500):
        if dump.exists():
            return {k: (v[0], v[1]) for k, v in json.loads(dump.read_text()).items()}
        time.sleep(0.01)
    raise RuntimeError("the native floor did not dump its latency histograms")


def histogram_quantile(q: float, counts: Sequence[int]) -> float:
    """The ``q`` quantile (seconds) of per-bucket ``counts`` over ``epp.LATENCY_BUCKETS``
    (the last count above every bound), interpolated linearly within the bucket as
    Prometheus' ``histogram_quantile`` does; NaN without observations."""
    from joulepool.router.epp import LATENCY_BUCKETS

    total = sum(counts)
    if total == 0:
        return float("nan")
    rank, seen = q * total, 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            if i == len(LATENCY_BUCKETS):  # above the last bound: that bound, as Prometheus
                return LATENCY_BUCKETS[-1]
            lower = LATENCY_BUCKETS[i - 1] if i else 0.0
            return lower + (LATENCY_BUCKETS[i] - lower) * (rank - seen) / count
        seen += count
    return LATENCY_BUCKETS[-1]


def _server_side(before: dict[str, tuple[list[int], float]],
                 after: dict[str, tuple[list[int], float]]) -> dict[str, float]:
    """p50/p99 (ms) of the observations between two latency snapshots, per histogram:
    ``server_decision_p99_ms`` and so on."""
    out = {}
    for name, (counts, _) in after.items():
        old = before.get(name, ([0] * len(counts), 0.0))[0]
        delta = [a - b for a, b in zip(counts, old, strict=True)]
        for q in (50, 99):
            out[f"server_{name}_p{q}_ms"] = 1000 * histogram_quantile(q / 100, delta)
    return out


def _started(proc: subprocess.Popen[str]) -> subprocess.Popen[str]:
    assert proc.stdout is not None
    seen: list[str] = []
    while not seen or "listening on" not in seen[-1]:  # the HTTP listener is last up
        seen.append(proc.stdout.readline())
        if not seen[-1]:
            raise RuntimeError("router did not start: " + "".join(seen)[-2000:])
    return proc


def _drive(port: int, seconds: float, concurrency: int, respond: bool, clients: int,
           tmp: Path, rate: float = 0.0, how: Clients = Clients()
           ) -> tuple[int, list[float]]:
    """Load from ``clients`` processes at once (each at ``rate`` requests/s when given);
    completed exchanges and latencies (s). RuntimeError when an exchange failed."""
    outs = [tmp / f"client{c}.json" for c in range(clients)]
    procs = [_client(port, seconds, concurrency, respond, rate, out, how) for out in outs]
    done, lat = 0, []
    for proc, out in zip(procs, outs, strict=True):
        if proc.wait(seconds + 60) != 0:
            raise RuntimeError(f"load generator exited with {proc.returncode}")
        res = json.loads(out.read_text())
        if res["errors"] or res.get("unfinished"):
            raise RuntimeError(f"load generator: {res['errors']} exchanges failed, "
                               f"{res.get('unfinished', 0)} never ended")
        done += res["done"]
        lat += res["latencies"]
    return done, lat


def one_run(path: Path, seconds: float, concurrency: int, respond: bool, clients: int = 1,
            src: Path | None = None, rate: float = 0.0, cpu: int | None = None,
            front_end: str | None = None, how: Clients = Clients()) -> dict[str, float]:
    """One router (this checkout's with ``front_end``, or ``src``'s; on CPU ``cpu`` alone
    when given) under load for ``seconds``: saturated (``rate`` 0) or at ``rate``
    requests/s offered (one client); the client-observed waits and, where the server
    has them, its own latency histograms over the same window (``server_*``); the
    server under the load generators' scheduling policy (``how.fifo``)."""
    port, server = _on_free_port(lambda p: _start_server(
        path, p, src, concurrency * clients, cpu, front_end, how.fifo))
    proc = server.proc
    try:
        _drive(port, 0.5, concurrency, respond, clients, path.parent, how=how)  # warm up
        before = server.latency() if server.latency else {}
        cpu0, t0 = _cpu_seconds(proc.pid), time.perf_counter()
        done, lat = _drive(port, seconds, concurrency, respond, clients, path.parent, rate,
                           how)
        # the clients' start-up (imports) is inside the window: wall rate is a lower bound
        cpu, wall = _cpu_seconds(proc.pid) - cpu0, time.perf_counter() - t0
        after = server.latency() if server.latency else {}
    finally:
        proc.terminate()
        proc.wait(10)
    arr = np.array(lat) * 1000
    return {"decisions": done, "decisions_per_s": done / min(wall, seconds),
            "decisions_per_core_s": done / cpu if cpu > 0 else float("nan"),
            "router_cpu_us": 1e6 * cpu / done if done else float("nan"),
            "p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99)),
            **_server_side(before, after)}


def _measure(path: Path, args: argparse.Namespace, src: Path | None,
             front_end: str | None = None) -> dict[str, float]:
    """Saturated, full exchange and request-only; then the full exchange at each offered
    rate of ``--rate`` (keys ``paced_<rate>_*``)."""
    # saturated: never a real-time server; the load generators alone with
    # --saturated-client-fifo
    how = dataclasses.replace(args.how, fifo=None, client_fifo=args.saturated_client_fifo)
    res = one_run(path, args.seconds, args.concurrency, True, args.clients, src,
                  cpu=args.cpu, front_end=front_end, how=how)
    req_only = one_run(path, args.seconds, args.concurrency, False, args.clients, src,
                       cpu=args.cpu, front_end=front_end, how=how)
    res.update({f"request_only_{k}": v for k, v in req_only.items()})
    for rate in args.rates:
        paced = one_run(path, args.seconds, args.concurrency, True, 1, src, rate,
                        args.cpu, front_end, args.how)
        res.update({f"{_paced(rate)}{k}": v for k, v in paced.items()})
    return res


def _paced(rate: float) -> str:
    """The prefix of the figures at offered rate ``rate``."""
    return f"paced_{rate:g}_"


def _load_avg() -> float:
    return os.getloadavg()[0]


def _summary(med: dict[str, float], rates: Sequence[float], prefix: str = "") -> str:
    g = {k: med[prefix + k] for k in (
        "decisions_per_s", "decisions_per_core_s", "p50_ms", "p99_ms",
        "request_only_decisions_per_s", "request_only_decisions_per_core_s",
        "request_only_p99_ms")}
    text = (f"saturated: full exchange {g['decisions_per_s']:.0f} decisions/s wall, "
            f"{g['decisions_per_core_s']:.0f} per router CPU-second, wait p50 "
            f"{g['p50_ms']:.2f} ms p99 {g['p99_ms']:.2f} ms; request-only "
            f"{g['request_only_decisions_per_s']:.0f}/s wall, "
            f"{g['request_only_decisions_per_core_s']:.0f} per CPU-second, p99 "
            f"{g['request_only_p99_ms']:.2f} ms")
    for rate in rates:
        p = prefix + _paced(rate)
        text += (f"\n    at {rate:g} requests/s offered: {med[p + 'decisions_per_s']:.0f} "
                 f"decisions/s; client-observed wait p50 {med[p + 'p50_ms']:.2f} ms p99 "
                 f"{med[p + 'p99_ms']:.2f} ms")
        if p + "server_decision_p99_ms" in med:
            text += (f"; server-side decision p50 {med[p + 'server_decision_p50_ms']:.2f} "
                     f"ms p99 {med[p + 'server_decision_p99_ms']:.2f} ms")
        for part in ("pick", "queue"):
            if p + f"server_{part}_p99_ms" in med:
                text += f", {part} p99 {med[p + f'server_{part}_p99_ms']:.2f} ms"
    return text


def _front_ends(requested: str) -> list[str]:
    """The front ends to measure, in order (the first gives the headline figures); the
    compiled one is left out, saying why, where it is not built."""
    from joulepool.router import epp_native

    names = [n.strip() for n in requested.split(",") if n.strip()]
    unknown = [n for n in names if n not in FRONT_ENDS]
    if unknown or not names:
        raise ValueError(f"--front-ends: expected some of {', '.join(FRONT_ENDS)}, got "
                         f"{requested!r}")
    if "native" in names and epp_native.UNAVAILABLE is not None:
        print(f"native front end left out: {epp_native.UNAVAILABLE}", flush=True)
        names.remove("native")
    if not names:
        raise ValueError("--front-ends: nothing left to measure")
    return names


def _rates(raw: str) -> list[float]:
    """``--rate``: the offered rates (requests/s), 0 or none meaning no paced run."""
    try:
        rates = [float(r) for r in raw.split(",") if r.strip()]
    except ValueError:
        raise ValueError(f"--rate: comma-separated requests/s, got {raw!r}") from None
    if any(not r >= 0 or r == float("inf") for r in rates):
        raise ValueError(f"--rate: finite non-negative requests/s, got {raw!r}")
    return [r for r in rates if r > 0]


def _placement(cpu: int | None, client_cpu: int | None, fifo: int | None) -> None:
    """``--cpu``, ``--client-cpu`` and ``--fifo``: CPUs this process may run on and a
    SCHED_FIFO priority the kernel takes (ValueError otherwise: the pinning shim would
    fail in every child it starts)."""
    allowed = os.sched_getaffinity(0)
    for flag, value in (("--cpu", cpu), ("--client-cpu", client_cpu)):
        if value is not None and value not in allowed:
            raise ValueError(f"{flag} {value}: not a CPU this process may run on "
                             f"({', '.join(map(str, sorted(allowed)))})")
    low, high = (os.sched_get_priority_min(os.SCHED_FIFO),
                 os.sched_get_priority_max(os.SCHED_FIFO))
    if fifo is not None and not low <= fifo <= high:
        raise ValueError(f"--fifo {fifo}: a SCHED_FIFO priority is {low} to {high}")
    if fifo is not None:
        _fifo_permitted(fifo)


def _fifo_permitted(fifo: int) -> None:
    """ValueError saying why a child cannot run under SCHED_FIFO at ``fifo`` (no
    CAP_SYS_NICE and RLIMIT_RTPRIO below it): tried through the pinning shim itself, as
    every server and load generator would be started, so that the run stops here
    with the reason instead of in the first child ("router did not start")."""
    probe = subprocess.run(_pinned([sys.executable, "-c", ""], None, fifo),
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        why = (probe.stderr.strip().splitlines() or ["exit status "
                                                     f"{probe.returncode}"])[-1]
        raise ValueError(f"--fifo {fifo}: this process may not run children under "
                         f"SCHED_FIFO ({why}); it needs CAP_SYS_NICE or an RLIMIT_RTPRIO "
                         f"of at least {fifo} (ulimit -r)")


def _baseline_front_end(src: Path | None, front_end: str) -> None:
    """ValueError when the baseline source (``--baseline-src``) would serve another front
    end than the headline one: its router falls back to the Python front end where its
    compiled one is not built, and the comparison would then set the two front ends
    against each other instead of the two sources."""
    if src is None or front_end != "native":
        return
    if not (src / "joulepool").is_dir():
        raise ValueError(f"--baseline-src {src}: no joulepool package there")
    if not any((src / "joulepool" / "router").glob("_eppnative*.so")):
        raise ValueError(
            f"--baseline-src {src}: its compiled front end is not built, so its router "
            "would serve the Python one; build it there (make native) or copy this "
            "checkout's src/joulepool/router/_eppnative*.so beside it (native/ "
            "unchanged), or measure --front-ends python")


def _load_generator(requested: str) -> str:
    """``--load-generator``: the one to use (``auto``: native where built, else python,
    saying why); ``native`` where it is not built: ValueError."""
    why = loadgen_unavailable()
    if requested == "python" or (requested == "auto" and why is not None):
        if requested == "auto":
            print(f"python load generator: {why}", flush=True)
        return "python"
    if why is not None:
        raise ValueError(f"--load-generator native: {why}")
    return "native"


def _report(args: argparse.Namespace, runs: list[dict[str, float]]) -> dict[str, float]:
    """Print the medians (and the ratios to the baseline); the medians, ratios added."""
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    offered = (f"offered rates {', '.join(f'{r:g}' for r in args.rates)} requests/s"
               if args.rates else "no offered-rate run")
    pinned = f"; servers on CPU {args.cpu} alone" if args.cpu is not None else ""
    client_cpu = f" on CPU {args.how.cpu} alone" if args.how.cpu is not None else ""
    client_cpu += (f"; offered-rate runs under SCHED_FIFO {args.fifo}" if args.fifo
                   is not None else "")
    print(f"median of {args.runs} runs at {args.endpoints} endpoints{pinned}; "
          f"{args.how.kind} load generator{client_cpu}; saturated: "
          f"{args.clients} client process(es) x {args.concurrency} streams; {offered}; "
          f"load average {med['load_average']:.1f}:")
    first, *others = args.measured_front_ends
    print(f"  this checkout, {first} front end: {_summary(med, args.rates)}; in-process pick p50 "
          f"{med['in_process_p50_ms']:.3f} ms p99 {med['in_process_p99_ms']:.3f} ms wall, "
          f"{med['in_process_cpu_p99_ms']:.3f} ms CPU")
    for fe in others:
        print(f"  this checkout, {fe} front end: {_summary(med, args.rates, f'{fe}_')}")
        keys = ["decisions_per_core_s", "request_only_decisions_per_core_s"]
        ratios = {k: statistics.median(r[k] / r[f"{fe}_{k}"] for r in runs) for k in keys}
        print(f"  {first} / {fe} (median of per-run ratios): per CPU-second full "
              f"{ratios['decisions_per_core_s']:.2f}x, request-only "
              f"{ratios['request_only_decisions_per_core_s']:.2f}x")
        med.update({f"ratio_{fe}_{k}": v for k, v in ratios.items()})
    if args.baseline_src is not None:
        print(f"  baseline {args.baseline_src}: {_summary(med, args.rates, 'baseline_')}")
        keys = ["decisions_per_core_s", "request_only_decisions_per_core_s", "p99_ms"]
        keys += [f"{_paced(r)}p99_ms" for r in args.rates]
        ratios = {k: statistics.median(r[k] / r[f"baseline_{k}"] for r in runs) for k in keys}
        print("  this / baseline (median of per-run ratios): per CPU-second full "
              f"{ratios['decisions_per_core_s']:.2f}x, request-only "
              f"{ratios['request_only_decisions_per_core_s']:.2f}x; saturated p99 "
              f"{ratios['p99_ms']:.2f}x" + "".join(
                  f"; p99 at {r:g}/s {ratios[f'{_paced(r)}p99_ms']:.2f}x" for r in args.rates))
        med.update({f"ratio_{k}": v for k, v in ratios.items()})
    if args.floor:
        print(f"  gRPC floor (an ext_proc server that decides nothing): "
              f"{_summary(med, args.rates, 'floor_')}")
        if "native_floor_decisions" in med:
            print(f"  the same on the compiled front end's C++ server: "
                  f"{_summary(med, args.rates, 'native_floor_')}")
    if args.sync_floor:
        print(f"  the same on grpcio's synchronous server: "
              f"{_summary(med, args.rates, 'sync_floor_')}")
    return med


def _one_round(path: Path, args: argparse.Namespace) -> dict[str, float]:
    """Every measured server once: the baseline, the floors, then this checkout's front
    ends (the first one un-prefixed, the others with their name as prefix)."""
    from joulepool.router import epp_native

    res = {"load_average": _load_avg()}
    if args.baseline_src is not None:
        base = _measure(path, args, args.baseline_src.resolve())
        res.update({f"baseline_{k}": v for k, v in base.items()})
    floors = [("floor", FLOOR)] if args.floor else []
    if args.floor and epp_native.UNAVAILABLE is None:
        floors.append(("native_floor", NATIVE_FLOOR))
    if args.sync_floor:
        floors.append(("sync_floor", SYNC_FLOOR))
    for name, src in floors:
        res.update({f"{name}_{k}": v for k, v in _measure(path, args, src).items()})
    first, *others = args.measured_front_ends
    for fe in others:
        res.update({f"{fe}_{k}": v for k, v in _measure(path, args, None, fe).items()})
    res.update(_measure(path, args, None, first))
    return res


#: the hidden sub-commands this script runs itself as (load generator, floor servers)
_ROLES: dict[str, Callable[[Sequence[str]], None]] = {
    "--client": _run_client, "--serve-floor": _serve_floor,
    "--serve-sync-floor": _serve_sync_floor, "--serve-native-floor": _serve_native_floor}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="joulepool bench picker", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoints", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=16, help="streams per client")
    ap.add_argument("--clients", type=int, default=1, help="load generator processes")
    ap.add_argument("--rate", default="200,500,1000",
                    help="offered requests/s of the latency runs, comma-separated (Poisson "
                         "arrivals, one run each; choose them below the saturated rate; "
                         "0: no such run)")
    ap.add_argument("--load-generator", choices=("auto", "native", "python"),
                    default="auto",
                    help="the compiled load generator (native/eppload.cc, built by `make "
                         "native`; auto: it where built, else this script's asyncio one)")
    ap.add_argument("--client-cpu", type=int, default=None,
                    help="run every load generator on this CPU alone (with --cpu on "
                         "another: the client does not take the server's core)")
    ap.add_argument("--baseline-src", type=Path, default=None,
                    help="also measure a router from this source folder, alternating")
    ap.add_argument("--front-ends", default=",".join(FRONT_ENDS),
                    help="this checkout's picker front ends to measure, side by side in "
                         "every run (comma-separated, the first gives the headline "
                         "figures; native is left out where it is not built)")
    ap.add_argument("--floor", action="store_true",
                    help="also measure an ext_proc server that decides nothing (gRPC floor), "
                         "on grpc.aio and on the compiled front end's C++ server")
    ap.add_argument("--sync-floor", action="store_true",
                    help="also measure that server on grpcio's synchronous server (a "
                         "thread per stream: as many workers as streams)")
    ap.add_argument("--cpu", type=int, default=None,
                    help="run every router and floor server on this CPU alone (as the "
                         "kubelet's static CPU manager runs a Guaranteed pod with cpu: 1): "
                         "its threads then hand over on one core")
    ap.add_argument("--fifo", type=int, default=None, metavar="PRIORITY",
                    help="run the servers and load generators of the offered-rate runs "
                         "(not the saturated ones) under SCHED_FIFO at this priority (as "
                         "root): the nearest a shared machine comes to the dedicated cores "
                         "of a Guaranteed pod under the static CPU manager")
    ap.add_argument("--saturated-client-fifo", type=int, default=None, metavar="PRIORITY",
                    help="run the load generators (not the servers) of the saturated runs "
                         "under SCHED_FIFO at this priority: their messages then come as "
                         "soon as they are due, as from a gateway on cores of its own, "
                         "instead of in bursts when a busy machine delays them")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    return ap


def _validate(args: argparse.Namespace) -> None:
    """Check the options and settle what they leave open (ValueError saying why):
    ``measured_front_ends``, ``rates`` and ``how`` (the load generators) added."""
    args.measured_front_ends = _front_ends(args.front_ends)
    args.rates = _rates(args.rate)
    _placement(args.cpu, args.client_cpu, args.fifo)
    if args.saturated_client_fifo is not None:
        try:
            _placement(None, None, args.saturated_client_fifo)
        except ValueError as exc:
            raise ValueError(f"--saturated-client-fifo: {exc}") from None
    args.how = Clients(_load_generator(args.load_generator), args.client_cpu, args.fifo)
    _baseline_front_end(args.baseline_src, args.measured_front_ends[0])


def _rounds(args: argparse.Namespace) -> list[dict[str, float]]:
    """``--runs`` rounds, each printed as it ends: every measured server, then the
    in-process pick."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "endpoints.json"
        endpoints_file(path, args.endpoints)
        runs = []
        for r in range(args.runs):
            res = _one_round(path, args)
            (res["in_process_p50_ms"], res["in_process_p99_ms"],
             res["in_process_cpu_p99_ms"]) = in_process_pick(path, 3000)
            runs.append(res)
            print(f"run {r + 1}: " + ", ".join(f"{k} {v:.3g}" for k, v in res.items()),
                  flush=True)
    return runs


def _targets_missed(args: argparse.Namespace, med: dict[str, float]) -> bool:
    """Whether the medians miss issue 12's targets (said when they do)."""
    p99 = (max(med[f"{_paced(r)}p99_ms"] for r in args.rates) if args.rates
           else med["p99_ms"])
    missed = med["decisions_per_core_s"] < 2500 or p99 > 2.0
    if missed:
        where = ("client-observed, at every offered rate" if args.rates
                 else "saturated: queueing included")
        print("target missed: >= 2,500 decisions/s per core (saturated, full exchange) "
              f"and p99 <= 2 ms ({where})")
    return missed


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in _ROLES:
        _ROLES[argv[0]](argv[1:])
        return 0
    args = _parser().parse_args(argv)
    try:
        _validate(args)
    except ValueError as exc:
        print(f"joulepool bench picker: {exc}", file=sys.stderr)
        return 2
    runs = _rounds(args)
    med = _report(args, runs)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"runs": runs, "median": med,
                                        "front_ends": args.measured_front_ends,
                                        "load_generator": args.how.kind,
                                        "rates": args.rates,
                                        "endpoints": args.endpoints}, indent=2))
    missed = _targets_missed(args, med)
    return 1 if (args.check and missed) else 0

if __name__ == "__main__":
    sys.exit(main())
