"""From a trace to the requests a run serves: arrivals, tokens, tiers, classes, SLOs.

Arrivals either replay the trace as is, or follow a non-homogeneous Poisson
process whose rate is the trace's per-minute rate shape times a constant, so
the load can be scaled while the minute-to-minute shape is kept. Token pairs
(prompt, response) are resampled jointly from the trace, which keeps their
joint distribution.

Workload categories follow JouleSched's mix (64 % chat, 28 % RAG, 8 % batch):
the Azure trace has no such label, so the mapping is ours and printed with
every run: ``batch`` is a seeded random share (tier ``bulk``); ``RAG`` are the
requests with the longest prompts (retrieved context makes prompts long); the
rest is ``chat``. Classes are FREESH's prompt short/long x response
short/long from :class:`~joulepool.core.classes.ClassBoundaries`, on the
*predicted* response length (a router cannot see the true one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from joulepool.core.classes import (
    CLASS_NAMES,
    FREESH_SLOS,
    SLO,
    ClassBoundaries,
    SLOSet,
    Tier,
)
from joulepool.sim.trace import MAX_SPAN_S, Trace

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

CATEGORIES = ("chat", "rag", "batch")
#: JouleSched section 4: 64 % chat (interactive), 28 % RAG (interactive), 8 % batch (bulk)
DEFAULT_MIX = (0.64, 0.28, 0.08)
#: JouleSched section 7: a prefix-conditioned length predictor with 12 % MAE
DEFAULT_PREDICTOR_MAE = 0.12
#: assumed: bulk requests accept 10x the interactive TTFT, TPOT and deadline
DEFAULT_BULK_SLACK = 10.0

ArrivalMode = Literal["replay", "scale", "rate"]


@dataclass(frozen=True)
class Workload:
    """Requests sorted by arrival; every array has one entry per request."""

    arrival_s: FloatArray
    input_tokens: IntArray
    output_tokens: IntArray
    predicted_tokens: IntArray  # what routers, classes and LLF see
    category: IntArray  # index into CATEGORIES
    bulk: BoolArray  # tier: True = bulk, False = interactive
    cls: IntArray  # index into CLASS_NAMES (on predicted tokens)
    ttft_slo_s: FloatArray
    tpot_slo_s: FloatArray
    deadline_s: FloatArray  # relative to arrival, from the true response length
    duration_s: float
    scale: float  # arrival rate / trace rate
    description: tuple[str, ...] = field(default=())
    #: expected arrivals/s in each minute of the run (the NHPP's rate, minute k from 60 k s);
    #: None when arrivals replay a trace: then only the realised arrivals are known
    minute_rate_rps: FloatArray | None = None
    #: the SLO set behind ttft_slo_s, tpot_slo_s and deadline_s (interactive tier; bulk
    #: requests have it times the bulk slack); the planner and the floor read it too
    slos: SLOSet = FREESH_SLOS

    @property
    def requests(self) -> int:
        return int(self.arrival_s.size)

    @property
    def mean_rate_rps(self) -> float:
        return self.requests / self.duration_s

    def class_means(self) -> tuple[FloatArray, FloatArray]:
        """Mean prompt and predicted response tokens per class (0 where a class is empty)."""
        n = len(CLASS_NAMES)
        counts = np.bincount(self.cls, minlength=n).astype(np.float64)
        inp = np.bincount(self.cls, weights=self.input_tokens, minlength=n)
        out = np.bincount(self.cls, weights=self.predicted_tokens, minlength=n)
        safe = np.maximum(counts, 1.0)
        return np.asarray(inp / safe), np.asarray(out / safe)

    def tier_of(self, i: int) -> Tier:
        return Tier.BULK if bool(self.bulk[i]) else Tier.INTERACTIVE


def predictor_sigma(mae: float) -> float:
    """sigma of lognormal noise exp(N(0, sigma^2)) whose mean absolute relative error is ``mae``.

    E|e^Z - 1| = e^(sigma^2/2) * (2 Phi(sigma) - 1), solved for sigma.
    """
    from scipy import optimize, stats

    if mae < 0:
        raise ValueError("predictor MAE must be >= 0")
    if mae == 0:
        return 0.0

    def err(s: float) -> float:
        return float(math.exp(s * s / 2) * (2 * stats.norm.cdf(s) - 1) - mae)

    return float(optimize.brentq(err, 1e-9, 10.0))


def minute_intensity(trace: Trace, duration_s: float, scale: float) -> FloatArray:
    """The NHPP's rate in each minute of a run: ``scale * trace_rate[k mod M]``, req/s."""
    shape = trace.minute_rates_rps()
    n_min = math.ceil(duration_s / 60.0)
    return np.asarray(scale * shape[np.arange(n_min) % shape.size], dtype=np.float64)


