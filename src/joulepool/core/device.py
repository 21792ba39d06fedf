"""The GPU backend interface the node agent drives: real NVML or the simulated one.

Both backends translate their failures into :class:`GPUError` with a
:class:`GPUErrorKind`, so the agent's safety rules (monitor-only without
privilege, lost GPUs reported, clocks reset after errors) are written once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, runtime_checkable


class GPUErrorKind(StrEnum):
    NO_PERMISSION = "no_permission"  # locking clocks needs CAP_SYS_ADMIN / root
    NOT_SUPPORTED = "not_supported"  # the GPU or driver cannot do this
    LOST = "lost"  # the GPU fell off the bus
    UNAVAILABLE = "unavailable"  # no driver / library: the backend cannot start
    TIMEOUT = "timeout"  # the call did not return within its time bound (a hung driver)
    OTHER = "other"


class GPUError(Exception):
    """A backend call failed; ``kind`` says how the agent should react."""

    def __init__(self, kind: GPUErrorKind, message: str, index: int | None = None) -> None:
        self.kind = kind
        self.index = index
        where = f"GPU {index}: " if index is not None else ""
        super().__init__(f"{where}{message}")


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    uuid: str
    name: str  # as NVML reports it, e.g. "NVIDIA H100 80GB HBM3"


@runtime_checkable
class GPUBackend(Protocol):
    """What the agent needs from NVML. Every call may raise :class:`GPUError`."""

    def init(self) -> None: ...

    def shutdown(self) -> None: ...

    def devices(self) -> Sequence[DeviceInfo]: ...

    def energy_mj(self, index: int) -> float:
        """Total energy since driver load, millijoules (monotonic)."""
        ...

    def power_mw(self, index: int) -> float: ...

    def sm_clock_mhz(self, index: int) -> float: ...

    def supported_clocks_mhz(self, index: int) -> Sequence[float]:
        """Lockable graphics (SM) clocks at the highest memory clock."""
        ...

    def set_locked_clocks(self, index: int, min_mhz: float, max_mhz: float) -> None: ...

    def reset_locked_clocks(self, index: int) -> None: ...

    def power_limit_constraints_w(self, index: int) -> tuple[float, float]:
        """(min, max) power limit the GPU accepts, watts."""
        ...

    def power_limit_w(self, index: int) -> float:
        """The power limit in force, watts."""
        ...

    def set_power_limit_w(self, index: int, watts: float) -> None:
        """Cap board power (needs the same privilege as locking clocks)."""
        ...

    def reset_power_limit(self, index: int) -> None:
        """Back to the GPU's default power limit."""
        ...
