"""Publishing the online J/token estimate to ``GPUProfile`` status, at a bounded rate.

``GPUProfile`` is cluster scoped and one per GPU product x served model (x TP
degree); its ``status.measured`` holds one :class:`MeasuredProfile` per node.
Each agent replaces only its own node's entry, with the object's
``resourceVersion`` so concurrent agents cannot overwrite each other (a 409
is retried at the next opportunity).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from joulepool.api.models import GROUP, VERSION, MeasuredProfile
from joulepool.core.profiles import product_for_label

log = logging.getLogger("joulepool.sidecar.publisher")

PLURAL = "gpuprofiles"


@dataclass(frozen=True)
class Measurement:
    product: str  # core product name, e.g. H100
    model: str
    gpus: int | None  # GPUs per instance, when known
    joules_per_token: float
    samples: int
    node: str


class ProfilePublisher(Protocol):
    def publish(self, m: Measurement) -> bool:
        """Write one measurement; True if a GPUProfile was updated."""
        ...


class RateLimited:
    """At most one publication per (product, model, gpus) every ``min_interval_s``."""

    def __init__(self, inner: ProfilePublisher, min_interval_s: float = 60.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.inner = inner
        self.min_interval_s = min_interval_s
        self.monotonic = monotonic
        self._last: dict[tuple[str, str, int | None], float] = {}

    def due(self, m: Measurement) -> bool:
        last = self._last.get((m.product, m.model, m.gpus))
        return last is None or self.monotonic() - last >= self.min_interval_s

    def publish(self, m: Measurement) -> bool:
        if not self.due(m):
            return False
        self._last[(m.product, m.model, m.gpus)] = self.monotonic()
        return self.inner.publish(m)


class KubeProfilePublisher:
    """Patches ``status.measured`` of the matching GPUProfile via CustomObjectsApi."""

    def __init__(self, api: Any | None = None,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._api = api
        self.now = now

    @property
    def api(self) -> Any:
        if self._api is None:
            from kubernetes import client

            self._api = client.CustomObjectsApi()
        return self._api

    def _matching(self, m: Measurement) -> dict[str, Any] | None:
        items = self.api.list_cluster_custom_object(GROUP, VERSION, PLURAL).get("items", [])
        candidates = []
        for obj in items:
            spec = obj.get("spec") or {}
            product = product_for_label(str(spec.get("product", "")))
            if (product.name if product else spec.get("product")) != m.product:
                continue
            if spec.get("model") != m.model:
                continue
            candidates.append(obj)
        if m.gpus is not None:
            exact = [o for o in candidates if int((o.get("spec") or {}).get("gpus", 1)) == m.gpus]
            if exact:
                return exact[0]
        return candidates[0] if len(candidates) == 1 else None

    def publish(self, m: Measurement) -> bool:
        obj = self._matching(m)
        if obj is None:
            log.debug("no GPUProfile for %s/%s (gpus=%s): estimate not published",
                      m.product, m.model, m.gpus)
            return False
        entry = MeasuredProfile.model_validate({
            "joulesPerToken": m.joules_per_token, "samples": m.samples, "node": m.node,
            "updatedAt": self.now(),
        }).model_dump(mode="json", by_alias=True, exclude_none=True)
        measured = [e for e in ((obj.get("status") or {}).get("measured") or [])
                    if e.get("node") != m.node]
        measured.append(entry)
        measured.sort(key=lambda e: str(e.get("node", "")))
        meta = obj.get("metadata") or {}
        body = {"metadata": {"resourceVersion": meta.get("resourceVersion")},
                "status": {"measured": measured}}
        self.api.patch_cluster_custom_object_status(GROUP, VERSION, PLURAL, meta["name"], body)
        return True
