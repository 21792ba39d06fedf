"""SLO signals from the local serving engines' Prometheus metrics (vLLM names).

Each control period the agent scrapes every engine's ``/metrics`` and turns it into
the period's observables (``core.controllers.PeriodLatencies``), which
``core.controllers.miad_signal`` (the simulator's MIAD calls it too) makes MIAD's
signal: the increments of the inter-token-latency histogram's ``_sum`` and ``_count``
since the previous scrape (the period's mean ITL), the TTFT tail of the first tokens
since then (or over ``window_s`` seconds, when longer), read at ``quantile`` with
PromQL's rule (``core.estimators.histogram_quantile``; 1: the upper bound of the
bucket holding the worst), and the waiting queue.
It also counts new output tokens
(``vllm:generation_tokens_total``) for the online J/token estimate, and reads the
prompt length at the TTFT-miss quantile from the engine's prompt-length histogram
(``vllm:request_prompt_tokens``, ``sglang:prompt_tokens_histogram``) over a longer
window (:class:`PromptWindow`), for MIAD's prefill clock floor (docs/architecture.md 1.5).

Which GPUs an engine uses: given explicitly (``--engine-url 0,1@http://...``),
or read from the engine's ``joulepool_engine_gpu_info{gpu="..."}`` metric (the
fake engine exports it from the device plugin's ``JOULEPOOL_GPU_INDEX``);
otherwise unknown, and the agent applies the engine to every GPU no other
engine claims.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

# the one engine-metrics parser, the routing service's too
from joulepool.api.enginemetrics import EngineSample, Histogram, parse_engine_metrics
from joulepool.core.controllers import (
    MIAD_TTFT_QUANTILE,
    MIAD_TTFT_WINDOW_S,
    PeriodLatencies,
    miad_signal,
    prefill_floor_quantile,
)
from joulepool.core.estimators import bucket_delta, counter_delta, histogram_quantile
from joulepool.nodeagent.background import Background

log = logging.getLogger("joulepool.nodeagent.signals")

@dataclass(frozen=True)
class EngineReading:
    """What the agent uses from one engine in one period."""

    engine: str
    waiting: int = 0
    #: requests the engine runs now (its running gauge; a prefilling one counts)
    running: int = 0
    #: MIAD's signal from this engine (core.controllers.miad_signal of ``latencies``),
    #: s: the TTFT tail, and the TPOT compared with the target: the period's mean
    #: inter-token latency (``SLOSignal.mean_itl_s``)
    ttft_tail_s: float | None = None
    mean_itl_s: float | None = None
    tokens: float = 0.0  # new output tokens since the previous reading
    model: str | None = None
    pool: str | None = None
    gpus: frozenset[int] | None = None
    #: the serving pod (``namespace/name``) and its mode label, where discovery found it
    #: (None for an engine given by URL): which of its pool's planned instances it fills
    pod: str | None = None
    mode: str | None = None
    #: the pod is Ready (EngineEndpoint.ready): among the pods that fill its pool's
    #: planned instances, as the routing service counts them
    ready: bool = True
    fresh: bool = True  # scraped successfully this period
    stale: bool = False  # no successful scrape for longer than the stale timeout
    #: prompt tokens at the prompt quantile of the engine's recent requests (None: no
    #: histogram on the page, or no request finished yet)
    prompt_tail_tokens: float | None = None
    #: the engine's prompt-length histogram as scraped (cumulative since it started;
    #: None when the page carries none)
    prompts: Histogram | None = None
    #: the period's observables the signal was computed from (None: not scraped)
    latencies: PeriodLatencies | None = None

    @property
    def prompt_histogram(self) -> bool:
        """Whether the page carries a prompt-length histogram at all."""
        return self.prompts is not None


def tail(q: float, new: Histogram, old: Histogram | None) -> float | None:
    """The q-quantile of what a histogram observed between two scrapes."""
    if not new.bounds:
        return None
    base = old.counts if old is not None and old.bounds == new.bounds else None
    counts = bucket_delta(new.counts, base)
    bounds = list(new.bounds)
    if not math.isinf(bounds[-1]):
        bounds.append(math.inf)
        counts.append(counts[-1])
    return histogram_quantile(q, bounds, counts)


def increment(new: Histogram, old: Histogram | None) -> tuple[float, float]:
    """(sum, count): what a histogram's ``_sum`` and ``_count`` rose by between two
    scrapes; everything since the engine started when there is no earlier scrape, the
    count fell (a restart) or the bucket layout changed."""
    if old is None or new.count < old.count or new.bounds != old.bounds:
        return new.sum, new.count
    return max(new.sum - old.sum, 0.0), new.count - old.count


@dataclass
class EngineWindow:
    """Recent scrapes of one engine: the period's observables and token deltas."""

    window_s: float = MIAD_TTFT_WINDOW_S
    history: deque[tuple[float, EngineSample]] = field(default_factory=deque)
    last: EngineSample | None = None

    def add(self, t: float, sample: EngineSample, q: float) -> tuple[PeriodLatencies, float]:
        """Record the scrape at ``t`` (monotonic s); return the observables since the
        previous scrape (:class:`PeriodLatencies`, s: the ITL histogram's increments; the
        TTFT tail at quantile ``q`` of the first tokens since the latest scrape at or
        before ``t - window_s``, the previous one at the latest) and the new output
        tokens since the previous scrape. The first scrape reads everything since the
        engine started; so does one after a restart (counts falling)."""
        prev = self.last
        prev_t = self.history[-1][0] if self.history else t
        tokens = counter_delta(sample.generation_tokens,
                               prev.generation_tokens if prev else None)
        if prev is not None and sample.generation_tokens < prev.generation_tokens:
            self.history.clear()  # the engine restarted: old buckets mean nothing now
            prev = None
        self.last = sample
        self.history.append((t, sample))
        # keep the latest sample at or before the window start as the baseline, and the
        # previous scrape at least
        while len(self.history) >= 3 and self.history[1][0] <= t - self.window_s:
            self.history.popleft()
        base = self.history[0][1] if len(self.history) >= 2 else None
        itl_sum, itl_count = increment(sample.tpot, prev.tpot if prev else None)
        stalled = (t - prev_t if prev is not None and itl_count == 0.0
                   and prev.running > 0.0 and sample.running > 0.0 else 0.0)
        return PeriodLatencies(
            itl_sum=itl_sum, itl_count=itl_count,
            ttft_tail=tail(q, sample.ttft, base.ttft if base else None),
            waiting=round(sample.waiting), stalled=max(stalled, 0.0)), tokens


