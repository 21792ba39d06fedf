"""A real Prometheus on loopback scrapes running components and answers every dashboard query.

Running: a fake engine (``joulepool fake-engine``) on two simulated H100s, the
node agent (``joulepool node-agent``, simulated NVML) controlling them, the
router (``joulepool router`` without a cluster) routing requests that really
go to the engine, also picking for them as the GIE endpoint picker (Envoy ext_proc
over gRPC, ``--epp-port``: its latency histograms), and the operator's planning
loop (in this process, against an in-memory API) with a live carbon source that is
this very Prometheus.
Prometheus (Debian's ``prometheus`` package, as ``make test`` installs it)
scrapes all of them every second; the test then evaluates each query of the
chart's Grafana dashboard and each recording rule through the HTTP API.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from joulepool.api import contract
from joulepool.fakes.gpus import SimulatedGPUs
from joulepool.fakes.killharness import child_env

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "charts" / "joulepool" / "files" / "dashboards" / "joulepool.json"
RULES = ROOT / "charts" / "joulepool" / "files" / "prometheus-rules.yaml"
PROMETHEUS = shutil.which("prometheus")
PY = [sys.executable, "-c", "import sys; from joulepool.cli import main; sys.exit(main())"]
POOL = "default.chat"

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="prometheus not installed (Debian package 'prometheus'; `make test` installs it "
           "when run as root)")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(url: str, body: Any = None, timeout: float = 5.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        text = r.read().decode()
    try:
        return json.loads(text)
    except ValueError:
        return text


def wait_for(pred: Any, timeout: float, what: str, every: float = 0.2) -> Any:
    end = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < end:
        try:
            last = pred()
        except OSError as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r:.500}")


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, env=child_env(), stdout=log.open("wb"), stderr=subprocess.STDOUT)


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


class Stack:
    """Processes and servers of one run; every port is on 127.0.0.1."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports = {k: free_port() for k in ("engine", "agent", "router", "epp", "operator",
                                                 "prom")}
        self.prom_url = f"http://127.0.0.1:{self.ports['prom']}"

    def start_prometheus(self) -> None:
        jobs = {"node-agent": "agent", "router": "router", "operator": "operator"}
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": job, "static_configs": [
                    {"targets": [f"127.0.0.1:{self.ports[key]}"]}]}
                for job, key in jobs.items()],
        }
        cfg = self.tmp / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(config))
        self.procs.append(spawn([
            str(PROMETHEUS), f"--config.file={cfg}", f"--storage.tsdb.path={self.tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.ports['prom']}", "--log.level=warn"],
            self.tmp / "prometheus.log"))
        wait_for(lambda: http(f"{self.prom_url}/-/ready") is not None, 30, "Prometheus ready")

    def start_node(self) -> None:
        state = self.tmp / "gpu-state.json"
        SimulatedGPUs.open(state, "H100", 2, node="n1")
        engine = f"http://127.0.0.1:{self.ports['engine']}"
        # the plan puts this node in site "east" (the site the operator prices below)
        plan = self.tmp / "plan.json"
        plan.write_text(json.dumps({
            "version": 1, "objective": "carbon", "feasible": True,
            "pools": {POOL: {"namespace": "default", "name": "chat", "model": "llama-3.1-8b",
                             "tier": "interactive", "replicas": 1,
                             "slo": {"ttftSeconds": 2, "tpotSeconds": 0.2}}},
            "nodes": {"n1": {"site": "east", "product": "H100", "gpus": 2,
                             "pools": {POOL: 2}}}}))
        self.procs.append(spawn([
            *PY, "fake-engine", "--host", "127.0.0.1", "--port", str(self.ports["engine"]),
            "--gpu-state", str(state), "--gpu-index", "0,1", "--model", "llama-3.1-8b"],
            self.tmp / "engine.log"))
        wait_for(lambda: http(f"{engine}/health") == "ok", 30, "fake engine")
        self.procs.append(spawn([
            *PY, "node-agent", "--backend", "simulated", "--gpu-state", str(state),
            "--node", "n1", "--kubernetes", "off", "--interval", "0.2",
            "--plan-file", str(plan),
            "--engine-url", f"{engine}/metrics", "--pool", POOL,
            "--ttft-slo", "2", "--tpot-slo", "0.2",
            "--metrics-host", "127.0.0.1", "--metrics-port", str(self.ports["agent"])],
            self.tmp / "agent.log"))
        endpoints = self.tmp / "endpoints.json"
        endpoints.write_text(json.dumps({"pools": {POOL: {
            "slo": {"ttftSeconds": 2, "tpotSeconds": 0.2},
            "endpoints": [{"address": f"127.0.0.1:{self.ports['engine']}", "node": "n1",
                           "product": "H100", "model": "llama-3.1-8b", "gpus": 2,
                           "metricsUrl": f"{engine}/metrics"}]}}}))
        self.procs.append(spawn([
            *PY, "router", "--no-cluster", "--host", "127.0.0.1",
            "--port", str(self.ports["router"]), "--endpoints-file", str(endpoints),
            "--epp-port", str(self.ports["epp"]),
            "--scrape-interval-seconds", "0.5"], self.tmp / "router.log"))
        wait_for(lambda: http(f"http://127.0.0.1:{self.ports['agent']}/metrics"), 30,
                 "node agent metrics")
        wait_for(lambda: http(f"http://127.0.0.1:{self.ports['router']}/healthz"), 30,
                 "router")

    def traffic(self, n: int) -> None:
        """Requests through the router to the engine, each reported back to the router,
        and as many picks by the GIE endpoint picker."""
        router = f"http://127.0.0.1:{self.ports['router']}"
        for i in range(n):
            self.pick()
            d = http(f"{router}/v1/route", {"pool": POOL, "inputTokens": 64,
                                            "outputTokens": 32, "deadlineSeconds": 0.05 + i % 2})
            t0 = time.monotonic()
            out = http(f"http://{d['endpoint']}/v1/completions",
                       {"model": "llama-3.1-8b", "prompt": "hello " * 64, "max_tokens": 32},
                       timeout=30)
            e2e = time.monotonic() - t0
            tokens = out["usage"]["completion_tokens"]
            http(f"{router}/v1/complete", {
                "pool": POOL, "endpoint": d["endpoint"], "requestId": d["requestId"],
                "ttftSeconds": min(e2e, 0.5 * e2e), "e2eSeconds": e2e, "outputTokens": tokens,
                "deadlineMet": e2e <= d["deadlineSeconds"]})

    def pick(self) -> None:
        """One request's pick through the GIE endpoint picker, as a gateway asks it: its
        headers, then its body (the pick, timed in the picker's histograms)."""
        body = json.dumps({"model": "llama-3.1-8b", "prompt": "hello " * 64,
                           "max_tokens": 32}).encode()
        headers = {":method": "POST", ":path": "/v1/completions", ":authority": "gw",
                   "content-type": "application/json"}
        messages = [
            pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(
                headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode())
                         for k, v in headers.items()]))),
            pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True))]
        with grpc.insecure_channel(f"127.0.0.1:{self.ports['epp']}") as channel:
            stub = pb_grpc.ExternalProcessorStub(channel)
            answers = list(stub.Process(iter(messages), timeout=10))
        destination = [h.header.key for a in answers if a.HasField("request_body")
                       for h in a.request_body.response.header_mutation.set_headers]
        assert destination == [contract.EPP_DESTINATION_HEADER], answers

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


