"""Two ``joulepool router`` replicas with the chart's arguments, on the chart's router
ServiceAccount, against the real API server: each publishes its completion and miss
counts in a Lease of its own and reads the other's, so misses reported to one replica
only move both lambdas, to the same value; the chart's Role is all they need."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

import k8slib
from k8slib import Components, ControlPlane

from joulepool.api.contract import (
    COMPONENT_LABEL,
    ROUTER_COUNTS_ANNOTATION,
    ROUTER_REPLICA_COMPONENT,
)


def _args(chart: Any, port: int, token_file: str) -> list[str]:
    """The chart's router args made local, sharing every 0.3 s and stepping PI every
    10 completions (so the test is short)."""
    args = k8slib.chart_router_args(chart, port, token_file)
    for flag, value in (("--replica-sync-seconds", "0.3"), ("--replica-ttl-seconds", "3")):
        args[args.index(flag) + 1] = value
    return [*args, "--pi-every", "10"]


def test_two_replicas_share_miss_counts_through_their_leases(
        cluster: ControlPlane, chart: Any, procs: Components, namespace: str,
        nodes: list[str]) -> None:
    token = k8slib.router_token(chart)
    token_file = cluster.run_dir / "replicas-token"
    token_file.write_text(token)
    pool = k8slib.serving_pool(cluster, namespace, nodes, "replicas", version=901).pool
    names = [f"router-{namespace[-4:]}-a", f"router-{namespace[-4:]}-b"]
    bases, routers = [], []
    for name in names:
        port = k8slib.free_port()
        routers.append(procs.joulepool(
            f"router-{name[-1]}", _args(chart, port, str(token_file)),
            service_account=k8slib.service_account("router"),
            env={"JOULEPOOL_ROUTER_REPLICA_NAME": name}))
        bases.append(f"http://127.0.0.1:{port}")
    for r in routers:
        r.wait_log("listening on", timeout=60)

    def decision(base: str) -> Any:
        status, answer = k8slib.call_json(
            base, "/v1/route", {"pool": pool, "inputTokens": 64, "outputTokens": 32}, token)
        return answer if status == 200 else None

    endpoint = k8slib.wait_for("a routing decision", lambda: decision(bases[0]),
                               timeout=30, interval=0.3)["endpoint"]
    k8slib.wait_for("the second replica to route", lambda: decision(bases[1]), timeout=30)

    def lam(base: str) -> float:
        status, answer = k8slib.call_json(base, f"/v1/pools/{pool}", token=token)
        assert status == 200, answer
        return float(answer["lambda"])

    def pool_state(base: str) -> Any:
        status, answer = k8slib.call_json(base, f"/v1/pools/{pool}", token=token)
        assert status == 200, answer
        return answer

    lam0 = lam(bases[1])
    # each replica's Lease, named after it; each replica sees the other before the
    # misses start (its baseline)
    k8slib.wait_for("both Leases", lambda: len(_leases(cluster, names)) == 2, timeout=20)
    k8slib.wait_for("replica b to see a", lambda: _peers(bases[1], token) >= 1, timeout=20)
    time.sleep(1.0)  # a few more syncs: b's baseline of a is a's count before the misses
    assert pool_state(bases[1])["piUpdates"] == 0
    # 60 completions, 40 % late, reported to replica a only
    for i in range(60):
        status, _ = k8slib.call_json(bases[0], "/v1/complete", {
            "pool": pool, "endpoint": endpoint, "deadlineMet": i % 5 >= 2,
            "outputTokens": 32, "e2eSeconds": 0.5}, token)
        assert status == 200

    def converged() -> tuple[float, float] | None:
        a, b = lam(bases[0]), lam(bases[1])
        return (a, b) if b > lam0 + 100 and abs(a - b) <= 1e-6 * a else None

    a, b = k8slib.wait_for("both lambdas to rise to one value", converged, timeout=30,
                           interval=0.3)
    assert a == b or abs(a - b) <= 1e-6 * a
    # b stepped its own PI loop on a's counts (consensus alone never steps)
    assert pool_state(bases[1])["piUpdates"] >= 1
    (lease_a,) = [x for x in _leases(cluster, names) if x.spec.holder_identity == names[0]]
    doc = json.loads(lease_a.metadata.annotations[ROUTER_COUNTS_ANNOTATION])
    assert doc["pools"][pool]["interactive"] == {"completions": 60, "misses": 24}
    for r in routers:
        assert r.forbidden_lines() == []


def _leases(cluster: ControlPlane, names: list[str]) -> list[Any]:
    """The router-replica Leases of ``names`` in the release namespace."""
    from kubernetes import client

    api = client.CoordinationV1Api(cluster.api_client())
    return [x for x in api.list_namespaced_lease(
        k8slib.RELEASE_NAMESPACE,
        label_selector=f"{COMPONENT_LABEL}={ROUTER_REPLICA_COMPONENT}").items
        if x.metadata.name in names]


def _peers(base: str, token: str) -> float:
    req = urllib.request.Request(base + "/metrics",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("joulepool_router_replica_peers "):
                return float(line.split()[1])
    return -1.0


def test_a_replicas_lease_is_owned_by_its_pod_and_collected_with_it(
        cluster: ControlPlane, chart: Any, procs: Components) -> None:
    """The chart passes the pod's name and UID: the replica's Lease names the Pod as its
    owner, so kube-controller-manager's garbage collector deletes it with the Pod."""
    from kubernetes.client.exceptions import ApiException

    token_file = cluster.run_dir / "replicas-gc-token"
    token_file.write_text(k8slib.router_token(chart))
    name = f"router-gc-{k8slib.free_port()}"
    pod = cluster.core.create_namespaced_pod(k8slib.RELEASE_NAMESPACE, {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"nodeName": "nowhere", "containers": [{"name": "router",
                                                        "image": "joulepool:test"}]}})
    router = procs.joulepool(
        "router-gc", _args(chart, k8slib.free_port(), str(token_file)),
        service_account=k8slib.service_account("router"),
        env={"JOULEPOOL_ROUTER_REPLICA_NAME": name,
             "JOULEPOOL_ROUTER_REPLICA_UID": pod.metadata.uid})
    router.wait_log("listening on", timeout=60)
    (lease,) = k8slib.wait_for("the replica's Lease", lambda: _leases(cluster, [name]) or None,
                               timeout=20)
    (owner,) = lease.metadata.owner_references
    assert (owner.kind, owner.name, owner.uid) == ("Pod", name, pod.metadata.uid)
    router.stop()
    cluster.core.delete_namespaced_pod(name, k8slib.RELEASE_NAMESPACE, grace_period_seconds=0)

    def collected() -> bool:
        try:
            cluster.core.read_namespaced_pod(name, k8slib.RELEASE_NAMESPACE)
            return False
        except ApiException as exc:
            if exc.status != 404:
                raise
        return not _leases(cluster, [name])

    k8slib.wait_for("the Lease to be garbage-collected with its Pod", collected, timeout=60)
    assert router.forbidden_lines() == []
