"""A small async Kubernetes API client for the operator's own writes.

kopf talks to the API server for watching and for its own bookkeeping; the
planning loop writes statuses, Deployments and the plan ConfigMap itself, with
this client, over the same credentials kopf logged in with (a
``kopf.ConnectionInfo`` handed over by the login handler).

Every call is retried with backoff on what a real API server does under load
or during a control-plane restart: HTTP 5xx, 429, connection errors and
timeouts; a ``Retry-After`` header (429, 503) is honoured as the least delay.
409 Conflict and 404 are the caller's to handle (re-read and retry, or create
instead), see :func:`patch_merge_retrying`.

Owned objects are written with server-side apply (:meth:`KubeClient.apply`):
the operator's field manager owns every field it sets, and ``force`` takes
back a field someone else changed (a hand-made ``kubectl scale`` or edit).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

import aiohttp

from joulepool.operator.config import FIELD_MANAGER

log = logging.getLogger("joulepool.operator.kube")

MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
RETRYABLE = frozenset({429, 500, 502, 503, 504})
#: the longest ``Retry-After`` the client waits for inside one call, seconds
MAX_RETRY_AFTER_S = 30.0


class ApiError(Exception):
    """A Kubernetes API call failed (after retries where retrying made sense)."""

    def __init__(self, status: int, reason: str = "", message: str = "",
                 retry_after: float | None = None) -> None:
        self.status = status
        self.reason = reason
        self.message = message
        #: the server's ``Retry-After``, seconds (429/503), None when absent or unreadable
        self.retry_after = retry_after
        super().__init__(f"HTTP {status} {reason}: {message}".strip())

    @property
    def rejected(self) -> bool:
        """The API refused the request itself (400, 403, 422): retrying it as is cannot help."""
        return self.status in (400, 403, 422)

    @property
    def namespace_terminating(self) -> bool:
        """403 because the namespace is being deleted: nothing may be created in it."""
        return self.status == 403 and "being terminated" in self.message

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def not_found(self) -> bool:
        return self.status == 404


def path_for(
    group_version: str, plural: str, namespace: str | None = None, name: str | None = None,
    subresource: str | None = None,
) -> str:
    """``/api/v1/...`` or ``/apis/<group>/<version>/...`` for a resource (URL-quoted parts)."""
    base = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
    parts = [base]
    if namespace:
        parts.append(f"namespaces/{quote(namespace, safe='')}")
    parts.append(plural)
    if name:
        parts.append(quote(name, safe=""))
        if subresource:
            parts.append(subresource)
    return "/".join(parts)


class KubeClient:
    """aiohttp-based client; credentials come from kopf's login (``set_connection``)."""

    def __init__(
        self,
        retry_delays: Sequence[float] = (0.1, 0.3, 1.0, 2.0, 5.0),
        request_timeout: float = 30.0,
        relogin: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        self.retry_delays = tuple(retry_delays)
        self.request_timeout = request_timeout
        self.relogin = relogin
        self._info: Any = None
        self._session: aiohttp.ClientSession | None = None
        self._ready = asyncio.Event()
        #: counters for logs and tests: calls made, retries done
        self.calls = 0
        self.retries = 0

    # -- credentials ----------------------------------------------------------
    def set_connection(self, info: Any) -> None:
        """Use a ``kopf.ConnectionInfo`` (server, token/certs, CA) from now on."""
        if info is self._info:
            return
        old, self._session, self._info = self._session, None, info
        if old is not None and not old.closed:
            asyncio.get_running_loop().create_task(old.close())
        self._ready.set()

    @property
    def server(self) -> str:
        return str(self._info.server).rstrip("/") if self._info is not None else ""

    async def _get_session(self) -> aiohttp.ClientSession:
        await self._ready.wait()
        if self._session is None or self._session.closed:
            info = self._info
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64, ssl=info.as_ssl_context()),
                headers={**info.as_http_headers(), "User-Agent": "joulepool-operator"},
                timeout=aiohttp.ClientTimeout(total=self.request_timeout),
                trust_env=bool(getattr(info, "trust_env", False)),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    # -- calls ----------------------------------------------------------------
    async def request(
        self, method: str, path: str, body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None, content_type: str = "application/json",
    ) -> dict[str, Any] | None:
        """One API call, retried on 5xx/429/timeouts/connection errors with backoff (+jitter)."""
        attempt = 0
        relogged = False
        while True:
            self.calls += 1
            try:
                session = await self._get_session()
                data = None if body is None else json.dumps(body)
                headers = {"Content-Type": content_type} if body is not None else {}
                async with session.request(
                    method, self.server + path, data=data, params=params, headers=headers
                ) as resp:
                    text = await resp.text()
                    if resp.status < 400:
                        return json.loads(text) if text else None
                    error = _api_error(resp.status, text, resp.headers.get("Retry-After"))
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                error = ApiError(0, type(exc).__name__, str(exc))
            if error.status == 401 and self.relogin is not None and not relogged:
                relogged = True
                log.info("API answered 401; logging in again")
                self.set_connection(await self.relogin())
                continue
            retryable = error.status in RETRYABLE or error.status == 0
            if retryable and attempt < len(self.retry_delays):
                delay = self.retry_delays[attempt] * (1 + 0.2 * random.random())
                if error.retry_after is not None:
                    delay = max(delay, min(error.retry_after, MAX_RETRY_AFTER_S))
                attempt += 1
                self.retries += 1
                log.warning("%s %s failed (%s); retry %d in %.2fs",
                            method, path, error, attempt, delay)
                await asyncio.sleep(delay)
                continue
            raise error

    async def get(self, path: str) -> dict[str, Any] | None:
        return await self.request("GET", path)

    async def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        return await self.request("POST", path, body)

    async def patch(self, path: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        return await self.request("PATCH", path, body, content_type=MERGE_PATCH,
                                  params={"fieldManager": FIELD_MANAGER})

    async def apply(self, path: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """Server-side apply ``body`` (a full object: apiVersion, kind, metadata.name) at
        ``path`` as :data:`FIELD_MANAGER`, forcing conflicts: creates the object if absent,
        and takes back every field the operator sets that another manager changed."""
        return await self.request("PATCH", path, body, content_type=APPLY_PATCH,
                                  params={"fieldManager": FIELD_MANAGER, "force": "true"})

    async def delete(self, path: str) -> dict[str, Any] | None:
        return await self.request(
            "DELETE", path, {"propagationPolicy": "Background"}
        )


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` header as seconds (the delta-seconds form kube-apiserver sends);
    None when absent or not a non-negative number."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _api_error(status: int, text: str, retry_after: str | None = None) -> ApiError:
    wait = retry_after_seconds(retry_after)
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        return ApiError(status, str(doc.get("reason", "")), str(doc.get("message", "")), wait)
    return ApiError(status, "", text[:200], wait)


async def patch_merge_retrying(
    client: KubeClient,
    path: str,
    make_patch: Callable[[dict[str, Any] | None], Mapping[str, Any] | None],
    current: dict[str, Any] | None,
    attempts: int = 5,
) -> dict[str, Any] | None:
    """Merge-patch ``path``; on 409 Conflict re-read the object and recompute the patch.

    ``make_patch(current_object)`` returns the patch for the object as last seen
    (None: nothing to do).  A 404 while re-reading means the object is gone:
    nothing to patch, returns None.
    """
    for attempt in range(attempts):
        body = make_patch(current)
        if body is None:
            return None
        try:
            return await client.patch(path, body)
        except ApiError as exc:
            if not exc.conflict or attempt == attempts - 1:
                raise
            log.info("PATCH %s: conflict, re-reading (attempt %d)", path, attempt + 1)
            await asyncio.sleep(client.retry_delays[min(attempt, len(client.retry_delays) - 1)]
                                if client.retry_delays else 0)
            base = path[: -len("/status")] if path.endswith("/status") else path
            try:
                current = await client.get(base)
            except ApiError as err:
                if err.not_found:
                    return None
                raise
    return None  # pragma: no cover - loop always returns or raises
