"""Engines -> GPUs through the kubelet PodResources API (v1), against a fake kubelet socket."""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import types
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from joulepool.nodeagent.discovery import PodDiscovery
from joulepool.nodeagent.podresources import PodResourcesClient, device_uuid, gpu_indices
from joulepool.nodeagent.settings import NodeAgentSettings
from joulepool.protos import podresources_pb2 as pb
from joulepool.settings import load

UUIDS = ["GPU-aaaa", "GPU-bbbb", "GPU-cccc", "GPU-dddd"]
INDEX = {u: i for i, u in enumerate(UUIDS)}


def container(name: str, *devices: tuple[str, list[str]], cpu_ids: bool = False):
    c = pb.ContainerResources(name=name, devices=[
        pb.ContainerDevices(resource_name=r, device_ids=ids) for r, ids in devices])
    if cpu_ids:  # a newer kubelet's field 3 (cpu_ids, packed int64): unknown to us, skipped
        c = pb.ContainerResources.FromString(c.SerializeToString() + b"\x1a\x02\x01\x02")
    return c


class FakeKubelet:
    """Serves /v1.PodResourcesLister/List on a unix socket, by path (not via our stubs)."""

    def __init__(self, directory: Path) -> None:
        self.socket = directory / "kubelet.sock"
        self.pods: list[pb.PodResources] = []
        self.fail: grpc.StatusCode | None = None
        self.calls = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        handler = grpc.method_handlers_generic_handler("v1.PodResourcesLister", {
            "List": grpc.unary_unary_rpc_method_handler(
                self._list, request_deserializer=lambda b: b,
                response_serializer=lambda m: m.SerializeToString())})
        self.server.add_generic_rpc_handlers((handler,))
        self.server.add_insecure_port(f"unix://{self.socket}")
        self.server.start()

    def _list(self, request: bytes, context: grpc.ServicerContext):
        self.calls += 1
        if self.fail is not None:
            context.abort(self.fail, "kubelet says no")
        return pb.ListPodResourcesResponse(pod_resources=self.pods)


@pytest.fixture
def kubelet() -> Iterator[FakeKubelet]:
    d = Path(tempfile.mkdtemp(prefix="jp-pr-", dir="/tmp"))  # short: unix socket path limit
    k = FakeKubelet(d)
    try:
        yield k
    finally:
        k.server.stop(None)
        shutil.rmtree(d, ignore_errors=True)


def test_device_ids_to_uuids_and_indices():
    assert device_uuid("GPU-aaaa") == "GPU-aaaa"
    assert device_uuid("GPU-aaaa::3") == "GPU-aaaa"  # a time-slicing replica
    assert gpu_indices(frozenset({"GPU-bbbb", "GPU-dddd"}), INDEX) == frozenset({1, 3})
    assert gpu_indices(frozenset({"MIG-1234"}), INDEX) is None
    assert gpu_indices(frozenset({"GPU-aaaa", "MIG-1234"}), INDEX) is None  # partly: no


def test_client_lists_gpu_devices_per_pod(kubelet: FakeKubelet):
    kubelet.pods = [
        pb.PodResources(namespace="ns", name="chat-0", containers=[
            container("engine", ("nvidia.com/gpu", ["GPU-aaaa", "GPU-bbbb"]),
                      ("example.com/nic", ["nic0"]), cpu_ids=True),
            container("sidecar")]),
        pb.PodResources(namespace="ns", name="shared", containers=[
            container("engine", ("nvidia.com/gpu", ["GPU-cccc::0", "GPU-cccc::1"]))]),
        pb.PodResources(namespace="kube-system", name="cpu-only", containers=[container("c")]),
    ]
    client = PodResourcesClient(str(kubelet.socket))
    assert client.available()
    assert client.gpu_devices() == {
        ("ns", "chat-0"): frozenset({"GPU-aaaa", "GPU-bbbb"}),
        ("ns", "shared"): frozenset({"GPU-cccc"}),
    }
    assert not PodResourcesClient(str(kubelet.socket) + ".nope").available()


