"""The simulated NVML: physics from core profiles, shared state, faults."""

from __future__ import annotations

import json
import multiprocessing
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from joulepool.core.device import GPUErrorKind
from joulepool.core.profiles import H100, H100_8B, L4_8B
from joulepool.fakes.gpus import (
    FileStore,
    SimulatedBackend,
    SimulatedGPUs,
    fake_uuid,
    new_state,
    nvml_name,
)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_power_and_energy_follow_core_physics():
    clock = Clock()
    gpus = SimulatedGPUs.open(None, "H100", 2, clock=clock)
    be = SimulatedBackend(gpus)
    be.init()
    assert [d.name for d in be.devices()] == [nvml_name(H100)] * 2
    assert be.power_mw(0) == pytest.approx(H100.idle_w.value * 1e3)  # idle at batch 0
    gpus.set_batch([0], 8, H100_8B.model)
    assert be.power_mw(0) == pytest.approx(float(H100_8B.power_w(8)) * 1e3)
    e0 = be.energy_mj(0)
    clock.t += 10.0
    assert be.energy_mj(0) - e0 == pytest.approx(float(H100_8B.power_w(8)) * 10.0 * 1e3)
    be.set_locked_clocks(0, 990.0, 1200.0)
    assert be.sm_clock_mhz(0) == 1200.0
    assert be.power_mw(0) == pytest.approx(float(H100_8B.power_w(8, 1200.0)) * 1e3)
    assert be.power_mw(0) < float(H100_8B.power_w(8)) * 1e3  # lower clock, lower power
    be.reset_locked_clocks(0)
    assert be.sm_clock_mhz(0) == H100.f_max_mhz.value
    assert list(be.supported_clocks_mhz(0)) == list(H100.supported_clocks())


def test_clock_validation_and_faults():
    gpus = SimulatedGPUs.open(None, "L4", 2)
    be = SimulatedBackend(gpus)
    with pytest.raises(Exception) as exc:
        be.set_locked_clocks(0, 500.0, 900.0)  # below L4's floor
    assert exc.value.kind is GPUErrorKind.OTHER
    gpus.set_fault(1, "lost")
    for call in (lambda: be.energy_mj(1), lambda: be.power_mw(1),
                 lambda: be.set_locked_clocks(1, 1020.0, 1500.0)):
        with pytest.raises(Exception) as exc:
            call()
        assert exc.value.kind is GPUErrorKind.LOST
    gpus.set_fault(1, "not_supported")
    with pytest.raises(Exception) as exc:
        be.reset_locked_clocks(1)
    assert exc.value.kind is GPUErrorKind.NOT_SUPPORTED
    assert be.energy_mj(1) >= 0  # reading still works
    unprivileged = SimulatedBackend(gpus, privileged=False)
    with pytest.raises(Exception) as exc:
        unprivileged.set_locked_clocks(0, 1020.0, 1500.0)
    assert exc.value.kind is GPUErrorKind.NO_PERMISSION
    with pytest.raises(ValueError):
        gpus.set_fault(0, "melted")


ops = st.lists(st.one_of(
    st.tuples(st.just("advance"), st.floats(0.0, 50.0)),
    st.tuples(st.just("batch"), st.integers(0, 64)),
    st.tuples(st.just("lock"), st.sampled_from([990.0, 1200.0, 1500.0, 1980.0])),
    st.tuples(st.just("reset"), st.just(0)),
    st.tuples(st.just("back"), st.floats(0.0, 5.0)),  # wall clock stepping backwards (NTP)
), max_size=40)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_energy_counter_only_grows(seq):
    clock = Clock()
    gpus = SimulatedGPUs.open(None, "H100", 1, clock=clock)
    be = SimulatedBackend(gpus)
    last = be.energy_mj(0)
    for op, arg in seq:
        if op == "advance":
            clock.t += arg
        elif op == "back":
            clock.t -= arg
        elif op == "batch":
            gpus.set_batch([0], arg, H100_8B.model)
        elif op == "lock":
            be.set_locked_clocks(0, 990.0, arg)
        else:
            be.reset_locked_clocks(0)
        now = be.energy_mj(0)
        assert now >= last - 1e-6
        last = now


def test_file_store_is_shared_and_atomic(tmp_path):
    path = tmp_path / "state.json"
    clock = Clock()
    agent_side = SimulatedGPUs.open(path, "H100", 2, node="kind-worker", clock=clock)
    engine_side = SimulatedGPUs.open(path, clock=clock)  # opens the same file
    engine_side.set_batch([1], 16, H100_8B.model)
    SimulatedBackend(agent_side).set_locked_clocks(1, 990.0, 1290.0)
    g = engine_side.gpu(1)
    assert engine_side.effective_clock(g) == 1290.0  # the engine sees the agent's clock
    assert agent_side.gpu(1)["batch"] == 16.0  # the agent sees the engine's batch
    data = json.loads(path.read_text())
    assert data["node"] == "kind-worker"
    assert data["gpus"][1]["uuid"] == fake_uuid("kind-worker", 1)
    # ensure() never overwrites an existing state (first of agent / plugin / engine wins)
    SimulatedGPUs.open(path, "L4", 8)
    assert json.loads(path.read_text())["gpus"][0]["product"] == "H100"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".gpu-state-")]  # no temp left


def _bump(path: str, n: int) -> None:
    store = FileStore(path)
    for _ in range(n):
        def inc(state):
            state["gpus"][0]["energy_mj"] += 1.0
            return state
        store.update(inc)


def test_file_store_updates_from_two_processes_do_not_lose_writes(tmp_path):
    path = tmp_path / "state.json"
    FileStore(path).update(lambda _: new_state("H100", 1))
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_bump, args=(str(path), 100)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert json.loads(path.read_text())["gpus"][0]["energy_mj"] == 200.0


def test_profile_choice_follows_the_engine():
    gpus = SimulatedGPUs.open(None, "L4", 1)
    g = gpus.gpu(0)
    assert gpus.profile(g) is L4_8B
    with pytest.raises(ValueError):
        new_state("Z9000", 1)
