"""The operator as a process against a REAL kube-apiserver v1.30 (``../shared/k8s``).

One operator process for the module, on the chart's operator ServiceAccount; each
scenario uses its own namespace and nodes and releases its pools at the end, so the
joint plan holds only the scenario's pools. Pods are bound by the real default scheduler.
"""

from __future__ import annotations

from collections.abc import Iterator

import k8slib
import pytest
from k8slib import ControlPlane
from operatorlib import Scenario, planned_per_node, start_operator, wait_for


@pytest.fixture(scope="module")
def operator(cluster: ControlPlane) -> Iterator[k8slib.Component]:
    with k8slib.components(cluster) as procs:
        yield start_operator(procs)


@pytest.fixture
def scenario(cluster: ControlPlane, namespace: str, nodes: list[str],
             operator: k8slib.Component) -> Iterator[Scenario]:
    s = Scenario(cluster, namespace, nodes, operator)
    try:
        yield s
    finally:
        s.release_all()


def test_operator_starts_stays_up_and_plans_a_pool(scenario: Scenario) -> None:
    """Old code: every watch carried timeoutSeconds=300.0, answered 400; the operator exited."""
    s = scenario
    node = s.node("h100")
    s.create_pool("chat", rps=20)
    obj = s.planned("chat", replicas=2)
    assert planned_per_node(obj) == {node: 2}
    deps = wait_for(s.deployments, what="the pool's Deployment")
    assert sum(d.spec.replicas for d in deps.values()) == 2
    assert wait_for(lambda: s.shares_hold("chat"), what="pods bound as planned") == {node: 2}
    s.alive()
    assert "ParseInt" not in s.op.log()
    assert not s.op.forbidden_lines()  # the chart's RBAC is enough
