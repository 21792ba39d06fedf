"""The endpoint picker's compiled front end: Envoy ext_proc v3 held by C++ (grpc++).

``native/eppnative.cc`` (built by ``make native`` / ``python native/build.py`` into
``joulepool/router/_eppnative*.so``) runs a C++ gRPC server inside the router process:
its one completion-queue thread holds the gateway's streams, parses Envoy's messages and
answers every one that needs no decision; what needs the router is queued and run on the
router's event loop (an eventfd reader), with the GIL, in order, next to everything else
the loop does, so the core router stays single-threaded. Per request Python is called
once to pick (:meth:`Bridge.pick`, the same :meth:`epp.Exchange.answer` the Python front
end calls) and once when the response ends (:meth:`epp.Exchange.response`); the C++ side
builds the answer (the ``x-gateway-destination-endpoint`` header, ``envoy.lb`` metadata,
immediate responses). The protocol is :mod:`joulepool.router.epp`'s, message for
message; why the front end exists: ``docs/gateway.md`` "Performance".

When the extension is not built (no compiler or grpc++ where joulepool was installed),
:data:`UNAVAILABLE` says why and the router serves the Python front end.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from joulepool.api import contract
from joulepool.httpserve import HTTPProblem
from joulepool.kube.pools import Router
from joulepool.router.epp import (
    LATENCY_BUCKETS,
    Exchange,
    HealthStatus,
    LatencySnapshot,
    refusal_body,
)

log = logging.getLogger("joulepool.router.epp")

_native: Any = None
#: why the compiled front end cannot serve here (None: it can)
UNAVAILABLE: str | None = None
#: where native/build.py says why it could not build, in a source checkout
_BUILD_REASON = Path(__file__).resolve().parents[3] / "build" / "native" / "UNAVAILABLE"
try:
    _native = importlib.import_module("joulepool.router._eppnative")
except ImportError as exc:  # not built, or its libraries (grpc++) missing
    _why = _BUILD_REASON.read_text().strip() if _BUILD_REASON.is_file() else str(exc)
    UNAVAILABLE = (f"the compiled ext_proc front end is not built or cannot load ({_why}); "
                   "build it with `make native` (python native/build.py)")

#: what a pick gives the C++ side: the exchange and the destination value, or None and
#: the refusal (HTTP status, message, JSON body), or (None, None): the picker failed
PickResult = tuple[Exchange, str] | tuple[None, tuple[int, str, bytes] | None]


def front_end(requested: str) -> str:
    """The front end to serve (``native`` or ``python``) for ``--picker-front-end``:
    ``auto`` is the compiled one when built (else the Python one, saying why);
    ``native`` when it is not built: RuntimeError with :data:`UNAVAILABLE`."""
    if requested == "python":
        return "python"
    if UNAVAILABLE is None:
        return "native"
    if requested == "native":
        raise RuntimeError(UNAVAILABLE)
    log.warning("endpoint picker: Python front end (%s)", UNAVAILABLE)
    return "python"


class Bridge:
    """What the C++ side calls on the event loop, once per request."""

    def __init__(self, router: Router, clock: Callable[[], float],
                 on_answer: Callable[[int], None] | None) -> None:
        self.router = router
        self.clock = clock
        self.on_answer = on_answer

    def pick(self, headers: dict[str, str], body: bytes, subset: frozenset[str] | None
             ) -> PickResult:
        """The request is over (``headers``: lower-cased names; ``subset``: the gateway's
        hint, None when it sent none). Never raises: a failure is logged and the stream
        ends with gRPC status UNKNOWN, as an exception in the Python front end's handler
        ends it. A destination the C++ side cannot send as UTF-8 (a lone surrogate) is
        such a failure, found here rather than by the C++ side after the call."""
        exchange = Exchange(self.router, self.clock, headers=headers, subset=subset,
                            on_answer=self.on_answer)
        try:
            value = exchange.answer(body)
            if isinstance(value, str) and not value.isascii():  # isascii: O(1) for str
                value.encode()  # UnicodeEncodeError where it is not UTF-8 encodable
        except Exception:
            log.exception("endpoint picker: the pick failed")
            exchange.close()
            return None, None
        if isinstance(value, HTTPProblem):
            return None, (value.status, str(value), refusal_body(value.status, str(value)))
        return exchange, value


def new_server(bridge: Bridge | None, host: str, port: int) -> Any:
    """The started C++ server (``bridge`` None: it decides nothing, every message
    answered "continue": the benchmark's floor). OSError when it cannot listen;
    RuntimeError when the extension is not built (:data:`UNAVAILABLE`)."""
    if _native is None:
        raise RuntimeError(UNAVAILABLE)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return _native.Server(
        address, bridge, destination_header=contract.EPP_DESTINATION_HEADER,
        lb_namespace=contract.EPP_LB_NAMESPACE, subset_namespace=contract.EPP_SUBSET_NAMESPACE,
        subset_key=contract.EPP_SUBSET_KEY, served_key=contract.EPP_SERVED_KEY,
        latency_buckets=LATENCY_BUCKETS)


class NativeHealth(HealthStatus):
    """The health statuses on grpc++'s default health service (grpc.health.v1)."""

    def __init__(self, server: Any, ready: Callable[[], bool]) -> None:
        super().__init__(ready, servicer=None)
        self.server = server

    async def _set(self, name: str, serving: bool) -> None:
        self.server.set_serving(name, serving)


class NativeServer:
    """The compiled front end attached to the running event loop."""

    def __init__(self, server: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop
        self.port: int = server.port
        loop.add_reader(server.fileno(), server.drain)

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting streams; those still open after ``grace`` seconds are
        cancelled. The loop keeps running the picks meanwhile."""
        await self.loop.run_in_executor(None, self.server.shutdown, grace or 0.0)
        self.loop.remove_reader(self.server.fileno())
        self.server.close()

    def latency(self) -> LatencySnapshot:
        """The C++ server's latency histograms (``epp.LATENCY_METRICS``), counted on
        its threads with no Python per request."""
        snapshot: LatencySnapshot = self.server.latency()
        return snapshot


async def start_server(router: Router, ready: Callable[[], bool], host: str, port: int,
                       clock: Callable[[], float] = time.monotonic,
                       on_answer: Callable[[int], None] | None = None,
                       ) -> tuple[NativeServer, int, NativeHealth]:
    """The started compiled front end with the picker and health services; the bound
    port (as :func:`joulepool.router.epp.start_server`)."""
    server = new_server(Bridge(router, clock, on_answer), host, port)
    status = NativeHealth(server, ready)
    await status.refresh()
    native = NativeServer(server, asyncio.get_running_loop())
    log.info("endpoint picker (ext_proc, native front end) serving gRPC on %s:%d",
             host, native.port)
    return native, native.port, status
