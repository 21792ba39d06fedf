"""A real Kubernetes control plane for tests: ``../shared/k8s`` (kube-apiserver,
kube-controller-manager, kube-scheduler v1.30 and a fake kubelet as local processes).

What the real-API tests build on:

* :func:`start_control_plane` / :class:`ControlPlane`: ``up.sh`` in a run directory,
  admin clients, ``down.sh``;
* :meth:`ControlPlane.apply` (server-side apply of any object), :func:`install_crds`
  (``crds/*.yaml``), :func:`render_chart` (the real Helm engine, ``tests/chart/chartlib.py``)
  and :func:`apply_rbac` (the chart's ServiceAccounts, Roles, ClusterRoles and bindings);
* :meth:`ControlPlane.kubeconfig_for` (a TokenRequest token of a ServiceAccount written
  into a kubeconfig of its own), so each component runs with only the chart's RBAC;
* :func:`gpu_node` / :meth:`ControlPlane.create_node` (fake GPU nodes the fake kubelet keeps
  Ready), :func:`publish_plan` (the plan ConfigMap as the operator writes it),
  :func:`serving_pod` / :func:`serving_pool` (a pool's serving pods, bound directly or left
  to a scheduler), :func:`router_token` / :func:`chart_router_args` (the router as the
  chart runs it), :func:`call_json` (one JSON call to a local service),
  :class:`Component` (a joulepool component or a second kube-scheduler as a local
  process with its own log), :func:`scheduler_config` (the chart's scheduler configuration
  with the kubeconfig and extender URL made local).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

ROOT = Path(__file__).resolve().parents[2]
#: the local control plane (README.md there); K8S_LOCAL overrides it
K8S = Path(os.environ.get("K8S_LOCAL", ROOT.parent / "shared" / "k8s"))
CRD_DIR = ROOT / "crds"
#: namespace the chart's objects are rendered for and installed in
RELEASE_NAMESPACE = "joulepool-system"
RELEASE = "joulepool"
#: API audience of the local API server (up.sh --api-audiences)
API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"
#: annotation that makes the fake kubelet report a node NotReady
NOT_READY_ANNOTATION = "k8s-real/ready"
#: RBAC kinds of a rendered chart, in the order they are applied
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "Role", "ClusterRoleBinding", "RoleBinding")
FIELD_MANAGER = "joulepool-tests"
#: an RBAC denial as kube-apiserver words it (in kube-scheduler's, the kubernetes client's
#: and kopf's logs); other 403s, such as writes into a terminating namespace, are not RBAC
FORBIDDEN = re.compile(r'forbidden: User "[^"]*" cannot |'
                       r'\bcannot (?:get|list|watch|create|update|patch|delete) resource "')

T = TypeVar("T")


class GiveUp(AssertionError):
    """Raised by a :func:`wait_for` check: stop waiting now (e.g. the process exited)."""


class ControlPlaneUnavailable(RuntimeError):
    """The local control plane cannot run here (the reason is the message)."""


def unavailable_reason() -> str | None:
    """Why the local control plane cannot be started here, or None if it can be tried."""
    if not (K8S / "up.sh").is_file() or not (K8S / "bin" / "kube-apiserver.gz").is_file():
        return f"local Kubernetes control plane not available ({K8S}: no up.sh / binaries)"
    if sys.platform != "linux" or os.uname().machine not in ("x86_64", "amd64"):
        return "local Kubernetes control plane needs Linux x86-64"
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(what: str, check: Callable[[], T | None], timeout: float = 30.0,
             interval: float = 0.1) -> T:
    """Poll ``check`` until it returns something truthy; AssertionError naming ``what``
    (and the last exception, if any) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = check()
            if value:
                return value
        except GiveUp:
            raise
        except Exception as exc:  # the thing is not there yet
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}"
                                 + (f" (last error: {last!r})" if last else ""))
        time.sleep(interval)


# -- the control plane -----------------------------------------------------------------------

