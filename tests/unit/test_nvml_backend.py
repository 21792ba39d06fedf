"""The real NVML backend's translation, against fake pynvml modules (no GPU needed)."""

from __future__ import annotations

import types

import pynvml
import pytest

from joulepool.core.device import GPUError, GPUErrorKind
from joulepool.nodeagent.agent import AgentConfig, NodeAgent
from joulepool.nodeagent.metrics import AgentMetrics
from joulepool.nodeagent.nvml import NvmlBackend
from joulepool.nodeagent.signals import EngineReading, StaticSignalSource


class FakeNVML:
    """Just enough of pynvml: two GPUs, an energy counter, lockable clocks."""

    class NVMLError(Exception):
        def __init__(self, value: int) -> None:
            super().__init__(f"NVML error {value}")
            self.value = value

    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_NO_PERMISSION = 4
    NVML_ERROR_GPU_IS_LOST = 15
    NVML_CLOCK_SM = 1

    def __init__(self, privileged: bool = True) -> None:
        self.privileged = privileged
        self.calls: list[tuple] = []
        self.locked: dict[int, tuple[int, int] | None] = {0: None, 1: None}
        self.lost: set[int] = set()
        self.initialised = False

    def _h(self, handle):
        if handle in self.lost:
            raise self.NVMLError(self.NVML_ERROR_GPU_IS_LOST)
        return handle

    def nvmlInit(self):
        self.initialised = True

    def nvmlShutdown(self):
        self.initialised = False

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA A100-SXM4-80GB"  # older pynvml returns bytes

    def nvmlDeviceGetUUID(self, h):
        return f"GPU-0000-{h}"

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        return 123456789 + self._h(h)

    def nvmlDeviceGetPowerUsage(self, h):
        return 250500 + self._h(h)

    def nvmlDeviceGetClockInfo(self, h, kind):
        self.calls.append(("clock", h, kind))
        lk = self.locked[self._h(h)]
        return lk[1] if lk else 1410

    def nvmlDeviceGetSupportedMemoryClocks(self, h):
        return [1215, 1593, 810]

    def nvmlDeviceGetSupportedGraphicsClocks(self, h, mem):
        self.calls.append(("graphics", h, mem))
        return [1410, 1395, 1005, 1020, 1410, 210]

    def nvmlDeviceSetGpuLockedClocks(self, h, lo, hi):
        self._h(h)
        if not self.privileged:
            raise self.NVMLError(self.NVML_ERROR_NO_PERMISSION)
        self.calls.append(("lock", h, lo, hi))
        self.locked[h] = (lo, hi)

    def nvmlDeviceResetGpuLockedClocks(self, h):
        self._h(h)
        if not self.privileged:
            raise self.NVMLError(self.NVML_ERROR_NO_PERMISSION)
        self.calls.append(("reset", h))
        self.locked[h] = None

    # power limits, milliwatts, as pynvml speaks them (A100 SXM: 100-400 W, default 400 W)
    limits: dict[int, int]

    def nvmlDeviceGetPowerManagementLimitConstraints(self, h):
        return [100000, 400000]

    def nvmlDeviceGetPowerManagementDefaultLimit(self, h):
        return 400000

    def nvmlDeviceGetPowerManagementLimit(self, h):
        return self.__dict__.setdefault("limits", {}).get(self._h(h), 400000)

    def nvmlDeviceSetPowerManagementLimit(self, h, mw):
        self._h(h)
        if not self.privileged:
            raise self.NVMLError(self.NVML_ERROR_NO_PERMISSION)
        self.calls.append(("power limit", h, mw))
        self.__dict__.setdefault("limits", {})[h] = mw


def test_readings_and_control_are_translated():
    fake = FakeNVML()
    be = NvmlBackend(fake)
    be.init()
    devs = be.devices()
    assert [(d.index, d.uuid, d.name) for d in devs] == [
        (0, "GPU-0000-0", "NVIDIA A100-SXM4-80GB"), (1, "GPU-0000-1", "NVIDIA A100-SXM4-80GB")]
    assert be.energy_mj(1) == 123456790.0
    assert be.power_mw(0) == 250500.0
    assert be.sm_clock_mhz(0) == 1410.0
    assert ("clock", 0, fake.NVML_CLOCK_SM) in fake.calls
    assert list(be.supported_clocks_mhz(0)) == [210.0, 1005.0, 1020.0, 1395.0, 1410.0]
    assert ("graphics", 0, 1593) in fake.calls  # at the highest memory clock
    be.set_locked_clocks(1, 1005.0, 1199.6)
    assert ("lock", 1, 1005, 1200) in fake.calls  # integers, as NVML wants
    be.reset_locked_clocks(1)
    assert fake.locked[1] is None
    be.shutdown()
    assert not fake.initialised


