"""Simulated GPUs: NVML physics from ``core.profiles``, shareable between processes.

On a kind node there are no GPUs, so the node agent (``--backend simulated``)
and the fake vLLM engine share one small JSON state file per node:

* the agent locks and resets clocks and reads the energy counter and power;
* the engine writes its batch (utilisation) and reads the clock, so a lower
  clock really makes it slower (step time from ``ServingProfile.itl_s``).

Time is ``CLOCK_MONOTONIC``, which every process (and container) on one
kernel shares, so wall-clock steps cannot bend the energy counter. Energy is
integrated lazily: a GPU's record holds the counter at time ``t``
and the batch and clock since then, so a read is ``energy + power * (now - t)``
and every change first folds the integral up to now. Power per GPU is the
profile's instance power (``ServingProfile.power_w``, idle at batch 0) divided
by its GPU count (the engine records its TP degree). Writers take an ``flock``
and replace the file atomically; readers never see a half-written file.

Faults are injectable per GPU in the state (``"fault": "lost"`` or
``"not_supported"``) and per backend (``privileged=False`` answers
NO_PERMISSION to clock changes, like an agent without CAP_SYS_ADMIN).
Transient driver faults are injectable for a time span, from another process
too (:meth:`SimulatedGPUs.inject`): until ``hang_until`` every call on that GPU
blocks (a hung NVML call), until ``error_until`` every call fails with an
unknown NVML error. Both are monotonic times, so they end on their own.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from joulepool.core.device import DeviceInfo, GPUError, GPUErrorKind
from joulepool.core.powercap import clock_under_power_cap, power_limit_range_w
from joulepool.core.profiles import (
    DEFAULT_PROFILES,
    PRODUCTS,
    GPUProduct,
    ServingProfile,
    product_for_label,
)

STATE_VERSION = 1
FAULT_LOST = "lost"
FAULT_NOT_SUPPORTED = "not_supported"
FAULTS = (FAULT_LOST, FAULT_NOT_SUPPORTED)
#: transient faults for :meth:`SimulatedGPUs.inject`: state key of each one's end time
TRANSIENT_FAULTS = {"hang": "hang_until", "error": "error_until"}

State = dict[str, Any]


def fake_uuid(node: str, index: int) -> str:
    """A stable NVML-looking UUID for a simulated GPU."""
    h = hashlib.sha1(f"{node}/{index}".encode()).hexdigest()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def nvml_name(product: GPUProduct) -> str:
    """The device name NVML would report, e.g. ``NVIDIA H100 80GB HBM3``."""
    spaced = [a for a in product.aliases if " " in a]
    return spaced[0] if spaced else f"NVIDIA {product.name}"


def resolve_product(name: str) -> GPUProduct:
    product = PRODUCTS.get(name) or product_for_label(name)
    if product is None:
        raise ValueError(f"unknown GPU product {name!r}; known: {sorted(PRODUCTS)}")
    return product


def new_state(product: str, count: int, node: str = "node", now: float | None = None) -> State:
    """A fresh node state: ``count`` idle, unlocked GPUs of ``product``."""
    if count < 1:
        raise ValueError("count must be >= 1")
    p = resolve_product(product)
    t = time.monotonic() if now is None else now
    return {
        "version": STATE_VERSION,
        "node": node,
        "gpus": [
            {
                "index": i, "uuid": fake_uuid(node, i), "product": p.name, "model": None,
                "batch": 0.0, "tp": 1, "locked": None, "energy_mj": 0.0, "t": t, "fault": None,
            }
            for i in range(count)
        ],
    }


# ---------------------------------------------------------------------------
# stores
# ---------------------------------------------------------------------------
class StateStore(Protocol):
    def read(self) -> State | None: ...

    def update(self, fn: Callable[[State | None], State | None]) -> State | None: ...


class MemoryStore:
    """State held in this process (the agent's ``--backend simulated`` without a file)."""

    def __init__(self, state: State | None = None) -> None:
        self._state = state
        self._lock = threading.Lock()

    def read(self) -> State | None:
        return self._state

    def update(self, fn: Callable[[State | None], State | None]) -> State | None:
        with self._lock:
            nxt = fn(copy.deepcopy(self._state))
            if nxt is not None:
                self._state = nxt
            return self._state


class FileStore:
    """State in a JSON file shared by processes: flock for writers, atomic replace."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._cache_sig: tuple[int, int, int] | None = None
        self._cache: State | None = None

    def read(self) -> State | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        if sig != self._cache_sig:
            try:
                data = json.loads(self.path.read_text())
            except FileNotFoundError:
                return None
            except json.JSONDecodeError as exc:
                raise GPUError(GPUErrorKind.OTHER, f"corrupt GPU state {self.path}: {exc}") from exc
            self._cache_sig, self._cache = sig, data
        return self._cache

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def update(self, fn: Callable[[State | None], State | None]) -> State | None:
        with self._locked():
            self._cache_sig = None  # always re-read under the lock
            current = self.read()
            nxt = fn(copy.deepcopy(current))
            if nxt is None:
                return current
            fd, tmp = tempfile.mkstemp(prefix=".gpu-state-", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(nxt, f)
                os.chmod(tmp, 0o666)
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            return nxt


# ---------------------------------------------------------------------------
# physics
# ---------------------------------------------------------------------------
class SimulatedGPUs:
    """The node's simulated GPUs: physics from core profiles over a state store."""

    def __init__(
        self,
        store: StateStore,
        clock: Callable[[], float] = time.monotonic,
        profiles: Sequence[ServingProfile] = DEFAULT_PROFILES,
    ) -> None:
        self.store = store
        self.clock = clock
        self.profiles = tuple(profiles)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str] | None,
        product: str | None = None,
        count: int | None = None,
        node: str = "node",
        clock: Callable[[], float] = time.monotonic,
    ) -> SimulatedGPUs:
        """Shared state at ``path`` (or in memory), created with ``count`` x ``product``
        if it does not exist yet. An existing file is used as it is."""
        store: StateStore = FileStore(path) if path is not None else MemoryStore()
        gpus = cls(store, clock)
        if product is not None and count is not None:
            gpus.ensure(product, count, node)
        return gpus

    def ensure(self, product: str, count: int, node: str = "node") -> None:
        """Create the state unless it already exists (first of agent / plugin / engine wins)."""
        fresh = new_state(product, count, node, self.clock())

        def init(state: State | None) -> State | None:
            if state and state.get("gpus"):
                return None
            return fresh

        self.store.update(init)

    # -- reading --------------------------------------------------------------
    def state(self) -> State:
        st = self.store.read()
        if not st or not st.get("gpus"):
            raise GPUError(GPUErrorKind.UNAVAILABLE, "no simulated GPUs (empty state)")
        return st

    def gpu(self, index: int) -> dict[str, Any]:
        gpus = self.state()["gpus"]
        if not 0 <= index < len(gpus):
            raise GPUError(GPUErrorKind.OTHER, "no such GPU", index)
        return dict(gpus[index])

    def count(self) -> int:
        return len(self.state()["gpus"])

    def product(self, gpu: dict[str, Any]) -> GPUProduct:
        return resolve_product(str(gpu["product"]))

    def profile(self, gpu: dict[str, Any]) -> ServingProfile:
        """The profile whose physics this GPU follows (its model, else the product's first)."""
        product = self.product(gpu)
        mine = [p for p in self.profiles if p.product.name == product.name]
        if not mine:
            raise GPUError(GPUErrorKind.OTHER, f"no serving profile for {product.name}")
        model, tp = gpu.get("model"), gpu.get("tp")
        for p in mine:
            if p.model == model and p.gpus == tp:
                return p
        for p in mine:
            if p.model == model:
                return p
        return mine[0]

    def effective_clock(self, gpu: dict[str, Any]) -> float:
        """The SM clock the GPU runs at: its locked maximum (else f_max), lowered further
        until the instance's power fits its GPUs' power limits (``core.powercap``)."""
        product = self.product(gpu)
        locked = gpu.get("locked")
        f_max = product.f_max_mhz.value
        f = float(f_max)
        if locked:
            f = float(min(max(float(locked[1]), product.f_min_mhz.value), f_max))
        cap = gpu.get("power_limit_w")
        if cap is not None:
            profile = self.profile(gpu)
            batch = float(gpu.get("batch") or 0.0)
            f = clock_under_power_cap(profile, batch, float(cap) * profile.gpus, f)
        return f

    def power_limit_w(self, gpu: dict[str, Any]) -> float:
        """The GPU's power limit in force: the one set, else its default (the TDP)."""
        cap = gpu.get("power_limit_w")
        return float(cap) if cap is not None else float(self.product(gpu).tdp_w.value)

    def set_power_limit(self, index: int, watts: float | None) -> None:
        """Cap the GPU's board power (None: back to the default)."""
        self._mutate([index], lambda g: g.__setitem__(
            "power_limit_w", None if watts is None else float(watts)))

    def power_w(self, gpu: dict[str, Any]) -> float:
        profile = self.profile(gpu)
        batch = float(gpu.get("batch") or 0.0)
        return float(profile.power_w(batch, self.effective_clock(gpu))) / profile.gpus

    def energy_mj(self, index: int, now: float | None = None) -> float:
        gpu = self.gpu(index)
        t = self.clock() if now is None else now
        return float(gpu["energy_mj"]) + self.power_w(gpu) * max(t - float(gpu["t"]), 0.0) * 1e3

    # -- writing ----------------------------------------------------------------
    def _mutate(self, indices: Sequence[int], fn: Callable[[dict[str, Any]], None]) -> None:
        now = self.clock()

        def apply(state: State | None) -> State | None:
            if not state or not state.get("gpus"):
                raise GPUError(GPUErrorKind.UNAVAILABLE, "no simulated GPUs (empty state)")
            gpus = state["gpus"]
            for i in indices:
                if not 0 <= i < len(gpus):
                    raise GPUError(GPUErrorKind.OTHER, "no such GPU", i)
                g = gpus[i]
                # fold the energy integral up to now before anything changes
                g["energy_mj"] = float(g["energy_mj"]) + self.power_w(g) * max(
                    now - float(g["t"]), 0.0) * 1e3
                g["t"] = now
                fn(g)
            return state

        self.store.update(apply)

    def set_batch(self, indices: Sequence[int], batch: float, model: str | None = None) -> None:
        def f(g: dict[str, Any]) -> None:
            g["batch"] = float(max(batch, 0.0))
            g["tp"] = len(indices)  # the instance spans these GPUs: its TP degree
            if model is not None:
                g["model"] = model
        self._mutate(indices, f)

    def set_locked(self, index: int, min_mhz: float, max_mhz: float) -> None:
        self._mutate([index], lambda g: g.__setitem__("locked", [float(min_mhz), float(max_mhz)]))

    def reset(self, index: int) -> None:
        self._mutate([index], lambda g: g.__setitem__("locked", None))

    def inject(self, index: int, fault: str, seconds: float) -> None:
        """Make every call on GPU ``index`` hang (``"hang"``) or fail (``"error"``) for
        ``seconds`` from now (0 ends an injected fault now)."""
        key = TRANSIENT_FAULTS.get(fault)
        if key is None:
            raise ValueError(f"unknown transient fault {fault!r}; expected one of "
                             f"{sorted(TRANSIENT_FAULTS)}")
        until = self.clock() + max(seconds, 0.0)
        self._mutate([index], lambda g: g.__setitem__(key, until))

    def set_fault(self, index: int, fault: str | None) -> None:
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; expected one of {FAULTS}")
        self._mutate([index], lambda g: g.__setitem__("fault", fault))


