"""``joulepool router`` with the chart's own arguments, on the chart's router
ServiceAccount token, against the real API server: it finds the pool's serving pods,
answers only with the chart's bearer token, and is never denied by RBAC."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import k8slib
from k8slib import Components, ControlPlane


def _call(base: str, path: str, body: Any = None, token: str | None = None
          ) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, headers=headers,
                                 method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_router_on_its_service_account_with_the_charts_token(
        cluster: ControlPlane, chart: Any, procs: Components, namespace: str,
        nodes: list[str]) -> None:
    token = k8slib.router_token(chart)
    token_file = cluster.run_dir / "router-token"
    token_file.write_text(token)
    # a pool with one serving pod on a fake node (bound directly: no scheduler needed)
    serving = k8slib.serving_pool(cluster, namespace, nodes, "router", version=900)
    pool, ip = serving.pool, serving.ip

    port = k8slib.free_port()
    router = procs.joulepool("router", k8slib.chart_router_args(chart, port, str(token_file)),
                             service_account=k8slib.service_account("router"))
    router.wait_log("listening on", timeout=60)
    base = f"http://127.0.0.1:{port}"
    assert _call(base, "/healthz")[0] == 200  # probes need no token
    request = {"pool": pool, "inputTokens": 64, "outputTokens": 32}
    status, _ = _call(base, "/v1/route", request)
    assert status == 401
    assert _call(base, "/v1/route", request, token="wrong")[0] == 401

    def routed() -> Any:
        status, answer = _call(base, "/v1/route", request, token=token)
        return answer if status == 200 else None

    answer = k8slib.wait_for("a routing decision", routed, timeout=30, interval=0.3)
    assert answer["endpoint"] == f"{ip}:8000"
    assert _call(base, "/v1/complete", {"pool": pool, "endpoint": answer["endpoint"],
                                        "deadlineMet": True})[0] == 401
    status, _ = _call(base, "/v1/complete", {"pool": pool, "endpoint": answer["endpoint"],
                                             "deadlineMet": True, "outputTokens": 32,
                                             "e2eSeconds": 0.5}, token=token)
    assert status == 200
    assert router.forbidden_lines() == []
