"""GIE pools: one Gateway API Inference Extension ``InferencePool`` per joulepool pool.

When GIE's CRD (``inferencepools.inference.networking.k8s.io``, version ``v1``)
is served, the operator applies, for each of its pools (``inferencepools.joulepool.dev``,
short name ``jpool``), a GIE ``InferencePool`` of the same name and namespace:

* ``spec.selector.matchLabels``: the pool label (``joulepool.dev/pool``) the
  operator puts on every serving pod of the pool;
* ``spec.targetPorts``: the serving port (``spec.port``, else the template's
  container port named ``http``, else its first, else 8000: the router's rule);
* ``spec.endpointPickerRef``: joulepool's picker Service (``joulepool router
  --epp-port``) and its gRPC port, with the configured ``failureMode``.

It is owned by the joulepool pool (controller owner reference), so the garbage
collector deletes it with the pool; a user attaches an ``HTTPRoute`` to it and a
conformant gateway asks joulepool's picker for every request.

GIE's ``endpointPickerRef`` names a Service in the pool's own namespace. The
chart's picker Service is in the release namespace; for a pool elsewhere the
condition says (reason ``PickerServiceElsewhere``) that the user provides the
Service there (docs/gateway.md): the operator does not create Services in user
namespaces (no cluster-wide Service write permission, in particular no
``ExternalName`` Services).

Without the CRD nothing is written; the pool's ``GatewayPool`` condition says why.

While the operator manages GIE pools (:attr:`GatewayPools.manages_gie_pools`) the
planner does not share instances between pools (EnergyPolicy ``shareInstances`` is
withheld): a GIE pool's label selector reaches only its own pool's pods, so a guest pool
served on a host pool's instances would have no endpoints behind the gateway. The
``GatewayPool`` condition says so (docs/planner.md "Not shared where the operator
manages GIE pools").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any, cast

import kopf

from joulepool.api.contract import (
    ENGINE_PORT,
    GIE_API_VERSION,
    GIE_GROUP,
    GIE_POOL_KIND,
    GIE_POOL_PLURAL,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    POOL_LABEL,
    PORT_ANNOTATION,
)
from joulepool.api.models import InferencePool
from joulepool.kube.objects import Pod
from joulepool.operator.config import PickerRef
from joulepool.operator.kube import ApiError, KubeClient, path_for
from joulepool.operator.resources import PoolEntry

log = logging.getLogger("joulepool.operator.gateway")

#: the pool condition this module writes
GATEWAY_POOL = "GatewayPool"
GIE_CRD_NAME = f"{GIE_POOL_PLURAL}.{GIE_GROUP}"


def serving_port(pool: InferencePool) -> int:
    """The port requests go to on the pool's pods: the router's own rule
    (:meth:`joulepool.kube.objects.Pod.serving_port`) applied to the pod template."""
    template = pool.spec.template
    meta = dict(template.get("metadata") or {})
    if pool.spec.port is not None:
        meta["annotations"] = {**(meta.get("annotations") or {}),
                               PORT_ANNOTATION: str(pool.spec.port)}
    try:
        pod = Pod.model_validate({"metadata": meta, "spec": template.get("spec") or {}})
    except ValueError:
        return pool.spec.port or ENGINE_PORT
    return pod.serving_port(ENGINE_PORT)


def gie_pool(entry: PoolEntry, pool: InferencePool, picker: PickerRef) -> dict[str, Any]:
    """The GIE ``InferencePool`` of a joulepool pool: a full object for server-side apply."""
    body: dict[str, Any] = {
        "apiVersion": GIE_API_VERSION,
        "kind": GIE_POOL_KIND,
        "metadata": {"name": entry.name, "namespace": entry.namespace,
                     "labels": {POOL_LABEL: entry.key, MANAGED_BY_LABEL: MANAGED_BY}},
        "spec": {
            "selector": {"matchLabels": {POOL_LABEL: entry.key}},
            "targetPorts": [{"number": serving_port(pool)}],
            "endpointPickerRef": {
                "group": "", "kind": "Service", "name": picker.service,
                "port": {"number": picker.port}, "failureMode": picker.failure_mode,
            },
        },
    }
    kopf.adopt(body, owner=kopf.Body(cast(Any, entry.ref())))
    return body


def condition(status: bool, reason: str, message: str) -> dict[str, Any]:
    return {"type": GATEWAY_POOL, "status": "True" if status else "False",
            "reason": reason, "message": message[:1024]}


class GatewayPools:
    """Applies the GIE pools each reconcile pass; remembers each pool's condition."""

    def __init__(self, client: KubeClient, picker: PickerRef | None) -> None:
        self.client = client
        self.picker = picker
        self.conditions: dict[str, dict[str, Any]] = {}
        self.crd_present: bool | None = None
        #: the EnergyPolicy asks for shared instances and :attr:`manages_gie_pools`
        #: withholds them (the planner sets it each pass; the condition says so)
        self.sharing_withheld = False

    @property
    def manages_gie_pools(self) -> bool:
        """GIE pools are (or, discovery not answered yet, may be) written: a picker is
        configured and GIE's CRD was not found missing. Instances are then not shared."""
        return self.picker is not None and self.crd_present is not False

    async def discover(self) -> list[str]:
        """Refresh :attr:`crd_present` from API discovery (kept on an error, which is
        returned for the pass report); logs a change."""
        if self.picker is None:
            return []
        try:
            present = await self.gie_served()
        except ApiError as exc:
            return [f"discovery of {GIE_API_VERSION}: {exc}"]
        if present != self.crd_present:
            log.info("GIE InferencePool %s %s", GIE_API_VERSION,
                     "served: creating gateway pools" if present else "not served")
            self.crd_present = present
        return []

    async def gie_served(self) -> bool:
        """GIE's InferencePool v1 is served (API discovery; allowed to every user)."""
        try:
            doc = await self.client.get(f"/apis/{GIE_API_VERSION}")
        except ApiError as exc:
            if exc.not_found:
                return False
            raise
        resources = (doc or {}).get("resources") or []
        return any(r.get("name") == GIE_POOL_PLURAL for r in resources)

    async def reconcile(self, live: Mapping[str, PoolEntry],
                        plannable: Mapping[str, InferencePool],
                        sem: asyncio.Semaphore) -> list[str]:
        """Apply every pool's GIE pool (GIE's CRD as :meth:`discover` last found it);
        the errors (for the pass report)."""
        self.conditions = {}
        if self.picker is None:
            for key in live:
                self.conditions[key] = condition(
                    False, "PickerDisabled", "no endpoint picker configured "
                    "(--epp-service): no GIE InferencePool is created")
            return []
        if self.crd_present is None:
            return []  # discovery has not answered yet (its error is in the report)
        present = self.crd_present
        errors: list[str] = []

        async def one(entry: PoolEntry, pool: InferencePool) -> None:
            async with sem:
                self.conditions[entry.key] = await self._apply(entry, pool, errors)

        if not present:
            for key in live:
                self.conditions[key] = condition(
                    False, "CRDNotInstalled",
                    f"GIE's CRD {GIE_CRD_NAME} ({GIE_API_VERSION}) is not installed: "
                    "no gateway pool; install the Gateway API Inference Extension to "
                    "route through a gateway")
            return errors
        await asyncio.gather(*(one(live[k], p) for k, p in plannable.items()
                               if k in live and not live[k].deleting))
        return errors

    async def _apply(self, entry: PoolEntry, pool: InferencePool, errors: list[str]
                     ) -> dict[str, Any]:
        assert self.picker is not None
        body = gie_pool(entry, pool, self.picker)
        try:
            await self.client.apply(path_for(GIE_API_VERSION, GIE_POOL_PLURAL,
                                             entry.namespace, entry.name), body)
        except ApiError as exc:
            errors.append(f"GIE InferencePool {entry.key}: {exc}")
            return condition(False, "ApplyFailed", f"the API refused the GIE "
                             f"InferencePool: {exc}")
        port = body["spec"]["targetPorts"][0]["number"]
        message = (f"GIE InferencePool {entry.namespace}/{entry.name} selects "
                   f"{POOL_LABEL}={entry.key} on port {port}; endpoint picker "
                   f"{self.picker.service}:{self.picker.port}")
        if self.sharing_withheld:
            message += ("; instances are not shared with other pools although the "
                        "EnergyPolicy says shareInstances: true (a GIE InferencePool's "
                        "selector reaches only its own pool's pods)")
        if entry.namespace != self.picker.namespace:
            return condition(True, "PickerServiceElsewhere", message + (
                f" (GIE resolves it in namespace {entry.namespace}; the picker Service is "
                f"in {self.picker.namespace}: provide a Service {self.picker.service} in "
                f"{entry.namespace} reaching it, see docs/gateway.md)"))
        return condition(True, "Applied", message)
