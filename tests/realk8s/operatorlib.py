"""Helpers of the operator's real-API scenarios, built on k8slib's control plane.

The operator runs as a local process (``joulepool operator``) on the chart's operator
ServiceAccount token, so every write it makes passes the chart's RBAC. Its serving pods
are given ``--scheduler-name default-scheduler``: the real kube-scheduler binds them, and
the per-node shares of the plan are checked against real binds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import k8slib
from k8slib import ControlPlane

OP_NAMESPACE = k8slib.RELEASE_NAMESPACE
GROUP, VERSION = "joulepool.dev", "v1alpha1"
POOLS = "inferencepools"


def start_operator(procs: k8slib.Components, *extra: str) -> k8slib.Component:
    """``joulepool operator`` on the chart's operator ServiceAccount."""
    return procs.joulepool(
        "operator",
        ["operator", "--namespace", OP_NAMESPACE, "--scheduler-name", "default-scheduler",
         "--debounce-seconds", "0.2", "--liveness", "0", *extra],
        service_account=k8slib.service_account("operator"))


def start_engine_and_agent(
        procs: k8slib.Components, tag: str, *, state: Any, engine_port: int, node: str,
        product: str, pool: str, metrics_port: int = 0,
) -> tuple[k8slib.Component, k8slib.Component]:
    """A fake engine on simulated GPU 0 of ``state`` (a GPU state file) and the node
    agent of ``node`` for it, on the chart's node-agent ServiceAccount, serving pool
    ``pool`` (namespace/name) at TTFT 1 s, TPOT 0.1 s and publishing every 2 s; both
    processes are named ``fake-engine-<tag>`` and ``node-agent-<tag>``."""
    url = f"http://127.0.0.1:{engine_port}"
    engine = procs.joulepool(f"fake-engine-{tag}", [
        "fake-engine", "--host", "127.0.0.1", "--port", str(engine_port),
        "--gpu-state", str(state), "--gpu-index", "0", "--node", node])
    engine.wait_log(f"listening on {url}", timeout=60)
    agent = procs.joulepool(f"node-agent-{tag}", [
        "node-agent", "--backend", "simulated", "--gpu-state", str(state),
        "--product", product, "--count", "1", "--kubernetes", "on",
        "--engine-url", f"0@{url}", "--pool", pool,
        "--engine-discovery", "off", "--pod-resources-socket", "off",
        "--namespace", OP_NAMESPACE, "--energy-policy", "none", "--interval", "0.5",
        "--publish-interval", "2", "--plan-refresh", "2", "--ttft-slo", "1",
        "--tpot-slo", "0.1", "--metrics-host", "127.0.0.1",
        "--metrics-port", str(metrics_port)],
        service_account=k8slib.service_account("node-agent"), env={"NODE_NAME": node})
    return engine, agent


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
    """Poll ``check`` until truthy; an AssertionError inside counts as not yet (and is
    reported at the timeout); any other exception ends the wait at once."""
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


class Scenario:
    """One test's namespace, nodes and operator, with the reads its checks need."""

    def __init__(self, cp: ControlPlane, ns: str, nodes: list[str],
                 operator: k8slib.Component) -> None:
        self.cp, self.ns, self.made_nodes, self.op = cp, ns, nodes, operator

    def node(self, name: str, product: str = "H100", gpus: int = 8) -> str:
        name = f"{self.ns[-12:].strip('-')}-{name}"
        self.made_nodes.append(name)
        self.cp.create_node(k8slib.gpu_node(name, product, gpus))
        return name

    def key(self, pool: str) -> str:
        return f"{self.ns}.{pool}"

    def alive(self) -> None:
        if not self.op.running():
            raise RuntimeError("operator exited:\n" + self.op.log()[-4000:])

    # -- pools -------------------------------------------------------------------------
    def create_pool(self, name: str, rps: float, **spec: Any) -> None:
        self.cp.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.ns, POOLS, pool_body(self.ns, name, rps, **spec))

    def patch_pool(self, name: str, patch: dict[str, Any]) -> None:
        self.cp.custom.patch_namespaced_custom_object(GROUP, VERSION, self.ns, POOLS, name,
                                                      patch)

    def pool(self, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.cp.custom.get_namespaced_custom_object(  # type: ignore[no-any-return]
                GROUP, VERSION, self.ns, POOLS, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def delete_pool(self, name: str) -> None:
        self.cp.custom.delete_namespaced_custom_object(GROUP, VERSION, self.ns, POOLS, name)

    def pools(self) -> list[dict[str, Any]]:
        return list(self.cp.custom.list_namespaced_custom_object(
            GROUP, VERSION, self.ns, POOLS)["items"])

    def planned(self, name: str, replicas: int | None = None, reason: str | None = None,
                timeout: float = 60.0) -> dict[str, Any]:
        """Wait until the pool says Planned=True (with ``replicas``, ``reason``)."""
        def check() -> Any:
            self.alive()
            obj = self.pool(name)
            cond = condition(obj, "Planned")
            if cond is None or (reason is None and cond["status"] != "True"):
                return None
            if reason is not None and cond["reason"] != reason:
                return None
            if replicas is not None and obj["status"].get("replicas") != replicas:  # type: ignore[index]
                return None
            return obj
        return wait_for(check, timeout, what=f"pool {name} planned ({replicas}, {reason})")  # type: ignore[no-any-return]

    def infeasible(self, name: str) -> dict[str, Any] | None:
        """The pool once it says Infeasible=True."""
        self.alive()
        obj = self.pool(name)
        cond = condition(obj, "Infeasible")
        return obj if cond is not None and cond["status"] == "True" else None

    def release_all(self) -> None:
        """Delete every pool of the scenario and wait until the operator released them."""
        for p in self.pools():
            self.delete_pool(p["metadata"]["name"])
        wait_for(lambda: not self.pools(), what="pools released by the operator's finalizer")

    # -- what was deployed and bound -----------------------------------------------------
    def deployments(self) -> dict[str, Any]:
        return {d.metadata.name: d for d in self.cp.apps.list_namespaced_deployment(
            self.ns).items}

    def pods_per_node(self, pool: str) -> dict[str, int]:
        """Pods of a pool by the node the real scheduler bound them to."""
        out: dict[str, int] = {}
        for p in self.cp.core.list_namespaced_pod(
                self.ns, label_selector=f"joulepool.dev/pool={self.key(pool)}").items:
            if p.spec.node_name and p.metadata.deletion_timestamp is None:
                out[p.spec.node_name] = out.get(p.spec.node_name, 0) + 1
        return out

    def shares_hold(self, pool: str) -> dict[str, int] | None:
        """The plan's per-node shares, once the bound pods match them exactly."""
        self.alive()
        want = planned_per_node(self.pool(pool))
        return want if want and self.pods_per_node(pool) == want else None