@pytest.mark.parametrize(("code", "kind"), [
    (4, GPUErrorKind.NO_PERMISSION), (3, GPUErrorKind.NOT_SUPPORTED), (15, GPUErrorKind.LOST),
    (999, GPUErrorKind.OTHER)])
def test_nvml_error_codes_map_to_kinds(code, kind):
    fake = FakeNVML()

    def boom(h):
        raise fake.NVMLError(code)

    fake.nvmlDeviceGetPowerUsage = boom
    be = NvmlBackend(fake)
    be.init()
    with pytest.raises(GPUError) as exc:
        be.power_mw(0)
    assert exc.value.kind is kind
    assert exc.value.index == 0


def test_non_nvml_failure_is_other_and_init_failure_is_unavailable():
    fake = FakeNVML()
    fake.nvmlDeviceGetPowerUsage = lambda h: 1 / 0
    be = NvmlBackend(fake)
    be.init()
    with pytest.raises(GPUError) as exc:
        be.power_mw(0)
    assert exc.value.kind is GPUErrorKind.OTHER

    def no_driver():
        raise fake.NVMLError(9)

    broken = FakeNVML()
    broken.nvmlInit = no_driver
    with pytest.raises(GPUError) as exc:
        NvmlBackend(broken).init()
    assert exc.value.kind is GPUErrorKind.UNAVAILABLE
    assert "driver" in str(exc.value)
    with pytest.raises(GPUError) as exc:
        NvmlBackend(FakeNVML()).power_mw(0)  # not initialised
    assert exc.value.kind is GPUErrorKind.UNAVAILABLE


def test_real_pynvml_error_classes_are_translated(monkeypatch):
    """The installed pynvml module, its functions monkeypatched, its real NVMLError classes."""
    def raiser(code):
        def f(*_a):
            raise pynvml.NVMLError(code)
        return f

    for name, value in {
        "nvmlInit": lambda: None, "nvmlShutdown": lambda: None,
        "nvmlDeviceGetCount": lambda: 1, "nvmlDeviceGetHandleByIndex": lambda i: object(),
        "nvmlDeviceGetName": lambda h: "NVIDIA H100 80GB HBM3",
        "nvmlDeviceGetUUID": lambda h: "GPU-abc",
        "nvmlDeviceGetTotalEnergyConsumption": raiser(pynvml.NVML_ERROR_GPU_IS_LOST),
        "nvmlDeviceSetGpuLockedClocks": raiser(pynvml.NVML_ERROR_NO_PERMISSION),
        "nvmlDeviceResetGpuLockedClocks": raiser(pynvml.NVML_ERROR_NOT_SUPPORTED),
    }.items():
        monkeypatch.setattr(pynvml, name, value)
    be = NvmlBackend(pynvml)
    be.init()
    assert be.devices()[0].name == "NVIDIA H100 80GB HBM3"
    for call, kind in ((lambda: be.energy_mj(0), GPUErrorKind.LOST),
                       (lambda: be.set_locked_clocks(0, 990, 1500), GPUErrorKind.NO_PERMISSION),
                       (lambda: be.reset_locked_clocks(0), GPUErrorKind.NOT_SUPPORTED)):
        with pytest.raises(GPUError) as exc:
            call()
        assert exc.value.kind is kind
    be.shutdown()


def _agent(fake: FakeNVML) -> tuple[NodeAgent, AgentMetrics]:
    metrics = AgentMetrics("n1")
    reading = EngineReading("http://e", ttft_tail_s=0.01, mean_itl_s=0.01, tokens=100.0,
                            model="llama-3.1-8b")
    agent = NodeAgent(NvmlBackend(fake), StaticSignalSource(lambda now: [reading]),
                      AgentConfig(node="n1", ttft_slo_s=1.0, tpot_slo_s=0.1), metrics=metrics,
                      monotonic=lambda: 0.0)
    return agent, metrics


