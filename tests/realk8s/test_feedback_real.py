"""Measured J/token fed back, against a REAL kube-apiserver v1.30 (``../shared/k8s``).

The operator process (the chart's ServiceAccount) reads a GPUProfile whose node-agent
measurements (written to status.measured as the agents write them) say the GPUs spend
30 % more per token than the profile: the next plan carries the correction, and the
drift is an ``EpsDrift`` condition and a Warning Event the real API server accepts.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime

import k8slib
import pytest
from k8slib import ControlPlane
from operatorlib import OP_NAMESPACE, Scenario, condition, start_operator, wait_for

from joulepool.api.contract import GPUPROFILES
from joulepool.api.models import GROUP, VERSION
from joulepool.core.profiles import H100_8B

TRUE_SCALE = 1.3


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


def profile_body(name: str) -> dict[str, object]:
    p = H100_8B
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "GPUProfile", "metadata": {"name": name},
        "spec": {"product": "H100", "model": p.model, "gpus": 1,
                 "idleWatts": p.product.idle_w.value, "maxBatch": int(p.max_batch.value),
                 "prefillTokensPerSecond": p.prefill_tokens_per_s.value,
                 "clock": {"minMHz": p.f_min, "maxMHz": p.f_max},
                 "batchPoints": [{"batch": b.batch,
                                  "interTokenLatencySeconds": b.itl_ms.value / 1e3,
                                  "powerWatts": b.power_w.value} for b in p.points]},
    }


def test_measured_drift_corrects_the_plan_and_is_a_condition_and_an_event(
        scenario: Scenario, cluster: ControlPlane) -> None:
    s = scenario
    node = s.node("h100")
    s.create_pool("chat", rps=20)
    s.planned("chat")
    name = f"fb-{s.ns}"[:63].strip("-")
    custom = cluster.custom
    custom.create_cluster_custom_object(GROUP, VERSION, GPUPROFILES, profile_body(name))
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
