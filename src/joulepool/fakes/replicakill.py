"""Router replica kill harness: two real router processes behind a Service, one killed
under load.

Fake vLLM engines (:mod:`joulepool.fakes.engine`) serve on loopback; two ``joulepool
router --no-cluster`` processes list them in one endpoints file. The Service is played
by :class:`Balancer`, a connection-level round robin as kube-proxy balances: each new
connection goes to the next ready replica. Readiness is probed (``GET /readyz``) every
``probe_period_s``, standing for the kubelet noticing the dead container and the
endpoint leaving the Service's EndpointSlice; until then a dead replica stays in
rotation (its connections are refused, then reset here). The client is the real
OpenAI SDK with ``max_retries``: a request whose connection is refused or reset before
any response byte is retried, as the SDK does.
After ``kill_after`` of the requests are done, one replica gets SIGKILL with requests
in flight. The report counts requests that failed for good (the SDK gave up).

Used by ``tests/integration/test_router_replica_kill.py`` (a modest run) and
``benchmarks/bench_router_replica_kill.py`` (larger ones).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from joulepool.api import contract
from joulepool.core.profiles import H100_8B
from joulepool.fakes.engine import FakeEngine, build_app

MODEL = H100_8B.model
POOL = "ns.chat"


class Balancer:
    """A connection-level round-robin TCP balancer over the ready ones of ``backends``
    (``host:port``), probing ``GET /readyz`` every ``probe_period_s`` (0: never; every
    backend stays in rotation)."""

    def __init__(self, backends: list[str], probe_period_s: float = 1.0) -> None:
        self.backends = backends
        self.probe_period_s = probe_period_s
        self.ready = [True] * len(backends)
        self._next = itertools.count()
        self.server: asyncio.Server | None = None
        #: connections opened to each backend; connections a backend refused
        self.connections = [0] * len(backends)
        self.refused = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._prober: asyncio.Task[None] | None = None

    async def start(self) -> str:
        """Listen on a free loopback port; returns ``http://127.0.0.1:PORT``."""
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        if self.probe_period_s > 0:
            self._prober = asyncio.create_task(self._probe_forever())
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in [*self._tasks, *([self._prober] if self._prober else [])]:
            t.cancel()

    async def _probe_forever(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as http:
            while True:
                await asyncio.sleep(self.probe_period_s)
                for i, backend in enumerate(self.backends):
                    try:
                        async with http.get(f"http://{backend}/readyz",
                                            timeout=aiohttp.ClientTimeout(total=1.0)) as r:
                            self.ready[i] = r.status == 200
                    except (aiohttp.ClientError, TimeoutError, OSError):
                        self.ready[i] = False

    def _pick(self) -> int:
        n = len(self.backends)
        start = next(self._next)
        for k in range(n):
            if self.ready[(start + k) % n]:
                return (start + k) % n
        return start % n  # none ready: as a Service with no endpoints, the connection fails

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                     ) -> None:
        i = self._pick()
        host, port = self.backends[i].rsplit(":", 1)
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            self.refused += 1
            writer.transport.abort()  # the client sees its connection reset
            return
        self.connections[i] += 1
        tasks = [asyncio.create_task(_pipe(reader, up_writer)),
                 asyncio.create_task(_pipe(up_reader, writer))]
        self._tasks.update(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.difference_update(tasks)


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    except (OSError, asyncio.CancelledError):
        pass
    finally:
        dst.transport.abort()


@dataclass(frozen=True)
class ReplicaKillSettings:
    """One run: requests, connections, tokens per request, when the kill comes (share
    of the requests done), the client's retries, and the routers' extra flags."""

    requests: int = 1200
    concurrency: int = 24
    max_tokens: int = 6
    kill_after: float = 1 / 3
    max_retries: int = 2  # the OpenAI SDK's default
    engines: int = 2
    #: how often the Service's readiness view is refreshed (0: the dead replica stays)
    probe_period_s: float = 1.0
    router_args: tuple[str, ...] = ()


@dataclass
class ReplicaKillReport:
    """What one run saw, filled in as it goes. Counts are requests unless named
    otherwise: ``requests`` to send, ``done`` finished (either way), ``failed`` for good
    (the SDK gave up, or the completion was wrong; by exception name in ``errors``);
    ``refused`` and ``connections`` are the balancer's TCP connections (refused by a
    dead replica; opened to each replica, in start order, the killed one first);
    ``killed_at`` is ``done`` when the SIGKILL went out (None: never) and
    ``killed_exit`` the victim's exit status (``-9`` after SIGKILL); ``served_by`` the
    engines (``ip:port``) that answered; ``elapsed_s`` the load's wall time in seconds."""

    requests: int = 0
    done: int = 0
    failed: int = 0
    #: requests the SDK had to send more than once (in flight at the kill, or sent to
    #: the dead replica after it)
    retried: int = 0
    refused: int = 0
    connections: list[int] = field(default_factory=list)
    killed_at: int | None = None
    killed_exit: int | None = None
    survivor_alive: bool = False
    elapsed_s: float = 0.0
    served_by: set[str] = field(default_factory=set)
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def failure_ratio(self) -> float:
        """Requests lost for good over requests to send, in [0, 1] (0 with none to send);
        issue 12's target is under 1e-3."""
        return self.failed / self.requests if self.requests else 0.0

    def to_json(self) -> dict[str, object]:
        """The report as a JSON-ready mapping (the benchmark's ``runs`` entries): counts
        as above, ``failure_ratio`` a fraction, ``refused_connections`` and
        ``connections`` TCP connections, ``killed_after_requests`` = ``killed_at``,
        ``elapsed_s`` seconds rounded to 0.01; ``done`` and ``served_by`` are left out."""
        return {"requests": self.requests, "failed": self.failed,
                "failure_ratio": self.failure_ratio, "retried": self.retried,
                "refused_connections": self.refused, "connections": self.connections,
                "killed_after_requests": self.killed_at, "killed_exit": self.killed_exit,
                "survivor_alive": self.survivor_alive, "elapsed_s": round(self.elapsed_s, 2),
                "errors": self.errors}


def write_endpoints(path: Path, addresses: list[str]) -> Path:
    """The routers' endpoints file: one interactive pool over ``addresses``."""
    path.write_text(json.dumps({"pools": {POOL: {
        "model": MODEL, "tier": "interactive",
        "slo": {"ttftSeconds": 5.0, "tpotSeconds": 0.5},
        "endpoints": [{"address": a, "joulesPerToken": 0.1, "tokensPerSecond": 1000}
                      for a in addresses],
    }}}))
    return path


def start_router(endpoints: Path, *extra: str, timeout_s: float = 60.0
                 ) -> tuple[subprocess.Popen[str], str]:
    """A ``joulepool router`` process on a free loopback port, once it listens; returns
    it and its ``host:port`` (RuntimeError if it exits or stays silent)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "joulepool.cli", "router", "--no-cluster",
         "--endpoints-file", str(endpoints), "--host", "127.0.0.1", "--port", "0",
         "--scrape-interval-seconds", "0", "--file-poll-seconds", "0", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"})
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    for line in proc.stdout:
        if "listening on" in line:
            return proc, line.split()[-1].removeprefix("http://")
        if time.monotonic() > deadline:
            break
    proc.kill()
    proc.wait(10)
    raise RuntimeError(f"router exited ({proc.returncode}) before listening")


@contextlib.contextmanager
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes started inside are killed (only they, by pid) and reaped on the way out."""
    procs: list[subprocess.Popen[str]] = []
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)


