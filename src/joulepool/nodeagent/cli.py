"""``joulepool sidecar``: the node agent (light module: heavy imports inside ``run``)."""

from __future__ import annotations

import argparse
import os
import socket

from joulepool import envflags as ef
from joulepool.core.controllers import MIADController

DEFAULT_NAMESPACE = "joulepool-system"


def _node_default() -> str:
    return os.environ.get("JOULEPOOL_NODE") or os.environ.get("NODE_NAME") or socket.gethostname()


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Node agent: per-GPU MIAD clock control from the local engines' SLO signals, energy "
        "metering and online J/token estimates. Resets locked clocks on start, on SIGTERM/SIGINT "
        "and after control errors; runs monitor-only without CAP_SYS_ADMIN."
    )
    g = parser.add_argument_group("GPUs")
    ef.add(g, "--backend", "JOULEPOOL_BACKEND", "nvml", choices=("nvml", "simulated"),
           help="NVML backend: the real driver, or simulated GPUs")
    ef.add(g, "--node", "JOULEPOOL_NODE", None,
           help="node name (default $NODE_NAME, else the host name)")
    ef.add(g, "--gpu-state", "JOULEPOOL_GPU_STATE", None,
           help="simulated backend: shared GPU state file (created if missing; shared with "
                "fake-engine and device-plugin); in memory if unset")
    ef.add(g, "--product", "JOULEPOOL_GPU_PRODUCT", "H100",
           help="simulated backend: GPU product when the state is created")
    ef.add(g, "--count", "JOULEPOOL_GPU_COUNT", 1, type=int,
           help="simulated backend: number of GPUs when the state is created")
    ef.add_bool(g, "--sim-unprivileged", "JOULEPOOL_SIM_UNPRIVILEGED",
                help="simulated backend: answer NO_PERMISSION to clock changes")
    c = parser.add_argument_group("control")
    ef.add(c, "--interval", "JOULEPOOL_INTERVAL", 1.0, type=float,
           help="control period, seconds")
    ef.add(c, "--k-inc", "JOULEPOOL_MIAD_K_INC", MIADController.k_inc, type=float,
           help="MIAD multiplicative increase factor")
    ef.add(c, "--step-mhz", "JOULEPOOL_MIAD_STEP_MHZ", MIADController.step_mhz, type=float,
           help="MIAD additive decrease step, MHz")
    ef.add(c, "--margin", "JOULEPOOL_MIAD_MARGIN", MIADController.margin, type=float,
           help="MIAD safety margin: at risk above target*(1-margin)")
    ef.add(c, "--tail-quantile", "JOULEPOOL_TAIL_QUANTILE", 0.9, type=float,
           help="latency quantile MIAD compares with the SLO")
    ef.add(c, "--window", "JOULEPOOL_WINDOW_SECONDS", 10.0, type=float,
           help="seconds of engine histograms the tail is taken over")
    ef.add(c, "--stale-after", "JOULEPOOL_STALE_SECONDS", 5.0, type=float,
           help="seconds without a good scrape after which an engine's GPUs are unlocked")
    ef.add(c, "--ttft-slo", "JOULEPOOL_TTFT_SLO", None, type=float,
           help="fallback TTFT target, seconds, for engines whose pool the plan does not name")
    ef.add(c, "--tpot-slo", "JOULEPOOL_TPOT_SLO", None, type=float,
           help="fallback TPOT target, seconds (give both or neither)")
    ef.add(c, "--lost-retry", "JOULEPOOL_LOST_RETRY_SECONDS", 30.0, type=float,
           help="seconds between probes of a lost GPU")
    e = parser.add_argument_group("engines and plan")
    ef.add_list(e, "--engine-url", "JOULEPOOL_ENGINE_URLS",
                help="engine metrics endpoint, [GPU[,GPU]@]http://host:port[/metrics]")
    ef.add(e, "--engine-discovery", "JOULEPOOL_ENGINE_DISCOVERY", "auto",
           choices=("auto", "pods", "off"),
           help="find engines from pods on this node labelled joulepool.dev/pool (auto: in a "
                "cluster and no --engine-url)")
    ef.add(e, "--pod-resources-socket", "JOULEPOOL_POD_RESOURCES_SOCKET",
           "/var/lib/kubelet/pod-resources/kubelet.sock",
           help="kubelet PodResources socket: maps discovered engines to the GPUs allocated "
                "to their pods (nvidia.com/gpu device IDs = GPU UUIDs); 'off' to rely on the "
                "joulepool.dev/gpus annotation only")
    ef.add(e, "--pool", "JOULEPOOL_POOL", None,
           help="pool key (namespace.name) of the --engine-url engines")
    ef.add(e, "--plan-file", "JOULEPOOL_PLAN_FILE", None,
           help="plan JSON file instead of the joulepool-plan ConfigMap")
    ef.add(e, "--namespace", "JOULEPOOL_NAMESPACE",
           os.environ.get("POD_NAMESPACE") or DEFAULT_NAMESPACE,
           help="namespace of the joulepool-plan ConfigMap")
    ef.add(e, "--plan-refresh", "JOULEPOOL_PLAN_REFRESH_SECONDS", 30.0, type=float,
           help="seconds between plan reads")
    ef.add(e, "--energy-policy", "JOULEPOOL_ENERGY_POLICY", "default",
           help="EnergyPolicy whose spec.miad overrides --k-inc/--step-mhz/--margin while it "
                "exists ('none' to ignore policies)")
    ef.add(e, "--kubernetes", "JOULEPOOL_KUBERNETES", "auto", choices=("auto", "on", "off"),
           help="use the Kubernetes API (auto: when running in a cluster)")
    ef.add(e, "--publish-interval", "JOULEPOOL_PUBLISH_INTERVAL", 60.0, type=float,
           help="minimum seconds between GPUProfile status updates per product/model")
    ef.add_bool(e, "--publish", "JOULEPOOL_PUBLISH", default=True,
                help="publish J/token estimates to GPUProfile status (needs the Kubernetes API)")
    m = parser.add_argument_group("metrics")
    ef.add(m, "--metrics-host", "JOULEPOOL_METRICS_HOST", "0.0.0.0",
           help="address for /metrics and /healthz")
    ef.add(m, "--metrics-port", "JOULEPOOL_METRICS_PORT", 9400, type=int,
           help="port for /metrics and /healthz (0: none)")


def run(args: argparse.Namespace) -> int:
    from joulepool.nodeagent.runner import run_sidecar

    return run_sidecar(args)
