"""A loopback proxy in front of the real API server that can hold back pod watch events.

A component whose kubeconfig points here sees the real API server, except that while
:attr:`LaggingProxy.hold` is set the lines of every pod *watch* stream wait (in order)
instead of being passed on: a watch that is behind, as one is for a moment after any
change. Lists, gets and other watches pass at once. Plain HTTP on 127.0.0.1 towards the
component (the bearer token travels in its kubeconfig); TLS to the API server.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from pathlib import Path

import aiohttp
from aiohttp import web

_HOP = {"host", "connection", "keep-alive", "transfer-encoding", "content-length",
        "upgrade", "proxy-connection", "te", "trailer"}


class LaggingProxy:
    def __init__(self, upstream: str, ca_file: Path) -> None:
        self.upstream = upstream.rstrip("/")
        self.ca_file = ca_file
        self.hold = threading.Event()
        self.held_lines = 0
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> str:
        self._thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self.url

    def stop(self) -> None:
        self.hold.clear()
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> str:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ctx),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    async def _stop(self) -> None:
        if self._session is not None:  # first: ends the upstream watch streams
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in left:
            t.cancel()
        await asyncio.gather(*left, return_exceptions=True)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        pod_watch = (request.path == "/api/v1/pods"
                     and request.query.get("watch", "").lower() in ("true", "1"))
        async with self._session.request(request.method, self.upstream + request.path_qs,
                                         headers=headers, data=await request.read(),
                                         allow_redirects=False) as up:
            resp = web.StreamResponse(status=up.status, headers={
                k: v for k, v in up.headers.items() if k.lower() not in _HOP})
            await resp.prepare(request)
            try:
                if pod_watch:
                    async for line in up.content:
                        if self.hold.is_set():
                            self.held_lines += 1
                        while self.hold.is_set():
                            await asyncio.sleep(0.05)
                        await resp.write(line)
                else:
                    async for chunk in up.content.iter_any():
                        await resp.write(chunk)
                await resp.write_eof()
            except (ConnectionResetError, aiohttp.ClientError):
                pass
            return resp
