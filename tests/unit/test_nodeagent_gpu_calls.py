"""NVML calls off the event loop with a time bound, and clock resets that are retried.

Hung and failing calls come from the simulated NVML's injected faults
(``SimulatedGPUs.inject``) or from small backends that count their calls.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time

import pytest

from joulepool.core.device import GPUError, GPUErrorKind
from joulepool.fakes.gpus import SimulatedBackend, SimulatedGPUs
from joulepool.nodeagent.agent import AgentConfig, NodeAgent
from joulepool.nodeagent.gpuio import GPUCalls
from joulepool.nodeagent.metrics import AgentMetrics
from joulepool.nodeagent.signals import EngineReading, StaticSignalSource


def idle(now: float) -> list[EngineReading]:
    return [EngineReading(engine="http://e0", waiting=0, ttft_tail_s=0.05, mean_itl_s=0.01,
                          tokens=10.0, model="m")]


def none(now: float) -> list[EngineReading]:
    return []


def make(count=2, backend_cls=SimulatedBackend, source=idle, **cfg):
    gpus = SimulatedGPUs.open(None, "H100", count, node="n1")
    backend = backend_cls(gpus)
    config = AgentConfig(node="n1", interval_s=0.02, ttft_slo_s=1.0, tpot_slo_s=0.1, **cfg)
    agent = NodeAgent(backend, StaticSignalSource(source), config, metrics=AgentMetrics("n1"))
    return agent, gpus, backend


def locked(gpus: SimulatedGPUs) -> list:
    return [g["locked"] for g in gpus.state()["gpus"]]


class FailingResets(SimulatedBackend):
    """The first ``fail`` resets of each GPU fail with an unknown NVML error."""

    def __init__(self, gpus, fail: int = 3) -> None:
        super().__init__(gpus)
        self.fail = fail
        self.resets: dict[int, int] = {}

    def reset_locked_clocks(self, index: int) -> None:
        n = self.resets[index] = self.resets.get(index, 0) + 1
        if n <= self.fail:
            raise GPUError(GPUErrorKind.OTHER, "Unknown Error", index)
        super().reset_locked_clocks(index)


# ------------------------------------------------------------------ the worker
async def test_a_hung_call_times_out_and_the_event_loop_keeps_running():
    # Bounds are relative to the call timeout (1 s), not to fixed tens of milliseconds,
    # so a loaded machine (load 12 in full-suite runs) cannot fail them; each still
    # tells the behaviour apart: a read that queued behind the hung call would take at
    # least a whole timeout.
    timeout_s = 1.0
    gate = threading.Event()
    calls = GPUCalls(SimulatedBackend(SimulatedGPUs.open(None, "H100", 1)), timeout_s=timeout_s)
    beats = 0

    async def heartbeat():
        nonlocal beats
        while True:
            beats += 1
            await asyncio.sleep(0.01)

    hb = asyncio.create_task(heartbeat())
    t0 = time.monotonic()
    with pytest.raises(GPUError) as err:
        await calls.call("hang", gate.wait, 30.0, index=0)
    assert err.value.kind is GPUErrorKind.TIMEOUT and err.value.index == 0
    assert time.monotonic() - t0 < 3 * timeout_s  # gave up, did not wait for the 30-s hang
    assert beats >= 5  # the loop ran while the call hung
    # the worker reports the call as hung once it has run for a whole timeout from the
    # moment the worker took it up, which on a loaded machine is a little after the
    # caller's own timer started: wait for that (a read sent before it queues behind
    # the hung call and times out, which is not what this test is about)
    deadline = time.monotonic() + 10.0
    while (hung := calls.hung()) is None:
        assert time.monotonic() < deadline, "the worker never reported the call as hung"
        await asyncio.sleep(0.01)
    assert hung[0] == "hang" and hung[1] > timeout_s
    # while it still hangs, reads fail at once instead of queueing behind it
    t1 = time.monotonic()
    with pytest.raises(GPUError) as err:
        await calls.power_mw(0)
    assert err.value.kind is GPUErrorKind.TIMEOUT and time.monotonic() - t1 < timeout_s / 2
    gate.set()
    hb.cancel()
    # the driver answers again: so do we, as soon as the worker has left the hung call
    deadline = time.monotonic() + 10.0
    while True:
        try:
            assert await calls.power_mw(0) > 0
            break
        except GPUError:
            assert time.monotonic() < deadline, "reads still fail 10 s after the hang ended"
            await asyncio.sleep(0.05)
    await calls.shutdown()


async def test_a_reset_queues_behind_a_hung_lock_and_lands_after_it():
    """One worker, FIFO: a lock that its caller gave up on cannot undo a later reset."""
    gpus = SimulatedGPUs.open(None, "H100", 1)
    backend = SimulatedBackend(gpus)
    calls = GPUCalls(backend, timeout_s=0.1)
    gate = threading.Event()

    def slow_lock():
        gate.wait(5.0)
        backend.set_locked_clocks(0, 990.0, 1200.0)

    with pytest.raises(GPUError):
        await calls.call("lock clocks", slow_lock, index=0)
    with pytest.raises(GPUError) as err:  # not waited for while hung, but queued
        await calls.reset_locked_clocks(0, wait_if_hung=False)
    assert err.value.kind is GPUErrorKind.TIMEOUT
    gate.set()
    await asyncio.sleep(0.2)
    assert locked(gpus) == [None]
    await calls.shutdown()


async def test_injected_hang_in_the_simulated_nvml_is_bounded_per_call():
    gpus = SimulatedGPUs.open(None, "H100", 2)
    gpus.inject(1, "hang", 0.5)
    calls = GPUCalls(SimulatedBackend(gpus), timeout_s=0.1)
    with pytest.raises(GPUError) as err:
        await calls.power_mw(1)
    assert err.value.kind is GPUErrorKind.TIMEOUT
    await asyncio.sleep(0.6)
    assert await calls.power_mw(1) > 0 and await calls.power_mw(0) > 0
    gpus.inject(0, "error", 10.0)
    with pytest.raises(GPUError) as err:
        await calls.power_mw(0)
    assert err.value.kind is GPUErrorKind.OTHER
    gpus.inject(0, "error", 0.0)
    assert await calls.power_mw(0) > 0
    with pytest.raises(ValueError):
        gpus.inject(0, "melt", 1.0)


# ------------------------------------------------------------------ the agent
async def test_hung_nvml_never_stalls_the_loop_and_the_stop_resets_after_it():
    agent, gpus, _ = make(count=2, call_timeout_s=0.2, reset_grace_s=3.0)
    await agent.start()
    for _ in range(3):
        await agent.tick()
    assert all(locked(gpus))
    gpus.inject(0, "hang", 1.0)  # every call on GPU 0 hangs for a second
    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))
    lags = []
    for _ in range(40):  # 0.4 s of a loop that must stay responsive
        t = time.monotonic()
        await asyncio.sleep(0.01)
        lags.append(time.monotonic() - t - 0.01)
    # a loop blocked by the hung call would lag by most of the 1-s hang; half of it is the
    # line (not 0.1 s: a scheduler on a loaded machine delays a wake-up by that much alone)
    assert max(lags) < 0.5, max(lags)
    assert agent.gpu_io.timeouts >= 1
    stop.set()
    t0 = time.monotonic()
    await asyncio.wait_for(running, 5.0)
    # the reset of GPU 0 queued behind the hang and ran when it ended, within the grace
    assert time.monotonic() - t0 < 3.0
    assert locked(gpus) == [None, None]
    assert agent.reset_count == 2


async def test_stop_retries_failing_resets_until_they_succeed():
    agent, gpus, backend = make(count=3, backend_cls=lambda g: FailingResets(g, fail=4),
                                reset_grace_s=5.0)
    await agent.start()
    backend.fail = 0
    for _ in range(3):
        await agent.tick()
    assert all(locked(gpus))
    backend.resets.clear()
    backend.fail = 3  # the next three resets of each GPU fail
    await agent.stop()
    assert locked(gpus) == [None, None, None]
    assert backend.resets == {0: 4, 1: 4, 2: 4}
    assert agent.reset_count == 3


async def test_stop_gives_up_at_the_grace_and_says_which_gpu_may_be_locked(caplog):
    agent, gpus, backend = make(count=2, backend_cls=lambda g: FailingResets(g, fail=0),
                                reset_grace_s=0.3)
    await agent.start()
    for _ in range(3):
        await agent.tick()
    backend.fail = 10**6
    backend.resets.clear()
    t0 = time.monotonic()
    await agent.stop()
    assert time.monotonic() - t0 < 1.5
    assert all(locked(gpus)) and backend.resets[0] >= 3  # retried, then gave up
    assert "clocks may still be locked" in caplog.text
    assert [g.needs_reset for g in agent.gpus] == [True, True]


async def test_a_reset_that_fails_at_start_is_retried_not_taken_as_done():
    agent, gpus, _ = make(count=2, backend_cls=lambda g: FailingResets(g, fail=2),
                                source=none)
    gpus.set_locked(0, 990.0, 1005.0)  # left by a predecessor killed with SIGKILL
    gpus.set_locked(1, 990.0, 1005.0)
    await agent.start()
    assert all(locked(gpus))
    assert [g.needs_reset for g in agent.gpus] == [True, True]
    metrics = agent.metrics.render().decode()
    assert 'joulepool_gpu_clock_reset_pending{gpu="0"' in metrics
    for _ in range(40):  # no engines: nothing to control, but the reset is owed
        await agent.tick()
        if locked(gpus) == [None, None]:
            break
        await asyncio.sleep(0.05)
    assert locked(gpus) == [None, None]
    assert [g.needs_reset for g in agent.gpus] == [False, False]


# ------------------------------------------------------------------ --reset-and-exit
def _args(**kw) -> argparse.Namespace:
    base = dict(backend="simulated", hold=False)
    return argparse.Namespace(**{**base, **kw})


async def test_reset_and_exit_unlocks_every_gpu_and_says_so(capsys):
    from joulepool.nodeagent.runner import reset_and_exit

    agent, gpus, _ = make(count=3, backend_cls=lambda g: FailingResets(g, fail=2),
                          reset_grace_s=5.0)
    for i in range(3):
        gpus.set_locked(i, 990.0, 1200.0)
    assert await reset_and_exit(_args(), agent) == 0
    assert locked(gpus) == [None, None, None]
    assert "reset 3 of 3 GPU(s)" in capsys.readouterr().out


async def test_reset_and_exit_fails_when_a_gpu_stays_locked(capsys):
    from joulepool.nodeagent.runner import reset_and_exit

    agent, gpus, _ = make(count=2, reset_grace_s=0.3, call_timeout_s=0.1)
    gpus.set_locked(1, 990.0, 1200.0)
    gpus.inject(1, "error", 30.0)
    assert await reset_and_exit(_args(), agent) == 1
    out = capsys.readouterr().out
    assert "still possibly locked: 1" in out
    assert locked(gpus)[1] is not None
