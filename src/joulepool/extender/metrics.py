"""Prometheus metrics of one extender app, in its own registry."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

#: decision latency buckets: 25 us .. 5 s
DECISION_BUCKETS = (
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0,
)
JOULE_BUCKETS = (1, 3, 10, 30, 100, 300, 1e3, 3e3, 1e4, 3e4, 1e5)


class Metrics:
    """The extender's metrics; ``registry`` is private to the app."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.decision_seconds = Histogram(
            "joulepool_extender_decision_seconds",
            "Server time per request after the body is read: parse, decide, encode",
            ["verb"], buckets=DECISION_BUCKETS, registry=r,
        )
        self.requests = Counter(
            "joulepool_extender_requests",
            "HTTP requests by verb and status code",
            ["verb", "code"], registry=r,
        )
        self.nodes = Gauge(
            "joulepool_extender_cache_nodes", "Nodes in the node cache", registry=r
        )
        self.pods = Gauge(
            "joulepool_extender_cache_pods", "Non-terminal pods in the node cache", registry=r
        )
        self.plan_version = Gauge(
            "joulepool_extender_plan_version", "version field of the loaded plan (-1: none)",
            registry=r,
        )
        self.plan_errors = Counter(
            "joulepool_extender_plan_errors", "Plans rejected as invalid (last good kept)",
            registry=r,
        )
        self.watch_restarts = Counter(
            "joulepool_extender_watch_restarts",
            "Watch restarts by resource and reason (error, expired)",
            ["resource", "reason"], registry=r,
        )
        self.filtered_out = Counter(
            "joulepool_extender_filtered_nodes",
            "Nodes rejected by filter, by reason class",
            ["reason"], registry=r,
        )
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
        self.scrapes = Counter(
            "joulepool_router_scrapes", "Endpoint metric scrapes by result",
            ["result"], registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def forget_pool(self, pool: str) -> None:
        for g in (self.lam, self.miss_ratio, self.endpoints):
            with contextlib.suppress(KeyError):
                g.remove(pool)
