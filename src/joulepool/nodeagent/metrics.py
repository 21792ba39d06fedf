"""Prometheus metrics of one node agent, in its own registry (tests never collide)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from joulepool.api.enginemetrics import GPU_ENERGY

#: labels of the agent's control metrics of one GPU
GPU_LABELS = ("gpu", "product", "node")
#: labels of the GPU measurements: the DCGM exporter's (``gpu``, ``UUID``, ``modelName`` and
#: the ``pod`` / ``namespace`` / ``container`` the GPU is allocated to, "" when none) and ours
DCGM_LABELS = ("gpu", "UUID", "modelName", "product", "node", "pod", "namespace", "container")


@dataclass(frozen=True)
class GPUSample:
    """One GPU's latest measurement, labelled as in :data:`DCGM_LABELS`."""

    labels: tuple[str, str, str, str, str, str, str, str]
    power_w: float
    energy_j: float  # since the agent started
    sm_clock_hz: float


class GPUCollector(Collector):
    """The GPU measurement families, built at each scrape from the agent's last readings,
    so a GPU that changes hands is one series per owner, with no stale series left."""

    def __init__(self, samples: Callable[[], Sequence[GPUSample]]) -> None:
        self.samples = samples

    def collect(self) -> Iterator[Metric]:
        power = GaugeMetricFamily("joulepool_gpu_power_watts", "GPU board power",
                                  labels=DCGM_LABELS)
        energy = CounterMetricFamily(
            GPU_ENERGY,
            "GPU energy since the agent started (NVML counter, else integrated power)",
            labels=DCGM_LABELS)
        clock = GaugeMetricFamily("joulepool_gpu_sm_clock_hertz", "current SM clock",
                                  labels=DCGM_LABELS)
        for s in self.samples():
            power.add_metric(s.labels, s.power_w)
            energy.add_metric(s.labels, s.energy_j)
            clock.add_metric(s.labels, s.sm_clock_hz)
        yield from (power, energy, clock)


class AgentMetrics:
    def __init__(self, node: str, registry: CollectorRegistry | None = None) -> None:
        self.node = node
        self.registry = registry or CollectorRegistry()
        r = self.registry
        #: the agent points this at its GPUs' latest measurements
        self.gpu_samples: Callable[[], Sequence[GPUSample]] = list
        r.register(GPUCollector(lambda: self.gpu_samples()))
        self.target_clock = Gauge(
            "joulepool_gpu_target_clock_hertz",
            "SM clock MIAD locked the GPU to (0: not locked, the driver decides)",
            GPU_LABELS, registry=r)
        self.target_power_limit = Gauge(
            "joulepool_gpu_target_power_limit_watts",
            "power limit MIAD set on the GPU in power mode (0: not set, the default applies)",
            GPU_LABELS, registry=r)
        self.prefill_floor = Gauge(
            "joulepool_miad_prefill_floor_hertz",
            "SM clock MIAD keeps the GPU at or above so the prompt at the engine's recent "
            "prompt-length quantile prefills within its pool's TTFT (0: no floor, or power "
            "mode: see joulepool_miad_prefill_floor_watts)",
            GPU_LABELS, registry=r)
        self.prefill_floor_power = Gauge(
            "joulepool_miad_prefill_floor_watts",
            "power mode: the lowest power limit MIAD sets, the one that keeps the prefill "
            "floor's clock (0: no floor, or clocks mode)", GPU_LABELS, registry=r)
        self.prefill_floor_prompt = Gauge(
            "joulepool_miad_prefill_floor_prompt_tokens",
            "prompt length (tokens) the prefill floor is computed for (0: none known)",
            GPU_LABELS, registry=r)
        self.prefill_floor_state = Gauge(
            "joulepool_miad_prefill_floor_state",
            "1 for the prefill floor's current state: applied, or why not (no_histogram, "
            "no_traffic, no_profile)", (*GPU_LABELS, "state"), registry=r)
        self.signal_tpot = Gauge(
            "joulepool_miad_signal_tpot_seconds",
            "TPOT MIAD compared with its pool's target last period: the engines' mean "
            "inter-token latency over the period (core.controllers.miad_signal; the worst "
            "engine's; NaN: none decoded)", GPU_LABELS, registry=r)
        self.decisions = Counter(
            "joulepool_miad_decisions", "MIAD decisions by direction",
            (*GPU_LABELS, "direction"), registry=r)
        self.eps = Gauge(
            "joulepool_gpu_joules_per_token",
            "online estimate of this GPU's energy per output token of the engine(s) it serves",
            (*GPU_LABELS, "model"), registry=r)
        self.control_errors = Counter(
            "joulepool_control_errors", "failed NVML control or read calls (gpu=all: agent-wide)",
            GPU_LABELS, registry=r)
        self.reset_pending = Gauge(
            "joulepool_gpu_clock_reset_pending",
            "1 while the GPU's clocks may be locked and no reset has succeeded yet "
            "(from start, after a lock, after a failed reset)", GPU_LABELS, registry=r)
        self.gpu_lost = Gauge("joulepool_gpu_lost", "1 while the GPU is lost", GPU_LABELS,
                              registry=r)
        self.monitor_only = Gauge(
            "joulepool_sidecar_monitor_only",
            "1 when the agent cannot lock clocks (no privilege) and only measures",
            ("node",), registry=r)
        self.controllable = Gauge(
            "joulepool_gpu_clock_control_supported",
            "1 if the agent can lock this GPU's clocks", GPU_LABELS, registry=r)
        self.tick_lag = Histogram(
            "joulepool_sidecar_tick_lag_seconds", "control loop start lag behind its schedule",
            ("node",), registry=r,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0))
        self.tick_seconds = Histogram(
            "joulepool_sidecar_tick_seconds", "time one control period took",
            ("node",), registry=r,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0))
        self.scrape_errors = Counter(
            "joulepool_engine_scrape_errors", "failed scrapes of a serving engine's /metrics",
            ("node", "engine"), registry=r)
        self.published = Counter(
            "joulepool_profile_publications", "eps estimates written to GPUProfile status",
            ("node", "result"), registry=r)
        self.monitor_only.labels(node).set(0)

    def gpu(self, index: int, product: str) -> tuple[str, str, str]:
        return (str(index), product, self.node)

    def render(self) -> bytes:
        return generate_latest(self.registry)
