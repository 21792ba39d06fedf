"""Serving engines on this node, discovered from pods labelled ``joulepool.dev/pool``."""

from __future__ import annotations

import asyncio
from typing import Any

from joulepool.api.plan import POOL_LABEL
from joulepool.sidecar.signals import EngineEndpoint

PORT_ANNOTATION = "joulepool.dev/metrics-port"
PATH_ANNOTATION = "joulepool.dev/metrics-path"
GPUS_ANNOTATION = "joulepool.dev/gpus"  # optional "0,1": which of the node's GPUs it uses
DEFAULT_PORT = 8000


def endpoint_for_pod(pod: Any) -> EngineEndpoint | None:
    """The metrics endpoint of one running serving pod (kubernetes client V1Pod)."""
    status = getattr(pod, "status", None)
    ip = getattr(status, "pod_ip", None)
    if not ip or getattr(status, "phase", None) != "Running":
        return None
    meta = pod.metadata
    labels = meta.labels or {}
    annotations = meta.annotations or {}
    port: int | None = None
    if PORT_ANNOTATION in annotations:
        try:
            port = int(annotations[PORT_ANNOTATION])
        except ValueError:
            port = None
    if port is None:
        for c in pod.spec.containers or []:
            for p in c.ports or []:
                if p.container_port and (port is None or p.name in ("http", "metrics")):
                    port = int(p.container_port)
    path = annotations.get(PATH_ANNOTATION, "/metrics")
    gpus = None
    if GPUS_ANNOTATION in annotations:
        try:
            gpus = frozenset(int(x) for x in annotations[GPUS_ANNOTATION].split(",") if x.strip())
        except ValueError:
            gpus = None
    host = f"[{ip}]" if ":" in ip else ip
    return EngineEndpoint(f"http://{host}:{port or DEFAULT_PORT}{path}",
                          pool=labels.get(POOL_LABEL), gpus=gpus or None)


class PodDiscovery:
    """Lists pods on ``node`` with the pool label (needs RBAC: list pods, all namespaces)."""

    def __init__(self, node: str, api: Any | None = None) -> None:
        self.node = node
        self._api = api

    def _list(self) -> list[EngineEndpoint]:
        if self._api is None:
            from kubernetes import client

            self._api = client.CoreV1Api()
        pods = self._api.list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={self.node}", label_selector=POOL_LABEL)
        out = []
        for pod in pods.items:
            e = endpoint_for_pod(pod)
            if e is not None:
                out.append(e)
        return out

    async def __call__(self) -> list[EngineEndpoint]:
        return await asyncio.to_thread(self._list)
