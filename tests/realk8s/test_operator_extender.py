"""Operator, extender and a second kube-scheduler together on the real API: the
operator's per-node Deployments (``--scheduler-name joulepool-scheduler``) are placed
by kube-scheduler v1.30 through the extender's plan-aware filter, and every node holds
exactly the plan's share (the issue's example: 4 instances planned on one L4 node, 3 on
another; the old per-mode Deployment with several node names was rejected with 422) --
also after every reschedule: all of a pool's pods deleted at once, or some of them, are
replaced and bound within a bounded time, never over a node's share."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import k8slib
import pytest
from k8slib import ControlPlane
from operatorlib import OP_NAMESPACE, Scenario, planned_per_node, wait_for

from joulepool.api.contract import POOL_LABEL

#: seconds within which every deleted pod of a pool must have a bound replacement (the
#: defect: a replacement refused by the extender sat unschedulable for ~5 minutes)
REPLACED_WITHIN_S = 30.0


@pytest.fixture(scope="module")
def stack(cluster: ControlPlane, chart: Any) -> Iterator[k8slib.Component]:
    """Extender + second scheduler + operator (its pods go to the second scheduler)."""
    with k8slib.components(cluster) as procs:
        port = k8slib.free_port()
        extender = procs.joulepool("extender", [
            "extender", "--host", "127.0.0.1", "--port", str(port), "--namespace",
            OP_NAMESPACE, "--scrape-interval-seconds", "0",
        ], service_account=k8slib.service_account("scheduler"))
        extender.wait_log("listening on", timeout=60)
        k8slib.start_second_scheduler(cluster, procs, chart,
                                      f"http://127.0.0.1:{port}/scheduler")
        yield procs.joulepool(
            "operator", ["operator", "--namespace", OP_NAMESPACE, "--debounce-seconds", "0.2",
                         "--liveness", "0"],
            service_account=k8slib.service_account("operator"))


def test_extender_holds_the_operators_per_node_shares(
        cluster: ControlPlane, namespace: str, nodes: list[str],
        stack: k8slib.Component) -> None:
    s = Scenario(cluster, namespace, nodes, stack)
    try:
        a, b = s.node("l4-a", "L4", gpus=4), s.node("l4-b", "L4", gpus=3)
        s.create_pool("chat", rps=4)
        obj = s.planned("chat")
        want = planned_per_node(obj)
        assert want == {a: 4, b: 3}
        assert wait_for(lambda: s.shares_hold("chat"), timeout=90,
                        what="bound through the extender") == want
        assert not stack.forbidden_lines()
        for round_, victims in enumerate(("all", "some", "all", "all")):
            reschedule(s, "chat", want, victims, round_)
        assert not stack.forbidden_lines()
    finally:
        s.release_all()


def reschedule(s: Scenario, pool: str, want: dict[str, int], victims: str, round_: int
               ) -> None:
    """Delete all of ``pool``'s pods in one call (``victims="all"``, as ``kubectl delete
    pods -l`` does) or some on every node (one per node, in separate calls); assert every
    pod the ReplicaSets create instead is bound within :data:`REPLACED_WITHIN_S`, that no
    node ever holds more than its share on the way, and that the shares hold after."""
    selector = f"{POOL_LABEL}={s.key(pool)}"
    before = s.cp.core.list_namespaced_pod(s.ns, label_selector=selector).items
    assert len(before) == sum(want.values())
    if victims == "all":
        gone = {p.metadata.name for p in before}
        s.cp.core.delete_collection_namespaced_pod(s.ns, label_selector=selector)
    else:
        first = {p.spec.node_name: p.metadata.name for p in before}
        gone = set(first.values())
        for name in gone:
            s.cp.core.delete_namespaced_pod(name, s.ns)
    t0 = time.monotonic()
    over_share: list[dict[str, int]] = []

    def replaced() -> dict[str, int] | None:
        pods = s.cp.core.list_namespaced_pod(s.ns, label_selector=selector).items
        per_node = s.pods_per_node(pool)
        if any(c > want.get(n, 0) for n, c in per_node.items()):
            over_share.append(per_node)
        live = [p for p in pods if p.metadata.deletion_timestamp is None]
        if any(p.metadata.name in gone for p in pods) or not all(
                p.spec.node_name for p in live):
            return None
        return per_node if per_node == want else None

    assert wait_for(replaced, timeout=REPLACED_WITHIN_S, interval=0.2,
                    what=f"round {round_} ({victims}): replacements bound") == want
    assert time.monotonic() - t0 <= REPLACED_WITHIN_S
    assert not over_share, f"round {round_}: over the plan's share {want}: {over_share}"
