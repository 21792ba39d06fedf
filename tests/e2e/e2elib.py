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

The router requires the chart's bearer token on kind too, and the chart's
NetworkPolicies are rendered (enforced where the network plugin does). The API
server's service proxy drops the ``Authorization`` header and connects from the
node's address, which no policy names, so calls to the router and to the node agents'
metrics are made from inside the cluster instead: ``kubectl exec`` into a probe pod
(:func:`probe_pod_manifest`) in namespace ``monitoring`` labelled as a router client
(the chart's default ``networkPolicy.metricsFrom`` and ``routerFrom``), which runs
:data:`HTTP_CLIENT` with the token read from the chart's Secret.
"""

from __future__ import annotations

import base64
import json
import os
import time
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
#: where the probe pod runs: the namespace the chart's NetworkPolicies let scrape metrics
#: and reach the router (networkPolicy.metricsFrom, part of the router's rule)
PROBE_NAMESPACE = "monitoring"
PROBE_POD = "joulepool-e2e-probe"
#: label of the router's clients in the chart's networkPolicy.routerFrom
ROUTER_CLIENT_LABEL = "joulepool.dev/router-client"

#: run in the probe pod: python -c HTTP_CLIENT METHOD URL [BODY-JSON|-] [TOKEN]; prints
#: one JSON line {"status": int, "body": str} (any HTTP status; connection errors: 0)
HTTP_CLIENT = """
import json, sys, urllib.error, urllib.request
method, url = sys.argv[1], sys.argv[2]
body = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] != "-" else None
headers = {"Content-Type": "application/json"}
if len(sys.argv) > 4 and sys.argv[4]:
    headers["Authorization"] = "Bearer " + sys.argv[4]
req = urllib.request.Request(url, data=body.encode() if body is not None else None,
                             headers=headers, method=method)
try:
    with urllib.request.urlopen(req, timeout=float(sys.argv[5]) if len(sys.argv) > 5 else 10) as r:
        out = {"status": r.status, "body": r.read().decode("utf-8", "replace")}
except urllib.error.HTTPError as exc:
    out = {"status": exc.code, "body": exc.read().decode("utf-8", "replace")}
except OSError as exc:
    out = {"status": 0, "body": repr(exc)}
print(json.dumps(out))
"""


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


    def exec(self, namespace: str, pod: str, command: list[str], timeout: float = 60
             ) -> tuple[int | None, str, str]:
        """Run ``command`` in ``pod`` (``kubectl exec``): (exit code, stdout, stderr)."""
        from kubernetes.stream import stream

        resp = stream(self.core.connect_get_namespaced_pod_exec, pod, namespace,
                      command=command, stderr=True, stdin=False, stdout=True, tty=False,
                      _preload_content=False)
        out: list[str] = []
        err: list[str] = []
        deadline = time.monotonic() + timeout
        try:
            while resp.is_open() and time.monotonic() < deadline:
                resp.update(timeout=1)
                if resp.peek_stdout():
                    out.append(resp.read_stdout())
                if resp.peek_stderr():
                    err.append(resp.read_stderr())
            code = resp.returncode if not resp.is_open() else None
        finally:
            resp.close()
        return code, "".join(out), "".join(err)

    def http(self, method: str, url: str, body: Any = None, token: str | None = None,
             timeout: float = 10) -> tuple[int, str]:
        """An HTTP call from the probe pod (inside the cluster): (status, text); status
        0 when the connection failed (refused, timed out, blocked by a policy)."""
        argv = ["python", "-c", HTTP_CLIENT, method, url,
                json.dumps(body) if body is not None else "-", token or "", str(timeout)]
        code, out, err = self.exec(PROBE_NAMESPACE, PROBE_POD, argv, timeout=timeout + 30)
        if code != 0 or not out.strip():
            raise RuntimeError(f"probe pod call failed ({code}): {err[-500:] or out[-500:]}")
        answer = json.loads(out.strip().splitlines()[-1])
        return int(answer["status"]), str(answer["body"])

    def router_token(self) -> str:
        """The router's bearer token from the chart's Secret (auth is on, kind too)."""
        secret = self.core.read_namespaced_secret(f"{RELEASE}-router-token", NAMESPACE)
        return base64.b64decode(secret.data["token"]).decode()

    def router_url(self) -> str:
        """The router Service's in-cluster URL (its ``http`` port)."""
        svc = self.core.read_namespaced_service(f"{RELEASE}-router", NAMESPACE)
        port = next(p.port for p in svc.spec.ports if p.name == "http")
        return f"http://{RELEASE}-router.{NAMESPACE}.svc:{port}"


def probe_pod_manifest(image: str = IMAGE) -> dict[str, Any]:
    """The probe pod: the image under test (it has Python), holding until deleted,
    unprivileged, labelled as a router client."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": PROBE_POD, "namespace": PROBE_NAMESPACE,
                     "labels": {ROUTER_CLIENT_LABEL: "true",
                                "app.kubernetes.io/name": "joulepool-e2e-probe"}},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "automountServiceAccountToken": False,
            "containers": [{
                "name": "probe", "image": image,
                "imagePullPolicy": "Never" if image == "joulepool:dev" else "IfNotPresent",
                "args": ["node-agent", "--hold"],
                "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                                    "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}},
                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]}],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
        },
    }


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
