"""Prometheus metrics of the operator: the planner's gauges and the carbon sources.

Served on ``--metrics-port`` (``/metrics``), scraped through the chart's
ServiceMonitor.  Names follow Prometheus conventions; the chart's dashboard
and PrometheusRule use exactly these.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from joulepool.api.models import EnergyPolicySpec
from joulepool.api.plan import PlanDocument
from joulepool.carbon.metrics import CarbonMetrics
from joulepool.pooling import PoolPlan

log = logging.getLogger("joulepool.operator.metrics")

SOLVE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class OperatorMetrics:
    """The operator's metrics in one registry (private unless given)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.carbon = CarbonMetrics(r)
        self.feasible = Gauge(
            "joulepool_plan_feasible", "1 if the latest solve met every pool's demand",
            registry=r)
        self.in_force_feasible = Gauge(
            "joulepool_plan_in_force_feasible", "1 if the plan in force is a feasible plan",
            registry=r)
        self.version = Gauge("joulepool_plan_version", "version of the published plan",
                             registry=r)
        self.objective = Gauge(
            "joulepool_plan_objective",
            "objective of the latest solve over its window (J for energy, gCO2 for carbon)",
            ("objective",), registry=r)
        self.headroom = Gauge(
            "joulepool_plan_headroom_ratio",
            "share of the asked-for queueing headroom the latest plan carries (1: all)",
            registry=r)
        self.solve_seconds = Histogram(
            "joulepool_plan_solve_seconds", "wall time of one MILP solve",
            buckets=SOLVE_BUCKETS, registry=r)
        self.changes = Counter(
            "joulepool_plan_changes", "new plan versions published", registry=r)
        self.planned = Gauge(
            "joulepool_pool_planned_instances", "instances the plan in force gives the pool",
            ("pool",), registry=r)
        self.ready = Gauge(
            "joulepool_pool_ready_instances", "ready instances of the pool's Deployments",
            ("pool",), registry=r)
        self.planned_jpt = Gauge(
            "joulepool_pool_planned_joules_per_token",
            "J/token the plan in force expects of the pool (its profile at the operating point)",
            ("pool", "model"), registry=r)
        self.profile_eps_scale = Gauge(
            "joulepool_profile_eps_scale",
            "measured J/token over the GPUProfile's at the measured operating points, as the "
            "planner and router apply it (1: the profile as is)",
            ("profile", "product", "model"), registry=r)
        self.profile_eps_drift = Gauge(
            "joulepool_profile_eps_drift",
            "1 while the GPUProfile's measured J/token is off by more than the drift threshold",
            ("profile", "product", "model"), registry=r)
        self.target_miss = Gauge(
            "joulepool_policy_target_miss_ratio",
            "deadline-miss ratio the EnergyPolicy targets (pi.targetMissRate)", registry=r)
        self.gpus_used = Gauge(
            "joulepool_plan_gpus", "GPUs by site and product: used by the latest plan, total",
            ("site", "product", "kind"), registry=r)

    def solved(self, plan: PoolPlan) -> None:
        """Record one solve."""
        r = plan.result
        self.feasible.set(1 if r.feasible else 0)
        self.objective.clear()
        self.objective.labels(plan.objective).set(r.objective)
        self.headroom.set(plan.headroom_scale)
        self.solve_seconds.observe(r.solve_time_s)
        self.gpus_used.clear()
        for (site, product), (used, total) in r.capacity.items():
            self.gpus_used.labels(site, product, "used").set(used)
            self.gpus_used.labels(site, product, "total").set(total)

    def pools(self, plan: PlanDocument, ready: Mapping[str, int],
              policy: EnergyPolicySpec) -> None:
        """Per pool of the plan in force: planned vs ready instances and expected J/token
        (pools gone are dropped); the policy's miss-ratio target."""
        for g in (self.planned, self.ready, self.planned_jpt):
            g.clear()
        for key, p in sorted(plan.pools.items()):
            self.planned.labels(key).set(sum(a.instances for a in p.assignments))
            if p.joules_per_token is not None:
                self.planned_jpt.labels(key, p.model).set(p.joules_per_token)
        for key in sorted(set(plan.pools) | set(ready)):  # a planned pool with none ready: 0
            self.ready.labels(key).set(ready.get(key, 0))
        self.target_miss.set(policy.pi.target_miss_rate)


def serve(metrics: OperatorMetrics, address: str, port: int) -> Any:
    """Serve ``/metrics`` on ``address:port`` in a thread; the server, or None when the
    port cannot be bound (logged: losing metrics never stops the planner)."""
    try:
        server, _thread = start_http_server(port, addr=address, registry=metrics.registry)
    except OSError as exc:
        log.error("cannot serve /metrics on %s:%d: %s (the operator runs without it)",
                  address, port, exc)
        return None
    log.info("serving /metrics on %s:%d", address, port)
    return server
