"""A replacement pod whose filter comes before the extender's watch has seen the old pod's
deletion, on the real control plane: kube-scheduler v1.30 with the chart's configuration,
the extender on the chart's scheduler ServiceAccount, its pod watch held back by a
loopback proxy (lagproxy.py). The node looks full only because of the deleted pod; the
extender re-reads that node's pods from the API server and lets the replacement in at
once (the old code refused it until the watch caught up: FailedScheduling, then
kube-scheduler's backoff)."""

from __future__ import annotations

import json
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import k8slib
import pytest
from k8slib import ControlPlane
from lagproxy import LaggingProxy
from test_extender_placement import SCHEDULER_NAME

from joulepool.kube import testing as T


@pytest.fixture
def proxy(cluster: ControlPlane) -> Iterator[LaggingProxy]:
    p = LaggingProxy(cluster.server, cluster.ca_file)
    p.start()
    try:
        yield p
    finally:
        p.stop()


def _metric(base: str, name: str, labels: str) -> float:
    with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(f"{name}{{{labels}}} "):
                return float(line.split()[1])
    return 0.0


def _filter(base: str, pod: dict[str, Any], node: str) -> dict[str, Any]:
    req = urllib.request.Request(base + "/scheduler/filter",
                                 data=json.dumps(T.extender_args(pod, names=[node])).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        out: dict[str, Any] = json.loads(r.read())
        return out


def test_replacement_pod_placed_while_the_extenders_watch_is_behind(
        cluster: ControlPlane, chart: Any, namespace: str, nodes: list[str],
        proxy: LaggingProxy) -> None:
    node = f"lag-h100-{k8slib.free_port()}"
    nodes.append(node)
    cluster.create_node(k8slib.gpu_node(node, "H100", 8))
    pool, mode = f"{namespace}.chat", "2xH100"
    # the extender talks to the API server through the proxy, as the chart's scheduler SA
    kubeconfig = cluster.run_dir / "sa" / f"extender-lag-{namespace}.kubeconfig"
    kubeconfig.parent.mkdir(exist_ok=True)
    k8slib.write_kubeconfig(kubeconfig, proxy.url, cluster.ca_file,
                            cluster.service_account_token(k8slib.service_account("scheduler")))
    port = k8slib.free_port()
    base = f"http://127.0.0.1:{port}"
    with k8slib.components(cluster) as procs:
        extender = procs.start("extender-lag", [
            sys.executable, "-m", "joulepool.cli", "extender", "--host", "127.0.0.1",
            "--port", str(port), "--namespace", k8slib.RELEASE_NAMESPACE,
            "--scrape-interval-seconds", "0"], kubeconfig)
        extender.wait_log("listening on", timeout=60)
        scheduler = k8slib.start_second_scheduler(cluster, procs, chart, base + "/scheduler",
                                                  name="joulepool-scheduler-lag")
        k8slib.publish_plan(cluster, {pool: [(node, "H100", 1, 2)]}, version=950)
        core = cluster.core
        core.create_namespaced_pod(namespace, k8slib.serving_pod(
            "chat-old", pool, mode, 2, scheduler=SCHEDULER_NAME))
        k8slib.wait_for("chat-old bound", lambda: core.read_namespaced_pod(
            "chat-old", namespace).spec.node_name == node, timeout=60)
        # the extender's cache counts chat-old against the mode's 2-GPU share
        probe = T.pod("probe", namespace=namespace, pool=pool, gpus=2, mode=mode)
        k8slib.wait_for("the extender to count chat-old", lambda: "would hold 4 GPUs" in str(
            _filter(base, probe, node)["FailedAndUnresolvableNodes"]), timeout=30)

        proxy.hold.set()  # from here the extender's pod watch is behind
        core.delete_namespaced_pod("chat-old", namespace, grace_period_seconds=0)
        k8slib.wait_for("chat-old gone", lambda: not any(
            p.metadata.name == "chat-old" for p in core.list_namespaced_pod(namespace).items))
        core.create_namespaced_pod(namespace, k8slib.serving_pod(
            "chat-new", pool, mode, 2, scheduler=SCHEDULER_NAME))
        # placed while the watch is still held (the old code waited for the watch)
        try:
            k8slib.wait_for("chat-new bound while the extender's watch is behind",
                            lambda: core.read_namespaced_pod(
                                "chat-new", namespace).spec.node_name == node, timeout=20)
        except AssertionError as exc:
            events = core.list_namespaced_event(
                namespace, field_selector="involvedObject.name=chat-new").items
            raise AssertionError(f"{exc}; events: {[e.message for e in events]}\n"
                                 f"extender log:\n{extender.log()[-3000:]}") from None
        assert proxy.hold.is_set() and proxy.held_lines > 0
        assert _metric(base, "joulepool_extender_fresh_pod_reads_total",
                       'result="corrected"') >= 1
        events = core.list_namespaced_event(
            namespace, field_selector="involvedObject.name=chat-new").items
        assert not [e for e in events if e.reason == "FailedScheduling"], [
            e.message for e in events]
        proxy.hold.clear()
        assert extender.forbidden_lines() == [] and scheduler.forbidden_lines() == []
