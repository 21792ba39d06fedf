"""core/v1 Events about cluster-scoped objects (GPUProfile, EnergyPolicy, Node).

kopf's ``kopf.warn`` posts an event in the namespace of its client's context (in a
pod: the operator's own namespace) and copies that namespace into
``involvedObject``, which names a namespaced object that does not exist:
``kubectl describe gpuprofile X`` (which looks for an ``involvedObject`` without a
namespace) never shows it. kube-apiserver accepts an Event about a cluster-scoped
object only in namespace ``default`` (or ``kube-system``) when ``involvedObject``
has no namespace, so that is where these go; kopf has no setting for where its events
go (its ``settings.posting`` says whether and from which level). kopf keeps the events
about namespaced objects (InferencePools). docs/operator.md "Events" lists them all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from joulepool.operator.kube import ApiError, KubeClient, path_for

log = logging.getLogger(__name__)

#: where core/v1 Events about cluster-scoped objects must be created (API validation)
EVENT_NAMESPACE = "default"
#: ``source.component`` of the operator's events (the "From" column of kubectl describe)
COMPONENT = "joulepool-operator"


def involved(body: Mapping[str, Any]) -> dict[str, str]:
    """``involvedObject`` of a cluster-scoped object: apiVersion, kind, name, uid (if any);
    never a namespace."""
    meta = body.get("metadata") or {}
    obj = {"apiVersion": str(body.get("apiVersion") or ""), "kind": str(body.get("kind") or ""),
           "name": str(meta.get("name") or "")}
    if meta.get("uid"):
        obj["uid"] = str(meta["uid"])
    return obj


def cluster_event(obj: Mapping[str, str], reason: str, message: str,
                  now: datetime | None = None, type: str = "Warning") -> dict[str, Any]:
    """A core/v1 Event about the cluster-scoped object ``obj`` (see :func:`involved`), in
    :data:`EVENT_NAMESPACE`; its name is the object's name and a nanosecond stamp (as
    client-go's recorder names events)."""
    now = now or datetime.now(UTC)
    stamp = now.isoformat().replace("+00:00", "Z")
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": f"{obj['name']}.{time.time_ns():x}",
                     "namespace": EVENT_NAMESPACE},
        "involvedObject": dict(obj), "reason": reason, "message": message[:1024],
        "type": type, "source": {"component": COMPONENT},
        "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
    }


async def post_cluster_event(client: KubeClient, obj: Mapping[str, str], reason: str,
                             message: str, now: datetime | None = None,
                             type: str = "Warning") -> None:
    """Create :func:`cluster_event` (ApiError on failure)."""
    await client.create(path_for("v1", "events", EVENT_NAMESPACE),
                        cluster_event(obj, reason, message, now, type))


async def warn(client: KubeClient, body: Mapping[str, Any], reason: str, message: str) -> None:
    """A Warning Event about the cluster-scoped object ``body``; a failure is logged, never
    raised (events are auxiliary: the handler that tells goes on)."""
    try:
        await post_cluster_event(client, involved(body), reason, message)
    except ApiError as exc:
        log.warning("could not post the %s event about %s %s: %s", reason,
                    body.get("kind"), (body.get("metadata") or {}).get("name"), exc)
