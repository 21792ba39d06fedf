"""Wiring for ``joulepool sidecar``: flags -> backend, sources, agent, metrics server."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from typing import Any

from joulepool.cli import UsageError
from joulepool.core.device import GPUBackend, GPUError
from joulepool.nodeagent.agent import AgentConfig, NodeAgent
from joulepool.nodeagent.cli import _node_default
from joulepool.nodeagent.metrics import AgentMetrics
from joulepool.nodeagent.plansource import ConfigMapPlanSource, FilePlanSource, NoPlan, PlanSource
from joulepool.nodeagent.podresources import GPUWorkloads, PodResourcesClient
from joulepool.nodeagent.publisher import (
    KubeProfilePublisher,
    PoolPromptPublisher,
    ProfilePublisher,
    RateLimited,
)
from joulepool.nodeagent.settings import NodeAgentSettings
from joulepool.nodeagent.signals import EngineEndpoint, PrometheusSignalSource, parse_engine_spec

log = logging.getLogger("joulepool.nodeagent")


def in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def load_kube_config() -> None:
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


def build_backend(args: NodeAgentSettings, node: str) -> GPUBackend:
    if args.backend == "simulated":
        from joulepool.fakes.gpus import SimulatedBackend, SimulatedGPUs

        try:
            gpus = SimulatedGPUs.open(args.gpu_state, args.product, args.count, node=node)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        return SimulatedBackend(gpus, privileged=not args.sim_unprivileged)
    from joulepool.nodeagent.nvml import NvmlBackend

    return NvmlBackend()


def build_config(args: NodeAgentSettings, node: str) -> AgentConfig:
    """The agent's control configuration (ranges were checked when the settings loaded)."""
    try:
        return AgentConfig(
            node=node, interval_s=args.interval, k_inc=args.k_inc, step_mhz=args.step_mhz,
            margin=args.margin, ttft_slo_s=args.ttft_slo, tpot_slo_s=args.tpot_slo,
            lost_retry_s=args.lost_retry, call_timeout_s=args.call_timeout,
            control=args.control, power_step_w=args.power_step,
            reset_grace_s=args.reset_grace)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


