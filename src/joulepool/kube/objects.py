"""The parts of core/v1 Pod and Node that joulepool reads, as pydantic models.

Used for the objects the cluster cache watches (:mod:`kube.state`) and for the
Pods and Nodes kube-scheduler sends the extender (:mod:`extender.wire`). Unknown
keys are ignored, as Go's decoder does; resource quantities are validated and
bounded on input (:func:`joulepool.api.quantity.parse_quantity`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from joulepool.api.contract import (
    COMPONENT_LABEL,
    ENGINE_LABEL,
    GPU_RESOURCE,
    MODE_LABEL,
    NODE_AGENT_COMPONENT,
    POOL_LABEL,
    PORT_ANNOTATION,
)
from joulepool.api.quantity import Quantity, parse_quantity, quantity_to_int


def _checked_quantity(value: Quantity) -> Quantity:
    parse_quantity(value)
    return value


#: a resource quantity as it appears in Kubernetes JSON, validated on input
CheckedQuantity = Annotated[Quantity, AfterValidator(_checked_quantity)]


class _K8s(BaseModel):
    """Kubernetes JSON: camelCase keys, unknown keys ignored (as Go does)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


# --------------------------------------------------------------------------
# The parts of core/v1 Pod and Node that joulepool reads
# --------------------------------------------------------------------------
def pod_ready(phase: str | None, pod_ip: str | None, deleting: bool,
              conditions: Iterable[tuple[str | None, str | None]]) -> bool:
    """Whether a pod takes requests: Running, Ready condition ``True`` (``conditions``:
    (type, status) pairs), not being deleted, and with an IP. The routing service's rule
    for a serving pod (:attr:`Pod.ready`), and the node agent's for the pods that fill a
    pool's shared instances (``nodeagent.discovery``), so both pick the same ones."""
    if deleting or phase != "Running" or not pod_ip:
        return False
    return any(kind == "Ready" and status == "True" for kind, status in conditions)


class ObjectMeta(_K8s):
    name: str = ""
    namespace: str = ""
    uid: str = ""
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    resource_version: str = Field(default="", alias="resourceVersion")
    deletion_timestamp: str | None = Field(default=None, alias="deletionTimestamp")


class ResourceRequirements(_K8s):
    requests: dict[str, CheckedQuantity] | None = None
    limits: dict[str, CheckedQuantity] | None = None


class ContainerPort(_K8s):
    name: str = ""
    container_port: int = Field(default=0, alias="containerPort")
    protocol: str = "TCP"


class Container(_K8s):
    name: str = ""
    resources: ResourceRequirements | None = None
    ports: list[ContainerPort] | None = None


class PodSpec(_K8s):
    containers: list[Container] | None = None
    init_containers: list[Container] | None = Field(default=None, alias="initContainers")
    overhead: dict[str, CheckedQuantity] | None = None
    node_name: str = Field(default="", alias="nodeName")
    scheduler_name: str = Field(default="", alias="schedulerName")


class Condition(_K8s):
    type: str = ""
    status: str = ""


class PodStatus(_K8s):
    phase: str = ""
    pod_ip: str = Field(default="", alias="podIP")
    conditions: list[Condition] | None = None


class Pod(_K8s):
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: PodSpec = Field(default_factory=PodSpec)
    status: PodStatus = Field(default_factory=PodStatus)

    @property
    def key(self) -> str:
        return f"{self.metadata.namespace}/{self.metadata.name}"

    @property
    def pool(self) -> str | None:
        """The pool key from the ``joulepool.dev/pool`` label, if any."""
        labels = self.metadata.labels or {}
        value = labels.get(POOL_LABEL)
        return value or None

    @property
    def engine(self) -> str | None:
        """The serving engine from the ``joulepool.dev/engine`` label, if any."""
        labels = self.metadata.labels or {}
        return labels.get(ENGINE_LABEL) or None

    @property
    def node_agent(self) -> bool:
        """A joulepool node agent (``app.kubernetes.io/component: node-agent``)."""
        labels = self.metadata.labels or {}
        return labels.get(COMPONENT_LABEL) == NODE_AGENT_COMPONENT

    @property
    def mode(self) -> str | None:
        """The serving mode from the ``joulepool.dev/mode`` label, if any."""
        labels = self.metadata.labels or {}
        value = labels.get(MODE_LABEL)
        return value or None

    def gpu_request(self) -> int:
        return pod_gpu_request(self)

    @property
    def terminal(self) -> bool:
        return self.status.phase in ("Succeeded", "Failed")

    @property
    def ready(self) -> bool:
        """:func:`pod_ready` of this pod."""
        return pod_ready(self.status.phase, self.status.pod_ip,
                         bool(self.metadata.deletion_timestamp),
                         [(c.type, c.status) for c in self.status.conditions or []])

    def serving_port(self, default: int) -> int:
        """Port for requests: annotation, else a container port named http, else the first."""
        ann = (self.metadata.annotations or {}).get(PORT_ANNOTATION, "")
        if ann.isdigit() and 0 < int(ann) < 65536:
            return int(ann)
        ports = [p for c in self.spec.containers or [] for p in c.ports or []]
        for p in ports:
            if p.name == "http" and 0 < p.container_port < 65536:
                return p.container_port
        for p in ports:
            if 0 < p.container_port < 65536:
                return p.container_port
        return default


class NodeSpec(_K8s):
    unschedulable: bool = False


class NodeStatus(_K8s):
    allocatable: dict[str, CheckedQuantity] | None = None
    capacity: dict[str, CheckedQuantity] | None = None
    conditions: list[Condition] | None = None


class Node(_K8s):
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: NodeSpec = Field(default_factory=NodeSpec)
    status: NodeStatus = Field(default_factory=NodeStatus)

    def allocatable_gpus(self) -> int:
        """``status.allocatable`` (capacity when absent) of ``nvidia.com/gpu``."""
        res = self.status.allocatable
        if res is None or GPU_RESOURCE not in res:
            res = self.status.capacity or {}
        return quantity_to_int(res.get(GPU_RESOURCE, 0))

    def label(self, key: str) -> str:
        return (self.metadata.labels or {}).get(key, "")


class NodeList(_K8s):
    items: list[Node] | None = None


# --------------------------------------------------------------------------
# Pod requests
# --------------------------------------------------------------------------
def _container_gpus(c: Container) -> int:
    res = c.resources
    if res is None:
        return 0
    # extended resources: requests must equal limits; a limit alone implies the request
    for source in (res.requests, res.limits):
        if source and GPU_RESOURCE in source:
            return quantity_to_int(source[GPU_RESOURCE])
    return 0


def pod_gpu_request(pod: Pod) -> int:
    """Effective ``nvidia.com/gpu`` request, as the scheduler computes it.

    max(sum over app containers, max over init containers) + pod overhead.
    """
    spec = pod.spec
    app = sum(_container_gpus(c) for c in spec.containers or [])
    init = max((_container_gpus(c) for c in spec.init_containers or []), default=0)
    overhead = quantity_to_int((spec.overhead or {}).get(GPU_RESOURCE, 0))
    return max(app, init) + overhead