# ---------------------------------------------------------------------------
# the backend
# ---------------------------------------------------------------------------
class SimulatedBackend:
    """:class:`~joulepool.core.device.GPUBackend` over :class:`SimulatedGPUs`."""

    def __init__(self, gpus: SimulatedGPUs, privileged: bool = True) -> None:
        self.gpus = gpus
        self.privileged = privileged
        self._last_energy: dict[int, float] = {}

    def _live(self, index: int) -> dict[str, Any]:
        gpu = self._transient_faults(index, self.gpus.gpu(index))
        if gpu.get("fault") == FAULT_LOST:
            raise GPUError(GPUErrorKind.LOST, "GPU is lost", index)
        return gpu

    def _transient_faults(self, index: int, gpu: dict[str, Any]) -> dict[str, Any]:
        """Block while a hang is injected (at most its span in real time), then fail
        while an error is injected."""
        left = float(gpu.get("hang_until") or 0.0) - self.gpus.clock()
        if left > 0:
            give_up = time.monotonic() + left
            while time.monotonic() < give_up:
                time.sleep(min(0.01, left))
                gpu = self.gpus.gpu(index)  # the injector may end it early
                if float(gpu.get("hang_until") or 0.0) <= self.gpus.clock():
                    break
        if float(gpu.get("error_until") or 0.0) > self.gpus.clock():
            raise GPUError(GPUErrorKind.OTHER, "Unknown Error (injected)", index)
        return gpu

    def init(self) -> None:
        self.gpus.state()

    def shutdown(self) -> None:
        return None

    def devices(self) -> Sequence[DeviceInfo]:
        out = []
        for g in self.gpus.state()["gpus"]:
            out.append(DeviceInfo(int(g["index"]), str(g["uuid"]),
                                  nvml_name(self.gpus.product(g))))
        return out

    def energy_mj(self, index: int) -> float:
        self._live(index)
        # a counter never runs backwards, even if the clock it integrates over does
        value = max(self.gpus.energy_mj(index), self._last_energy.get(index, 0.0))
        self._last_energy[index] = value
        return value

    def power_mw(self, index: int) -> float:
        return self.gpus.power_w(self._live(index)) * 1e3

    def sm_clock_mhz(self, index: int) -> float:
        return self.gpus.effective_clock(self._live(index))

    def supported_clocks_mhz(self, index: int) -> Sequence[float]:
        gpu = self._live(index)
        return [float(c) for c in self.gpus.product(gpu).supported_clocks()]

    def _check_control(self, index: int) -> dict[str, Any]:
        gpu = self._live(index)
        if not self.privileged:
            raise GPUError(GPUErrorKind.NO_PERMISSION, "Insufficient Permissions", index)
        if gpu.get("fault") == FAULT_NOT_SUPPORTED:
            raise GPUError(GPUErrorKind.NOT_SUPPORTED, "Not Supported", index)
        return gpu

    def set_locked_clocks(self, index: int, min_mhz: float, max_mhz: float) -> None:
        gpu = self._check_control(index)
        product = self.gpus.product(gpu)
        lo, hi = product.f_min_mhz.value, product.f_max_mhz.value
        if not (min_mhz <= max_mhz and lo - 1e-6 <= min_mhz and max_mhz <= hi + 1e-6):
            raise GPUError(GPUErrorKind.OTHER,
                           f"Invalid Argument: clocks {min_mhz}-{max_mhz} outside {lo}-{hi}", index)
        self.gpus.set_locked(index, min_mhz, max_mhz)

    def reset_locked_clocks(self, index: int) -> None:
        self._check_control(index)
        self.gpus.reset(index)

    def power_limit_constraints_w(self, index: int) -> tuple[float, float]:
        gpu = self._live(index)
        return power_limit_range_w(self.gpus.product(gpu).tdp_w.value)

    def power_limit_w(self, index: int) -> float:
        return self.gpus.power_limit_w(self._live(index))

    def set_power_limit_w(self, index: int, watts: float) -> None:
        gpu = self._check_control(index)
        lo, hi = power_limit_range_w(self.gpus.product(gpu).tdp_w.value)
        if not lo - 1e-6 <= watts <= hi + 1e-6:
            raise GPUError(GPUErrorKind.OTHER,
                           f"Invalid Argument: power limit {watts} W outside {lo}-{hi} W", index)
        self.gpus.set_power_limit(index, watts)

    def reset_power_limit(self, index: int) -> None:
        self._check_control(index)
        self.gpus.set_power_limit(index, None)