async def serve_metrics(agent: NodeAgent, host: str, port: int) -> Any:
    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST

    from joulepool.httpserve import start_server

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=agent.metrics.render(),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        limit = 5 * agent.config.interval_s + 5.0
        if agent.last_tick is None or agent.monotonic() - agent.last_tick > limit:
            return web.Response(status=503, text="control loop not ticking\n")
        mode = "monitor-only" if agent.monitor_only else "controlling"
        return web.Response(text=f"ok {mode}\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    return await start_server(app, host, port)


async def _start(args: NodeAgentSettings, agent: NodeAgent) -> bool:
    try:
        await agent.start()
    except GPUError as exc:
        print(f"joulepool node-agent: error: cannot use the {args.backend} GPU backend: {exc}",
              file=sys.stderr)
        if args.backend == "nvml":
            print("joulepool node-agent: hint: on nodes without NVIDIA GPUs (kind) run with "
                  "--backend simulated", file=sys.stderr)
        return False
    return True


async def reset_and_exit(args: NodeAgentSettings, agent: NodeAgent) -> int:
    """``--reset-and-exit``: unlock every GPU (retried for the reset grace); 0 when none
    is left locked. With ``--hold``, then wait for SIGTERM / SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if not await _start(args, agent):
        return 1
    await agent.stop()  # start() already tried once; stop() retries until the grace ends
    left = [g for g in agent.gpus if g.needs_reset and not g.lost]
    lost = [g for g in agent.gpus if g.lost]
    print(f"joulepool node-agent: reset {agent.reset_count} of {len(agent.gpus)} GPU(s) on "
          f"{agent.config.node}"
          + (f"; still possibly locked: {', '.join(str(g.index) for g in left)}" if left else "")
          + (f"; lost: {', '.join(str(g.index) for g in lost)}" if lost else ""), flush=True)
    if left:
        return 1
    if args.hold:
        await stop.wait()
    return 0


async def _main(args: NodeAgentSettings, agent: NodeAgent) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = None
    try:
        if not await _start(args, agent):
            return 1
        if args.metrics_port:
            try:
                runner = await serve_metrics(agent, args.metrics_host, args.metrics_port)
            except OSError as exc:
                print(f"joulepool sidecar: error: cannot serve metrics on "
                      f"{args.metrics_host}:{args.metrics_port}: {exc.strerror}", file=sys.stderr)
                await agent.stop()
                return 1
        print(f"joulepool sidecar: {len(agent.gpus)} GPU(s) on {agent.config.node}, "
              f"{args.backend} backend, "
              f"{'monitor-only' if agent.monitor_only else 'controlling clocks'}", flush=True)
        await agent.run(stop)  # resets every GPU's clocks on the way out
        return 0
    finally:
        if runner is not None:
            await runner.cleanup()


def run_sidecar(args: NodeAgentSettings) -> int:
    node = args.node or _node_default()
    config = build_config(args, node)
    if args.reset_and_exit:
        agent = NodeAgent(build_backend(args, node), PrometheusSignalSource([]), config,
                          metrics=AgentMetrics(node))
        return asyncio.run(reset_and_exit(args, agent))
    kube = args.kubernetes == "on" or (args.kubernetes == "auto" and in_cluster())
    try:
        endpoints: list[EngineEndpoint] = [
            parse_engine_spec(s, args.pool) for s in args.engine_url]
    except ValueError as exc:
        raise UsageError(f"--engine-url: {exc}") from None
    discovery = args.engine_discovery == "pods" or (
        args.engine_discovery == "auto" and kube and not endpoints)
    if discovery and not kube:
        raise UsageError("--engine-discovery pods needs the Kubernetes API (--kubernetes on)")
    if kube:
        try:
            load_kube_config()
        except Exception as exc:
            raise UsageError(f"cannot configure the Kubernetes client: {exc}") from None

    metrics = AgentMetrics(node)
    socket_path = args.pod_resources_socket or ""
    pod_resources = workloads = None
    if socket_path and socket_path.lower() not in ("off", "none"):
        # which container each GPU is allocated to: engines -> GPUs, and the DCGM labels
        pod_resources = PodResourcesClient(socket_path)
        workloads = GPUWorkloads(pod_resources)
    discover = None
    if discovery:
        from joulepool.nodeagent.discovery import PodDiscovery

        discover = PodDiscovery(node, pod_resources=pod_resources)
    source = PrometheusSignalSource(
        endpoints, discover=discover, quantile=args.tail_quantile, window_s=args.window,
        prompt_window_s=args.prompt_window,
        timeout_s=min(max(0.8 * args.interval, 0.2), 5.0), stale_s=args.stale_after,
        on_error=lambda url: metrics.scrape_errors.labels(node, url).inc())
    plan: PlanSource
    if args.plan_file:
        plan = FilePlanSource(args.plan_file, refresh_s=min(args.plan_refresh, 5.0))
    elif kube:
        plan = ConfigMapPlanSource(args.namespace, refresh_s=args.plan_refresh)
    else:
        plan = NoPlan()
    publisher: ProfilePublisher | None = None
    if kube and args.publish:
        # another node's entry is dropped once it misses ~10 publications (at least 10 min)
        publisher = RateLimited(
            KubeProfilePublisher(max_age_s=max(600.0, 10.0 * args.publish_interval)),
            args.publish_interval)
    prompts = None
    if kube and args.publish:
        # each pool's prompt lengths seen on this node, for the planner's prompt tail
        prompts = PoolPromptPublisher(min_interval_s=args.publish_interval)
    policy = None
    if kube and args.energy_policy and args.energy_policy.lower() not in ("none", "off"):
        from joulepool.nodeagent.plansource import EnergyPolicySource

        policy = EnergyPolicySource(name=args.energy_policy)
    backend = build_backend(args, node)
    agent = NodeAgent(backend, source, config, plan=plan, publisher=publisher, metrics=metrics,
                      monotonic=time.monotonic, policy=policy, workloads=workloads,
                      prompt_publisher=prompts)
    if discover is not None:
        # engines -> GPUs: the kubelet's device IDs are GPU UUIDs; the agent knows the indices
        discover.gpu_uuids = lambda: {g.info.uuid: g.index for g in agent.gpus}
    return asyncio.run(_main(args, agent))
