"""Prometheus metrics of the scheduler extender (``joulepool_extender_*``), in its own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from joulepool.kube.metrics import ServiceMetrics


class Metrics(ServiceMetrics):
    """The extender's metrics: the service's own plus filter rejections."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__("extender", registry)
        self.filtered_out = Counter(
            "joulepool_extender_filtered_nodes",
            "Nodes rejected by filter, by reason class",
            ["reason"], registry=self.registry,
        )
        self.fresh_reads = Counter(
            "joulepool_extender_fresh_pod_reads",
            "Re-reads of a node's pods from the API server when filter found every "
            "candidate full, by result: current (the watch was up to date), corrected "
            "(it was behind: pods already deleted or terminating), failed",
            ["result"], registry=self.registry,
        )
