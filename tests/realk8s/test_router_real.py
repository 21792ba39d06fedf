"""``joulepool router`` with the chart's own arguments, on the chart's router
ServiceAccount token, against the real API server: it finds the pool's serving pods,
answers only with the chart's bearer token, and is never denied by RBAC."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Any

import k8slib
from k8slib import Components, ControlPlane

from joulepool.api.contract import MODE_LABEL, POOL_LABEL
from joulepool.api.plan import PLAN_CONFIGMAP, PLAN_KEY
from joulepool.kube import testing as T


def _chart_router_args(chart: Any, port: int, token_file: str) -> list[str]:
    """The router container's args as the chart renders them, made local: loopback
    address and a free port, the namespace, the token file where this test wrote it."""
    (container,) = chart.get("Deployment", k8slib.service_account("router"))[
        "spec"]["template"]["spec"]["containers"]
    args = [a.replace("$(POD_NAMESPACE)", k8slib.RELEASE_NAMESPACE) for a in container["args"]]
    args[args.index("--host") + 1] = "127.0.0.1"
    args[args.index("--port") + 1] = str(port)
    args[args.index("--token-file") + 1] = token_file
    if "--epp-port" in args:  # the picker's gRPC port: a free one too
        args[args.index("--epp-port") + 1] = str(k8slib.free_port())
    return args


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
    secret = chart.get("Secret", k8slib.service_account("router") + "-token")
    token = base64.b64decode(secret["data"]["token"]).decode()
    token_file = cluster.run_dir / "router-token"
    token_file.write_text(token)
    # a pool with one serving pod on a fake node (bound directly: no scheduler needed)
    node = f"router-h100-{k8slib.free_port()}"
    nodes.append(node)
    cluster.create_node(k8slib.gpu_node(node, "H100", 8))
    pool = f"{namespace}.chat"
    cluster.apply({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": PLAN_CONFIGMAP, "namespace": k8slib.RELEASE_NAMESPACE},
                   "data": {PLAN_KEY: T.plan({pool: [(node, "H100", 1)]}, version=900)
                            .to_json()}})
    cluster.core.create_namespaced_pod(namespace, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "chat-0", "labels": {POOL_LABEL: pool, MODE_LABEL: "1xH100"}},
        "spec": {"nodeName": node, "containers": [{
            "name": "engine", "image": "engine:test",
            "ports": [{"name": "http", "containerPort": 8000}],
            "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}})
    ip = k8slib.wait_for("the serving pod's IP", lambda: cluster.core.read_namespaced_pod(
        "chat-0", namespace).status.pod_ip)

    port = k8slib.free_port()
    router = procs.joulepool("router", _chart_router_args(chart, port, str(token_file)),
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
