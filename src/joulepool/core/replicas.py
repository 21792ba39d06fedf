"""Pool-wide completion counts across router replicas: the PI loop's input when the
routing service runs as several processes (pure; rationale in docs/routing.md).

Each replica keeps cumulative per-pool, per-tier counts of the completions it saw
and how many missed their deadline, and publishes them (with its lambda per pool)
as a :class:`ReplicaRecord`. Every replica reads the records of the others, keeps
the fresh ones (a record is fresh while ``renewed_at + ttl_s`` has not passed:
a replica that died or lost the API server drops out after ``ttl_s``), and turns
them into *increments* since it last looked (:class:`PeerIncrements`), reset-aware
as Prometheus' ``increase()``: a count that went down is a restarted replica whose
new count is all new. The increments join the replica's own completions in its PI
period, so each replica steps its controller on the pool-wide miss rate.

The PI controller integrates, so two replicas stepping at slightly different
moments would drift apart for good; at each sync a replica's lambda moves to the
mean of its own and its fresh peers' (:func:`consensus_lambda`), which removes
their differences, while each replica's PI steps on the pool-wide error move the
mean as one PI loop would.

No clocks and no I/O here: callers pass ``now`` (wall-clock seconds, the same
clock the records' ``renewed_at`` is on).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Counts:
    """Completions and deadline misses (cumulative, or an increment)."""

    completions: int = 0
    misses: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.completions + other.completions, self.misses + other.misses)

    def since(self, earlier: Counts) -> Counts:
        """The increment from ``earlier`` to this cumulative count; a count that went
        down (the replica restarted) counts whole, as Prometheus' ``increase()`` does."""
        if self.completions < earlier.completions or self.misses < earlier.misses:
            return self
        return Counts(self.completions - earlier.completions, self.misses - earlier.misses)


#: pool -> tier name -> cumulative counts of one replica
PoolTierCounts = Mapping[str, Mapping[str, Counts]]


def pool_total(tiers: Mapping[str, Counts]) -> Counts:
    """One pool's counts summed over its tiers (the PI loop steps on the whole pool)."""
    total = Counts()
    for c in tiers.values():
        total = total + c
    return total


@dataclass(frozen=True)
class ReplicaRecord:
    """What one replica published: its counts and lambdas at ``renewed_at`` (wall s),
    valid for ``ttl_s`` seconds."""

    replica: str
    renewed_at: float
    ttl_s: float
    counts: PoolTierCounts = field(default_factory=dict)
    lambdas: Mapping[str, float] = field(default_factory=dict)

    def fresh(self, now: float) -> bool:
        """Renewed within its TTL (a record from up to ``ttl_s`` in the future, a clock
        skew, is fresh too; one from further ahead is not trusted)."""
        return abs(now - self.renewed_at) <= self.ttl_s


def fresh_peers(records: Iterable[ReplicaRecord], me: str, now: float
                ) -> list[ReplicaRecord]:
    """The records of replicas other than ``me`` that are fresh at ``now``."""
    return [r for r in records if r.replica != me and r.fresh(now)]


def pool_wide_totals(records: Iterable[ReplicaRecord]) -> dict[str, Counts]:
    """Cumulative counts per pool summed over replicas and tiers."""
    out: dict[str, Counts] = {}
    for rec in records:
        for pool, tiers in rec.counts.items():
            out[pool] = out.get(pool, Counts()) + pool_total(tiers)
    return out


class PeerIncrements:
    """Per pool, the completions and misses the peers added since the last call.

    A replica seen for the first time is a baseline (its history before we looked is
    not ours to step on); a pool that appears in a known replica's record counts from
    zero. Replicas absent from a call (stale, or gone) are forgotten, so a replica
    that comes back is a baseline again."""

    def __init__(self) -> None:
        self._last: dict[str, dict[str, Counts]] = {}

    def absorb(self, peers: Iterable[ReplicaRecord]) -> dict[str, Counts]:
        """Increments per pool from ``peers`` (fresh records of the other replicas)."""
        out: dict[str, Counts] = {}
        seen: dict[str, dict[str, Counts]] = {}
        for rec in peers:
            totals = {pool: pool_total(tiers) for pool, tiers in rec.counts.items()}
            before = self._last.get(rec.replica)
            seen[rec.replica] = totals
            if before is None:
                continue  # baseline
            for pool, total in totals.items():
                inc = total.since(before.get(pool, Counts()))
                if inc.completions or inc.misses:
                    out[pool] = out.get(pool, Counts()) + inc
        self._last = seen
        return out


def consensus_lambda(own: float, peers: Iterable[float], lam_min: float, lam_max: float
                     ) -> float:
    """The mean of this replica's lambda and the finite lambdas of its fresh peers,
    clamped to [lam_min, lam_max]: where a PI step starts (module docstring)."""
    values = [own, *(x for x in peers if math.isfinite(x))]
    return min(max(sum(values) / len(values), lam_min), lam_max)
