"""The one debounced planning loop: every change ends here, every pool is planned jointly.

Handlers never plan.  They update kopf indexes (pools, nodes, GPU profiles,
the energy policy, the operator's Deployments) and call
:meth:`Planner.trigger`.  The loop waits until the changes go quiet for
``debounce_seconds`` (at most ``max_delay_seconds`` after the first), then
runs one reconcile pass:

1. read every input from the indexes and fingerprint them; solve the joint
   plan (:func:`joulepool.pooling.plan_pools`, in a worker thread) only when
   the inputs changed or the periodic re-plan is due, so Node heartbeats and
   Deployment status changes cost no solve;
2. decide the plan *in force*: a feasible plan replaces it; an infeasible one
   does not (the last feasible plan keeps serving, minus pools that are gone)
   unless the kept plan uses a node that is gone, unschedulable or smaller
   now; with no usable feasible plan, the planner's best partial plan serves;
3. publish it: the versioned ConfigMap ``joulepool-plan`` (only when its
   content changes), every pool's Deployments (create / patch when the spec
   hash differs / delete those no longer planned; while the plan in force is
   infeasible, a live pool's unplanned Deployments are scaled to 0, never
   deleted), every pool's status (only when it changes).

The plan in force survives a restart: the first pass reads the published
ConfigMap back (version and plan) and, when that plan was feasible, keeps it
in force exactly as if this process had planned it.

Writes that fail after the client's own retries leave the pass "not ok"; the
loop runs another pass after ``resync_after_error_seconds`` (doubled for each
failed pass in a row, up to ``max_resync_after_error_seconds``), and since every
pass recomputes the desired state from scratch nothing is lost.  A pool whose
Deployment the API rejects says so in its status (``Planned=False``,
``DeploymentFailed``); pools in a namespace being deleted are not planned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

from pydantic import ValidationError

from joulepool.api.contract import (
    API_VERSION,
    ENERGYPOLICIES,
    GPUPROFILES,
    INFERENCEPOOLS,
    LATEST_PLAN_FEASIBLE_ANNOTATION,
    LATEST_PLAN_MESSAGE_ANNOTATION,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    POLICY_NAME,
    RELEASE_RETRY_ANNOTATION,
)
from joulepool.api.load import ResourceError, corrected_profile_from_resource
from joulepool.api.models import (
    EnergyPolicySpec,
    GPUProfile,
    InferencePool,
    ObservedPromptLengths,
)
from joulepool.api.plan import PLAN_CONFIGMAP, PLAN_KEY, PlanDocument
from joulepool.carbon.feed import CarbonFeed, policy_status
from joulepool.core.classes import PromptLengths
from joulepool.core.feedback import Correction, FeedbackParams
from joulepool.core.planner import PlanNode
from joulepool.core.profiles import DEFAULT_PROFILES, ServingProfile
from joulepool.operator.config import OperatorConfig
from joulepool.operator.deployments import DeploymentWriter
from joulepool.operator.drift import DriftReporter
from joulepool.operator.gateway import GatewayPools
from joulepool.operator.kube import ApiError, KubeClient, patch_merge_retrying, path_for
from joulepool.operator.listings import GoneObjects, Listed, current_values
from joulepool.operator.metrics import OperatorMetrics
from joulepool.operator.resources import (
    DeploymentInfo,
    PlanView,
    PoolEntry,
    desired_deployments,
    fingerprint,
    has_containers,
    now_utc,
    plan_configmap,
    plan_content,
    plan_without,
    pool_status,
    ready_shared_instances,
    same_status,
    status_patch,
    version_of,
    with_times,
)
from joulepool.pooling import (
    PoolOutcome,
    PoolPlan,
    observed_prompt_lengths,
    outcomes_from_document,
    plan_pools,
    sharing_policy,
)

log = logging.getLogger("joulepool.operator.planning")



def tail_summary(prompts: PromptLengths) -> list[float]:
    """A pool's observed p50, p90 and p99 prompt lengths at two significant digits: the
    planning input (a re-plan when it moves, not at every agent publication)."""
    return [float(f"{prompts.quantile(q):.2g}") for q in (0.5, 0.9, 0.99)]


def index_values(index: Mapping[Any, Iterable[Any]] | None) -> Iterator[Any]:
    """Every value of a kopf index (see :func:`.listings.current_values`)."""
    return current_values(index)


#: the indexed resources whose objects can vanish during a watch gap (see :mod:`.listings`)
LISTED = {
    "pools": Listed("pools", API_VERSION, INFERENCEPOOLS, namespaced=True),
    "nodes": Listed("nodes", "v1", "nodes"),
    "deployments": Listed("deployments", "apps/v1", "deployments", namespaced=True,
                          label_selector=f"{MANAGED_BY_LABEL}={MANAGED_BY}"),
    "profiles": Listed("profiles", API_VERSION, GPUPROFILES),
    "policies": Listed("policies", API_VERSION, ENERGYPOLICIES),
}


@dataclass
class Sources:
    """Where the planner reads its inputs: kopf indexes (or plain mappings in tests)."""

    pools: Mapping[Any, Iterable[PoolEntry]] | None = None
    nodes: Mapping[Any, Iterable[PlanNode | None]] | None = None
    profiles: Mapping[Any, Iterable[Any]] | None = None  # GPUProfile | ResourceError
    policies: Mapping[Any, Iterable[Any]] | None = None  # (name, EnergyPolicySpec | error)
    deployments: Mapping[Any, Iterable[DeploymentInfo]] | None = None


@dataclass(frozen=True)
class InForcePlan:
    """The plan in force: solved by this process, or read back from the ConfigMap."""

    document: PlanDocument
    outcomes: Mapping[str, PoolOutcome]

    @classmethod
    def of(cls, plan: PoolPlan) -> InForcePlan:
        return cls(plan.document, plan.outcomes)


def unusable_nodes(doc: PlanDocument, pools: Iterable[str], nodes: Iterable[PlanNode]) -> list[str]:
    """Nodes the plan gives GPUs to (for ``pools``) that cannot carry them now.

    Gone, unschedulable (left out of ``nodes``: see ``resources.node_schedulable``),
    another GPU product, or fewer GPUs than the plan books there.
    """
    now = {n.name: n for n in nodes}
    wanted = set(pools)
    use: dict[str, int] = {}
    product: dict[str, str] = {}
    for key, p in doc.pools.items():
        if key not in wanted:
            continue
        for a in p.assignments:
            if a.instances > 0:
                use[a.node] = use.get(a.node, 0) + a.gpus
                product[a.node] = a.product
    bad = []
    for name, gpus in sorted(use.items()):
        n = now.get(name)
        if n is None or n.product != product[name] or n.gpus < gpus:
            bad.append(name)
    return bad


@dataclass
class PassReport:
    """What one reconcile pass did (logged; counted by tests and the benchmark)."""

    solved: bool = False
    feasible: bool | None = None
    published_version: int | None = None
    statuses_written: int = 0
    deployments_applied: int = 0
    deployments_deleted: int = 0
    deployments_scaled_down: int = 0
    errors: list[str] = field(default_factory=list)
    #: pool key -> the API's answer to a failed write of one of its Deployments
    pool_errors: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors


class Planner:
    """State and loop of the joint planning (one per operator process)."""

    def __init__(
        self, config: OperatorConfig, client: KubeClient,
        clock: Callable[[], datetime] = now_utc, metrics: OperatorMetrics | None = None,
    ) -> None:
        self.config = config
        self.client = client
        self.metrics = metrics or OperatorMetrics()
        #: live carbon intensity per site (EnergyPolicy carbon[].source)
        self.carbon = CarbonFeed(read_object=client.get, namespace=config.namespace,
                                 metrics=self.metrics.carbon,
                                 on_update=lambda: self.trigger("carbon sources fetched"))
        self._policy_status: dict[str, Any] | None = None
        self.sources = Sources()
        self.clock = clock
        # loop bookkeeping
        self._wake = asyncio.Event()
        self._done = asyncio.Condition()
        self._requested = 0
        self._finished = 0
        self._finished_ok = True
        self._retry_at: float | None = None
        self._failed_passes = 0
        #: pool key -> (uid, loop time) of pools kopf left half-done (see _retry_stuck_pools)
        self._waiting_since: dict[str, tuple[str | None, float]] = {}  # (uid, next touch)
        self._touches: dict[str, int] = {}  # touches so far, per pool waiting
        self._last_periodic: float | None = None
        # plans
        self.latest: PoolPlan | None = None
        self.latest_pools: frozenset[str] = frozenset()
        self.in_force: InForcePlan | None = None
        self.in_force_feasible = False
        self._restored = False  # the published plan has been read back (once per process)
        self.published: PlanDocument | None = None
        self._published_content: str | None = None
        self._published_latest: tuple[bool, str] | None = None
        self._version: int | None = None
        self._inputs: str | None = None
        #: how measured J/token corrects the GPUProfiles (core.feedback defaults)
        self.feedback = FeedbackParams()
        #: GPUProfile name -> (corrected profile, correction), from the last pass
        self.corrections: dict[str, tuple[ServingProfile, Correction]] = {}
        self._profile_uids: dict[str, str | None] = {}
        self.drift = DriftReporter(client, self.metrics)
        # memory of what the cluster said and what we wrote
        self.last_valid: dict[str, tuple[str | None, InferencePool]] = {}
        #: pools whose invalid observedInputTokens entries were logged (once per pool)
        self.invalid_observed: set[str] = set()
        #: per pool, the observed tail summary last seen (tail_summary; None: none)
        self.observed_tails: dict[str, list[float] | None] = {}
        self._last_policy: EnergyPolicySpec | None = None
        self._status_written: dict[str, tuple[str | None, dict[str, Any]]] = {}
        self.writer = DeploymentWriter(client)
        #: GIE InferencePools of the pools, when GIE's CRD is served
        self.gateway = GatewayPools(client, config.picker)
        #: objects deleted while a watch was down, still in kopf's indexes (see .listings)
        self.gone = GoneObjects()
        self._listed_at = math.inf  # loop time of the last check of every listing (run() sets)
        #: namespaces the API said are being deleted; their pools are not planned
        self.terminating: set[str] = set()
        self._seen: dict[Any, Any] = {}
        # counters
        self.passes = 0
        self.solves = 0
        self.last_report = PassReport()

    # ------------------------------------------------------------ triggering
    def trigger(self, reason: str = "") -> int:
        """Ask for a reconcile pass; returns a ticket for :meth:`wait_for_pass`."""
        self._requested += 1
        if reason:
            log.debug("plan requested: %s", reason)
        self._wake.set()
        return self._requested

    def changed(self, key: Any, value: Any) -> bool:
        """Remember ``value`` under ``key``; True if it differs from what was remembered."""
        missing = object()
        old = self._seen.get(key, missing)
        if value is None:
            self._seen.pop(key, None)
        else:
            self._seen[key] = value
        return (old is missing and value is not None) or (old is not missing and old != value)

    async def wait_for_pass(self, ticket: int, timeout: float | None = None) -> bool:
        """Wait until a pass that started after ``ticket`` was requested has finished; its ok."""
        async def _wait() -> bool:
            async with self._done:
                await self._done.wait_for(lambda: self._finished >= ticket)
                return self._finished_ok
        return await asyncio.wait_for(_wait(), timeout)

    def forget_deployment(self, namespace: str, name: str) -> None:
        self.writer.forget((namespace, name))

    # ------------------------------------------------------------ the loop
    def plan_interval(self) -> float:
        if self.config.plan_interval_seconds is not None:
            return float(self.config.plan_interval_seconds)
        return float(self.policy().plan_interval_seconds)

    async def run(self) -> None:
        """Forever: wait for a trigger (or the periodic re-plan), debounce, reconcile."""
        loop = asyncio.get_running_loop()
        self._last_periodic = self._listed_at = loop.time()
        while True:
            periodic_at = self._last_periodic + self.plan_interval()
            wake_at = min(periodic_at, self._retry_at if self._retry_at is not None else math.inf,
                          self._listed_at + self.config.listing_check_seconds)
            triggered = True
            if not self._wake.is_set():
                try:
                    await asyncio.wait_for(self._wake.wait(), max(0.0, wake_at - loop.time()))
                except TimeoutError:
                    triggered = False
            if triggered:
                await self._debounce()
            self._wake.clear()
            force = loop.time() >= periodic_at
            ticket = self._requested
            self._retry_at = None
            try:
                report = await self.reconcile(force=force)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let one bad pass stop the loop
                log.exception("reconcile pass failed")
                report = PassReport(errors=[f"{type(exc).__name__}: {exc}"])
            self.last_report = report
            self._retry_at = self._next_release_retry()
            if not report.ok:
                delay = self.resync_delay()
                self._retry_at = min(loop.time() + delay, self._retry_at or math.inf)
                log.warning("reconcile pass incomplete (%d errors), again in %.1fs: %s",
                            len(report.errors), delay, "; ".join(report.errors[:3]))
            else:
                self._failed_passes = 0
            if force:
                self._last_periodic = loop.time()
            async with self._done:
                self._finished = max(self._finished, ticket)
                self._finished_ok = report.ok
                self._done.notify_all()

    def _next_release_retry(self) -> float | None:
        """When a pool kopf has not finished with is due for :meth:`_retry_stuck_pools`."""
        if not self._waiting_since:
            return None
        return min(t for _uid, t in self._waiting_since.values())

    async def _retry_stuck_pools(self, report: PassReport) -> None:
        """Touch every pool kopf has left half-done for ``release_retry_seconds`` (then
        twice as long after each touch, up to 5 min): one
        being deleted that still carries the finalizer, or a live one that never got it.

        kopf adds and removes the finalizer with one PATCH each; if the API answers it 409
        or 422 (or kopf's progress PATCH fails), kopf gets no new event and never tries
        again: the pool would stay Terminating forever, or never be served. The touch (an
        annotation) is a new event, so kopf runs its (idempotent) handlers again.
        """
        now = asyncio.get_running_loop().time()
        waiting = {k: e for k, e in self.entries().items() if e.deleting == e.finalized}
        for k in list(self._waiting_since):
            if k not in waiting or self._waiting_since[k][0] != waiting[k].uid:
                del self._waiting_since[k]
                self._touches.pop(k, None)
        first = self.config.release_retry_seconds
        for k, e in waiting.items():
            uid, due = self._waiting_since.setdefault(k, (e.uid, now + first))
            if now < due:
                continue
            path = path_for(API_VERSION, INFERENCEPOOLS, e.namespace, e.name)
            touch = {"metadata": {"annotations": {RELEASE_RETRY_ANNOTATION: _iso_now()}}}
            try:
                await self.client.patch(path, touch)
                log.info("InferencePool %s: kopf has not %s it; asked again", k,
                         "released" if e.deleting else "adopted")
            except ApiError as exc:
                if not exc.not_found:
                    report.errors.append(f"InferencePool {k} (retry): {exc}")
            n = self._touches[k] = self._touches.get(k, 0) + 1
            # a busy kopf is not hurried along: each touch waits twice as long, up to 5 min
            self._waiting_since[k] = (uid, now + min(first * 2 ** n, 300.0))

    def resync_delay(self) -> float:
        """Delay before the next pass after a failed one: ``resync_after_error_seconds``,
        doubled for every failed pass in a row, at most ``max_resync_after_error_seconds``
        (a write the API keeps rejecting is not retried every few seconds forever)."""
        self._failed_passes += 1
        base = self.config.resync_after_error_seconds
        return float(min(base * 2 ** min(self._failed_passes - 1, 30),
                         max(base, self.config.max_resync_after_error_seconds)))

    async def _debounce(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.max_delay_seconds
        while True:
            self._wake.clear()
            quiet = min(self.config.debounce_seconds, deadline - loop.time())
            if quiet <= 0:
                return
            try:
                await asyncio.wait_for(self._wake.wait(), quiet)
            except TimeoutError:
                return

    # ------------------------------------------------------------ inputs
    def entries(self) -> dict[str, PoolEntry]:
        return {e.key: e for e in current_values(self.sources.pools, self.gone.skip("pools"))}

    def nodes(self) -> list[PlanNode]:
        return sorted(current_values(self.sources.nodes, self.gone.skip("nodes")),
                      key=lambda n: n.name)

    def profiles(self, now: datetime | None = None) -> tuple[list[ServingProfile], list[str]]:
        """Default profiles, then every valid GPUProfile (by name: user profiles win), each
        with the node agents' measured J/token fed back (core.feedback; docs/feedback.md).

        ``self.corrections`` holds how each GPUProfile (by name) was corrected."""
        now = now or datetime.now(UTC)
        out: list[ServingProfile] = list(DEFAULT_PROFILES)
        keys: list[str] = []
        corrections: dict[str, tuple[ServingProfile, Correction]] = {}
        for res in sorted(
            (v for v in current_values(self.sources.profiles, self.gone.skip("profiles"))
             if isinstance(v, GPUProfile)),
            key=lambda r: r.metadata.name,
        ):
            try:
                profile, corr = corrected_profile_from_resource(res, now, self.feedback)
            except (ValueError, ResourceError) as exc:
                log.warning("GPUProfile %s unusable: %s", res.metadata.name, exc)
                continue
            out.append(profile)
            corrections[res.metadata.name] = (profile, corr)
            self._profile_uids[res.metadata.name] = res.metadata.uid
            # the scale, not the raw measurements: a re-plan when the correction moves
            keys.append(res.spec.model_dump_json() + f"{corr.scale:.3f}")
        self.corrections = corrections
        return out, keys

    def eps_scales(self) -> dict[str, float]:
        """Applied corrections by profile key, for the router (3 significant digits, so
        measurement noise does not publish a new plan every period)."""
        return {p.key: float(f"{c.scale:.3g}") for p, c in self.corrections.values()
                if c.applied}

    def policy(self) -> EnergyPolicySpec:
        """The EnergyPolicy named ``default``; its last valid spec while it is invalid."""
        for name, spec in current_values(self.sources.policies, self.gone.skip("policies")):
            if name == POLICY_NAME and isinstance(spec, EnergyPolicySpec):
                self._last_policy = spec
                return spec
            if name == POLICY_NAME:
                return self._last_policy or EnergyPolicySpec()
        return EnergyPolicySpec()

    def deployments(self) -> dict[tuple[str, str], DeploymentInfo]:
        return {(d.namespace, d.name): d
                for d in current_values(self.sources.deployments,
                                           self.gone.skip("deployments"))}

    def _index_of(self, kind: str) -> Mapping[Any, Iterable[Any]] | None:
        return {"pools": self.sources.pools, "nodes": self.sources.nodes,
                "deployments": self.sources.deployments,
                "profiles": self.sources.profiles, "policies": self.sources.policies}[kind]

    def relisted(self, kind: str) -> None:
        """kopf (re)lists ``kind`` (a ``None`` event): check the listing for objects that
        were deleted while the watch was down (:mod:`.listings`) in the next pass."""
        if self.gone.relisted(kind):
            self.trigger(f"{kind} listed")

    async def _check_listings(self, report: PassReport) -> None:
        """Check the listings kopf re-made (and all of them every ``listing_check_seconds``:
        a re-listing that came back empty shows as no event at all)."""
        now = asyncio.get_running_loop().time()
        if now >= self._listed_at + self.config.listing_check_seconds:
            self.gone.pending |= set(LISTED)
            self._listed_at = now
        for kind in sorted(self.gone.pending):
            index = self._index_of(kind)
            try:
                newly = await self.gone.check(self.client, LISTED[kind], index,
                                              self.config.watch_namespaces)
            except ApiError as exc:
                report.errors.append(f"listing {kind}: {exc}")
                continue
            if kind == "deployments":
                for key in newly:
                    if isinstance(key, tuple):
                        self.writer.forget(key)

    def observed_prompts(self, plannable: Mapping[str, InferencePool],
                         live: Mapping[str, PoolEntry], now: datetime
                         ) -> dict[str, PromptLengths]:
        """Per pool, the prompt lengths its node agents report in
        ``status.observedInputTokens`` (pooling.observed_prompt_lengths); forgets what it
        remembered of pools no longer ``live``."""
        for gone in [k for k in self.observed_tails if k not in live]:
            del self.observed_tails[gone]
        self.invalid_observed.intersection_update(live)
        out: dict[str, PromptLengths] = {}
        for key in plannable:
            found = self._observed(live[key], now)
            if found is not None:
                out[key] = found
        return out

    def _observed(self, entry: PoolEntry, now: datetime) -> PromptLengths | None:
        """One pool's observed prompt lengths; entries that do not validate are skipped
        (said once per pool)."""
        raw = entry.status.get("observedInputTokens") or []
        entries = []
        for item in raw if isinstance(raw, list) else []:
            try:
                entries.append(ObservedPromptLengths.model_validate(item))
            except ValidationError as exc:
                if entry.key not in self.invalid_observed:
                    self.invalid_observed.add(entry.key)
                    log.warning("pool %s: an observedInputTokens entry is invalid, "
                                "skipped: %s", entry.key, exc.errors()[0].get("msg"))
        return observed_prompt_lengths(entries, now)

    def observed_moved(self, entry: PoolEntry) -> bool:
        """Whether the pool's observed prompt tail (:func:`tail_summary`) differs from
        the last one seen for it: the node agents' status writes trigger a pass only then
        (kopf's update handlers do not fire on status changes)."""
        found = self._observed(entry, self.clock())
        summary = tail_summary(found) if found is not None else None
        if self.observed_tails.get(entry.key) == summary:
            return False
        self.observed_tails[entry.key] = summary
        return True

    def planned_pool(self, entry: PoolEntry) -> InferencePool | None:
        """The spec a pool is planned with: its own, or its last valid one while invalid."""
        if entry.pool is not None:
            return entry.pool
        kept = self.last_valid.get(entry.key)
        if kept is not None and kept[0] == entry.uid:
            return kept[1]
        return None

    # ------------------------------------------------------------ one pass
    def _live_entries(self) -> dict[str, PoolEntry]:
        """Pools that are not being deleted, nor in a namespace being deleted."""
        entries = self.entries()
        self.terminating &= {e.namespace for e in entries.values()}  # gone: forget
        return {k: e for k, e in sorted(entries.items())
                if not e.deleting and e.namespace not in self.terminating}

    async def reconcile(self, force: bool = False) -> PassReport:
        self.passes += 1
        report = PassReport()
        now = self.clock()
        await self._check_listings(report)
        live = self._live_entries()
        for k, e in live.items():
            if e.pool is not None:
                self.last_valid[k] = (e.uid, e.pool)
        for k in list(self.last_valid):
            if k not in live:
                del self.last_valid[k]
        plannable = {k: p for k, e in live.items() if (p := self.planned_pool(e)) is not None}
        nodes = self.nodes()
        profiles, profile_keys = self.profiles(now)
        report.errors.extend(await self.gateway.discover())
        policy = self._sharing_policy(await self.carbon.planning_policy(self.policy(), now))
        observed = self.observed_prompts(plannable, live, now)
        inputs = fingerprint([
            [(k, live[k].uid, p.spec.model_dump_json()) for k, p in plannable.items()],
            [(n.name, n.site, n.product, n.gpus) for n in nodes],
            profile_keys, policy.model_dump_json(),
            sorted((k, tail_summary(v)) for k, v in observed.items()),
        ])
        if not self._restored:
            try:
                await self._restore()
            except ApiError as exc:
                # without the plan in force we could undo it (delete healthy Deployments)
                report.errors.append(f"reading ConfigMap {PLAN_CONFIGMAP}: {exc}")
                return report
        if force or inputs != self._inputs or self.latest is None:
            await self._solve(list(plannable.values()), nodes, profiles, policy, now,
                              observed)
            self._inputs = inputs
            report.solved = True
        assert self.latest is not None and self.in_force is not None
        report.feasible = self.latest.result.feasible

        # the plan in force, restricted to pools that still exist
        keep = [k for k in plannable if k in self.in_force.document.pools]
        doc = plan_without(self.in_force.document, keep).model_copy(
            update={"eps_scales": self.eps_scales()})
        await self._publish(doc, report)
        published = self.published or doc
        outcomes: dict[str, PoolOutcome] = {
            k: o for k, o in self.in_force.outcomes.items() if k in published.pools
        }
        view = PlanView(
            in_force=published, in_force_outcomes=outcomes,
            in_force_feasible=self.in_force_feasible,
            latest_feasible=self.latest.result.feasible,
            latest_outcomes=self.latest.outcomes,
            latest_binding="; ".join(self.latest.result.binding),
            latest_pools=self.latest_pools,
        )
        sem = asyncio.Semaphore(self.config.write_concurrency)
        await self._apply_deployments(live, plannable, published, report, sem)
        report.errors.extend(await self.gateway.reconcile(live, plannable, sem))
        await self._write_statuses(live, plannable, view, now, force, report, sem)
        await self._write_policy_status(now, report)
        report.errors.extend(await self.drift.report(
            self.corrections, self._profile_uids, self.feedback, now))
        await self._retry_stuck_pools(report)
        self.metrics.pools(published, {k: n for k, n in self.ready_replicas().items()
                                       if k in live}, policy)
        log.info(
            "reconciled: %d pools, %d nodes, plan v%s %s%s; %d statuses, deployments "
            "applied %d, deleted %d, scaled to 0 %d; %d errors", len(live), len(nodes),
            published.version, "feasible" if report.feasible else "INFEASIBLE",
            " (solved)" if report.solved else "", report.statuses_written,
            report.deployments_applied, report.deployments_deleted,
            report.deployments_scaled_down, len(report.errors))
        return report

    def _sharing_policy(self, policy: EnergyPolicySpec) -> EnergyPolicySpec:
        """``policy`` with ``shareInstances`` off while the operator manages GIE pools
        (pooling.sharing_policy, the rule ``joulepool plan --gie-pools`` follows too). Logs
        a change; the pools' ``GatewayPool`` condition says so."""
        planned, withheld = sharing_policy(policy, self.gateway.manages_gie_pools)
        if withheld != self.gateway.sharing_withheld:
            log.info("instances %s: %s", "not shared" if withheld else "shared as the "
                     "EnergyPolicy says", "GIE InferencePools are managed and their "
                     "selectors reach only their own pool's pods" if withheld
                     else "no GIE InferencePools are managed")
            self.gateway.sharing_withheld = withheld
        return planned

    async def _solve(
        self, pools: list[InferencePool], nodes: list[PlanNode],
        profiles: list[ServingProfile], policy: EnergyPolicySpec, now: datetime,
        observed: Mapping[str, PromptLengths] | None = None,
    ) -> None:
        plan = await asyncio.to_thread(
            partial(plan_pools, pools, nodes, policy, profiles, 0, now, partial=True,
                    observed=observed))
        self.solves += 1
        self.metrics.solved(plan)
        self.latest = plan
        self.latest_pools = frozenset(plan.outcomes)
        r = plan.result
        log.info("plan solved: %s, %d pools, %.3fs%s", r.status, len(pools), r.solve_time_s,
                 "" if r.feasible else f"; unmet: {'; '.join(r.binding)}")
        if r.feasible:
            self.in_force, self.in_force_feasible = InForcePlan.of(plan), True
            self.metrics.in_force_feasible.set(1)
            return
        if self.in_force_feasible and self.in_force is not None:
            bad = unusable_nodes(self.in_force.document, plan.outcomes, nodes)
            if not bad:
                return  # keep the last feasible plan in force
            log.warning("dropping the last feasible plan: node(s) %s gone, unschedulable "
                        "or smaller; the best partial plan serves", ", ".join(bad))
        self.in_force, self.in_force_feasible = InForcePlan.of(plan), False  # best effort
        self.metrics.in_force_feasible.set(0)

    async def _restore(self) -> None:
        """Read the published plan back after a (re)start: its version always, and the
        plan itself as the plan in force when it was feasible. 404: nothing published."""
        try:
            cm = await self.client.get(self.configmap_path)
        except ApiError as exc:
            if not exc.not_found:
                raise
            cm = None
        self._restored = True
        if self._version is None:
            self._version = version_of(cm)
        text = ((cm or {}).get("data") or {}).get(PLAN_KEY)
        if not text:
            return
        try:
            doc = PlanDocument.from_json(text)
        except ValueError as exc:
            log.warning("published plan unreadable, planning from scratch: %s", exc)
            return
        ann = ((cm or {}).get("metadata") or {}).get("annotations") or {}
        self.published = doc
        self._published_content = plan_content(doc)
        self._published_latest = (ann.get(LATEST_PLAN_FEASIBLE_ANNOTATION) == "true",
                                  str(ann.get(LATEST_PLAN_MESSAGE_ANNOTATION, "")))
        if doc.feasible and self.in_force is None:
            self.in_force = InForcePlan(doc, outcomes_from_document(doc))
            self.in_force_feasible = True
            log.info("restored plan v%d in force (%d pools) from ConfigMap %s",
                     doc.version, len(doc.pools), PLAN_CONFIGMAP)

    # ------------------------------------------------------------ ConfigMap
    @property
    def configmap_path(self) -> str:
        return path_for("v1", "configmaps", self.config.namespace, PLAN_CONFIGMAP)

    async def _publish(self, doc: PlanDocument, report: PassReport) -> None:
        assert self.latest is not None
        latest = (self.latest.result.feasible, "; ".join(self.latest.result.binding))
        content = plan_content(doc)
        if content == self._published_content:
            if latest != self._published_latest and self.published is not None:
                # same plan in force, new verdict on the newest attempt: annotate, no new version
                body = plan_configmap(self.published, PLAN_CONFIGMAP, self.config.namespace,
                                      *latest)
                try:
                    await self.client.apply(self.configmap_path, body)
                except ApiError as exc:
                    report.errors.append(f"ConfigMap {PLAN_CONFIGMAP}: {exc}")
                    return
                self._published_latest = latest
            return
        try:
            if self._version is None:
                try:
                    self._version = version_of(await self.client.get(self.configmap_path))
                except ApiError as exc:
                    if not exc.not_found:
                        raise
                    self._version = 0
            version = self._version + 1
            doc = doc.model_copy(update={"version": version})
            body = plan_configmap(doc, PLAN_CONFIGMAP, self.config.namespace, *latest)
            await self.client.apply(self.configmap_path, body)
        except ApiError as exc:
            report.errors.append(f"ConfigMap {PLAN_CONFIGMAP}: {exc}")
            return
        self._version = version
        self.metrics.version.set(version)
        self.metrics.changes.inc()
        self._published_content = content
        self._published_latest = latest
        self.published = doc
        report.published_version = version
        log.info("published plan v%d (%d pools)", version, len(doc.pools))

    # ------------------------------------------------------------ EnergyPolicy status
    async def _write_policy_status(self, now: datetime, report: PassReport) -> None:
        """The live carbon sources' state on EnergyPolicy ``default`` (only when it changes)."""
        resolved = self.carbon.last
        exists = any(name == POLICY_NAME for name, _ in index_values(self.sources.policies))
        if resolved is None or not resolved.statuses or not exists:
            return
        body = policy_status(resolved, self._policy_status, now)
        if body == self._policy_status:
            return
        path = path_for(API_VERSION, ENERGYPOLICIES, None, POLICY_NAME, "status")
        try:
            await self.client.patch(path, {"status": body})
        except ApiError as exc:
            if not exc.not_found:
                report.errors.append(f"EnergyPolicy {POLICY_NAME} status: {exc}")
            return
        self._policy_status = body

    # ------------------------------------------------------------ Deployments
    async def _apply_deployments(
        self, live: Mapping[str, PoolEntry], plannable: Mapping[str, InferencePool],
        doc: PlanDocument, report: PassReport, sem: asyncio.Semaphore,
    ) -> None:
        desired: dict[tuple[str, str], dict[str, Any]] = {}
        for key, planned in doc.pools.items():
            entry, pool = live.get(key), plannable.get(key)
            if entry is not None and pool is not None:
                desired.update(desired_deployments(
                    entry, pool, planned, self.config.scheduler_name))
        existing = self.deployments()
        # An infeasible plan in force is a best effort: it never deletes a live pool's
        # Deployment, only scales it to 0 (a feasible plan brings it back).
        keep = set() if doc.feasible else {
            k for k in (set(existing) | set(self.writer.written)) - set(desired)
            if self.writer.pool_of(k, existing) in plannable
        }
        out = await self.writer.reconcile(desired, existing, keep, sem)
        report.deployments_applied += out.created_or_applied
        report.deployments_deleted += out.deleted
        report.deployments_scaled_down += out.scaled_down
        report.errors.extend(out.errors)
        report.pool_errors.update(out.pool_errors)
        if out.terminating - self.terminating:
            log.info("namespace(s) %s being deleted: their pools are not planned any more",
                     ", ".join(sorted(out.terminating - self.terminating)))
        self.terminating |= out.terminating

    async def delete_deployments_of(self, key: str) -> None:
        """Delete every Deployment of one pool (finalizer path); 404 counts as done."""
        await self.writer.delete_pool(key, self.deployments())

    def ready_replicas(self) -> dict[str, int]:
        """Ready replicas per pool key: :attr:`DeploymentInfo.ready_planned` summed over
        the pool's Deployments."""
        out: dict[str, int] = {}
        for d in self.deployments().values():
            out[d.pool] = out.get(d.pool, 0) + d.ready_planned
        return out

    # ------------------------------------------------------------ statuses
    async def _write_statuses(
        self, live: Mapping[str, PoolEntry], plannable: Mapping[str, InferencePool],
        view: PlanView, now: datetime, force: bool, report: PassReport,
        sem: asyncio.Semaphore,
    ) -> None:
        ready = self.ready_replicas()
        ready_by_name = {key: d.ready_planned for key, d in self.deployments().items()}
        for k in list(self._status_written):
            if k not in live:
                del self._status_written[k]

        async def write(entry: PoolEntry) -> None:
            pool = plannable.get(entry.key)
            served = view.in_force_outcomes.get(entry.key)
            base = pool_status(entry, view, ready.get(entry.key, 0),
                               deployable=pool is not None and has_containers(pool),
                               write_error=report.pool_errors.get(entry.key),
                               shared_ready=ready_shared_instances(
                                   entry.key, view.in_force, ready_by_name)
                               if served is not None and served.hosts
                               and view.in_force is not None else 0)
            if entry.key in self.gateway.conditions:
                base["conditions"].append(self.gateway.conditions[entry.key])
            written = self._status_written.get(entry.key)
            previous: Mapping[str, Any] = (
                written[1] if written is not None and written[0] == entry.uid else entry.status
            )
            first = with_times(_copy(base), previous, now, force)
            if (not force and previous and same_status(first, previous)
                    and first.get("lastPlanTime") == previous.get("lastPlanTime")):
                return
            final: dict[str, Any] = first

            def make_patch(current: dict[str, Any] | None) -> dict[str, Any] | None:
                nonlocal final
                if current is None:
                    final = first
                else:  # re-read after a conflict: times relative to what is there now
                    if (current.get("metadata") or {}).get("uid") not in (None, entry.uid):
                        return None  # a different object with the same name now
                    final = with_times(_copy(base), current.get("status") or {}, now, force)
                return status_patch(final)

            path = path_for(API_VERSION, INFERENCEPOOLS, entry.namespace,
                            entry.name, "status")
            async with sem:
                try:
                    result = await patch_merge_retrying(self.client, path, make_patch, None)
                except ApiError as exc:
                    if exc.not_found:
                        return  # deleted meanwhile
                    report.errors.append(f"status of {entry.key}: {exc}")
                    return
            if result is not None:
                self._status_written[entry.key] = (entry.uid, final)
                report.statuses_written += 1

        # A pool without the finalizer has not been adopted by kopf yet; kopf's finalizer
        # patch tests the resourceVersion, so a status write now would only make it retry.
        # Its create handler triggers another pass once the finalizer is on.
        await asyncio.gather(*(write(e) for e in live.values() if e.finalized))


def _iso_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _copy(status: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(status)
    out["conditions"] = [dict(c) for c in status.get("conditions") or []]
    return out


@contextlib.asynccontextmanager
async def running(planner: Planner) -> Any:
    """Run the planning loop in a task for the duration of the context."""
    task = asyncio.get_running_loop().create_task(planner.run(), name="joulepool planning loop")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await planner.carbon.close()
