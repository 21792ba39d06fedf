"""The operator as a process against a REAL kube-apiserver v1.30 (``../shared/k8s``).

One operator process for the module, on the chart's operator ServiceAccount; each
scenario uses its own namespace and nodes and releases its pools at the end, so the
joint plan holds only the scenario's pools. Pods are bound by the real default scheduler.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import k8slib
import pytest
from k8slib import ControlPlane
from operatorlib import Scenario, condition, planned_per_node, start_operator, wait_for


@pytest.fixture(scope="module")
def operator(cluster: ControlPlane) -> Iterator[k8slib.Component]:
    with k8slib.components(cluster) as procs:
        yield start_operator(procs)


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
    obj = s.planned("chat", replicas=5)  # 66 req/s over 13.2 per H100 in a pool of 5
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


def test_two_modes_each_on_its_own_node(scenario: Scenario) -> None:
    s = scenario
    h100, a100 = s.node("h100", "H100", gpus=2), s.node("a100", "A100", gpus=8)
    s.create_pool("chat", rps=40)  # two H100 instances and the rest on A100
    obj = s.planned("chat")
    modes = {a["mode"] for a in obj["status"]["assignments"]}
    assert modes == {"1xH100", "1xA100"}
    per_node = planned_per_node(obj)
    assert set(per_node) == {h100, a100}
    deps = wait_for(lambda: (d := s.deployments()) and len(d) == 2 and d, what="2 Deployments")
    assert {d.metadata.labels["joulepool.dev/mode"] for d in deps.values()} == modes
    assert wait_for(lambda: s.shares_hold("chat"), what="shares") == per_node


def test_infeasible_demand_is_served_partially_and_said(scenario: Scenario) -> None:
    """Infeasible demand says so (Infeasible=True, UnmetDemand, Planned=False). While an
    earlier feasible plan is in force (an earlier scenario's) the pool waits for a
    feasible plan; otherwise the best partial plan serves it, on every GPU there is."""
    s = scenario
    node = s.node("h100", gpus=2)
    s.create_pool("chat", rps=400)  # far beyond two GPUs
    obj = wait_for(lambda: s.infeasible("chat"), what="chat infeasible")
    assert condition(obj, "Infeasible")["reason"] == "UnmetDemand"  # type: ignore[index]
    planned = condition(obj, "Planned")
    assert planned is not None and planned["status"] == "False"
    assert planned["reason"] in ("PartiallyPlanned", "NoFeasiblePlan")
    if planned["reason"] == "PartiallyPlanned":
        assert planned_per_node(obj) == {node: 2}
        assert wait_for(lambda: s.shares_hold("chat"), what="partial plan bound") == {node: 2}
    else:
        assert not planned_per_node(obj) and not s.pods_per_node("chat")


def test_pool_deletion_releases_its_gpus_and_deployments(scenario: Scenario) -> None:
    s = scenario
    node = s.node("h100", gpus=2)
    s.create_pool("chat", rps=20)
    s.planned("chat", replicas=2)
    wait_for(s.deployments, what="Deployment")
    s.create_pool("rag", rps=20)  # no room left: waits for chat's GPUs
    wait_for(lambda: s.infeasible("rag"), what="rag waiting for GPUs")
    s.delete_pool("chat")
    wait_for(lambda: s.pool("chat") is None, what="chat released")
    obj = s.planned("rag", replicas=2, reason="Planned")
    assert planned_per_node(obj) == {node: 2}
    wait_for(lambda: all(n.startswith("rag-") for n in s.deployments()),
             what="chat's Deployments gone")
    assert wait_for(lambda: s.shares_hold("rag"), what="rag bound") == {node: 2}
    assert not s.pods_per_node("chat")


def test_node_not_ready_then_deleted_moves_the_plan(scenario: Scenario) -> None:
    s = scenario
    a, b = s.node("h100-a", gpus=2), s.node("h100-b", gpus=2)
    s.create_pool("chat", rps=40)
    s.planned("chat", replicas=4)
    assert wait_for(lambda: s.shares_hold("chat"), what="shares") == {a: 2, b: 2}
    s.cp.set_node_ready(b, False)
    obj = s.planned("chat", reason="PartiallyPlanned")
    assert planned_per_node(obj) == {a: 2}
    # b's Deployment is scaled to 0 (never deleted while the plan is infeasible)
    assert wait_for(lambda: s.shares_hold("chat"), what="pods off b") == {a: 2}
    s.cp.delete_nodes([b])
    c = s.node("h100-c", gpus=2)
    obj = s.planned("chat", replicas=4, reason="Planned")
    assert planned_per_node(obj) == {a: 2, c: 2}
    assert wait_for(lambda: s.shares_hold("chat"), what="shares on a and c") == {a: 2, c: 2}


def test_operator_restart_mid_way_resumes(scenario: Scenario) -> None:
    """Stopped with a pool planned; demand changed and a pool added while it is down; the
    restarted operator plans both and the plan version continues."""
    s = scenario
    s.node("h100", gpus=8)
    s.create_pool("chat", rps=4)
    s.planned("chat", replicas=1)
    before = s.cp.core.read_namespaced_config_map("joulepool-plan", "joulepool-system")
    s.op.stop()
    try:
        s.patch_pool("chat", {"spec": {"demand": {"requestsPerSecond": 40}}})
        s.create_pool("rag", rps=4)
    finally:
        s.op.start()
    s.planned("chat", replicas=4)
    s.planned("rag", replicas=1)
    after = s.cp.core.read_namespaced_config_map("joulepool-plan", "joulepool-system")
    version = "joulepool.dev/plan-version"
    assert int(after.metadata.annotations[version]) > int(before.metadata.annotations[version])
    assert wait_for(lambda: s.shares_hold("chat"), what="chat bound")
    assert wait_for(lambda: s.shares_hold("rag"), what="rag bound")


def test_namespace_deletion_releases_its_pools_without_retry_storms(
        cluster: ControlPlane, operator: k8slib.Component, nodes: list[str]) -> None:
    """Deleting a namespace with a planned pool: the pool is released (the namespace goes
    away), and the operator does not keep re-planning and retrying writes into it."""
    ns = f"t-doomed-{k8slib.free_port() % 10000}"
    cluster.ensure_namespace(ns)
    s = Scenario(cluster, ns, nodes, operator)
    node = s.node("h100", gpus=2)
    s.create_pool("chat", rps=20)
    s.planned("chat", replicas=2)
    assert wait_for(lambda: s.shares_hold("chat"), what="bound") == {node: 2}
    mark = len(operator.log())
    cluster.core.delete_namespace(ns)

    def namespace_gone() -> bool:
        from kubernetes.client.exceptions import ApiException

        try:
            cluster.core.read_namespace(ns)
        except ApiException as exc:
            return exc.status == 404
        return False

    wait_for(namespace_gone, timeout=90, what="namespace deleted")
    time.sleep(3)  # would-be retries show up in the log within a few seconds
    tail = operator.log()[mark:]
    failed = [line for line in tail.splitlines() if "reconcile pass incomplete" in line]
    assert len(failed) <= 1, "\n".join(failed)
    s.alive()
