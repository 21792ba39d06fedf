"""Which GPUs each pod on this node was given, from the kubelet's PodResources API (v1).

The kubelet serves ``PodResourcesLister`` on a unix socket
(``/var/lib/kubelet/pod-resources/kubelet.sock``). ``List`` says, per pod and
container, the device IDs of each extended resource it was allocated; for
``nvidia.com/gpu`` the NVIDIA device plugin (and joulepool's fake one) uses
the GPU UUIDs, which NVML reports too. This is how the node agent knows
which engine runs on which GPU without anybody annotating the pods.

Device IDs of shared GPUs (time-slicing replicas, ``<uuid>::<n>``) map to the
GPU; IDs that are not a GPU's UUID (MIG devices) are not mapped, and the
engine is then treated as unmapped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from joulepool.api.contract import GPU_RESOURCE, POD_RESOURCES_SOCKET

DEFAULT_SOCKET = POD_RESOURCES_SOCKET
_MAX_MESSAGE = 16 * 1024 * 1024  # a busy node's full listing

PodKey = tuple[str, str]  # (namespace, name)

log = logging.getLogger("joulepool.nodeagent.podresources")


@dataclass(frozen=True, order=True)
class GPUOwner:
    """The container a GPU is allocated to (the DCGM exporter's pod labels)."""

    namespace: str
    pod: str
    container: str


def device_uuid(device_id: str) -> str:
    """The GPU UUID behind a device plugin device ID (``<uuid>::<replica>`` when shared)."""
    return device_id.split("::", 1)[0].strip()


class PodResourcesClient:
    """A blocking client (call it from a thread); every call has a deadline."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET, resource: str = GPU_RESOURCE,
                 timeout_s: float = 3.0) -> None:
        self.socket_path = socket_path
        self.resource = resource
        self.timeout_s = timeout_s

    def available(self) -> bool:
        try:
            return stat.S_ISSOCK(os.stat(self.socket_path).st_mode)
        except OSError:
            return False

    def _list(self) -> Any:
        import grpc

        from joulepool.protos import podresources_pb2, podresources_pb2_grpc

        with grpc.insecure_channel(
                f"unix://{self.socket_path}",
                options=[("grpc.max_receive_message_length", _MAX_MESSAGE)]) as channel:
            stub = podresources_pb2_grpc.PodResourcesListerStub(channel)
            return stub.List(podresources_pb2.ListPodResourcesRequest(), timeout=self.timeout_s)

    def gpu_owners(self) -> dict[str, GPUOwner]:
        """GPU UUID -> the container it is allocated to. A GPU shared by several
        containers (time-slicing) is given to the first by (namespace, pod, container)."""
        owners: dict[str, GPUOwner] = {}
        for pod in self._list().pod_resources:
            for c in pod.containers:
                for devs in c.devices:
                    if devs.resource_name != self.resource:
                        continue
                    for d in devs.device_ids:
                        uuid = device_uuid(d)
                        owner = GPUOwner(pod.namespace, pod.name, c.name)
                        if uuid and (uuid not in owners or owner < owners[uuid]):
                            owners[uuid] = owner
        return owners

    def gpu_devices(self) -> dict[PodKey, frozenset[str]]:
        """GPU UUIDs allocated to each pod (all its containers) on this node."""
        resp = self._list()
        out: dict[PodKey, frozenset[str]] = {}
        for pod in resp.pod_resources:
            uuids = {device_uuid(d) for c in pod.containers for devs in c.devices
                     if devs.resource_name == self.resource for d in devs.device_ids}
            uuids.discard("")
            if uuids:
                out[(pod.namespace, pod.name)] = frozenset(uuids)
        return out


def gpu_indices(uuids: frozenset[str], index_of: Mapping[str, int]) -> frozenset[int] | None:
    """The node's GPU indices for these UUIDs; None unless every one is a known GPU."""
    found = {index_of[u] for u in uuids if u in index_of}
    return frozenset(found) if found and len(found) == len(uuids) else None


class GPUWorkloads:
    """Which container uses each GPU, read from the kubelet at most every ``refresh_s``
    seconds (off the event loop; a failed read keeps the last good answer)."""

    def __init__(self, client: PodResourcesClient, refresh_s: float = 10.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.refresh_s = refresh_s
        self.monotonic = monotonic
        self._owners: dict[str, GPUOwner] = {}
        self._next = 0.0
        self._failing = False

    def owner(self, uuid: str) -> GPUOwner | None:
        return self._owners.get(uuid)

    async def refresh(self) -> None:
        now = self.monotonic()
        if now < self._next:
            return
        self._next = now + self.refresh_s
        if not self.client.available():
            self._owners = {}
            return
        try:
            self._owners = await asyncio.to_thread(self.client.gpu_owners)
        except Exception as exc:  # the kubelet restarting: keep the last answer
            if not self._failing:
                log.warning("cannot list pod resources (%s): %s", self.client.socket_path, exc)
            self._failing = True
            return
        self._failing = False
