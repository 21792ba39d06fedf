"""Real NVML backend over nvidia-ml-py (import name ``pynvml``).

Reading energy (``nvmlDeviceGetTotalEnergyConsumption``, mJ since driver
load, Volta+) and power needs no privilege; locking clocks
(``nvmlDeviceSetGpuLockedClocks``) needs CAP_SYS_ADMIN or root. Every NVML
error is translated into a :class:`~joulepool.core.device.GPUError`.

The ``pynvml`` module is injectable so the translation is tested against a
fake module without a GPU.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, TypeVar

from joulepool.core.device import DeviceInfo, GPUError, GPUErrorKind

T = TypeVar("T")

# NVML return codes (stable across NVML versions; pynvml exports the same names)
_NOT_SUPPORTED = 3
_NO_PERMISSION = 4
_DRIVER_NOT_LOADED = 9
_LIBRARY_NOT_FOUND = 12
_GPU_IS_LOST = 15
_UNINITIALIZED = 1


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlBackend:
    """GPU backend on the real NVML library."""

    def __init__(self, nvml: ModuleType | Any | None = None) -> None:
        self._nvml = nvml
        self._handles: list[Any] = []
        self._infos: list[DeviceInfo] = []
        self._initialised = False

    # -- error translation ---------------------------------------------------
    def _kind(self, exc: BaseException) -> GPUErrorKind:
        value = getattr(exc, "value", None)
        nvml = self._nvml
        codes = {
            getattr(nvml, "NVML_ERROR_NO_PERMISSION", _NO_PERMISSION): GPUErrorKind.NO_PERMISSION,
            getattr(nvml, "NVML_ERROR_NOT_SUPPORTED", _NOT_SUPPORTED): GPUErrorKind.NOT_SUPPORTED,
            getattr(nvml, "NVML_ERROR_GPU_IS_LOST", _GPU_IS_LOST): GPUErrorKind.LOST,
            getattr(nvml, "NVML_ERROR_DRIVER_NOT_LOADED", _DRIVER_NOT_LOADED):
                GPUErrorKind.UNAVAILABLE,
            getattr(nvml, "NVML_ERROR_LIBRARY_NOT_FOUND", _LIBRARY_NOT_FOUND):
                GPUErrorKind.UNAVAILABLE,
        }
        if not isinstance(value, int):
            return GPUErrorKind.OTHER
        return codes.get(value, GPUErrorKind.OTHER)

    def _call(self, index: int | None, what: str, fn: Callable[..., T], *args: Any) -> T:
        error_cls = getattr(self._nvml, "NVMLError", None)
        try:
            return fn(*args)
        except Exception as exc:
            if error_cls is not None and isinstance(exc, error_cls):
                raise GPUError(self._kind(exc), f"{what}: {exc}", index) from exc
            raise GPUError(GPUErrorKind.OTHER, f"{what}: {exc!r}", index) from exc

    @property
    def nvml(self) -> Any:
        if self._nvml is None or not self._initialised:
            raise GPUError(GPUErrorKind.UNAVAILABLE, "NVML is not initialised")
        return self._nvml

    def _handle(self, index: int) -> Any:
        if not 0 <= index < len(self._handles):
            raise GPUError(GPUErrorKind.OTHER, "no such GPU", index)
        return self._handles[index]

    # -- lifecycle -----------------------------------------------------------
    def init(self) -> None:
        if self._nvml is None:
            try:
                self._nvml = importlib.import_module("pynvml")
            except ImportError as exc:
                raise GPUError(
                    GPUErrorKind.UNAVAILABLE, "nvidia-ml-py (pynvml) is not installed"
                ) from exc
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except Exception as exc:
            raise GPUError(
                GPUErrorKind.UNAVAILABLE,
                f"NVML did not initialise ({exc}); is the NVIDIA driver loaded and "
                "libnvidia-ml.so visible in this container?",
            ) from exc
        self._initialised = True
        count = int(self._call(None, "nvmlDeviceGetCount", nvml.nvmlDeviceGetCount))
        self._handles, self._infos = [], []
        for i in range(count):
            handle = self._call(i, "nvmlDeviceGetHandleByIndex", nvml.nvmlDeviceGetHandleByIndex, i)
            name = _text(self._call(i, "nvmlDeviceGetName", nvml.nvmlDeviceGetName, handle))
            uuid = _text(self._call(i, "nvmlDeviceGetUUID", nvml.nvmlDeviceGetUUID, handle))
            self._handles.append(handle)
            self._infos.append(DeviceInfo(i, uuid, name))

    def shutdown(self) -> None:
        if self._nvml is not None and self._initialised:
            with contextlib.suppress(Exception):  # shutting down anyway
                self._nvml.nvmlShutdown()
        self._initialised = False
        self._handles = []

    def devices(self) -> Sequence[DeviceInfo]:
        return list(self._infos)

    # -- readings ------------------------------------------------------------
    def energy_mj(self, index: int) -> float:
        nvml = self.nvml
        return float(self._call(index, "nvmlDeviceGetTotalEnergyConsumption",
                                nvml.nvmlDeviceGetTotalEnergyConsumption, self._handle(index)))

    def power_mw(self, index: int) -> float:
        nvml = self.nvml
        return float(self._call(index, "nvmlDeviceGetPowerUsage",
                                nvml.nvmlDeviceGetPowerUsage, self._handle(index)))

    def sm_clock_mhz(self, index: int) -> float:
        nvml = self.nvml
        sm = getattr(nvml, "NVML_CLOCK_SM", 1)
        return float(self._call(index, "nvmlDeviceGetClockInfo",
                                nvml.nvmlDeviceGetClockInfo, self._handle(index), sm))

    def supported_clocks_mhz(self, index: int) -> Sequence[float]:
        nvml = self.nvml
        handle = self._handle(index)
        mems = self._call(index, "nvmlDeviceGetSupportedMemoryClocks",
                          nvml.nvmlDeviceGetSupportedMemoryClocks, handle)
        if not mems:
            raise GPUError(GPUErrorKind.NOT_SUPPORTED, "no supported memory clocks", index)
        clocks = self._call(index, "nvmlDeviceGetSupportedGraphicsClocks",
                            nvml.nvmlDeviceGetSupportedGraphicsClocks, handle, max(mems))
        return sorted({float(c) for c in clocks})

    # -- control -------------------------------------------------------------
    def set_locked_clocks(self, index: int, min_mhz: float, max_mhz: float) -> None:
        nvml = self.nvml
        self._call(index, "nvmlDeviceSetGpuLockedClocks", nvml.nvmlDeviceSetGpuLockedClocks,
                   self._handle(index), round(min_mhz), round(max_mhz))

    def reset_locked_clocks(self, index: int) -> None:
        nvml = self.nvml
        self._call(index, "nvmlDeviceResetGpuLockedClocks",
                   nvml.nvmlDeviceResetGpuLockedClocks, self._handle(index))

    # -- power limit (NVML speaks milliwatts) -----------------------------------
    def power_limit_constraints_w(self, index: int) -> tuple[float, float]:
        nvml = self.nvml
        lo, hi = self._call(index, "nvmlDeviceGetPowerManagementLimitConstraints",
                            nvml.nvmlDeviceGetPowerManagementLimitConstraints,
                            self._handle(index))
        return float(lo) / 1e3, float(hi) / 1e3

    def power_limit_w(self, index: int) -> float:
        nvml = self.nvml
        return float(self._call(index, "nvmlDeviceGetPowerManagementLimit",
                                nvml.nvmlDeviceGetPowerManagementLimit,
                                self._handle(index))) / 1e3

    def set_power_limit_w(self, index: int, watts: float) -> None:
        nvml = self.nvml
        self._call(index, "nvmlDeviceSetPowerManagementLimit",
                   nvml.nvmlDeviceSetPowerManagementLimit, self._handle(index),
                   round(watts * 1e3))

    def reset_power_limit(self, index: int) -> None:
        nvml = self.nvml
        handle = self._handle(index)
        default = self._call(index, "nvmlDeviceGetPowerManagementDefaultLimit",
                             nvml.nvmlDeviceGetPowerManagementDefaultLimit, handle)
        self._call(index, "nvmlDeviceSetPowerManagementLimit",
                   nvml.nvmlDeviceSetPowerManagementLimit, handle, int(default))
