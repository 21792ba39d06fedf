"""What every carbon provider client shares: errors, readings, one bounded JSON GET."""

from __future__ import annotations

import asyncio
import base64
import json
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp

from joulepool.core.energy import IntensityPoint, grams_per_kwh

#: reads one Kubernetes object by API path (the operator's ``KubeClient.get``)
ObjectReader = Callable[[str], Awaitable[Mapping[str, Any] | None]]

#: a Retry-After larger than this is treated as this (seconds)
MAX_RETRY_AFTER_S = 3600.0
#: the largest answer read (a 24 h forecast at 5-minute points is ~30 KiB)
MAX_BODY_BYTES = 4 << 20


class SourceError(Exception):
    """A fetch failed; ``reason`` is a short label for metrics (http, timeout, garbage,
    auth, config, rate_limited, unreachable)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class RateLimited(SourceError):
    """HTTP 429: do not ask again for ``retry_after_s`` seconds."""

    def __init__(self, retry_after_s: float, message: str) -> None:
        super().__init__("rate_limited", message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Reading:
    """One successful fetch: intensity points (gCO2/kWh) and the kind of signal."""

    points: tuple[IntensityPoint, ...]
    signal: str


@dataclass
class Credentials:
    """Values of the source's Secret (already decoded)."""

    values: dict[str, str] = field(default_factory=dict)

    def need(self, key: str) -> str:
        v = self.values.get(key)
        if not v:
            raise SourceError("config", f"the source's Secret has no key {key!r}")
        return v


@dataclass
class FetchContext:
    """What a provider may use for one fetch."""

    session: aiohttp.ClientSession
    timeout_s: float
    credentials: Credentials
    read_object: ObjectReader | None = None
    #: per-source memory between fetches (e.g. WattTime's login token)
    memo: dict[str, Any] = field(default_factory=dict)


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """An HTTP Retry-After header (delay-seconds or an HTTP-date) in seconds, or None."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


async def get_json(
    ctx: FetchContext, url: str, *, params: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Any:
    """GET ``url`` and decode its JSON body, within ``ctx.timeout_s``.

    Raises :class:`RateLimited` on 429, :class:`SourceError` on any other
    non-2xx status ("auth" for 401/403), a timeout, a connection error or a
    body that is not JSON.
    """
    timeout = aiohttp.ClientTimeout(total=ctx.timeout_s)
    try:
        async with ctx.session.get(url, params=params, headers=headers,
                                   timeout=timeout, allow_redirects=False) as resp:
            body = await resp.content.read(MAX_BODY_BYTES + 1)
            if len(body) > MAX_BODY_BYTES:
                raise SourceError("garbage", f"{url}: answer larger than {MAX_BODY_BYTES} bytes")
            if resp.status == 429:
                wait = retry_after_seconds(resp.headers.get("Retry-After"))
                raise RateLimited(wait if wait is not None else 0.0,
                                  f"{url}: HTTP 429 (Retry-After {wait})")
            if resp.status in (401, 403):
                raise SourceError("auth", f"{url}: HTTP {resp.status}: {_snippet(body)}")
            if not 200 <= resp.status < 300:
                raise SourceError("http", f"{url}: HTTP {resp.status}: {_snippet(body)}")
    except TimeoutError as exc:
        raise SourceError("timeout", f"{url}: no answer within {ctx.timeout_s:g}s") from exc
    except aiohttp.ClientError as exc:
        raise SourceError("unreachable", f"{url}: {type(exc).__name__}: {exc}") from exc
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError("garbage", f"{url}: body is not JSON: {_snippet(body)}") from exc


async def read_object(ctx: FetchContext, path: str, what: str) -> Mapping[str, Any]:
    """One Kubernetes object through ``ctx.read_object``, within ``ctx.timeout_s``."""
    if ctx.read_object is None:
        raise SourceError("config", f"{what}: no Kubernetes API access")
    try:
        obj = await asyncio.wait_for(ctx.read_object(path), ctx.timeout_s)
    except TimeoutError as exc:
        raise SourceError("timeout", f"{what}: no answer within {ctx.timeout_s:g}s") from exc
    except Exception as exc:  # the API client's own error types: reported, never raised
        raise SourceError("http", f"{what}: {exc}") from exc
    if not isinstance(obj, Mapping):
        raise SourceError("garbage", f"{what}: not an object")
    return obj


def _snippet(body: bytes, limit: int = 200) -> str:
    return body[:limit].decode("utf-8", "replace").replace("\n", " ")


def parse_time(value: Any, what: str) -> float:
    """An RFC 3339 / ISO 8601 timestamp (naive: UTC) in seconds since the epoch."""
    if not isinstance(value, str):
        raise SourceError("garbage", f"{what}: timestamp {value!r} is not a string")
    try:
        t = datetime.fromisoformat(value.strip())
    except ValueError as exc:
        raise SourceError("garbage", f"{what}: bad timestamp {value!r}") from exc
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.timestamp()


def number(value: Any, what: str) -> float:
    """A finite number (JSON number or numeric string) or SourceError("garbage")."""
    if isinstance(value, bool):
        raise SourceError("garbage", f"{what}: {value!r} is not a number")
    try:
        x = float(value)
    except (TypeError, ValueError) as exc:
        raise SourceError("garbage", f"{what}: {value!r} is not a number") from exc
    if not math.isfinite(x):
        raise SourceError("garbage", f"{what}: {value!r} is not finite")
    return x


def intensity(value: Any, unit: str, what: str) -> float:
    """A published intensity in ``unit``, in gCO2/kWh (SourceError for garbage)."""
    try:
        return grams_per_kwh(number(value, what), unit)
    except ValueError as exc:
        raise SourceError("garbage", f"{what}: {exc}") from exc


def decode_secret(secret: Mapping[str, Any]) -> Credentials:
    """A Secret object's ``data`` (base64) and ``stringData`` as plain strings."""
    out: dict[str, str] = {}
    for k, v in (secret.get("data") or {}).items():
        try:
            out[str(k)] = base64.b64decode(str(v), validate=True).decode().strip()
        except (ValueError, UnicodeDecodeError) as exc:
            raise SourceError("config", f"Secret key {k!r} is not base64 text") from exc
    for k, v in (secret.get("stringData") or {}).items():
        out[str(k)] = str(v).strip()
    return Credentials(out)
