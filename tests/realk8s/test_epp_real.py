"""The GIE endpoint picker of ``joulepool router``, run with the chart's own arguments
(``--epp-port`` included) on the chart's router ServiceAccount against the real API
server: once the router has synced, the gRPC readiness service says SERVING and a
gateway's ext_proc exchange (Envoy's messages, real gRPC on loopback) is answered with
the pool's serving pod found through the real API; no RBAC denial."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import grpc
import k8slib
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from k8slib import Components, ControlPlane
from test_router_real import _chart_router_args

from joulepool.api.contract import EPP_DESTINATION_HEADER, MODE_LABEL, POOL_LABEL
from joulepool.api.plan import PLAN_CONFIGMAP, PLAN_KEY
from joulepool.kube import testing as T


async def _ready_and_pick(port: int, pool: str) -> tuple[str, str]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(120):
            resp = await health.Check(health_pb2.HealthCheckRequest(service="readiness"))
            if resp.status == health_pb2.HealthCheckResponse.SERVING:
                break
            await asyncio.sleep(0.25)
        else:
            raise AssertionError("readiness never SERVING")
        stub = pb_grpc.ExternalProcessorStub(channel)
        for _ in range(60):  # the pod may reach the router's cache after readiness
            call = stub.Process()
            await call.write(pb.ProcessingRequest(request_headers=pb.HttpHeaders(
                headers=base_pb2.HeaderMap(headers=[
                    base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in (
                        (":method", "POST"), (":path", "/v1/completions"),
                        ("x-joulepool-pool", pool))]))))
            await call.read()
            await call.write(pb.ProcessingRequest(request_body=pb.HttpBody(
                body=b'{"model": "llama-3.1-8b", "prompt": "hi", "max_tokens": 8}',
                end_of_stream=True)))
            answer = await call.read()
            await call.done_writing()
            if answer.HasField("request_body"):
                (opt,) = answer.request_body.response.header_mutation.set_headers
                md = json_format.MessageToDict(answer.dynamic_metadata)
                return opt.header.raw_value.decode(), md["envoy.lb"][EPP_DESTINATION_HEADER]
            await asyncio.sleep(0.25)
        raise AssertionError(f"no pick: {answer}")


def test_picker_with_the_charts_args_routes_to_the_pools_pod(
        cluster: ControlPlane, chart: Any, procs: Components, namespace: str,
        nodes: list[str]) -> None:
    secret = chart.get("Secret", k8slib.service_account("router") + "-token")
    token_file = cluster.run_dir / "router-token-epp"
    token_file.write_text(base64.b64decode(secret["data"]["token"]).decode())
    node = f"epp-h100-{k8slib.free_port()}"
    nodes.append(node)
    cluster.create_node(k8slib.gpu_node(node, "H100", 8))
    pool = f"{namespace}.chat"
    cluster.apply({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": PLAN_CONFIGMAP, "namespace": k8slib.RELEASE_NAMESPACE},
                   "data": {PLAN_KEY: T.plan({pool: [(node, "H100", 1)]}, version=901)
                            .to_json()}})
    cluster.core.create_namespaced_pod(namespace, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "chat-0", "labels": {POOL_LABEL: pool, MODE_LABEL: "1xH100"}},
        "spec": {"nodeName": node, "containers": [{
            "name": "engine", "image": "engine:test",
            "ports": [{"name": "http", "containerPort": 8000}],
            "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}})
    ip = k8slib.wait_for("the serving pod's IP", lambda: cluster.core.read_namespaced_pod(
        "chat-0", namespace).status.pod_ip)

    args = _chart_router_args(chart, k8slib.free_port(), str(token_file))
    epp_port = k8slib.free_port()
    args[args.index("--epp-port") + 1] = str(epp_port)  # the chart passes it
    # its own log name: logs/<name>.log persists across tests, and "router" has an old
    # "listening on" from test_router_real
    router = procs.joulepool("router-epp", args,
                             service_account=k8slib.service_account("router"))
    router.wait_log("listening on", timeout=60)
    header, metadata = asyncio.run(_ready_and_pick(epp_port, pool))
    assert header == metadata == f"{ip}:8000"  # one pod: no fallbacks
    assert router.forbidden_lines() == []