def _nhpp_arrivals(
    trace: Trace, duration_s: float, scale: float, rng: np.random.Generator
) -> FloatArray:
    """Piecewise-constant NHPP: minute k has rate ``scale * trace_rate[k mod M]``."""
    rates = minute_intensity(trace, duration_s, scale)
    starts = 60.0 * np.arange(rates.size)
    lengths = np.minimum(60.0, duration_s - starts)
    counts = rng.poisson(rates * lengths)
    t = np.repeat(starts, counts) + rng.random(int(counts.sum())) * np.repeat(lengths, counts)
    t.sort(kind="stable")
    return np.asarray(t, dtype=np.float64)


def mean_shape_rate(trace: Trace, duration_s: float) -> float:
    """Mean of the trace's per-minute rate over the minutes a run of ``duration_s`` uses."""
    shape = trace.minute_rates_rps()
    n_min = math.ceil(duration_s / 60.0)
    starts = 60.0 * np.arange(n_min)
    lengths = np.minimum(60.0, duration_s - starts)
    return float(np.sum(shape[np.arange(n_min) % shape.size] * lengths) / duration_s)


def _check_workload_args(
    duration_s: float, mix: tuple[float, float, float], bulk_slack: float
) -> None:
    if not 0 < duration_s <= MAX_SPAN_S:
        raise ValueError(f"duration must be positive and at most {MAX_SPAN_S // 86400} days "
                         f"({MAX_SPAN_S} s), got {duration_s:g} s")
    if len(mix) != 3 or any(x < 0 for x in mix) or not math.isclose(sum(mix), 1.0, abs_tol=1e-6):
        raise ValueError("mix must be three non-negative shares (chat, RAG, batch) summing to 1")
    if mix[2] >= 1.0:
        raise ValueError("the batch share must be below 1")
    if bulk_slack < 1:
        raise ValueError("bulk slack must be >= 1")


