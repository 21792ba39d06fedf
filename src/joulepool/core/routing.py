"""Inputs of the JouleSched cost for a live endpoint or node, and the ranking rule.

These are the small formulas the request router and the scheduler extender
need around :mod:`joulepool.core.cost`; they live here so the simulator can
use the same ones.

Endpoint (request routing):
    batch   = clip(in_flight + 1, 1, max_batch)          the batch the request joins
    eps_n   = scale_n * profile.joules_per_token(batch)   (scale: core.online.EpsEstimator)
    mu_n    = profile.decode_tokens_per_s(batch)
    q_n     = waiting * mean_out + running * mean_out / 2  (running ones are half done
                                                           on average), or the router's own
                                                           ledger of routed tokens if larger
    t_r     = output_tokens + input_weight * input_tokens (input_weight = 0: the paper's t_r)

Node (pod placement, the form :func:`joulepool.core.cost.placement_cost` takes):
    the replica runs at the largest batch meeting the pool's TPOT SLO (as the
    planner sizes it); capacity = instances that fit x tokens/s per instance;
    replica = the plan's mean instance tokens/s x utilisation (the same for every
              node, so the energy terms compare like with like);
    load = GPUs held by bound pods, as instances at that utilisation
           + tokens queued on the node's endpoints / horizon.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from joulepool.core.cost import CostBreakdown
from joulepool.core.profiles import ServingProfile

FloatArray = npt.NDArray[np.float64]


def queue_tokens_estimate(
    waiting: npt.ArrayLike, running: npt.ArrayLike, mean_output_tokens: float
) -> FloatArray:
    """Tokens ahead of a new request on an engine with these request counts."""
    w = np.maximum(np.asarray(waiting, dtype=np.float64), 0.0)
    r = np.maximum(np.asarray(running, dtype=np.float64), 0.0)
    m = max(float(mean_output_tokens), 0.0)
    return np.asarray(w * m + r * (m / 2.0), dtype=np.float64)


def request_tokens(
    output_tokens: float, input_tokens: float = 0.0, input_weight: float = 0.0
) -> float:
    """JouleSched's token estimate t_r for a request."""
    return max(float(output_tokens), 0.0) + max(float(input_weight), 0.0) * max(
        float(input_tokens), 0.0
    )


def default_deadline(
    output_tokens: float, ttft_s: float, tpot_s: float, slack_factor: float = 1.0
) -> float:
    """FREESH's end-to-end deadline when none is given: k * (TTFT + tokens * TPOT)."""
    return slack_factor * (ttft_s + max(float(output_tokens), 0.0) * tpot_s)


def rank_endpoints(breakdown: CostBreakdown, k: int, hard_deadline: bool = False) -> list[int]:
    """The ``k`` best endpoint indices, best first; ties by index (deterministic).

    With ``hard_deadline`` every endpoint predicted to meet the deadline ranks
    before every endpoint predicted to miss it; cost orders within each group.
    Endpoints with a NaN or infinite cost (cannot serve) are left out.
    """
    cost = np.asarray(breakdown.cost, dtype=np.float64)
    if cost.size == 0 or k <= 0:
        return []
    usable = np.isfinite(cost)
    idx = np.flatnonzero(usable)
    if idx.size == 0:
        return []
    c = cost[idx]
    if hard_deadline:
        late = np.asarray(breakdown.slack_s, dtype=np.float64)[idx] > 0
        order = np.lexsort((c, late))
    else:
        order = np.argsort(c, kind="stable")
    top: list[int] = idx[order[:k]].tolist()
    return top


@dataclass(frozen=True)
class EndpointModel:
    """Batch-indexed tables of eps and throughput for one serving profile.

    Index ``b`` (1..max_batch) holds the values at batch ``b``; index 0 repeats batch 1.
    Built once per profile so per-request updates are array lookups.
    """

    eps: FloatArray
    tps: FloatArray

    @classmethod
    def from_profile(cls, profile: ServingProfile, clock_mhz: float | None = None) -> EndpointModel:
        max_b = max(int(profile.max_batch.value), 1)
        b = np.arange(0, max_b + 1, dtype=np.float64)
        b[0] = 1.0
        eps = np.asarray(profile.joules_per_token(b, clock_mhz), dtype=np.float64)
        tps = np.asarray(profile.decode_tokens_per_s(b, clock_mhz), dtype=np.float64)
        return cls(eps, tps)

    @classmethod
    def constant(cls, eps: float, tps: float) -> EndpointModel:
        """An endpoint described by fixed numbers (static endpoints file)."""
        return cls(np.array([eps, eps], dtype=np.float64), np.array([tps, tps], dtype=np.float64))

    @property
    def max_batch(self) -> int:
        return int(self.eps.size - 1)

    def batch_for(self, in_flight: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """The batch a new request joins, given requests already in flight."""
        n = np.asarray(in_flight, dtype=np.float64)
        return np.asarray(np.clip(np.floor(n) + 1, 1, self.max_batch), dtype=np.int64)

    def at(self, in_flight: float) -> tuple[float, float]:
        """(eps J/token, throughput tokens/s) for a request joining ``in_flight`` others."""
        b = int(self.batch_for(in_flight))
        return float(self.eps[b]), float(self.tps[b])


@dataclass(frozen=True)
class ReplicaPoint:
    """Where a serving replica runs: its batch, J/token and tokens/s."""

    batch: int
    eps: float
    tps: float


def replica_point(profile: ServingProfile, tpot_slo_s: float) -> ReplicaPoint:
    """The replica's operating point: the largest batch meeting TPOT (at least 1)."""
    b = max(profile.best_batch(tpot_slo_s), 1)
    return ReplicaPoint(
        b, float(profile.joules_per_token(b)), float(profile.decode_tokens_per_s(b))
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
