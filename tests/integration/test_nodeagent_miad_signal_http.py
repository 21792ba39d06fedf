"""The node agent's MIAD signal end to end, over HTTP: a fake engine (vLLM's or SGLang's
metric names) on a simulated H100, the agent scraping its /metrics each period and
locking the simulated GPU's clock, streaming clients as a client streams.

The agent reads the period's mean inter-token latency from the increments of the
engine's ITL histogram's ``_sum`` and ``_count`` through ``core.controllers.miad_signal``,
the simulator's function. The
increments it read add up to the engine's own histogram; MIAD walks the clock down while
that mean is under (1 - margin) x TPOT, and back up when it crosses, so it settles
between the lowest clock (too slow for the TPOT at this batch) and the highest, with
every client's TPOT met.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from test_nodeagent_floor_http import send

from joulepool.core.controllers import MIADController, miad_signal
from joulepool.core.profiles import L4, L4_8B
from joulepool.fakes.engine import EngineMetrics, FakeEngine, build_app
from joulepool.fakes.gpus import SimulatedBackend, SimulatedGPUs
from joulepool.nodeagent.agent import AgentConfig, NodeAgent
from joulepool.nodeagent.metrics import AgentMetrics
from joulepool.nodeagent.signals import EngineReading, PrometheusSignalSource, parse_engine_spec

CLIENTS = 8
#: an L4 decodes a batch of 8 (Llama-3.1-8B) in 80 ms at its lowest clock and 58 ms at its
#: highest: (1 - margin) x TPOT = 67.5 ms lies between, so MIAD must settle between them
#: (steps this long keep the fake engine's Python overhead small beside them)
TPOT_S = 0.075
TTFT_S = 5.0  # generous: first tokens never at risk, no prefill floor above the lowest clock
PERIOD_S = 0.1
#: control periods after the last client started: MIAD is judged on the later half.
#: Counted, not timed: a loaded machine runs them more slowly, not fewer of them
PERIODS = 70
#: generous: unloaded, the run takes about 11 s
DEADLINE_S = 240.0
TOKENS = 40


class Recorder:
    """The agent's signal source, keeping every reading it hands the agent."""

    def __init__(self, source: PrometheusSignalSource) -> None:
        self.source = source
        self.readings: list[EngineReading] = []

    async def read(self, now: float) -> list[EngineReading]:
        out = await self.source.read(now)
        self.readings.extend(out)
        return out

    async def close(self) -> None:
        await self.source.close()


@pytest.mark.parametrize("engine_name", ["vllm", "sglang"])
async def test_the_agent_steers_on_the_period_mean_itl_of_the_engines_histogram(engine_name):
    gpus = SimulatedGPUs.open(None, "L4", 1, node="n1")
    engine_metrics = EngineMetrics(L4_8B.model, [0], "L4", engine=engine_name)
    engine = FakeEngine(L4_8B, gpus, [0], metrics=engine_metrics)
    server = TestServer(build_app(engine), host="127.0.0.1")
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    metrics = AgentMetrics("n1")
    source = Recorder(PrometheusSignalSource([parse_engine_spec(f"0@{url}")], window_s=1.0,
                                             timeout_s=0.5))
    agent = NodeAgent(SimulatedBackend(gpus), source,
                      AgentConfig(node="n1", interval_s=PERIOD_S, ttft_slo_s=TTFT_S,
                                  tpot_slo_s=TPOT_S), metrics=metrics)
    await agent.start()
    clocks: list[tuple[float, float]] = []  # (s since start, locked MHz) after each period
    counted: list[float] = []  # locked MHz after each period since every client started
    started: set[int] = set()
    stop = asyncio.Event()
    t0 = time.monotonic()

    async def control() -> None:
        while not stop.is_set():
            await agent.tick()
            clocks.append((time.monotonic() - t0, agent.gpus[0].locked_mhz or 0.0))
            if len(started) == CLIENTS:
                counted.append(clocks[-1][1])
                if len(counted) >= PERIODS:
                    stop.set()  # the clients finish the requests they are in
            await asyncio.sleep(PERIOD_S)

    async def client(i: int, session: aiohttp.ClientSession, tpots: list[float]) -> None:
        await asyncio.sleep(0.3 * i)  # staggered, and of different lengths: the batch
        started.add(i)  # keeps decoding while others start
        while not stop.is_set():
            _, tpot = await send(session, url, 100, TOKENS + 5 * i)
            tpots.append(tpot)

    loop = asyncio.create_task(control())
    tpots: list[float] = []
    try:
        async with aiohttp.ClientSession() as session:
            clients = asyncio.gather(*(client(i, session, tpots) for i in range(CLIENTS)))
            await asyncio.wait_for(clients, DEADLINE_S)
        stop.set()
        await loop
        await source.read(time.monotonic())  # the engine idle: the rest of its totals
    finally:
        stop.set()
        await loop
        await agent.stop()
        await server.close()
    itl = engine_metrics.tpot.labels(L4_8B.model)
    engine_sum, engine_count = itl._sum.get(), sum(b.get() for b in itl._buckets)
    read = [r.latencies for r in source.readings if r.latencies is not None]
    # the agent's period increments add up to the engine's ITL histogram: none lost, none
    # counted twice (the first scrape reads everything since the engine started)
    assert sum(p.itl_count for p in read) == engine_count > 0
    assert sum(p.itl_sum for p in read) == pytest.approx(engine_sum, rel=1e-9)
    for r in source.readings:  # the signal the agent stepped on is core's function's
        assert r.latencies is not None
        assert r.mean_itl_s == miad_signal(r.latencies).mean_itl_s
    # and it shows it: the last period the agent controlled (the read before the final one)
    shown = metrics.signal_tpot.labels("0", "L4", "n1")._value.get()
    last = source.readings[-2].mean_itl_s
    assert shown == last if last is not None else math.isnan(shown)
    ctrl = MIADController(L4.supported_clocks(), TTFT_S, TPOT_S)
    # in the second half MIAD regulates around the threshold: mostly between the lowest
    # clock and the highest (a period in which the engine, starved of CPU here, finished
    # no gap carries no TPOT, and MIAD steps down through it)
    late = sorted(counted[PERIODS // 2:])
    assert late and ctrl.lowest < late[len(late) // 2] < ctrl.highest, clocks
    assert sum(f == ctrl.lowest for f in late) <= len(late) // 5, clocks
    assert any(b > a for (_, a), (_, b) in itertools.pairwise(clocks)), clocks  # raised
    assert max(tpots) <= TPOT_S, sorted(tpots)[-5:]
