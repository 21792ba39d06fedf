"""Energy, carbon and output tokens per pool, served model and site, as Prometheus counters.

The agent calls :meth:`PoolMeter.record` once per control period with the
per-GPU energy deltas it metered and the work on each GPU (from PodResources
and the plan), and :meth:`PoolMeter.tokens` with each engine's new output
tokens.  J/token and gCO2/token are then PromQL divisions, e.g.::

    sum by (pool) (rate(joulepool_pool_energy_joules_total[5m]))
      / sum by (pool) (rate(joulepool_pool_output_tokens_total[5m]))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge

from joulepool.core.attribution import Work, attribute

WORK_LABELS = ("pool", "model", "site")


class PoolMeter:
    """The per-pool counters in ``registry`` (the agent's)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.energy = Counter(
            "joulepool_pool_energy_joules", "GPU energy spent on the pool's engines",
            WORK_LABELS, registry=registry)
        self.carbon = Counter(
            "joulepool_pool_carbon_grams", "emissions of that energy at the site's grid "
            "intensity (gCO2)", WORK_LABELS, registry=registry)
        self.output_tokens = Counter(
            "joulepool_pool_output_tokens", "output tokens the pool's engines generated",
            WORK_LABELS, registry=registry)
        self.gpu_engines = Gauge(
            "joulepool_gpu_engines", "serving engines using the GPU (0: idle)",
            ("gpu", "product", "node"), registry=registry)
        self.idle = Counter(
            "joulepool_gpu_idle_energy_joules", "energy of GPUs no engine uses",
            ("site",), registry=registry)

    def record(self, gpu_joules: Mapping[str, float], users: Mapping[str, Sequence[Work]],
               site: str, g_per_kwh: float | None) -> None:
        """Count one period's energy (J per GPU id) for the work using each GPU."""
        shares, idle = attribute(gpu_joules, users, g_per_kwh)
        for work, share in shares.items():
            labels = (work.pool, work.model, work.site)
            self.energy.labels(*labels).inc(share.joules)
            self.carbon.labels(*labels).inc(share.grams_co2)
        if idle:
            self.idle.labels(site).inc(idle)

    def engines(self, gpu: tuple[str, str, str], n: int) -> None:
        """How many engines use the GPU labelled (gpu, product, node) now."""
        self.gpu_engines.labels(*gpu).set(n)

    def tokens(self, work: Work, n: float) -> None:
        """Count ``n`` new output tokens of one engine (negative: ignored, a counter reset)."""
        if n > 0:
            self.output_tokens.labels(work.pool, work.model, work.site).inc(n)
