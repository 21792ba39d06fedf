"""Profile drift, told: the ``EpsDrift`` condition on each GPUProfile, an Event, a metric.

After each pass the planner knows how the node agents' measurements correct
every GPUProfile (:mod:`joulepool.core.feedback`). This module writes that
verdict where people look: a status condition on the GPUProfile (only when it
changes), a Warning Event when a profile starts drifting (:mod:`joulepool.operator.events`:
in namespace ``default``, where the API server accepts an Event about a
cluster-scoped object), and the gauges
``joulepool_profile_eps_scale`` / ``joulepool_profile_eps_drift`` that the
chart's ``JoulepoolProfileEpsDrift`` alert reads. Failures to write are
reported, never raised: the planner does not stop for them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from joulepool.api.contract import API_VERSION, GPUPROFILES
from joulepool.core.feedback import Correction, FeedbackParams
from joulepool.core.profiles import ServingProfile
from joulepool.operator.events import post_cluster_event
from joulepool.operator.kube import ApiError, KubeClient, path_for
from joulepool.operator.metrics import OperatorMetrics

CONDITION = "EpsDrift"
#: relative change of the measured scale that rewrites the condition's message
SHOWN_SCALE_BAND = 0.05


@dataclass(frozen=True)
class Verdict:
    status: str  # True: drifting, False: within the threshold, Unknown: too few measurements
    reason: str
    message: str


def verdict(c: Correction, params: FeedbackParams) -> Verdict:
    """The ``EpsDrift`` condition's status, reason and message for one correction."""
    # stable wording (no token counts): the condition is rewritten only when it changes
    detail = f"{len(c.used)} node(s) measured"
    if c.rejected:
        detail += f"; outliers rejected: {', '.join(c.rejected)}"
    if c.stale:
        detail += f"; stale or without operating point: {', '.join(c.stale)}"
    if c.tokens < params.min_tokens or not c.used:
        return Verdict("Unknown", "NotEnoughMeasurements",
                       f"fewer than {params.min_tokens:.0f} fresh output tokens measured: "
                       f"the profile is used as is ({detail})")
    text = (f"measured J/token is {c.scale:.2f}x the profile's at the measured operating "
            f"points (threshold ±{params.drift_threshold:.0%}); the planner and the router "
            f"use the corrected value ({detail})")
    if c.drifted:
        return Verdict("True", "MeasuredEpsDrift", text)
    return Verdict("False", "WithinThreshold", text)


class DriftReporter:
    """Writes each GPUProfile's drift verdict: condition, Event on onset, gauges."""

    def __init__(self, client: KubeClient, metrics: OperatorMetrics) -> None:
        self.client = client
        self.metrics = metrics
        #: GPUProfile name -> the condition written last, and the scale its message shows
        self.written: dict[str, dict[str, Any]] = {}
        self.shown: dict[str, float] = {}

    async def report(self, corrections: Mapping[str, tuple[ServingProfile, Correction]],
                     uids: Mapping[str, str | None], params: FeedbackParams,
                     now: datetime) -> list[str]:
        """Write what changed; returns the errors (the API's answers)."""
        errors: list[str] = []
        self.metrics.profile_eps_scale.clear()
        self.metrics.profile_eps_drift.clear()
        for name in list(self.written):
            if name not in corrections:
                del self.written[name]
                self.shown.pop(name, None)
        for name, (profile, corr) in sorted(corrections.items()):
            labels = (name, profile.product.name, profile.model)
            self.metrics.profile_eps_scale.labels(*labels).set(corr.scale)
            self.metrics.profile_eps_drift.labels(*labels).set(1 if corr.drifted else 0)
            # the message shows the scale; within SHOWN_SCALE_BAND of the one written, the
            # written one is kept, so measurement noise does not rewrite the condition
            shown = self.shown.get(name)
            if shown is not None and abs(corr.scale / shown - 1.0) <= SHOWN_SCALE_BAND:
                corr = replace(corr, scale=shown)
            err = await self._write(name, uids.get(name), verdict(corr, params), now)
            if err:
                errors.append(err)
            else:
                self.shown[name] = corr.scale
        return errors

    async def _write(self, name: str, uid: str | None, v: Verdict,
                     now: datetime) -> str | None:
        old = self.written.get(name)
        if old is not None and (old["status"], old["reason"], old["message"]) == (
                v.status, v.reason, v.message):
            return None
        since = old["lastTransitionTime"] if old and old["status"] == v.status else None
        cond = {"type": CONDITION, "status": v.status, "reason": v.reason,
                "message": v.message,
                "lastTransitionTime": since or now.isoformat().replace("+00:00", "Z")}
        try:
            await self.client.patch(path_for(API_VERSION, GPUPROFILES, None, name, "status"),
                                    {"status": {"conditions": [cond]}})
            if v.status == "True" and (old is None or old["status"] != "True"):
                obj = {"apiVersion": API_VERSION, "kind": "GPUProfile", "name": name}
                if uid:
                    obj["uid"] = uid
                await post_cluster_event(self.client, obj, v.reason, v.message, now)
        except ApiError as exc:
            return f"GPUProfile {name} {CONDITION}: {exc}"
        self.written[name] = cond
        return None