def _arrivals(
    trace: Trace, duration_s: float, mode: ArrivalMode, value: float, rng: np.random.Generator
) -> tuple[FloatArray, IntArray, float, str]:
    """(arrival times s, index of each request's trace row, scale, description)."""
    if mode == "replay":
        span = trace.span_s
        loops = math.ceil(duration_s / span)
        t = np.concatenate([trace.arrival_s + k * span for k in range(loops)])
        idx = np.tile(np.arange(trace.requests), loops)
        keep = t < duration_s
        return t[keep], idx[keep], 1.0, (
            f"arrivals: trace replayed as is ({trace.name}, {trace.requests} requests over "
            f"{span / 60:.1f} min{', looped' if loops > 1 else ''}); scale x1"
        )
    base_rate = mean_shape_rate(trace, duration_s)
    if mode == "scale":
        scale = float(value)
    elif mode == "rate":
        scale = float(value) / base_rate
    else:
        raise ValueError(f"unknown arrival mode {mode!r}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError("the arrival scale must be positive")
    arrival = _nhpp_arrivals(trace, duration_s, scale, rng)
    idx = rng.integers(0, trace.requests, size=arrival.size)
    return arrival, idx, scale, (
        f"arrivals: non-homogeneous Poisson, per-minute rate shape of {trace.name} x "
        f"{scale:.2f} (trace mean {base_rate:.2f} req/s over these minutes -> "
        f"{scale * base_rate:.1f} req/s); (prompt, response) tokens resampled jointly"
    )


def _slo_columns(
    cls: IntArray, is_batch: npt.NDArray[np.bool_], out: IntArray, bulk_slack: float,
    slos: SLOSet = FREESH_SLOS,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Per request: the TTFT and TPOT of ``slos`` for its class (x ``bulk_slack`` for
    bulk) and its deadline, s."""
    n = cls.size
    ttft = np.empty(n)
    tpot = np.empty(n)
    deadline = np.empty(n)
    for ci, name in enumerate(CLASS_NAMES):
        base = slos.for_class(name)
        for bulk in (False, True):
            k = bulk_slack if bulk else 1.0
            slo = SLO(ttft_s=base.ttft_s * k, tpot_s=base.tpot_s * k)
            sel = (cls == ci) & (is_batch == bulk)
            ttft[sel] = slo.ttft_s
            tpot[sel] = slo.tpot_s
            deadline[sel] = slo.deadline_for(out[sel])
    return ttft, tpot, deadline


def _mix_text(category: IntArray, batch_share: float, rag_threshold: float,
              rag_of_rest: float) -> str:
    shares = np.bincount(category, minlength=3) / max(category.size, 1)
    return (
        "tiers: chat {:.1f} % / RAG {:.1f} % / batch {:.1f} % (batch = seeded random {:.0f} %, "
        "tier bulk; RAG = prompt >= {} tokens, the trace's longest {:.0f} % of the rest; "
        "chat = the rest; chat and RAG are tier interactive)".format(
            100 * shares[0], 100 * shares[1], 100 * shares[2], 100 * batch_share,
            "inf" if math.isinf(rag_threshold) else f"{rag_threshold:.0f}", 100 * rag_of_rest,
        )
    )


def _classes_text(cls: IntArray, bounds: ClassBoundaries, predictor_mae: float) -> str:
    cshares = np.bincount(cls, minlength=4) / max(cls.size, 1)
    return (
        "classes (FREESH, on predicted response): "
        + ", ".join(f"{c} {100 * s:.1f} %" for c, s in zip(CLASS_NAMES, cshares, strict=True))
        + f"; long prompt >= {bounds.prompt_tokens}, long response >= {bounds.response_tokens} "
        f"tokens; response predictor MAE {100 * predictor_mae:.0f} % (lognormal noise)"
    )


def build_workload(
    trace: Trace,
    duration_s: float,
    *,
    mode: ArrivalMode = "scale",
    value: float = 1.0,
    seed: int = 0,
    mix: tuple[float, float, float] = DEFAULT_MIX,
    predictor_mae: float = DEFAULT_PREDICTOR_MAE,
    bulk_slack: float = DEFAULT_BULK_SLACK,
    boundaries: ClassBoundaries | None = None,
    slos: SLOSet = FREESH_SLOS,
) -> Workload:
    """Requests for one run.

    ``mode``: ``replay`` (trace timestamps, looped if the run is longer;
    ``value`` ignored), ``scale`` (NHPP at ``value`` x the trace's rate shape)
    or ``rate`` (NHPP scaled to a mean of ``value`` req/s over the run). ``slos``:
    the interactive tier's TTFT/TPOT targets per class (deadline = TTFT + tokens x TPOT).
    """
    _check_workload_args(duration_s, mix, bulk_slack)
    bounds = boundaries or ClassBoundaries()
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x6A6F756C]))
    arrival, idx, scale, arrivals_text = _arrivals(trace, duration_s, mode, value, rng)
    n = int(arrival.size)
    inp = trace.input_tokens[idx].astype(np.int64)
    out = trace.output_tokens[idx].astype(np.int64)

    sigma = predictor_sigma(predictor_mae)
    noise = np.exp(rng.normal(0.0, sigma, size=n)) if sigma > 0 else np.ones(n)
    pred = np.maximum(1, np.rint(out * noise)).astype(np.int64)

    _chat_share, rag_share, batch_share = mix
    is_batch = rng.random(n) < batch_share
    rag_of_rest = rag_share / (1.0 - batch_share) if batch_share < 1 else 0.0
    if rag_of_rest <= 0:
        rag_threshold = math.inf
    else:
        rag_threshold = float(np.quantile(trace.input_tokens, max(0.0, 1.0 - rag_of_rest)))
    is_rag = ~is_batch & (inp >= rag_threshold)
    category = np.where(is_batch, 2, np.where(is_rag, 1, 0)).astype(np.int64)
    cls = bounds.classify_many(inp, pred).astype(np.int64)
    ttft, tpot, deadline = _slo_columns(cls, is_batch, out, bulk_slack, slos)
    desc = [
        arrivals_text,
        _mix_text(category, batch_share, rag_threshold, rag_of_rest),
        _classes_text(cls, bounds, predictor_mae),
        f"SLOs {slos.describe()}; deadline = TTFT + tokens x TPOT; bulk x{bulk_slack:g} on "
        "all three",
    ]
    return Workload(
        arrival_s=np.asarray(arrival, dtype=np.float64),
        input_tokens=inp,
        output_tokens=out,
        predicted_tokens=pred,
        category=category,
        bulk=np.asarray(is_batch, dtype=np.bool_),
        cls=cls,
        ttft_slo_s=ttft,
        tpot_slo_s=tpot,
        deadline_s=deadline,
        duration_s=float(duration_s),
        scale=float(scale),
        description=tuple(desc),
        minute_rate_rps=None if mode == "replay" else minute_intensity(trace, duration_s, scale),
        slos=slos,
    )