@dataclass
class ControlPlane:
    """A running local control plane (``up.sh`` in ``run_dir``)."""

    run_dir: Path
    env: dict[str, str]
    _clients: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def kubeconfig(self) -> Path:
        """Admin kubeconfig (system:masters)."""
        return self.run_dir / "kubeconfig"

    @property
    def server(self) -> str:
        return self.env["K8S_APISERVER"]

    @property
    def ca_file(self) -> Path:
        return self.run_dir / "pki" / "ca.crt"

    @property
    def bin_dir(self) -> Path:
        return self.run_dir / "bin"

    @property
    def logs_dir(self) -> Path:
        path = self.run_dir / "logs"
        path.mkdir(exist_ok=True)
        return path

    # -- clients ----------------------------------------------------------------------------
    def api_client(self, kubeconfig: Path | None = None) -> Any:
        """A kubernetes ApiClient for ``kubeconfig`` (default: admin), cached per file."""
        from kubernetes import config

        key = str(kubeconfig or self.kubeconfig)
        if key not in self._clients:
            self._clients[key] = config.new_client_from_config(config_file=key)
        return self._clients[key]

    @property
    def core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api_client())

    @property
    def apps(self) -> Any:
        from kubernetes import client

        return client.AppsV1Api(self.api_client())

    @property
    def custom(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self.api_client())

    def dynamic(self) -> Any:
        from kubernetes.dynamic import DynamicClient

        key = "dynamic"
        if key not in self._clients:
            self._clients[key] = DynamicClient(self.api_client())
        return self._clients[key]

    # -- objects ----------------------------------------------------------------------------
    def apply(self, obj: Mapping[str, Any], namespace: str | None = None) -> Any:
        """Server-side apply of one object (any kind the API server serves); returns it."""
        body = {k: v for k, v in obj.items() if k != "__file__"}
        resource = self.dynamic().resources.get(api_version=body["apiVersion"],
                                                kind=body["kind"])
        ns = None
        if resource.namespaced:
            ns = body.get("metadata", {}).get("namespace") or namespace or "default"
            body = {**body, "metadata": {**body["metadata"], "namespace": ns}}
        return resource.server_side_apply(body=body, name=body["metadata"]["name"],
                                          namespace=ns, field_manager=FIELD_MANAGER,
                                          force_conflicts=True)

    def apply_all(self, objs: Iterable[Mapping[str, Any]],
                  namespace: str | None = None) -> None:
        for obj in objs:
            self.apply(obj, namespace)

    def ensure_namespace(self, name: str) -> None:
        self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    def create_node(self, body: Mapping[str, Any]) -> Any:
        """Create a Node (its status is accepted on create) and wait until the fake
        kubelet reports it Ready."""
        name = body["metadata"]["name"]
        self.core.create_node(dict(body))
        return wait_for(f"node {name} Ready", lambda: self.node_ready(name), timeout=30)

    def node_ready(self, name: str) -> bool:
        node = self.core.read_node(name)
        return any(c.type == "Ready" and c.status == "True"
                   for c in (node.status.conditions or []))

    def set_node_ready(self, name: str, ready: bool) -> None:
        """Make the fake kubelet report the node (Not)Ready, and wait until it does."""
        self.core.patch_node(name, {"metadata": {"annotations": {
            NOT_READY_ANNOTATION: None if ready else "false"}}})
        wait_for(f"node {name} Ready={ready}", lambda: self.node_ready(name) == ready,
                 timeout=30)

    def delete_nodes(self, names: Iterable[str]) -> None:
        from kubernetes.client.exceptions import ApiException

        for name in names:
            with contextlib.suppress(ApiException):
                self.core.delete_node(name)

    # -- identities ---------------------------------------------------------------------------
    def service_account_token(self, name: str, namespace: str = RELEASE_NAMESPACE,
                              seconds: int = 3600) -> str:
        """A bound token of ServiceAccount ``namespace/name`` (TokenRequest API)."""
        from kubernetes import client

        request = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(
            audiences=[API_AUDIENCE], expiration_seconds=seconds))
        status = self.core.create_namespaced_service_account_token(name, namespace, request)
        token: str = status.status.token
        return token

    def kubeconfig_for(self, name: str, namespace: str = RELEASE_NAMESPACE) -> Path:
        """A kubeconfig that authenticates as ServiceAccount ``namespace/name`` (written
        to the run directory; the token is a fresh TokenRequest token)."""
        path = self.run_dir / "sa" / f"{namespace}.{name}.kubeconfig"
        path.parent.mkdir(exist_ok=True)
        write_kubeconfig(path, self.server, self.ca_file,
                         self.service_account_token(name, namespace), user=f"{namespace}.{name}")
        return path


