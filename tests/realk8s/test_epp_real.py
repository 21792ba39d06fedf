"""The GIE endpoint picker of ``joulepool router``, run with the chart's own arguments
(``--epp-port`` included) on the chart's router ServiceAccount against the real API
server: once the router has synced, the gRPC readiness service says SERVING and a
gateway's ext_proc exchange (Envoy's messages, real gRPC on loopback) is answered with
the pool's serving pod found through the real API; no RBAC denial."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import k8slib
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from k8slib import Components, ControlPlane

from joulepool.api.contract import EPP_DESTINATION_HEADER


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
    token_file = cluster.run_dir / "router-token-epp"
    token_file.write_text(k8slib.router_token(chart))
    serving = k8slib.serving_pool(cluster, namespace, nodes, "epp", version=901)
    pool, ip = serving.pool, serving.ip

    args = k8slib.chart_router_args(chart, k8slib.free_port(), str(token_file))
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