def pod(name: str, ns: str = "ns", annotations=None, ip: str = "10.0.0.1"):
    n = types.SimpleNamespace
    return n(status=n(pod_ip=ip, phase="Running", conditions=[n(type="Ready", status="True")]),
             metadata=n(name=name, namespace=ns, labels={"joulepool.dev/pool": "ns.chat"},
                        annotations=annotations or {}),
             spec=n(containers=[n(ports=[n(container_port=8000, name="http")])]))


class FakeCore:
    def __init__(self, pods) -> None:
        self.pods = pods

    def list_pod_for_all_namespaces(self, **kw):
        assert kw.get("_request_timeout")
        return types.SimpleNamespace(items=self.pods)


async def test_discovery_maps_engines_to_their_allocated_gpus(kubelet: FakeKubelet, caplog):
    caplog.set_level(logging.INFO, logger="joulepool.nodeagent.discovery")
    kubelet.pods = [
        pb.PodResources(namespace="ns", name="tp2", containers=[
            container("engine", ("nvidia.com/gpu", ["GPU-cccc", "GPU-dddd"]))]),
        pb.PodResources(namespace="ns", name="one", containers=[
            container("engine", ("nvidia.com/gpu", ["GPU-aaaa"]))]),
        pb.PodResources(namespace="ns", name="mig", containers=[
            container("engine", ("nvidia.com/gpu", ["MIG-0001"]))]),
        pb.PodResources(namespace="ns", name="annotated", containers=[
            container("engine", ("nvidia.com/gpu", ["GPU-bbbb"]))]),
    ]
    api = FakeCore([pod("tp2", ip="10.0.0.2"), pod("one", ip="10.0.0.3"),
                    pod("mig", ip="10.0.0.4"), pod("nogpu", ip="10.0.0.5"),
                    pod("annotated", ip="10.0.0.6", annotations={"joulepool.dev/gpus": "0"})])
    d = PodDiscovery("n1", api=api, pod_resources=PodResourcesClient(str(kubelet.socket)),
                     gpu_uuids=lambda: INDEX)
    got = {e.url.split("//")[1].split(":")[0]: e.gpus for e in await d()}
    assert got == {
        "10.0.0.2": frozenset({2, 3}),
        "10.0.0.3": frozenset({0}),
        "10.0.0.4": None,  # MIG devices are not this node's GPU UUIDs
        "10.0.0.5": None,  # no GPU allocated
        "10.0.0.6": frozenset({0}),  # the annotation wins
    }
    assert any("ns/mig" in r.getMessage() for r in caplog.records)


async def test_discovery_without_the_kubelet_socket_or_with_errors_stays_unmapped(
        kubelet: FakeKubelet, caplog):
    caplog.set_level(logging.INFO, logger="joulepool.nodeagent.discovery")
    kubelet.pods = [pb.PodResources(namespace="ns", name="one", containers=[
        container("engine", ("nvidia.com/gpu", ["GPU-aaaa"]))])]
    api = FakeCore([pod("one")])
    missing = PodDiscovery("n1", api=api, gpu_uuids=lambda: INDEX,
                           pod_resources=PodResourcesClient("/nonexistent/kubelet.sock"))
    for _ in range(2):
        (e,) = await missing()
        assert e.gpus is None
    said = [r for r in caplog.records if "no kubelet pod-resources socket" in r.getMessage()]
    assert len(said) == 1
    kubelet.fail = grpc.StatusCode.PERMISSION_DENIED
    d = PodDiscovery("n1", api=api, gpu_uuids=lambda: INDEX,
                     pod_resources=PodResourcesClient(str(kubelet.socket)))
    (e,) = await d()
    assert e.gpus is None
    assert any("cannot list pod resources" in r.getMessage() for r in caplog.records)
    kubelet.fail = None  # the kubelet is back: mapped again
    (e,) = await d()
    assert e.gpus == frozenset({0})
    # no pod without an annotation: the kubelet is not asked at all
    calls = kubelet.calls
    d2 = PodDiscovery("n1", api=FakeCore([pod("x", annotations={"joulepool.dev/gpus": "1"})]),
                      gpu_uuids=lambda: INDEX,
                      pod_resources=PodResourcesClient(str(kubelet.socket)))
    (e,) = await d2()
    assert e.gpus == frozenset({1}) and kubelet.calls == calls