#: the prompt-length quantile MIAD's prefill floor is taken at (the simulator's too)
PROMPT_QUANTILE = prefill_floor_quantile()
#: seconds of prompt-length histogram the quantile is read over (prompts are counted when
#: their request finishes, so this is much longer than the latency window)
PROMPT_WINDOW_S = 300.0


@dataclass
class PromptWindow:
    """Recent scrapes of one engine's prompt-length histogram.

    :meth:`add` returns the q-quantile (tokens) of the prompts counted over the last
    ``window_s`` seconds; when none finished in the window, of every prompt since the
    engine started (a pause in traffic does not change what the pool's prompts look
    like); None while the histogram is empty or absent. A restart of the engine (counts
    falling) or a new bucket layout starts over.
    """

    window_s: float = PROMPT_WINDOW_S
    history: deque[tuple[float, Histogram]] = field(default_factory=deque)

    def add(self, t: float, hist: Histogram, q: float) -> float | None:
        """Record the scrape at ``t`` (monotonic s) of the cumulative prompt-length
        histogram ``hist`` (tokens); the ``q``-quantile (probability) in tokens, as the
        class docstring says."""
        if not hist.bounds:
            self.history.clear()
            return None
        if self.history:
            last = self.history[-1][1]
            if last.bounds != hist.bounds or hist.counts[-1] < last.counts[-1]:
                self.history.clear()
        self.history.append((t, hist))
        while len(self.history) >= 2 and self.history[1][0] <= t - self.window_s:
            self.history.popleft()
        base = self.history[0][1] if len(self.history) >= 2 else None
        recent = tail(q, hist, base)
        return recent if recent is not None else tail(q, hist, None)


