"""Least privilege in the chart: a NetworkPolicy for every joulepool pod (the extender
reachable only inside the scheduler pod, the router from the configured clients, metrics
from the monitoring namespace) and the router's bearer token on by default."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from chartlib import VALUE_SETS, Rendered, name, render_raw, rendered

from joulepool.api.contract import EPP_PORT, ROUTER_PORT

PEERS_MONITORING = [{"namespaceSelector": {"matchLabels": {
    "kubernetes.io/metadata.name": "monitoring"}}}]


def _pod_templates(r: Rendered) -> list[tuple[str, dict[str, Any]]]:
    """(workload name, pod template) of every Deployment, DaemonSet and Job."""
    out = []
    for o in r.objects():
        if o["kind"] in ("Deployment", "DaemonSet", "Job"):
            out.append((f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]))
    return out


def _selects(policy: dict[str, Any], labels: dict[str, str]) -> bool:
    sel = policy["spec"]["podSelector"]
    assert set(sel) <= {"matchLabels"}, sel  # no expressions: the check below is complete
    return all(labels.get(k) == v for k, v in sel.get("matchLabels", {}).items())


def _ports(policy: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    """port -> peers allowed to reach it."""
    out: dict[int, list[dict[str, Any]]] = {}
    for rule in policy["spec"].get("ingress") or []:
        assert rule.get("from"), f"{policy['metadata']['name']}: a rule open to everyone"
        for p in rule["ports"]:
            out.setdefault(p["port"], []).extend(rule["from"])
    return out


@pytest.mark.parametrize("key", sorted(k for k in VALUE_SETS if k != "kind"))
def test_every_pod_is_selected_by_exactly_one_policy(key: str) -> None:
    r = rendered(key)
    policies = r.all("NetworkPolicy")
    for workload, template in _pod_templates(r):
        labels = template["metadata"]["labels"]
        hits = [p["metadata"]["name"] for p in policies if _selects(p, labels)]
        assert len(hits) == 1, (workload, hits)
    for p in policies:
        assert p["spec"]["policyTypes"] == ["Ingress"]


def test_extender_port_is_reachable_only_inside_the_scheduler_pod(
        default_render: Rendered) -> None:
    values_port = 8888  # scheduler.extender.port; the sidecar binds 127.0.0.1
    sched = default_render.get("NetworkPolicy", name("scheduler"))
    assert set(_ports(sched)) == {10259}  # kube-scheduler's secure port, for metrics only
    assert _ports(sched)[10259] == PEERS_MONITORING
    deployment = default_render.get("Deployment", name("scheduler"))
    (ext,) = [c for c in deployment["spec"]["template"]["spec"]["containers"]
              if c["name"] == "extender"]
    args = ext["args"]
    assert args[args.index("--host") + 1] == "127.0.0.1"
    assert int(args[args.index("--port") + 1]) == values_port
    assert not any(c.get("ports") for c in [ext])


def test_router_open_to_its_clients_and_monitoring_only(default_render: Rendered) -> None:
    policy = default_render.get("NetworkPolicy", name("router"))
    ports = _ports(policy)
    assert set(ports) == {ROUTER_PORT, EPP_PORT}
    peers = ports[ROUTER_PORT]
    clients = [
        {"namespaceSelector": {"matchLabels": {"joulepool.dev/router-client": "true"}}},
        {"podSelector": {"matchLabels": {"joulepool.dev/router-client": "true"}}},
    ]
    assert all(c in peers for c in clients)
    assert PEERS_MONITORING[0] in peers
    # the endpoint picker's unauthenticated gRPC port: the gateway (router clients) only
    assert all(c in ports[EPP_PORT] for c in clients)
    assert PEERS_MONITORING[0] not in ports[EPP_PORT]


def test_metrics_ports_open_to_monitoring_only(default_render: Rendered) -> None:
    """... and the node agents' to the router too: it reads each serving pod's GPU energy
    there (the proxy's measured J/token)."""
    operator = _ports(default_render.get("NetworkPolicy", name("operator")))
    agent = _ports(default_render.get("NetworkPolicy", name("node-agent")))
    assert operator == {9402: PEERS_MONITORING}
    router_pods = default_render.get("Deployment", name("router"))["spec"]["selector"]
    assert agent == {9400: [*PEERS_MONITORING, {"podSelector": router_pods}]}


def test_peers_come_from_values_and_empty_peers_open_nothing() -> None:
    gateway = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name":
                                                       "gateway"}}}]
    r = Rendered(render_raw({"networkPolicy": {"routerFrom": gateway, "metricsFrom": []}}))
    assert _ports(r.get("NetworkPolicy", name("router"))) == {ROUTER_PORT: gateway,
                                                               EPP_PORT: gateway}
    for component in ("operator", "scheduler"):
        policy = r.get("NetworkPolicy", name(component))
        assert policy["spec"]["ingress"] == [], component  # deny all, never allow all
    router_pods = r.get("Deployment", name("router"))["spec"]["selector"]
    assert _ports(r.get("NetworkPolicy", name("node-agent"))) == {
        9400: [{"podSelector": router_pods}]}  # the router only
    off = Rendered(render_raw({"networkPolicy": {"enabled": False}}))
    assert off.all("NetworkPolicy") == []


