"""The EnergyPolicy's router tunables (PI gains, target, clamps, bulk factor; objective, MIAD
margin and site carbon intensities) for the router.

The router service polls ``EnergyPolicy/default`` (cluster scoped; RBAC: ``get`` on that
one object) and hands its spec to :meth:`joulepool.kube.pools.Router.apply_policy`.
While the policy exists its values override the command-line settings; when it is
deleted the router returns to them. An unreadable or invalid policy keeps the values
in force and is logged once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any, Protocol

from pydantic import ValidationError

from joulepool.api.contract import ENERGYPOLICIES, POLICY_NAME
from joulepool.api.models import GROUP, VERSION, EnergyPolicy, EnergyPolicySpec

log = logging.getLogger("joulepool.kube.policy")

#: the only EnergyPolicy joulepool uses
#: bound on one API call, seconds
API_TIMEOUT_S = 10.0


class PolicyTarget(Protocol):
    def apply_policy(self, spec: EnergyPolicySpec | None,
                     site_g_per_kwh: Mapping[str, float] | None = None) -> None: ...


class EnergyPolicyPoller:
    """Reads ``EnergyPolicy/default`` with ``CustomObjectsApi`` and applies it to a router."""

    def __init__(self, api: Any, target: PolicyTarget, name: str = POLICY_NAME) -> None:
        self.api = api
        self.target = target
        self.name = name
        self._warned = False

    def _read(self) -> dict[str, Any] | None:
        try:
            obj = self.api.get_cluster_custom_object(
                GROUP, VERSION, ENERGYPOLICIES, self.name, _request_timeout=API_TIMEOUT_S)
        except Exception as exc:
            if getattr(exc, "status", None) == 404:
                return None
            raise
        return dict(obj) if isinstance(obj, dict) and obj else None

    async def poll(self) -> None:
        """One read; applies the spec (None when the policy does not exist)."""
        try:
            obj = await asyncio.to_thread(self._read)
            policy = EnergyPolicy.model_validate(obj) if obj else None
        except (ValidationError, Exception) as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot use EnergyPolicy/%s (keeping the router's PI settings): %s",
                            self.name, exc)
            return
        self._warned = False
        if policy is None:
            self.target.apply_policy(None)
        else:
            self.target.apply_policy(policy.spec, policy.site_intensities())
