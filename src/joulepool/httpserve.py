"""HTTP plumbing shared by joulepool's aiohttp services (scheduler extender, router,
fake engine, node agent metrics): JSON bodies in and out, and the server with timeouts.

Contract of every JSON endpoint built on this module:

* a request body is accepted only as ``Content-Type: application/json`` (415 otherwise:
  a browser may send ``text/plain``, form or untyped bodies cross-site without a CORS
  preflight, so those must never be read as commands);
* a body over ``max_bytes`` is refused with 413 (``Content-Length`` or while reading); one
  not received within ``timeout_s`` seconds with 408;
* the body must be JSON (RFC 8259): ``NaN``, ``Infinity``, numbers that overflow a double
  (``1e999``) and nesting deeper than :data:`MAX_JSON_DEPTH` are refused with 400;
* every answer is RFC 8259 JSON: a non-finite float never leaves as ``NaN``/``Infinity``
  (it is written as ``null`` and logged);
* a connection that has not sent a complete request head within ``header_timeout_s``
  seconds (slow or half-sent headers) is closed, so it holds no worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import signal
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import pydantic_core
from aiohttp import web

log = logging.getLogger(__name__)

JSON_MEDIA_TYPE = "application/json"
#: seconds a client has to send a complete request line and headers
DEFAULT_HEADER_TIMEOUT_S = 10.0
#: seconds a client has to send the request body
DEFAULT_BODY_TIMEOUT_S = 30.0
#: deepest nesting of arrays/objects accepted in a JSON body (Kubernetes objects use < 20)
MAX_JSON_DEPTH = 64


class HTTPProblem(Exception):
    """A request the service refuses: HTTP ``status`` with a human-readable ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# -- request bodies ------------------------------------------------------------------------------

def require_json(request: web.BaseRequest) -> None:
    """415 unless the request says its body is ``application/json`` (any charset param)."""
    if request.content_type != JSON_MEDIA_TYPE:
        given = request.headers.get("Content-Type", "none")
        raise HTTPProblem(415, f"Content-Type must be {JSON_MEDIA_TYPE} (got {given[:80]})")


async def read_body(request: web.BaseRequest, max_bytes: int,
                    timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> bytes:
    """The whole body: 413 over ``max_bytes``, 408 when not received within ``timeout_s``.

    The application's ``client_max_size`` should be ``max_bytes`` too, so that aiohttp
    stops reading at the limit."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise HTTPProblem(413, f"body of {request.content_length} bytes is over the "
                               f"{max_bytes}-byte limit")
    try:
        async with asyncio.timeout(timeout_s):  # no task per request, as wait_for makes
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise HTTPProblem(413, f"body is over the {max_bytes}-byte limit") from None
    except TimeoutError:
        raise HTTPProblem(408, f"body not received within {timeout_s:g}s") from None


def _first_problem(value: Any, max_depth: int) -> str | None:
    """Where ``value`` has a non-finite float or nests deeper than ``max_depth`` (a JSON
    path), or None. Iterative: no recursion limit to hit."""
    stack: list[tuple[Any, str, int]] = [(value, "$", 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return f"{path}: number out of range (JSON numbers must be finite)"
        elif isinstance(item, dict | list):
            if depth >= max_depth:
                return f"{path}: nested deeper than {max_depth} levels"
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            stack.extend((v, f"{path}.{k}" if isinstance(item, dict) else f"{path}[{k}]",
                          depth + 1) for k, v in pairs if isinstance(v, float | dict | list))
    return None


def parse_json(body: bytes | str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """RFC 8259 JSON text as Python values; :class:`HTTPProblem` 400 naming what is wrong
    (malformed, ``NaN``/``Infinity``, a number that overflows a double, too deep)."""
    try:
        value = pydantic_core.from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        raise HTTPProblem(400, f"malformed JSON: {exc}") from None
    problem = _first_problem(value, max_depth)
    if problem:
        raise HTTPProblem(400, problem)
    return value


async def read_json(request: web.BaseRequest, max_bytes: int,
                    timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> Any:
    """:func:`require_json`, :func:`read_body` and :func:`parse_json` in one."""
    require_json(request)
    return parse_json(await read_body(request, max_bytes, timeout_s))


# -- answers --------------------------------------------------------------------------------

def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def dumps(payload: Any) -> str:
    """JSON text of ``payload`` that any RFC 8259 parser accepts: a non-finite float is
    written as ``null`` (and logged: it is a bug upstream), never as ``NaN``."""
    try:
        return json.dumps(payload, allow_nan=False)
    except ValueError:
        log.warning("non-finite number in a JSON answer, sent as null")
        return json.dumps(_finite(payload), allow_nan=False)


def json_response(payload: Any, status: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
    """``payload`` (already JSON text when a str) as an ``application/json`` response."""
    text = payload if isinstance(payload, str) else dumps(payload)
    return web.Response(text=text, status=status, content_type=JSON_MEDIA_TYPE, headers=headers)


# -- the server -----------------------------------------------------------------------------

async def start_server(app: web.Application, host: str, port: int, *,
                       ssl_context: ssl.SSLContext | None = None,
                       header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
                       shutdown_timeout_s: float = 10.0) -> web.AppRunner:
    """Serve ``app`` on ``host:port`` (0: any free port; ``runner.addresses`` says which);
    the caller stops it with ``await runner.cleanup()``.

    A connection must deliver a complete request head within ``header_timeout_s`` of
    opening, or of its previous answer (keep-alive), else it is closed: aiohttp's
    keep-alive timer runs from the moment a connection opens and closes any connection
    still waiting for a request head when it fires (aiohttp >= 3.10; the test of this
    function proves it for the installed version). Bodies are bounded by
    :func:`read_body`'s own timeout.
    """
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           keepalive_timeout=header_timeout_s,
                           shutdown_timeout=shutdown_timeout_s)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_address=True)
    await site.start()
    return runner


def urls(runner: web.AppRunner, tls: bool = False) -> list[str]:
    """``http(s)://host:port`` of every address ``runner`` listens on."""
    scheme = "https" if tls else "http"
    out = []
    for addr in runner.addresses:
        host, port = addr[0], addr[1]
        out.append(f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}")
    return out


async def serve_until_signalled(app: web.Application, host: str, port: int, *,
                                ssl_context: ssl.SSLContext | None = None,
                                header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
                                on_started: Callable[[web.AppRunner], None] | None = None,
                                on_signal: Callable[[], Awaitable[None]] | None = None,
                                ) -> None:
    """:func:`start_server`, call ``on_started(runner)``, serve until SIGINT or SIGTERM,
    await ``on_signal()`` (still serving: e.g. fail readiness and wait for load
    balancers to notice), then stop: the listener closes first, requests in flight get
    the runner's shutdown timeout to finish. OSError when the address cannot be bound."""
    runner = await start_server(app, host, port, ssl_context=ssl_context,
                                header_timeout_s=header_timeout_s)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if on_started is not None:
            on_started(runner)
        await stop.wait()
        if on_signal is not None:
            await on_signal()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