async def test_agent_over_nvml_controls_a100_and_resets_on_stop():
    fake = FakeNVML()
    fake.locked[0] = (1005, 1005)  # left locked by a crashed predecessor
    agent, _ = _agent(fake)
    await agent.start()
    assert fake.locked == {0: None, 1: None}
    assert [g.product_name for g in agent.gpus] == ["A100", "A100"]
    for t in range(1, 4):
        await agent.tick(float(t))
    # MIAD within the product's range (1005..1410), min = lowest supported clock (210)
    assert fake.locked[0] is not None and fake.locked[0][0] == 210
    assert 1005 <= fake.locked[0][1] < 1410
    await agent.stop()
    assert fake.locked == {0: None, 1: None}


async def test_agent_over_unprivileged_nvml_is_monitor_only():
    fake = FakeNVML(privileged=False)
    agent, metrics = _agent(fake)
    await agent.start()
    for t in range(1, 4):
        await agent.tick(float(t))
    assert agent.monitor_only
    assert metrics.registry.get_sample_value("joulepool_sidecar_monitor_only", {"node": "n1"}) == 1
    (power,) = [s for m in metrics.registry.collect() for s in m.samples
                if s.name == "joulepool_gpu_power_watts" and s.labels["gpu"] == "0"]
    assert power.value == 250.5
    assert (power.labels["product"], power.labels["node"]) == ("A100", "n1")
    assert power.labels["modelName"].startswith("NVIDIA A100")
    assert not [c for c in fake.calls if c[0] == "lock"]
    await agent.stop()


async def test_agent_keeps_other_gpu_when_one_is_lost_over_nvml():
    fake = FakeNVML()
    agent, metrics = _agent(fake)
    await agent.start()
    await agent.tick(1.0)
    fake.lost.add(1)
    for t in range(2, 6):
        await agent.tick(float(t))
    assert metrics.registry.get_sample_value(
        "joulepool_gpu_lost", {"gpu": "1", "product": "A100", "node": "n1"}) == 1
    decided = sum(metrics.registry.get_sample_value(
        "joulepool_miad_decisions_total",
        {"gpu": "0", "product": "A100", "node": "n1", "direction": d}) for d in ("up", "down",
                                                                              "hold"))
    assert decided == 5  # GPU 0 got a MIAD decision every period
    assert fake.locked[0] == (210, 1005)
    await agent.stop()


def test_module_shape_matches_pynvml():
    """Every function the backend calls exists in the installed nvidia-ml-py."""
    used = ["nvmlInit", "nvmlShutdown", "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex",
            "nvmlDeviceGetName", "nvmlDeviceGetUUID", "nvmlDeviceGetTotalEnergyConsumption",
            "nvmlDeviceGetPowerUsage", "nvmlDeviceGetClockInfo",
            "nvmlDeviceGetSupportedMemoryClocks", "nvmlDeviceGetSupportedGraphicsClocks",
            "nvmlDeviceSetGpuLockedClocks", "nvmlDeviceResetGpuLockedClocks"]
    assert all(callable(getattr(pynvml, n)) for n in used)
    assert pynvml.NVML_CLOCK_SM == FakeNVML.NVML_CLOCK_SM
    assert (pynvml.NVML_ERROR_NO_PERMISSION, pynvml.NVML_ERROR_NOT_SUPPORTED,
            pynvml.NVML_ERROR_GPU_IS_LOST) == (4, 3, 15)
    assert isinstance(pynvml, types.ModuleType)


def test_power_limit_calls_speak_milliwatts_and_reset_restores_the_default():
    fake = FakeNVML()
    be = NvmlBackend(fake)
    be.init()
    assert be.power_limit_constraints_w(0) == (100.0, 400.0)
    be.set_power_limit_w(1, 250.4)
    assert fake.calls[-1] == ("power limit", 1, 250400)
    assert be.power_limit_w(1) == 250.4
    be.reset_power_limit(1)
    assert fake.calls[-1] == ("power limit", 1, 400000) and be.power_limit_w(1) == 400.0
    fake.privileged = False
    with pytest.raises(GPUError) as err:
        be.set_power_limit_w(0, 200)
    assert err.value.kind is GPUErrorKind.NO_PERMISSION
