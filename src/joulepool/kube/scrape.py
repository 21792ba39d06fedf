"""Queue depth of serving engines, scraped from their Prometheus pages.

The page is read by the one engine-metrics parser
(:func:`joulepool.api.enginemetrics.parse_queue`), the node agent's too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp

from joulepool.api.enginemetrics import parse_queue

log = logging.getLogger(__name__)

MAX_METRICS_BYTES = 8 << 20


@dataclass(frozen=True)
class QueueSample:
    pool: str
    address: str
    waiting: float
    running: float


async def fetch_queue(
    session: aiohttp.ClientSession, url: str, timeout_s: float
) -> tuple[float, float] | None:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                return None
            body = await resp.content.read(MAX_METRICS_BYTES)
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
        return None
    return parse_queue(body.decode("utf-8", errors="replace"))


async def scrape_all(
    session: aiohttp.ClientSession, targets: Iterable[tuple[str, str, str]],
    timeout_s: float, concurrency: int,
) -> tuple[list[QueueSample], int]:
    """Scrape every (pool, address, url); returns the samples and the failure count."""
    sem = asyncio.Semaphore(concurrency)
    out: list[QueueSample] = []
    failures = 0

    async def one(pool: str, address: str, url: str) -> None:
        nonlocal failures
        async with sem:
            got = await fetch_queue(session, url, timeout_s)
        if got is None:
            failures += 1
        else:
            out.append(QueueSample(pool, address, got[0], got[1]))

    await asyncio.gather(*(one(p, a, u) for p, a, u in targets))
    return out, failures
