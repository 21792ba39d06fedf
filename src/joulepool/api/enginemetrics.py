"""The one parser of a serving engine's Prometheus page (names in :mod:`api.vllm`).

Engines name their metrics differently (:class:`EngineMetricSpec`: vLLM V1 with
the pre-rename names as fallbacks, SGLang); the spec comes from the pod's
``joulepool.dev/engine`` label or is detected from the page. The routing service
reads the queue gauges and KV-cache usage of every engine; the node agent
reads those, the TTFT / inter-token latency histograms (buckets, ``_sum`` and
``_count``), the prompt-length histogram,
the generated-token counter, the model and the GPUs. Both call
:func:`parse_engine_metrics`, so both read a page by the same rules:

* samples are summed over label sets (one engine may serve several models or
  LoRA adapters);
* a NaN sample is skipped and a negative gauge or counter counts as 0 (request
  counts and token totals cannot be negative; a broken exporter must not turn
  the sum negative or NaN);
* a page that is not valid Prometheus text raises ValueError.

The page is parsed with prometheus_client's text parser. ``only`` limits it to
some metric families: their lines are picked out before parsing, which keeps a
scrape of 1,000 engines' pages (hundreds of histogram buckets each) cheap when
only the two queue gauges are wanted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from joulepool.api import vllm

#: joulepool's own engine info gauge: ``{gpu="0,3"} 1`` names the GPUs an engine uses
#: (the fake engine exports it from the device plugin's assignment)
GPU_INFO = "joulepool_engine_gpu_info"
#: the label vLLM and SGLang put the served model's name in
MODEL_LABEL = "model_name"


@dataclass(frozen=True)
class EngineMetricSpec:
    """Where one serving engine puts each quantity: family names, preferred first (a
    later name is read only when no earlier one is on the page)."""

    name: str
    waiting: tuple[str, ...]
    running: tuple[str, ...]
    ttft: tuple[str, ...]
    itl: tuple[str, ...]  #: time between output tokens (histogram, s)
    kv_cache: tuple[str, ...]  #: fraction of the KV cache in use, 0..1 (gauge)
    generation_tokens: tuple[str, ...]
    prefix: str  #: every family of the engine starts with it (auto-detection)
    #: prompt tokens per finished request (histogram, tokens)
    prompt_tokens: tuple[str, ...] = ()

    def queue_families(self) -> tuple[str, ...]:
        return (*self.waiting, *self.running, *self.kv_cache)


VLLM = EngineMetricSpec(
    "vllm", (vllm.WAITING,), (vllm.RUNNING,), (vllm.TTFT,), (vllm.ITL, vllm.LEGACY_TPOT),
    (vllm.KV_CACHE, vllm.LEGACY_KV_CACHE), (vllm.GENERATION_TOKENS,), "vllm:",
    (vllm.PROMPT_TOKENS,),
)
SGLANG = EngineMetricSpec(
    "sglang", (vllm.SGLANG_WAITING,), (vllm.SGLANG_RUNNING,), (vllm.SGLANG_TTFT,),
    (vllm.SGLANG_ITL, vllm.SGLANG_LEGACY_TPOT), (vllm.SGLANG_KV_CACHE,),
    (vllm.SGLANG_GENERATION_TOKENS,), "sglang:", (vllm.SGLANG_PROMPT_TOKENS,),
)
#: engine name (the pod label :data:`api.contract.ENGINE_LABEL`) -> its metric names
ENGINE_SPECS: dict[str, EngineMetricSpec] = {VLLM.name: VLLM, SGLANG.name: SGLANG}
#: the families the router needs (waiting and running requests, KV-cache usage, and the
#: generated-token counter its measured J/token divides by)
QUEUE_METRICS = tuple(n for spec in ENGINE_SPECS.values()
                      for n in (*spec.queue_families(), *spec.generation_tokens))

#: per-GPU energy counters with the pod the GPU is allocated to (``pod``, ``namespace``
#: labels): the node agent's (joules; family name, samples end in ``_total``) and the
#: DCGM exporter's (millijoules), with the factor to joules
GPU_ENERGY = "joulepool_gpu_energy_joules"
GPU_ENERGY_COUNTERS = ((GPU_ENERGY, 1.0),
                       ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", 1e-3))


def engine_spec(name: str | None) -> EngineMetricSpec | None:
    """The spec of an engine name (case-insensitive); None for None or an unknown name
    (auto-detect then)."""
    return ENGINE_SPECS.get(name.strip().lower()) if name else None


def detect_engine(text: str) -> EngineMetricSpec:
    """The engine whose families the page carries (vLLM when neither's is there)."""
    for spec in ENGINE_SPECS.values():
        if spec.prefix in text:
            return spec
    return VLLM


@dataclass(frozen=True)
class Histogram:
    """A cumulative histogram: upper bounds (in the family's unit: s, tokens) and counts,
    summed over label sets; ``sum`` and ``count`` are its ``_sum`` and ``_count`` samples
    (0 when the page has none)."""

    bounds: tuple[float, ...] = ()
    counts: tuple[float, ...] = ()
    sum: float = 0.0
    count: float = 0.0


@dataclass(frozen=True)
class EngineSample:
    """One scrape of an engine, cumulative counters as exported.

    ``waiting`` and ``running`` are request counts, ``generation_tokens`` the output
    tokens generated since the engine started; ``tpot`` is the inter-token latency
    histogram (vLLM V1's ITL, or the pre-rename TPOT); ``prompt_tokens`` the prompt
    length of finished requests (tokens; empty bounds when the engine does not publish
    it); ``kv_cache_usage`` the
    fraction of the KV cache in use (the fullest of the label sets; None when
    absent); ``queue_seen`` says whether either queue gauge was on the page at all;
    ``engine`` the spec the page was read by.
    """

    waiting: float = 0.0
    running: float = 0.0
    ttft: Histogram = Histogram()
    tpot: Histogram = Histogram()
    generation_tokens: float = 0.0
    model: str | None = None
    gpus: frozenset[int] | None = None
    queue_seen: bool = False
    kv_cache_usage: float | None = None
    engine: str = VLLM.name
    prompt_tokens: Histogram = Histogram()


def _histogram(buckets: dict[float, float], total: float | None,
               count: float | None) -> Histogram:
    bounds = tuple(sorted(buckets))
    counts = tuple(buckets[b] for b in bounds)
    if count is None:  # _count is the +Inf bucket's count
        count = counts[-1] if counts and math.isinf(bounds[-1]) else 0.0
    return Histogram(bounds, counts, total or 0.0, count)


def _select(text: str, names: Iterable[str]) -> str:
    wanted = tuple(names)
    lines = [
        ln for ln in text.splitlines()
        if ln.startswith(wanted) or (ln.startswith("#") and any(w in ln for w in wanted))
    ]
    return "\n".join(lines) + "\n" if lines else ""


class _Page:
    """Samples of one page by family name: gauge sums, histogram buckets, KV maxima."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.maxima: dict[str, float] = {}
        self.buckets: dict[str, dict[float, float]] = {}
        self.models: set[str] = set()
        self.gpus: set[int] = set()

    def add(self, name: str, labels: dict[str, str], value: float) -> None:
        if name.endswith("_bucket"):
            h = self.buckets.setdefault(name[: -len("_bucket")], {})
            le = float(labels.get("le", "inf"))
            h[le] = h.get(le, 0.0) + value
        elif name == GPU_INFO:
            if value > 0:
                self.gpus.update(int(p) for p in str(labels.get("gpu", "")).split(",")
                                 if p.strip().isdigit())
            return
        else:
            v = max(value, 0.0)
            self.sums[name] = self.sums.get(name, 0.0) + v
            self.maxima[name] = max(self.maxima.get(name, 0.0), v)
        if MODEL_LABEL in labels:
            self.models.add(labels[MODEL_LABEL])

    def first(self, names: tuple[str, ...], table: dict[str, float]) -> float | None:
        for n in names:
            if n in table:
                return table[n]
        return None

    def histogram(self, names: tuple[str, ...]) -> Histogram:
        for n in names:
            if n in self.buckets:
                return _histogram(self.buckets[n], self.sums.get(f"{n}_sum"),
                                  self.sums.get(f"{n}_count"))
        return Histogram()


def parse_engine_metrics(text: str, only: Iterable[str] | None = None,
                         spec: EngineMetricSpec | None = None) -> EngineSample:
    """Read the engine metrics out of a Prometheus text exposition (rules above) by
    ``spec`` (auto-detected from the page when None); ``only``: parse just these
    families. ValueError if the text is not valid."""
    spec = spec or detect_engine(text)
    if only is not None:
        text = _select(text, only)
    page = _Page()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            value = float(s.value)
            if not math.isnan(value):
                page.add(s.name, s.labels, value)
    waiting = page.first(spec.waiting, page.sums)
    running = page.first(spec.running, page.sums)
    kv = page.first(spec.kv_cache, page.maxima)
    return EngineSample(
        waiting=waiting or 0.0,
        running=running or 0.0,
        ttft=page.histogram(spec.ttft),
        tpot=page.histogram(spec.itl),
        generation_tokens=page.first(spec.generation_tokens, page.sums) or 0.0,
        model=sorted(page.models)[0] if page.models else None,
        gpus=frozenset(page.gpus) if page.gpus else None,
        queue_seen=waiting is not None or running is not None,
        kv_cache_usage=None if kv is None else min(kv, 1.0),
        engine=spec.name,
        prompt_tokens=page.histogram(spec.prompt_tokens),
    )


def parse_queue_sample(text: str, spec: EngineMetricSpec | None = None
                       ) -> EngineSample | None:
    """An engine's queue (waiting, running requests; KV-cache usage) from its page; None
    when neither queue gauge is on it or the page is not valid Prometheus text."""
    try:
        sample = parse_engine_metrics(text, only=QUEUE_METRICS, spec=spec)
    except ValueError:
        return None
    return sample if sample.queue_seen else None


def parse_queue(text: str, spec: EngineMetricSpec | None = None
                ) -> tuple[float, float] | None:
    """(waiting, running) requests of an engine's page (:func:`parse_queue_sample`)."""
    sample = parse_queue_sample(text, spec)
    return None if sample is None else (sample.waiting, sample.running)


def parse_pod_energy(text: str) -> dict[str, float]:
    """Cumulative GPU energy per serving pod (``namespace/name`` -> joules) from a node
    agent's or DCGM exporter's page (:data:`GPU_ENERGY_COUNTERS`), summed over the pod's
    GPUs; GPUs no pod holds are left out. The first counter family on the page is read
    (both would count the same GPUs twice). ValueError if the text is not valid."""
    for family_name, to_joules in GPU_ENERGY_COUNTERS:
        if family_name not in text:
            continue
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(_select(text, (family_name,))):
            for s in family.samples:
                pod, ns = s.labels.get("pod", ""), s.labels.get("namespace", "")
                value = float(s.value)
                if not pod or not ns or math.isnan(value) or value < 0:
                    continue
                key = f"{ns}/{pod}"
                out[key] = out.get(key, 0.0) + value * to_joules
        return out
    return {}
