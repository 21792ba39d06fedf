"""Prometheus metrics of the carbon sources (registered in the operator's registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

SOURCE_LABELS = ("site", "provider")


class CarbonMetrics:
    """One set per operator process; ``registry`` defaults to a private one."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.intensity = Gauge(
            "joulepool_carbon_intensity_grams_per_kwh",
            "grid carbon intensity the planner uses for the site now, gCO2/kWh",
            ("site",), registry=r)
        self.up = Gauge(
            "joulepool_carbon_source_up", "1 if the last fetch of the site's source succeeded",
            SOURCE_LABELS, registry=r)
        self.stale = Gauge(
            "joulepool_carbon_source_stale",
            "1 while the source has no data fresher than staleAfterSeconds",
            SOURCE_LABELS, registry=r)
        self.last_success = Gauge(
            "joulepool_carbon_source_last_success_timestamp_seconds",
            "time of the last successful fetch (0: never)", SOURCE_LABELS, registry=r)
        self.horizon = Gauge(
            "joulepool_carbon_source_horizon_seconds",
            "seconds ahead the source's data covers", SOURCE_LABELS, registry=r)
        self.errors = Counter(
            "joulepool_carbon_source_errors", "failed fetches by reason",
            (*SOURCE_LABELS, "reason"), registry=r)
