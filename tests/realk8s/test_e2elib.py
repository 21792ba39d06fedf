"""tests/e2e's raw API-server calls (``e2elib.Cluster.proxy``) against a real API server,
so the e2e suite's node agent, router and delete steps cannot break on the installed
kubernetes client again (37.x changed ``ApiClient.call_api``)."""

from __future__ import annotations

import json
import sys
from typing import Any

import k8slib
from k8slib import ControlPlane

sys.path.insert(0, str(k8slib.ROOT / "tests" / "e2e"))
import e2elib


def _cluster(cp: ControlPlane) -> e2elib.Cluster:
    from kubernetes import client

    api = cp.api_client()
    return e2elib.Cluster(api, client.CoreV1Api(api), client.AppsV1Api(api),
                          client.CustomObjectsApi(api), None)


def test_proxy_get_post_and_errors(cluster: ControlPlane, namespace: str) -> None:
    c = _cluster(cluster)
    status, text = c.proxy("GET", f"/api/v1/namespaces/{namespace}")
    assert status == 200 and json.loads(text)["metadata"]["name"] == namespace
    body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "probe"},
            "data": {"k": "v"}}
    status, text = c.proxy("POST", f"/api/v1/namespaces/{namespace}/configmaps", body)
    assert status == 201, text
    assert cluster.core.read_namespaced_config_map("probe", namespace).data == {"k": "v"}
    # errors come back as (status, text), not as exceptions
    status, text = c.proxy("GET", f"/api/v1/namespaces/{namespace}/configmaps/absent")
    assert status == 404 and json.loads(text)["reason"] == "NotFound"
    status, text = c.proxy("POST", f"/api/v1/namespaces/{namespace}/configmaps", body)
    assert status == 409


def test_proxy_to_a_service_reports_the_api_servers_answer(
        cluster: ControlPlane, namespace: str) -> None:
    """The e2e router step's path shape (service proxy): here no endpoint exists, and
    the API server's 503 comes back as a status."""
    cluster.core.create_namespaced_service(namespace, {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "router"},
        "spec": {"ports": [{"name": "http", "port": 8888}], "selector": {"app": "none"}}})
    c = _cluster(cluster)
    path = f"/api/v1/namespaces/{namespace}/services/router:http/proxy/v1/route"
    body = {"pool": "x.y", "inputTokens": 1, "outputTokens": 1}
    # the proxy finds a new Service through the API server's cache: 404 until then
    status, text = k8slib.wait_for("the service proxy to know the Service", lambda: (
        answer if (answer := c.proxy("POST", path, body))[0] != 404 else None), timeout=30)
    assert status == 503, (status, text)


def test_router_token_url_and_probe_pod_on_the_real_api(
        cluster: ControlPlane, chart: Any, namespace: str) -> None:
    """What the e2e router step reads (the chart's router Secret and Service, applied as
    rendered) and the probe pod it creates (accepted by the API server's validation)."""
    import base64

    secret = chart.get("Secret", e2elib.RELEASE + "-router-token")
    svc = chart.get("Service", e2elib.RELEASE + "-router")
    cluster.apply_all([secret, svc], k8slib.RELEASE_NAMESPACE)
    c = _cluster(cluster)
    assert c.router_token() == base64.b64decode(secret["data"]["token"]).decode()
    port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "http")
    assert c.router_url() == (f"http://{e2elib.RELEASE}-router."
                              f"{e2elib.NAMESPACE}.svc:{port}")
    pod = e2elib.probe_pod_manifest()
    pod["metadata"]["namespace"] = namespace
    made = cluster.core.create_namespaced_pod(namespace, pod)
    assert made.metadata.labels[e2elib.ROUTER_CLIENT_LABEL] == "true"
