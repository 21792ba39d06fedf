"""Prometheus metrics of the routing service (``joulepool_router_*``), in its own registry,
and the observer through which core's router state machine reports to them."""

from __future__ import annotations

import contextlib
import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from joulepool.core.router import RouteDecision
from joulepool.kube.metrics import ServiceMetrics

JOULE_BUCKETS = (1, 3, 10, 30, 100, 300, 1e3, 3e3, 1e4, 3e4, 1e5)


class Metrics(ServiceMetrics):
    """The service's metrics plus the routing ones, per pool."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__("router", registry)
        r = self.registry
        self.lam = Gauge(
            "joulepool_router_lambda", "JouleSched lambda (J per second of lateness) per pool",
            ["pool"], registry=r,
        )
        self.miss_ratio = Gauge(
            "joulepool_router_deadline_miss_ratio",
            "Deadline-miss ratio over the sliding window per pool",
            ["pool"], registry=r,
        )
        self.endpoints = Gauge(
            "joulepool_router_endpoints", "Routable endpoints per pool", ["pool"], registry=r
        )
        self.predicted_joules = Histogram(
            "joulepool_router_predicted_joules",
            "Predicted energy of each routed request (eps x tokens)",
            ["pool", "tier"], buckets=JOULE_BUCKETS, registry=r,
        )
        self.measured_joules = Counter(
            "joulepool_router_measured_joules",
            "Energy reported by completions (joules field)", ["pool"], registry=r,
        )
        self.completions = Counter(
            "joulepool_router_completions", "Completion reports by outcome",
            ["pool", "deadline"], registry=r,
        )
        self.epp_answers = Counter(
            "joulepool_router_epp_answers",
            "GIE endpoint picker answers by HTTP status: 200 an endpoint picked, else the "
            "ImmediateResponse's (400, 404, 429 bulk shed, 503 no endpoint)",
            ["code"], registry=r,
        )
        self.epp_front_end = Gauge(
            "joulepool_router_epp_front_end_info",
            "The GIE endpoint picker's gRPC front end serving (1): native (C++ grpc++) or "
            "python (grpcio)", ["front_end"], registry=r,
        )

        self.replica_peers = Gauge(
            "joulepool_router_replica_peers",
            "Other router replicas whose counts are fresh (their Leases, read last sync)",
            registry=r,
        )

    def forget_pool(self, pool: str) -> None:
        for g in (self.lam, self.miss_ratio, self.endpoints):
            with contextlib.suppress(KeyError):
                g.remove(pool)
        self.forget_children((self.lam, self.miss_ratio, self.endpoints), pool)


class MetricsObserver:
    """core.router's observer (and kube.pools' pool removal), exporting to :class:`Metrics`."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def endpoints_changed(self, pool: str, count: int) -> None:
        self.m.child(self.m.endpoints, pool).set(count)

    def lambda_changed(self, pool: str, lam: float) -> None:
        self.m.child(self.m.lam, pool).set(lam)

    def routed(self, pool: str, decision: RouteDecision) -> None:
        if math.isfinite(decision.energy_j):  # routing profiles without an energy term: NaN
            self.m.child(self.m.predicted_joules, pool, str(decision.tier)).observe(
                decision.energy_j)

    def completed(self, pool: str, missed: bool, joules: float | None, miss_ratio: float
                  ) -> None:
        self.m.child(self.m.miss_ratio, pool).set(miss_ratio)
        self.m.child(self.m.completions, pool, "missed" if missed else "met").inc()
        if joules is not None:
            self.m.child(self.m.measured_joules, pool).inc(joules)

    def ticked(self, pool: str, miss_ratio: float) -> None:
        self.m.child(self.m.miss_ratio, pool).set(miss_ratio)

    def pool_removed(self, pool: str) -> None:
        self.m.forget_pool(pool)
