"""Two router replicas behind a Service, one killed under load; and graceful SIGTERM.

The routers are real ``joulepool router`` processes in front of fake engines
(:mod:`joulepool.fakes.engine`); the Service is played by a TCP balancer that sends
each new connection to the next replica in turn, as kube-proxy does, and keeps
sending to a dead replica (its connections are refused) as a Service does until the
endpoint is removed. The client is the real OpenAI SDK with its default retries
(a refused or reset connection before any response byte is retried).
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
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer

from joulepool.core.profiles import H100_8B
from joulepool.fakes.engine import FakeEngine, build_app

MODEL = H100_8B.model
POOL = "ns.chat"


class Balancer:
    """A connection-level round-robin balancer over ``backends`` (``host:port``)."""

    def __init__(self, backends: list[str]) -> None:
        self.backends = backends
        self._next = itertools.cycle(range(len(backends)))
        self.server: asyncio.Server | None = None
        self.connections = [0] * len(backends)
        self.refused = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in list(self._tasks):
            t.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                     ) -> None:
        i = next(self._next)
        host, port = self.backends[i].rsplit(":", 1)
        try:
            up_r, up_w = await asyncio.open_connection(host, int(port))
        except OSError:
            self.refused += 1
            writer.transport.abort()  # the client sees its connection reset
            return
        self.connections[i] += 1

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.transport.abort()

        tasks = [asyncio.create_task(pipe(reader, up_w)), asyncio.create_task(pipe(up_r, writer))]
        self._tasks.update(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.difference_update(tasks)


def _write_endpoints(path: Path, addresses: list[str]) -> Path:
    path.write_text(json.dumps({"pools": {POOL: {
        "model": MODEL, "tier": "interactive",
        "slo": {"ttftSeconds": 5.0, "tpotSeconds": 0.5},
        "endpoints": [{"address": a, "joulesPerToken": 0.1 * (i + 1),
                       "tokensPerSecond": 1000} for i, a in enumerate(addresses)],
    }}}))
    return path


def _router(endpoints: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    """A ``joulepool router`` process on a free loopback port, once it listens."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "joulepool.cli", "router", "--no-cluster",
         "--endpoints-file", str(endpoints), "--host", "127.0.0.1", "--port", "0",
         "--scrape-interval-seconds", "0", "--file-poll-seconds", "0", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"})
    assert proc.stdout is not None
    for line in proc.stdout:
        if "listening on" in line:
            return proc, line.split()[-1].removeprefix("http://")
    proc.wait(10)
    raise AssertionError(f"router exited ({proc.returncode}) before listening")


@contextlib.contextmanager
def _processes() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)


@pytest.fixture
async def engines() -> AsyncIterator[list[str]]:
    servers = []
    for _ in range(2):
        s = TestServer(build_app(FakeEngine(H100_8B)), host="127.0.0.1")
        await s.start_server()
        servers.append(s)
    yield [f"127.0.0.1:{s.port}" for s in servers]
    for s in servers:
        await s.close()


REQUESTS = 1200
CONCURRENCY = 24


async def test_a_replica_killed_under_load_loses_under_a_thousandth(
        tmp_path: Path, engines: list[str]) -> None:
    endpoints = _write_endpoints(tmp_path / "endpoints.json", engines)
    with _processes() as procs:
        addresses = []
        for _ in range(2):
            proc, address = _router(endpoints)
            procs.append(proc)
            addresses.append(address)
        balancer = Balancer(addresses)
        base = await balancer.start()
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=5)
        done, failed, retried = 0, 0, 0
        served: set[str] = set()
        todo = iter(range(REQUESTS))
        killed_at: int | None = None

        async def worker() -> None:
            nonlocal done, failed, retried, killed_at
            for i in todo:
                try:
                    raw = await client.completions.with_raw_response.create(
                        model=MODEL, prompt=f"request {i}", max_tokens=6)
                    answer = raw.parse()
                    assert answer.choices[0].text == "".join(f" tok{k}" for k in range(6))
                    served.add(raw.headers["x-joulepool-endpoint"])
                    retried += raw.http_request.headers.get("x-stainless-retry-count") != "0"
                except openai.OpenAIError:
                    failed += 1
                done += 1
                if killed_at is None and done >= REQUESTS // 3:
                    killed_at = done
                    procs[0].send_signal(signal.SIGKILL)  # mid-run, requests in flight

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        elapsed = time.monotonic() - t0
        await client.close()
        await balancer.close()
        assert procs[0].wait(5) == -signal.SIGKILL
        assert procs[1].poll() is None  # the survivor served on
    assert done == REQUESTS and killed_at is not None
    assert failed / REQUESTS < 1e-3, f"{failed} of {REQUESTS} failed in {elapsed:.1f} s"
    assert balancer.connections[0] > 0 and balancer.connections[1] > 0
    assert balancer.refused > 0  # the dead replica stayed in rotation: retries covered it
    assert retried > 0  # requests in flight on the killed replica, or sent to it after
    assert served <= set(engines) and served
    print(f"replica kill: {failed} of {REQUESTS} failed, {retried} retried, "
          f"{balancer.refused} connections refused after the kill, {elapsed:.1f} s")


async def test_sigterm_fails_readiness_drains_in_flight_and_exits(
        tmp_path: Path, engines: list[str]) -> None:
    endpoints = _write_endpoints(tmp_path / "endpoints.json", engines)
    with _processes() as procs:
        proc, address = _router(endpoints, "--drain-seconds", "1.5")
        procs.append(proc)
        base = f"http://{address}"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/readyz") as r:
                assert r.status == 200

            async def stream() -> bytes:
                async with http.post(f"{base}/v1/completions", json={
                        "model": MODEL, "prompt": "x", "max_tokens": 150, "stream": True}) as r:
                    assert r.status == 200
                    return await r.read()

            in_flight = [asyncio.create_task(stream()) for _ in range(6)]
            await asyncio.sleep(0.3)
            assert not any(t.done() for t in in_flight)
            t_term = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            async with http.get(f"{base}/readyz") as r:  # still listening, not ready
                assert r.status == 503
                assert "shutdown" in (await r.json())["waitingFor"]
            bodies = await asyncio.gather(*in_flight)
            for body in bodies:  # every stream in flight finished whole
                assert body.endswith(b"data: [DONE]\n\n")
                assert body.count(b'"text"') >= 150
            code = await asyncio.to_thread(proc.wait, 20)
            assert code == 0
            assert time.monotonic() - t_term >= 1.5  # the drain delay was served
            with pytest.raises(aiohttp.ClientConnectionError):
                async with http.get(f"{base}/readyz"):
                    pass
