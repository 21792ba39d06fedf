"""Settings of ``joulepool node-agent`` (flags > env > ``--config`` YAML > defaults).

The layering is :mod:`joulepool.settings`; the flag and variable names are those the
Helm chart's DaemonSet sets. Control defaults come from :class:`AgentConfig` and the
MIAD physics defaults from :class:`joulepool.core.controllers.MIADController`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import model_validator

from joulepool.api.contract import (
    DEFAULT_NAMESPACE,
    NODE_AGENT_METRICS_PORT,
    POD_RESOURCES_SOCKET,
)
from joulepool.core.controllers import MIAD_TTFT_QUANTILE, MIAD_TTFT_WINDOW_S, MIADController
from joulepool.nodeagent.agent import AgentConfig
from joulepool.nodeagent.signals import PROMPT_WINDOW_S
from joulepool.settings import ComponentSettings, setting

GPUS, CONTROL, ENGINES, METRICS = "GPUs", "control", "engines and plan", "metrics"
ONE_SHOT = "one-shot modes (uninstall)"


class NodeAgentSettings(ComponentSettings):
    """Every setting of the node agent; see ``joulepool node-agent --help``."""

    CONFIG_ENV: ClassVar[str] = "JOULEPOOL_NODE_AGENT_CONFIG"

    # -- GPUs -----------------------------------------------------------------------------------
    backend: Literal["nvml", "simulated"] = setting(
        "nvml", "NVML backend: the real driver, or simulated GPUs", group=GPUS)
    node: str | None = setting(
        None, "node name (default $NODE_NAME, else the host name)",
        env=("JOULEPOOL_NODE", "NODE_NAME"), group=GPUS)
    gpu_state: str | None = setting(
        None, "simulated backend: shared GPU state file (created if missing; shared with "
        "fake-engine and device-plugin); in memory if unset", group=GPUS)
    product: str = setting("H100", "simulated backend: GPU product when the state is created",
                           env="JOULEPOOL_GPU_PRODUCT", group=GPUS)
    count: int = setting(1, "simulated backend: number of GPUs when the state is created",
                         env="JOULEPOOL_GPU_COUNT", group=GPUS, ge=1)
    sim_unprivileged: bool = setting(
        False, "simulated backend: answer NO_PERMISSION to clock changes", group=GPUS)

    # -- control --------------------------------------------------------------------------------
    interval: float = setting(AgentConfig.interval_s, "control period, seconds", group=CONTROL,
                              gt=0)
    k_inc: float = setting(MIADController.k_inc, "MIAD multiplicative increase factor (> 1)",
                           env="JOULEPOOL_MIAD_K_INC", group=CONTROL, gt=1)
    step_mhz: float = setting(MIADController.step_mhz, "MIAD additive decrease step, MHz",
                              env="JOULEPOOL_MIAD_STEP_MHZ", group=CONTROL, gt=0)
    margin: float = setting(MIADController.margin,
                            "MIAD safety margin: at risk above target*(1-margin)",
                            env="JOULEPOOL_MIAD_MARGIN", group=CONTROL, ge=0, lt=1)
    tail_quantile: float = setting(
        MIAD_TTFT_QUANTILE, "quantile of the first tokens in the window MIAD compares with "
        "the TTFT target (1: the worst, read as the upper bound of its histogram bucket)",
        group=CONTROL, gt=0, le=1)
    window: float = setting(
        MIAD_TTFT_WINDOW_S, "seconds of first tokens MIAD's TTFT tail is taken over (0, or up "
        "to one period: those since the previous period; the TPOT side is always the "
        "period's mean inter-token latency)", env="JOULEPOOL_WINDOW_SECONDS", group=CONTROL,
        ge=0)
    prompt_window: float = setting(
        PROMPT_WINDOW_S, "seconds of the engine's prompt-length histogram MIAD's prefill clock "
        "floor reads its prompt quantile over", env="JOULEPOOL_PROMPT_WINDOW_SECONDS",
        group=CONTROL, gt=0)
    stale_after: float = setting(
        5.0, "seconds without a good scrape after which an engine's GPUs are unlocked",
        env="JOULEPOOL_STALE_SECONDS", group=CONTROL, gt=0)
    ttft_slo: float | None = setting(
        None, "fallback TTFT target, seconds, for engines whose pool the plan does not name",
        group=CONTROL, gt=0)
    tpot_slo: float | None = setting(
        None, "fallback TPOT target, seconds (give both or neither)", group=CONTROL, gt=0)
    lost_retry: float = setting(AgentConfig.lost_retry_s, "seconds between probes of a lost GPU",
                                env="JOULEPOOL_LOST_RETRY_SECONDS", group=CONTROL, gt=0)
    control: Literal["clocks", "power"] = setting(
        "clocks", "what MIAD steers: locked SM clocks (nvmlDeviceSetGpuLockedClocks), or the "
        "GPU's power limit (nvmlDeviceSetPowerManagementLimit, within the device's "
        "constraints); either is reset on stop and by --reset-and-exit", group=CONTROL)
    power_step: float = setting(
        AgentConfig.power_step_w, "power mode: MIAD additive decrease step, watts",
        env="JOULEPOOL_MIAD_POWER_STEP_WATTS", group=CONTROL, gt=0)
    call_timeout: float = setting(
        AgentConfig.call_timeout_s,
        "longest wait for one NVML call, seconds; a longer one counts as a failed call",
        env="JOULEPOOL_GPU_CALL_TIMEOUT_SECONDS", group=CONTROL, gt=0)
    reset_grace: float = setting(
        AgentConfig.reset_grace_s,
        "on stop, retry failed clock resets with backoff for at most this many seconds (keep "
        "below the pod's terminationGracePeriodSeconds)",
        env="JOULEPOOL_RESET_GRACE_SECONDS", group=CONTROL, ge=0)

    # -- engines and plan -----------------------------------------------------------------------
    engine_url: list[str] = setting(
        [], "engine metrics endpoint, [GPU[,GPU]@]http://host:port[/metrics]",
        env="JOULEPOOL_ENGINE_URLS", group=ENGINES)
    engine_discovery: Literal["auto", "pods", "off"] = setting(
        "auto", "find engines from pods on this node labelled joulepool.dev/pool (auto: in a "
        "cluster and no --engine-url)", group=ENGINES)
    pod_resources_socket: str = setting(
        POD_RESOURCES_SOCKET,
        "kubelet PodResources socket: maps discovered engines to the GPUs allocated to their "
        "pods (nvidia.com/gpu device IDs = GPU UUIDs); 'off' to rely on the joulepool.dev/gpus "
        "annotation only", group=ENGINES)
    pool: str | None = setting(None, "pool key (namespace.name) of the --engine-url engines",
                               group=ENGINES)
    plan_file: str | None = setting(None, "plan JSON file instead of the joulepool-plan ConfigMap",
                                    group=ENGINES)
    namespace: str = setting(DEFAULT_NAMESPACE, "namespace of the joulepool-plan ConfigMap",
                             env=("JOULEPOOL_NAMESPACE", "POD_NAMESPACE"), group=ENGINES)
    plan_refresh: float = setting(30.0, "seconds between plan reads",
                                  env="JOULEPOOL_PLAN_REFRESH_SECONDS", group=ENGINES, gt=0)
    energy_policy: str = setting(
        "default", "EnergyPolicy whose spec.miad overrides --k-inc/--step-mhz/--margin and "
        "--interval while it exists ('none' to ignore policies)", group=ENGINES)
    kubernetes: Literal["auto", "on", "off"] = setting(
        "auto", "use the Kubernetes API (auto: when running in a cluster)", group=ENGINES)
    publish_interval: float = setting(
        60.0, "minimum seconds between GPUProfile status updates per product/model, and "
        "between updates of a pool's observed prompt lengths (for those capped at 300 s: "
        "the operator ignores entries older than 900 s)",
        group=ENGINES, gt=0)
    publish: bool = setting(
        True, "publish J/token estimates to GPUProfile status (needs the Kubernetes API)",
        group=ENGINES)

    # -- one-shot modes (the chart's uninstall hooks) ---------------------------------------------
    reset_and_exit: bool = setting(
        False, "reset every GPU's clocks (retried for --reset-grace), then exit: 0 when none is "
        "left locked, 1 otherwise", group=ONE_SHOT)
    hold: bool = setting(
        False, "wait for SIGTERM / SIGINT, then exit 0 (after a successful reset with "
        "--reset-and-exit; alone: touches no GPU); keeps the uninstall reset DaemonSet's pods "
        "Ready", group=ONE_SHOT)
    await_pods_gone: str | None = setting(
        None, "wait until no pod with this label selector is left in --namespace, then exit",
        group=ONE_SHOT)
    await_daemonset: str | None = setting(
        None, "wait until every pod of these DaemonSets (comma-separated) in --namespace is "
        "ready, then exit", group=ONE_SHOT)
    await_timeout: float = setting(
        120.0, "give up waiting after this many seconds (exit 1)",
        env="JOULEPOOL_AWAIT_TIMEOUT_SECONDS", group=ONE_SHOT, gt=0)

    # -- metrics --------------------------------------------------------------------------------
    metrics_host: str = setting("0.0.0.0", "address for /metrics and /healthz", group=METRICS)
    metrics_port: int = setting(NODE_AGENT_METRICS_PORT, "port for /metrics and /healthz "
                                "(0: none)", group=METRICS, ge=0, le=65535)

    @model_validator(mode="after")
    def _slo_pair(self) -> NodeAgentSettings:
        if (self.ttft_slo is None) != (self.tpot_slo is None):
            raise ValueError("give both --ttft-slo and --tpot-slo, or neither")
        return self
