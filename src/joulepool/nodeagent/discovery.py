"""Serving engines on this node, discovered from pods labelled ``joulepool.dev/pool``.

Which GPUs an engine runs on comes from the pod's ``joulepool.dev/gpus``
annotation when it has one, else from the kubelet's PodResources API (the
``nvidia.com/gpu`` devices allocated to the pod, matched to this node's GPUs
by UUID). An engine mapped by neither is read on every GPU no engine claims.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

from joulepool.api.contract import (
    ENGINE_PORT,
    GPUS_ANNOTATION,
    METRICS_PATH_ANNOTATION,
    METRICS_PORT_ANNOTATION,
    MODE_LABEL,
    POOL_LABEL,
)
from joulepool.kube.objects import pod_ready
from joulepool.nodeagent.background import API_TIMEOUT
from joulepool.nodeagent.podresources import PodResourcesClient, gpu_indices
from joulepool.nodeagent.signals import EngineEndpoint

PORT_ANNOTATION = METRICS_PORT_ANNOTATION
PATH_ANNOTATION = METRICS_PATH_ANNOTATION
DEFAULT_PORT = ENGINE_PORT

log = logging.getLogger("joulepool.nodeagent.discovery")


def endpoint_for_pod(pod: Any) -> EngineEndpoint | None:
    """The metrics endpoint of one running serving pod (kubernetes client V1Pod), and
    whether it is Ready (a Running pod that is not is still scraped and metered: it holds
    its GPUs, but the routing service sends it nothing)."""
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
                          pool=labels.get(POOL_LABEL), gpus=gpus or None,
                          pod=f"{getattr(meta, 'namespace', '') or ''}/"
                              f"{getattr(meta, 'name', '') or ''}",
                          mode=labels.get(MODE_LABEL), ready=_ready(pod))


def _ready(pod: Any) -> bool:
    """Whether the routing service sends ``pod`` requests (kubernetes client V1Pod):
    ``kube.objects.pod_ready``, the routing service's own rule."""
    status = pod.status
    return pod_ready(getattr(status, "phase", None), getattr(status, "pod_ip", None),
                     getattr(pod.metadata, "deletion_timestamp", None) is not None,
                     [(getattr(c, "type", None), getattr(c, "status", None))
                      for c in getattr(status, "conditions", None) or ()])


class PodDiscovery:
    """Lists pods on ``node`` with the pool label (needs RBAC: list pods, all namespaces).

    With ``pod_resources`` and ``gpu_uuids`` (this node's GPU UUID -> index,
    read at each discovery), engines without the annotation are mapped to the
    GPUs the kubelet allocated to their pod.
    """

    def __init__(self, node: str, api: Any | None = None,
                 pod_resources: PodResourcesClient | None = None,
                 gpu_uuids: Callable[[], Mapping[str, int]] | None = None) -> None:
        self.node = node
        self._api = api
        self.pod_resources = pod_resources
        self.gpu_uuids = gpu_uuids
        self._said: set[str] = set()

    def _once(self, key: str, level: int, msg: str, *args: object) -> None:
        if key not in self._said:
            self._said.add(key)
            log.log(level, msg, *args)

    def _allocations(self) -> dict[tuple[str, str], frozenset[str]] | None:
        pr = self.pod_resources
        if pr is None or self.gpu_uuids is None:
            return None
        if not pr.available():
            self._once("pr:missing", logging.INFO,
                       "no kubelet pod-resources socket at %s: engines are mapped to GPUs only "
                       "by the %s annotation", pr.socket_path, GPUS_ANNOTATION)
            return None
        try:
            got = pr.gpu_devices()
        except Exception as exc:  # permission, kubelet restarting: keep going unmapped
            self._once(f"pr:{type(exc).__name__}", logging.WARNING,
                       "cannot list pod resources from the kubelet (%s): %s", pr.socket_path,
                       getattr(exc, "details", lambda: None)() or exc)
            return None
        self._said = {k for k in self._said if not k.startswith("pr:")}
        return got

    def _map(self, pod: Any, e: EngineEndpoint,
             allocations: dict[tuple[str, str], frozenset[str]] | None) -> EngineEndpoint:
        if e.gpus is not None or not allocations or self.gpu_uuids is None:
            return e
        meta = pod.metadata
        key = (str(getattr(meta, "namespace", "") or ""), str(getattr(meta, "name", "") or ""))
        uuids = allocations.get(key)
        if not uuids:
            return e
        gpus = gpu_indices(uuids, self.gpu_uuids())
        if gpus is None:
            self._once(f"unmatched:{key}", logging.INFO,
                       "pod %s/%s has GPU devices %s that are not this node's GPUs (MIG?): "
                       "not mapped", key[0], key[1], ",".join(sorted(uuids)))
            return e
        return dataclasses.replace(e, gpus=gpus)

    def _list(self) -> list[EngineEndpoint]:
        if self._api is None:
            from kubernetes import client

            self._api = client.CoreV1Api()
        pods = self._api.list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={self.node}", label_selector=POOL_LABEL,
            _request_timeout=API_TIMEOUT)
        found = [(pod, e) for pod in pods.items if (e := endpoint_for_pod(pod)) is not None]
        allocations = self._allocations() if any(e.gpus is None for _, e in found) else None
        return [self._map(pod, e, allocations) for pod, e in found]

    async def __call__(self) -> list[EngineEndpoint]:
        return await asyncio.to_thread(self._list)
