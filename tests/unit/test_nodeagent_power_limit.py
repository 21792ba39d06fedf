"""Power-limit mode: the simulated NVML's power cap (clock from core's power law), MIAD
steering the limit, and the limit handed back on stop exactly like locked clocks."""

from __future__ import annotations

import argparse

import pytest

from joulepool.core.device import GPUError, GPUErrorKind
from joulepool.core.powercap import (
    clock_under_power_cap,
    power_cap_for_clock,
    power_limit_range_w,
)
from joulepool.core.profiles import DEFAULT_PROFILES, H100, H100_8B
from joulepool.fakes.gpus import SimulatedBackend, SimulatedGPUs
from joulepool.nodeagent.agent import AgentConfig, NodeAgent, power_levels
from joulepool.nodeagent.metrics import AgentMetrics
from joulepool.nodeagent.signals import EngineReading, StaticSignalSource


# ------------------------------------------------------------------ core
@pytest.mark.parametrize("profile", DEFAULT_PROFILES, ids=lambda p: f"{p.product.name}-{p.model}")
def test_the_clock_under_a_cap_is_the_highest_whose_power_fits(profile):
    lo, hi = profile.product.f_min_mhz.value, profile.product.f_max_mhz.value
    batch = float(profile.max_batch.value)
    full = float(profile.power_w(batch, hi))
    assert clock_under_power_cap(profile, batch, full + 1.0) == hi  # no cap in effect
    floor = float(profile.power_w(batch, lo))
    assert clock_under_power_cap(profile, batch, floor - 1.0) == lo  # cannot go lower
    cap = 0.5 * (floor + full)
    f = clock_under_power_cap(profile, batch, cap)
    assert lo < f < hi
    assert float(profile.power_w(batch, f)) <= cap < float(profile.power_w(batch, f + 1.0))
    assert clock_under_power_cap(profile, batch, cap, f_max_mhz=f - 50) == f - 50


@pytest.mark.parametrize("profile", DEFAULT_PROFILES, ids=lambda p: f"{p.product.name}-{p.model}")
def test_the_cap_for_a_clock_keeps_that_clock_at_every_batch_and_in_prefill(profile):
    lo, hi = profile.product.f_min_mhz.value, profile.product.f_max_mhz.value
    for f in (lo, 0.5 * (lo + hi), hi):
        cap = power_cap_for_clock(profile, f)
        for batch in (1.0, 8.0, float(profile.max_batch.value)):
            assert clock_under_power_cap(profile, batch, cap) >= f - 1.0  # bisection's 0.5 MHz
        assert float(profile.prefill_power_w(f)) <= cap
        if f > lo:  # and it is the lowest such cap: a little less loses the clock somewhere
            less = cap - 1.0
            assert clock_under_power_cap(profile, profile.max_batch.value, less) < f or \
                float(profile.prefill_power_w(f)) > less


def test_power_limit_range_and_levels():
    assert power_limit_range_w(700) == (210, 700.0)
    levels = power_levels(210.0, 700.0)
    assert levels[0] == 210.0 and levels[-1] == 700.0 and len(levels) == 99
    assert power_levels(100.0, 102.0) == [100.0, 102.0]


# ------------------------------------------------------------------ simulated NVML
def test_a_power_cap_slows_a_busy_gpu_until_its_power_fits():
    gpus = SimulatedGPUs.open(None, "H100", 1)
    be = SimulatedBackend(gpus)
    gpus.set_batch([0], 64, model=H100_8B.model)
    full_w, full_f = be.power_mw(0) / 1e3, be.sm_clock_mhz(0)
    assert be.power_limit_constraints_w(0) == (210, 700.0) and be.power_limit_w(0) == 700.0
    cap = full_w - 60.0
    be.set_power_limit_w(0, cap)
    assert be.power_limit_w(0) == cap
    assert be.power_mw(0) / 1e3 <= cap + 1e-6 and be.sm_clock_mhz(0) < full_f
    be.reset_power_limit(0)
    assert be.power_mw(0) / 1e3 == pytest.approx(full_w) and be.sm_clock_mhz(0) == full_f
    with pytest.raises(GPUError) as err:
        be.set_power_limit_w(0, 50.0)
    assert err.value.kind is GPUErrorKind.OTHER
    with pytest.raises(GPUError) as err:
        SimulatedBackend(gpus, privileged=False).set_power_limit_w(0, 300.0)
    assert err.value.kind is GPUErrorKind.NO_PERMISSION


# ------------------------------------------------------------------ the agent
class Engine:
    """An engine on GPU 0 whose tail latency follows the simulated clock."""

    def __init__(self, gpus: SimulatedGPUs, batch: int) -> None:
        self.gpus, self.batch = gpus, batch
        gpus.set_batch([0], batch, model=H100_8B.model)

    def __call__(self, now: float) -> list[EngineReading]:
        f = self.gpus.effective_clock(self.gpus.gpu(0))
        itl = float(H100_8B.itl_s(self.batch, f))
        return [EngineReading(engine="http://e0", waiting=0, ttft_tail_s=0.1, mean_itl_s=itl,
                              tokens=self.batch / itl, model=H100_8B.model, gpus=frozenset({0}))]


