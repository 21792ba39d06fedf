"""A fake GPU kubelet device plugin (API v1beta1 over gRPC on a unix socket).

On kind there are no GPUs; this plugin advertises N fake GPUs of a product
as ``nvidia.com/gpu`` so the scheduler, the extender and the pool plans see
GPU capacity, and tells each container which simulated GPU it got:

* ``Register`` with the kubelet at ``<kubelet-dir>/kubelet.sock``
  (version ``v1beta1``, our endpoint socket name, the resource name);
* ``ListAndWatch`` streams the device list, and again on every health change
  (a simulated GPU with ``"fault": "lost"`` in the shared state turns
  Unhealthy, like a real GPU falling off the bus);
* ``Allocate`` answers with environment variables (``JOULEPOOL_GPU_PRODUCT``,
  ``JOULEPOOL_GPU_INDEX``, ``JOULEPOOL_VISIBLE_DEVICES``, ``JOULEPOOL_GPU_STATE``)
  and a mount of the shared GPU-state directory, which is all the fake engine
  needs to find its simulated GPU;
* when the kubelet restarts it deletes the plugin sockets and recreates
  ``kubelet.sock``: the plugin notices (inode change), serves again and
  re-registers.

``NVIDIA_VISIBLE_DEVICES`` is deliberately not set: on a node that does have
the NVIDIA container runtime, fake UUIDs there would fail container start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from joulepool.api.contract import (
    DEVICE_PLUGIN_DIR,
    GPU_COUNT_LABEL,
    GPU_PRODUCT_LABEL,
    GPU_RESOURCE,
)
from joulepool.core.profiles import GPUProduct
from joulepool.fakes.gpus import FAULT_LOST, SimulatedGPUs, fake_uuid
from joulepool.fakes.settings import PLUGIN_ENDPOINT, STATE_MOUNT_DIR
from joulepool.protos import api_pb2, api_pb2_grpc

log = logging.getLogger("joulepool.deviceplugin")

API_VERSION = "v1beta1"
KUBELET_SOCKET = "kubelet.sock"
DEFAULT_KUBELET_DIR = DEVICE_PLUGIN_DIR
DEFAULT_RESOURCE = GPU_RESOURCE
DEFAULT_ENDPOINT = PLUGIN_ENDPOINT
HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"


@dataclass
class FakeDevice:
    index: int
    id: str
    healthy: bool = True


def _sock_id(path: Path) -> tuple[int, int, int] | None:
    """Identity of a socket file: a recreated one differs even if its inode number is reused."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