@dataclass(frozen=True)
class EngineEndpoint:
    url: str  # the engine's metrics URL
    pool: str | None = None
    gpus: frozenset[int] | None = None
    #: the serving pod (``namespace/name``) and its ``joulepool.dev/mode`` label, when
    #: discovered from the cluster (None for an engine given by URL)
    pod: str | None = None
    mode: str | None = None
    #: the pod is Ready (``kube.objects.pod_ready``): the routing service sends it
    #: requests, so it may fill one of its pool's shared instances (True for a URL)
    ready: bool = True


def metrics_url(url: str) -> str:
    """``http://host:8000`` -> ``http://host:8000/metrics``; a URL with a path is kept."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"engine URL must be http(s)://host:port[/path], got {url!r}")
    path = parts.path if parts.path not in ("", "/") else "/metrics"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def parse_engine_spec(spec: str, pool: str | None = None) -> EngineEndpoint:
    """``[GPU[,GPU...]@]URL``, e.g. ``0,1@http://127.0.0.1:8000``."""
    spec = spec.strip()
    gpus: frozenset[int] | None = None
    if "@" in spec and not spec.startswith(("http://", "https://")):
        head, spec = spec.split("@", 1)
        try:
            gpus = frozenset(int(x) for x in head.split(",") if x.strip())
        except ValueError:
            raise ValueError(f"GPU list before '@' must be integers, got {head!r}") from None
        if not gpus or min(gpus) < 0:
            raise ValueError(f"GPU list before '@' must be non-negative integers, got {head!r}")
    return EngineEndpoint(metrics_url(spec), pool, gpus)


class SignalSource(Protocol):
    async def read(self, now: float) -> list[EngineReading]: ...

    async def close(self) -> None: ...


Discover = Callable[[], Awaitable[Sequence[EngineEndpoint]]]