async def start_engines(n: int) -> tuple[list[web.AppRunner], list[str]]:
    """``n`` fake vLLM engines (H100, Llama 3.1 8B profile) on free loopback ports."""
    runners, addresses = [], []
    for _ in range(n):
        runner = web.AppRunner(build_app(FakeEngine(H100_8B)), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        addresses.append(f"127.0.0.1:{runner.addresses[0][1]}")
    return runners, addresses


async def run_replica_kill(workdir: Path, settings: ReplicaKillSettings) -> ReplicaKillReport:
    """One run (module docstring); the routers' endpoints file goes in ``workdir``."""
    import openai

    report = ReplicaKillReport(requests=settings.requests)
    runners, engines = await start_engines(settings.engines)
    endpoints = write_endpoints(workdir / "endpoints.json", engines)
    try:
        with processes() as procs:
            addresses = []
            for _ in range(2):
                proc, address = start_router(endpoints, *settings.router_args)
                procs.append(proc)
                addresses.append(address)
            balancer = Balancer(addresses, settings.probe_period_s)
            base = await balancer.start()
            client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused",
                                        max_retries=settings.max_retries)
            try:
                await _load(client, procs[0], settings, report)
            finally:
                await client.close()
                await balancer.close()
            report.killed_exit = procs[0].wait(10)
            report.survivor_alive = procs[1].poll() is None
            report.refused, report.connections = balancer.refused, balancer.connections
    finally:
        for r in runners:
            await r.cleanup()
    return report


async def _load(client: object, victim: subprocess.Popen[str], settings: ReplicaKillSettings,
                report: ReplicaKillReport) -> None:
    import openai

    assert isinstance(client, openai.AsyncOpenAI)
    todo = iter(range(settings.requests))
    kill_at = max(1, int(settings.requests * settings.kill_after))
    expected = "".join(f" tok{k}" for k in range(settings.max_tokens))

    async def worker() -> None:
        for i in todo:
            try:
                raw = await client.completions.with_raw_response.create(
                    model=MODEL, prompt=f"request {i}", max_tokens=settings.max_tokens)
                if raw.parse().choices[0].text != expected:
                    raise ValueError("wrong completion")
                report.served_by.add(raw.headers[contract.SERVED_BY_HEADER])
                report.retried += raw.http_request.headers.get("x-stainless-retry-count") != "0"
            except (openai.OpenAIError, ValueError) as exc:
                report.failed += 1
                name = type(exc).__name__
                report.errors[name] = report.errors.get(name, 0) + 1
            report.done += 1
            if report.killed_at is None and report.done >= kill_at:
                report.killed_at = report.done
                victim.send_signal(signal.SIGKILL)  # requests in flight on it

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(settings.concurrency)))
    report.elapsed_s = time.monotonic() - t0
