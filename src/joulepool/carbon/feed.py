"""Keep every site's live carbon source fresh and resolve a policy for the planner.

The planner's integration point is one call::

    policy = await feed.planning_policy(policy_spec, now)

It fetches the sources that are due (concurrently, each bounded by its
``timeoutSeconds``; a 429 postpones that source by its Retry-After), then
returns a copy of the policy whose live sources are replaced by a series of
``windowSteps`` intensities (gCO2/kWh) on the planning grid, so the planner
sees exactly what it sees for a static series.  A source with no fresh data
(none yet, or none within ``staleAfterSeconds``) plans with its
``fallbackGramsPerKWh``, or, without one, is left out (the planner then counts
the site as the dirtiest known site).  Nothing here raises into the planner:
failures become :attr:`ResolvedCarbon.conditions`, per-site statuses and
metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp

from joulepool.api.models import (
    CarbonSourceSpec,
    Condition,
    EnergyPolicySpec,
    SiteCarbon,
    SiteCarbonStatus,
)
from joulepool.carbon.base import (
    Credentials,
    FetchContext,
    ObjectReader,
    RateLimited,
    Reading,
    SourceError,
    decode_secret,
    read_object,
)
from joulepool.carbon.metrics import CarbonMetrics
from joulepool.carbon.providers import FETCHERS, signal_of
from joulepool.core.energy import horizon_s, resample_intensity

log = logging.getLogger("joulepool.carbon")

#: a failed fetch is retried after min(refreshSeconds, this)
RETRY_AFTER_ERROR_S = 60.0
#: requests one fetch may make (WattTime: login + forecast + re-login + forecast)
MAX_REQUESTS_PER_FETCH = 4
READY = "CarbonSourcesReady"
CONSISTENT = "CarbonSignalsConsistent"


@dataclass
class _SiteState:
    """What the feed remembers about one site's source."""

    key: str
    memo: dict[str, Any] = field(default_factory=dict)
    reading: Reading | None = None
    last_success_s: float | None = None
    next_fetch_s: float = -math.inf
    error: str = ""


@dataclass(frozen=True)
class ResolvedCarbon:
    """A policy the planner takes as it is, and what to tell the user about its sources."""

    policy: EnergyPolicySpec
    statuses: tuple[SiteCarbonStatus, ...] = ()
    conditions: tuple[Condition, ...] = ()


def grid_start(now_s: float, step_s: float) -> float:
    """Start of the planning step that holds ``now_s`` (steps aligned to the epoch), so the
    resolved series, and with it the planner's input fingerprint, changes at most once per step."""
    return math.floor(now_s / step_s) * step_s


