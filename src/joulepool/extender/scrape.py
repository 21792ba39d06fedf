"""Queue depth of serving engines from their Prometheus metrics (vLLM names).

Only the two gauges the router needs are parsed; the other lines of a vLLM
``/metrics`` page (hundreds of histogram buckets) are dropped before the
Prometheus text parser sees them, which keeps a scrape of 1,000 engines cheap.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from joulepool.api.vllm import RUNNING, WAITING

log = logging.getLogger(__name__)

_WANTED = (WAITING, RUNNING)
MAX_METRICS_BYTES = 8 << 20


@dataclass(frozen=True)
class QueueSample:
    pool: str
    address: str
    waiting: float
    running: float


def parse_queue(text: str) -> tuple[float, float] | None:
    """(waiting, running) summed over label sets; None when neither gauge is present."""
    lines = [
        ln for ln in text.splitlines()
        if ln.startswith(_WANTED) or (ln.startswith("#") and any(w in ln for w in _WANTED))
    ]
    if not lines:
        return None
    totals = {WAITING: 0.0, RUNNING: 0.0}
    seen = False
    try:
        for family in text_string_to_metric_families("\n".join(lines) + "\n"):
            for sample in family.samples:
                if sample.name in totals and sample.value == sample.value:  # skip NaN
                    totals[sample.name] += max(float(sample.value), 0.0)
                    seen = True
    except ValueError as exc:
        log.debug("unparsable metrics: %s", exc)
        return None
    return (totals[WAITING], totals[RUNNING]) if seen else None


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
