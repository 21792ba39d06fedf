"""The fake device plugin against a test kubelet, over real unix sockets (gRPC v1beta1)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from joulepool.core.profiles import H100
from joulepool.fakes.deviceplugin import FakeGPUDevicePlugin
from joulepool.fakes.gpus import SimulatedGPUs, fake_uuid
from joulepool.protos import api_pb2, api_pb2_grpc


class TestKubelet(api_pb2_grpc.RegistrationServicer):
    """The kubelet's Registration service on ``<dir>/kubelet.sock``."""

    __test__ = False

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.requests: asyncio.Queue[api_pb2.RegisterRequest] = asyncio.Queue()
        self.server: grpc.aio.Server | None = None

    async def Register(self, request, context):
        await self.requests.put(request)
        return api_pb2.Empty()

    async def start(self) -> None:
        self.server = grpc.aio.server()
        api_pb2_grpc.add_RegistrationServicer_to_server(self, self.server)
        self.server.add_insecure_port(f"unix://{self.directory / 'kubelet.sock'}")
        await self.server.start()

    async def restart(self, wipe_plugins: bool = True) -> None:
        """A kubelet restart as plugins see it: kubelet.sock deleted and created anew (and,
        as the real kubelet does, the plugins' sockets deleted too, unless told not to)."""
        if self.server is not None:
            await self.server.stop(None)
        for sock in self.directory.glob("*.sock"):
            if wipe_plugins or sock.name == "kubelet.sock":
                sock.unlink()
        await self.start()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(None)


@pytest.fixture
def kubelet_dir():
    d = Path(tempfile.mkdtemp(prefix="jp-dp-", dir="/tmp"))  # unix socket paths are short
    yield d
    shutil.rmtree(d, ignore_errors=True)


#: deadline of every wait, seconds: generous, for a loaded machine
WAIT_S = 30.0


async def next_request(kubelet: TestKubelet, timeout: float = WAIT_S
                       ) -> api_pb2.RegisterRequest:
    return await asyncio.wait_for(kubelet.requests.get(), timeout)


