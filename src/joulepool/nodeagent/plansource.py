"""What the cluster tells the node agent: pool SLOs (plan) and MIAD parameters (policy).

The plan document (``joulepool.api.plan``, ConfigMap ``joulepool-plan`` or a
file) says which pools run on which node and each pool's TTFT / TPOT targets.
``EnergyPolicy/default`` may set MIAD's ``kInc``, ``stepMHz`` and ``margin``;
they override the agent's flags while the policy exists. Both are refreshed
periodically and the last good copy is kept when a read fails.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from joulepool.api.contract import ENERGYPOLICIES
from joulepool.api.models import GROUP, VERSION, EnergyPolicy, MIADSpec
from joulepool.api.plan import PLAN_CONFIGMAP, PLAN_KEY, PlanDocument, PlannedPool
from joulepool.nodeagent.background import API_TIMEOUT

log = logging.getLogger("joulepool.nodeagent.plan")


class PlanSource(Protocol):
    async def refresh(self) -> None: ...

    def current(self) -> PlanDocument | None: ...


class _Cached:
    def __init__(self, refresh_s: float, monotonic: Callable[[], float]) -> None:
        self.refresh_s = refresh_s
        self.monotonic = monotonic
        self._doc: PlanDocument | None = None
        self._next = 0.0
        self._warned = False

    def current(self) -> PlanDocument | None:
        return self._doc

    def _due(self) -> bool:
        now = self.monotonic()
        if now < self._next:
            return False
        self._next = now + self.refresh_s
        return True

    def _accept(self, text: str | None, where: str) -> None:
        if text is None:
            return
        try:
            self._doc = PlanDocument.from_json(text)
            self._warned = False
        except ValidationError as exc:
            self._fail(f"invalid plan in {where}: {exc.errors()[0].get('msg')}")

    def _fail(self, msg: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("%s (keeping the last good plan: %s)", msg,
                        "yes" if self._doc else "none yet")


class FilePlanSource(_Cached):
    """Plan JSON from a file (tests, local runs, or a mounted ConfigMap volume)."""

    def __init__(self, path: str | Path, refresh_s: float = 5.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        super().__init__(refresh_s, monotonic)
        self.path = Path(path)
        self._mtime: int | None = None

    async def refresh(self) -> None:
        if not self._due():
            return
        try:
            st = self.path.stat()
            if st.st_mtime_ns == self._mtime:
                return
            text = self.path.read_text()
        except OSError as exc:
            self._fail(f"cannot read plan file {self.path}: {exc.strerror}")
            return
        self._mtime = st.st_mtime_ns
        self._accept(text, str(self.path))


class ConfigMapPlanSource(_Cached):
    """Plan JSON from ConfigMap ``joulepool-plan`` (key ``plan.json``) via the API server."""

    def __init__(self, namespace: str, api: Any | None = None, name: str = PLAN_CONFIGMAP,
                 refresh_s: float = 30.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        super().__init__(refresh_s, monotonic)
        self.namespace = namespace
        self.name = name
        self._api = api

    def _read(self) -> str | None:
        if self._api is None:
            from kubernetes import client

            self._api = client.CoreV1Api()
        cm = self._api.read_namespaced_config_map(self.name, self.namespace,
                                                  _request_timeout=API_TIMEOUT)
        data = getattr(cm, "data", None) or {}
        return data.get(PLAN_KEY)

    async def refresh(self) -> None:
        if not self._due():
            return
        try:
            text = await asyncio.to_thread(self._read)
        except Exception as exc:  # API down, RBAC, not found: keep the last plan
            self._fail(f"cannot read ConfigMap {self.namespace}/{self.name}: {exc}")
            return
        if text is None:
            self._fail(f"ConfigMap {self.namespace}/{self.name} has no {PLAN_KEY}")
            return
        self._accept(text, f"ConfigMap {self.namespace}/{self.name}")


class NoPlan:
    async def refresh(self) -> None:
        return None

    def current(self) -> PlanDocument | None:
        return None


def pools_on_node(doc: PlanDocument | None, node: str) -> dict[str, PlannedPool]:
    """The plan's pools that have GPUs on ``node``."""
    if doc is None:
        return {}
    keys: set[str] = set()
    planned = doc.nodes.get(node)
    if planned is not None:
        keys |= {k for k, n in planned.pools.items() if n > 0}
    keys |= {k for k, p in doc.pools.items() if node in p.nodes()}
    return {k: doc.pools[k] for k in sorted(keys) if k in doc.pools}


class PolicySource(Protocol):
    """MIAD parameters from the cluster's EnergyPolicy (None: use the agent's flags)."""

    async def refresh(self) -> None: ...

    def miad(self) -> MIADSpec | None: ...


class EnergyPolicySource:
    """``EnergyPolicy/default`` (cluster scoped) via CustomObjectsApi, refreshed periodically."""

    def __init__(self, api: Any | None = None, name: str = "default", refresh_s: float = 60.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._api = api
        self.name = name
        self.refresh_s = refresh_s
        self.monotonic = monotonic
        self._miad: MIADSpec | None = None
        self._carbon: dict[str, float] = {}
        self._next = 0.0
        self._warned = False

    def miad(self) -> MIADSpec | None:
        return self._miad

    def carbon(self, site: str) -> float | None:
        """The site's grid intensity now (gCO2/kWh), None when the policy gives none."""
        return self._carbon.get(site)

    def _read(self) -> dict[str, Any] | None:
        if self._api is None:
            from kubernetes import client

            self._api = client.CustomObjectsApi()
        try:
            obj = self._api.get_cluster_custom_object(GROUP, VERSION, ENERGYPOLICIES, self.name,
                                                      _request_timeout=API_TIMEOUT)
        except Exception as exc:
            if getattr(exc, "status", None) == 404:
                return None
            raise
        return dict(obj) if isinstance(obj, dict) and obj else None

    async def refresh(self) -> None:
        now = self.monotonic()
        if now < self._next:
            return
        self._next = now + self.refresh_s
        try:
            obj = await asyncio.to_thread(self._read)
            policy = EnergyPolicy.model_validate(obj) if obj else None
            self._miad = policy.spec.miad if policy is not None else None
            self._carbon = policy.site_intensities() if policy is not None else {}
            self._warned = False
        except Exception as exc:  # unreadable or invalid: keep the last parameters
            if not self._warned:
                self._warned = True
                log.warning("cannot use EnergyPolicy/%s (keeping MIAD parameters %s): %s",
                            self.name, "from it" if self._miad else "from flags", exc)
