"""Hardening of joulepool's HTTP services (httpserve's contract, on the extender):
huge quantities answer 400 at once, half-sent request heads are cut off, JSON bodies only
as application/json, no NaN/Infinity in or out."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web
from test_extender_robustness import LiveServer, Services

from joulepool import httpserve
from joulepool.extender.settings import Settings
from joulepool.kube import testing as T
from joulepool.router import settings as router_settings

POST_PATHS = ["/scheduler/filter", "/scheduler/prioritize", "/v1/route", "/v1/complete"]


@pytest.fixture(scope="module")
def server() -> Iterator[Services]:
    with LiveServer(Settings(cluster=False, scrape_interval_seconds=0, max_nodes=1000,
                             max_body_bytes=65536)) as ext, \
            LiveServer(router_settings.Settings(cluster=False, scrape_interval_seconds=0,
                                                max_body_bytes=65536)) as router:
        yield Services(ext, router)


def _gpu_pod(quantity: Any) -> dict[str, Any]:
    pod = T.pod("huge", gpus=1)
    pod["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": quantity},
                                                 "requests": {"nvidia.com/gpu": quantity}}
    return pod


HUGE_QUANTITIES = ["1e999999", "1E999999", "9" * 64, "1e30Ei", "99999999999999999999Ei",
                   "-1e999999", "1" + "0" * 5000]


@pytest.mark.parametrize("quantity", HUGE_QUANTITIES, ids=lambda q: q[:16])
@pytest.mark.parametrize("verb", ["filter", "prioritize"])
def test_huge_gpu_quantity_is_400_at_once(server: Services, verb: str, quantity: str) -> None:
    body = json.dumps(T.extender_args(_gpu_pod(quantity), names=["n0", "n1"])).encode()
    t0 = time.perf_counter()
    status, raw, _ = server.request("POST", f"/scheduler/{verb}", body)
    took = time.perf_counter() - t0
    assert status == 400, raw
    assert "quantity" in json.loads(raw)["Error"] or "too long" in json.loads(raw)["Error"]
    assert took < 1.0, f"{took:.2f} s"


@pytest.mark.parametrize("number", [b"1e999999", b"1e400", b"-1e309", b"NaN", b"Infinity"])
def test_non_finite_json_numbers_are_400(server: Services, number: bytes) -> None:
    """Numbers that are not finite doubles (the JSON grammar has no NaN/Infinity;
    1e999999 overflows) are refused wherever they appear."""
    pod = json.dumps(_gpu_pod("PLACEHOLDER")).replace('"PLACEHOLDER"', number.decode())
    body = b'{"Pod": ' + pod.encode() + b', "NodeNames": ["n0"]}'
    status, raw, _ = server.request("POST", "/scheduler/filter", body)
    assert status == 400, raw
    complete = (b'{"pool": "default.chat", "endpoint": "10.0.0.1:8000", "deadlineMet": true,'
                b' "ttftSeconds": ' + number + b"}")
    assert server.request("POST", "/v1/complete", complete)[0] == 400


def test_huge_allocatable_in_full_nodes_form_is_400(server: Services) -> None:
    node = T.node("n9")
    node["status"]["allocatable"]["nvidia.com/gpu"] = "1e999999"
    body = json.dumps(T.extender_args(T.pod("p"), nodes=[node])).encode()
    t0 = time.perf_counter()
    status, raw, _ = server.request("POST", "/scheduler/filter", body)
    assert status == 400 and "allocatable" in json.loads(raw)["Error"], raw
    assert time.perf_counter() - t0 < 1.0


def test_nan_is_never_echoed(server: Services) -> None:
    """The full-Nodes form echoes the Node objects it keeps: a NaN inside one was sent
    back verbatim, which no JSON parser (kube-scheduler's included) accepts."""
    node = json.dumps(T.node("n0")).replace('"annotations": {',
                                            '"annotations": {"x": NaN, ', 1)
    body = b'{"Pod": ' + json.dumps(T.pod("p")).encode() + b', "Nodes": {"items": [' \
        + node.encode() + b"]}}"
    status, raw, _ = server.request("POST", "/scheduler/filter", body)
    assert status == 400, raw
    json.loads(raw, parse_constant=lambda c: pytest.fail(f"{c} in the answer"))


def test_dumps_never_writes_nan() -> None:
    text = httpserve.dumps({"a": math.nan, "b": [math.inf, -math.inf, 1.5]})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(c)) == {
        "a": None, "b": [None, None, 1.5]}


