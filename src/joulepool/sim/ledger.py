"""The simulator's accounts: per-GPU energy, per-site carbon buckets, sampled GPUs.

Energy is in joules, power in watts, time in simulated seconds. A GPU held by
an instance is charged its share (1 / the instance's GPUs) of the instance's
integrated draw when the instance releases it; a free GPU accrues its
product's idle power.
"""

from __future__ import annotations

import math
from collections import deque

from joulepool.core.energy import grams_co2
from joulepool.sim.cluster import SimCluster
from joulepool.sim.instance import Instance

NAN = math.nan


class GPULedger:
    """Every GPU of the cluster: who holds it, what it has drawn, its node's free list."""

    __slots__ = (
        "busy", "energy", "free_since", "holder", "idle", "n", "node_free", "node_gpus",
        "node_pending", "node_site", "product", "site",
    )

    def __init__(self, cluster: SimCluster) -> None:
        self.site: list[str] = []
        self.product: list[str] = []
        self.idle: list[float] = []  # W when free
        self.node_gpus: dict[str, list[int]] = {}
        self.node_site: dict[str, str] = {}
        for n in cluster.nodes:
            ids = list(range(len(self.site), len(self.site) + n.gpus))
            self.node_gpus[n.name] = ids
            self.node_site[n.name] = n.site
            self.site += [n.site] * n.gpus
            self.product += [n.product] * n.gpus
            self.idle += [cluster.idle_w(n.product)] * n.gpus
        self.n = len(self.site)
        self.holder: list[Instance | None] = [None] * self.n
        self.free_since = [0.0] * self.n  # s, since when a free GPU has idled
        self.energy = [0.0] * self.n  # J charged so far
        self.busy = [0.0] * self.n  # s of prefill or decode charged so far
        self.node_free: dict[str, list[int]] = {k: list(v) for k, v in self.node_gpus.items()}
        self.node_pending: dict[str, deque[Instance]] = {k: deque() for k in self.node_gpus}

    def take(self, inst: Instance, t: float) -> tuple[int, ...] | None:
        """Give ``inst`` the lowest free GPUs of its node at ``t`` (None: not enough)."""
        free = self.node_free[inst.node]
        if len(free) < inst.gpus:
            return None
        ids = tuple(free[: inst.gpus])
        del free[: inst.gpus]
        for g in ids:
            self.energy[g] += self.idle[g] * (t - self.free_since[g])
            self.holder[g] = inst
        return ids

    def give_back(self, inst: Instance, t: float) -> None:
        """Charge ``inst``'s (settled) energy and busy time to its GPUs and free them."""
        share = inst.energy / inst.gpus
        busy = inst.busy_t
        for g in inst.gpu_ids:
            self.energy[g] += share
            self.busy[g] += busy
            self.holder[g] = None
            self.free_since[g] = t
        free = self.node_free[inst.node]
        free.extend(inst.gpu_ids)
        free.sort()

    def cumulative_j(self, g: int, t: float) -> float:
        """Energy GPU ``g`` has drawn from 0 to ``t`` (settles its holder)."""
        h = self.holder[g]
        if h is None:
            return self.energy[g] + self.idle[g] * (t - self.free_since[g])
        h.settle(t)
        return self.energy[g] + h.energy / h.gpus

    def busy_s(self, g: int) -> float:
        """Seconds GPU ``g`` has prefilled or decoded so far (as of its holder's last settle)."""
        h = self.holder[g]
        return self.busy[g] + (h.busy_t if h is not None else 0.0)


class SiteBuckets:
    """Energy per site per carbon step, closed at each step's end."""

    def __init__(self, sites: tuple[str, ...]) -> None:
        self.sites = sites
        self.cum_prev = dict.fromkeys(sites, 0.0)
        self.buckets: dict[str, list[float]] = {s: [] for s in sites}
        self.starts: list[float] = [0.0]

    def close(self, t: float, gpus: GPULedger) -> None:
        """Close the bucket that started at the last close, at ``t``."""
        per_site = dict.fromkeys(self.sites, 0.0)
        for g in range(gpus.n):
            per_site[gpus.site[g]] += gpus.cumulative_j(g, t)
        for s in self.sites:
            self.buckets[s].append(per_site[s] - self.cum_prev[s])
            self.cum_prev[s] = per_site[s]
        self.starts.append(t)

    def carbon_series_g(self, cluster: SimCluster) -> dict[str, list[float]]:
        """Per site, gCO2 of each closed bucket at the site's intensity at the bucket's
        start (bucket k spans ``starts[k]`` to ``starts[k + 1]``)."""
        return {s: [grams_co2(e, cluster.carbon_at(s, self.starts[k]))
                    for k, e in enumerate(self.buckets[s])] for s in self.sites}

    def carbon_g(self, cluster: SimCluster) -> float:
        """gCO2 of the closed buckets: the sum of :meth:`carbon_series_g`."""
        carbon = 0.0
        for series in self.carbon_series_g(cluster).values():
            for g in series:
                carbon += g
        return carbon


class GPUSamples:
    """Clock and power of a few GPUs each tick, for the plots: one per (site, product),
    GPUs that hold an instance at t = 0 first, at most ``limit``."""

    def __init__(self, gpus: GPULedger, limit: int) -> None:
        ids: list[int] = []
        for site, prod in dict.fromkeys(zip(gpus.site, gpus.product, strict=True)):
            same = [g for g in range(gpus.n) if gpus.site[g] == site and gpus.product[g] == prod]
            held = [g for g in same if gpus.holder[g] is not None]
            ids.append((held or same)[0])
        ids.sort(key=lambda g: (gpus.holder[g] is None, g))
        self.ids = sorted(ids[:limit])
        self.names = [f"GPU {g} ({gpus.product[g]}, {gpus.site[g]})" for g in self.ids]
        self.t: list[float] = []
        self.clock: list[list[float]] = [[] for _ in self.ids]
        self.power: list[list[float]] = [[] for _ in self.ids]
        self.prev = [0.0 for _ in self.ids]

    def take(self, t: float, tick_s: float, gpus: GPULedger) -> None:
        """Mean power over the last tick and the clock now (NaN when free)."""
        self.t.append(t)
        for k, g in enumerate(self.ids):
            cum = gpus.cumulative_j(g, t)
            self.power[k].append((cum - self.prev[k]) / tick_s)
            self.prev[k] = cum
            h = gpus.holder[g]
            self.clock[k].append(h.table.clocks[h.ci] if h is not None else NAN)
