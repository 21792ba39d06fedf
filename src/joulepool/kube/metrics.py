"""Prometheus metrics every joulepool service with a cluster cache has, in its own registry.

The scheduler extender and the routing service each subclass
:class:`ServiceMetrics` with their component name, so their series are
``joulepool_extender_*`` and ``joulepool_router_*``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

#: decision latency buckets: 25 us .. 5 s
DECISION_BUCKETS = (
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0,
)


class ServiceMetrics:
    """HTTP, cache, plan, watch and engine-scrape metrics of one service; ``registry`` is
    private to the app."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, component: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        p = f"joulepool_{component}"
        self.decision_seconds = Histogram(
            f"{p}_decision_seconds",
            "Server time per request after the body is read: parse, decide, encode",
            ["verb"], buckets=DECISION_BUCKETS, registry=r,
        )
        self.requests = Counter(
            f"{p}_requests", "HTTP requests by verb and status code", ["verb", "code"],
            registry=r,
        )
        self.nodes = Gauge(f"{p}_cache_nodes", "Nodes in the node cache", registry=r)
        self.pods = Gauge(f"{p}_cache_pods", "Non-terminal pods in the node cache", registry=r)
        self.plan_version = Gauge(
            f"{p}_plan_version", "version field of the loaded plan (-1: none)", registry=r,
        )
        self.plan_errors = Counter(
            f"{p}_plan_errors", "Plans rejected as invalid (last good kept)", registry=r,
        )
        self.watch_restarts = Counter(
            f"{p}_watch_restarts", "Watch restarts by resource and reason (error, expired)",
            ["resource", "reason"], registry=r,
        )
        self.scrapes = Counter(
            f"{p}_scrapes", "Metrics page reads (engines once per pod, energy pages) by result",
            ["result"], registry=r,
        )

        self._children: dict[tuple[Any, ...], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once: prometheus_client validates the
        values and takes a lock on every ``labels`` call, a cost per request served."""
        key = (metric, *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def forget_children(self, metrics: Iterable[Any], first_label: str) -> None:
        """Drop the looked-up children of ``metrics`` whose first label value is
        ``first_label`` (after ``metric.remove``, a new child must be looked up)."""
        gone = set(metrics)
        self._children = {k: v for k, v in self._children.items()
                          if not (k[0] in gone and k[1] == first_label)}

    def render(self) -> bytes:
        return generate_latest(self.registry)
