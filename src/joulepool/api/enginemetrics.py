"""The one parser of a serving engine's Prometheus page (vLLM names, :mod:`api.vllm`).

The routing service reads the queue gauges of every engine; the node agent
reads those, the TTFT / TPOT histograms, the generated-token counter, the
model and the GPUs. Both call :func:`parse_engine_metrics`, so both read a
page by the same rules:

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

from joulepool.api.vllm import GENERATION_TOKENS, RUNNING, TPOT, TTFT, WAITING

#: joulepool's own engine info gauge: ``{gpu="0,3"} 1`` names the GPUs an engine uses
#: (the fake engine exports it from the device plugin's assignment)
GPU_INFO = "joulepool_engine_gpu_info"
#: the label vLLM puts the served model's name in
MODEL_LABEL = "model_name"
#: the families the router needs (waiting and running requests)
QUEUE_METRICS = (WAITING, RUNNING)


@dataclass(frozen=True)
class Histogram:
    """A cumulative histogram: upper bounds (s) and counts, summed over label sets."""

    bounds: tuple[float, ...] = ()
    counts: tuple[float, ...] = ()


@dataclass(frozen=True)
class EngineSample:
    """One scrape of an engine, cumulative counters as exported.

    ``waiting`` and ``running`` are request counts, ``generation_tokens`` the output
    tokens generated since the engine started; ``queue_seen`` says whether either
    queue gauge was on the page at all.
    """

    waiting: float = 0.0
    running: float = 0.0
    ttft: Histogram = Histogram()
    tpot: Histogram = Histogram()
    generation_tokens: float = 0.0
    model: str | None = None
    gpus: frozenset[int] | None = None
    queue_seen: bool = False


def _histogram(buckets: dict[float, float]) -> Histogram:
    bounds = tuple(sorted(buckets))
    return Histogram(bounds, tuple(buckets[b] for b in bounds))


def _select(text: str, names: Iterable[str]) -> str:
    wanted = tuple(names)
    lines = [
        ln for ln in text.splitlines()
        if ln.startswith(wanted) or (ln.startswith("#") and any(w in ln for w in wanted))
    ]
    return "\n".join(lines) + "\n" if lines else ""


def parse_engine_metrics(text: str, only: Iterable[str] | None = None) -> EngineSample:
    """Read the engine metrics out of a Prometheus text exposition (rules above);
    ``only``: parse just these families. ValueError if the text is not valid."""
    if only is not None:
        text = _select(text, only)
    gauges = {WAITING: 0.0, RUNNING: 0.0, GENERATION_TOKENS: 0.0}
    buckets: dict[str, dict[float, float]] = {TTFT: {}, TPOT: {}}
    models: set[str] = set()
    gpus: set[int] = set()
    queue_seen = False
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name, labels, value = s.name, s.labels, float(s.value)
            if math.isnan(value):
                continue
            if name in gauges:
                gauges[name] += max(value, 0.0)
                queue_seen = queue_seen or name in QUEUE_METRICS
            elif name.endswith("_bucket") and name[: -len("_bucket")] in buckets:
                le = float(labels.get("le", "inf"))
                h = buckets[name[: -len("_bucket")]]
                h[le] = h.get(le, 0.0) + value
            elif name == GPU_INFO and value > 0:
                gpus.update(int(p) for p in str(labels.get("gpu", "")).split(",")
                            if p.strip().isdigit())
            else:
                continue
            if MODEL_LABEL in labels:
                models.add(labels[MODEL_LABEL])
    return EngineSample(
        waiting=gauges[WAITING],
        running=gauges[RUNNING],
        ttft=_histogram(buckets[TTFT]),
        tpot=_histogram(buckets[TPOT]),
        generation_tokens=gauges[GENERATION_TOKENS],
        model=sorted(models)[0] if models else None,
        gpus=frozenset(gpus) if gpus else None,
        queue_seen=queue_seen,
    )


def parse_queue(text: str) -> tuple[float, float] | None:
    """(waiting, running) requests of an engine's page; None when neither gauge is on
    it or the page is not valid Prometheus text."""
    try:
        sample = parse_engine_metrics(text, only=QUEUE_METRICS)
    except ValueError:
        return None
    return (sample.waiting, sample.running) if sample.queue_seen else None
