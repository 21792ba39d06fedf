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
from operatorlib import Scenario, condition, planned_per_node, start_operator, wait_for


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


def test_mode_on_two_nodes_gets_one_deployment_per_node_and_shares_hold(
        scenario: Scenario) -> None:
    """Old code: one Deployment per mode with matchFields metadata.name In [a, b] -> 422,
    no Deployment at all, and the pool still said Planned=True."""
    s = scenario
    a, b = s.node("h100-a", gpus=2), s.node("h100-b", gpus=2)
    s.create_pool("chat", rps=40)  # 4 instances of 1xH100: 2 on each 2-GPU node
    obj = s.planned("chat", replicas=4)
    assert planned_per_node(obj) == {a: 2, b: 2}
    deps = wait_for(lambda: (d := s.deployments()) and len(d) == 2 and d,
                    what="one Deployment per node")
    for d in deps.values():
        terms = d.spec.template.spec.affinity.node_affinity.\
            required_during_scheduling_ignored_during_execution.node_selector_terms
        assert [f.values for t in terms for f in t.match_fields] in ([[a]], [[b]])
    assert wait_for(lambda: s.shares_hold("chat"), what="per-node shares") == {a: 2, b: 2}
    # demand grows onto a third node: every node's share still holds after the reschedule
    c = s.node("h100-c", gpus=2)
    s.patch_pool("chat", {"spec": {"demand": {"requestsPerSecond": 60}}})
    obj = s.planned("chat", replicas=5)
    assert set(planned_per_node(obj)) <= {a, b, c}
    assert wait_for(lambda: s.shares_hold("chat"), what="per-node shares after growth")
    assert not s.op.forbidden_lines()


def test_hand_scaled_and_edited_deployment_is_put_back(scenario: Scenario) -> None:
    """Old code compared only its spec-hash annotation: a kubectl scale or edit stayed."""
    s = scenario
    node = s.node("h100")
    s.create_pool("chat", rps=20)
    s.planned("chat", replicas=2)
    (name,) = wait_for(s.deployments, what="the Deployment")
    s.cp.apps.patch_namespaced_deployment_scale(name, s.ns, {"spec": {"replicas": 6}})
    wait_for(lambda: s.deployments()[name].spec.replicas == 2, what="scale reverted")
    image = s.deployments()[name].spec.template.spec.containers[0].image
    s.cp.apps.patch_namespaced_deployment(name, s.ns, {"spec": {"template": {"spec": {
        "containers": [{"name": "engine", "image": "example.com/other:1"}]}}}})
    wait_for(lambda: s.deployments()[name].spec.template.spec.containers[0].image == image,
             what="template edit reverted")
    assert wait_for(lambda: s.shares_hold("chat"), what="shares") == {node: 2}


def test_deployment_the_api_rejects_is_a_condition_not_planned(scenario: Scenario) -> None:
    """A template kube-apiserver refuses (an invalid container name): the pool says
    Planned=False with the API's reason instead of Planned=True (old code)."""
    s = scenario
    s.node("h100")
    s.create_pool("chat", rps=4, template={"spec": {"containers": [
        {"name": "Not_A_DNS_Label", "image": "vllm/vllm-openai:v0.6.0"}]}})
    obj = s.planned("chat", reason="DeploymentFailed")
    cond = condition(obj, "Planned")
    assert cond is not None and cond["status"] == "False"
    assert "422" in cond["message"] and "Not_A_DNS_Label" in cond["message"]
    assert not s.deployments()
    # fixed by the user: planned and deployed
    s.patch_pool("chat", {"spec": {"template": {"spec": {"containers": [
        {"name": "engine", "image": "vllm/vllm-openai:v0.6.0"}]}}}})
    s.planned("chat", replicas=1, timeout=90)
    wait_for(s.deployments, what="the Deployment")
