"""The operator's API client: retries with backoff on 5xx/429/timeouts, 401 re-login, errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import kopf
import pytest
from aiohttp import web

from joulepool.operator.kube import ApiError, KubeClient, path_for


class Script:
    """A tiny HTTP server answering from a per-path script of (status, body, delay)."""

    def __init__(self) -> None:
        self.script: dict[str, list[tuple[int, Any, float]]] = {}
        self.seen: list[tuple[str, str, str, str]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.method, request.path, request.headers.get("Content-Type", ""),
                          request.headers.get("Authorization", "")))
        steps = self.script.get(request.path) or [(200, {"ok": True}, 0.0)]
        status, body, delay = steps.pop(0) if len(steps) > 1 else steps[0]
        await asyncio.sleep(delay)
        if isinstance(body, dict):
            return web.json_response(body, status=status)
        return web.Response(text=str(body), status=status)


@pytest.fixture
async def server() -> AsyncIterator[tuple[Script, str]]:
    script = Script()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", script.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield script, f"http://127.0.0.1:{port}"
    await runner.cleanup()


def client(url: str, **kw: Any) -> KubeClient:
    c = KubeClient(retry_delays=(0.01, 0.01, 0.01), **kw)
    c.set_connection(kopf.ConnectionInfo(server=url, token="t0"))
    return c


def test_path_for() -> None:
    assert path_for("v1", "configmaps", "ns", "a b") == "/api/v1/namespaces/ns/configmaps/a%20b"
    assert path_for("apps/v1", "deployments", "ns") == "/apis/apps/v1/namespaces/ns/deployments"
    assert path_for("joulepool.dev/v1alpha1", "inferencepools", "ns", "p", "status") == (
        "/apis/joulepool.dev/v1alpha1/namespaces/ns/inferencepools/p/status")
    assert path_for("v1", "nodes") == "/api/v1/nodes"


async def test_5xx_and_429_are_retried_then_succeed(server: tuple[Script, str]) -> None:
    script, url = server
    script.script["/x"] = [(503, {"reason": "Unavailable"}, 0), (429, "slow down", 0),
                           (500, {}, 0), (200, {"v": 1}, 0)]
    c = client(url)
    assert await c.patch("/x", {"a": 1}) == {"v": 1}
    assert c.retries == 3 and c.calls == 4
    assert {s[2] for s in script.seen} == {"application/merge-patch+json"}
    assert {s[3] for s in script.seen} == {"Bearer t0"}
    await c.close()


async def test_retries_are_bounded(server: tuple[Script, str]) -> None:
    script, url = server
    script.script["/x"] = [(500, {"reason": "InternalError", "message": "boom"}, 0)]
    c = client(url)
    with pytest.raises(ApiError) as err:
        await c.get("/x")
    assert err.value.status == 500 and "boom" in str(err.value)
    assert c.calls == 4  # one try and three retries
    await c.close()


@pytest.mark.parametrize("status", [404, 409, 422, 403])
async def test_client_errors_are_not_retried(server: tuple[Script, str], status: int) -> None:
    script, url = server
    script.script["/x"] = [(status, {"reason": "R"}, 0)]
    c = client(url)
    with pytest.raises(ApiError) as err:
        await c.create("/x", {})
    assert err.value.status == status and c.calls == 1
    assert err.value.conflict == (status == 409) and err.value.not_found == (status == 404)
    await c.close()


async def test_timeouts_are_retried(server: tuple[Script, str]) -> None:
    script, url = server
    script.script["/x"] = [(200, {"late": 1}, 1.0), (200, {"v": 2}, 0)]
    c = client(url, request_timeout=0.2)
    assert await c.get("/x") == {"v": 2}
    assert c.retries == 1
    await c.close()


async def test_401_logs_in_again_once(server: tuple[Script, str]) -> None:
    script, url = server
    script.script["/x"] = [(401, {"reason": "Unauthorized"}, 0), (200, {"v": 3}, 0)]

    async def relogin() -> Any:
        return kopf.ConnectionInfo(server=url, token="t1")

    c = client(url, relogin=relogin)
    assert await c.get("/x") == {"v": 3}
    assert [s[3] for s in script.seen] == ["Bearer t0", "Bearer t1"]
    await c.close()


async def test_delete_asks_for_background_propagation(server: tuple[Script, str]) -> None:
    script, url = server
    c = client(url)
    await c.delete("/x")
    assert script.seen[0][:2] == ("DELETE", "/x")
    await c.close()


async def test_retry_after_on_429_is_honoured() -> None:
    """kube-apiserver's 429 says how long to back off; the client waits at least that
    (old code retried after its own 10 ms, hammering an overloaded server)."""
    import time

    calls: list[float] = []  # a 429 with a Retry-After header: a server of its own

    async def handle(request: web.Request) -> web.StreamResponse:
        calls.append(time.monotonic())
        if len(calls) == 1:
            return web.json_response({"reason": "TooManyRequests", "message": "slow down"},
                                     status=429, headers={"Retry-After": "1"})
        return web.json_response({"ok": True})

    inner = web.Application()
    inner.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(inner)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        c = client(f"http://127.0.0.1:{port}")
        assert await c.get("/api/v1/nodes") == {"ok": True}
        await c.close()
    finally:
        await runner.cleanup()
    assert len(calls) == 2 and calls[1] - calls[0] >= 0.95


def test_retry_after_header_parsing() -> None:
    from joulepool.operator.kube import retry_after_seconds

    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(" 0 ") == 0.0
    assert retry_after_seconds(None) is None
    for bad in ("soon", "-1", "nan", "inf", "Wed, 21 Oct 2015 07:28:00 GMT"):
        assert retry_after_seconds(bad) is None


async def test_apply_is_server_side_apply_with_the_field_manager(
        server: tuple[Script, str]) -> None:
    script, url = server
    c = client(url)
    await c.apply("/apis/apps/v1/namespaces/ns/deployments/d",
                  {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}})
    await c.close()
    method, path, ctype, _ = script.seen[-1]
    assert (method, path, ctype) == ("PATCH", "/apis/apps/v1/namespaces/ns/deployments/d",
                                     "application/apply-patch+yaml")