def test_the_sidecar_wires_pod_resources_to_the_agents_gpus(monkeypatch):
    from joulepool.cli import build_parser
    from joulepool.fakes.gpus import fake_uuid
    from joulepool.nodeagent import runner

    for k in ("JOULEPOOL_POD_RESOURCES_SOCKET", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(k, raising=False)
    seen = {}

    async def fake_main(args, agent):
        await agent.start()
        seen["discover"] = agent.source.discover
        return 0

    monkeypatch.setattr(runner, "_main", fake_main)
    monkeypatch.setattr(runner, "load_kube_config", lambda: None)
    args = load(NodeAgentSettings, build_parser().parse_args(
        ["sidecar", "--backend", "simulated", "--count", "2", "--node", "n9",
         "--kubernetes", "on", "--engine-discovery", "pods"]))
    assert runner.run_sidecar(args) == 0
    d = seen["discover"]
    assert d.pod_resources.socket_path == "/var/lib/kubelet/pod-resources/kubelet.sock"
    assert d.gpu_uuids() == {fake_uuid("n9", 0): 0, fake_uuid("n9", 1): 1}
    args.pod_resources_socket = "off"
    assert runner.run_sidecar(args) == 0
    assert seen["discover"].pod_resources is None


# ------------------------------------------------------------------ DCGM labels of the metrics
async def test_gpu_metrics_carry_the_dcgm_labels_of_the_container_using_the_gpu(kubelet):
    from prometheus_client.parser import text_string_to_metric_families

    from joulepool.fakes.gpus import SimulatedBackend, SimulatedGPUs, fake_uuid
    from joulepool.nodeagent.agent import AgentConfig, NodeAgent
    from joulepool.nodeagent.podresources import GPUOwner, GPUWorkloads
    from joulepool.nodeagent.signals import StaticSignalSource

    t = {"now": 0.0}
    gpus = SimulatedGPUs.open(None, "H100", 2, node="n1")
    u0, u1 = fake_uuid("n1", 0), fake_uuid("n1", 1)
    kubelet.pods = [
        pb.PodResources(name="llama-0", namespace="serving", containers=[
            container("vllm", ("nvidia.com/gpu", [u1])), container("sidecar")]),
        pb.PodResources(name="other", namespace="batch", containers=[
            container("main", ("cpu", ["0"]))]),
    ]
    client = PodResourcesClient(str(kubelet.socket))
    assert client.gpu_owners() == {u1: GPUOwner("serving", "llama-0", "vllm")}
    workloads = GPUWorkloads(client, refresh_s=10.0, monotonic=lambda: t["now"])
    agent = NodeAgent(SimulatedBackend(gpus), StaticSignalSource(lambda now: []),
                      AgentConfig(node="n1"), workloads=workloads)
    await agent.start()
    for i in range(3):
        await agent.tick(float(i))
        await asyncio.sleep(0.05)  # the background refresh
    families = {f.name: f for f in text_string_to_metric_families(agent.metrics.render().decode())}
    assert families["joulepool_gpu_energy_joules"].type == "counter"
    assert families["joulepool_gpu_power_watts"].type == "gauge"
    for name in ("joulepool_gpu_power_watts", "joulepool_gpu_energy_joules",
                 "joulepool_gpu_sm_clock_hertz"):
        by_gpu = {s.labels["gpu"]: s for s in families[name].samples
                  if not s.name.endswith("_created")}
        assert set(by_gpu) == {"0", "1"}, name
        assert by_gpu["1"].labels == {
            "gpu": "1", "UUID": u1, "modelName": "NVIDIA H100 80GB HBM3", "product": "H100",
            "node": "n1", "pod": "llama-0", "namespace": "serving", "container": "vllm"}
        assert by_gpu["0"].labels["UUID"] == u0
        assert (by_gpu["0"].labels["pod"], by_gpu["0"].labels["container"]) == ("", "")
    clock = next(s for s in families["joulepool_gpu_sm_clock_hertz"].samples)
    assert clock.value == pytest.approx(1.98e9)  # H100 f_max, in Hz
    # the pod goes, another comes: one series per GPU, relabelled, none left behind
    kubelet.pods = [pb.PodResources(name="mistral-0", namespace="serving", containers=[
        container("vllm", ("nvidia.com/gpu", [u0]))])]
    t["now"] = 20.0
    await agent.tick(20.0)
    await asyncio.sleep(0.1)
    text = agent.metrics.render().decode()
    power = [s for f in text_string_to_metric_families(text) for s in f.samples
             if s.name == "joulepool_gpu_power_watts"]
    assert {(s.labels["gpu"], s.labels["pod"]) for s in power} == {("0", "mistral-0"), ("1", "")}
    await agent.stop()


# ------------------------------------------------------------------ per-GPU clock targets
def _engine_page(gaps: int, itl_s: float) -> str:
    """A vLLM page after ``gaps`` inter-token gaps of ``itl_s`` each (4 running)."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    r = CollectorRegistry()
    Gauge("vllm:num_requests_waiting", "", ["model_name"], registry=r).labels("llama-3.1-8b")
    Gauge("vllm:num_requests_running", "", ["model_name"], registry=r).labels(
        "llama-3.1-8b").set(4)
    h = Histogram("vllm:inter_token_latency_seconds", "", ["model_name"], registry=r,
                  buckets=(0.025, 0.05, 0.1, 0.2))
    for _ in range(gaps):
        h.labels("llama-3.1-8b").observe(itl_s)
    Counter("vllm:generation_tokens", "", ["model_name"], registry=r).labels(
        "llama-3.1-8b").inc(gaps)
    return generate_latest(r).decode()


def _planned(name: str, tpot_s: float, *shared: list[str]):
    """Pool ns.``name`` (TTFT 1 s, TPOT ``tpot_s``) with one 1xH100 instance on node n1
    per entry of ``shared``, each shared with those guest pools."""
    from joulepool.api.plan import PlannedInstance, PlannedPool, PlannedSLO

    return PlannedPool(
        namespace="ns", name=name, model="llama-3.1-8b", tier="interactive",
        slo=PlannedSLO(ttftSeconds=1.0, tpotSeconds=tpot_s), replicas=len(shared),
        assignments=[PlannedInstance(node="n1", site="s", product="H100", mode="1xH100",
                                     instances=1, gpus=1, gpusPerInstance=1,
                                     sharedWith=guests) for guests in shared])


async def _engine_pages(names, silent: str | None = None):
    """An HTTP server on 127.0.0.1 serving each engine's /metrics at /``name``/metrics
    (decoding at 70 ms a token, 10 more tokens per scrape; ``silent`` answers 503):
    (scrapes per name, port, the runner to clean up)."""
    from aiohttp import web

    scrapes = dict.fromkeys(names, 0)

    def handler(name: str):
        async def page(_: web.Request) -> web.Response:
            scrapes[name] += 1
            if name == silent:
                return web.Response(status=503)
            return web.Response(text=_engine_page(10 * scrapes[name], 0.07))
        return page

    app = web.Application()
    for name in names:
        sub = web.Application()
        sub.router.add_get("/metrics", handler(name))
        app.add_subapp(f"/{name}/", sub)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return scrapes, site._server.sockets[0].getsockname()[1], runner  # type: ignore[union-attr]


def _agent(discovery: PodDiscovery, plan_file: Path, gpus: int):
    """A node agent on node n1 with ``gpus`` simulated H100s, engines found by
    ``discovery``, the plan from ``plan_file``: (agent, its simulated NVML backend)."""
    from joulepool.fakes.gpus import SimulatedBackend, SimulatedGPUs
    from joulepool.nodeagent.agent import AgentConfig, NodeAgent
    from joulepool.nodeagent.plansource import FilePlanSource
    from joulepool.nodeagent.signals import PrometheusSignalSource

    backend = SimulatedBackend(SimulatedGPUs.open(None, "H100", gpus, node="n1"))
    source = PrometheusSignalSource(discover=discovery, discover_wait_s=5.0)
    return NodeAgent(backend, source, AgentConfig(node="n1"),
                     plan=FilePlanSource(plan_file, refresh_s=0.0)), backend


async def _run_six_periods(agent) -> None:
    """Start ``agent``, read its plan, and run six control periods (t = 0 .. 5 s)."""
    await agent.start()
    await agent.plan.refresh()
    for i in range(6):
        await agent.tick(float(i))


async def test_each_gpus_clock_answers_to_the_pools_of_the_pod_on_it(kubelet, tmp_path):
    """Pool chat (TPOT 100 ms) has two instances on node n1, one shared with rag (TPOT
    50 ms) and one of its own; the kubelet gives pod chat-a GPU 0 and chat-b GPU 1. Both
    engines decode at 70 ms a token: the shared pod's GPU must stay fast (70 ms misses
    rag's 50), the GPU of chat's own instance may slow down (70 ms meets chat's 100). The
    agent reads pods from the API, GPUs from the kubelet's PodResources socket, latencies
    from the engines' /metrics over HTTP and the plan from its file; the clocks are the
    simulated NVML's. (The old agent held both GPUs to rag's 50 ms.)"""

    from joulepool.api.contract import (
        METRICS_PATH_ANNOTATION,
        METRICS_PORT_ANNOTATION,
        MODE_LABEL,
        POOL_LABEL,
    )
    from joulepool.api.plan import PlanDocument
    from joulepool.core.profiles import H100
    from joulepool.fakes.gpus import fake_uuid

    doc = PlanDocument(pools={"ns.chat": _planned("chat", 0.1, [], ["ns.rag"]),
                              "ns.rag": _planned("rag", 0.05)})
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(doc.to_json())
    scrapes, port, runner = await _engine_pages(("chat-a", "chat-b"))

    def serving(name: str):
        p = pod(name, ip="127.0.0.1", annotations={
            METRICS_PORT_ANNOTATION: str(port), METRICS_PATH_ANNOTATION: f"/{name}/metrics"})
        p.metadata.labels = {POOL_LABEL: "ns.chat", MODE_LABEL: "1xH100"}
        return p

    uuids = {fake_uuid("n1", i): i for i in range(2)}
    kubelet.pods = [pb.PodResources(namespace="ns", name=n, containers=[
        container("vllm", ("nvidia.com/gpu", [fake_uuid("n1", i)]))])
        for i, n in enumerate(("chat-a", "chat-b"))]
    discovery = PodDiscovery("n1", api=FakeCore([serving("chat-b"), serving("chat-a")]),
                             pod_resources=PodResourcesClient(str(kubelet.socket)),
                             gpu_uuids=lambda: uuids)
    agent, backend = _agent(discovery, plan_file, gpus=2)
    try:
        await _run_six_periods(agent)
        assert min(scrapes.values()) >= 5
        f_max = H100.f_max_mhz.value
        assert backend.sm_clock_mhz(0) == f_max  # chat-a: shared with rag, held to 50 ms
        assert backend.sm_clock_mhz(1) < f_max - 100  # chat-b: chat's own 100 ms
        assert agent.metrics.render().decode().count("joulepool_gpu_sm_clock_hertz{") == 2
    finally:
        await agent.stop()
        await runner.cleanup()


def _v1_serving_pod(name: str, port: int, gpu: int, ready: bool):
    """A kubernetes client V1Pod of pool ns.chat on node n1 (mode 1xH100), its engine's
    /metrics at 127.0.0.1:``port``/``name``/metrics, on GPU ``gpu`` (annotation)."""
    from kubernetes.client import (
        V1Container,
        V1ContainerPort,
        V1ObjectMeta,
        V1Pod,
        V1PodCondition,
        V1PodSpec,
        V1PodStatus,
    )

    from joulepool.api.contract import (
        GPUS_ANNOTATION,
        METRICS_PATH_ANNOTATION,
        METRICS_PORT_ANNOTATION,
        MODE_LABEL,
        POOL_LABEL,
    )

    return V1Pod(
        metadata=V1ObjectMeta(
            name=name, namespace="ns", labels={POOL_LABEL: "ns.chat", MODE_LABEL: "1xH100"},
            annotations={METRICS_PORT_ANNOTATION: str(port), GPUS_ANNOTATION: str(gpu),
                         METRICS_PATH_ANNOTATION: f"/{name}/metrics"}),
        spec=V1PodSpec(node_name="n1", containers=[V1Container(
            name="vllm", ports=[V1ContainerPort(container_port=port, name="http")])]),
        status=V1PodStatus(phase="Running", pod_ip="127.0.0.1", conditions=[
            V1PodCondition(type="Ready", status="True" if ready else "False")]))


@pytest.mark.parametrize("case", ["first_not_ready", "first_not_scraped"])
async def test_the_shared_pods_gpu_is_the_one_the_router_sends_the_guests_requests_to(
        tmp_path, case: str):
    """Pool chat (TPOT 100 ms) has two instances on node n1, one shared with rag (TPOT
    50 ms), and three pods there, chat-a (GPU 0), chat-b (GPU 1), chat-c (GPU 2); engines
    decode at 70 ms a token. The routing service gives the shared instance to the first
    Ready pod by name. ``first_not_ready``: chat-a runs but is not Ready, so rag's
    requests go to chat-b, whose GPU must stay fast (70 ms misses rag's 50); the old agent
    gave the slot to chat-a (Running, scraped) and slowed chat-b. ``first_not_scraped``:
    chat-a is Ready but its /metrics fails, so rag's requests go to chat-a and chat-b is
    chat's own (it may slow down); the old agent left the unscraped pod out and held
    chat-b to rag's 50 ms. The same pods (kubernetes client V1Pods) feed the routing
    service's pools and the agent's discovery; the clocks are the simulated NVML's."""
    from kubernetes.client import ApiClient

    from joulepool.api.plan import PlanDocument
    from joulepool.core.profiles import H100
    from joulepool.kube import testing as T
    from joulepool.kube.pools import Router, RouterSettings
    from joulepool.kube.state import ClusterState

    doc = PlanDocument(pools={"ns.chat": _planned("chat", 0.1, ["ns.rag"], []),
                              "ns.rag": _planned("rag", 0.05)})
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(doc.to_json())
    names = ("chat-a", "chat-b", "chat-c")
    scrapes, port, runner = await _engine_pages(
        names, silent="chat-a" if case == "first_not_scraped" else None)
    pods = [_v1_serving_pod(name, port, i, ready=not (case == "first_not_ready" and i == 0))
            for i, name in enumerate(names)]

    state = ClusterState()  # the routing service's view of the same pods
    state.replace_nodes([T.node("n1", "H100", gpus=3)])
    state.replace_pods([ApiClient().sanitize_for_serialization(p) for p in pods])
    state.set_plan(doc)
    (guest_endpoint,) = Router(RouterSettings(), state).pool("ns.rag").endpoints
    shared = "ns/chat-b" if case == "first_not_ready" else "ns/chat-a"
    assert guest_endpoint.pod == shared

    agent, backend = _agent(PodDiscovery("n1", api=FakeCore(pods[::-1])), plan_file, gpus=3)
    try:
        await _run_six_periods(agent)
        assert min(scrapes.values()) >= 5
        f_max = H100.f_max_mhz.value
        assert backend.sm_clock_mhz(2) < f_max - 100  # chat-c: chat's own 100 ms
        if case == "first_not_ready":
            assert backend.sm_clock_mhz(1) == f_max  # chat-b: shared with rag, 50 ms
        else:
            assert backend.sm_clock_mhz(1) < f_max - 100  # chat-b: chat's own 100 ms
    finally:
        await agent.stop()
        await runner.cleanup()