def run_operator_planning(prom_url: str, port: int) -> Any:
    """The operator's planning loop once (in-memory API) with a live carbon source; its
    registry served on ``port``.  Returns the HTTP server (shut it down)."""
    from prometheus_client import start_http_server

    sys.path.insert(0, str(ROOT / "tests" / "unit"))
    from test_operator_planning import make_planner, pool, reconcile

    from joulepool.api.models import EnergyPolicySpec
    from joulepool.core.planner import PlanNode

    planner, _api, world = make_planner()
    planner.clock = lambda: datetime.now(UTC)
    world.nodes["n1"] = [PlanNode("n1", "east", "H100", 2)]
    world.nodes["w1"] = [PlanNode("w1", "west", "H100", 2)]
    world.add_pool(pool("chat", 2))
    world.policies["default"] = [("default", EnergyPolicySpec.model_validate({
        "objective": "carbon",
        "carbon": [{"site": "east", "source": {"provider": "prometheus", "url": prom_url,
                                              "query": "vector(250)"}},
                   {"site": "west", "gramsPerKWh": 400}]}))]

    async def once() -> None:
        try:
            await reconcile(planner, world, force=True)
        finally:
            await planner.carbon.close()

    asyncio.run(once())
    server, _thread = start_http_server(port, addr="127.0.0.1", registry=planner.metrics.registry)
    return server


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("prom"))
    server = None
    try:
        s.start_prometheus()
        s.start_node()
        server = run_operator_planning(s.prom_url, s.ports["operator"])
        s.traffic(12)
        yield s
    finally:
        if server is not None:
            server.shutdown()
        s.stop()


