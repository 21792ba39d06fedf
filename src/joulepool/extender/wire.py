"""Wire types: ``k8s.io/kube-scheduler/extender/v1`` and the parts of Pod/Node we read.

The Go structs in ``k8s.io/kube-scheduler/extender/v1/types.go`` carry no
``json`` tags, so encoding/json uses the Go field names verbatim:

    ExtenderArgs          {Pod, Nodes, NodeNames}
    ExtenderFilterResult  {Nodes, NodeNames, FailedNodes, FailedAndUnresolvableNodes, Error}
    HostPriorityList      [{Host, Score}]        Score: int64, 0..MaxExtenderPriority (10)

Nested ``Pod`` / ``NodeList`` objects are ordinary Kubernetes JSON
(camelCase; :mod:`joulepool.kube.objects`). Nil pointers are sent as ``null``:
kube-scheduler fills exactly one of ``Nodes`` (``nodeCacheCapable: false``) and ``NodeNames``
(``nodeCacheCapable: true``). Go's decoder ignores unknown keys, so ours do too.

The Helm chart renders the KubeSchedulerConfiguration ``extenders`` entry
from :data:`DEFAULT_PORT`, :data:`DEFAULT_PREFIX` and :data:`VERBS`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from joulepool.core.cost import MAX_SCORE
from joulepool.kube.objects import Node, NodeList, Pod

__all__ = [
    "MAX_EXTENDER_PRIORITY", "MIN_EXTENDER_PRIORITY", "VERBS", "ExtenderArgs",
    "ExtenderFilterResult", "HostPriority", "Node", "NodeList", "Pod",
]

#: kube-scheduler posts to ``<urlPrefix>/<verb>``: filterVerb and prioritizeVerb.
VERBS = ("filter", "prioritize")

MIN_EXTENDER_PRIORITY = 0
#: kube-scheduler's MaxExtenderPriority (core's scores run 0..MAX_SCORE)
MAX_EXTENDER_PRIORITY = MAX_SCORE


# --------------------------------------------------------------------------
# k8s.io/kube-scheduler/extender/v1
# --------------------------------------------------------------------------
class ExtenderArgs(BaseModel):
    """Body of ``POST <prefix>/filter`` and ``POST <prefix>/prioritize``."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    pod: Pod | None = Field(default=None, alias="Pod")
    nodes: NodeList | None = Field(default=None, alias="Nodes")
    node_names: list[str] | None = Field(default=None, alias="NodeNames")


class ExtenderFilterResult(BaseModel):
    """Answer to filter. ``Nodes`` echoes the caller's Node objects unchanged."""

    model_config = ConfigDict(populate_by_name=True)
    nodes: dict[str, Any] | None = Field(default=None, alias="Nodes")
    node_names: list[str] | None = Field(default=None, alias="NodeNames")
    failed_nodes: dict[str, str] = Field(default_factory=dict, alias="FailedNodes")
    failed_and_unresolvable_nodes: dict[str, str] = Field(
        default_factory=dict, alias="FailedAndUnresolvableNodes"
    )
    error: str = Field(default="", alias="Error")

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True)


class HostPriority(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    host: str = Field(alias="Host")
    score: int = Field(alias="Score", ge=MIN_EXTENDER_PRIORITY, le=MAX_EXTENDER_PRIORITY)
