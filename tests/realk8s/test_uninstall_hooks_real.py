"""``helm install`` then ``helm uninstall`` of the chart (kind's values) by Helm's own Go SDK
against the REAL control plane: Helm runs the post-delete hooks in weight order, waits for
the hook Jobs and deletes the hooks once they succeeded.

No container ever runs here (the fake kubelet only reports pods Running), so this test
plays the kubelet's part for the hook Jobs' pods: it runs each Job pod's container
arguments as a local ``joulepool`` process, on a token of the pod's own ServiceAccount
(the hook Role is all it has), and reports the exit code in the pod's status, from which
the real Job controller completes the Job and Helm goes on. The reset DaemonSet's own
command is run against simulated GPUs in tests/integration/test_uninstall_hook_commands.py.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import k8slib
import pytest
import yaml
from k8slib import ControlPlane

ROOT = Path(__file__).resolve().parents[2]
PY = [sys.executable, "-c", "import sys; from joulepool.cli import main; sys.exit(main())"]


@dataclass
class HookJobKubelet:
    """Runs the containers of the release namespace's Job pods as local processes."""

    cp: ControlPlane
    namespace: str
    runs: list[tuple[str, list[str], int, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    _seen: set[str] = field(default_factory=set)

    def loop(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(Exception):
                for pod in self.cp.core.list_namespaced_pod(
                        self.namespace, label_selector="job-name").items:
                    if pod.metadata.uid in self._seen or pod.status.phase != "Running":
                        continue
                    self._seen.add(pod.metadata.uid)
                    threading.Thread(target=self.run_pod, args=(pod,), daemon=True).start()
            self.stop.wait(0.2)

    def run_pod(self, pod: Any) -> None:
        (container,) = pod.spec.containers
        args = [a.replace("$(POD_NAMESPACE)", self.namespace) for a in container.args]
        kubeconfig = self.cp.kubeconfig_for(pod.spec.service_account_name, self.namespace)
        env = {"KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1",
               "NO_PROXY": "127.0.0.1,localhost", "PATH": "/usr/bin:/bin"}
        done = subprocess.run([*PY, *args], env=env, capture_output=True, text=True,
                              timeout=300)
        job = pod.metadata.labels["job-name"]
        self.runs.append((job, args, done.returncode, done.stdout + done.stderr))
        t = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.cp.core.patch_namespaced_pod_status(pod.metadata.name, self.namespace, {
            "status": {"phase": "Succeeded" if done.returncode == 0 else "Failed",
                       "conditions": [{"type": "Ready", "status": "False"}],
                       "containerStatuses": [{
                           "name": container.name, "image": container.image,
                           "imageID": "", "ready": False, "restartCount": 0,
                           "state": {"terminated": {
                               "exitCode": done.returncode, "startedAt": t,
                               "finishedAt": t,
                               "reason": "Completed" if done.returncode == 0 else "Error"}}}]}})


def _install_skip_crds(cfg: Any, release: str, values: dict[str, Any], ns: str) -> None:
    """``helm install --skip-crds`` (the session installed the CRDs already; Helm would
    apply its own over them): Config.install's native call with the SDK's skip_crds
    option, which the Python wrapper does not name."""
    import json

    from helm_python import _native

    handle, ref = cfg._chart_args(str(ROOT / "charts" / "joulepool"))
    _native.call_string(
        "helm_install", cfg._raw(), cfg._context_arg(None), handle, ref, release,
        json.dumps(values), json.dumps({"namespace": ns, "create_namespace": True,
                                        "timeout_seconds": 120, "skip_crds": True}))


@pytest.fixture
def release_namespace(cluster: ControlPlane) -> Iterator[str]:
    name = f"jpu-{k8slib.free_port()}"
    try:
        yield name
    finally:
        from kubernetes.client.exceptions import ApiException

        with contextlib.suppress(ApiException):
            cluster.core.delete_namespace(name)


def test_helm_uninstall_runs_the_reset_hooks_in_order_and_cleans_them_up(
        cluster: ControlPlane, nodes: list[str], release_namespace: str) -> None:
    import helm_python as helm

    ns, release = release_namespace, "jpu"
    node = f"{ns}-h100"
    nodes.append(node)
    cluster.create_node(k8slib.gpu_node(node, "H100", 8))
    values = yaml.safe_load((ROOT / "kind" / "values.yaml").read_text())
    cfg = helm.Config(kubeconfig_path=str(cluster.kubeconfig), namespace=ns)
    _install_skip_crds(cfg, release, values, ns)
    agents = "app.kubernetes.io/component=node-agent"
    k8slib.wait_for("a node agent pod Running on the H100 node", lambda: [
        p for p in cluster.core.list_namespaced_pod(ns, label_selector=agents).items
        if p.spec.node_name == node and p.status.phase == "Running"], timeout=60)

    kubelet = HookJobKubelet(cluster, ns)
    runner = threading.Thread(target=kubelet.loop, daemon=True)
    runner.start()
    try:
        cfg.uninstall(release, timeout=240)
    finally:
        kubelet.stop.set()
        runner.join(10)
    jobs = [job for job, *_ in kubelet.runs]
    # weight 0 (agents gone) before weight 10 (every reset DaemonSet Ready)
    assert jobs == [f"{release}-joulepool-node-agent-gone",
                    f"{release}-joulepool-node-agent-reset-done"], kubelet.runs
    for job, args, code, out in kubelet.runs:
        assert code == 0, (job, args, out)
        assert ": done" in out and "forbidden" not in out.lower(), (job, out)
    assert any("--await-pods-gone" in args for _, args, _, _ in kubelet.runs)
    done_args = kubelet.runs[1][1]
    reset_sets = done_args[done_args.index("--await-daemonset") + 1].split(",")
    assert len(reset_sets) == 3  # one per simulated product of kind's values
    # hook-succeeded: Helm deleted every hook object; the agents are gone
    apps, batch = cluster.apps, __import__("kubernetes").client.BatchV1Api(cluster.api_client())
    k8slib.wait_for("hook objects deleted", lambda: not (
        apps.list_namespaced_daemon_set(ns).items or batch.list_namespaced_job(ns).items
        or [s for s in cluster.core.list_namespaced_service_account(ns).items
            if s.metadata.name != "default"]), timeout=60)
    assert not cluster.core.list_namespaced_pod(ns, label_selector=agents).items
