"""GIE pools from the operator against a REAL kube-apiserver v1.30 (``../shared/k8s``).

The operator runs on the chart's operator ServiceAccount with ``--epp-service``. Without
GIE's CRD (tests/data/gie) the pool still plans and says so in its ``GatewayPool``
condition; once the CRD is installed, the operator creates the pool's GIE
``InferencePool`` (validated by the real API server against GIE's v1 schema), owned by
the joulepool pool and garbage-collected with it. Both ``inferencepools`` CRDs are served
side by side, each under its own group and short name.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import k8slib
import pytest
import yaml
from k8slib import ControlPlane
from operatorlib import GROUP, POOLS, VERSION, Scenario, condition, start_operator, wait_for

GIE_CRD_FILE = (Path(__file__).resolve().parents[1] / "data" / "gie"
                / "inferencepools.inference.networking.k8s.io.yaml")
GIE_GROUP, GIE_VERSION = "inference.networking.k8s.io", "v1"
PICKER = "joulepool-epp"


def _ext(cp: ControlPlane) -> Any:
    from kubernetes import client

    return client.ApiextensionsV1Api(cp.api_client())


def install_gie_crd(cp: ControlPlane) -> None:
    cp.apply(yaml.safe_load(GIE_CRD_FILE.read_text()))
    name = f"inferencepools.{GIE_GROUP}"

    def established() -> bool:
        conds = _ext(cp).read_custom_resource_definition(name).status.conditions or []
        return any(c.type == "Established" and c.status == "True" for c in conds)

    k8slib.wait_for(f"CRD {name} Established", established, timeout=30)


def remove_gie_crd(cp: ControlPlane) -> None:
    from kubernetes.client.exceptions import ApiException

    name = f"inferencepools.{GIE_GROUP}"
    try:
        _ext(cp).delete_custom_resource_definition(name)
    except ApiException as exc:
        if exc.status != 404:
            raise

    def gone() -> bool:
        try:
            _ext(cp).read_custom_resource_definition(name)
        except ApiException as exc:
            return exc.status == 404
        return False

    k8slib.wait_for(f"CRD {name} deleted", gone, timeout=60)


def gie_pool(cp: ControlPlane, ns: str, name: str) -> dict[str, Any] | None:
    from kubernetes.client.exceptions import ApiException

    try:
        return cp.custom.get_namespaced_custom_object(  # type: ignore[no-any-return]
            GIE_GROUP, GIE_VERSION, ns, "inferencepools", name)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


@pytest.fixture(scope="module")
def operator(cluster: ControlPlane) -> Iterator[k8slib.Component]:
    remove_gie_crd(cluster)  # the scenario starts without GIE
    with k8slib.components(cluster) as procs:
        yield start_operator(procs, "--epp-service", PICKER, "--epp-port", "9002",
                             "--epp-failure-mode", "FailOpen")
    remove_gie_crd(cluster)


def _gateway_condition(s: Scenario, name: str, reason: str) -> dict[str, Any]:
    def check() -> Any:
        s.alive()
        c = condition(s.pool(name), "GatewayPool")
        return c if c is not None and c["reason"] == reason else None
    return wait_for(check, what=f"GatewayPool condition {reason}")  # type: ignore[no-any-return]


def test_gie_pool_absent_crd_then_created_owned_and_collected(scenario: Scenario) -> None:
    s = scenario
    s.node("h100")
    s.create_pool("chat", rps=20, port=8000)
    s.planned("chat", replicas=2)
    cond = _gateway_condition(s, "chat", "CRDNotInstalled")
    assert cond["status"] == "False" and "inferencepools.inference.networking.k8s.io" in \
        cond["message"]
    assert gie_pool(s.cp, s.ns, "chat") is None

    install_gie_crd(s.cp)
    s.patch_pool("chat", {"spec": {"demand": {"requestsPerSecond": 21}}})  # a new pass
    body = wait_for(lambda: gie_pool(s.cp, s.ns, "chat"), what="the GIE InferencePool")
    spec = body["spec"]
    assert spec["selector"] == {"matchLabels": {"joulepool.dev/pool": s.key("chat")}}
    assert spec["targetPorts"] == [{"number": 8000}]
    assert spec["endpointPickerRef"] == {"group": "", "kind": "Service", "name": PICKER,
                                         "port": {"number": 9002}, "failureMode": "FailOpen"}
    pool = s.pool("chat")
    assert pool is not None
    (owner,) = body["metadata"]["ownerReferences"]
    assert owner["apiVersion"] == f"{GROUP}/{VERSION}" and owner["controller"] is True
    assert owner["uid"] == pool["metadata"]["uid"]
    # the picker Service is in the release namespace, not the pool's: said so
    cond = _gateway_condition(s, "chat", "PickerServiceElsewhere")
    assert cond["status"] == "True" and PICKER in cond["message"]
    # the GIE selector selects exactly the pool's serving pods
    wait_for(lambda: s.shares_hold("chat"), what="pods bound")
    selected = s.cp.core.list_namespaced_pod(
        s.ns, label_selector=f"joulepool.dev/pool={s.key('chat')}").items
    assert len([p for p in selected if p.metadata.deletion_timestamp is None]) >= 2
    assert not s.op.forbidden_lines()  # the chart's RBAC grants the GIE writes

    s.delete_pool("chat")
    wait_for(lambda: gie_pool(s.cp, s.ns, "chat") is None, timeout=90,
             what="the GIE pool garbage-collected with its owner")


def test_both_inferencepools_crds_side_by_side(scenario: Scenario) -> None:
    s = scenario
    install_gie_crd(s.cp)
    ours = _ext(s.cp).read_custom_resource_definition(f"{POOLS}.{GROUP}").spec.names
    theirs = _ext(s.cp).read_custom_resource_definition(f"{POOLS}.{GIE_GROUP}").spec.names
    assert ours.plural == theirs.plural == "inferencepools"  # the bare word is ambiguous
    assert "jpool" in ours.short_names and "jpool" not in (theirs.short_names or [])
    assert set(ours.categories or ()) == {"joulepool"}
    # each kind lists under its own group only
    s.node("h100")
    s.create_pool("chat", rps=10)
    foreign = {
        "apiVersion": f"{GIE_GROUP}/{GIE_VERSION}", "kind": "InferencePool",
        "metadata": {"name": "theirs", "namespace": s.ns},
        "spec": {"selector": {"matchLabels": {"app": "x"}}, "targetPorts": [{"number": 8000}],
                 "endpointPickerRef": {"name": "their-epp", "port": {"number": 9002}}},
    }
    s.cp.custom.create_namespaced_custom_object(GIE_GROUP, GIE_VERSION, s.ns,
                                                "inferencepools", foreign)
    names = {p["metadata"]["name"] for p in s.pools()}
    assert names == {"chat"}
    s.planned("chat")
    gie_names = {p["metadata"]["name"] for p in s.cp.custom.list_namespaced_custom_object(
        GIE_GROUP, GIE_VERSION, s.ns, "inferencepools")["items"]}
    assert "theirs" in gie_names
    wait_for(lambda: gie_pool(s.cp, s.ns, "chat"), what="our GIE pool next to theirs")
    theirs_now = gie_pool(s.cp, s.ns, "theirs")
    assert theirs_now is not None and not theirs_now["metadata"].get("ownerReferences")
    assert theirs_now["spec"]["endpointPickerRef"]["failureMode"] == "FailClose"  # defaulted
    s.alive()
