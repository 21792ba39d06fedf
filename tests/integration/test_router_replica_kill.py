"""Two router replicas behind a Service, one killed under load; and graceful SIGTERM.

The kill run is :mod:`joulepool.fakes.replicakill`'s (real ``joulepool router``
processes in front of fake engines, a connection-level round-robin balancer playing the
Service, the real OpenAI SDK with its retries); ``joulepool bench router_replica_kill``
runs larger ones.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from joulepool.core.profiles import H100_8B
from joulepool.fakes.engine import FakeEngine, build_app
from joulepool.fakes.replicakill import (
    ReplicaKillSettings,
    processes,
    run_replica_kill,
    start_router,
    write_endpoints,
)

MODEL = H100_8B.model


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


async def test_a_replica_killed_under_load_loses_under_a_thousandth(tmp_path: Path) -> None:
    # the SDK's default retries; the Service notices the dead replica within ~1 s
    report = await run_replica_kill(tmp_path, ReplicaKillSettings(requests=1200,
                                                                  concurrency=24))
    print(f"replica kill: {report.to_json()}")
    assert report.done == report.requests == 1200 and report.killed_at is not None
    assert report.failure_ratio < 1e-3, report.to_json()
    assert report.killed_exit == -signal.SIGKILL and report.survivor_alive
    assert report.connections[0] > 0 and report.connections[1] > 0  # both served
    assert report.retried > 0  # requests in flight on the killed replica were retried
    assert report.served_by


async def test_a_dead_replica_left_in_rotation_costs_retries_not_requests(
        tmp_path: Path) -> None:
    """The harsher case: the Service never drops the dead replica, so new connections
    keep being refused by it; five retries still lose none."""
    report = await run_replica_kill(tmp_path, ReplicaKillSettings(
        requests=600, concurrency=16, max_retries=5, probe_period_s=0.0))
    print(f"replica kill, dead replica kept: {report.to_json()}")
    assert report.done == 600 and report.killed_at is not None
    assert report.failure_ratio < 1e-3, report.to_json()
    assert report.refused > 0 and report.retried > 0


async def test_sigterm_fails_readiness_drains_in_flight_and_exits(
        tmp_path: Path, engines: list[str]) -> None:
    endpoints = write_endpoints(tmp_path / "endpoints.json", engines)
    with processes() as procs:
        proc, address = start_router(endpoints, "--drain-seconds", "1.5")
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
