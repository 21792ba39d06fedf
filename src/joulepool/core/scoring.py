"""Endpoint picking as small plugins registered by name: Filter, Scorer, Picker.

Modelled on the Gateway API Inference Extension's endpoint-picker framework
(one interface per extension point, each plugin small, a scheduling profile
that runs filters, then weighted scorers, then one picker). joulepool's
scores are *costs*: lower is better (the JouleSched cost is in joules), and a
NaN or infinite cost means the endpoint cannot serve the request.

Every plugin sees the same two inputs, whatever it reads from them:

* :class:`RequestInfo`: the request's numbers (tokens, prompt, deadline,
  effective lambda);
* :class:`EndpointState`: one row per endpoint of the pool, one column per
  quantity (numpy arrays the caller owns and updates in place: the router's
  state machine :mod:`joulepool.core.router` and the simulator both keep one).

So a new term (e.g. the KV-cache usage an engine reports) is a new scorer
reading columns that are already there (``running``, ``clock_mhz``,
``kv_cache_usage``, ``models``) or a new entry of ``extra``; the signature
``score(request, endpoints) -> Scores`` does not change.

Registered names (:data:`SCORERS`, :data:`PICKERS`, :data:`PROFILES`):

    filters   kv-cache      off engines whose KV cache is >= 95 % full (while others are not)
    scorers   joulesched    core.routing's rule: marginal joules + lambda * late (ETA tie-break)
              least-loaded  (outstanding requests + 1) / req/s the endpoint sustains
    pickers   lowest-cost   lowest cost, then lowest ETA, then lowest index
              round-robin   the next endpoint in turn, ignoring scores
    profiles  joulesched, least-loaded (each with the kv-cache filter), round-robin: one
              scorer (or none) + one picker

A profile object holds its plugins' state (round-robin's turn): make one per
pool with :func:`routing_profile`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from joulepool.core.cost import CostBreakdown, Scratch
from joulepool.core.routing import (
    delays_tighter_ttft,
    first_token_s,
    overflow_rank,
    rank_endpoints,
    score_endpoints,
    slo_infeasible,
)

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


class RequestInfo(NamedTuple):
    """What the plugins know about one request (units in each field's name)."""

    tokens: float  #: t_r: JouleSched's token estimate (output + input weight x prompt)
    input_tokens: float  #: prompt tokens
    output_tokens: float  #: predicted output tokens
    deadline_s: float  #: end-to-end deadline, s from arrival
    lam: float  #: effective lambda (the tier's), J per s of lateness
    hard_deadline: bool = False  #: rank endpoints predicted on time before late ones
    ttft_slo_s: float = math.inf  #: time-to-first-token SLO, s (inf: none)


class EndpointState:
    """A pool's endpoints as columns: row ``i`` is endpoint ``i`` in the caller's order.

    Columns every caller fills (arrays of length ``n``):

    ``eps_j_per_token``  eps_n, marginal decode J per output token of joining now
                         (core.routing's rule; online scale in; on a carbon-objective
                         cluster this and the two below x the site's carbon weight,
                         core.routing.carbon_weights)
    ``prefill_j_per_token`` pi_n, J above idle per prompt token prefilled
    ``wake_j_per_token`` X_n(1), J above idle of a decode step at batch 1: what each
                         output token beyond the running batch's costs
    ``batch_left_tokens`` R_n, decode steps the requests in flight have left (0: idle;
                         inf where unknown: every output token at eps_n)
    ``tps``              mu_n, decode tokens/s at the operating batch
    ``prefill_weight``   w_n, decode tokens forgone per prompt token prefilled
    ``queue_tokens``     q_n, decode tokens ahead + w_n x prompt tokens ahead
    ``outstanding``      requests routed there and not finished
    ``inv_capacity``     1 / requests per second it sustains (1 where unknown)

    Columns a caller fills when it knows them (NaN otherwise), for scorers to come:

    ``running``          requests in the engine's batch now
    ``waiting``          requests waiting for admission now
    ``clock_mhz``        the GPU's SM clock now
    ``kv_cache_usage``   fraction of the engine's KV cache in use, 0..1
    ``prefill_wait_s``   s before a new request's prefill could start, and
    ``prefill_step_s``   the decode step time and
    ``prefill_chunk_tokens`` prompt tokens per step its prefill would then run at
                         (core.routing.prefill_queue; 0, 0, inf where unknown: the
                         first token is the prompt's prefill time)
    ``prefill_s_per_token`` s per prompt token prefilled (0 where unknown)
    ``batch_room``       requests it can still take within its operating batch
                         (inf where unknown)
    ``tpot_batch``       requests it carries at once within TPOT whatever the first
                         token (inf where unknown; core.routing.overflow_rank)
    ``shared_ttft_s``    on a guest's copy of a shared instance (its home is another
                         pool), the tightest TTFT SLO, s, of the other pools it serves;
                         inf on the pool's own endpoints (the default); a late request
                         with a looser TTFT ranks it after the others
                         (core.routing.overflow_rank)

    ``models`` (per-endpoint serving profiles, e.g. :class:`core.routing.EndpointModel`)
    and ``extra`` (named columns of plugins not listed here) are free for new scorers.

    ``scratch`` (:class:`core.cost.Scratch` of length ``n``) is where the joulesched
    scorer writes its terms: the arrays of its :class:`Scores` are valid until the next
    ``score`` on the same state.

    Scorers and filters read the columns and must not write into them: a caller may
    keep them from one decision to the next (the router's ``batch_room`` and
    ``batch_left_tokens`` are read-only views of what it keeps).
    """

    __slots__ = (
        "batch_left_tokens", "batch_room", "clock_mhz", "eps_j_per_token", "extra",
        "inv_capacity", "kv_cache_usage", "models", "outstanding", "prefill_chunk_tokens",
        "prefill_j_per_token", "prefill_s_per_token", "prefill_step_s", "prefill_wait_s",
        "prefill_weight", "queue_tokens", "running", "scratch", "shared_ttft_s",
        "tpot_batch", "tps", "waiting", "wake_j_per_token",
    )

    def __init__(self, n: int) -> None:
        self.eps_j_per_token: FloatArray = np.zeros(n)
        self.prefill_j_per_token: FloatArray = np.zeros(n)
        self.wake_j_per_token: FloatArray = np.zeros(n)
        self.batch_left_tokens: FloatArray = np.full(n, np.inf)
        self.tps: FloatArray = np.zeros(n)
        self.prefill_weight: FloatArray = np.zeros(n)
        self.queue_tokens: FloatArray = np.zeros(n)
        self.outstanding: FloatArray = np.zeros(n)
        self.inv_capacity: FloatArray = np.ones(n)
        self.running: FloatArray = np.full(n, np.nan)
        self.waiting: FloatArray = np.full(n, np.nan)
        self.clock_mhz: FloatArray = np.full(n, np.nan)
        self.kv_cache_usage: FloatArray = np.full(n, np.nan)
        self.prefill_wait_s: FloatArray = np.zeros(n)
        self.prefill_step_s: FloatArray = np.zeros(n)
        self.prefill_chunk_tokens: FloatArray = np.full(n, np.inf)
        self.prefill_s_per_token: FloatArray = np.zeros(n)
        self.batch_room: FloatArray = np.full(n, np.inf)
        self.tpot_batch: FloatArray = np.full(n, np.inf)
        self.shared_ttft_s: FloatArray = np.full(n, np.inf)
        self.models: Sequence[Any] = ()
        self.extra: dict[str, FloatArray] = {}
        self.scratch = Scratch(n)

    def __len__(self) -> int:
        return int(self.tps.size)


class Scores(NamedTuple):
    """A scorer's verdict: ``cost`` per endpoint (lower is better; NaN/inf: cannot serve),
    ``eta_s`` the tie-break among equal costs (None: index order), the JouleSched
    terms where the scorer computed them (for the decision's explanation),
    ``late``: endpoints predicted to break the request's SLO, ranked after the rest
    (None: no prediction), ``first_token_s``, the predicted delay to the first
    token, by which the late ones rank (soonest first), and ``overflow``
    (:func:`~joulepool.core.routing.overflow_rank`), by which they rank before that."""

    cost: FloatArray
    eta_s: FloatArray | None = None
    breakdown: CostBreakdown | None = None
    late: BoolArray | None = None
    first_token_s: FloatArray | None = None
    overflow: FloatArray | None = None


class Filter(Protocol):
    """Endpoints a request may go to: a boolean mask, or None for all of them."""

    name: ClassVar[str]

    def filter(self, request: RequestInfo, endpoints: EndpointState) -> BoolArray | None: ...


class Scorer(Protocol):
    """Cost of the request on every endpoint; the one signature every scorer has."""

    name: ClassVar[str]

    def score(self, request: RequestInfo, endpoints: EndpointState) -> Scores: ...


class Picker(Protocol):
    """The ``k`` best endpoint indices, best first, from the (summed) scores.

    A picker with ``reads_scores = False`` (round-robin) is handed zero costs and
    the profile skips its scorers."""

    name: ClassVar[str]
    reads_scores: ClassVar[bool]

    def pick(self, request: RequestInfo, scores: Scores, k: int) -> list[int]: ...


# --------------------------------------------------------------------------
# Plugins
# --------------------------------------------------------------------------
class JouleSchedScorer:
    """core.routing's endpoint rule (:func:`~joulepool.core.routing.score_endpoints`):
    E_n(r) + lambda * max(0, ETA - D), E_n(r) = eps_n * output + pi_n * prompt (the
    marginal energy), ETA = (q_n + w_n * prompt + t_r) / mu_n; endpoints predicted to
    break the SLO (:func:`~joulepool.core.routing.slo_infeasible` of the first token
    :func:`~joulepool.core.routing.first_token_s` predicts) are marked late."""

    name: ClassVar[str] = "joulesched"

    def score(self, request: RequestInfo, endpoints: EndpointState) -> Scores:
        # the terms go to the state's scratch arrays (unless its columns were resized)
        out: Scratch | None = endpoints.scratch
        if len(endpoints.scratch) != len(endpoints):
            out = None
        cb = score_endpoints(
            endpoints.eps_j_per_token, endpoints.queue_tokens, endpoints.tps,
            endpoints.prefill_weight, request.tokens, request.input_tokens,
            request.deadline_s, request.lam, endpoints.prefill_j_per_token,
            request.output_tokens, endpoints.wake_j_per_token, endpoints.batch_left_tokens,
            out,
        )
        first = first_token_s(endpoints.prefill_wait_s, endpoints.prefill_step_s,
                              endpoints.prefill_chunk_tokens, endpoints.prefill_s_per_token,
                              request.input_tokens, out)
        late = slo_infeasible(first, endpoints.batch_room, request.ttft_slo_s, out)
        overflow = None
        if np.logical_or.reduce(late):  # (late.any() without its Python-level call)
            overflow = overflow_rank(
                endpoints.outstanding, endpoints.tpot_batch, endpoints.inv_capacity,
                delays_tighter_ttft(endpoints.shared_ttft_s, request.ttft_slo_s))
        return Scores(cb.cost, cb.eta_s, cb, late, first, overflow)



class LeastLoadedScorer:
    """Weighted least-connections: (outstanding + 1) x 1 / capacity (req/s); on identical
    endpoints simply the fewest outstanding requests."""

    name: ClassVar[str] = "least-loaded"

    def score(self, request: RequestInfo, endpoints: EndpointState) -> Scores:
        cost = np.add(endpoints.outstanding, 1.0)
        return Scores(np.multiply(cost, endpoints.inv_capacity, out=cost))


class LowestCostPicker:
    """Lowest cost, then lowest ETA (when the scores have one), then lowest index;
    endpoints with a NaN or infinite cost are never picked. With the request's
    ``hard_deadline``, endpoints predicted on time rank before late ones."""

    name: ClassVar[str] = "lowest-cost"
    reads_scores: ClassVar[bool] = True

    def pick(self, request: RequestInfo, scores: Scores, k: int) -> list[int]:
        if scores.breakdown is not None:
            return rank_endpoints(scores.breakdown, k, hard_deadline=request.hard_deadline,
                                  late=scores.late, first_token=scores.first_token_s,
                                  overflow=scores.overflow)
        cost = scores.cost
        if cost.size == 0 or k <= 0:
            return []
        if k == 1 and scores.eta_s is None:
            best = int(cost.argmin())  # first on ties; argmin returns a NaN if any
            if math.isfinite(cost[best]):
                return [best]
        return _ranked(cost, scores.eta_s, k)


def _ranked(cost: FloatArray, eta: FloatArray | None, k: int) -> list[int]:
    idx = np.flatnonzero(np.isfinite(cost))
    order = np.lexsort((eta[idx], cost[idx])) if eta is not None else np.argsort(
        cost[idx], kind="stable")
    out: list[int] = idx[order[:k]].tolist()
    return out


class RoundRobinPicker:
    """Each endpoint in turn (the turn is this picker's state), then the next ones as
    fallbacks; scores are not read, except that rows at a non-finite cost (outside a
    subset) are skipped."""

    name: ClassVar[str] = "round-robin"
    reads_scores: ClassVar[bool] = False

    def __init__(self) -> None:
        self.turn = 0

    def pick(self, request: RequestInfo, scores: Scores, k: int) -> list[int]:
        n = int(scores.cost.size)
        if n == 0 or k <= 0:
            return []
        if not np.isfinite(scores.cost).all():
            rows = np.flatnonzero(np.isfinite(scores.cost))
            if rows.size == 0:
                return []
            start = self.turn % rows.size
            self.turn += 1
            return [int(rows[(start + j) % rows.size]) for j in range(min(k, rows.size))]
        first = self.turn % n
        self.turn += 1
        if k == 1:
            return [first]
        return [(first + j) % n for j in range(min(k, n))]


class KVCacheFilter:
    """Keeps requests off engines whose KV cache is nearly full (``kv_cache_usage`` >=
    :attr:`limit`): a new request there would wait for blocks or evict others. Endpoints
    that do not report usage (NaN) stay eligible; when every reporting endpoint is over
    the limit, none is filtered (the caller's admission decides, not the filter)."""

    name: ClassVar[str] = "kv-cache"
    limit: ClassVar[float] = 0.95

    def filter(self, request: RequestInfo, endpoints: EndpointState) -> BoolArray | None:
        kv = endpoints.kv_cache_usage
        full = kv >= self.limit  # NaN compares False: unknown stays eligible
        if full.size == 0 or not full[full.argmax()] or np.logical_and.reduce(full):
            # (argmax: a full one if any)
            return None
        keep: BoolArray = ~full
        return keep


class NoScorer:
    """Zero cost everywhere: for pickers that ignore scores."""

    name: ClassVar[str] = "none"

    def score(self, request: RequestInfo, endpoints: EndpointState) -> Scores:
        return _zero_scores(len(endpoints))


# --------------------------------------------------------------------------
# Profiles and registries
# --------------------------------------------------------------------------
@dataclass
class RoutingProfile:
    """Filters, then scorers (costs summed with their weights), then a picker."""

    name: str
    scorers: Sequence[tuple[Scorer, float]]
    picker: Picker
    filters: Sequence[Filter] = field(default_factory=tuple)

    def scores(self, request: RequestInfo, endpoints: EndpointState) -> Scores:
        """The summed costs (a single unit-weight scorer's Scores as they are), with
        filtered-out endpoints at an infinite cost."""
        if len(self.scorers) == 1 and self.scorers[0][1] == 1.0:
            out = self.scorers[0][0].score(request, endpoints)
        else:
            out = _weighted(request, endpoints, self.scorers)
        if self.filters:
            out = _apply_filters(request, endpoints, self.filters, out)
        return out

    def pick(self, request: RequestInfo, endpoints: EndpointState, k: int = 1,
             eligible: BoolArray | None = None) -> tuple[list[int], Scores]:
        """The ``k`` best endpoints, best first, and the scores they were picked by;
        with ``eligible`` (a mask, e.g. a gateway's subset hint) only those rows."""
        if self.picker.reads_scores:
            scores = self.scores(request, endpoints)
        else:
            scores = _zero_scores(len(endpoints))
        if eligible is not None:
            scores = _masked(scores, eligible)
        return self.picker.pick(request, scores, k), scores


@functools.lru_cache(maxsize=64)
def _zero_scores(n: int) -> Scores:
    cost = np.zeros(n)
    cost.flags.writeable = False  # shared between calls
    return Scores(cost)


def _weighted(request: RequestInfo, endpoints: EndpointState,
              scorers: Sequence[tuple[Scorer, float]]) -> Scores:
    total = np.zeros(len(endpoints))
    eta: FloatArray | None = None
    breakdown: CostBreakdown | None = None
    late: BoolArray | None = None
    first: FloatArray | None = None
    for scorer, weight in scorers:
        s = scorer.score(request, endpoints)
        total += weight * s.cost
        if eta is None and s.eta_s is not None:
            eta, breakdown = s.eta_s, s.breakdown
        if s.late is not None:
            late = s.late if late is None else (late | s.late)
        if first is None:
            first = s.first_token_s
    if breakdown is not None:
        breakdown = CostBreakdown(breakdown.eta_s, breakdown.energy_j, breakdown.slack_s,
                                  breakdown.lam, total)
    return Scores(total, eta, breakdown, late, first)


def _masked(scores: Scores, keep: BoolArray) -> Scores:
    """``scores`` with the rows outside ``keep`` at an infinite cost (never picked)."""
    cost = np.where(keep, scores.cost, np.inf)
    cb = scores.breakdown
    if cb is not None:
        cb = CostBreakdown(cb.eta_s, cb.energy_j, cb.slack_s, cb.lam, cost)
    return Scores(cost, scores.eta_s, cb, scores.late, scores.first_token_s)


def _apply_filters(request: RequestInfo, endpoints: EndpointState, filters: Sequence[Filter],
                   scores: Scores) -> Scores:
    keep: BoolArray | None = None
    for f in filters:
        mask = f.filter(request, endpoints)
        if mask is not None:
            keep = mask if keep is None else keep & mask
    if keep is None or keep.all():
        return scores
    return _masked(scores, keep)


#: scorer and picker factories by name
SCORERS: dict[str, Callable[[], Scorer]] = {
    JouleSchedScorer.name: JouleSchedScorer,
    LeastLoadedScorer.name: LeastLoadedScorer,
    NoScorer.name: NoScorer,
}
FILTERS: dict[str, Callable[[], Filter]] = {
    KVCacheFilter.name: KVCacheFilter,
}
PICKERS: dict[str, Callable[[], Picker]] = {
    LowestCostPicker.name: LowestCostPicker,
    RoundRobinPicker.name: RoundRobinPicker,
}
#: routing profile name -> ((scorer name, weight), ...), picker name
PROFILES: dict[str, tuple[tuple[tuple[str, float], ...], str]] = {
    "joulesched": ((("joulesched", 1.0),), "lowest-cost"),
    "least-loaded": ((("least-loaded", 1.0),), "lowest-cost"),
    "round-robin": ((("none", 1.0),), "round-robin"),
}
#: routing profile name -> its filters' names (run before the scorers)
PROFILE_FILTERS: dict[str, tuple[str, ...]] = {
    "joulesched": ("kv-cache",),
    "least-loaded": ("kv-cache",),
}


def register_scorer(factory: Callable[[], Scorer], name: str | None = None) -> None:
    """Make a scorer available to profiles by its ``name``."""
    SCORERS[name or factory().name] = factory


def routing_profile(name: str) -> RoutingProfile:
    """A fresh profile (its own picker state) of a registered name; ValueError if unknown."""
    spec = PROFILES.get(name)
    if spec is None:
        raise ValueError(f"unknown routing {name!r}; choose from {', '.join(sorted(PROFILES))}")
    scorers, picker = spec
    filters = tuple(FILTERS[f]() for f in PROFILE_FILTERS.get(name, ()))
    return RoutingProfile(name, tuple((SCORERS[s](), w) for s, w in scorers), PICKERS[picker](),
                          filters)
