"""Session fixtures of the end-to-end tests: the cluster, or a skip saying why not.

See e2elib.py for how to run them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

# the helper module next to this file, importable under any --import-mode
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest
from e2elib import (
    CONNECT_TIMEOUT,
    NAMESPACE,
    PROBE_NAMESPACE,
    PROBE_POD,
    RELEASE,
    ROOT,
    Cluster,
    probe_pod_manifest,
)


def _maybe_up() -> Iterator[None]:
    if os.environ.get("JOULEPOOL_E2E_UP") != "1":
        yield
        return
    missing = [t for t in ("docker", "kind", "kubectl", "helm") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"JOULEPOOL_E2E_UP=1 needs {', '.join(missing)} on PATH")
    subprocess.run([str(ROOT / "kind" / "up.sh")], check=True, cwd=ROOT, timeout=1800)
    os.environ.setdefault("JOULEPOOL_E2E_CONTEXT", "kind-joulepool")
    try:
        yield
    finally:
        if os.environ.get("JOULEPOOL_E2E_KEEP") != "1":
            subprocess.run([str(ROOT / "kind" / "down.sh")], check=False, cwd=ROOT, timeout=600)


@pytest.fixture(scope="session")
def _kind_cluster() -> Iterator[None]:
    yield from _maybe_up()


@pytest.fixture(scope="session")
def cluster(_kind_cluster: None) -> Cluster:
    """The reachable cluster with joulepool installed, or a skip that says why not."""
    try:
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException
    except ImportError:
        pytest.skip("the kubernetes client is not installed")
    context = os.environ.get("JOULEPOOL_E2E_CONTEXT")
    kubeconfig = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    if not any(Path(p).is_file() for p in kubeconfig.split(os.pathsep)):
        pytest.skip(f"no cluster: no kubeconfig at {kubeconfig} (run kind/up.sh, or set "
                    "KUBECONFIG)")
    try:
        cfg = client.Configuration()
        config.load_kube_config(context=context, client_configuration=cfg)
        probe = client.Configuration()
        config.load_kube_config(context=context, client_configuration=probe)
    except (ConfigException, ValueError, OSError) as exc:
        pytest.skip(f"no cluster: cannot load kubeconfig {kubeconfig}: {exc}")
    probe.retries = False  # one try, bounded by CONNECT_TIMEOUT
    try:
        client.VersionApi(client.ApiClient(probe)).get_code(_request_timeout=CONNECT_TIMEOUT)
    except Exception as exc:  # connection refused, TLS, timeout, 401 ...
        pytest.skip(f"no cluster: {cfg.host} is not reachable within {CONNECT_TIMEOUT}s "
                    f"({type(exc).__name__}: {str(exc)[:120]}); run kind/up.sh")
    api_client = client.ApiClient(cfg)
    host = cfg.host
    c = Cluster(api_client, client.CoreV1Api(api_client), client.AppsV1Api(api_client),
                client.CustomObjectsApi(api_client), context)
    try:
        dep = c.apps.read_namespaced_deployment(f"{RELEASE}-operator", NAMESPACE)
    except client.exceptions.ApiException as exc:
        pytest.skip(f"joulepool is not installed on {host}: no Deployment "
                    f"{NAMESPACE}/{RELEASE}-operator ({exc.status}); run kind/up.sh")
    if not (dep.status.available_replicas or 0):
        pytest.fail(f"joulepool is installed on {host} but its operator is not available")
    return c


@pytest.fixture(scope="session")
def probe(cluster: Cluster) -> Iterator[Cluster]:
    """The cluster, with the probe pod (e2elib.probe_pod_manifest) Running in namespace
    monitoring: calls to the router (bearer token) and to the node agents' metrics are
    made from there (see e2elib's docstring). Removed afterwards, with the namespace if
    this fixture created it."""
    from kubernetes.client.exceptions import ApiException

    created_ns = False
    try:
        cluster.core.read_namespace(PROBE_NAMESPACE)
    except ApiException as exc:
        if exc.status != 404:
            raise
        cluster.core.create_namespace({"metadata": {"name": PROBE_NAMESPACE}})
        created_ns = True
    try:
        try:
            cluster.core.create_namespaced_pod(PROBE_NAMESPACE, probe_pod_manifest())
        except ApiException as exc:
            if exc.status != 409:  # left by an earlier run: reuse it
                raise
        deadline = time.monotonic() + 120
        while True:
            pod = cluster.core.read_namespaced_pod(PROBE_POD, PROBE_NAMESPACE)
            if pod.status.phase == "Running" and all(
                    c.ready for c in pod.status.container_statuses or []):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"probe pod {PROBE_NAMESPACE}/{PROBE_POD} not Running: "
                            f"{pod.status.phase} {pod.status.container_statuses}")
            time.sleep(1)
        yield cluster
    finally:
        try:
            if created_ns:
                cluster.core.delete_namespace(PROBE_NAMESPACE)
            else:
                cluster.core.delete_namespaced_pod(PROBE_POD, PROBE_NAMESPACE)
        except ApiException as exc:
            if exc.status != 404:
                raise
