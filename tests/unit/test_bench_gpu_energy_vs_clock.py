"""benchmarks/gpu_energy_vs_clock.py without a GPU: joulepool's NVML backend replaced by
a stand-in whose power and speed follow the clock, the GPU load by a sleep."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from bench_helpers import load_bench

from joulepool.core.device import DeviceInfo, GPUError, GPUErrorKind

F_MAX = 1980.0


class StandInGPU:
    """One H100: power 100 W + 300 W x (f/f_max)^2 while clocks are locked, idle 100 W;
    energy integrated over real time; clocks lockable unless ``deny_lock``."""

    deny_lock = False
    last: StandInGPU | None = None

    def __init__(self) -> None:
        self.locked: float | None = None
        self.energy = 0.0
        self.t = time.monotonic()
        self.resets = 0
        self.shut = False
        StandInGPU.last = self

    def _advance(self) -> None:
        now = time.monotonic()
        f = self.locked or F_MAX
        watts = 100.0 + (300.0 * (f / F_MAX) ** 2 if self.locked else 0.0)
        self.energy += watts * (now - self.t) * 1e3
        self.t = now

    def init(self) -> None: ...

    def shutdown(self) -> None:
        self.shut = True

    def devices(self) -> list[DeviceInfo]:
        return [DeviceInfo(0, "GPU-0", "NVIDIA H100 80GB HBM3")]

    def energy_mj(self, index: int) -> float:
        self._advance()
        return self.energy

    def sm_clock_mhz(self, index: int) -> float:
        return self.locked or F_MAX

    def supported_clocks_mhz(self, index: int) -> list[float]:
        return [float(f) for f in range(210, int(F_MAX) + 1, 15)]

    def set_locked_clocks(self, index: int, min_mhz: float, max_mhz: float) -> None:
        if StandInGPU.deny_lock:
            raise GPUError(GPUErrorKind.NO_PERMISSION, "not root", index)
        self._advance()
        self.locked = max_mhz

    def reset_locked_clocks(self, index: int) -> None:
        self._advance()
        self.locked = None
        self.resets += 1


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    import joulepool.nodeagent.nvml as nvml

    monkeypatch.setattr(nvml, "NvmlBackend", StandInGPU)
    monkeypatch.setattr(StandInGPU, "deny_lock", False)
    for module in load_bench("gpu_energy_vs_clock.py"):

        def load(kind: str, size: int) -> tuple[Any, Any, float, str]:
            def work() -> None:  # a unit of work takes longer at a lower clock
                gpu = StandInGPU.last
                assert gpu is not None
                time.sleep(2e-4 * F_MAX / (gpu.locked or F_MAX))

            return work, lambda: None, 1.0, "TFLOP"

        monkeypatch.setattr(module, "_load", load)
        yield module


def test_measures_each_clock_then_resets(bench: ModuleType, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    assert bench.main(["--clocks", "3", "--seconds", "0.2", "--idle-seconds", "0.05",
                       "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "GPU 0: NVIDIA H100 80GB HBM3 (H100)" in text and "measuring 3 clocks" in text
    doc = json.loads(out.read_text())
    clocks = [r["locked_mhz"] for r in doc["rows"]]
    assert len(clocks) == 3 and clocks[0] == F_MAX and clocks == sorted(clocks, reverse=True)
    assert [r["sm_mhz"] for r in doc["rows"]] == clocks
    power = [r["power_w"] for r in doc["rows"]]
    assert power == sorted(power, reverse=True) and 350 < power[0] < 450
    assert 90 < doc["idle_w"] < 110
    assert doc["gamma"] == pytest.approx(2.0, abs=0.3)  # dynamic power ~ f^2
    assert "least energy per TFLOP" in text
    gpu = StandInGPU.last
    assert gpu is not None and gpu.locked is None and gpu.resets >= 2 and gpu.shut


def test_no_permission_to_lock_exits_2_with_clocks_reset(
        bench: ModuleType, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(StandInGPU, "deny_lock", True)
    assert bench.main(["--clocks", "2", "--seconds", "0.05", "--idle-seconds", "0.01"]) == 2
    assert "run as root or with CAP_SYS_ADMIN" in capsys.readouterr().err
    gpu = StandInGPU.last
    assert gpu is not None and gpu.locked is None and gpu.shut
