"""Request tiers and classes: how a request is labelled before it is scheduled.

Classes follow FREESH: prompt short/long x response short/long ("SS", "SL",
"LS", "LL"). The response boundary defaults to FREESH's 444 tokens; the
prompt boundary default (1024 tokens, about the Azure conversation trace's
median prompt) is an assumption, and both are configurable.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import overload

import numpy as np
import numpy.typing as npt

from joulepool.core.estimators import histogram_quantile


class Tier(StrEnum):
    """JouleSched tiers: interactive keeps its deadline; bulk goes to the cheapest joules."""

    INTERACTIVE = "interactive"
    BULK = "bulk"


CLASS_NAMES: tuple[str, ...] = ("SS", "SL", "LS", "LL")

# FREESH's planning cadence (defaults of EnergyPolicy, the planner and the simulator)
#: pools are re-planned every 30 min ...
PLAN_INTERVAL_S = 1800.0
#: ... over a window of 6 steps of 5 min
PLAN_STEP_S = 300.0
PLAN_WINDOW_STEPS = 6
#: demand headroom: plan for alpha x the forecast
PLAN_ALPHA = 1.1


@dataclass(frozen=True)
class ClassBoundaries:
    """Token counts at which a prompt or a response counts as long (inclusive)."""

    prompt_tokens: int = 1024
    response_tokens: int = 444

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.response_tokens < 1:
            raise ValueError("class boundaries must be >= 1 token")

    def classify(self, input_tokens: int, output_tokens: int) -> str:
        """Class name of one request, e.g. ``"LS"`` for a long prompt, short answer."""
        p = "L" if input_tokens >= self.prompt_tokens else "S"
        r = "L" if output_tokens >= self.response_tokens else "S"
        return p + r

    def classify_many(
        self, input_tokens: npt.ArrayLike, output_tokens: npt.ArrayLike
    ) -> npt.NDArray[np.int64]:
        """Index into :data:`CLASS_NAMES` for each request (vectorised)."""
        long_p = np.asarray(input_tokens) >= self.prompt_tokens
        long_r = np.asarray(output_tokens) >= self.response_tokens
        return np.asarray(long_p.astype(np.int64) * 2 + long_r.astype(np.int64))


#: points of a :class:`PromptLengths` (each stands for 1/N of the class's prompts)
PROMPT_LENGTH_POINTS = 1000


@dataclass(frozen=True)
class PromptLengths:
    """A class's prompt-length distribution as the planner needs it, in tokens.

    ``tokens[k]`` is the quantile at probability (k + 1/2) / N, N = ``len(tokens)``,
    ascending: N equally likely prompts, so a share of prompts is a count of points
    over N (to 1/N). Built from measured prompts (:meth:`from_samples`, the simulator's
    trace of the class) or from declared quantiles (:meth:`from_quantiles`, an
    InferencePool's).
    """

    tokens: tuple[float, ...]

    def __post_init__(self) -> None:
        arr = np.asarray(self.tokens, dtype=np.float64)
        if arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr < 0):
            raise ValueError("prompt lengths must be finite, >= 0 and not empty")
        if np.any(np.diff(arr) < 0):
            raise ValueError("prompt-length quantiles must be ascending")

    @classmethod
    def from_samples(cls, prompt_tokens: npt.ArrayLike,
                     points: int = PROMPT_LENGTH_POINTS) -> PromptLengths | None:
        """Quantiles of measured prompt lengths; None when there are none."""
        arr = np.asarray(prompt_tokens, dtype=np.float64).ravel()
        if arr.size == 0:
            return None
        q = np.quantile(arr, (np.arange(points) + 0.5) / points)
        return cls(tuple(float(v) for v in q))

    @classmethod
    def from_quantiles(cls, probabilities: npt.ArrayLike, tokens: npt.ArrayLike,
                       points: int = PROMPT_LENGTH_POINTS) -> PromptLengths:
        """The distribution a few declared quantiles describe (an InferencePool's
        ``demand.inputTokenQuantiles``): ``tokens[i]`` prompt tokens at probability
        ``probabilities[i]``, linear in between; below the lowest probability every
        prompt counts as that quantile's length and above the highest as that one's
        (so the shortest prompts are taken long, which can only overstate prefill
        work, and nothing beyond the highest declared quantile is invented).
        ValueError unless the probabilities ascend strictly within (0, 1] and the
        tokens are finite, > 0 and do not fall."""
        prob = np.asarray(probabilities, dtype=np.float64).ravel()
        toks = np.asarray(tokens, dtype=np.float64).ravel()
        if prob.size == 0 or prob.size != toks.size:
            raise ValueError("give one token count per quantile, at least one")
        if not np.all((prob > 0.0) & (prob <= 1.0)) or np.any(np.diff(prob) <= 0.0):
            raise ValueError("quantiles must ascend strictly within (0, 1]")
        if not np.all(np.isfinite(toks)) or np.any(toks <= 0.0) or np.any(np.diff(toks) < 0):
            raise ValueError("token counts must be finite, > 0 and not fall as the quantile "
                             "rises")
        at = (np.arange(points) + 0.5) / points
        return cls(tuple(float(v) for v in np.interp(at, prob, toks)))

    @classmethod
    def from_histogram(cls, bounds: npt.ArrayLike, cumulative: npt.ArrayLike,
                       points: int = PROMPT_LENGTH_POINTS) -> PromptLengths | None:
        """The distribution of an engine's prompt-length histogram: ``bounds`` the finite
        bucket upper bounds (ascending), ``cumulative`` the prompts at or below each, then
        the total. Each point is the histogram's quantile as PromQL reads it
        (:func:`joulepool.core.estimators.histogram_quantile`: linear inside a bucket, from
        0 in the first, the highest finite bound in the +Inf one). None when it counts no
        prompt. ValueError on a malformed histogram."""
        b = np.asarray(bounds, dtype=np.float64).ravel()
        c = np.asarray(cumulative, dtype=np.float64).ravel()
        if b.size == 0 or c.size != b.size + 1 or np.any(np.diff(b) <= 0) or b[0] <= 0 \
                or not np.all(np.isfinite(b)) or c[0] < 0 or np.any(np.diff(c) < 0):
            raise ValueError("a histogram needs ascending finite bounds > 0 and cumulative "
                             "counts, one per bound and the total")
        if float(c[-1]) <= 0:
            return None
        upper = [*b.tolist(), math.inf]
        counts = c.tolist()
        quantiles = (histogram_quantile((k + 0.5) / points, upper, counts)
                     for k in range(points))
        return cls(tuple(0.0 if v is None else v for v in quantiles))  # None: not with c[-1] > 0

    def longer(self, other: PromptLengths) -> PromptLengths:
        """At each probability the longer of the two prompt lengths (the distribution
        whose every quantile is the larger one); both must have the same points."""
        a, b = self.array(), other.array()
        if a.size != b.size:
            raise ValueError("prompt lengths with different numbers of points")
        return PromptLengths(tuple(float(v) for v in np.maximum(a, b)))

    def quantile(self, q: float) -> float:
        """Tokens at probability ``q`` (the nearest point)."""
        n = len(self.tokens)
        return self.tokens[min(max(int(q * n), 0), n - 1)]

    def array(self) -> npt.NDArray[np.float64]:
        return np.asarray(self.tokens, dtype=np.float64)


@dataclass(frozen=True)
class SLO:
    """Latency targets of a request class, in seconds."""

    ttft_s: float
    tpot_s: float
    deadline_s: float | None = None

    def __post_init__(self) -> None:
        if self.ttft_s <= 0 or self.tpot_s <= 0:
            raise ValueError("SLO targets must be positive")
        if self.deadline_s is not None and self.deadline_s <= 0:
            raise ValueError("deadline must be positive")

    @overload
    def deadline_for(self, output_tokens: float, slack_factor: float = 1.0) -> float: ...
    @overload
    def deadline_for(
        self, output_tokens: npt.NDArray[np.float64] | npt.NDArray[np.int64],
        slack_factor: float = 1.0,
    ) -> float | npt.NDArray[np.float64]: ...
    def deadline_for(
        self, output_tokens: float | npt.NDArray[np.float64] | npt.NDArray[np.int64],
        slack_factor: float = 1.0,
    ) -> float | npt.NDArray[np.float64]:
        """End-to-end deadline: explicit, or :func:`default_deadline` of this SLO."""
        if self.deadline_s is not None:
            return self.deadline_s
        return default_deadline(output_tokens, self.ttft_s, self.tpot_s, slack_factor)


@overload
def default_deadline(
    output_tokens: float, ttft_s: float, tpot_s: float, slack_factor: float = 1.0
) -> float: ...
@overload
def default_deadline(
    output_tokens: npt.NDArray[np.float64] | npt.NDArray[np.int64],
    ttft_s: float | npt.NDArray[np.float64],
    tpot_s: float | npt.NDArray[np.float64],
    slack_factor: float = 1.0,
) -> npt.NDArray[np.float64]: ...
def default_deadline(
    output_tokens: float | npt.NDArray[np.float64] | npt.NDArray[np.int64],
    ttft_s: float | npt.NDArray[np.float64],
    tpot_s: float | npt.NDArray[np.float64],
    slack_factor: float = 1.0,
) -> float | npt.NDArray[np.float64]:
    """FREESH's end-to-end deadline when none is given: k * (TTFT + tokens * TPOT).

    The one place this formula lives: scalars (the router) give a float,
    arrays (the simulator's workloads, elementwise) an array. Negative token counts
    count as 0.
    """
    if isinstance(output_tokens, np.ndarray) or isinstance(ttft_s, np.ndarray) or isinstance(
        tpot_s, np.ndarray
    ):
        tokens = np.maximum(np.asarray(output_tokens, dtype=np.float64), 0.0)
        return np.asarray(slack_factor * (ttft_s + tokens * tpot_s), dtype=np.float64)
    return slack_factor * (float(ttft_s) + max(float(output_tokens), 0.0) * float(tpot_s))


@dataclass(frozen=True)
class SLOSet:
    """Interactive-tier SLO targets of every request class, s: TTFT by prompt class
    (short/long), one TPOT for all classes. ``source`` says where the figures come from."""

    name: str
    ttft_short_prompt_s: float
    ttft_long_prompt_s: float
    tpot_s: float
    source: str

    def __post_init__(self) -> None:
        if min(self.ttft_short_prompt_s, self.ttft_long_prompt_s, self.tpot_s) <= 0:
            raise ValueError("SLO targets must be positive")

    def for_class(self, class_name: str) -> SLO:
        """The SLO of a class name of :data:`CLASS_NAMES` (e.g. ``"LS"``)."""
        if class_name not in CLASS_NAMES:
            raise ValueError(
                f"unknown request class {class_name!r}; expected one of {CLASS_NAMES}")
        long_prompt = class_name[0] == "L"
        return SLO(ttft_s=self.ttft_long_prompt_s if long_prompt else self.ttft_short_prompt_s,
                   tpot_s=self.tpot_s)

    def describe(self) -> str:
        return (f"{self.name}: TTFT {1e3 * self.ttft_short_prompt_s:.0f} ms (short prompt) / "
                f"{1e3 * self.ttft_long_prompt_s:.0f} ms (long), TPOT {1e3 * self.tpot_s:.0f} ms")


#: FREESH's SLO bounds: TTFT 300 ms (short prompt) / 600 ms (long), TBT 150 ms
FREESH_SLOS = SLOSet("freesh", 0.3, 0.6, 0.15, "FREESH's per-class bounds")
#: an interactive chat service: 50 ms per output token (20 tokens/s, faster than people
#: read), FREESH's TTFT kept so the two sets differ in TPOT alone (docs/simulator.md)
INTERACTIVE_SLOS = SLOSet(
    "interactive", 0.3, 0.6, 0.05,
    "TPOT 50 ms (issue 11's interactive set; MLPerf Inference v5.0's interactive "
    "Llama-2-70B scenario bounds p99 TPOT at 40 ms); TTFT kept at FREESH's 300/600 ms "
    "(that scenario's p99 TTFT bound, 450 ms, lies between them)")
SLO_SETS: dict[str, SLOSet] = {s.name: s for s in (FREESH_SLOS, INTERACTIVE_SLOS)}


def slo_set(name: str) -> SLOSet:
    """The named SLO set of :data:`SLO_SETS` (ValueError naming the known ones)."""
    try:
        return SLO_SETS[name]
    except KeyError:
        raise ValueError(f"unknown SLO set {name!r}; known: {', '.join(SLO_SETS)}") from None


def freesh_slo(class_name: str) -> SLO:
    """FREESH's SLO bounds: TTFT 300 ms (short prompt) / 600 ms (long), TBT 150 ms."""
    return FREESH_SLOS.for_class(class_name)


@dataclass(frozen=True)
class StreamMix:
    """The requests a serving instance receives, as its batch rooms are sized at them
    (core.routing.EndpointModel's ``serving``): their rate (requests/s), mean prompt and
    mean response (tokens), the mean TTFT SLO of the interactive ones and their tightest
    TPOT SLO (s). ``bulk``: none of them is interactive (then all of them set the SLOs)."""

    requests_per_second: float
    mean_input_tokens: float
    mean_output_tokens: float
    ttft_s: float
    tpot_s: float
    bulk: bool = False

    @property
    def serving(self) -> tuple[float, float, float]:
        """(mean prompt, mean response, TTFT s): EndpointModel.from_profile's ``serving``."""
        return self.mean_input_tokens, self.mean_output_tokens, self.ttft_s


def merged_stream(parts: Sequence[StreamMix]) -> StreamMix:
    """The stream of an instance serving the requests of every part (a shared instance
    serves several pools): the mean prompt and mean response over all their requests
    (means weighted by rate; equal weights when no part has a positive rate), the
    rate-weighted mean TTFT and the tightest TPOT of the interactive parts (of all parts
    when none is interactive). The simulator sizes an instance at the same figures, taken
    over the requests it serves (sim.engine.Simulator._sustainable_batch)."""
    if not parts:
        raise ValueError("a stream needs at least one part")
    if len(parts) == 1:
        return parts[0]
    rates = [max(p.requests_per_second, 0.0) for p in parts]
    weights = rates if sum(rates) > 0.0 else [1.0] * len(parts)

    def mean(values: Iterable[float], w: Sequence[float]) -> float:
        return math.fsum(v * x for v, x in zip(values, w, strict=True)) / math.fsum(w)

    slo = [i for i, p in enumerate(parts) if not p.bulk] or list(range(len(parts)))
    slo_w = [weights[i] for i in slo]
    if math.fsum(slo_w) <= 0.0:
        slo_w = [1.0] * len(slo)
    return StreamMix(
        math.fsum(rates),
        mean((p.mean_input_tokens for p in parts), weights),
        mean((p.mean_output_tokens for p in parts), weights),
        mean((parts[i].ttft_s for i in slo), slo_w),
        min(parts[i].tpot_s for i in slo),
        bulk=all(p.bulk for p in parts),
    )