class FakeGPUDevicePlugin:
    """Serves the DevicePlugin service and keeps itself registered with the kubelet."""

    def __init__(
        self,
        product: GPUProduct,
        count: int,
        node: str = "node",
        resource_name: str = DEFAULT_RESOURCE,
        kubelet_dir: str | os.PathLike[str] = DEFAULT_KUBELET_DIR,
        endpoint: str = DEFAULT_ENDPOINT,
        gpu_state: SimulatedGPUs | None = None,
        gpu_state_host_path: str | None = None,
        state_mount_dir: str = STATE_MOUNT_DIR,
        watch_interval_s: float = 1.0,
    ) -> None:
        if count < 1:
            raise ValueError("count must be >= 1")
        if "/" in endpoint:
            raise ValueError("endpoint is a socket file name inside the kubelet directory")
        self.product = product
        self.node = node
        self.resource_name = resource_name
        self.kubelet_dir = Path(kubelet_dir)
        self.endpoint = endpoint
        self.gpu_state = gpu_state
        self.gpu_state_host_path = gpu_state_host_path
        self.state_mount_dir = state_mount_dir
        self.watch_interval_s = watch_interval_s
        self.devices = [FakeDevice(i, fake_uuid(node, i)) for i in range(count)]
        self._by_id = {d.id: d for d in self.devices}
        self._manual_unhealthy: set[int] = set()
        self._version = 0
        self._changed = asyncio.Condition()
        self._server: grpc.aio.Server | None = None
        self._kubelet_id: tuple[int, int, int] | None = None
        self._own_id: tuple[int, int, int] | None = None
        self.registrations = 0
        self.registered = False

    # -- paths --------------------------------------------------------------------
    @property
    def socket_path(self) -> Path:
        return self.kubelet_dir / self.endpoint

    @property
    def kubelet_socket(self) -> Path:
        return self.kubelet_dir / KUBELET_SOCKET

    # -- devices and health -----------------------------------------------------------
    def device_list(self) -> list[api_pb2.Device]:
        return [api_pb2.Device(ID=d.id, health=HEALTHY if d.healthy else UNHEALTHY)
                for d in self.devices]

    async def _notify(self) -> None:
        async with self._changed:
            self._version += 1
            self._changed.notify_all()

    async def set_health(self, index: int, healthy: bool) -> None:
        """Mark a device (un)healthy by hand; ListAndWatch streams the change."""
        if healthy:
            self._manual_unhealthy.discard(index)
        else:
            self._manual_unhealthy.add(index)
        await self.refresh_health()

    def _lost_in_state(self) -> set[int]:
        if self.gpu_state is None:
            return set()
        try:
            state = self.gpu_state.store.read() or {}
        except Exception as exc:  # unreadable state: keep the last health
            log.warning("cannot read GPU state: %s", exc)
            return {d.index for d in self.devices if not d.healthy} - self._manual_unhealthy
        return {int(g["index"]) for g in state.get("gpus", []) if g.get("fault") == FAULT_LOST}

    async def refresh_health(self) -> bool:
        """Recompute health; stream the list if anything changed. True on change."""
        unhealthy = self._manual_unhealthy | self._lost_in_state()
        changed = False
        for d in self.devices:
            healthy = d.index not in unhealthy
            if healthy != d.healthy:
                d.healthy = healthy
                changed = True
                log.warning("device %s (GPU %d) is now %s", d.id, d.index,
                            HEALTHY if healthy else UNHEALTHY)
        if changed:
            await self._notify()
        return changed

    async def watch_devices(self) -> AsyncIterator[list[api_pb2.Device]]:
        """The device list now, then again after every change."""
        seen = -1
        while True:
            async with self._changed:
                while self._version == seen:
                    await self._changed.wait()
                seen = self._version
            yield self.device_list()

    # -- allocation -------------------------------------------------------------
    def container_response(self, ids: Sequence[str]) -> api_pb2.ContainerAllocateResponse:
        unknown = [i for i in ids if i not in self._by_id]
        if unknown:
            raise KeyError(f"unknown device IDs: {unknown}")
        devs = sorted((self._by_id[i] for i in ids), key=lambda d: d.index)
        envs = {
            "JOULEPOOL_GPU_PRODUCT": self.product.name,
            "JOULEPOOL_GPU_INDEX": ",".join(str(d.index) for d in devs),
            "JOULEPOOL_VISIBLE_DEVICES": ",".join(d.id for d in devs),
            "JOULEPOOL_NODE": self.node,
        }
        mounts = []
        if self.gpu_state_host_path:
            host = Path(self.gpu_state_host_path)
            envs["JOULEPOOL_GPU_STATE"] = f"{self.state_mount_dir.rstrip('/')}/{host.name}"
            # the directory, not the file: the state is replaced atomically (new inode)
            mounts.append(api_pb2.Mount(container_path=self.state_mount_dir,
                                        host_path=str(host.parent), read_only=False))
        return api_pb2.ContainerAllocateResponse(envs=envs, mounts=mounts)

    def preferred(self, available: Sequence[str], must: Sequence[str], size: int) -> list[str]:
        chosen = [i for i in must if i in self._by_id]
        rest = sorted((self._by_id[i] for i in available if i in self._by_id and i not in chosen),
                      key=lambda d: (not d.healthy, d.index))
        for d in rest:
            if len(chosen) >= size:
                break
            chosen.append(d.id)
        return chosen[:max(size, len(must))]

    # -- serving and registration ----------------------------------------------------
    async def serve(self) -> None:
        """(Re)start the gRPC server on our socket."""
        await self._stop_server()
        self.kubelet_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        server = grpc.aio.server()
        api_pb2_grpc.add_DevicePluginServicer_to_server(_Servicer(self), server)
        server.add_insecure_port(f"unix://{self.socket_path}")
        await server.start()
        self._server = server
        self._own_id = _sock_id(self.socket_path)
        log.info("serving %s on %s", self.resource_name, self.socket_path)

    async def register(self, timeout_s: float = 5.0) -> None:
        """Register with the kubelet; raises grpc.aio.AioRpcError on failure."""
        async with grpc.aio.insecure_channel(f"unix://{self.kubelet_socket}") as channel:
            stub = api_pb2_grpc.RegistrationStub(channel)
            await stub.Register(api_pb2.RegisterRequest(
                version=API_VERSION, endpoint=self.endpoint, resource_name=self.resource_name,
                options=api_pb2.DevicePluginOptions(
                    pre_start_required=False, get_preferred_allocation_available=True)),
                timeout=timeout_s)
        self.registrations += 1
        self.registered = True
        log.info("registered %s (%d x %s) with the kubelet", self.resource_name,
                 len(self.devices), self.product.name)

    async def _stop_server(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=0.5)
            self._server = None

    async def step(self) -> None:
        """One watch period: health, our socket, the kubelet socket, registration."""
        await self.refresh_health()
        kubelet_id = _sock_id(self.kubelet_socket)
        if kubelet_id is None:
            if self.registered:
                log.warning("kubelet socket %s is gone; waiting for the kubelet",
                            self.kubelet_socket)
            self.registered = False
            self._kubelet_id = None
            return
        own_id = _sock_id(self.socket_path)
        if kubelet_id != self._kubelet_id or own_id is None or own_id != self._own_id:
            if self._kubelet_id is not None and kubelet_id != self._kubelet_id:
                log.warning("kubelet restarted (new %s): serving and registering again",
                            KUBELET_SOCKET)
            self.registered = False
            await self.serve()
            self._kubelet_id = kubelet_id
        if not self.registered:
            try:
                await self.register()
            except grpc.aio.AioRpcError as exc:
                log.warning("registration with the kubelet failed (%s: %s); retrying",
                            exc.code().name, exc.details())

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                await self.step()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.watch_interval_s)
        finally:
            await self.close()

    async def close(self) -> None:
        await self._stop_server()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()