async def registrations_returned(plugin: FakeGPUDevicePlugin, n: int) -> None:
    """Wait (up to WAIT_S) until ``n`` of the plugin's Register calls have returned: the
    kubelet holds a request a moment before the plugin's call returns, and a kubelet
    restarted in that moment cancels the call, which the plugin then counts as failed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while plugin.registrations < n:
        assert loop.time() < deadline, f"the plugin never saw registration {n} return"
        await asyncio.sleep(0.01)


@dataclass
class Plugged:
    """A fake device plugin (4 simulated H100s on kind-worker) registered with a test
    kubelet; ``request`` is its registration."""

    kubelet: TestKubelet
    plugin: FakeGPUDevicePlugin
    gpus: SimulatedGPUs
    state: Path
    request: api_pb2.RegisterRequest
    ids: list[str]

    def channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(
            f"unix://{self.kubelet.directory / self.request.endpoint}")


@contextlib.asynccontextmanager
async def plugged_in(kubelet_dir: Path) -> AsyncIterator[Plugged]:
    kubelet = TestKubelet(kubelet_dir)
    await kubelet.start()
    state = kubelet_dir / "state" / "gpu-state.json"
    gpus = SimulatedGPUs.open(state, "H100", 4, node="kind-worker")
    plugin = FakeGPUDevicePlugin(H100, 4, node="kind-worker", kubelet_dir=kubelet_dir,
                                 gpu_state=gpus, gpu_state_host_path=str(state),
                                 watch_interval_s=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(plugin.run(stop))
    try:
        req = await next_request(kubelet)
        await registrations_returned(plugin, 1)
        yield Plugged(kubelet, plugin, gpus, state, req,
                      [fake_uuid("kind-worker", i) for i in range(4)])
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT_S)
        await kubelet.stop()


async def test_registers_with_the_kubelet_and_cleans_up(kubelet_dir):
    async with plugged_in(kubelet_dir) as p:
        req = p.request
        assert req.version == "v1beta1"
        assert req.resource_name == "nvidia.com/gpu"
        assert req.endpoint == "joulepool-fake-gpu.sock"
        assert req.options.get_preferred_allocation_available
        assert (kubelet_dir / req.endpoint).is_socket()
        async with p.channel() as ch:
            stub = api_pb2_grpc.DevicePluginStub(ch)
            opts = await stub.GetDevicePluginOptions(api_pb2.Empty(), timeout=WAIT_S)
            assert not opts.pre_start_required
            await stub.PreStartContainer(api_pb2.PreStartContainerRequest(), timeout=WAIT_S)
    assert not (kubelet_dir / "joulepool-fake-gpu.sock").exists()  # cleaned up


async def test_list_and_watch_follows_device_health(kubelet_dir):
    async with plugged_in(kubelet_dir) as p, p.channel() as ch:
        stream = api_pb2_grpc.DevicePluginStub(ch).ListAndWatch(api_pb2.Empty())
        first = await asyncio.wait_for(stream.read(), WAIT_S)
        assert [(d.ID, d.health) for d in first.devices] == [(i, "Healthy") for i in p.ids]
        p.gpus.set_fault(2, "lost")  # the simulated GPU falls off the bus
        second = await asyncio.wait_for(stream.read(), WAIT_S)
        assert [d.health for d in second.devices] == [
            "Healthy", "Healthy", "Unhealthy", "Healthy"]
        await p.plugin.set_health(0, False)  # by hand, too
        third = await asyncio.wait_for(stream.read(), WAIT_S)
        assert third.devices[0].health == "Unhealthy"
        await p.plugin.set_health(0, True)
        await asyncio.wait_for(stream.read(), WAIT_S)
        stream.cancel()


async def test_allocate_hands_out_the_simulated_gpus(kubelet_dir):
    async with plugged_in(kubelet_dir) as p, p.channel() as ch:
        ids = p.ids
        stub = api_pb2_grpc.DevicePluginStub(ch)
        resp = await stub.Allocate(api_pb2.AllocateRequest(container_requests=[
            api_pb2.ContainerAllocateRequest(devices_ids=[ids[3], ids[1]]),
            api_pb2.ContainerAllocateRequest(devices_ids=[ids[0]]),
        ]), timeout=WAIT_S)
        c0, c1 = resp.container_responses
        assert c0.envs["JOULEPOOL_GPU_PRODUCT"] == "H100"
        assert c0.envs["JOULEPOOL_GPU_INDEX"] == "1,3"
        assert c0.envs["JOULEPOOL_VISIBLE_DEVICES"] == f"{ids[1]},{ids[3]}"
        assert c0.envs["JOULEPOOL_GPU_STATE"] == "/var/run/joulepool-gpu/gpu-state.json"
        assert "NVIDIA_VISIBLE_DEVICES" not in c0.envs
        (mount,) = c0.mounts
        assert mount.host_path == str(p.state.parent)
        assert mount.container_path == "/var/run/joulepool-gpu" and not mount.read_only
        assert c1.envs["JOULEPOOL_GPU_INDEX"] == "0"

        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.Allocate(api_pb2.AllocateRequest(container_requests=[
                api_pb2.ContainerAllocateRequest(devices_ids=["GPU-nope"])]), timeout=WAIT_S)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_preferred_allocation_puts_unhealthy_gpus_last(kubelet_dir):
    async with plugged_in(kubelet_dir) as p, p.channel() as ch:
        ids = p.ids
        stub = api_pb2_grpc.DevicePluginStub(ch)
        stream = stub.ListAndWatch(api_pb2.Empty())
        await asyncio.wait_for(stream.read(), WAIT_S)
        p.gpus.set_fault(2, "lost")
        lost = await asyncio.wait_for(stream.read(), WAIT_S)  # the plugin has seen it
        assert lost.devices[2].health == "Unhealthy"
        stream.cancel()
        pref = await stub.GetPreferredAllocation(api_pb2.PreferredAllocationRequest(
            container_requests=[api_pb2.ContainerPreferredAllocationRequest(
                available_deviceIDs=ids, must_include_deviceIDs=[ids[3]],
                allocation_size=3)]), timeout=WAIT_S)
        # the must-include first, then healthy ones by index; the lost GPU 2 last
        assert list(pref.container_responses[0].deviceIDs) == [ids[3], ids[0], ids[1]]


async def test_a_kubelet_restart_is_followed_by_a_new_registration(kubelet_dir):
    async with plugged_in(kubelet_dir) as p:
        # the kubelet restarts: sockets wiped, kubelet.sock recreated -> register again
        await p.kubelet.restart()
        again = await next_request(p.kubelet)
        assert again.resource_name == "nvidia.com/gpu" and again.version == "v1beta1"
        await registrations_returned(p.plugin, 2)
        assert p.plugin.registrations == 2
        p.request = again
        async with p.channel() as ch:
            stream = api_pb2_grpc.DevicePluginStub(ch).ListAndWatch(api_pb2.Empty())
            listed = await asyncio.wait_for(stream.read(), WAIT_S)
            assert len(listed.devices) == 4
            stream.cancel()
        # only kubelet.sock deleted and recreated (our socket untouched): register again too
        await p.kubelet.restart(wipe_plugins=False)
        third = await next_request(p.kubelet)
        assert third.resource_name == "nvidia.com/gpu"


async def test_registers_once_the_kubelet_appears(kubelet_dir):
    plugin = FakeGPUDevicePlugin(H100, 2, kubelet_dir=kubelet_dir, watch_interval_s=0.05,
                                 resource_name="example.com/fake-gpu", endpoint="fake.sock")
    stop = asyncio.Event()
    task = asyncio.create_task(plugin.run(stop))
    try:
        await asyncio.sleep(0.2)  # no kubelet yet: nothing to do, no crash
        assert plugin.registrations == 0 and not task.done()
        kubelet = TestKubelet(kubelet_dir)
        await kubelet.start()
        req = await next_request(kubelet)
        assert (req.resource_name, req.endpoint) == ("example.com/fake-gpu", "fake.sock")
        await kubelet.stop()
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_cli_process_registers_and_exits_cleanly_on_sigterm(kubelet_dir):
    kubelet = TestKubelet(kubelet_dir)
    await kubelet.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOULEPOOL_", "KUBERNETES_"))}
    env["JOULEPOOL_GPU_COUNT"] = "3"  # flags settable by env, for the DaemonSet
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; from joulepool.cli import main; sys.exit(main())",
        "device-plugin", "--product", "NVIDIA-A100-SXM4-80GB", "--kubelet-dir",
        str(kubelet_dir), "--watch-interval", "0.05", "--kubernetes", "off",
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        req = await next_request(kubelet, timeout=15)
        assert req.resource_name == "nvidia.com/gpu"
        async with grpc.aio.insecure_channel(f"unix://{kubelet_dir / req.endpoint}") as ch:
            stream = api_pb2_grpc.DevicePluginStub(ch).ListAndWatch(api_pb2.Empty())
            listed = await asyncio.wait_for(stream.read(), 5)
            assert len(listed.devices) == 3
            stream.cancel()
            resp = await api_pb2_grpc.DevicePluginStub(ch).Allocate(api_pb2.AllocateRequest(
                container_requests=[api_pb2.ContainerAllocateRequest(
                    devices_ids=[listed.devices[0].ID])]), timeout=5)
            assert resp.container_responses[0].envs["JOULEPOOL_GPU_PRODUCT"] == "A100"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        await kubelet.stop()


def test_cli_needs_product_and_count():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOULEPOOL_", "KUBERNETES_"))}
    r = subprocess.run(
        [sys.executable, "-c", "import sys; from joulepool.cli import main; sys.exit(main())",
         "device-plugin", "--kubernetes", "off"], env=env, capture_output=True, text=True,
        timeout=30)
    assert r.returncode == 2 and "--product" in r.stderr
    r = subprocess.run(
        [sys.executable, "-c", "import sys; from joulepool.cli import main; sys.exit(main())",
         "device-plugin", "--kubernetes", "off", "--product", "Z9", "--count", "2"],
        env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "unknown GPU product" in r.stderr


def test_product_and_count_from_node_labels():
    import types

    from joulepool.fakes.deviceplugin import product_and_count_from_node

    class Api:
        def read_node(self, name):
            assert name == "kind-worker2"
            return types.SimpleNamespace(metadata=types.SimpleNamespace(labels={
                "nvidia.com/gpu.product": "NVIDIA-L4", "nvidia.com/gpu.count": "2"}))

    assert product_and_count_from_node("kind-worker2", Api()) == ("NVIDIA-L4", 2)
