"""Measured J/token fed back, against a REAL kube-apiserver v1.30 (``../shared/k8s``).

The operator process (the chart's ServiceAccount) reads a GPUProfile whose node-agent
measurements (written to status.measured as the agents write them) say the GPUs spend
30 % more per token than the profile: the next plan carries the correction, and the
drift is an ``EpsDrift`` condition and a Warning Event the real API server accepts.
"""

from __future__ import annotations

import contextlib
import json
import threading
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import k8slib
import pytest
from k8slib import ControlPlane
from operatorlib import (
    OP_NAMESPACE,
    Scenario,
    condition,
    start_engine_and_agent,
    start_operator,
    wait_for,
)

from joulepool.api.contract import ENERGYPOLICIES, GPU_RESOURCE, GPUPROFILES
from joulepool.api.models import GROUP, VERSION
from joulepool.core.profiles import H100_8B
from joulepool.kube import testing as T

TRUE_SCALE = 1.3


@pytest.fixture(scope="module")
def operator(cluster: ControlPlane) -> Iterator[k8slib.Component]:
    with k8slib.components(cluster) as procs:
        yield start_operator(procs)


def test_measured_drift_corrects_the_plan_and_is_a_condition_and_an_event(
        scenario: Scenario, cluster: ControlPlane) -> None:
    s = scenario
    node = s.node("h100")
    s.create_pool("chat", rps=20)
    s.planned("chat")
    name = f"fb-{s.ns}"[:63].strip("-")
    custom = cluster.custom
    custom.create_cluster_custom_object(GROUP, VERSION, GPUPROFILES, T.gpu_profile(name, H100_8B))
    try:
        batch, clock = 32, 1700.0
        entry = {"joulesPerToken": TRUE_SCALE * float(H100_8B.joules_per_token(batch, clock)),
                 "samples": 50_000, "node": node,
                 "updatedAt": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                 "tokensPerSecond": float(H100_8B.decode_tokens_per_s(batch, clock)),
                 "clockMHz": clock}
        custom.patch_cluster_custom_object_status(  # what a node agent writes
            GROUP, VERSION, GPUPROFILES, name, {"status": {"measured": [entry]}})

        def drift() -> dict[str, object] | None:
            obj = custom.get_cluster_custom_object(GROUP, VERSION, GPUPROFILES, name)
            c = condition(obj, "EpsDrift")
            return c if c and c["status"] == "True" else None

        cond = wait_for(drift, what="the EpsDrift condition")
        assert cond["reason"] == "MeasuredEpsDrift" and "1.30x" in str(cond["message"])

        def events() -> list[object]:
            return [e for e in cluster.core.list_namespaced_event(
                        "default", field_selector=f"involvedObject.name={name}").items
                    if e.reason == "MeasuredEpsDrift"]

        (event,) = wait_for(events, what="the drift Event")
        assert event.type == "Warning" and event.involved_object.kind == "GPUProfile"

        def scale() -> float | None:
            cm = cluster.core.read_namespaced_config_map("joulepool-plan", OP_NAMESPACE)
            return json.loads(cm.data["plan.json"]).get("epsScales", {}).get(H100_8B.key)

        # shrunk towards the profile by 500 prior tokens of 50 500
        assert wait_for(scale, what="epsScales in the plan") == pytest.approx(
            TRUE_SCALE, rel=0.01)
        assert not s.op.forbidden_lines()  # the chart's RBAC is enough
    finally:
        with contextlib.suppress(Exception):
            custom.delete_cluster_custom_object(GROUP, VERSION, GPUPROFILES, name)


def test_events_about_cluster_scoped_objects_are_recorded_where_kubectl_finds_them(
        scenario: Scenario, cluster: ControlPlane, nodes: list[str]) -> None:
    """Warnings about an EnergyPolicy (cluster-scoped) and a Node with an unreadable GPU
    quantity: the real API server records them in ``default`` with an ``involvedObject``
    without namespace, which is what ``kubectl describe`` lists (kopf.warn put them in
    its context's namespace and named that namespace in involvedObject)."""
    s = scenario
    custom = cluster.custom
    policy = f"other-{s.ns}"[:63].strip("-")
    custom.create_cluster_custom_object(GROUP, VERSION, ENERGYPOLICIES, {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "EnergyPolicy",
        "metadata": {"name": policy}, "spec": {}})
    bad_node = f"{s.ns}-bad-gpus"[:63]
    body = k8slib.gpu_node(bad_node, "H100", 8)
    body["status"]["allocatable"][GPU_RESOURCE] = "1e999"  # kube-apiserver accepts it
    nodes.append(bad_node)
    cluster.core.create_node(body)
    try:
        def described(kind: str, name: str, reason: str) -> list[Any]:
            # kubectl describe's query for a cluster-scoped object (all namespaces)
            found = cluster.core.list_event_for_all_namespaces(field_selector=(
                f"involvedObject.kind={kind},involvedObject.name={name},"
                "involvedObject.namespace=")).items
            return [e for e in found if e.reason == reason]

        (event,) = wait_for(lambda: described("EnergyPolicy", policy, "Ignored"),
                            what="the Ignored event about the EnergyPolicy")
        assert event.metadata.namespace == "default" and event.type == "Warning"
        assert event.involved_object.uid  # tied to this object, as kubectl matches it
        (event,) = wait_for(lambda: described("Node", bad_node, "InvalidGPUQuantity"),
                            what="the InvalidGPUQuantity event about the Node")
        assert event.metadata.namespace == "default" and "1e999" in event.message
        s.alive()  # the quantity did not crash the operator
        assert not s.op.forbidden_lines()
    finally:
        with contextlib.suppress(Exception):
            custom.delete_cluster_custom_object(GROUP, VERSION, ENERGYPOLICIES, policy)