class PrometheusSignalSource:
    """Scrapes engines' ``/metrics`` over HTTP (aiohttp), concurrently, with a timeout."""

    def __init__(
        self,
        endpoints: Iterable[EngineEndpoint] = (),
        discover: Discover | None = None,
        quantile: float = MIAD_TTFT_QUANTILE,
        window_s: float = MIAD_TTFT_WINDOW_S,
        timeout_s: float = 0.8,
        stale_s: float = 5.0,
        discover_interval_s: float = 15.0,
        on_error: Callable[[str], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        discover_wait_s: float = 0.2,
        prompt_quantile: float = PROMPT_QUANTILE,
        prompt_window_s: float = PROMPT_WINDOW_S,
    ) -> None:
        if not 0.0 < quantile <= 1.0 or not 0.0 < prompt_quantile <= 1.0:
            raise ValueError("quantile must be in (0, 1]")
        if prompt_window_s <= 0 or window_s < 0:
            raise ValueError("prompt window must be > 0 and the TTFT window >= 0")
        self.prompt_quantile = prompt_quantile
        self.prompt_window_s = prompt_window_s
        self.static = list(endpoints)
        self.discover = discover
        self.quantile = quantile
        self.window_s = window_s
        self.timeout_s = timeout_s
        self.stale_s = stale_s
        self.discover_interval_s = discover_interval_s
        self.on_error = on_error
        self.monotonic = monotonic
        self.discovered: list[EngineEndpoint] = []
        self._next_discovery = 0.0
        # discovery runs in the background: a hung API call never holds up a read
        self._discovery = Background(self._discover_once, discover_wait_s)
        self._windows: dict[str, EngineWindow] = {}
        self._prompts: dict[str, PromptWindow] = {}
        self._last_ok: dict[str, float] = {}
        self._last_reading: dict[str, EngineReading] = {}
        self._session: Any = None
        self._warned: set[str] = set()

    def endpoints(self) -> list[EngineEndpoint]:
        seen: dict[str, EngineEndpoint] = {}
        for e in [*self.static, *self.discovered]:
            seen.setdefault(e.url, e)
        return list(seen.values())

    async def _maybe_discover(self) -> None:
        if self.discover is None or self._discovery.running:
            return
        now = self.monotonic()
        if now < self._next_discovery:
            return
        self._next_discovery = now + self.discover_interval_s
        await self._discovery.poke()
        if self._discovery.running and "discover:slow" not in self._warned:
            self._warned.add("discover:slow")
            log.warning("engine discovery is slow; scraping the %d known engines meanwhile",
                        len(self.discovered))

    async def _discover_once(self) -> None:
        if self.discover is None:
            return
        try:
            self.discovered = list(await self.discover())
        except Exception as exc:  # keep the last list; say so once per kind of failure
            key = f"discover:{type(exc).__name__}"
            if key not in self._warned:
                self._warned.add(key)
                log.warning("engine discovery failed, keeping %d known engines: %s",
                            len(self.discovered), exc)

    async def _scrape(self, url: str) -> str:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        async with self._session.get(url) as resp:
            resp.raise_for_status()
            text: str = await resp.text()
            return text

    async def read(self, now: float) -> list[EngineReading]:
        await self._maybe_discover()
        endpoints = self.endpoints()
        texts = await asyncio.gather(*(self._scrape(e.url) for e in endpoints),
                                     return_exceptions=True)
        live = {e.url for e in endpoints}
        for url in list(self._windows):
            if url not in live:  # engine went away
                self._windows.pop(url, None)
                self._prompts.pop(url, None)
                self._last_ok.pop(url, None)
                self._last_reading.pop(url, None)
        out = []
        for e, text in zip(endpoints, texts, strict=True):
            reading = self._reading(e, text, now)
            out.append(reading)
        return out

    def _reading(self, e: EngineEndpoint, text: str | BaseException, now: float) -> EngineReading:
        try:
            if isinstance(text, BaseException):
                raise text
            sample = parse_engine_metrics(text)
        except Exception as exc:
            if self.on_error:
                self.on_error(e.url)
            if e.url not in self._warned:
                self._warned.add(e.url)
                log.warning("cannot scrape engine %s: %r", e.url, exc)
            last_ok = self._last_ok.get(e.url)
            stale = last_ok is None or now - last_ok > self.stale_s
            prev = self._last_reading.get(e.url)
            return EngineReading(
                engine=e.url, pool=e.pool, pod=e.pod, mode=e.mode, ready=e.ready,
                gpus=e.gpus if e.gpus is not None else (prev.gpus if prev else None),
                model=prev.model if prev else None, fresh=False, stale=stale)
        self._warned.discard(e.url)
        window = self._windows.setdefault(e.url, EngineWindow(self.window_s))
        latencies, tokens = window.add(now, sample, self.quantile)
        signal = miad_signal(latencies)
        prompts = self._prompts.setdefault(e.url, PromptWindow(self.prompt_window_s))
        prompt_tail = prompts.add(now, sample.prompt_tokens, self.prompt_quantile)
        self._last_ok[e.url] = now
        reading = EngineReading(
            engine=e.url, waiting=signal.waiting, running=round(sample.running),
            ttft_tail_s=signal.ttft_tail_s,
            mean_itl_s=signal.mean_itl_s, latencies=latencies, tokens=tokens,
            model=sample.model, pool=e.pool, pod=e.pod, mode=e.mode, ready=e.ready,
            gpus=e.gpus if e.gpus is not None else sample.gpus,
            prompt_tail_tokens=prompt_tail,
            prompts=sample.prompt_tokens if sample.prompt_tokens.bounds else None)
        self._last_reading[e.url] = reading
        return reading

    async def close(self) -> None:
        await self._discovery.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None


class StaticSignalSource:
    """Readings handed in by the caller (tests, benchmarks)."""

    def __init__(self, fn: Callable[[float], list[EngineReading]]) -> None:
        self.fn = fn

    async def read(self, now: float) -> list[EngineReading]:
        return self.fn(now)

    async def close(self) -> None:
        return None
