"""A pool's whole life on a real cluster, served by the fake engine on fake GPUs:

apply -> Planned -> Ready -> pods bound by joulepool-scheduler to the planned
nodes -> node agents make clock decisions -> the router answers (and the engine
serves) -> delete -> everything cleaned up.

The steps run in order and share one pool (a module fixture); a failed step
skips the ones that need it. The pool lives in its own namespace, beside
whatever else runs (kind/up.sh's example pool included), and is removed even
when a step fails.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from e2elib import NAMESPACE, RELEASE, SCHEDULER, Cluster, metric_sum, pool_manifest

#: creating the kind cluster, building and loading the images can take far longer
#: than the suite's per-test timeout (pyproject.toml)
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]

GROUP, VERSION, PLURAL = "joulepool.dev", "v1alpha1", "inferencepools"
POOL_LABEL = "joulepool.dev/pool"
PLAN_CONFIGMAP, PLAN_KEY = "joulepool-plan", "plan.json"
AGENT_METRICS_PORT = 9400
T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float,
             interval: float = 2.0) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = probe()
        except AssertionError as exc:  # a probe may explain what it is waiting for
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


@dataclass
class PoolRun:
    cluster: Cluster
    namespace: str
    name: str
    failed: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.namespace}.{self.name}"

    def get(self) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            obj: dict[str, Any] = self.cluster.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, self.name)
            return obj
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def condition(self, type_: str) -> dict[str, Any] | None:
        pool = self.get() or {}
        for c in (pool.get("status") or {}).get("conditions") or []:
            if c.get("type") == type_:
                return dict(c)
        return None

    def pods(self) -> list[Any]:
        return list(self.cluster.core.list_namespaced_pod(
            self.namespace, label_selector=f"{POOL_LABEL}={self.key}").items)

    def planned_nodes(self) -> set[str]:
        status = (self.get() or {}).get("status") or {}
        return {a["node"] for a in status.get("assignments") or [] if a.get("instances", 1)}

    def plan(self) -> dict[str, Any]:
        cm = self.cluster.core.read_namespaced_config_map(PLAN_CONFIGMAP, NAMESPACE)
        doc: dict[str, Any] = json.loads((cm.data or {}).get(PLAN_KEY) or "{}")
        return doc


@pytest.fixture(scope="module")
def run(cluster: Cluster) -> Iterator[PoolRun]:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    ns = f"jp-e2e-{uuid.uuid4().hex[:6]}"
    cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
        name=ns, labels={"app.kubernetes.io/part-of": "joulepool-e2e"})))
    r = PoolRun(cluster, ns, "e2e")
    try:
        cluster.custom.create_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, pool_manifest(ns, r.name))
        yield r
    finally:
        try:
            cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, r.name)
        except ApiException as exc:
            if exc.status != 404:
                raise
        # the finalizer runs while the namespace still exists
        deadline = time.monotonic() + 120
        while r.get() is not None and time.monotonic() < deadline:
            time.sleep(2)
        cluster.core.delete_namespace(ns)


@pytest.fixture(autouse=True)
def _in_order(request: pytest.FixtureRequest, run: PoolRun) -> Iterator[None]:
    """Skip a step once an earlier one failed: it would only fail for that reason."""
    if run.failed:
        pytest.skip(f"an earlier step failed: {run.failed[0]}")
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before:
        run.failed.append(request.node.name)


# --------------------------------------------------------------------------
# the steps, in order
# --------------------------------------------------------------------------
def test_fake_gpus_are_advertised(cluster: Cluster) -> None:
    """Every GPU-labelled node has its fake GPUs as allocatable nvidia.com/gpu."""
    nodes = cluster.core.list_node(label_selector="nvidia.com/gpu.present=true").items
    assert nodes, "no node is labelled nvidia.com/gpu.present=true"

    def advertised() -> bool:
        fresh = cluster.core.list_node(label_selector="nvidia.com/gpu.present=true").items
        for n in fresh:
            want = (n.metadata.labels or {}).get("nvidia.com/gpu.count")
            have = (n.status.allocatable or {}).get("nvidia.com/gpu")
            assert have and (want is None or have == want), (n.metadata.name, have, want)
        return True

    wait_for("nvidia.com/gpu on every GPU node", advertised, timeout=120)


def test_pool_is_planned(run: PoolRun) -> None:
    cond = wait_for("condition Planned=True", lambda: (
        c if (c := run.condition("Planned")) and c.get("status") == "True" else None),
        timeout=180)
    assert cond["type"] == "Planned"
    status = (run.get() or {})["status"]
    assert status["assignments"], status
    assert status.get("replicas", 0) >= 1
    for a in status["assignments"]:
        assert {"site", "node", "gpuProduct", "mode", "gpus"} <= set(a)
    # the published plan carries it too
    assert run.key in run.plan().get("pools", {})


def test_pool_becomes_ready(run: PoolRun) -> None:
    wait_for("condition Ready=True", lambda: (
        c if (c := run.condition("Ready")) and c.get("status") == "True" else None),
        timeout=300)


def test_pods_are_bound_by_joulepool_scheduler_to_planned_nodes(run: PoolRun) -> None:
    planned = run.planned_nodes()
    assert planned
    pods = wait_for("running serving pods", lambda: [
        p for p in run.pods() if p.status.phase == "Running"] or None, timeout=120)
    for pod in pods:
        assert pod.spec.scheduler_name == SCHEDULER, pod.metadata.name
        assert pod.spec.node_name in planned, (pod.metadata.name, pod.spec.node_name, planned)
        limits = pod.spec.containers[0].resources.limits or {}
        assert int(limits.get("nvidia.com/gpu", "0")) >= 1

    def scheduled_by_us(pod: Any) -> bool:
        events = run.cluster.core.list_namespaced_event(
            run.namespace, field_selector=f"involvedObject.name={pod.metadata.name}").items
        for e in events:
            if e.reason == "Scheduled":
                by = e.reporting_component or (e.source.component if e.source else None)
                assert by == SCHEDULER, (pod.metadata.name, by)
                return True
        return False

    for pod in pods:
        wait_for(f"the Scheduled event of {pod.metadata.name}",
                 functools.partial(scheduled_by_us, pod), timeout=30)


def _agent_on(run: PoolRun, node: str) -> str:
    """The IP of the running node agent on ``node``."""
    pods = run.cluster.core.list_namespaced_pod(
        NAMESPACE, label_selector="app.kubernetes.io/component=node-agent",
        field_selector=f"spec.nodeName={node}").items
    running = [p.status.pod_ip for p in pods if p.status.phase == "Running" and p.status.pod_ip]
    assert running, f"no running node agent on {node}"
    return str(running[0])


def test_node_agents_make_clock_decisions(run: PoolRun, probe: Cluster) -> None:
    """On every node serving the pool, MIAD decides and locks clocks (simulated NVML).
    Read from the probe pod (the chart's NetworkPolicy admits metrics scrapers only)."""
    for node in sorted(run.planned_nodes()):
        url = f"http://{_agent_on(run, node)}:{AGENT_METRICS_PORT}/metrics"

        def decided(url: str = url) -> str | None:
            status, text = probe.http("GET", url)
            assert status == 200, (status, text[:200])
            return text if metric_sum(text, "joulepool_miad_decisions_total") > 0 else None

        text = wait_for(f"MIAD decisions on {node}", decided, timeout=90)
        assert metric_sum(text, "joulepool_gpu_energy_joules_total") > 0
        assert metric_sum(text, "joulepool_gpu_target_clock_hertz") > 0
        assert metric_sum(text, "joulepool_sidecar_monitor_only") == 0


def test_router_answers_and_the_engine_serves(run: PoolRun, probe: Cluster) -> None:
    """The router (bearer token on, as the chart installs it everywhere) answers from the
    probe pod, a router client the chart's NetworkPolicy admits; without the token: 401."""
    svc, token = probe.router_url(), probe.router_token()
    body = {"pool": run.key, "inputTokens": 128, "outputTokens": 32}
    status, _ = probe.http("POST", f"{svc}/v1/route", body)
    assert status == 401, status
    assert probe.http("POST", f"{svc}/v1/route", body, token="not-the-token")[0] == 401

    def routed() -> dict[str, Any] | None:
        status, text = probe.http("POST", f"{svc}/v1/route", body, token=token)
        if status in (404, 503):  # pool or endpoints not in the router's cache yet
            return None
        assert status == 200, (status, text[:300])
        answer: dict[str, Any] = json.loads(text)
        return answer

    answer = wait_for("a routing decision", routed, timeout=90)
    pods = {f"{p.status.pod_ip}:8000": p.metadata.name for p in run.pods()
            if p.status.pod_ip}
    assert answer["endpoint"] in pods, (answer, pods)
    assert set(answer.get("fallbacks", [])) <= set(pods)

    # the chosen engine serves a completion (OpenAI API of the fake engine)
    pod = pods[answer["endpoint"]]
    started = time.monotonic()
    status, text = run.cluster.proxy(
        "POST", f"/api/v1/namespaces/{run.namespace}/pods/{pod}:8000/proxy/v1/completions",
        {"model": "llama-3.1-8b", "prompt": "hello joulepool", "max_tokens": 16}, timeout=60)
    elapsed = time.monotonic() - started
    assert status == 200, (status, text[:300])
    completion = json.loads(text)
    assert completion["choices"] and completion["usage"]["completion_tokens"] == 16

    # and the router takes the outcome back
    status, text = probe.http("POST", f"{svc}/v1/complete", {
        "pool": run.key, "endpoint": answer["endpoint"], "e2eSeconds": elapsed,
        "outputTokens": 16, "deadlineMet": True}, token=token)
    assert status == 200, (status, text[:300])


def test_delete_cleans_everything_up(run: PoolRun) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        run.cluster.custom.delete_namespaced_custom_object(
            GROUP, VERSION, run.namespace, PLURAL, run.name)
    except ApiException as exc:
        assert exc.status == 404
    wait_for("the pool to be gone (finalizer released)", lambda: run.get() is None, timeout=120)
    wait_for("its Deployments to be gone", lambda: not run.cluster.apps.list_namespaced_deployment(
        run.namespace, label_selector=POOL_LABEL).items, timeout=120)
    wait_for("its pods to be gone", lambda: not run.pods(), timeout=180)
    wait_for("the pool to leave the published plan", lambda: (
        run.key not in run.plan().get("pools", {})
        and all(run.key not in (n.get("pools") or {})
                for n in run.plan().get("nodes", {}).values())), timeout=120)


def test_release_is_healthy_afterwards(cluster: Cluster) -> None:
    """Nothing of joulepool crashed along the way."""
    pods = cluster.core.list_namespaced_pod(
        NAMESPACE, label_selector=f"app.kubernetes.io/instance={RELEASE}").items
    assert pods
    for p in pods:
        for cs in p.status.container_statuses or []:
            assert cs.ready, (p.metadata.name, cs.name, cs.state)
