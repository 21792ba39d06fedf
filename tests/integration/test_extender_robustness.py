"""Bad input never gives a 5xx or a stuck worker; auth, TLS, size limits, concurrency.

Both cluster services: the scheduler extender (``/scheduler/*``) and the routing
service (``/v1/*``), which share their HTTP plumbing (:mod:`joulepool.kube.service`).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from joulepool.extender.app import create_app
from joulepool.extender.settings import Settings
from joulepool.kube import testing as T
from joulepool.kube.service import SERVICE, ssl_context
from joulepool.router import app as router_app
from joulepool.router import settings as router_settings

POST_PATHS = ["/scheduler/filter", "/scheduler/prioritize", "/v1/route", "/v1/complete"]


class LiveServer:
    """A service (the extender unless ``settings`` are the router's) on a real loopback
    port, served from a thread with its own loop."""

    def __init__(self, settings: Settings | router_settings.Settings, seed: bool = True
                 ) -> None:
        if isinstance(settings, router_settings.Settings):
            self.app = router_app.create_app(settings)
        else:
            self.app = create_app(settings)
        if seed:
            st_ = self.app[SERVICE].state
            st_.replace_nodes([T.node("n0", "H100"), T.node("n1", "A100")])
            st_.replace_pods([T.pod("p0", node_name="n0", ready=True, ip="10.0.0.1")])
            st_.set_plan(T.plan({"default.chat": [("n0", "H100", 4), ("n1", "A100", 4)]}))
            for src in ("nodes", "pods", "plan"):
                st_.mark_synced(src)
        self.ssl = ssl_context(settings)
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.port = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        runner = web.AppRunner(self.app, access_log=None)
        self.loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self.ssl)
        self.loop.run_until_complete(site.start())
        self.port = runner.addresses[0][1]
        self.runner = runner
        self.started.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())

    def __enter__(self) -> LiveServer:
        self.thread.start()
        assert self.started.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        if body is not None:  # the JSON endpoints read application/json bodies only
            headers = {"Content-Type": "application/json", **(headers or {})}
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read(), dict(resp.getheaders())
        finally:
            conn.close()


class Services:
    """The extender and the router side by side; a request goes to the one serving its
    path (``/v1/*``: the router)."""

    def __init__(self, extender: LiveServer, router: LiveServer) -> None:
        self.extender = extender
        self.router = router

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
        srv = self.router if path.startswith("/v1/") else self.extender
        return srv.request(method, path, body, headers)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    tmp = tmp_path_factory.mktemp("ep")
    ep = tmp / "ep.json"
    ep.write_text(json.dumps({"pools": {"ns.p": {"endpoints": [
        {"address": "10.9.0.1:8000", "joulesPerToken": 0.2, "tokensPerSecond": 500}]}}}))
    s = Settings(cluster=False, endpoints_file=ep, scrape_interval_seconds=0,
                 max_body_bytes=64 * 1024, max_nodes=1000, reserve_placements=False)
    rs = router_settings.Settings(cluster=False, endpoints_file=ep, scrape_interval_seconds=0,
                                  max_body_bytes=64 * 1024)
    with LiveServer(s) as ext, LiveServer(rs) as router:
        yield Services(ext, router)


def _check(status: int, body: bytes, path: str) -> None:
    assert status < 500, (status, body[:300])
    payload = json.loads(body)  # every answer is JSON
    if status >= 400:
        key = "Error" if path.startswith("/scheduler/") else "error"
        assert isinstance(payload, dict) and payload[key]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
wire_keys = st.sampled_from([
    "Pod", "Nodes", "NodeNames", "pool", "inputTokens", "outputTokens", "tier",
    "deadlineSeconds", "endpoint", "deadlineMet", "joules", "requestId", "metadata", "spec",
    "items", "labels", "containers", "resources", "status", "nodeName",
])
near_wire = st.recursive(
    json_values,
    lambda children: st.dictionaries(wire_keys | st.text(max_size=8), children, max_size=6)
    | st.lists(children, max_size=4),
    max_leaves=30,
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(POST_PATHS), body=near_wire)
def test_generated_json_never_5xx(server: Services, path: str, body: Any) -> None:
    status, raw, _ = server.request("POST", path, json.dumps(body).encode(),
                                    {"Content-Type": "application/json"})
    _check(status, raw, path)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(POST_PATHS), body=st.binary(max_size=300))
def test_generated_bytes_never_5xx(server: Services, path: str, body: bytes) -> None:
    status, raw, _ = server.request("POST", path, body)
    _check(status, raw, path)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    pod=st.fixed_dictionaries({}, optional={
        "metadata": st.fixed_dictionaries({}, optional={
            "name": st.text(max_size=5) | st.integers(),
            "labels": st.dictionaries(st.sampled_from(["joulepool.dev/pool", "a"]),
                                      st.sampled_from(["default.chat", "x.y", ""]) | st.integers(),
                                      max_size=2)}),
        "spec": st.fixed_dictionaries({}, optional={
            "containers": st.lists(st.fixed_dictionaries({"resources": st.fixed_dictionaries(
                {}, optional={"requests": st.dictionaries(
                    st.just("nvidia.com/gpu"),
                    st.sampled_from(["1", "-3", "1e9", "abc", "500m", "", "1Ei"]) | st.integers(),
                    max_size=1)})}), max_size=2)}),
    }),
    names=st.none() | st.lists(st.sampled_from(["n0", "n1", "nx", "", "ñ\"\\"]) | st.text(
        max_size=6), max_size=6),
)
def test_generated_extender_args_never_5xx(server: Services, pod: Any, names: Any) -> None:
    for verb in ("filter", "prioritize"):
        body = json.dumps({"Pod": pod, "Nodes": None, "NodeNames": names}).encode()
        status, raw, _ = server.request("POST", f"/scheduler/{verb}", body)
        _check(status, raw, f"/scheduler/{verb}")
        if status == 200 and verb == "prioritize":
            out = json.loads(raw)
            assert [h["Host"] for h in out] == (names or [])
            assert all(0 <= h["Score"] <= 10 for h in out)


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/scheduler/filter", b"", 400),
        ("/scheduler/filter", b"{", 400),
        ("/scheduler/filter", b"[]", 400),
        ("/scheduler/filter", b'{"Pod": 5}', 400),
        ("/scheduler/filter", b'{"Pod": {}, "NodeNames": "n0"}', 400),
        ("/scheduler/prioritize", b'{"Pod": {}, "NodeNames": [1, 2]}', 400),
        ("/scheduler/filter", b"\xff\xfe", 400),
        ("/scheduler/filter", b"[" * 60000, 400),
        ("/v1/route", b'{"pool": "ns.p"}', 400),
        ("/v1/route", b'{"pool": "ns.p", "outputTokens": "12"}', 400),
        ("/v1/route", b'{"pool": "ns.p", "outputTokens": -1}', 400),
        ("/v1/route", b'{"pool": "ns.p", "outputTokens": 1, "tier": "gold"}', 400),
        ("/v1/route", b'{"pool": "ns.p", "outputTokens": 1, "deadlineSeconds": NaN}', 400),
        ("/v1/route", b'{"pool": 3, "outputTokens": 1}', 400),
        ("/v1/route", b'{"pool": "nope", "outputTokens": 1}', 404),
        ("/v1/complete", b'{"pool": "ns.p", "endpoint": "x"}', 400),
        ("/v1/complete", b'{"pool": "ns.p", "endpoint": "x", "deadlineMet": "yes"}', 400),
        ("/v1/complete", b'{"pool": "ns.p", "endpoint": "x", "deadlineMet": true}', 200),
    ],
)
def test_malformed_bodies(server: Services, path: str, body: bytes, status: int) -> None:
    got, raw, _ = server.request("POST", path, body)
    assert got == status, raw
    _check(got, raw, path)


def test_size_limits(server: Services) -> None:
    big = json.dumps({"Pod": {}, "NodeNames": ["n" * 100] * 1000}).encode()
    status, raw, _ = server.request("POST", "/scheduler/filter", big)
    assert status == 413 and "limit" in json.loads(raw)["Error"]
    many = json.dumps({"Pod": {}, "NodeNames": ["n"] * 1001}).encode()
    status, raw, _ = server.request("POST", "/scheduler/prioritize", many)
    assert status == 413 and "--max-nodes" in json.loads(raw)["Error"]
    status, raw, _ = server.request("POST", "/v1/route", b"x" * 70000)
    assert status == 413
    # chunked upload without Content-Length is cut off at the limit too
    conn = http.client.HTTPConnection("127.0.0.1", server.router.port, timeout=10)
    conn.putrequest("POST", "/v1/route")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    for _ in range(20):
        chunk = b"y" * 8192
        try:
            conn.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        except OSError:
            break
    with contextlib.suppress(OSError):
        conn.send(b"0\r\n\r\n")
    resp = conn.getresponse()
    assert resp.status == 413
    conn.close()
    # the services are still healthy afterwards
    assert server.extender.request("GET", "/healthz")[0] == 200
    assert server.router.request("GET", "/healthz")[0] == 200


def test_wrong_method_and_path(server: Services) -> None:
    status, raw, headers = server.request("GET", "/scheduler/filter")
    assert status == 405 and json.loads(raw)["Error"] and "POST" in headers.get("Allow", "")
    status, raw, _ = server.request("GET", "/nope")
    assert status == 404 and json.loads(raw)["error"]


async def test_concurrent_requests_are_consistent(server: Services) -> None:
    base = f"http://127.0.0.1:{server.extender.port}"
    router_base = f"http://127.0.0.1:{server.router.port}"
    pool = server.router.app[SERVICE].router.pool("ns.p")
    before = sum(len(e.ledger) for e in pool.endpoints)
    filt = T.extender_args(T.pod("c", gpus=1), names=["n0", "n1", "n2"])
    prio = T.extender_args(T.pod("c", gpus=1), names=["n0", "n1"])
    async with aiohttp.ClientSession() as s:

        async def one(i: int) -> int:
            if i % 3 == 0:
                r = await s.post(router_base + "/v1/route",
                                 json={"pool": "ns.p", "outputTokens": 10})
            elif i % 3 == 1:
                r = await s.post(base + "/scheduler/filter", json=filt)
                assert (await r.json())["NodeNames"] == ["n0", "n1"]
            else:
                r = await s.post(base + "/scheduler/prioritize", json=prio)
                assert [h["Host"] for h in await r.json()] == ["n0", "n1"]
            await r.read()
            return r.status

        statuses = await asyncio.gather(*(one(i) for i in range(300)))
    assert set(statuses) == {200}
    # every routed request is in the ledger exactly once (no lost updates)
    assert sum(len(e.ledger) for e in pool.endpoints) == before + 100


def test_bearer_token(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    s = Settings(cluster=False, scrape_interval_seconds=0, token_file=token)
    with LiveServer(s) as srv:
        body = json.dumps(T.extender_args(T.pod("p"), names=["n0"])).encode()
        status, _, headers = srv.request("POST", "/scheduler/filter", body)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        assert srv.request("GET", "/metrics")[0] == 401
        assert srv.request("POST", "/v1/route", b"{}",
                           {"Authorization": "Bearer wrong"})[0] == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert srv.request("POST", "/scheduler/filter", body, ok)[0] == 200
        assert srv.request("GET", "/metrics", None, ok)[0] == 200
        assert srv.request("GET", "/healthz")[0] == 200
        assert srv.request("GET", "/readyz")[0] == 200
    # scope "router": kube-scheduler's verbs are open, the router API is not
    s = Settings(cluster=False, scrape_interval_seconds=0, token_file=token,
                 token_scope="router")
    with LiveServer(s) as srv:
        body = json.dumps(T.extender_args(T.pod("p"), names=["n0"])).encode()
        assert srv.request("POST", "/scheduler/filter", body)[0] == 200
        assert srv.request("POST", "/v1/route", b"{}")[0] == 401
    # the routing service: every path but /healthz and /readyz needs the token
    rs = router_settings.Settings(cluster=False, scrape_interval_seconds=0, token_file=token)
    with LiveServer(rs) as srv:
        assert srv.request("POST", "/v1/route", b"{}")[0] == 401
        assert srv.request("POST", "/v1/route", b"{}",
                           {"Authorization": "Bearer wrong"})[0] == 401
        assert srv.request("GET", "/metrics")[0] == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert srv.request("POST", "/v1/route", b'{"pool": "x", "outputTokens": 1}', ok)[0] == 404
        assert srv.request("GET", "/metrics", None, ok)[0] == 200
        assert srv.request("GET", "/healthz")[0] == 200


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_tls(tmp_path: Path) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    s = Settings(cluster=False, scrape_interval_seconds=0, tls_cert=cert, tls_key=key,
                 reserve_placements=False)
    with LiveServer(s) as srv:
        ctx = ssl.create_default_context(cafile=str(cert))
        conn = http.client.HTTPSConnection("127.0.0.1", srv.port, context=ctx, timeout=10)
        body = json.dumps(T.extender_args(T.pod("p"), names=["n0", "n1"]))
        conn.request("POST", "/scheduler/filter", body=body,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["NodeNames"] == ["n0", "n1"]
        conn.close()
        # plain HTTP to the TLS port gets nowhere
        with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
            srv.request("GET", "/healthz")


def test_slow_body_times_out_without_blocking_others() -> None:
    import socket

    s = router_settings.Settings(cluster=False, scrape_interval_seconds=0,
                                 read_timeout_seconds=0.3)
    with LiveServer(s) as srv:
        slow = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        slow.sendall(b"POST /v1/route HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                     b"Content-Type: application/json\r\n\r\n{")
        # others are served while the slow body trickles
        assert srv.request("GET", "/healthz")[0] == 200
        answer = slow.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408") and b"not received" in answer
        slow.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_mutual_tls(tmp_path: Path) -> None:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp_path)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.crt")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"),
                      ("client", "extendedKeyUsage=clientAuth")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr")
        (tmp_path / f"{name}.ext").write_text(ext + "\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.crt")
    s = Settings(cluster=False, scrape_interval_seconds=0, tls_cert=tmp_path / "server.crt",
                 tls_key=tmp_path / "server.key", tls_client_ca=tmp_path / "ca.crt")
    with LiveServer(s) as srv:
        def get(with_cert: bool) -> int:
            ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
            if with_cert:
                ctx.load_cert_chain(str(tmp_path / "client.crt"), str(tmp_path / "client.key"))
            conn = http.client.HTTPSConnection("127.0.0.1", srv.port, context=ctx, timeout=10)
            try:
                conn.request("GET", "/readyz")
                return conn.getresponse().status
            finally:
                conn.close()

        assert get(with_cert=True) == 200
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            get(with_cert=False)
