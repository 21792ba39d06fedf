"""The operator as a process against a REAL kube-apiserver v1.30 (``../shared/k8s``).

One control plane and one operator process for the module; each scenario uses its own
namespace and nodes and removes them at the end, so the joint plan only ever holds the
scenario's pools. Pods are bound by the real default scheduler.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from operatorlib import (
    H100,
    OP_NAMESPACE,
    Kube,
    OperatorProcess,
    condition,
    control_plane,
    planned_per_node,
    wait_for,
)


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    for run_dir in control_plane(tmp_path_factory):
        k = Kube(run_dir / "kubeconfig")
        k.install_crds()
        k.namespace(OP_NAMESPACE)
        yield k


@pytest.fixture(scope="module")
def operator(kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    op = OperatorProcess(kube.kubeconfig, log).start()
    try:
        yield op
    finally:
        op.stop()


class Scenario:
    """A namespace and nodes of one test, removed (pools first) when it ends."""

    def __init__(self, kube: Kube, op: OperatorProcess) -> None:
        self.kube, self.op = kube, op
        self.ns = kube.namespace()
        self.nodes: list[str] = []

    def node(self, name: str, product: str = H100, gpus: int = 8) -> str:
        name = f"{self.ns}-{name}"
        self.kube.add_node(name, product, gpus)
        self.nodes.append(name)
        return name

    def key(self, pool: str) -> str:
        return f"{self.ns}.{pool}"

    def planned(self, pool: str, replicas: int | None = None) -> dict[str, Any]:
        def check() -> Any:
            if not self.op.alive():
                raise RuntimeError("operator exited:\n" + self.op.log())
            obj = self.kube.pool(self.ns, pool)
            cond = condition(obj, "Planned")
            if cond is None or cond["status"] != "True":
                return None
            if replicas is not None and obj["status"].get("replicas") != replicas:  # type: ignore[index]
                return None
            return obj
        return wait_for(check, what=f"pool {pool} planned ({replicas} replicas)")  # type: ignore[no-any-return]

    def close(self) -> None:
        for p in self.kube.custom.list_namespaced_custom_object(
                "joulepool.dev", "v1alpha1", self.ns, "inferencepools")["items"]:
            self.kube.delete_pool(self.ns, p["metadata"]["name"])
        wait_for(lambda: not self.kube.custom.list_namespaced_custom_object(
            "joulepool.dev", "v1alpha1", self.ns, "inferencepools")["items"],
            what="pools released by the operator's finalizer")
        for n in self.nodes:
            self.kube.delete_node(n)


@pytest.fixture
def scenario(kube: Kube, operator: OperatorProcess) -> Iterator[Scenario]:
    s = Scenario(kube, operator)
    try:
        yield s
    finally:
        s.close()


def test_operator_starts_stays_up_and_plans_a_pool(scenario: Scenario) -> None:
    """Old code: every watch carried timeoutSeconds=300.0, answered 400; the operator exited."""
    s = scenario
    node = s.node("h100")
    s.kube.create_pool(s.ns, "chat", rps=20)
    obj = s.planned("chat", replicas=2)
    assert planned_per_node(obj) == {node: 2}
    deps = wait_for(lambda: s.kube.deployments(s.ns), what="the pool's Deployment")
    assert sum(d.spec.replicas for d in deps.values()) == 2
    wait_for(lambda: s.kube.pods_per_node(s.ns, s.key("chat")) == {node: 2},
             what="2 pods bound to the planned node")
    assert s.op.alive(), s.op.log()
    assert "ParseInt" not in s.op.log()