class CarbonFeed:
    """Live carbon sources of one operator.

    ``read_object`` reads Kubernetes objects (ConfigMaps, Secrets) by API path;
    ``namespace`` is where a Secret without a namespace lives.
    """

    def __init__(
        self, read_object: ObjectReader | None = None, namespace: str = "joulepool",
        metrics: CarbonMetrics | None = None, wait_s: float = 5.0,
        on_update: Callable[[], object] | None = None,
    ) -> None:
        self.read_object = read_object
        self.namespace = namespace
        self.metrics = metrics or CarbonMetrics()
        #: how long one planning pass waits for due fetches before it plans without them
        self.wait_s = wait_s
        #: called when fetches a pass stopped waiting for have finished (plan again)
        self.on_update = on_update
        self._sites: dict[str, _SiteState] = {}
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._gave_up_waiting = False
        self.last: ResolvedCarbon | None = None

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------ the one call
    async def planning_policy(self, policy: EnergyPolicySpec, now: datetime) -> EnergyPolicySpec:
        """The policy with every live source resolved, after fetching what is due.

        Due fetches run in a task; the pass waits for it at most :attr:`wait_s`
        and otherwise plans with the data it has (a slow provider never holds
        the planner up); :attr:`on_update` is called when that task finishes.
        """
        now_s = now.timestamp()
        if (self._task is None or self._task.done()) and self._due(policy, now_s):
            self._gave_up_waiting = False
            self._task = asyncio.get_running_loop().create_task(
                self.refresh(policy, now_s), name="joulepool carbon refresh")
            self._task.add_done_callback(self._finished)
        if self._task is not None and not self._task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._task), self.wait_s)
            except TimeoutError:
                self._gave_up_waiting = True
                log.info("carbon sources still fetching after %.1fs: planning without them",
                         self.wait_s)
        self.last = self.resolve(policy, now_s)
        return self.last.policy

    def _finished(self, task: asyncio.Task[None]) -> None:
        if self._gave_up_waiting and not task.cancelled() and self.on_update is not None:
            self.on_update()

    def _due(self, policy: EnergyPolicySpec, now_s: float) -> bool:
        return any(self._state(c.site, c.source).next_fetch_s <= now_s
                   for c in policy.carbon if c.source is not None)

    # ------------------------------------------------------------ fetching
    def _state(self, site: str, source: CarbonSourceSpec) -> _SiteState:
        key = source.model_dump_json()
        st = self._sites.get(site)
        if st is None or st.key != key:  # new or changed source: start afresh
            st = self._sites[site] = _SiteState(key)
        return st

    async def refresh(self, policy: EnergyPolicySpec, now_s: float) -> None:
        """Fetch every live source whose refresh is due; never raises."""
        live = {c.site: c.source for c in policy.carbon if c.source is not None}
        for site in set(self._sites) - set(live):
            del self._sites[site]
        due = [(site, src) for site, src in live.items()
               if self._state(site, src).next_fetch_s <= now_s]
        if due:
            await asyncio.gather(*(self._fetch(site, src, now_s) for site, src in due))

    async def _fetch(self, site: str, source: CarbonSourceSpec, now_s: float) -> None:
        st = self._state(site, source)
        labels = (site, source.provider)
        try:
            reading = await asyncio.wait_for(
                self._read(source, st, now_s),
                source.timeout_seconds * MAX_REQUESTS_PER_FETCH + 1.0)
        except RateLimited as exc:
            st.next_fetch_s = now_s + max(source.refresh_seconds, exc.retry_after_s)
            self._failed(st, labels, exc.reason, str(exc))
        except SourceError as exc:
            st.next_fetch_s = now_s + min(source.refresh_seconds, RETRY_AFTER_ERROR_S)
            self._failed(st, labels, exc.reason, str(exc))
        except TimeoutError:
            st.next_fetch_s = now_s + min(source.refresh_seconds, RETRY_AFTER_ERROR_S)
            self._failed(st, labels, "timeout", "fetch did not finish in time")
        except Exception as exc:  # a bug in a client must not stop the planner
            log.exception("carbon source of site %s failed", site)
            st.next_fetch_s = now_s + min(source.refresh_seconds, RETRY_AFTER_ERROR_S)
            self._failed(st, labels, "error", f"{type(exc).__name__}: {exc}")
        else:
            st.reading, st.last_success_s, st.error = reading, now_s, ""
            st.next_fetch_s = now_s + source.refresh_seconds
            self.metrics.up.labels(*labels).set(1)
            self.metrics.last_success.labels(*labels).set(now_s)

    def _failed(self, st: _SiteState, labels: tuple[str, str], reason: str, msg: str) -> None:
        st.error = msg
        self.metrics.up.labels(*labels).set(0)
        self.metrics.last_success.labels(*labels).set(st.last_success_s or 0)
        self.metrics.errors.labels(*labels, reason).inc()
        log.warning("carbon source of site %s (%s): %s", labels[0], labels[1], msg)

    async def _read(self, source: CarbonSourceSpec, st: _SiteState, now_s: float) -> Reading:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        creds = Credentials()
        ref = source.token_secret_ref
        if ref is not None:
            ns = ref.namespace or self.namespace
            ctx0 = FetchContext(self._session, source.timeout_seconds, creds, self.read_object)
            secret = await read_object(ctx0, f"/api/v1/namespaces/{ns}/secrets/{ref.name}",
                                       f"Secret {ns}/{ref.name}")
            creds = decode_secret(secret)
        ctx = FetchContext(self._session, source.timeout_seconds, creds, self.read_object,
                           st.memo)
        return await FETCHERS[source.provider](source, ctx, now_s)

    # ------------------------------------------------------------ resolving (pure)
    def resolve(self, policy: EnergyPolicySpec, now_s: float) -> ResolvedCarbon:
        """The policy with live sources replaced by series on the planning grid; statuses."""
        start = grid_start(now_s, policy.step_seconds)
        carbon: list[SiteCarbon] = []
        statuses: list[SiteCarbonStatus] = []
        for entry in policy.carbon:
            if entry.source is None:
                carbon.append(entry)
                continue
            resolved, status = self._resolve_site(entry.site, entry.source, policy, now_s, start)
            statuses.append(status)
            if resolved is not None:
                carbon.append(resolved)
        for entry in carbon:
            self.metrics.intensity.labels(entry.site).set(entry.values()[0])
        out = policy.model_copy(update={"carbon": carbon})
        return ResolvedCarbon(out, tuple(statuses), _conditions(statuses))

    def _resolve_site(
        self, site: str, source: CarbonSourceSpec, policy: EnergyPolicySpec,
        now_s: float, start: float,
    ) -> tuple[SiteCarbon | None, SiteCarbonStatus]:
        st = self._state(site, source)
        labels = (site, source.provider)
        reading = st.reading
        points = reading.points if reading is not None else ()
        data_end = max((p.end_s for p in points), default=-math.inf)
        fresh = (st.last_success_s is not None
                 and now_s - st.last_success_s <= source.stale_after_seconds
                 and now_s - data_end <= source.stale_after_seconds)
        horizon = horizon_s(points, now_s) if points else 0.0
        self.metrics.stale.labels(*labels).set(0 if fresh else 1)
        self.metrics.horizon.labels(*labels).set(horizon)
        resolved: SiteCarbon | None = None
        if fresh:
            series = resample_intensity(points, start, policy.step_seconds, policy.window_steps)
            resolved = SiteCarbon(site=site, series=[round(v, 3) for v in series])
        elif source.fallback_grams_per_kwh is not None:
            resolved = SiteCarbon.model_validate(
                {"site": site, "gramsPerKWh": source.fallback_grams_per_kwh})
        message = st.error
        if not fresh and not message:
            message = ("no data yet" if st.last_success_s is None
                       else "data older than staleAfterSeconds")
        window_end = start + policy.step_seconds * policy.window_steps
        if fresh and not message and now_s + horizon < window_end:
            message = (f"data cover {horizon / 60:.0f} of the planning window's "
                       f"{(window_end - now_s) / 60:.0f} min ahead; the last value holds")
        status = SiteCarbonStatus.model_validate({
            "site": site, "provider": source.provider,
            "signal": reading.signal if reading is not None else signal_of(source),
            "gramsPerKWh": resolved.values()[0] if resolved is not None else None,
            "horizonSeconds": round(horizon), "stale": not fresh,
            "usingFallback": not fresh and resolved is not None,
            "lastSuccessTime": (datetime.fromtimestamp(st.last_success_s, UTC)
                                if st.last_success_s is not None else None),
            "message": message,
        })
        return resolved, status


