"""``joulepool router`` with the chart's own arguments, on the chart's router
ServiceAccount token, against the real API server: it finds the pool's serving pods,
answers only with the chart's bearer token, and is never denied by RBAC."""

from __future__ import annotations

from typing import Any

import k8slib
from k8slib import Components, ControlPlane


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
    assert k8slib.call_json(base, "/healthz")[0] == 200  # probes need no token
    request = {"pool": pool, "inputTokens": 64, "outputTokens": 32}
    status, _ = k8slib.call_json(base, "/v1/route", request)
    assert status == 401
    assert k8slib.call_json(base, "/v1/route", request, token="wrong")[0] == 401

    def routed() -> Any:
        status, answer = k8slib.call_json(base, "/v1/route", request, token=token)
        return answer if status == 200 else None

    answer = k8slib.wait_for("a routing decision", routed, timeout=30, interval=0.3)
    assert answer["endpoint"] == f"{ip}:8000"
    done = {"pool": pool, "endpoint": answer["endpoint"], "deadlineMet": True}
    assert k8slib.call_json(base, "/v1/complete", done)[0] == 401
    status, _ = k8slib.call_json(base, "/v1/complete", {**done, "outputTokens": 32,
                                                        "e2eSeconds": 0.5}, token=token)
    assert status == 200
    assert router.forbidden_lines() == []
