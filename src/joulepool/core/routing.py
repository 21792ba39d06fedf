"""Inputs of the JouleSched cost for a live endpoint or node, and the ranking rule.

These are the small formulas the request router and the scheduler extender
need around :mod:`joulepool.core.cost`; they live here so the simulator uses
the same ones. The request router (``core/router.py``, run by ``joulepool router``) and the
simulator's JouleSched policies (``sim/engine.py``) both score endpoints with
:func:`score_endpoints` and pick with :func:`rank_endpoints`: one rule.

Endpoint scoring rule (request routing):
    b*_n    = the endpoint's operating batch: the largest batch meeting the pool's
              TPOT SLO (at least 1), the batch the planner and the extender's
              placement size replicas at (:func:`replica_point`)
    eps_n   = scale_n * profile.joules_per_token(b*_n)    (scale: core.online.EpsEstimator)
    mu_n    = profile.decode_tokens_per_s(b*_n)           (at the current clock where known)
    w_n     = mu_n * prefill_s_per_token_n                (:func:`prefill_weight`: decode
              tokens the endpoint forgoes while it prefills one prompt token)
    q_n     = decode tokens ahead + w_n * prompt tokens ahead (not yet prefilled)
              + w_n * the request's own prompt            (:func:`endpoint_queue_tokens`,
                                                           :func:`score_endpoints`)
    t_r     = output_tokens + input_weight * input_tokens (input_weight = 0: the paper's t_r)
    ETA     = (q_n + t_r) / mu_n, cost as in :func:`joulepool.core.cost.joulesched_cost`
    choice  = lowest cost, then lowest ETA, then lowest index  (:func:`rank_endpoints`)

Why the operating batch and not the batch the endpoint runs at now: J/token
falls steeply with batch, so eps read at the live batch makes the busiest
endpoint look cheapest and every request piles onto it (positive feedback:
on the simulator's joulesched-320 that rule saved about 70 % of the energy
vs round-robin and missed about 98 % of the deadlines). A marginal-energy
eps (the extra joules of one more request) has the same fault, only
stronger: the power curve is concave in batch. eps at b*_n is what a token
costs when the endpoint runs as planned; it does not move with load, so load
only enters through the ETA, where more of it means later, not cheaper. mu_n
at b*_n likewise: the rate at which an endpoint drains its work while it
meets TPOT (read at the live batch, mu grew with the queue, so a crowded
endpoint's ETA grew only with its step time and the lateness term never
fired). With the energy term equal across identical endpoints, the ETA
tie-break spreads their load as least-loaded would, and the index makes the
choice deterministic.

The decode tokens ahead are the router's ledger of routed, unfinished tokens
or the estimate from scraped request counts (:func:`queue_tokens_estimate`),
whichever is larger; the simulator keeps the same ledger per instance.
Prompt tokens ahead are those of requests not yet admitted: the simulator
sums them exactly, the router estimates them from counts
(:func:`waiting_requests_estimate`) x the mean prompt it has seen. Profile
drift is measured against eps at the batch the endpoint actually ran
(:meth:`EndpointModel.at`), so the online scale carries drift, not load.

Node (pod placement, the form :func:`joulepool.core.cost.placement_cost` takes):
    the replica runs at the largest batch meeting the pool's TPOT SLO (as the
    planner sizes it); capacity = instances that fit x tokens/s per instance;
    replica = the plan's mean instance tokens/s x utilisation (the same for every
              node, so the energy terms compare like with like);
    load = GPUs held by bound pods, as instances at that utilisation
           + tokens queued on the node's endpoints / horizon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt

# default_deadline lives in core.classes (next to SLO.deadline_for); re-exported here
# for the router and older callers
from joulepool.core.classes import default_deadline as default_deadline
from joulepool.core.cost import CostBreakdown, joulesched_cost
from joulepool.core.profiles import ServingProfile

FloatArray = npt.NDArray[np.float64]
#: a float or an array of them: the small formulas below are plain arithmetic so the
#: simulator can apply them to one instance's floats and the router to whole arrays
Num = TypeVar("Num", float, FloatArray)


def queued_responses(waiting: npt.ArrayLike, running: npt.ArrayLike) -> FloatArray:
    """Responses ahead of a new request, in whole responses: waiting requests count
    whole, running ones half (they are half done on average)."""
    w = np.maximum(np.asarray(waiting, dtype=np.float64), 0.0)
    r = np.maximum(np.asarray(running, dtype=np.float64), 0.0)
    return np.asarray(w + r / 2.0, dtype=np.float64)


def queue_tokens_estimate(
    waiting: npt.ArrayLike, running: npt.ArrayLike, mean_output_tokens: float
) -> FloatArray:
    """Tokens ahead of a new request on an engine with these request counts."""
    m = max(float(mean_output_tokens), 0.0)
    return np.asarray(queued_responses(waiting, running) * m, dtype=np.float64)


def waiting_requests_estimate(
    waiting: npt.ArrayLike, in_flight: npt.ArrayLike, max_batch: npt.ArrayLike
) -> FloatArray:
    """Requests not yet admitted to the batch: the scraped waiting count, or what
    the requests in flight (e.g. the router's ledger) imply beyond the engine's
    batch limit, if more."""
    over: FloatArray = np.asarray(np.subtract(in_flight, max_batch, dtype=np.float64))
    np.maximum(over, waiting, out=over)
    np.maximum(over, 0.0, out=over)
    return over


def prefill_weight(tps: Num, prefill_s_per_token: Num) -> Num:
    """w_n: decode tokens an endpoint running at ``tps`` forgoes while it prefills one
    prompt token (prefill pauses decoding); prompt tokens x w_n are decode-token
    equivalents, so the cost's ETA = (q + t) / mu counts prefill time too."""
    return tps * prefill_s_per_token


def endpoint_queue_tokens(decode_tokens: Num, prompt_tokens: Num, weight: Num) -> Num:
    """q_n before the request: decode tokens ahead plus prompt tokens ahead (not yet
    prefilled) in decode-token equivalents (``weight`` from :func:`prefill_weight`)."""
    return decode_tokens + weight * prompt_tokens


def score_endpoints(
    eps_j_per_token: npt.ArrayLike,
    queue_tokens: npt.ArrayLike,
    throughput_tps: npt.ArrayLike,
    weight: npt.ArrayLike,
    tokens: float,
    input_tokens: float,
    deadline_s: float,
    lam: float,
) -> CostBreakdown:
    """The JouleSched cost of a request on every endpoint under the rule above.

    ``eps_j_per_token`` and ``throughput_tps`` are eps_n and mu_n at the operating
    batch, ``queue_tokens`` q_n from :func:`endpoint_queue_tokens`, ``weight`` w_n;
    the request's own prompt of ``input_tokens`` is added to q_n here.
    """
    q = np.asarray(queue_tokens, dtype=np.float64)
    if input_tokens > 0:
        q = q + input_tokens * np.asarray(weight, dtype=np.float64)
    return joulesched_cost(eps_j_per_token, q, throughput_tps, tokens, deadline_s, lam)


def request_tokens(
    output_tokens: float, input_tokens: float = 0.0, input_weight: float = 0.0
) -> float:
    """JouleSched's token estimate t_r for a request."""
    return max(float(output_tokens), 0.0) + max(float(input_weight), 0.0) * max(
        float(input_tokens), 0.0
    )


def rank_endpoints(breakdown: CostBreakdown, k: int, hard_deadline: bool = False) -> list[int]:
    """The ``k`` best endpoint indices, best first: lowest cost, then lowest ETA, then
    lowest index (deterministic).

    With ``hard_deadline`` every endpoint predicted to meet the deadline ranks
    before every endpoint predicted to miss it; cost, ETA and index order within
    each group. Endpoints with a NaN or infinite cost (cannot serve) are left out.
    """
    cost = np.asarray(breakdown.cost, dtype=np.float64)
    if cost.size == 0 or k <= 0:
        return []
    if k == 1 and not hard_deadline:
        best = breakdown.best_by_eta()  # the simulator's per-request path: no sort
        return [best] if math.isfinite(cost[best]) else []
    eta = np.asarray(breakdown.eta_s, dtype=np.float64)
    slack = np.asarray(breakdown.slack_s, dtype=np.float64)
    usable = np.isfinite(cost)
    if usable.all():  # the usual case: rank the arrays as they are
        keys = (eta, cost, slack > 0) if hard_deadline else (eta, cost)
        top: list[int] = np.lexsort(keys)[:k].tolist()
        return top
    idx = np.flatnonzero(usable)
    if idx.size == 0:
        return []
    c, e = cost[idx], eta[idx]
    order = np.lexsort((e, c, slack[idx] > 0) if hard_deadline else (e, c))
    top = idx[order[:k]].tolist()
    return top


@dataclass(frozen=True)
class EndpointModel:
    """One endpoint's serving profile, as the scoring rule reads it.

    ``eps`` and ``tps`` are batch-indexed tables (index ``b`` = batch ``b``,
    1..max_batch; index 0 repeats batch 1), built once per profile. The rule
    reads them at ``batch``, the operating batch (:attr:`op_eps`, :attr:`op_tps`);
    :meth:`at` reads them at the batch the endpoint actually runs, the reference
    against which measured joules reveal profile drift.
    """

    eps: FloatArray
    tps: FloatArray
    batch: int = 1
    prefill_s_per_token: float = 0.0

    @classmethod
    def from_profile(
        cls, profile: ServingProfile, tpot_slo_s: float, clock_mhz: float | None = None
    ) -> EndpointModel:
        """Tables of ``profile``; the operating batch is the largest meeting ``tpot_slo_s``."""
        max_b = max(int(profile.max_batch.value), 1)
        b = np.arange(0, max_b + 1, dtype=np.float64)
        b[0] = 1.0
        eps = np.asarray(profile.joules_per_token(b, clock_mhz), dtype=np.float64)
        tps = np.asarray(profile.decode_tokens_per_s(b, clock_mhz), dtype=np.float64)
        op = replica_point(profile, tpot_slo_s, clock_mhz).batch
        return cls(eps, tps, op, float(profile.prefill_s(1.0, clock_mhz)))

    @classmethod
    def constant(cls, eps: float, tps: float) -> EndpointModel:
        """An endpoint described by fixed numbers (static endpoints file); no prefill model."""
        return cls(np.array([eps, eps], dtype=np.float64), np.array([tps, tps], dtype=np.float64))

    @property
    def max_batch(self) -> int:
        return int(self.eps.size - 1)

    @property
    def op_batch(self) -> int:
        """The operating batch, within the tables."""
        return min(max(int(self.batch), 1), self.max_batch)

    @property
    def op_eps(self) -> float:
        """eps_n: J/token at the operating batch."""
        return float(self.eps[self.op_batch])

    @property
    def op_tps(self) -> float:
        """mu_n: tokens/s at the operating batch."""
        return float(self.tps[self.op_batch])

    @property
    def weight(self) -> float:
        """w_n: decode tokens forgone per prompt token prefilled (:func:`prefill_weight`)."""
        return prefill_weight(self.op_tps, self.prefill_s_per_token)

    def batch_for(self, in_flight: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """The batch a new request joins, given requests already in flight."""
        n = np.asarray(in_flight, dtype=np.float64)
        return np.asarray(np.clip(np.floor(n) + 1, 1, self.max_batch), dtype=np.int64)

    def at(self, in_flight: float) -> tuple[float, float]:
        """(eps J/token, tokens/s) at the batch a request joining ``in_flight`` others runs
        at: the drift estimator's reference, not the rule's eps (see the module doc)."""
        b = int(self.batch_for(in_flight))
        return float(self.eps[b]), float(self.tps[b])


@dataclass(frozen=True)
class ReplicaPoint:
    """Where a serving replica runs: its batch, J/token and tokens/s."""

    batch: int
    eps: float
    tps: float


def replica_point(
    profile: ServingProfile, tpot_slo_s: float, clock_mhz: float | None = None
) -> ReplicaPoint:
    """The replica's operating point: the largest batch meeting TPOT (at least 1)."""
    b = max(profile.best_batch(tpot_slo_s, clock_mhz), 1)
    return ReplicaPoint(
        b,
        float(profile.joules_per_token(b, clock_mhz)),
        float(profile.decode_tokens_per_s(b, clock_mhz)),
    )


def replica_demand_tps(
    instance_tps: npt.ArrayLike, instances: npt.ArrayLike, utilisation: float
) -> float:
    """Tokens/s one replica of a pool carries: the plan's instance-weighted mean
    instance throughput at the planned utilisation (the planner sizes pools
    with headroom alpha, so utilisation is about 1/alpha)."""
    tps = np.asarray(instance_tps, dtype=np.float64)
    n = np.maximum(np.asarray(instances, dtype=np.float64), 0.0)
    ok = np.isfinite(tps) & (tps > 0) & (n > 0)
    if not ok.any():
        return 0.0
    return float(utilisation * np.sum(tps[ok] * n[ok]) / np.sum(n[ok]))


def node_capacity_tps(
    allocatable_gpus: npt.ArrayLike, gpus_per_instance: int, instance_tps: npt.ArrayLike
) -> FloatArray:
    """Tokens/s a node's GPUs sustain as whole instances of ``gpus_per_instance`` GPUs."""
    g = np.maximum(np.asarray(allocatable_gpus, dtype=np.float64), 0.0)
    per = max(int(gpus_per_instance), 1)
    return np.asarray(np.floor(g / per) * np.asarray(instance_tps, dtype=np.float64))


def node_load_tps(
    used_gpus: npt.ArrayLike,
    gpus_per_instance: int,
    instance_tps: npt.ArrayLike,
    utilisation: float,
    queue_tokens: npt.ArrayLike,
    horizon_s: float,
) -> FloatArray:
    """Load already on a node, in tokens/s of the candidate's instance type.

    GPUs held by bound pods count as instances running at ``utilisation``;
    tokens queued on the node's endpoints must drain within ``horizon_s``.
    """
    per = max(int(gpus_per_instance), 1)
    busy = (
        np.maximum(np.asarray(used_gpus, dtype=np.float64), 0.0) / per
        * np.asarray(instance_tps, dtype=np.float64) * float(utilisation)
    )
    queue = np.maximum(np.asarray(queue_tokens, dtype=np.float64), 0.0) / max(
        float(horizon_s), 1e-9
    )
    return np.asarray(busy + queue, dtype=np.float64)