def test_deep_nesting_is_400(server: Services) -> None:
    for depth in (65, 1000, 30000):
        body = b'{"Pod": ' + b"[" * depth + b"]" * depth + b"}"
        status, raw, _ = server.request("POST", "/scheduler/filter", body)
        assert status == 400, raw


@pytest.mark.parametrize("path", POST_PATHS)
@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "text/json"])
def test_json_only_as_application_json(server: Services, path: str,
                                       content_type: str | None) -> None:
    """Browsers send text/plain, form and untyped bodies cross-site without a preflight:
    none of them may reach a handler."""
    body = json.dumps({"pool": "default.chat", "endpoint": "10.0.0.1:8000",
                       "deadlineMet": True}).encode()
    headers = {"Content-Type": content_type} if content_type else {}
    srv = server.router if path.startswith("/v1/") else server.extender
    conn_status = _raw_post(srv.port, path, body, headers)
    assert conn_status == 415


def test_application_json_with_charset_is_accepted(server: Services) -> None:
    body = json.dumps(T.extender_args(T.pod("p"), names=["n0"])).encode()
    status, _, _ = server.request("POST", "/scheduler/filter", body,
                                  {"Content-Type": "application/json; charset=utf-8"})
    assert status == 200


def _raw_post(port: int, path: str, body: bytes, headers: dict[str, str]) -> int:
    """POST with exactly these headers (http.client adds no Content-Type)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, body=body, headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


# -- the server factory -------------------------------------------------------------------

def _half_sent_head_closed_after(port: int, limit: float) -> float:
    """Send half a request head, then wait for the server to close; seconds it took."""
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as s:
        s.sendall(b"POST /v1/route HTTP/1.1\r\nHost: x\r\nContent-Le")
        t0 = time.monotonic()
        try:
            data = s.recv(4096)
        except TimeoutError:
            pytest.fail(f"connection with a half-sent head still open after {limit} s")
        assert data == b"" or data.startswith(b"HTTP/1.1 4"), data
        return time.monotonic() - t0


async def test_start_server_closes_half_sent_heads() -> None:
    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", ok)
    runner = await httpserve.start_server(app, "127.0.0.1", 0, header_timeout_s=0.5)
    try:
        port = runner.addresses[0][1]
        import asyncio

        took = await asyncio.to_thread(_half_sent_head_closed_after, port, 5.0)
        assert took < 2.0
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("command", ["extender", "router"])
def test_process_closes_half_sent_heads_and_keeps_serving(tmp_path: Any, command: str) -> None:
    """The running services (``joulepool extender``, ``joulepool router``) cut off slow
    heads while others are served; before, such a connection was held for as long as
    the client liked."""
    env = {**os.environ, f"JOULEPOOL_{command.upper()}_CLUSTER": "false"}
    plan = tmp_path / "plan.json"
    plan.write_text(T.plan({"default.chat": [("h0", "H100", 2)]}).to_json())
    proc = subprocess.Popen(
        [sys.executable, "-m", "joulepool.cli", command, "--host", "127.0.0.1",
         "--plan-file", str(plan),
         "--port", "0", "--scrape-interval-seconds", "0", "--header-timeout-seconds", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, line + (
            proc.stderr.read() if proc.stderr else "")
        port = int(line.rsplit(":", 1)[1])
        results: list[float] = []
        slow = [threading.Thread(target=lambda: results.append(
            _half_sent_head_closed_after(port, 5.0))) for _ in range(20)]
        for t in slow:
            t.start()
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            assert r.status == 200
        for t in slow:
            t.join(10)
        assert len(results) == 20 and max(results) < 3.0, results
    finally:
        proc.terminate()
        proc.wait(20)


def test_prioritize_with_both_node_forms_reads_nodes_like_filter(server: LiveServer) -> None:
    """Found by the fuzzer: ``Nodes`` present but empty and ``NodeNames`` given made
    prioritize score one list with the other's arrays (500)."""
    body = json.dumps({"Pod": T.pod("p"), "Nodes": {}, "NodeNames": ["n0", "n1"]}).encode()
    status, raw, _ = server.request("POST", "/scheduler/prioritize", body)
    assert status == 200, raw
    assert json.loads(raw) == []
    status, raw, _ = server.request("POST", "/scheduler/filter", body)
    assert status == 200 and json.loads(raw)["Nodes"]["items"] == [], raw
