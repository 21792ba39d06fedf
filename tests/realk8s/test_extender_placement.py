"""The extender behind a real second kube-scheduler: serving pods placed by the plan.

``joulepool extender`` runs as a local process on the chart's scheduler ServiceAccount
token (the sidecar's identity), watching real Nodes, Pods and the plan ConfigMap; a
second kube-scheduler v1.30 with the chart's configuration calls it. The plan is
published here as the operator would (admin writes the ConfigMap), so these tests check
the extender and the scheduler configuration alone; the operator's own scenarios are in
the operator's real-API tests.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

import k8slib
import pytest
from k8slib import Components, ControlPlane

from joulepool.api.contract import GPU_RESOURCE, MODE_LABEL, POOL_LABEL
from joulepool.kube import testing as T

SCHEDULER_NAME = "joulepool-scheduler"


class Placement:
    """The extender and the second scheduler of one module, with helpers."""

    def __init__(self, cp: ControlPlane, procs: Components, chart: Any) -> None:
        self.cp = cp
        port = k8slib.free_port()
        self.extender = procs.joulepool("extender", [
            "extender", "--host", "127.0.0.1", "--port", str(port),
            "--namespace", k8slib.RELEASE_NAMESPACE, "--scrape-interval-seconds", "0",
        ], service_account=k8slib.service_account("scheduler"))
        self.extender.wait_log("listening on", timeout=60)
        self.scheduler = k8slib.start_second_scheduler(
            cp, procs, chart, f"http://127.0.0.1:{port}/scheduler")
        self.base = f"http://127.0.0.1:{port}"
        self.version = 100
        #: pod name -> (pool, mode, GPUs) of every pod created, to recreate it
        self.specs: dict[str, tuple[str, str, int]] = {}

    def publish_plan(self, pools: dict[str, list[T.Assignment]]) -> int:
        """Write the plan ConfigMap (as the operator does) and wait until the extender
        serves that version; returns the version."""
        self.version += 1
        k8slib.publish_plan(self.cp, pools, self.version)
        import urllib.request

        def served() -> bool:
            with urllib.request.urlopen(self.base + "/metrics", timeout=2) as r:
                text = r.read().decode()
            return any(line.startswith("joulepool_extender_plan_version ")
                       and float(line.split()[1]) == self.version for line in text.splitlines())

        k8slib.wait_for(f"extender to load plan v{self.version}", served, timeout=30)
        return self.version

    def create_pods(self, namespace: str, pool: str, mode: str, count: int, gpus: int,
                    start: int = 0) -> list[str]:
        names = []
        for i in range(start, start + count):
            name = f"{pool.split('.')[-1]}-{mode.lower()}-{i}"
            self.specs[name] = (pool, mode, gpus)
            self.cp.core.create_namespaced_pod(namespace, k8slib.serving_pod(
                name, pool, mode, gpus, scheduler=SCHEDULER_NAME))
            names.append(name)
        return names

    def recreate(self, namespace: str, name: str) -> None:
        pool, mode, gpus = self.specs[name]
        self.create_pods(namespace, pool, mode, 1, gpus, start=int(name.rsplit("-", 1)[1]))

    def pods(self, namespace: str) -> list[Any]:
        return list(self.cp.core.list_namespaced_pod(namespace).items)

    def wait_settled(self, namespace: str, bound: int, pending: int = 0,
                     timeout: float = 60) -> list[Any]:
        """Wait until exactly ``bound`` pods are bound and ``pending`` have a real
        FailedScheduling condition; returns the pods."""
        def settled() -> list[Any] | None:
            pods = self.pods(namespace)
            on_node = [p for p in pods if p.spec.node_name]
            unschedulable = [p for p in pods if not p.spec.node_name and any(
                c.type == "PodScheduled" and c.reason == "Unschedulable"
                for c in p.status.conditions or [])]
            if len(on_node) == bound and len(unschedulable) == pending:
                return pods
            return None

        return k8slib.wait_for(f"{bound} pods bound and {pending} unschedulable in "
                               f"{namespace}", settled, timeout=timeout, interval=0.3)


def shares(pods: list[Any]) -> Counter[tuple[str, str, str]]:
    """GPUs held per (pool, mode, node) by the bound pods."""
    held: Counter[tuple[str, str, str]] = Counter()
    for p in pods:
        if p.spec.node_name and not p.metadata.deletion_timestamp:
            gpus = int(p.spec.containers[0].resources.limits[GPU_RESOURCE])
            held[(p.metadata.labels[POOL_LABEL], p.metadata.labels[MODE_LABEL],
                  p.spec.node_name)] += gpus
    return held


def planned_shares(pools: dict[str, list[T.Assignment]]) -> Counter[tuple[str, str, str]]:
    out: Counter[tuple[str, str, str]] = Counter()
    for pool, entries in pools.items():
        for entry in entries:
            per = entry[3] if len(entry) == 4 else 1
            out[(pool, f"{per}x{entry[1]}", entry[0])] += entry[2] * per
    return out


@pytest.fixture(scope="module")
def placement(cluster: ControlPlane, chart: Any) -> Iterator[Placement]:
    with k8slib.components(cluster) as procs:
        place = Placement(cluster, procs, chart)
        yield place
        # RBAC: each on its own ServiceAccount token, no 403 in any log
        assert place.extender.forbidden_lines() == []
        assert place.scheduler.forbidden_lines() == []


@pytest.fixture
def gpu_nodes(cluster: ControlPlane, nodes: list[str], request: pytest.FixtureRequest
              ) -> dict[str, str]:
    """Three fake GPU nodes named for this test: l4a, l4b (4 x L4) and h100 (8 x H100)."""
    tag = "".join(ch for ch in request.node.name.lower() if ch.isalnum())[-12:]
    names = {"l4a": f"{tag}-l4a", "l4b": f"{tag}-l4b", "h100": f"{tag}-h100"}
    for key, name in names.items():
        product, gpus = ("H100", 8) if key == "h100" else ("L4", 4)
        nodes.append(name)
        cluster.create_node(k8slib.gpu_node(name, product, gpus))
    return names


def test_modes_spread_over_nodes_hold_the_plans_shares(
        placement: Placement, namespace: str, gpu_nodes: dict[str, str]) -> None:
    """Two pools, three modes, spread over three nodes: every pod lands on a planned node
    and the GPUs each (pool, mode) holds per node equal the plan's share -- after the
    first placement and after every reschedule (pods deleted and recreated)."""
    n = gpu_nodes
    chat, batch = f"{namespace}.chat", f"{namespace}.batch"
    pools: dict[str, list[T.Assignment]] = {
        chat: [(n["l4a"], "L4", 3), (n["l4b"], "L4", 1), (n["h100"], "H100", 2, 2)],
        batch: [(n["l4a"], "L4", 1), (n["l4b"], "L4", 3), (n["h100"], "H100", 1, 4)],
    }
    placement.publish_plan(pools)
    expected = planned_shares(pools)
    total = 0
    for pool, mode, count, gpus in ((chat, "1xL4", 4, 1), (chat, "2xH100", 2, 2),
                                    (batch, "1xL4", 4, 1), (batch, "4xH100", 1, 4)):
        placement.create_pods(namespace, pool, mode, count, gpus)
        total += count
    pods = placement.wait_settled(namespace, bound=total)
    assert shares(pods) == expected
    rng = random.Random(14)
    for round_ in range(3):  # reschedule: delete about half of the pods, recreate them
        victims = [p.metadata.name for p in pods if rng.random() < 0.5]
        for name in victims:
            placement.cp.core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
        k8slib.wait_for("deleted pods gone", lambda v=victims: not (
            {p.metadata.name for p in placement.pods(namespace)} & set(v)), timeout=30)
        for name in victims:
            placement.recreate(namespace, name)
        pods = placement.wait_settled(namespace, bound=total)
        assert shares(pods) == expected, f"round {round_}"


def test_more_pods_than_planned_stay_pending_with_the_plan_as_reason(
        placement: Placement, namespace: str, gpu_nodes: dict[str, str]) -> None:
    """The plan gives the pool 3 L4 GPUs on one node; 5 pods: 3 bind there, 2 stay
    Pending with kube-scheduler's FailedScheduling naming the plan (not a free GPU
    elsewhere: the other L4 node and the H100 node have GPUs to spare)."""
    n = gpu_nodes
    pool = f"{namespace}.chat"
    plan = {pool: [(n["l4a"], "L4", 3)]}
    version = placement.publish_plan(plan)
    placement.create_pods(namespace, pool, "1xL4", 5, 1)
    pods = placement.wait_settled(namespace, bound=3, pending=2)
    assert shares(pods) == planned_shares(plan)
    pending = [p for p in pods if not p.spec.node_name]

    def failed_scheduling(name: str) -> list[str]:
        events = placement.cp.core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.name={name}").items
        return [e.message for e in events if e.reason == "FailedScheduling"]

    for p in pending:
        messages = k8slib.wait_for(f"FailedScheduling event of {p.metadata.name}",
                                   lambda name=p.metadata.name: failed_scheduling(name))
        text = " ".join(messages)
        assert f"plan v{version}" in text, text
        assert "0/3 nodes are available" in text or "nodes are available" in text, text


def test_more_pods_than_gpus_stay_pending_on_insufficient_gpus(
        placement: Placement, namespace: str, gpu_nodes: dict[str, str]) -> None:
    """A plan that (wrongly) gives more than the node has: kube-scheduler's own
    NodeResourcesFit stops at the node's 4 GPUs, the rest stay Pending."""
    n = gpu_nodes
    pool = f"{namespace}.chat"
    placement.publish_plan({pool: [(n["l4b"], "L4", 6)]})
    placement.create_pods(namespace, pool, "1xL4", 6, 1)
    pods = placement.wait_settled(namespace, bound=4, pending=2)
    assert Counter(p.spec.node_name for p in pods if p.spec.node_name) == {n["l4b"]: 4}
    pending = [p for p in pods if not p.spec.node_name]
    message = next(c.message for c in pending[0].status.conditions if c.type == "PodScheduled")
    assert "Insufficient nvidia.com/gpu" in message, message


def test_extender_readiness_and_metrics(placement: Placement) -> None:
    import urllib.request

    with urllib.request.urlopen(placement.base + "/readyz", timeout=5) as r:
        assert json.loads(r.read())["status"] == "ready"
