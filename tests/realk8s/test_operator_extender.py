"""Operator, extender and a second kube-scheduler together on the real API: the
operator's per-node Deployments (``--scheduler-name joulepool-scheduler``) are placed
by kube-scheduler v1.30 through the extender's plan-aware filter, and every node holds
exactly the plan's share (the issue's example: 4 instances planned on one L4 node, 3 on
another; the old per-mode Deployment with several node names was rejected with 422)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import k8slib
import pytest
from k8slib import ControlPlane
from operatorlib import OP_NAMESPACE, Scenario, planned_per_node, wait_for


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
    finally:
        s.release_all()
