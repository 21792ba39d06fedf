"""Shared by the end-to-end tests (conftest.py and the test modules).

End-to-end tests run against a real cluster with joulepool installed.

They target the cluster KUBECONFIG names (its current context, or
JOULEPOOL_E2E_CONTEXT) -- the kind cluster of `kind/up.sh` -- and skip, with
the reason, when there is none or joulepool is not installed in it.

    kind/up.sh && pytest -m e2e tests/e2e          # against the kind cluster
    JOULEPOOL_E2E_UP=1 pytest -m e2e tests/e2e     # kind/up.sh before, kind/down.sh after

Environment: JOULEPOOL_E2E_CONTEXT (kube context), JOULEPOOL_E2E_NAMESPACE
(release namespace, default joulepool-system), JOULEPOOL_E2E_RELEASE (default
joulepool), JOULEPOOL_E2E_IMAGE (serving image, default joulepool:dev, pulled
Never as on kind), JOULEPOOL_E2E_UP=1 / JOULEPOOL_E2E_KEEP=1 (create the kind
cluster / keep it afterwards).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = os.environ.get("JOULEPOOL_E2E_NAMESPACE", "joulepool-system")
RELEASE = os.environ.get("JOULEPOOL_E2E_RELEASE", "joulepool")
IMAGE = os.environ.get("JOULEPOOL_E2E_IMAGE", "joulepool:dev")
SCHEDULER = "joulepool-scheduler"
#: seconds to reach the API server before the tests skip
CONNECT_TIMEOUT = 5


@dataclass
class Cluster:
    """Clients for the cluster under test."""

    api_client: Any
    core: Any
    apps: Any
    custom: Any
    context: str | None

    def proxy(self, method: str, path: str, body: Any = None, timeout: float = 10) -> Any:
        """A raw call through the API server (service/pod proxy): (status, text).

        Any status comes back as the first item (errors are not raised), so callers can
        wait on 404/503 while the service starts."""
        from kubernetes.client.exceptions import ApiException

        headers = {"Content-Type": "application/json", "Accept": "*/*"}
        try:
            if hasattr(self.api_client, "param_serialize"):  # client >= 30 (OpenAPI gen. 7)
                params = self.api_client.param_serialize(
                    method=method, resource_path=path, header_params=headers, body=body,
                    auth_settings=["BearerToken"])
                resp = self.api_client.call_api(*params, _request_timeout=timeout)
                data = resp.read()
            else:  # older clients: call_api(path, method, ...) -> (response, status, headers)
                resp = self.api_client.call_api(
                    path, method, body=body, header_params=headers,
                    auth_settings=["BearerToken"], _preload_content=False,
                    _request_timeout=timeout)[0]
                data = resp.data
        except ApiException as exc:
            return exc.status, exc.body.decode() if isinstance(exc.body, bytes) else exc.body
        return resp.status, data.decode() if isinstance(data, bytes) else str(data)


def pool_manifest(namespace: str, name: str) -> dict[str, Any]:
    """The kind example pool (fake engine), renamed, with the image under test."""
    pool: dict[str, Any] = yaml.safe_load(
        (ROOT / "examples" / "kind-chat-pool.yaml").read_text())
    pool["metadata"] = {"name": name, "namespace": namespace}
    pool["spec"]["demand"] = {"requestsPerSecond": 1, "meanInputTokens": 256,
                              "meanOutputTokens": 64}
    for c in pool["spec"]["template"]["spec"]["containers"]:
        c["image"] = IMAGE
        if IMAGE != "joulepool:dev":
            c["imagePullPolicy"] = "IfNotPresent"
    return pool


def metric_sum(text: str, name: str) -> float:
    """Sum of every sample of the metric ``name`` in a Prometheus text exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            total += float(line.rsplit(" ", 1)[1])
    return total