class FlakyPowerResets(SimulatedBackend):
    def __init__(self, gpus, fail: int = 0) -> None:
        super().__init__(gpus)
        self.fail = fail
        self.resets = 0

    def reset_power_limit(self, index: int) -> None:
        self.resets += 1
        if self.resets <= self.fail:
            raise GPUError(GPUErrorKind.OTHER, "Unknown Error", index)
        super().reset_power_limit(index)


def make(tpot_slo: float, backend_cls=SimulatedBackend, batch: int = 32):
    t = {"now": 0.0}
    gpus = SimulatedGPUs.open(None, "H100", 1, node="n1", clock=lambda: t["now"])
    engine = Engine(gpus, batch)
    config = AgentConfig(node="n1", control="power", ttft_slo_s=5.0, tpot_slo_s=tpot_slo,
                         reset_grace_s=5.0)
    agent = NodeAgent(backend_cls(gpus), StaticSignalSource(engine), config,
                      metrics=AgentMetrics("n1"), monotonic=lambda: t["now"])
    return agent, gpus, t


async def ticks(agent, t, n: int) -> None:
    for _ in range(n):
        t["now"] += 1.0
        await agent.tick(t["now"])


async def test_miad_walks_the_power_limit_down_at_a_loose_slo_and_stop_restores_it():
    agent, gpus, t = make(tpot_slo=1.0)
    gpus.set_power_limit(0, 300.0)  # a predecessor's cap, left behind
    await agent.start()
    assert gpus.gpu(0).get("power_limit_w") is None  # restored at start
    await ticks(agent, t, 60)
    cap = gpus.gpu(0)["power_limit_w"]
    assert cap is not None and cap < 500.0  # 10 W a period from 700 W
    assert gpus.gpu(0)["locked"] is None  # power mode never locks clocks
    assert agent.metrics.registry.get_sample_value(
        "joulepool_gpu_target_power_limit_watts", {"gpu": "0", "product": "H100",
                                                   "node": "n1"}) == cap
    await agent.stop()
    assert gpus.gpu(0)["power_limit_w"] is None


async def test_a_tight_slo_raises_the_power_limit_multiplicatively():
    agent, gpus, t = make(tpot_slo=1.0)
    await agent.start()
    await ticks(agent, t, 30)
    low = gpus.gpu(0)["power_limit_w"]
    agent.config.tpot_slo_s = float(H100_8B.itl_s(32, H100.f_max_mhz.value)) * 1.02
    agent.gpus[0].controller = None
    await ticks(agent, t, 3)
    assert gpus.gpu(0)["power_limit_w"] > low * 1.4  # k_inc 1.5 per period at risk
    await agent.stop()


async def test_failing_power_limit_resets_are_retried_on_stop():
    agent, gpus, t = make(tpot_slo=1.0, backend_cls=lambda g: FlakyPowerResets(g))
    await agent.start()
    await ticks(agent, t, 10)
    assert gpus.gpu(0)["power_limit_w"] is not None
    agent.backend.fail = agent.backend.resets + 3
    await agent.stop()
    assert gpus.gpu(0)["power_limit_w"] is None


async def test_reset_and_exit_in_power_mode_restores_the_default_limit(capsys):
    from joulepool.nodeagent.runner import reset_and_exit

    agent, gpus, _ = make(tpot_slo=1.0)
    gpus.set_power_limit(0, 250.0)
    assert await reset_and_exit(argparse.Namespace(backend="simulated", hold=False), agent) == 0
    assert gpus.gpu(0).get("power_limit_w") is None
    assert "reset 1 of 1 GPU(s)" in capsys.readouterr().out


def test_control_mode_is_checked():
    with pytest.raises(ValueError, match="control"):
        AgentConfig(control="voltage")


async def test_the_energy_policy_switches_a_node_to_power_limit_mode_and_back():
    from joulepool.api.models import MIADSpec

    class Policy:
        spec: MIADSpec | None = None

        async def refresh(self) -> None:
            return None

        def miad(self) -> MIADSpec | None:
            return self.spec

        def carbon(self, site: str) -> float | None:
            return None

    t = {"now": 0.0}
    gpus = SimulatedGPUs.open(None, "H100", 1, node="n1", clock=lambda: t["now"])
    policy = Policy()
    agent = NodeAgent(SimulatedBackend(gpus), StaticSignalSource(Engine(gpus, 32)),
                      AgentConfig(node="n1", ttft_slo_s=5.0, tpot_slo_s=1.0),
                      metrics=AgentMetrics("n1"), monotonic=lambda: t["now"], policy=policy)
    await agent.start()
    await ticks(agent, t, 5)
    assert gpus.gpu(0)["locked"] is not None and agent.control == "clocks"
    policy.spec = MIADSpec(control="power")
    await ticks(agent, t, 5)
    assert agent.control == "power"
    assert gpus.gpu(0)["locked"] is None  # the clocks were handed back first
    assert gpus.gpu(0)["power_limit_w"] is not None and gpus.gpu(0)["power_limit_w"] < 700
    policy.spec = None  # back to the flag's mode
    await ticks(agent, t, 2)
    assert agent.control == "clocks" and gpus.gpu(0)["power_limit_w"] is None
    assert gpus.gpu(0)["locked"] is not None
    await agent.stop()
    assert gpus.gpu(0)["locked"] is None