def write_kubeconfig(path: Path, server: str, ca_file: Path, token: str,
                     user: str = "user") -> None:
    """A kubeconfig with one cluster, one bearer-token user and a current context."""
    doc = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "local", "cluster": {
            "server": server, "certificate-authority": str(ca_file)}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": user}}],
        "current-context": "local",
    }
    path.write_text(yaml.safe_dump(doc))
    path.chmod(0o600)


def _read_env(run_dir: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in (run_dir / "env").read_text().splitlines():
        line = line.strip().removeprefix("export ")
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            env[key] = value.strip("'\"")
    return env


def start_control_plane(run_dir: Path, **knobs: str) -> ControlPlane:
    """``up.sh run_dir`` (with ``knobs`` as its environment variables, README's knobs).

    Raises :class:`ControlPlaneUnavailable` when a prerequisite is missing (exit 3)
    and RuntimeError when it fails to come up.
    """
    reason = unavailable_reason()
    if reason:
        raise ControlPlaneUnavailable(reason)
    env = {**os.environ, **knobs}
    env.pop("KUBECONFIG", None)
    up = subprocess.run(["bash", str(K8S / "up.sh"), str(run_dir)], capture_output=True,
                        text=True, timeout=600, env=env)
    if up.returncode == 3:
        lines = up.stderr.strip().splitlines() or ["prerequisite missing"]
        raise ControlPlaneUnavailable("local Kubernetes control plane: " + lines[-1])
    if up.returncode != 0:
        raise RuntimeError(f"up.sh failed ({up.returncode}):\n{up.stderr[-4000:]}")
    return ControlPlane(run_dir=run_dir, env=_read_env(run_dir))


def stop_control_plane(run_dir: Path) -> None:
    subprocess.run(["bash", str(K8S / "down.sh"), str(run_dir)], capture_output=True,
                   timeout=120, check=False)


# -- CRDs and the chart ------------------------------------------------------------------------

def install_crds(cp: ControlPlane) -> list[str]:
    """Apply ``crds/*.yaml`` and wait until each is Established; returns their names."""
    names = []
    for path in sorted(CRD_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                cp.apply(doc)
                names.append(doc["metadata"]["name"])
    from kubernetes import client

    ext = client.ApiextensionsV1Api(cp.api_client())

    def established(name: str) -> bool:
        conds = ext.read_custom_resource_definition(name).status.conditions or []
        return any(c.type == "Established" and c.status == "True" for c in conds)

    for name in names:
        wait_for(f"CRD {name} Established", lambda n=name: established(n), timeout=30)
    return names


def _chartlib() -> Any:
    chart_tests = str(ROOT / "tests" / "chart")
    if chart_tests not in sys.path:
        sys.path.insert(0, chart_tests)
    import chartlib

    return chartlib


def render_chart(values: Mapping[str, Any] | None = None) -> Any:
    """The chart rendered by the real Helm engine for release ``joulepool`` in
    :data:`RELEASE_NAMESPACE`, for Kubernetes v1.30: a ``chartlib.Rendered``."""
    chartlib = _chartlib()
    return chartlib.Rendered(chartlib.render_raw(
        dict(values) if values is not None else None, kube_version="v1.30.1",
        namespace=RELEASE_NAMESPACE, name=RELEASE))


def rbac_objects(rendered: Any) -> list[dict[str, Any]]:
    """The chart's ServiceAccounts, (Cluster)Roles and (Cluster)RoleBindings, in apply order."""
    return [o for kind in RBAC_KINDS for o in rendered.all(kind)]


def apply_rbac(cp: ControlPlane, rendered: Any) -> list[dict[str, Any]]:
    """Create the release namespace and apply the chart's RBAC; returns what was applied."""
    cp.ensure_namespace(RELEASE_NAMESPACE)
    objs = rbac_objects(rendered)
    for obj in objs:
        cp.apply(obj, RELEASE_NAMESPACE)
    return objs


def service_account(component: str) -> str:
    """The chart's ServiceAccount name of ``component`` (operator, scheduler, router, ...)."""
    return f"{RELEASE}-{component}"


# -- fake GPU nodes ------------------------------------------------------------------------------

def gpu_node(name: str, product: str = "L4", gpus: int = 4, region: str = "eu-west",
             labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A fake GPU Node (kept Ready by the fake kubelet) labelled as GPU Feature Discovery
    labels a real one; ``product`` is a short name (H100, A100, L4) or a product label."""
    from joulepool.api.contract import (
        GPU_COUNT_LABEL,
        GPU_PRESENT_LABEL,
        GPU_PRODUCT_LABEL,
        GPU_RESOURCE,
        REGION_LABEL,
        ZONE_LABEL,
    )
    from joulepool.kube.testing import PRODUCT_LABELS

    resources = {"cpu": "64", "memory": "512Gi", "pods": "110", GPU_RESOURCE: str(gpus)}
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {FAKE_NODE_ANNOTATION: "fake"},
            "labels": {
                "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                REGION_LABEL: region, ZONE_LABEL: f"{region}-a",
                GPU_PRODUCT_LABEL: PRODUCT_LABELS.get(product, product),
                GPU_COUNT_LABEL: str(gpus), GPU_PRESENT_LABEL: "true",
                **(labels or {}),
            },
        },
        "status": {"capacity": dict(resources), "allocatable": dict(resources)},
    }


# -- plans and serving pods ----------------------------------------------------------------------

def publish_plan(cp: ControlPlane, pools: Mapping[str, list[Any]], version: int) -> None:
    """Write the plan ConfigMap as the operator does (``kube.testing.plan``'s assignments:
    ``(node, product, instances[, GPUs per instance])``)."""
    from joulepool.api.plan import PLAN_CONFIGMAP, PLAN_KEY
    from joulepool.kube import testing as T

    cp.apply({"apiVersion": "v1", "kind": "ConfigMap",
              "metadata": {"name": PLAN_CONFIGMAP, "namespace": RELEASE_NAMESPACE},
              "data": {PLAN_KEY: T.plan(dict(pools), version=version).to_json()}})


def serving_pod(name: str, pool: str, mode: str, gpus: int = 1, node: str | None = None,
                scheduler: str | None = None, port: int = 8000) -> dict[str, Any]:
    """A pool's serving Pod (pool and mode labels, one engine container asking for
    ``gpus`` GPUs, an ``http`` port): bound to ``node`` directly when given, else left to
    ``scheduler`` (``terminationGracePeriodSeconds: 0``: deleted at once)."""
    from joulepool.api.contract import GPU_RESOURCE, MODE_LABEL, POOL_LABEL

    spec: dict[str, Any] = {"containers": [{
        "name": "engine", "image": "engine:test",
        "ports": [{"name": "http", "containerPort": port}],
        "resources": {"limits": {GPU_RESOURCE: str(gpus)}}}]}
    if node is not None:
        spec["nodeName"] = node
    if scheduler is not None:
        spec["schedulerName"] = scheduler
        spec["terminationGracePeriodSeconds"] = 0
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {POOL_LABEL: pool, MODE_LABEL: mode}},
            "spec": spec}


@dataclass(frozen=True)
class ServingPool:
    pool: str  #: ``<namespace>.<name>``
    node: str
    pod: str
    ip: str  #: the serving pod's IP (the fake kubelet's)


def serving_pool(cp: ControlPlane, namespace: str, nodes: list[str], tag: str,
                 version: int) -> ServingPool:
    """Pool ``<namespace>.chat`` with one 1xH100 serving pod ``chat-0`` bound directly to a
    new fake 8 x H100 node ``<tag>-h100-<n>`` (appended to ``nodes``), in a plan published
    as ``version``; returns once the pod has its IP."""
    node = f"{tag}-h100-{free_port()}"
    nodes.append(node)
    cp.create_node(gpu_node(node, "H100", 8))
    pool = f"{namespace}.chat"
    publish_plan(cp, {pool: [(node, "H100", 1)]}, version)
    cp.core.create_namespaced_pod(namespace, serving_pod("chat-0", pool, "1xH100", node=node))
    ip = wait_for("the serving pod's IP", lambda: cp.core.read_namespaced_pod(
        "chat-0", namespace).status.pod_ip)
    return ServingPool(pool, node, "chat-0", str(ip))


# -- the router with the chart's arguments -----------------------------------------------------

def router_token(rendered: Any) -> str:
    """The bearer token of the chart's router Secret (what a gateway sends)."""
    import base64

    secret = rendered.get("Secret", service_account("router") + "-token")
    return base64.b64decode(secret["data"]["token"]).decode()


def call_json(base: str, path: str, body: Any = None, token: str | None = None
              ) -> tuple[int, Any]:
    """One HTTP call to a local service: GET ``base + path``, or POST ``body`` as JSON
    when given, with ``token`` as the bearer token when given; the status code and the
    decoded JSON answer (``None`` for an empty one), error statuses included (5 s bound)."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, headers=headers,
                                 method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def chart_router_args(rendered: Any, port: int, token_file: str) -> list[str]:
    """The router container's args as the chart renders them, made local: loopback
    address and a free port, the namespace, the token file where the test wrote it, and
    a free ``--epp-port`` (the picker's gRPC port)."""
    (container,) = rendered.get("Deployment", service_account("router"))[
        "spec"]["template"]["spec"]["containers"]
    args = [a.replace("$(POD_NAMESPACE)", RELEASE_NAMESPACE) for a in container["args"]]
    args[args.index("--host") + 1] = "127.0.0.1"
    args[args.index("--port") + 1] = str(port)
    args[args.index("--token-file") + 1] = token_file
    if "--epp-port" in args:
        args[args.index("--epp-port") + 1] = str(free_port())
    return args


# -- local processes -------------------------------------------------------------------------------

@dataclass
class Component:
    """A local process (a joulepool component, a second kube-scheduler) with its own log."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Component:
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env,
                                         start_new_session=True)
        finally:
            log.close()
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, text: str, timeout: float = 30.0) -> None:
        """Wait until the log contains ``text``; fail early (with the log) if it exits."""
        def seen() -> bool:
            if text in self.log():
                return True
            if not self.running():
                raise GiveUp(f"{self.name} exited ({self.proc and self.proc.returncode})"
                                     f" before logging {text!r}:\n{self.log()[-3000:]}")
            return False

        try:
            wait_for(f"{self.name} to log {text!r}", seen, timeout=timeout)
        except GiveUp:
            raise
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.name} log:\n{self.log()[-3000:]}") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Signal the process (only ours: by its pid) and wait; SIGKILL after ``timeout``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def forbidden_lines(self) -> list[str]:
        """Log lines that report an RBAC denial (403) from the API server."""
        return [line for line in self.log().splitlines() if FORBIDDEN.search(line)]


class Components:
    """Every local process a test session started; stopped in reverse order at the end."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self.started: list[Component] = []

    def start(self, name: str, argv: list[str], kubeconfig: Path | None = None,
              env: Mapping[str, str] | None = None) -> Component:
        """Start ``argv`` with ``KUBECONFIG=kubeconfig`` (an SA kubeconfig: the component
        gets only the chart's RBAC), logging to ``<run>/logs/<name>.log``."""
        full_env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost",
                    "no_proxy": "127.0.0.1,localhost", "PYTHONUNBUFFERED": "1"}
        full_env.pop("KUBECONFIG", None)
        if kubeconfig is not None:
            full_env["KUBECONFIG"] = str(kubeconfig)
        full_env.update(env or {})
        n = sum(1 for c in self.started if c.name == name or c.name.startswith(name + "."))
        log_name = name if n == 0 else f"{name}.{n}"
        comp = Component(log_name, list(argv), self.cp.logs_dir / f"{log_name}.log", full_env)
        self.started.append(comp.start())
        return comp

    def joulepool(self, name: str, args: list[str], service_account: str | None = None,
                  env: Mapping[str, str] | None = None) -> Component:
        """``joulepool ARGS`` as ServiceAccount ``service_account`` of the release namespace."""
        kubeconfig = self.cp.kubeconfig_for(service_account) if service_account else None
        return self.start(name, [sys.executable, "-m", "joulepool.cli", *args], kubeconfig,
                          env)

    def stop_all(self) -> None:
        for comp in reversed(self.started):
            comp.stop()


def scheduler_config(rendered: Any, kubeconfig: Path, extender_url: str,
                     leader_elect: bool | None = None) -> dict[str, Any]:
    """The chart's KubeSchedulerConfiguration (from its rendered ConfigMap) for a local
    second scheduler: ``clientConnection.kubeconfig`` set, the extender's URL prefix made
    ``extender_url`` (e.g. ``http://127.0.0.1:PORT/scheduler``); everything else as rendered."""
    cm = rendered.get("ConfigMap", service_account("scheduler"))
    config: dict[str, Any] = yaml.safe_load(cm["data"]["scheduler-config.yaml"])
    config["clientConnection"] = {**config.get("clientConnection", {}),
                                  "kubeconfig": str(kubeconfig)}
    for ext in config.get("extenders", []):
        ext["urlPrefix"] = extender_url
    if leader_elect is not None:
        config["leaderElection"]["leaderElect"] = leader_elect
    return config


def start_second_scheduler(cp: ControlPlane, components: Components, rendered: Any,
                           extender_url: str, name: str = "joulepool-scheduler") -> Component:
    """The chart's second kube-scheduler ($RUN/bin/kube-scheduler) as ServiceAccount
    ``joulepool-scheduler`` with the chart's configuration, calling ``extender_url``;
    returns once its /healthz answers."""
    kubeconfig = cp.kubeconfig_for(service_account("scheduler"))
    config_path = cp.run_dir / f"{name}-config.yaml"
    config_path.write_text(yaml.safe_dump(scheduler_config(rendered, kubeconfig, extender_url)))
    port = free_port()
    comp = components.start(name, [
        str(cp.bin_dir / "kube-scheduler"), f"--config={config_path}",
        f"--authentication-kubeconfig={kubeconfig}", f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1", f"--secure-port={port}", "--profiling=false", "--v=2",
    ])
    import ssl
    import urllib.request

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE

    def healthy() -> bool:
        if not comp.running():
            raise GiveUp(f"{name} exited:\n{comp.log()[-3000:]}")
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=ctx,
                                    timeout=2) as r:
            return bool(r.status == 200)

    wait_for(f"{name} healthy", healthy, timeout=60, interval=0.3)
    return comp


@contextlib.contextmanager
def components(cp: ControlPlane) -> Iterator[Components]:
    procs = Components(cp)
    try:
        yield procs
    finally:
        procs.stop_all()
