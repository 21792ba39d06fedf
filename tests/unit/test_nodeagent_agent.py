"""The node agent on the simulated backend, with injected time (no sleeping).

The "engine" here is the core profile itself: each period it produces
``decode_tokens_per_s(batch, clock) * dt`` tokens and a mean inter-token latency of
``itl_s(batch, clock)`` at whatever clock the agent locked, so the physics the agent
reacts to is the same the simulator and planner use.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging

import pytest

from joulepool.core.device import GPUError, GPUErrorKind
from joulepool.core.profiles import A100, A100_70B_TP2, H100, H100_8B
from joulepool.fakes.gpus import SimulatedBackend, SimulatedGPUs
from joulepool.nodeagent.agent import AgentConfig, NodeAgent
from joulepool.nodeagent.metrics import AgentMetrics
from joulepool.nodeagent.plansource import FilePlanSource
from joulepool.nodeagent.publisher import Measurement
from joulepool.nodeagent.signals import EngineReading, StaticSignalSource


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class ProfileEngine:
    """A load on some GPUs that follows core physics at the locked clock."""

    def __init__(self, gpus: SimulatedGPUs, indices, batch: int, url: str = "http://e0",
                 mapped: bool = True, profile=H100_8B) -> None:
        self.gpus, self.indices, self.batch, self.url = gpus, list(indices), batch, url
        self.profile = profile
        self.mapped = mapped
        self.extra_tpot = 0.0  # added latency (to force an SLO violation)
        self.waiting = 0
        self.fresh = True
        self.stale = False
        gpus.set_batch(self.indices, batch, profile.model)

    def clock(self) -> float:
        return min(self.gpus.effective_clock(self.gpus.gpu(i)) for i in self.indices)

    def reading(self, dt: float) -> EngineReading:
        f = self.clock()
        return EngineReading(
            engine=self.url, waiting=self.waiting, ttft_tail_s=0.05,
            mean_itl_s=float(self.profile.itl_s(self.batch, f)) + self.extra_tpot,
            tokens=float(self.profile.decode_tokens_per_s(self.batch, f)) * dt,
            model=self.profile.model, gpus=frozenset(self.indices) if self.mapped else None,
            fresh=self.fresh, stale=self.stale)


class Rig:
    def __init__(self, count: int = 1, privileged: bool = True, slo=(1.0, 0.05), dt: float = 1.0,
                 product: str = "H100", **cfg) -> None:
        self.clock = Clock()
        self.dt = dt
        self.product = product
        self.gpus = SimulatedGPUs.open(None, product, count, node="n1", clock=self.clock)
        self.backend = SimulatedBackend(self.gpus, privileged=privileged)
        self.engines: list[ProfileEngine] = []
        self.metrics = AgentMetrics("n1")
        config = AgentConfig(node="n1", interval_s=dt, ttft_slo_s=slo[0], tpot_slo_s=slo[1],
                             **cfg)
        self.agent = NodeAgent(self.backend, StaticSignalSource(self._read), config,
                               metrics=self.metrics, monotonic=self.clock)

    def _read(self, now: float) -> list[EngineReading]:
        return [e.reading(self.dt) for e in self.engines]

    def engine(self, indices, batch: int, **kw) -> ProfileEngine:
        e = ProfileEngine(self.gpus, indices, batch, url=f"http://e{len(self.engines)}", **kw)
        self.engines.append(e)
        return e

    async def ticks(self, n: int) -> None:
        for _ in range(n):
            self.clock.t += self.dt
            await self.agent.tick(self.clock.t)

    def locked(self, i: int) -> float | None:
        lk = self.gpus.gpu(i)["locked"]
        return None if lk is None else lk[1]

    def metric(self, name: str, **labels) -> float | None:
        """The one sample of ``name`` whose labels include ``labels`` (None: none)."""
        return sample(self.metrics.registry, name, labels)


def sample(registry, name: str, labels: dict[str, str]) -> float | None:
    found = [s.value for m in registry.collect() for s in m.samples
             if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


def gpu_labels(i: int = 0, product: str = "H100") -> dict[str, str]:
    return {"gpu": str(i), "product": product, "node": "n1"}


async def test_light_load_walks_the_clock_down_and_energy_per_token_falls():
    rig = Rig(eps_half_life_s=3.0)
    await rig.agent.start()
    rig.engine([0], batch=4)
    await rig.ticks(3)
    eps_early = rig.agent.gpus[0].eps.value
    clocks = []
    energy = []
    for _ in range(40):
        await rig.ticks(1)
        clocks.append(rig.locked(0))
        energy.append(rig.metric("joulepool_gpu_energy_joules_total", **gpu_labels()))
    assert clocks[0] is not None and clocks[0] < H100.f_max_mhz.value
    assert all(b <= a for a, b in itertools.pairwise(clocks))  # only down
    assert clocks[-1] == H100.f_min_mhz.value  # all the way to the floor
    assert all(b >= a for a, b in itertools.pairwise(energy))  # energy only grows
    eps_late = rig.agent.gpus[0].eps.value
    assert eps_early is not None and eps_late is not None
    # physics: at the floor J/token is well below what it is at f_max (core's clock law,
    # docs/clock-law.md: about 24 % less at batch 4, past the law's U-shaped minimum)
    assert eps_late < 0.8 * eps_early
    assert eps_late == pytest.approx(
        float(H100_8B.joules_per_token(4, H100.f_min_mhz.value)), rel=0.05)
    assert rig.metric("joulepool_miad_decisions_total", direction="down", **gpu_labels()) >= 30
    assert rig.metric("joulepool_miad_decisions_total", direction="up", **gpu_labels()) == 0
    assert rig.metric("joulepool_gpu_joules_per_token", model=H100_8B.model,
                      **gpu_labels()) == pytest.approx(eps_late)


async def test_slo_violation_steps_up_multiplicatively():
    rig = Rig()
    await rig.agent.start()
    e = rig.engine([0], batch=4)
    await rig.ticks(40)
    assert rig.locked(0) == 990.0
    e.extra_tpot = 0.2  # mean ITL far above 0.05 * (1 - margin)
    await rig.ticks(1)
    assert rig.locked(0) == 1485.0  # 990 * 1.5, a supported clock
    await rig.ticks(1)
    assert rig.locked(0) == H100.f_max_mhz.value  # 1485 * 1.5 capped at f_max
    assert rig.metric("joulepool_miad_decisions_total", direction="up", **gpu_labels()) == 2
    e.extra_tpot = 0.0
    e.waiting = 3  # a queue is also "at risk"
    await rig.ticks(40)
    assert rig.locked(0) == H100.f_max_mhz.value


async def test_no_permission_runs_monitor_only_without_crashing(caplog):
    caplog.set_level(logging.WARNING, logger="joulepool.nodeagent")
    rig = Rig(count=2, privileged=False)
    await rig.agent.start()
    rig.engine([0, 1], batch=8)
    await rig.ticks(5)
    assert rig.agent.monitor_only
    assert rig.metric("joulepool_sidecar_monitor_only", node="n1") == 1.0
    assert rig.locked(0) is None and rig.locked(1) is None
    # measuring still works
    assert rig.metric("joulepool_gpu_energy_joules_total", **gpu_labels(1)) > 0
    assert rig.metric("joulepool_gpu_power_watts", **gpu_labels(0)) > 75.0
    said = [r for r in caplog.records if "monitor-only" in r.getMessage()]
    assert len(said) == 1  # said once, not every period
    await rig.agent.stop()  # and stopping does not raise either


async def test_lost_gpu_is_reported_and_the_others_keep_being_controlled(caplog):
    caplog.set_level(logging.ERROR, logger="joulepool.nodeagent")
    rig = Rig(count=3, lost_retry_s=5.0)
    await rig.agent.start()
    for i in range(3):
        rig.engine([i], batch=2)
    await rig.ticks(3)
    rig.gpus.set_fault(1, "lost")
    before = {i: rig.locked(i) for i in (0, 2)}
    await rig.ticks(6)
    assert rig.metric("joulepool_gpu_lost", **gpu_labels(1)) == 1.0
    assert rig.metric("joulepool_gpu_lost", **gpu_labels(0)) == 0.0
    for i in (0, 2):
        assert rig.locked(i) < before[i]  # still walking down
    assert len([r for r in caplog.records if "lost" in r.getMessage()]) == 1
    # it comes back: probed, reset, controlled again
    rig.gpus.set_fault(1, None)
    await rig.ticks(6)
    assert rig.metric("joulepool_gpu_lost", **gpu_labels(1)) == 0.0
    assert rig.locked(1) is not None


async def test_stop_resets_every_gpu_and_start_clears_stale_locks():
    rig = Rig(count=4)
    for i in range(4):
        rig.gpus.set_locked(i, 990.0, 1200.0)  # a crashed predecessor left these
    await rig.agent.start()
    assert all(rig.locked(i) is None for i in range(4))
    rig.engine([0, 1, 2, 3], batch=4, mapped=False)
    await rig.ticks(5)
    assert all(rig.locked(i) is not None for i in range(4))
    await rig.agent.stop()
    assert all(rig.locked(i) is None for i in range(4))


async def test_not_supported_gpu_is_measured_only():
    rig = Rig(count=2)
    rig.gpus.set_fault(1, "not_supported")
    await rig.agent.start()
    rig.engine([0, 1], batch=4, mapped=False)
    await rig.ticks(5)
    assert rig.locked(0) is not None
    assert rig.locked(1) is None
    assert rig.metric("joulepool_gpu_clock_control_supported", **gpu_labels(1)) == 0.0
    assert rig.metric("joulepool_gpu_energy_joules_total", **gpu_labels(1)) > 0


class FlakyBackend(SimulatedBackend):
    def __init__(self, gpus, fail_locks: int) -> None:
        super().__init__(gpus)
        self.fail_locks = fail_locks

    def set_locked_clocks(self, index, min_mhz, max_mhz):
        if self.fail_locks > 0:
            self.fail_locks -= 1
            raise GPUError(GPUErrorKind.OTHER, "Unknown Error", index)
        super().set_locked_clocks(index, min_mhz, max_mhz)


async def test_control_error_resets_the_clock_and_counts():
    rig = Rig()
    rig.agent.backend = rig.backend = FlakyBackend(rig.gpus, fail_locks=0)
    await rig.agent.start()
    rig.engine([0], batch=4)
    await rig.ticks(5)
    assert rig.locked(0) is not None
    rig.backend.fail_locks = 1
    await rig.ticks(1)
    assert rig.locked(0) is None  # reset after the failed lock
    assert rig.metric("joulepool_control_errors_total", **gpu_labels()) == 1.0
    await rig.ticks(1)
    assert rig.locked(0) is not None  # and control resumes


async def test_no_signal_hands_the_clock_back_and_a_missed_scrape_holds():
    rig = Rig()
    await rig.agent.start()
    e = rig.engine([0], batch=4)
    await rig.ticks(5)
    held = rig.locked(0)
    e.fresh = False  # one missed scrape: hold
    await rig.ticks(1)
    assert rig.locked(0) == held
    assert rig.metric("joulepool_miad_decisions_total", direction="hold", **gpu_labels()) == 1
    e.stale = True  # silent for too long: unlock
    await rig.ticks(1)
    assert rig.locked(0) is None
    assert rig.metric("joulepool_gpu_target_clock_hertz", **gpu_labels()) == 0.0


async def test_without_any_slo_the_agent_does_not_lock():
    rig = Rig(slo=(None, None))
    await rig.agent.start()
    rig.engine([0], batch=4)
    await rig.ticks(5)
    assert rig.locked(0) is None


async def test_pool_slo_comes_from_the_plan(tmp_path):
    plan = {
        "version": 3,
        "pools": {"ns.chat": {
            "namespace": "ns", "name": "chat", "model": H100_8B.model, "tier": "interactive",
            "slo": {"ttftSeconds": 1.0, "tpotSeconds": 0.005}, "replicas": 1,
            "assignments": [{"node": "n1", "site": "s", "product": "H100", "mode": "1xH100",
                             "instances": 1, "gpus": 1, "gpusPerInstance": 1}]}},
        "nodes": {"n1": {"site": "s", "product": "H100", "gpus": 1, "pools": {"ns.chat": 1}}},
    }
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    rig = Rig(slo=(None, None))
    rig.agent.plan = FilePlanSource(path, monotonic=rig.clock)
    await rig.agent.start()
    rig.engine([0], batch=4)  # TPOT ~7 ms > 5 ms * 0.9: at risk under the plan's SLO
    await rig.ticks(3)
    assert rig.locked(0) == H100.f_max_mhz.value
    assert rig.metric("joulepool_miad_decisions_total", direction="down", **gpu_labels()) == 0
    # the operator relaxes the SLO: the agent picks it up and walks down
    plan["pools"]["ns.chat"]["slo"]["tpotSeconds"] = 0.1
    path.write_text(json.dumps(plan))
    await rig.ticks(10)
    assert rig.locked(0) < H100.f_max_mhz.value


class RecordingPublisher:
    def __init__(self) -> None:
        self.published: list[Measurement] = []

    def publish(self, m: Measurement) -> bool:
        self.published.append(m)
        return True


async def test_eps_is_published_per_instance():
    rig = Rig(count=4, eps_half_life_s=5.0, product="A100", slo=(5.0, 0.2))
    pub = RecordingPublisher()
    rig.agent.publisher = pub
    await rig.agent.start()
    rig.engine([0, 1], batch=8, profile=A100_70B_TP2)  # one 2-GPU instance
    await rig.ticks(5)
    if rig.agent._publishing is not None:
        await rig.agent._publishing
    assert pub.published
    m = pub.published[-1]
    assert (m.product, m.model, m.gpus, m.node) == ("A100", A100_70B_TP2.model, 2, "n1")
    assert m.samples > 0
    # an instance's J/token is the sum over its GPUs (each GPU's energy per instance token)
    (now,) = rig.agent.measurements()
    per_gpu = [rig.agent.gpus[i].eps.value for i in (0, 1)]
    assert now.joules_per_token == pytest.approx(sum(per_gpu))
    lo = float(A100_70B_TP2.joules_per_token(8, rig.locked(0)))
    hi = float(A100_70B_TP2.joules_per_token(8, A100.f_max_mhz.value))
    assert lo * 0.99 <= now.joules_per_token <= hi * 1.01
    # the idle GPUs 2 and 3 serve nothing: no estimate, nothing published for them
    assert all(m.gpus == 2 for m in pub.published)


async def test_run_loop_survives_an_exception_and_resets_on_stop():
    rig = Rig(count=2)
    rig.agent.config.interval_s = 0.01
    rig.agent.monotonic = __import__("time").monotonic
    await rig.agent.start()
    rig.engine([0, 1], batch=4, mapped=False)
    calls = {"n": 0}
    real = rig.agent.source.fn

    def flaky(now):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(now)

    rig.agent.source.fn = flaky
    stop = asyncio.Event()
    task = asyncio.create_task(rig.agent.run(stop))
    for _ in range(200):
        await asyncio.sleep(0.01)
        if calls["n"] >= 6:
            break
    assert rig.locked(0) is not None
    stop.set()
    await asyncio.wait_for(task, 5)
    assert calls["n"] >= 6  # kept ticking after the failure
    assert rig.metric("joulepool_control_errors_total", gpu="all", product="", node="n1") == 1
    assert rig.locked(0) is None and rig.locked(1) is None
    assert len(rig.agent.lags) >= 6


async def test_publication_rate_is_bounded_and_failures_do_not_stop_control():
    from joulepool.nodeagent.publisher import RateLimited

    class Flaky:
        def __init__(self) -> None:
            self.n = 0

        def publish(self, m: Measurement) -> bool:
            self.n += 1
            if self.n == 2:
                raise RuntimeError("API server unavailable")
            return True

    rig = Rig(count=1)
    inner = Flaky()
    rig.agent.publisher = RateLimited(inner, 60.0, monotonic=rig.clock)
    await rig.agent.start()
    rig.engine([0], batch=4)
    for _ in range(130):  # 130 s of 1 s periods
        await rig.ticks(1)
        if rig.agent._publishing is not None:
            await rig.agent._publishing
    assert inner.n == 3  # t = 1 s, 61 s, 121 s (well: the first period with an estimate)
    assert rig.metric("joulepool_profile_publications_total", node="n1", result="error") == 1
    assert rig.metric("joulepool_profile_publications_total", node="n1", result="ok") == 2
    assert rig.locked(0) == H100.f_min_mhz.value  # control carried on


class FakePolicyApi:
    def __init__(self, obj=None) -> None:
        self.obj = obj

    def get_cluster_custom_object(self, group, version, plural, name, **kw):
        assert kw.get("_request_timeout")  # never an unbounded API call
        assert (group, version, plural, name) == (
            "joulepool.dev", "v1alpha1", "energypolicies", "default")
        if self.obj is None:
            err = RuntimeError("Not Found")
            err.status = 404
            raise err
        return self.obj


async def test_energy_policy_miad_parameters_override_the_flags():
    from joulepool.nodeagent.plansource import EnergyPolicySource

    rig = Rig()
    api = FakePolicyApi({"apiVersion": "joulepool.dev/v1alpha1", "kind": "EnergyPolicy",
                         "metadata": {"name": "default"},
                         "spec": {"miad": {"kInc": 2.0, "stepMHz": 90, "margin": 0.2}}})
    rig.agent.policy = EnergyPolicySource(api=api, refresh_s=5.0, monotonic=rig.clock)
    await rig.agent.start()
    rig.engine([0], batch=4)
    await rig.ticks(1)
    assert rig.agent.miad_params() == (2.0, 90.0, 0.2)
    assert rig.locked(0) == H100.f_max_mhz.value - 90  # the policy's step, not 30
    api.obj = None  # the policy is deleted: back to the flags at the next refresh
    await rig.ticks(5)
    assert rig.agent.miad_params() == (1.5, 30.0, 0.1)
    before = rig.locked(0)
    await rig.ticks(1)
    assert before - rig.locked(0) == 30.0
    api.obj = {"spec": {"miad": {"kInc": 9}}}  # invalid (kInc <= 4): keep what we had
    await rig.ticks(5)
    assert rig.agent.miad_params() == (1.5, 30.0, 0.1)


async def test_energy_policy_miad_period_sets_the_control_period():
    """miad.periodSeconds replaces the configured interval while the policy exists."""
    import asyncio

    from joulepool.nodeagent.plansource import EnergyPolicySource

    rig = Rig(dt=30.0)  # configured: one period every 30 s
    api = FakePolicyApi({"apiVersion": "joulepool.dev/v1alpha1", "kind": "EnergyPolicy",
                         "metadata": {"name": "default"},
                         "spec": {"miad": {"periodSeconds": 0.02}}})
    rig.agent.policy = EnergyPolicySource(api=api, refresh_s=0.0, monotonic=rig.clock)
    assert rig.agent.control_interval() == 30.0  # nothing read yet
    await rig.agent.policy.refresh()
    assert rig.agent.control_interval() == 0.02
    ticks = 0
    real_tick = rig.agent.tick

    async def counting_tick(now: float) -> None:
        nonlocal ticks
        ticks += 1
        await real_tick(now)

    rig.agent.tick = counting_tick  # type: ignore[method-assign]
    await rig.agent.start()
    stop = asyncio.Event()
    runner = asyncio.ensure_future(rig.agent.run(stop))
    await asyncio.sleep(0.5)
    stop.set()
    await runner
    assert ticks >= 5  # 30 s periods would have given one
    api.obj = None  # policy deleted: back to the configured interval
    await rig.agent.policy.refresh()
    assert rig.agent.control_interval() == 30.0
