"""Queue depth and generated tokens of serving engines, and the GPU energy of serving
pods, scraped from Prometheus pages.

Engine pages are read by the one engine-metrics parser
(:func:`joulepool.api.enginemetrics.parse_queue_sample`), the node agent's too; energy
pages (node agents', or DCGM exporters') by :func:`~joulepool.api.enginemetrics.parse_pod_energy`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp

from joulepool.api.enginemetrics import engine_spec, parse_pod_energy, parse_queue_sample

log = logging.getLogger(__name__)

MAX_METRICS_BYTES = 8 << 20


@dataclass(frozen=True)
class QueueSample:
    pool: str
    address: str
    waiting: float
    running: float
    kv_cache: float | None = None
    generated_tokens: float | None = None


async def _page(session: aiohttp.ClientSession, url: str, timeout_s: float) -> str | None:
    """The text of a metrics page (at most MAX_METRICS_BYTES); None on failure."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                return None
            body = await resp.content.read(MAX_METRICS_BYTES)
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
        return None
    return body.decode("utf-8", errors="replace")


async def fetch_queue(
    session: aiohttp.ClientSession, url: str, timeout_s: float, engine: str | None = None
) -> tuple[float, float, float | None, float] | None:
    """(waiting, running, KV-cache usage or None, generated tokens) of the engine at
    ``url``, read by the ``engine``'s metric names (detected from the page when None);
    None on failure."""
    text = await _page(session, url, timeout_s)
    sample = None if text is None else parse_queue_sample(text, engine_spec(engine))
    if sample is None:
        return None
    return sample.waiting, sample.running, sample.kv_cache_usage, sample.generation_tokens


async def fetch_energy(session: aiohttp.ClientSession, urls: Iterable[str], timeout_s: float
                       ) -> tuple[dict[str, float], int]:
    """Cumulative GPU energy per serving pod (``namespace/name`` -> J) from every page in
    ``urls`` (node agents, DCGM exporters), and how many pages failed."""
    texts = await asyncio.gather(*(_page(session, u, timeout_s) for u in urls))
    out: dict[str, float] = {}
    failures = 0
    for text in texts:
        try:
            pods = parse_pod_energy(text) if text is not None else None
        except ValueError:
            pods = None
        if pods is None:
            failures += 1
            continue
        for pod, joules in pods.items():  # a pod is on one node: no page overlaps another
            out[pod] = out.get(pod, 0.0) + joules
    return out, failures


def scrape_pages(targets: Iterable[tuple[str, str, str, str | None]]
                 ) -> dict[tuple[str, str | None], list[tuple[str, str]]]:
    """The pages ``targets`` (pool, address, url, engine) name: (url, engine) -> the
    (pool, address) endpoints that read it. A pod that serves several pools (a shared
    instance, docs/planner.md) is one page, however many pools list it."""
    pages: dict[tuple[str, str | None], list[tuple[str, str]]] = {}
    for pool, address, url, engine in targets:
        pages.setdefault((url, engine), []).append((pool, address))
    return pages


async def scrape_all(
    session: aiohttp.ClientSession, targets: Iterable[tuple[str, str, str, str | None]],
    timeout_s: float, concurrency: int,
) -> tuple[list[QueueSample], int]:
    """Scrape every (pool, address, url, engine): each page once (:func:`scrape_pages`),
    its reading given to every endpoint that lists it; returns the samples (one per
    target whose page was read) and how many pages failed."""
    sem = asyncio.Semaphore(concurrency)
    out: list[QueueSample] = []
    failures = 0

    async def one(url: str, engine: str | None, readers: list[tuple[str, str]]) -> None:
        nonlocal failures
        async with sem:
            got = await fetch_queue(session, url, timeout_s, engine)
        if got is None:
            failures += 1
            return
        out.extend(QueueSample(pool, address, got[0], got[1], got[2], got[3])
                   for pool, address in readers)

    await asyncio.gather(*(one(url, engine, readers)
                           for (url, engine), readers in scrape_pages(targets).items()))
    return out, failures