def query(stack: Stack, expr: str) -> list[dict[str, Any]]:
    url = f"{stack.prom_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = http(url)
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def test_prometheus_scrapes_every_component(stack: Stack) -> None:
    def all_up() -> bool:
        targets = http(f"{stack.prom_url}/api/v1/targets")["data"]["activeTargets"]
        return len(targets) == 3 and all(t["health"] == "up" for t in targets)
    wait_for(all_up, 30, "all three targets up")


@pytest.mark.parametrize("expr", dashboard_queries())
def test_every_dashboard_query_returns_data(stack: Stack, expr: str) -> None:
    def answer() -> list[dict[str, Any]]:
        result = query(stack, expr)
        if not result:  # rates need counters that move within the window: keep traffic going
            stack.traffic(1)
        return result

    result = wait_for(answer, 40, f"data for {expr}", every=1.0)
    assert all(float(r["value"][1]) == float(r["value"][1]) for r in result)  # not NaN


def test_the_pool_shows_up_in_router_and_planner_series(stack: Stack) -> None:
    lam = wait_for(lambda: query(stack, f'joulepool_router_lambda{{pool="{POOL}"}}'), 30,
                   "router lambda")
    assert float(lam[0]["value"][1]) > 0
    planned = query(stack, f'joulepool_pool_planned_instances{{pool="{POOL}"}}')
    assert planned and float(planned[0]["value"][1]) >= 1
    east = query(stack, 'joulepool_carbon_intensity_grams_per_kwh{site="east"}')
    assert east and float(east[0]["value"][1]) == 250.0  # read from Prometheus itself
    clocks = query(stack, "joulepool_gpu_target_clock_hertz > 0")
    assert clocks, "the node agent locked the simulated GPUs' clocks"
    # every joule the agent metered is some pool's or idle, none twice
    metered = query(stack, "sum(joulepool_gpu_energy_joules_total)")
    split = query(stack, "sum(joulepool_pool_energy_joules_total)"
                         " + sum(joulepool_gpu_idle_energy_joules_total or vector(0))")
    # (credited in the same step as the GPU counter; the slack only covers a scrape
    # racing the agent between the two increments)
    watts = float(query(stack, "sum(joulepool_gpu_power_watts)")[0]["value"][1])
    assert abs(float(split[0]["value"][1]) - float(metered[0]["value"][1])) <= 0.2 * watts + 1e-6
    # the agent took its site from the plan: pool energy is east's, priced at east's 250 g/kWh
    assert query(stack, f'joulepool_pool_energy_joules_total{{pool="{POOL}",site="east"}}')
    jpt = query(stack, f'sum(joulepool_pool_energy_joules_total{{pool="{POOL}"}})'
                       f' / sum(joulepool_pool_output_tokens_total{{pool="{POOL}"}})')
    assert 0 < float(jpt[0]["value"][1]) < 100  # J per output token of the fake engine


def test_recording_rules_evaluate(stack: Stack) -> None:
    rules = http(f"{stack.prom_url}/api/v1/rules")["data"]["groups"]
    health = {r.get("name") or r.get("record"): r["health"] for g in rules for r in g["rules"]}
    assert health and all(h in ("ok", "unknown") for h in health.values()), health
    gpu_jpt = wait_for(lambda: query(stack, "joulepool:gpu_joules_per_token:avg"), 40,
                       "J/token by product and model")
    assert gpu_jpt[0]["metric"]["product"] == "H100"
