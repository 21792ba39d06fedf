"""Fixtures of the real-control-plane suite (``../shared/k8s``; see k8slib.py).

One control plane per test session (``control_plane``), with the CRDs installed and the
chart's RBAC applied (``cluster``). Every test uses its own namespace (``namespace``) and
its own node names, and deletes the nodes it made (``nodes``). Components run as local
processes on their own ServiceAccount tokens (``procs``). Where the control plane cannot
run (no ``../shared/k8s``, no etcd and no root to install it, not Linux x86-64) every test
here skips with the reason.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# the helper modules next to this file, importable under any --import-mode
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import k8slib
from k8slib import Components, ControlPlane, ControlPlaneUnavailable
from operatorlib import Scenario


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A fresh local control plane (admin access), stopped at the end of the session."""
    reason = k8slib.unavailable_reason()
    if reason:
        pytest.skip(reason)
    run_dir = tmp_path_factory.mktemp("k8s")
    try:
        cp = k8slib.start_control_plane(run_dir)
    except ControlPlaneUnavailable as exc:
        pytest.skip(str(exc))
    except Exception:
        k8slib.stop_control_plane(run_dir)
        raise
    try:
        yield cp
    finally:
        k8slib.stop_control_plane(run_dir)


@pytest.fixture(scope="session")
def chart() -> Any:
    """The chart with default values, rendered by the real Helm engine (chartlib.Rendered)."""
    return k8slib.render_chart()


@pytest.fixture(scope="session")
def cluster(control_plane: ControlPlane, chart: Any) -> ControlPlane:
    """The control plane with joulepool's CRDs installed and the chart's RBAC applied
    (ServiceAccounts, Roles, ClusterRoles, bindings) in ``joulepool-system``."""
    k8slib.install_crds(control_plane)
    k8slib.apply_rbac(control_plane, chart)
    return control_plane


@pytest.fixture
def namespace(cluster: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace of this test's own (deleted afterwards, without waiting)."""
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    name = f"t-{name}-{k8slib.free_port() % 10000}"
    cluster.ensure_namespace(name)
    try:
        yield name
    finally:
        from kubernetes.client.exceptions import ApiException

        with contextlib.suppress(ApiException):
            cluster.core.delete_namespace(name)


@pytest.fixture
def nodes(cluster: ControlPlane) -> Iterator[list[str]]:
    """Append the names of the Nodes a test creates; they are deleted afterwards."""
    made: list[str] = []
    try:
        yield made
    finally:
        cluster.delete_nodes(made)


@pytest.fixture
def procs(cluster: ControlPlane) -> Iterator[Components]:
    """Start local processes through this; all are stopped (SIGTERM) after the test."""
    with k8slib.components(cluster) as started:
        yield started


@pytest.fixture
def scenario(cluster: ControlPlane, namespace: str, nodes: list[str],
             operator: k8slib.Component) -> Iterator[Scenario]:
    """An operator scenario in the test's namespace, released afterwards; ``operator`` is
    the requesting module's own (module-scoped) operator process fixture."""
    s = Scenario(cluster, namespace, nodes, operator)
    try:
        yield s
    finally:
        s.release_all()