def _conditions(statuses: list[SiteCarbonStatus]) -> tuple[Condition, ...]:
    if not statuses:
        return ()
    bad = [s for s in statuses if s.stale]
    ready = Condition(
        type=READY, status="False" if bad else "True",
        reason="SourceStale" if bad else "Fresh",
        message="; ".join(
            f"{s.site} ({s.provider}): {s.message}; planning with "
            + (f"fallback {s.grams_per_kwh:g} gCO2/kWh" if s.using_fallback
               else "the dirtiest known site's intensity")
            for s in bad) or f"{len(statuses)} live source(s) fresh")
    signals = sorted({s.signal for s in statuses})
    consistent = Condition(
        type=CONSISTENT, status="True" if len(signals) == 1 else "False",
        reason="OneSignal" if len(signals) == 1 else "MixedSignals",
        message=(f"every live source gives {signals[0]} emissions" if len(signals) == 1 else
                 "live sources mix average and marginal emissions; sites are not comparable"),
    )
    return ready, consistent


def policy_status(
    resolved: ResolvedCarbon, previous: Mapping[str, Any] | None, now: datetime,
) -> dict[str, Any]:
    """The EnergyPolicy ``status`` for ``resolved`` (wire form); a condition keeps its
    lastTransitionTime from ``previous`` while its status is unchanged."""
    before = {c.get("type"): c for c in (previous or {}).get("conditions") or []}
    conditions = []
    for c in resolved.conditions:
        old = before.get(c.type)
        since = (old.get("lastTransitionTime") if old and old.get("status") == c.status
                 else None) or now.isoformat().replace("+00:00", "Z")
        wire = c.model_dump(by_alias=True, mode="json", exclude={"last_transition_time"})
        conditions.append({**wire, "lastTransitionTime": since})
    return {"conditions": conditions,
            "carbon": [s.model_dump(by_alias=True, mode="json", exclude_none=True)
                       for s in resolved.statuses]}
