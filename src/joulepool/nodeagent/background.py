"""Refreshing from the API server without ever blocking the control loop.

A :class:`Background` runs one refresh at a time in its own task. The control
period starts it (when none is running) and waits for it only a short,
bounded time; a refresh that hangs keeps running on its own while the period
goes on with the last good value, and no second one is started meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("joulepool.nodeagent")

#: ``_request_timeout`` for every Kubernetes API call the node agent makes:
#: (connect, read) seconds, so no call can hang a thread (or a shutdown) forever
API_TIMEOUT: tuple[float, float] = (3.0, 5.0)


class Background:
    def __init__(self, fn: Callable[[], Awaitable[None]], wait_s: float) -> None:
        self.fn = fn
        self.wait_s = wait_s
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        try:
            await self.fn()
        except Exception:  # fn says its own failures; never leave one unretrieved
            log.debug("background refresh failed", exc_info=True)

    async def poke(self) -> None:
        """Start a refresh unless one is running; wait at most ``wait_s`` for a new one."""
        if self.running:
            return
        self._task = asyncio.get_running_loop().create_task(self._run())
        if self.wait_s > 0:
            await asyncio.wait({self._task}, timeout=self.wait_s)

    async def cancel(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait({task}, timeout=1.0)
