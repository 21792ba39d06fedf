"""Queue depth of serving engines, scraped from their Prometheus pages.

The page is read by the one engine-metrics parser
(:func:`joulepool.api.enginemetrics.parse_queue_sample`), the node agent's too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp

from joulepool.api.enginemetrics import engine_spec, parse_queue_sample

log = logging.getLogger(__name__)

MAX_METRICS_BYTES = 8 << 20


@dataclass(frozen=True)
class QueueSample:
    pool: str
    address: str
    waiting: float
    running: float
    kv_cache: float | None = None


async def fetch_queue(
    session: aiohttp.ClientSession, url: str, timeout_s: float, engine: str | None = None
) -> tuple[float, float, float | None] | None:
    """(waiting, running, KV-cache usage or None) of the engine at ``url``, read by the
    ``engine``'s metric names (detected from the page when None); None on failure."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                return None
            body = await resp.content.read(MAX_METRICS_BYTES)
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
        return None
    sample = parse_queue_sample(body.decode("utf-8", errors="replace"), engine_spec(engine))
    return None if sample is None else (sample.waiting, sample.running, sample.kv_cache_usage)


async def scrape_all(
    session: aiohttp.ClientSession, targets: Iterable[tuple[str, str, str, str | None]],
    timeout_s: float, concurrency: int,
) -> tuple[list[QueueSample], int]:
    """Scrape every (pool, address, url, engine); returns the samples and the failure
    count."""
    sem = asyncio.Semaphore(concurrency)
    out: list[QueueSample] = []
    failures = 0

    async def one(pool: str, address: str, url: str, engine: str | None) -> None:
        nonlocal failures
        async with sem:
            got = await fetch_queue(session, url, timeout_s, engine)
        if got is None:
            failures += 1
        else:
            out.append(QueueSample(pool, address, got[0], got[1], got[2]))

    await asyncio.gather(*(one(p, a, u, e) for p, a, u, e in targets))
    return out, failures
