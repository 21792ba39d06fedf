"""Every GPU backend call off the event loop, on one worker thread, bounded in time.

NVML calls block (a driver in trouble can hang one for minutes). Run on the
event loop, one such call would stop ``/healthz`` and the SIGTERM handler,
and a hang longer than the grace period would end in SIGKILL with clocks
locked. :class:`GPUCalls` runs them on a dedicated daemon thread instead:

* one thread per backend, first in first out, so calls never interleave and
  a reset always lands after a lock sent before it (a lock that was still
  running when its caller gave up cannot undo a later reset);
* the caller waits at most ``timeout_s`` (``init_timeout_s`` for the
  backend's start); a call that takes longer raises
  :class:`~joulepool.core.device.GPUError` of kind ``TIMEOUT``, which the
  agent treats like any failed call (clocks reset, retried, counted);
* while a call hangs past its bound, further reads and locks fail at once
  with ``TIMEOUT`` instead of queueing behind it; resets do queue (one per
  GPU, later requests share it), so they run as soon as the driver answers;
* the thread is a daemon: a call that never returns cannot keep the process
  from exiting after its shutdown.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from joulepool.core.device import DeviceInfo, GPUBackend, GPUError, GPUErrorKind

T = TypeVar("T")

DEFAULT_CALL_TIMEOUT_S = 2.0
DEFAULT_INIT_TIMEOUT_S = 30.0


@dataclass
class _Job:
    what: str
    fn: Callable[[], Any]
    future: concurrent.futures.Future[Any]


class GPUCalls:
    """Async facade of a :class:`GPUBackend`: each method runs the backend call on the
    worker thread and waits for it at most its time bound (seconds)."""

    def __init__(self, backend: GPUBackend, timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
                 init_timeout_s: float = DEFAULT_INIT_TIMEOUT_S) -> None:
        if timeout_s <= 0 or init_timeout_s <= 0:
            raise ValueError("GPU call timeouts must be > 0")
        self.backend = backend
        self.timeout_s = timeout_s
        self.init_timeout_s = init_timeout_s
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._busy: tuple[str, float] | None = None  # (what, monotonic start) of the running call
        self._resets: dict[tuple[str, int], concurrent.futures.Future[Any]] = {}
        self._lock = threading.RLock()
        self.timeouts = 0  # calls that exceeded their bound (for tests and metrics)

    # -- the worker ------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                continue  # its caller gave up before it started
            self._busy = (job.what, time.monotonic())
            try:
                job.future.set_result(job.fn())
            except BaseException as exc:  # handed to the caller, never kills the worker
                job.future.set_exception(exc)
            finally:
                self._busy = None

    def _submit(self, what: str, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="gpu-calls",
                                                daemon=True)
                self._thread.start()
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._jobs.put(_Job(what, fn, future))
        return future

    def hung(self) -> tuple[str, float] | None:
        """(call, seconds) of a call running past its bound, else None."""
        busy = self._busy
        if busy is None:
            return None
        elapsed = time.monotonic() - busy[1]
        return (busy[0], elapsed) if elapsed > self.timeout_s else None

    async def _wait(self, what: str, future: concurrent.futures.Future[Any], index: int | None,
                    timeout: float, cancel_on_timeout: bool = True) -> Any:
        waited = asyncio.wrap_future(future)
        try:
            return await asyncio.wait_for(asyncio.shield(waited), timeout)
        except TimeoutError:
            self.timeouts += 1
            if cancel_on_timeout:
                future.cancel()  # only takes effect while it is still queued
            raise GPUError(GPUErrorKind.TIMEOUT,
                           f"{what}: no answer within {timeout:g} s", index) from None
        except asyncio.CancelledError:
            if cancel_on_timeout:
                future.cancel()
            raise

    async def call(self, what: str, fn: Callable[..., T], *args: Any, index: int | None = None,
                   timeout: float | None = None) -> T:
        """``fn(*args)`` on the worker; fails at once while another call hangs."""
        hung = self.hung()
        if hung is not None:
            raise GPUError(GPUErrorKind.TIMEOUT,
                           f"{what}: not sent, {hung[0]} has hung for {hung[1]:.1f} s", index)
        future = self._submit(what, lambda: fn(*args))
        result: T = await self._wait(what, future, index, timeout or self.timeout_s)
        return result

    # -- the backend's calls -----------------------------------------------------
    async def init(self) -> None:
        await self.call("init", self.backend.init, timeout=self.init_timeout_s)

    async def shutdown(self) -> None:
        """Let go of the backend (bounded) and end the worker once it is idle."""
        with contextlib.suppress(GPUError):
            await self.call("shutdown", self.backend.shutdown)
        self._jobs.put(None)

    async def devices(self) -> Sequence[DeviceInfo]:
        return await self.call("devices", self.backend.devices)

    async def energy_mj(self, index: int) -> float:
        return await self.call("energy", self.backend.energy_mj, index, index=index)

    async def power_mw(self, index: int) -> float:
        return await self.call("power", self.backend.power_mw, index, index=index)

    async def sm_clock_mhz(self, index: int) -> float:
        return await self.call("sm clock", self.backend.sm_clock_mhz, index, index=index)

    async def supported_clocks_mhz(self, index: int) -> Sequence[float]:
        return await self.call("supported clocks", self.backend.supported_clocks_mhz, index,
                               index=index)

    async def set_locked_clocks(self, index: int, min_mhz: float, max_mhz: float) -> None:
        await self.call("lock clocks", self.backend.set_locked_clocks, index, min_mhz, max_mhz,
                        index=index)

    async def power_limit_constraints_w(self, index: int) -> tuple[float, float]:
        return await self.call("power limit constraints", self.backend.power_limit_constraints_w,
                               index, index=index)

    async def set_power_limit_w(self, index: int, watts: float) -> None:
        await self.call("set power limit", self.backend.set_power_limit_w, index, watts,
                        index=index)

    async def reset_locked_clocks(self, index: int, wait_if_hung: bool = True) -> None:
        await self.hand_back(index, "clocks", wait_if_hung)

    async def hand_back(self, index: int, control: str = "clocks",
                        wait_if_hung: bool = True) -> None:
        """Undo what the agent controls on a GPU: reset its locked clocks (``clocks``) or
        restore its default power limit (``power``).

        Queued even behind a hung call (one pending reset per GPU and kind, shared by
        callers), so it runs as soon as the driver answers. The caller waits at most the
        bound, or (``wait_if_hung=False``) not at all while another call hangs."""
        what, fn = (("reset power limit", self.backend.reset_power_limit) if control == "power"
                    else ("reset clocks", self.backend.reset_locked_clocks))
        with self._lock:
            future = self._resets.get((control, index))
            if future is None or future.done():
                future = self._submit(what, lambda: fn(index))
                self._resets[(control, index)] = future
        hung = self.hung()
        if hung is not None and not wait_if_hung:
            raise GPUError(GPUErrorKind.TIMEOUT,
                           f"{what}: queued behind {hung[0]}, hung for {hung[1]:.1f} s", index)
        await self._wait(what, future, index, self.timeout_s, cancel_on_timeout=False)
