"""The operator against a REAL control plane (``../shared/k8s``): helpers for its tests.

A module-scoped control plane (kube-apiserver, kube-controller-manager, kube-scheduler
v1.30 and the fake kubelet), joulepool's CRDs installed from ``crds/``, and the operator
started as a process (``joulepool operator``) the way a user runs it. Pods are scheduled
by the real default scheduler (the operator is given ``--scheduler-name
default-scheduler``), so the per-node shares of the plan are checked against real binds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = Path(os.environ.get("K8S_LOCAL", ROOT / ".." / "shared" / "k8s"))
OP_NAMESPACE = "joulepool-system"
GROUP, VERSION = "joulepool.dev", "v1alpha1"
H100 = "NVIDIA-H100-80GB-HBM3"
L4 = "NVIDIA-L4"


def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Start a control plane (skip when ``../shared/k8s`` is unavailable); yield its dir."""
    if not (K8S / "up.sh").is_file() or not (K8S / "bin" / "kube-apiserver.gz").is_file():
        pytest.skip(f"local Kubernetes control plane not available ({K8S})")
    run_dir = tmp_path_factory.mktemp("k8s")
    up = subprocess.run(["bash", str(K8S / "up.sh"), str(run_dir)],
                        capture_output=True, text=True, timeout=400)
    if up.returncode == 3:
        pytest.skip("local Kubernetes control plane: " + up.stderr.strip().splitlines()[-1])
    if up.returncode != 0:
        subprocess.run(["bash", str(K8S / "down.sh"), str(run_dir)], capture_output=True)
        pytest.fail("up.sh failed:\n" + up.stderr[-3000:])
    try:
        yield run_dir
    finally:
        subprocess.run(["bash", str(K8S / "down.sh"), str(run_dir)], capture_output=True)


class Kube:
    """The test's own client (admin credentials), with the shortcuts the scenarios use."""

    def __init__(self, kubeconfig: Path) -> None:
        from kubernetes import client, config

        self.kubeconfig = kubeconfig
        self.api = config.new_client_from_config(config_file=str(kubeconfig))
        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.ext = client.ApiextensionsV1Api(self.api)

    def install_crds(self) -> None:
        for path in sorted((ROOT / "crds").glob("*.yaml")):
            self.ext.create_custom_resource_definition(yaml.safe_load(path.read_text()))
        for path in sorted((ROOT / "crds").glob("*.yaml")):
            name = yaml.safe_load(path.read_text())["metadata"]["name"]
            wait_for(lambda name=name: _established(self.ext.read_custom_resource_definition(
                name)), what=f"CRD {name} established")

    def namespace(self, name: str | None = None) -> str:
        name = name or f"t-{uuid.uuid4().hex[:8]}"
        self.core.create_namespace({"metadata": {"name": name}})
        return name

    # -- nodes -----------------------------------------------------------------
    def add_node(self, name: str, product: str = H100, gpus: int = 8) -> None:
        self.core.create_node({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "annotations": {"kwok.x-k8s.io/node": "fake"},
                         "labels": {"nvidia.com/gpu.product": product,
                                    "nvidia.com/gpu.present": "true",
                                    "topology.kubernetes.io/region": "us-east"}},
            "status": {"capacity": _capacity(gpus), "allocatable": _capacity(gpus)},
        })

    def set_ready(self, name: str, ready: bool) -> None:
        self.core.patch_node(name, {"metadata": {"annotations": {
            "k8s-real/ready": "true" if ready else "false"}}})

    def delete_node(self, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.delete_node(name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    # -- pools -------------------------------------------------------------------
    def create_pool(self, namespace: str, name: str, rps: float, **spec: Any) -> dict[str, Any]:
        body = pool_body(namespace, name, rps, **spec)
        return self.custom.create_namespaced_custom_object(  # type: ignore[no-any-return]
            GROUP, VERSION, namespace, "inferencepools", body)

    def patch_pool(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, "inferencepools", name, patch)

    def pool(self, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.custom.get_namespaced_custom_object(  # type: ignore[no-any-return]
                GROUP, VERSION, namespace, "inferencepools", name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def delete_pool(self, namespace: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(
            GROUP, VERSION, namespace, "inferencepools", name)

    def deployments(self, namespace: str) -> dict[str, Any]:
        items = self.apps.list_namespaced_deployment(namespace).items
        return {d.metadata.name: d for d in items}

    def pods_per_node(self, namespace: str, pool_key: str) -> dict[str, int]:
        """Running pods of a pool by node (the real scheduler's binds)."""
        out: dict[str, int] = {}
        pods = self.core.list_namespaced_pod(
            namespace, label_selector=f"joulepool.dev/pool={pool_key}").items
        for p in pods:
            if p.spec.node_name and p.metadata.deletion_timestamp is None:
                out[p.spec.node_name] = out.get(p.spec.node_name, 0) + 1
        return out


def _capacity(gpus: int) -> dict[str, str]:
    return {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": str(gpus)}


def _established(crd: Any) -> bool:
    return any(c.type == "Established" and c.status == "True"
               for c in (crd.status.conditions or ()))


def pool_body(namespace: str, name: str, rps: float, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "InferencePool",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": "llama-3.1-8b",
            "slo": {"ttftSeconds": 1.0, "tpotSeconds": 0.1},
            "demand": {"requestsPerSecond": rps, "meanInputTokens": 1000,
                       "meanOutputTokens": 200},
            "template": {"metadata": {"labels": {"app": name}},
                         "spec": {"containers": [{"name": "engine",
                                                  "image": "vllm/vllm-openai:v0.6.0"}]}},
            **spec,
        },
    }


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c  # type: ignore[no-any-return]
    return None


def planned_per_node(obj: dict[str, Any] | None) -> dict[str, int]:
    """The pool's status assignments as instances per node."""
    out: dict[str, int] = {}
    for a in ((obj or {}).get("status") or {}).get("assignments") or []:
        if a.get("instances", 0) > 0:
            out[a["node"]] = out.get(a["node"], 0) + int(a["instances"])
    return out


def wait_for(check: Callable[[], Any], timeout: float = 60.0, interval: float = 0.25,
             what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
        except AssertionError as exc:
            last = exc
        if last and not isinstance(last, AssertionError):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or check}: "
                                 f"{last!r}")
        time.sleep(interval)


class OperatorProcess:
    """``joulepool operator`` as a child process with the control plane's kubeconfig."""

    def __init__(self, kubeconfig: Path, log_path: Path, *extra: str) -> None:
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig),
               "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
        cmd = [sys.executable, "-m", "joulepool.cli", "operator", "--namespace", OP_NAMESPACE,
               "--scheduler-name", "default-scheduler", "--debounce-seconds", "0.2",
               "--liveness", "0", *self.extra]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     cwd=ROOT)
        log.close()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
