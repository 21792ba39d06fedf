"""The plan document: what the operator publishes in ConfigMap ``joulepool-plan``.

The extender's filter and node cache and the node agents' SLO targets read
this one model, so writer and readers cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from joulepool.core.controllers import held_slo

PLAN_CONFIGMAP = "joulepool-plan"
PLAN_KEY = "plan.json"


def pool_key(namespace: str, name: str) -> str:
    """Pool identity used in the plan and in the pool label (label-safe)."""
    return f"{namespace}.{name}"


class _Wire(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore")


class PlannedSLO(_Wire):
    ttft_seconds: float = Field(alias="ttftSeconds")
    tpot_seconds: float = Field(alias="tpotSeconds")
    deadline_seconds: float | None = Field(default=None, alias="deadlineSeconds")


class PlannedInstance(_Wire):
    node: str
    site: str
    product: str
    mode: str
    instances: int
    gpus: int
    gpus_per_instance: int = Field(alias="gpusPerInstance")
    #: other pools (keys) whose requests these instances also serve: the planner lets
    #: pools of one model, served under the same names in one namespace, share an
    #: instance (docs/planner.md, "Shared instances"); they run as this pool's pods
    shared_with: list[str] = Field(default_factory=list, alias="sharedWith")


class PlannedMix(_Wire):
    """The traffic a pool was planned for: what the router sizes its endpoints' batch
    rooms at (core.classes.StreamMix), as the simulator sizes its instances."""

    #: mean forecast rate over the planning window, requests/s (before alpha): weighs the
    #: pools a shared instance serves
    requests_per_second: float = Field(alias="requestsPerSecond", ge=0)
    #: mean prompt and mean response of the pool's requests, tokens
    mean_input_tokens: float = Field(alias="meanInputTokens", gt=0)
    mean_output_tokens: float = Field(alias="meanOutputTokens", gt=0)


class PlannedPool(_Wire):
    namespace: str
    name: str
    model: str
    tier: str
    slo: PlannedSLO
    replicas: int
    #: the names requests may give as ``model`` (the pool's servedModelNames; empty: model)
    served_model_names: list[str] = Field(default_factory=list, alias="servedModelNames")
    assignments: list[PlannedInstance] = Field(default_factory=list)
    joules_per_token: float | None = Field(default=None, alias="joulesPerToken")
    expected_power_watts: float | None = Field(default=None, alias="expectedPowerWatts")
    #: the traffic it was planned for (None: a plan of an earlier release)
    mix: PlannedMix | None = None

    def nodes(self) -> set[str]:
        return {a.node for a in self.assignments if a.instances > 0}

    def guests_by_pod(self, pods: Iterable[tuple[str, str, str | None]]
                      ) -> dict[str, tuple[str, ...]]:
        """The other pools each of this pool's serving ``pods`` (key, node, mode) serves:
        the pods of one node and mode fill its planned instances there in key order,
        shared instances (``sharedWith``) first, so exactly as many pods serve a guest
        pool as the plan shares with it; a pod beyond them, or on an instance of its own,
        serves this pool alone (absent from the result). Pods of one Deployment are the
        same engine, so which of them is shared is a choice; the key order keeps it
        stable while the pods are."""
        slots: dict[tuple[str, str], list[tuple[str, ...]]] = {}
        for a in sorted(self.assignments, key=lambda a: not a.shared_with):
            if a.instances > 0 and a.shared_with:
                slots.setdefault((a.node, a.mode), []).extend(
                    [tuple(a.shared_with)] * a.instances)
        out: dict[str, tuple[str, ...]] = {}
        taken: dict[tuple[str, str], int] = {}
        for key, node, mode in sorted(pods, key=lambda p: p[0]):
            place = (node, mode or "")
            free = slots.get(place, [])
            i = taken.get(place, 0)
            if i < len(free):
                out[key] = free[i]
                taken[place] = i + 1
        return out


class PlannedNode(_Wire):
    site: str
    product: str
    gpus: int
    #: GPUs the plan gives each pool on this node
    pools: dict[str, int] = Field(default_factory=dict)


class PlanDocument(_Wire):
    version: int = 0
    generated_at: datetime | None = Field(default=None, alias="generatedAt")
    objective: str = "energy"
    feasible: bool = True
    message: str = ""
    pools: dict[str, PlannedPool] = Field(default_factory=dict)
    nodes: dict[str, PlannedNode] = Field(default_factory=dict)
    #: measured J/token over the profile's, per profile key (``H100/model/tp1``), where
    #: the node agents' measurements correct it (core.feedback); the router scales its eps
    eps_scales: dict[str, float] = Field(default_factory=dict, alias="epsScales")

    def serving_slo(self, key: str, node: str | None = None) -> tuple[float, float] | None:
        """(TTFT, TPOT) seconds every instance of pool ``key`` (on ``node``; None: any)
        meets at worst: the tightest of its own SLO and those of the pools any of them
        serves too (``sharedWith``); None when the plan has no such pool. What an engine
        of ``key`` is held to when the agent cannot tell which of the instances it is
        (no pod identity); :meth:`held_slo` of :meth:`pod_pools` otherwise."""
        pool = self.pools.get(key)
        if pool is None:
            return None
        guests = [g for a in pool.assignments if node is None or a.node == node
                  for g in a.shared_with]
        return self.held_slo([key, *guests])

    def held_slo(self, keys: Iterable[str]) -> tuple[float, float] | None:
        """(TTFT, TPOT) seconds an engine serving the pools ``keys`` is held to: the
        tightest of their SLOs (core.controllers.held_slo; pools not in the plan are
        left out); None when none is in the plan."""
        return held_slo((p.slo.ttft_seconds, p.slo.tpot_seconds)
                        for p in (self.pools.get(k) for k in keys) if p is not None)

    def pod_pools(self, pods: Iterable[tuple[str, str, str, str | None]]
                  ) -> dict[str, tuple[str, ...]]:
        """The pools each serving pod (key, its pool, node, mode) serves: its own pool,
        then the guests of the plan's shared instance it fills
        (:meth:`PlannedPool.guests_by_pod`, the routing service's rule, over the pods
        given); a pod of a pool the plan does not have serves its own pool alone."""
        by_pool: dict[str, list[tuple[str, str, str | None]]] = {}
        for key, pool, node, mode in pods:
            by_pool.setdefault(pool, []).append((key, node, mode))
        out: dict[str, tuple[str, ...]] = {}
        for pool, members in by_pool.items():
            planned = self.pools.get(pool)
            guests = planned.guests_by_pod(members) if planned is not None else {}
            out.update({key: (pool, *guests.get(key, ())) for key, _, _ in members})
        return out

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True)

    @classmethod
    def from_json(cls, text: str) -> PlanDocument:
        return cls.model_validate_json(text)
