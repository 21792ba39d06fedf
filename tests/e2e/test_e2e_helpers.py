"""The e2e scenario's own assumptions, checked without a cluster: the pool it
applies is valid, and the metric names it waits for are the node agent's."""

from __future__ import annotations

import pytest
from e2elib import metric_sum, pool_manifest

from joulepool.api.load import parse_resource
from joulepool.api.plan import pool_key


def test_the_e2e_pool_is_valid() -> None:
    pool = parse_resource(pool_manifest("jp-e2e-abcdef", "e2e"))
    assert len(pool_key("jp-e2e-abcdef", "e2e")) <= 63  # fits the pool label
    assert pool.spec.template["spec"]["containers"][0]["args"][0] == "fake-engine"  # type: ignore[attr-defined]


def test_metric_names_are_the_node_agents() -> None:
    metrics = pytest.importorskip("joulepool.nodeagent.metrics",
                                  reason="the node agent is not in this build")
    m = metrics.AgentMetrics("node-a")
    labels = m.gpu(0, "H100")
    m.decisions.labels(*labels, "down").inc(3)
    m.gpu_samples = lambda: [metrics.GPUSample(
        ("0", "GPU-1", "NVIDIA H100 80GB HBM3", "H100", "node-a", "", "", ""), 700.0, 12.5,
        1.98e9)]
    m.target_clock.labels(*labels).set(1.5e9)
    text = m.render().decode()
    assert metric_sum(text, "joulepool_miad_decisions_total") == 3
    assert metric_sum(text, "joulepool_gpu_energy_joules_total") == 12.5
    assert metric_sum(text, "joulepool_gpu_target_clock_hertz") == 1.5e9
    assert metric_sum(text, "joulepool_gpu_sm_clock_hertz") == 1.98e9
    assert metric_sum(text, "joulepool_sidecar_monitor_only") == 0


def test_metric_sum_matches_whole_names() -> None:
    text = "a_total 1\na_total{x=\"1\"} 2\na_total_created 99\nb 5\n"
    assert metric_sum(text, "a_total") == 3


def _serve(handler_cls: type) -> tuple[str, object]:
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


def test_probe_http_client_script() -> None:
    """The script the probe pod runs for every in-cluster call (e2elib.HTTP_CLIENT): body,
    bearer token, any status as data, a refused connection as status 0."""
    import http.server
    import json
    import subprocess
    import sys

    from e2elib import HTTP_CLIENT

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            n = int(self.headers.get("Content-Length", 0))
            body = self.rfile.read(n)
            ok = self.headers.get("Authorization") == "Bearer s3cret"
            payload = json.dumps({"got": json.loads(body),
                                  "type": self.headers.get("Content-Type")}).encode()
            self.send_response(200 if ok else 401)
            self.end_headers()
            self.wfile.write(payload if ok else b'{"error": "missing or wrong bearer token"}')

        def log_message(self, *args: object) -> None:
            pass

    url, server = _serve(Handler)

    def call(*argv: str) -> dict[str, object]:
        out = subprocess.run([sys.executable, "-c", HTTP_CLIENT, *argv], check=True,
                             capture_output=True, text=True, timeout=30).stdout
        answer: dict[str, object] = json.loads(out.strip().splitlines()[-1])
        return answer

    try:
        ok = call("POST", url + "/v1/route", json.dumps({"pool": "a.b"}), "s3cret", "5")
        assert ok["status"] == 200
        assert json.loads(str(ok["body"])) == {"got": {"pool": "a.b"},
                                               "type": "application/json"}
        assert call("POST", url + "/v1/route", "{}", "", "5")["status"] == 401
        assert call("POST", url + "/v1/route", "{}")["status"] == 401
    finally:
        server.shutdown()  # type: ignore[attr-defined]
    refused = call("GET", url + "/metrics", "-", "", "2")
    assert refused["status"] == 0 and refused["body"]


def test_probe_pod_is_a_router_client_in_the_metrics_namespace() -> None:
    """The probe pod is admitted by the chart's default NetworkPolicies: namespace
    'monitoring' (networkPolicy.metricsFrom, also in the router's rule) and the
    router-client label (networkPolicy.routerFrom)."""
    import sys

    from e2elib import PROBE_NAMESPACE, ROOT, ROUTER_CLIENT_LABEL, probe_pod_manifest

    sys.path.insert(0, str(ROOT / "tests" / "chart"))
    from chartlib import rendered

    values = rendered("kind")
    policies = {p["metadata"]["name"]: p for p in values.all("NetworkPolicy")}
    router = policies["joulepool-router"]["spec"]["ingress"][0]["from"]
    agent = policies["joulepool-node-agent"]["spec"]["ingress"][0]["from"]
    in_monitoring = {"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": PROBE_NAMESPACE}}}
    assert in_monitoring in router and in_monitoring in agent
    pod = probe_pod_manifest()
    assert pod["metadata"]["namespace"] == PROBE_NAMESPACE
    assert pod["metadata"]["labels"][ROUTER_CLIENT_LABEL] == "true"
    assert pod["spec"]["containers"][0]["imagePullPolicy"] == "Never"  # side-loaded on kind
