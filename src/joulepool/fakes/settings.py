"""Settings of ``joulepool fake-engine`` and ``joulepool device-plugin``.

Flags > env > ``--config`` YAML > defaults, as every component (:mod:`joulepool.settings`);
the variable names are those the kind manifests and the Helm chart set.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import field_validator

from joulepool.api.contract import DEVICE_PLUGIN_DIR, ENGINE_PORT, GPU_RESOURCE
from joulepool.settings import ComponentSettings, setting

#: the fake device plugin's socket file inside the kubelet's device plugin directory
PLUGIN_ENDPOINT = "joulepool-fake-gpu.sock"
#: where Allocate mounts the simulated-GPU state directory in containers
STATE_MOUNT_DIR = "/var/run/joulepool-gpu"
#: model the fake engine serves when none is given
DEFAULT_MODEL = "llama-3.1-8b"


class FakeEngineSettings(ComponentSettings):
    """A stand-in vLLM server on a simulated GPU."""

    CONFIG_ENV: ClassVar[str] = "JOULEPOOL_ENGINE_CONFIG"

    host: str = setting("0.0.0.0", "listen address", env="JOULEPOOL_ENGINE_HOST")
    port: int = setting(ENGINE_PORT, "listen port (0: any free port, printed on start-up)",
                        env="JOULEPOOL_ENGINE_PORT", ge=0, le=65535)
    product: str | None = setting(None, "GPU product (default: the GPU's in --gpu-state, else "
                                  "H100)", env="JOULEPOOL_GPU_PRODUCT")
    model: str = setting(DEFAULT_MODEL, "served model whose profile sets the speed")
    served_model_name: list[str] | None = setting(
        None, "model names the API answers to, as vLLM's flag: --served-model-name a b "
        "(responses name the first; default --model)", variadic=True)
    gpu_state: str | None = setting(
        None, "shared simulated-GPU state file (the node agent's --gpu-state); without it the "
        "engine runs at the product's maximum clock")
    gpu_index: list[int] | None = setting(
        None, "this engine's GPUs in the state, e.g. 0 or 0,1 (default 0 with --gpu-state; the "
        "device plugin's Allocate sets JOULEPOOL_GPU_INDEX)")
    engine: str = setting("vllm", "metric names of the page: vllm (V1 names) or sglang")
    max_batch: int | None = setting(None, "most requests in the running batch (default: the "
                                    "profile's)", ge=1)
    node: str = setting("node", "node name written if the engine creates the state file",
                        env=("JOULEPOOL_NODE", "NODE_NAME"))

    @field_validator("gpu_index", mode="before")
    @classmethod
    def _indices(cls, value: object) -> object:
        """``"0,1"``, ``["0,1"]`` or ``[0, 1]`` -> sorted distinct indices >= 0."""
        if value is None:
            return None
        items = value if isinstance(value, list | tuple) else [value]
        out: set[int] = set()
        for item in items:
            for part in str(item).split(","):
                if not part.strip():
                    continue
                try:
                    index = int(part)
                except ValueError:
                    raise ValueError(f"expected integers like 0 or 0,1, got {part!r}") from None
                if index < 0:
                    raise ValueError("GPU indices must be >= 0")
                out.add(index)
        return sorted(out)


class DevicePluginSettings(ComponentSettings):
    """Fake kubelet device plugin advertising simulated GPUs."""

    CONFIG_ENV: ClassVar[str] = "JOULEPOOL_DEVICE_PLUGIN_CONFIG"

    product: str | None = setting(
        None, "GPU product, e.g. H100 (default: node label nvidia.com/gpu.product)",
        env="JOULEPOOL_GPU_PRODUCT")
    count: int | None = setting(
        None, "number of fake GPUs (default: node label nvidia.com/gpu.count)",
        env="JOULEPOOL_GPU_COUNT", ge=1, le=64)
    resource_name: str = setting(GPU_RESOURCE, "extended resource to advertise")
    kubelet_dir: str = setting(DEVICE_PLUGIN_DIR,
                               "kubelet device plugin directory (holds kubelet.sock)")
    endpoint: str = setting(PLUGIN_ENDPOINT, "this plugin's socket file name inside "
                            "--kubelet-dir", env="JOULEPOOL_PLUGIN_ENDPOINT")
    node: str | None = setting(None, "node name (default $NODE_NAME, else the host name; "
                               "needed to read node labels)", env=("JOULEPOOL_NODE", "NODE_NAME"))
    gpu_state: str | None = setting(
        None, "shared simulated-GPU state file (created if missing); lost GPUs turn Unhealthy")
    gpu_state_host_path: str | None = setting(
        None, "the state file's path on the host, for the containers' mount (default "
        "--gpu-state)")
    state_mount_dir: str = setting(STATE_MOUNT_DIR, "where Allocate mounts the state directory "
                                   "in containers")
    watch_interval: float = setting(1.0, "seconds between checks of kubelet.sock and device "
                                    "health", gt=0)
    kubernetes: Literal["auto", "on", "off"] = setting(
        "auto", "read node labels from the API (auto: when running in a cluster)")