def test_pods_without_a_server_accept_nothing() -> None:
    r = rendered("fake-gpus")
    for component in ("device-plugin", "node-agent-reset"):
        assert r.get("NetworkPolicy", name(component))["spec"]["ingress"] == []


# -- the router's bearer token -------------------------------------------------------------

def _router(r: Rendered) -> dict[str, Any]:
    spec: dict[str, Any] = r.get("Deployment", name("router"))["spec"]["template"]["spec"]
    return spec


def _token_path(spec: dict[str, Any]) -> str | None:
    args = spec["containers"][0]["args"]
    return args[args.index("--token-file") + 1] if "--token-file" in args else None


def _mounted_secret(spec: dict[str, Any], path: str) -> tuple[str, str]:
    """(Secret name, key) that the file at ``path`` in the router container comes from."""
    for m in spec["containers"][0]["volumeMounts"]:
        if path.startswith(m["mountPath"].rstrip("/") + "/"):
            (vol,) = [v for v in spec["volumes"] if v["name"] == m["name"]]
            rel = path[len(m["mountPath"].rstrip("/")) + 1:]
            (item,) = [i for i in vol["secret"]["items"] if i["path"] == rel]
            return vol["secret"]["secretName"], item["key"]
    raise AssertionError(f"{path} is on no mounted volume")


def test_router_requires_a_token_by_default(default_render: Rendered) -> None:
    spec = _router(default_render)
    path = _token_path(spec)
    assert path is not None
    secret_name, key = _mounted_secret(spec, path)
    secret = default_render.get("Secret", secret_name)
    token = base64.b64decode(secret["data"][key]).decode()
    assert len(token) == 48 and token.isalnum()
    # a fresh random token per installation
    again = Rendered(render_raw(None)).get("Secret", secret_name)
    assert again["data"][key] != secret["data"][key]


def test_service_monitor_sends_the_router_token() -> None:
    r = rendered("prometheus")
    (sm,) = r.all("ServiceMonitor")
    (router_ep,) = [e for e in sm["spec"]["endpoints"] if e["port"] == "http"]
    secret_name, key = _mounted_secret(_router(r), _token_path(_router(r)) or "")
    assert router_ep["bearerTokenSecret"] == {"name": secret_name, "key": key}


def test_existing_secret_and_auth_off() -> None:
    mine = Rendered(render_raw({"router": {"auth": {"existingSecret": "gw-token",
                                                    "secretKey": "bearer"}}}))
    assert mine.all("Secret") == []
    spec = _router(mine)
    assert _mounted_secret(spec, _token_path(spec) or "") == ("gw-token", "bearer")
    off = Rendered(render_raw({"router": {"auth": {"enabled": False}}},
                              ("monitoring.coreos.com/v1",)))
    assert _token_path(_router(off)) is None and off.all("Secret") == []
    (sm,) = off.all("ServiceMonitor")
    assert all("bearerTokenSecret" not in e for e in sm["spec"]["endpoints"])


def test_notes_tell_clients_how_to_authenticate(default_render: Rendered) -> None:
    notes = default_render.notes
    assert "Authorization: Bearer" in notes and name("router") + "-token" in notes
    assert "Content-Type: application/json" in notes
