"""Static sources, so the extender runs without a cluster.

``--plan-file``       the plan document (JSON as in ConfigMap ``joulepool-plan``, or YAML)
``--nodes-file``      Nodes and Pods: a Kubernetes ``List`` (or a bare list) of objects,
                      JSON or YAML; ``kind`` tells Nodes from Pods
``--endpoints-file``  router pools and endpoints (:class:`EndpointsFile`), JSON or YAML

Example endpoints file::

    pools:
      default.chat:
        model: llama-3.1-8b
        tier: interactive
        slo: {ttftSeconds: 0.5, tpotSeconds: 0.05}
        # optional: the traffic its endpoints' batch rooms are sized at (as the plan's)
        mix: {requestsPerSecond: 4, meanInputTokens: 1200, meanOutputTokens: 250}
        endpoints:
          - address: 10.0.0.7:8000
            node: gpu-h100-0          # optional: placement sees its queue
            product: H100             # with the pool's model picks the profile
            gpus: 1
          - address: 10.0.0.8:8000
            joulesPerToken: 0.35      # or give the numbers directly
            tokensPerSecond: 900
            metricsUrl: http://10.0.0.8:8000/metrics   # optional: scrape queue depth

Files are re-read when their modification time changes (``--file-poll-seconds``);
a file that fails to parse leaves the previous contents in force.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from joulepool.api.load import load_yaml
from joulepool.api.plan import PlannedMix, PlannedSLO
from joulepool.core.classes import Tier


class FileError(ValueError):
    """A static source could not be read or validated."""


_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})$")


def check_address(value: str) -> str:
    m = _ADDRESS.match(value)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise ValueError(f"address must be host:port, got {value!r}")
    return value


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class EndpointEntry(_File):
    address: str
    node: str = ""
    product: str | None = None
    model: str | None = None
    gpus: int = Field(default=1, ge=1, le=64)
    joules_per_token: float | None = Field(default=None, alias="joulesPerToken", gt=0, le=1e6)
    tokens_per_second: float | None = Field(default=None, alias="tokensPerSecond", gt=0, le=1e9)
    waiting: int = Field(default=0, ge=0)
    running: int = Field(default=0, ge=0)
    queue_tokens: float = Field(default=0.0, alias="queueTokens", ge=0)
    metrics_url: str | None = Field(default=None, alias="metricsUrl")
    #: ``namespace/name`` of the serving pod (its GPU energy is published under it)
    pod: str | None = Field(default=None, pattern=r"^[a-z0-9.-]+/[a-z0-9.-]+$")

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        return check_address(v)


class PoolEntry(_File):
    model: str | None = None
    #: the names requests may give as ``model`` (empty: ``model``)
    served_model_names: list[str] = Field(default_factory=list, alias="servedModelNames")
    tier: Tier = Tier.INTERACTIVE
    slo: PlannedSLO | None = None
    #: the traffic its endpoints' batch rooms are sized at (needs ``slo``; as the plan's
    #: ``PlannedPool.mix``); None: the TPOT operating batch
    mix: PlannedMix | None = None
    endpoints: list[EndpointEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _mix_with_slo(self) -> PoolEntry:
        if self.mix is not None and self.slo is None:
            raise ValueError("mix needs slo: the rooms are sized at the pool's TTFT and TPOT")
        return self


class EndpointsFile(_File):
    pools: dict[str, PoolEntry] = Field(default_factory=dict)


def read_structured(path: str | Path) -> Any:
    """JSON or YAML file contents."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise FileError(f"{p}: cannot read: {exc.strerror}") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        pass
    try:
        return load_yaml(text)
    except yaml.YAMLError as exc:
        raise FileError(f"{p}: neither JSON nor YAML: {exc}") from None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    return f"{loc}: {err['msg']}" if loc else str(err["msg"])


def load_endpoints_file(path: str | Path) -> EndpointsFile:
    data = read_structured(path)
    try:
        return EndpointsFile.model_validate(data)
    except ValidationError as exc:
        raise FileError(f"{path}: {_first_error(exc)}") from None


def load_plan_text(path: str | Path) -> str:
    """The plan as JSON text (YAML files are converted)."""
    data = read_structured(path)
    if not isinstance(data, dict):
        raise FileError(f"{path}: a plan must be a mapping")
    return json.dumps(data, default=str)


def load_objects(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(nodes, pods) from a List / list / multi-kind file."""
    data = read_structured(path)
    items = data
    if isinstance(data, dict):
        items = data.get("items") if "items" in data else [data]
    if not isinstance(items, list):
        raise FileError(f"{path}: expected a List of Nodes and Pods")
    nodes: list[dict[str, Any]] = []
    pods: list[dict[str, Any]] = []
    for i, obj in enumerate(items):
        if not isinstance(obj, dict):
            raise FileError(f"{path}: item {i} is not an object")
        kind = obj.get("kind")
        if kind == "Node":
            nodes.append(obj)
        elif kind == "Pod":
            pods.append(obj)
        else:
            raise FileError(f"{path}: item {i}: kind must be Node or Pod, got {kind!r}")
    return nodes, pods


def mtime(path: str | Path) -> float | None:
    try:
        return Path(path).stat().st_mtime_ns / 1e9
    except OSError:
        return None
