"""GPU safety under partial permission and a hung API server (clocks are always handed back)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import time

from joulepool.core.device import GPUError, GPUErrorKind
from joulepool.core.profiles import H100
from joulepool.fakes.gpus import SimulatedBackend, SimulatedGPUs
from joulepool.nodeagent.agent import AgentConfig, NodeAgent
from joulepool.nodeagent.discovery import PodDiscovery
from joulepool.nodeagent.metrics import AgentMetrics
from joulepool.nodeagent.plansource import ConfigMapPlanSource, EnergyPolicySource
from joulepool.nodeagent.signals import EngineReading, PrometheusSignalSource, StaticSignalSource


class PartlyPrivileged(SimulatedBackend):
    """Clock control is refused on some GPUs only (e.g. a per-device policy changed)."""

    def __init__(self, gpus, denied=()) -> None:
        super().__init__(gpus)
        self.denied: set[int] = set(denied)

    def _check_control(self, index):
        if index in self.denied:
            raise GPUError(GPUErrorKind.NO_PERMISSION, "Insufficient Permissions", index)
        return super()._check_control(index)


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def idle_readings(now: float) -> list[EngineReading]:
    # an idle engine on every GPU at a loose SLO: MIAD walks every clock down
    return [EngineReading(engine="http://e0", waiting=0, ttft_tail_s=0.05, mean_itl_s=0.01,
                          tokens=10.0, model="m")]


def make_agent(count=2, backend_cls=PartlyPrivileged, clock=None, interval=1.0, **kw):
    clock = clock or Clock()
    gpus = SimulatedGPUs.open(None, "H100", count, node="n1", clock=clock)
    backend = backend_cls(gpus)
    metrics = AgentMetrics("n1")
    config = AgentConfig(node="n1", interval_s=interval, ttft_slo_s=1.0, tpot_slo_s=0.1)
    agent = NodeAgent(backend, kw.pop("source", StaticSignalSource(idle_readings)), config,
                      metrics=metrics, monotonic=clock, **kw)
    return agent, gpus, backend, clock, metrics


def locked(gpus: SimulatedGPUs, i: int):
    lk = gpus.gpu(i)["locked"]
    return None if lk is None else lk[1]


# ------------------------------------------------------------ 1. partial NO_PERMISSION
async def test_no_permission_on_one_gpu_hands_back_the_others_clocks(caplog):
    caplog.set_level(logging.INFO, logger="joulepool.nodeagent")
    agent, gpus, backend, clock, _ = make_agent(count=2)
    await agent.start()
    for _ in range(3):
        clock.t += 1.0
        await agent.tick(clock.t)
    assert locked(gpus, 0) is not None and locked(gpus, 1) is not None
    backend.denied = {1}  # GPU 1 refuses from now on
    for _ in range(3):
        clock.t += 1.0
        await agent.tick(clock.t)
    assert agent.monitor_only
    # GPU 0's clock was handed back on entering monitor-only, not left at the last cap
    assert locked(gpus, 0) is None
    await agent.stop()
    assert locked(gpus, 0) is None
    # GPU 1 could not be reset: said once, at INFO, and the agent carried on
    said = [r for r in caplog.records if "GPU 1: reset of locked clocks failed" in r.getMessage()]
    assert len(said) == 1


async def test_reset_all_tries_every_gpu_whatever_the_agents_state():
    agent, gpus, backend, clock, _ = make_agent(count=3)
    await agent.start()
    for _ in range(3):
        clock.t += 1.0
        await agent.tick(clock.t)
    assert all(locked(gpus, i) is not None for i in range(3))
    # the agent's beliefs can be wrong (monitor-only, a "lost" GPU, NOT_SUPPORTED on one):
    # stop() still asks every GPU, and one failure does not skip the others
    agent.monitor_only = True
    agent.gpus[1].lost = True
    agent.gpus[2].controllable = False
    backend.denied = {0}
    assert await agent.reset_all() == 2
    assert locked(gpus, 1) is None and locked(gpus, 2) is None
    backend.denied = set()
    gpus.set_fault(1, "lost")
    assert await agent.reset_all() == 2  # GPUs 0 and 2; the lost one is tolerated
    assert locked(gpus, 0) is None


# ------------------------------------------------------------ 2. a hung API server
class HangingPlan:
    """A plan source whose API call never returns."""

    def __init__(self) -> None:
        self.calls = 0

    async def refresh(self) -> None:
        self.calls += 1
        await asyncio.Event().wait()

    def current(self):
        return None


async def test_hanging_plan_refresh_does_not_freeze_control_and_stop_resets():
    plan = HangingPlan()
    agent, gpus, _, _, _ = make_agent(count=2, backend_cls=SimulatedBackend,
                                      clock=time.monotonic, interval=0.02, plan=plan)
    await agent.start()
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    for _ in range(300):
        await asyncio.sleep(0.01)
        if agent.ticks >= 10 and locked(gpus, 0) is not None:
            break
    assert agent.ticks >= 10  # kept ticking with the last good (no) plan
    assert plan.calls == 1  # one refresh in flight, never a pile of them
    assert locked(gpus, 0) is not None and locked(gpus, 0) < H100.f_max_mhz.value
    t0 = time.monotonic()
    stop.set()
    await asyncio.wait_for(task, 3.0)
    assert time.monotonic() - t0 < 2.0
    assert locked(gpus, 0) is None and locked(gpus, 1) is None


class HangingSource:
    def __init__(self) -> None:
        self.reads = 0

    async def read(self, now):
        self.reads += 1
        await asyncio.Event().wait()

    async def close(self) -> None:
        return None


async def test_a_hung_period_is_bounded_counted_and_interrupted_by_stop():
    src = HangingSource()
    agent, gpus, _, _, metrics = make_agent(count=2, backend_cls=SimulatedBackend,
                                            clock=time.monotonic, interval=0.02, source=src)
    agent.config.tick_timeout_s = 0.1
    await agent.start()
    gpus.set_locked(0, 990.0, 1200.0)  # as if a period had locked it before hanging
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    for _ in range(300):
        await asyncio.sleep(0.01)
        if src.reads >= 3:
            break
    assert src.reads >= 3  # each hung period was abandoned and the next one started
    errors = metrics.registry.get_sample_value(
        "joulepool_control_errors_total", {"gpu": "all", "product": "", "node": "n1"})
    assert errors is not None and errors >= 2
    assert locked(gpus, 0) is None  # an abandoned period resets the clocks
    # stop in the middle of a (hung) period: prompt, and clocks reset
    agent.config.tick_timeout_s = 60.0
    await asyncio.sleep(0.3)
    gpus.set_locked(1, 990.0, 1200.0)
    t0 = time.monotonic()
    stop.set()
    await asyncio.wait_for(task, 3.0)
    assert time.monotonic() - t0 < 2.5
    assert locked(gpus, 1) is None


async def test_hanging_discovery_keeps_scraping_the_known_engines():
    calls = {"n": 0}

    async def discover():
        calls["n"] += 1
        await asyncio.Event().wait()
        return []

    clock = {"t": 0.0}
    src = PrometheusSignalSource([], discover=discover, discover_interval_s=1.0,
                                 timeout_s=0.2, discover_wait_s=0.05,
                                 monotonic=lambda: clock["t"])
    t0 = time.monotonic()
    for i in range(5):
        clock["t"] = float(i * 2)
        assert await asyncio.wait_for(src.read(clock["t"]), 1.0) == []
    assert time.monotonic() - t0 < 2.0  # waited briefly once, not every read
    assert calls["n"] == 1  # and never started a second one while the first hangs
    await asyncio.wait_for(src.close(), 2.0)


async def test_sigterm_mid_period_resets_every_gpu_promptly():
    from joulepool.nodeagent.runner import _main

    agent, gpus, _, _, _ = make_agent(count=2, backend_cls=SimulatedBackend,
                                      clock=time.monotonic, interval=0.02,
                                      source=HangingSource(), plan=HangingPlan())
    agent.config.tick_timeout_s = 60.0  # the period itself would hang for a minute
    args = argparse.Namespace(backend="simulated", metrics_port=0, metrics_host="127.0.0.1")

    async def lock_then_kill():
        await asyncio.sleep(0.3)
        gpus.set_locked(0, 990.0, 1200.0)
        gpus.set_locked(1, 990.0, 1200.0)
        os.kill(os.getpid(), signal.SIGTERM)

    killer = asyncio.create_task(lock_then_kill())
    t0 = time.monotonic()
    assert await asyncio.wait_for(_main(args, agent), 5.0) == 0
    await killer
    assert time.monotonic() - t0 < 3.0
    assert locked(gpus, 0) is None and locked(gpus, 1) is None


# ------------------------------------------------------------ every API call has a timeout
class RecordingApi:
    def __init__(self) -> None:
        self.kwargs: list[dict] = []

    def read_namespaced_config_map(self, name, namespace, **kw):
        self.kwargs.append(kw)
        raise RuntimeError("not found")

    def get_cluster_custom_object(self, *a, **kw):
        self.kwargs.append(kw)
        return {}

    def list_pod_for_all_namespaces(self, **kw):
        self.kwargs.append(kw)
        return argparse.Namespace(items=[])


async def test_every_kubernetes_call_of_the_agent_sets_a_request_timeout():
    api = RecordingApi()
    await ConfigMapPlanSource("ns", api=api).refresh()
    await EnergyPolicySource(api=api).refresh()
    assert await PodDiscovery("n1", api=api)() == []
    assert len(api.kwargs) == 3
    assert all(kw.get("_request_timeout") for kw in api.kwargs)