def _load(url: str, stop: threading.Event) -> None:
    """Keep the fake engine busy (its tokens are what the node agent measures)."""
    body = json.dumps({"model": "llama-3.1-8b", "prompt": "hello " * 64,
                       "max_tokens": 128}).encode()
    while not stop.is_set():
        req = urllib.request.Request(url + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with contextlib.suppress(OSError):
            urllib.request.urlopen(req, timeout=30).read()


def test_node_agent_publishes_its_operating_point_into_the_next_plan(
        scenario: Scenario, cluster: ControlPlane, tmp_path: Path) -> None:
    """End to end over real interfaces: a node agent process (simulated GPU, the chart's
    node-agent ServiceAccount) measures a fake engine under load and writes
    ``status.measured`` of the matching GPUProfile with its operating point
    (``tokensPerSecond``, ``clockMHz``); the operator process uses that entry (the
    EpsDrift condition counts the node as measured, not as "without operating point")
    and publishes the correction in the plan's ``epsScales``, which the router and the
    extender read."""
    s = scenario
    node = s.node("h100")
    s.create_pool("chat", rps=5)
    s.planned("chat")
    name = f"op-{s.ns}"[:63].strip("-")
    custom = cluster.custom
    custom.create_cluster_custom_object(GROUP, VERSION, GPUPROFILES, T.gpu_profile(name, H100_8B))
    state = tmp_path / "gpus.json"
    engine_port, metrics_port = k8slib.free_port(), k8slib.free_port()
    engine_url = f"http://127.0.0.1:{engine_port}"
    stop = threading.Event()
    loaders = [threading.Thread(target=_load, args=(engine_url, stop), daemon=True)
               for _ in range(4)]
    with k8slib.components(cluster) as procs:
        try:
            _, agent = start_engine_and_agent(
                procs, "op", state=state, engine_port=engine_port, node=node,
                product="H100", pool=s.key("chat"), metrics_port=metrics_port)
            for t in loaders:
                t.start()

            def measured() -> dict[str, Any] | None:
                obj = custom.get_cluster_custom_object(GROUP, VERSION, GPUPROFILES, name)
                for entry in (obj.get("status") or {}).get("measured") or []:
                    if entry.get("node") == node and entry.get("samples", 0) >= 2500:
                        return dict(entry)
                return None

            entry = wait_for(measured, timeout=120, what="the agent's measured entry")
            p = H100_8B
            assert entry["tokensPerSecond"] > 0
            assert p.f_min <= entry["clockMHz"] <= p.f_max
            assert entry["joulesPerToken"] > 0
            datetime.fromisoformat(entry["updatedAt"].replace("Z", "+00:00"))

            def used() -> dict[str, Any] | None:
                obj = custom.get_cluster_custom_object(GROUP, VERSION, GPUPROFILES, name)
                c = condition(obj, "EpsDrift")
                return c if c and "1 node(s) measured" in str(c["message"]) else None

            cond = wait_for(used, what="the operator using the measured operating point")
            assert "without operating point" not in str(cond["message"])

            def scale() -> float | None:
                cm = cluster.core.read_namespaced_config_map("joulepool-plan", OP_NAMESPACE)
                return json.loads(cm.data["plan.json"]).get("epsScales", {}).get(H100_8B.key)

            # the simulated GPU draws the profile's power: the correction stays near 1
            assert 0.7 < wait_for(scale, what="epsScales in the plan") < 1.4
            assert agent.running() and not agent.forbidden_lines()
            assert not s.op.forbidden_lines()
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                custom.delete_cluster_custom_object(GROUP, VERSION, GPUPROFILES, name)
