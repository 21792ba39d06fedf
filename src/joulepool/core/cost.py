"""The JouleSched cost, once, vectorised over endpoints.

    ETA(n, r)  = (q_n + t_r) / mu_n
    cost(n, r) = E_n(r) + lambda * max(0, ETA(n, r) - D_r)

E_n(r) is the energy the request adds on endpoint n now (its marginal energy,
:func:`joulepool.core.routing.marginal_energy_j`); the paper's eps_n * t_r is
the special case of a fixed J/token and no prefill term.

The request router, the scheduler extender (pod placement form) and the
simulator all call these functions; none of them re-derives the formula.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from joulepool.core.classes import Tier

FloatArray = npt.NDArray[np.float64]

#: Bulk requests weigh lateness this much less, so they chase the cheapest joules.
BULK_LAMBDA_FACTOR = 0.05
MAX_SCORE = 10  # kube-scheduler's MaxExtenderPriority


_F64 = np.dtype(np.float64)


def float_array(values: npt.ArrayLike) -> FloatArray:
    """``values`` as a float64 array: the array itself when it is one (the per-request
    path calls this a dozen times; numpy's own conversion costs more than the check)."""
    if type(values) is np.ndarray and values.dtype is _F64:
        return values
    return np.asarray(values, dtype=np.float64)


class Scratch:
    """Arrays of one length that the per-request formulas write into instead of
    allocating: :func:`joulesched_cost`, :func:`joulepool.core.routing.score_endpoints`,
    :func:`~joulepool.core.routing.marginal_energy_j`,
    :func:`~joulepool.core.routing.first_token_s` and
    :func:`~joulepool.core.routing.slo_infeasible` take one as ``out`` (each writes only
    the fields its docstring names). A pool's columns
    (:class:`joulepool.core.scoring.EndpointState`) keep one, so a decision at 1,000
    endpoints reuses the same few warm buffers instead of a dozen fresh ones: the same
    operations in the same order, the same numbers. What a formula returns in them is
    valid until the next call that writes the same fields."""

    __slots__ = ("cost", "energy", "eta", "first", "late", "slack", "spare", "spare_bool")

    def __init__(self, n: int) -> None:
        self.eta: FloatArray = np.empty(n)  #: work tokens, then ETA (s)
        self.energy: FloatArray = np.empty(n)  #: the energy term (J)
        self.slack: FloatArray = np.empty(n)  #: ETA - deadline, at least 0 (s)
        self.cost: FloatArray = np.empty(n)  #: the cost (J)
        self.first: FloatArray = np.empty(n)  #: the predicted first token (s)
        self.spare: FloatArray = np.empty(n)  #: a term before it is added
        self.late = np.empty(n, dtype=np.bool_)  #: predicted to break the SLO
        self.spare_bool = np.empty(n, dtype=np.bool_)

    def __len__(self) -> int:
        return int(self.eta.size)


class CostBreakdown(NamedTuple):
    """Per-endpoint terms of the cost, for explanations and metrics (immutable; a named
    tuple, which the per-request path builds faster than a frozen dataclass)."""

    eta_s: FloatArray
    energy_j: FloatArray
    slack_s: FloatArray
    lam: float
    cost: FloatArray

    def best(self) -> int:
        return argmin_stable(self.cost)

    def best_by_eta(self) -> int:
        """Lowest cost; among equal costs the lowest ETA, then the first index
        (NaN costs last). :func:`joulepool.core.routing.rank_endpoints` uses it.

        With identical devices every energy term is equal and nothing is late,
        so the cost alone ties everywhere; the ETA then spreads load as a
        least-loaded balancer would instead of piling onto endpoint 0.
        """
        c = self.cost
        if c.size == 0:
            raise ValueError("no endpoints to choose from")
        if c.size <= 224:  # a stable sort by (cost, ETA) is the cheaper call when small
            return int(np.lexsort((self.eta_s, c))[0])
        lo = c.min()
        if lo != lo:  # a NaN cost: the sort puts NaN last, min() would return it
            return int(np.lexsort((self.eta_s, c))[0])
        tied = c == lo
        if np.count_nonzero(tied) == 1:
            return int(np.argmax(tied))
        return int(np.argmin(np.where(tied, self.eta_s, np.inf)))

    def ranking(self) -> list[int]:
        """Endpoint indices from best to worst, ties by index."""
        return [int(i) for i in np.argsort(self.cost, kind="stable")]


def effective_lambda(
    lam: float, tier: Tier | str, bulk_factor: float = BULK_LAMBDA_FACTOR
) -> float:
    """Tiering: bulk requests trade lateness for energy far more readily."""
    bulk = tier is Tier.BULK or (tier is not Tier.INTERACTIVE and Tier(tier) is Tier.BULK)
    return lam * bulk_factor if bulk else lam


def joulesched_cost(
    eps_j_per_token: npt.ArrayLike,
    queue_tokens: npt.ArrayLike,
    throughput_tps: npt.ArrayLike,
    tokens: float,
    deadline_s: float,
    lam: float,
    energy_j: npt.ArrayLike | None = None,
    out: Scratch | None = None,
) -> CostBreakdown:
    """Cost of sending a request of ``tokens`` to each endpoint.

    ``energy_j`` (J per endpoint), when given, is the energy term as it is
    (the marginal energy); otherwise it is ``eps_j_per_token * tokens``.
    Endpoints with zero or negative throughput get an infinite ETA and so an
    infinite cost whenever lambda > 0 (they cannot serve). With ``out`` (every
    column an array of its length) the ETA, slack and cost are written into its
    ``eta``, ``slack`` and ``cost`` (``queue_tokens`` may be ``out.eta`` itself).
    """
    mu = float_array(throughput_tps)
    work = np.add(float_array(queue_tokens), tokens, out=None if out is None else out.eta)
    eta = _eta_s(work, mu)
    slack = np.subtract(eta, deadline_s, out=None if out is None else out.slack)
    np.maximum(slack, 0.0, out=slack)  # NaN stays NaN
    energy = (float_array(eps_j_per_token) * tokens if energy_j is None
              else float_array(energy_j))
    cost = _lateness_j(slack, float(lam), None if out is None else out.cost)
    if cost.shape == energy.shape:
        cost += energy
    else:  # eps broadcast against scalar queue and throughput
        cost = cost + energy
    return CostBreakdown(eta, energy, slack, float(lam), cost)


def joulesched_cost_one(queue_tokens: float, throughput_tps: float, tokens: float,
                        deadline_s: float, lam: float, energy_j: float) -> tuple[float, float]:
    """:func:`joulesched_cost` of one endpoint given its energy term: (cost, ETA s).

    The same floating-point operations in the same order as the vectorised form, so
    the same numbers bit for bit (``tests/unit/test_core_fast_paths.py`` holds them
    together, NaN and infinities included): for callers that score a few endpoints
    one at a time, where numpy's fixed cost per call would dominate."""
    work = queue_tokens + tokens
    eta = work / throughput_tps if throughput_tps > 0 else math.inf  # _eta_s
    slack = eta - deadline_s
    if slack < 0.0:  # np.maximum(slack, 0): NaN stays NaN
        slack = 0.0
    # _lateness_j, case by case
    if lam == 0.0:
        late = math.nan if slack == math.inf else 0.0
    elif 0.0 < lam < math.inf:
        late = (slack if slack == slack else 0.0) * lam  # fmax: NaN -> 0
    else:
        late = slack * lam if slack > 0 else 0.0
    return late + energy_j, eta


def _eta_s(work_tokens: FloatArray, mu: FloatArray) -> FloatArray:
    """ETA = work / mu, infinite where mu <= 0 or NaN (cannot serve); ``work_tokens`` is
    the caller's scratch array (overwritten when shapes allow)."""
    # divisions only where they are defined, so no floating-point warnings to silence
    # (np.errstate is a slow context manager on this hot path); the common case (every
    # endpoint serves) is one division in place
    if work_tokens.shape == mu.shape and mu.size and np.minimum.reduce(mu) > 0:
        return np.divide(work_tokens, mu, out=work_tokens)
    shape = np.broadcast_shapes(work_tokens.shape, mu.shape)
    eta = np.empty(shape)
    eta.fill(np.inf)
    np.divide(work_tokens, mu, out=eta, where=mu > 0)
    return eta


def _lateness_j(slack_s: FloatArray, lam: float, out: FloatArray | None = None
                ) -> FloatArray:
    """lambda x slack where late (slack > 0), 0 elsewhere: a NaN slack is not late; with
    lambda = 0 an infinite slack (cannot serve) is NaN, so that endpoint stays unusable.
    Written into ``out`` (of ``slack_s``'s shape) where given, in the usual case."""
    if lam == 0.0:
        return np.where(slack_s == np.inf, np.nan, 0.0)
    if 0.0 < lam < math.inf:
        # slack is >= 0 or NaN: fmax maps NaN to 0 and keeps the rest, and 0 x a finite
        # lambda is 0: the same numbers as the masked product below, two calls cheaper
        late = np.fmax(slack_s, 0.0, out=out)
        return np.multiply(late, lam, out=late)
    return np.multiply(slack_s, lam, out=np.zeros(np.shape(slack_s)), where=slack_s > 0)


def argmin_stable(cost: npt.ArrayLike) -> int:
    """Index of the lowest cost; the first one on ties (deterministic)."""
    c = np.asarray(cost, dtype=np.float64)
    if c.size == 0:
        raise ValueError("no endpoints to choose from")
    return int(np.argmin(c))


def choose_endpoint(
    eps_j_per_token: npt.ArrayLike,
    queue_tokens: npt.ArrayLike,
    throughput_tps: npt.ArrayLike,
    tokens: float,
    deadline_s: float,
    lam: float,
    tier: Tier | str = Tier.INTERACTIVE,
) -> int:
    """n* = argmin cost, with the tier's effective lambda."""
    lam_eff = effective_lambda(lam, tier)
    return joulesched_cost(
        eps_j_per_token, queue_tokens, throughput_tps, tokens, deadline_s, lam_eff
    ).best()


def placement_cost(
    eps_j_per_token: npt.ArrayLike,
    load_tps: npt.ArrayLike,
    capacity_tps: npt.ArrayLike,
    replica_tps: float,
    max_utilisation: float,
    lam: float,
) -> CostBreakdown:
    """Pod-placement form of the same cost.

    A replica that will carry ``replica_tps`` tokens/s is placed on a node
    whose GPUs can do ``capacity_tps`` and already carry ``load_tps``: one
    second of the replica's tokens is the "request", the node's load its
    queue, and the utilisation ceiling its deadline. The energy term ranks
    efficient nodes first; the slack term pushes away from nodes that would
    run hotter than ``max_utilisation``.
    """
    return joulesched_cost(
        eps_j_per_token, load_tps, capacity_tps, replica_tps, max_utilisation, lam
    )


def scores_from_costs(cost: npt.ArrayLike, max_score: int = MAX_SCORE) -> list[int]:
    """Map costs to integer scores 0..max_score, best (lowest cost) = max_score.

    Linear in cost between the best and the worst finite cost; infinite costs
    score 0. Equal costs get equal scores, so ties stay deterministic.
    """
    c = np.asarray(cost, dtype=np.float64)
    if c.size == 0:
        return []
    finite = np.isfinite(c)
    if not finite.any():
        return [0] * int(c.size)
    lo, hi = float(c[finite].min()), float(c[finite].max())
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        scores = np.where(finite, max_score, 0)
    else:
        scaled = max_score * (hi - np.where(finite, c, hi)) / (hi - lo)
        scores = np.where(finite, np.rint(scaled), 0)
    out: list[int] = scores.astype(np.int64).tolist()  # C-speed; 5,000 nodes in ~20 us
    return out