class _Servicer(api_pb2_grpc.DevicePluginServicer):
    def __init__(self, plugin: FakeGPUDevicePlugin) -> None:
        self.plugin = plugin

    async def GetDevicePluginOptions(self, request: Any, context: Any) -> Any:
        return api_pb2.DevicePluginOptions(
            pre_start_required=False, get_preferred_allocation_available=True)

    async def ListAndWatch(self, request: Any, context: Any) -> AsyncIterator[Any]:
        async for devices in self.plugin.watch_devices():
            yield api_pb2.ListAndWatchResponse(devices=devices)

    async def GetPreferredAllocation(self, request: Any, context: Any) -> Any:
        out = []
        for r in request.container_requests:
            ids = self.plugin.preferred(list(r.available_deviceIDs),
                                        list(r.must_include_deviceIDs), int(r.allocation_size))
            out.append(api_pb2.ContainerPreferredAllocationResponse(deviceIDs=ids))
        return api_pb2.PreferredAllocationResponse(container_responses=out)

    async def Allocate(self, request: Any, context: Any) -> Any:
        responses = []
        for r in request.container_requests:
            try:
                responses.append(self.plugin.container_response(list(r.devices_ids)))
            except KeyError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return api_pb2.AllocateResponse(container_responses=responses)

    async def PreStartContainer(self, request: Any, context: Any) -> Any:
        return api_pb2.PreStartContainerResponse()


def product_and_count_from_node(node: str, api: Any | None = None,
                                ) -> tuple[str | None, int | None]:
    """``nvidia.com/gpu.product`` and ``nvidia.com/gpu.count`` labels of the node."""
    if api is None:
        from kubernetes import client

        api = client.CoreV1Api()
    meta = api.read_node(node).metadata
    labels = (meta.labels if meta is not None else None) or {}
    count = labels.get(GPU_COUNT_LABEL)
    return labels.get(GPU_PRODUCT_LABEL), int(count) if count and count.isdigit() else None


Factory = Callable[[], FakeGPUDevicePlugin]
