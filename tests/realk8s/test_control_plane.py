"""The real-API fixture itself: CRDs established, the chart's RBAC in force for each
component's own ServiceAccount token, fake GPU nodes Ready, a second kube-scheduler
with the chart's configuration healthy."""

from __future__ import annotations

from typing import Any

import k8slib
import pytest
from k8slib import ControlPlane


def test_crds_are_served(cluster: ControlPlane) -> None:
    from kubernetes import client

    names = {c.metadata.name for c in
             client.ApiextensionsV1Api(cluster.api_client()).list_custom_resource_definition().items}
    assert {"inferencepools.joulepool.dev", "gpuprofiles.joulepool.dev",
            "energypolicies.joulepool.dev"} <= names


def test_chart_service_accounts_exist(cluster: ControlPlane, chart: Any) -> None:
    sas = {o["metadata"]["name"] for o in chart.all("ServiceAccount")}
    assert {k8slib.service_account(c) for c in ("operator", "scheduler", "router")} <= sas
    live = {sa.metadata.name for sa in cluster.core.list_namespaced_service_account(
        k8slib.RELEASE_NAMESPACE).items}
    assert sas <= live


def test_service_account_token_gets_only_the_chart_rbac(cluster: ControlPlane) -> None:
    """The router's token may list nodes (extender ClusterRole) but not create them,
    nor read Secrets: the API server enforces the chart's RBAC, not admin rights."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api = cluster.api_client(cluster.kubeconfig_for(k8slib.service_account("router")))
    core = client.CoreV1Api(api)
    core.list_node()
    with pytest.raises(ApiException) as denied:
        core.create_node(k8slib.gpu_node("never-made"))
    assert denied.value.status == 403
    with pytest.raises(ApiException) as secrets:
        core.list_namespaced_secret(k8slib.RELEASE_NAMESPACE)
    assert secrets.value.status == 403
    review = client.AuthenticationV1Api(api)
    assert review is not None


def test_fake_gpu_node_ready_with_gpus(cluster: ControlPlane, nodes: list[str]) -> None:
    from joulepool.api.contract import GPU_PRODUCT_LABEL, GPU_RESOURCE

    nodes.append("fixture-l4-1")
    cluster.create_node(k8slib.gpu_node("fixture-l4-1", "L4", gpus=4))
    node = cluster.core.read_node("fixture-l4-1")
    assert node.status.allocatable[GPU_RESOURCE] == "4"
    assert node.metadata.labels[GPU_PRODUCT_LABEL] == "NVIDIA-L4"
    cluster.set_node_ready("fixture-l4-1", False)
    cluster.set_node_ready("fixture-l4-1", True)


def test_second_scheduler_config_from_chart(chart: Any, tmp_path: Any) -> None:
    config = k8slib.scheduler_config(chart, tmp_path / "kc", "http://127.0.0.1:1/scheduler")
    assert config["clientConnection"]["kubeconfig"] == str(tmp_path / "kc")
    assert config["profiles"][0]["schedulerName"] == "joulepool-scheduler"
    assert [e["urlPrefix"] for e in config["extenders"]] == ["http://127.0.0.1:1/scheduler"]
    # everything else as the chart renders it
    assert config["extenders"][0]["nodeCacheCapable"] is True
    assert config["extenders"][0]["ignorable"] is False


def test_second_scheduler_runs_on_its_service_account(
        cluster: ControlPlane, chart: Any, procs: k8slib.Components) -> None:
    """kube-scheduler v1.30 with the chart's configuration (leader election on its own
    lease included) comes up healthy on the chart's scheduler RBAC, with no 403."""
    sched = k8slib.start_second_scheduler(cluster, procs, chart,
                                          f"http://127.0.0.1:{k8slib.free_port()}/scheduler")
    from kubernetes import client

    coord = client.CoordinationV1Api(cluster.api_client())
    # (a scheduler of an earlier test may have released the lease: wait for a holder)
    lease = k8slib.wait_for("the scheduler to hold its lease", lambda: (
        lease if (lease := coord.read_namespaced_lease(
            "joulepool-scheduler", k8slib.RELEASE_NAMESPACE)).spec.holder_identity else None),
        timeout=40)
    assert lease.spec.holder_identity
    assert sched.forbidden_lines() == []
