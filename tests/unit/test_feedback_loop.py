"""Measured J/token fed back: a GPUProfile 30 % wrong is corrected in the next plan (its
energy coefficients) and in the router's eps, within a bounded number of agent periods."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from test_operator_planning import make_planner, plan, pool, reconcile

from joulepool.api.models import GPUProfile, MeasuredProfile
from joulepool.core.estimators import EnergyPerTokenEstimator
from joulepool.core.feedback import Correction, FeedbackParams, OperatingPointEstimator
from joulepool.core.profiles import H100_8B
from joulepool.kube import testing as T
from joulepool.kube.pools import Router, RouterSettings
from joulepool.kube.state import ClusterState
from joulepool.operator.drift import verdict
from joulepool.operator.resources import parse_profile

TRUE_SCALE = 1.3  # the GPUs really draw 30 % more than the GPUProfile says
KEY = H100_8B.key
T0 = datetime(2026, 1, 1, tzinfo=UTC)
PERIOD_S = 60  # the node agent's publication interval
PROFILE_PATH = "/apis/joulepool.dev/v1alpha1/gpuprofiles/h100-8b"


def eps_drift(api: Any) -> tuple[str, str]:
    """(status, reason) of the GPUProfile's EpsDrift condition, as the API holds it."""
    (cond,) = api.objects[PROFILE_PATH]["status"]["conditions"]
    assert cond["type"] == "EpsDrift" and cond["lastTransitionTime"]
    return cond["status"], cond["reason"]


def gpu_profile(measured: list[MeasuredProfile] | None = None) -> GPUProfile:
    """H100_8B's numbers as a GPUProfile resource (the profile under test)."""
    body = T.gpu_profile("h100-8b", H100_8B)
    body["metadata"]["uid"] = "u-prof"
    body["status"] = {"measured": [m.model_dump(by_alias=True) for m in measured or []]}
    return GPUProfile.model_validate(body)


class Agent:
    """One node agent's estimators (the agent's classes), fed by a GPU whose true eps is
    TRUE_SCALE x the profile's, at this node's own load and clock."""

    def __init__(self, node: str, batch: int, clock: float, scale: float = TRUE_SCALE) -> None:
        self.node, self.batch, self.clock, self.scale = node, batch, clock, scale
        self.eps = EnergyPerTokenEstimator(half_life_s=300.0)
        self.op = OperatingPointEstimator(300.0)
        self.rng = np.random.default_rng([ord(c) for c in node])  # reproducible

    def run_period(self, end: datetime) -> MeasuredProfile:
        tps = float(H100_8B.decode_tokens_per_s(self.batch, self.clock))
        jpt = self.scale * float(H100_8B.joules_per_token(self.batch, self.clock))
        for _ in range(PERIOD_S):
            tokens = tps * self.rng.uniform(0.8, 1.2)
            self.eps.update(tokens * jpt, tokens, 1.0)
            self.op.update(tokens, 1.0, self.clock)
        assert self.eps.value is not None
        return MeasuredProfile.model_validate({
            "joulesPerToken": self.eps.value, "samples": self.eps.samples, "node": self.node,
            "updatedAt": end, "tokensPerSecond": self.op.tokens_per_second,
            "clockMHz": self.op.clock_mhz})


def router_eps(doc: Any) -> float:
    """The eps the router scores the pool's H100 endpoint with, under plan ``doc``."""
    s = ClusterState()
    s.replace_nodes([T.node("n1", "H100")])
    s.replace_pods([T.pod("a", node_name="n1", ready=True, ip="10.0.0.1")])
    s.set_plan(doc)
    r = Router(RouterSettings(), s)
    ep = r.pool("default.chat").endpoints[0]
    return ep.model.op_eps


async def test_a_profile_30_percent_wrong_is_corrected_in_plan_and_router() -> None:
    planner, api, world = make_planner()
    for n in ("n1", "n2", "n3", "n4"):
        world.add_node(n)
    world.add_pool(pool("chat", 20))
    api.objects[PROFILE_PATH] = gpu_profile().model_dump(mode="json", by_alias=True)
    planner.sources.profiles = {"h100-8b": [gpu_profile()]}
    planner.clock = lambda: T0
    await reconcile(planner, world)
    assert eps_drift(api) == ("Unknown", "NotEnoughMeasurements")
    before = plan(api)
    assert before.eps_scales == {}
    jpt0, eps0 = before.pools["default.chat"].joules_per_token, router_eps(before)
    assert jpt0 is not None and eps0 > 0

    # four nodes at different loads and clocks; n4's meter is broken (reads 3x the truth)
    agents = [Agent("n1", 16, 1980.0), Agent("n2", 96, 1500.0), Agent("n3", 4, 1200.0),
              Agent("n4", 32, 1800.0, scale=3 * TRUE_SCALE)]
    history = []
    for period in range(1, 5):
        now = T0 + timedelta(seconds=PERIOD_S * period)
        planner.sources.profiles = {"h100-8b": [gpu_profile(
            [a.run_period(now) for a in agents])]}
        planner.clock = lambda now=now: now
        report = await reconcile(planner, world)
        assert report.ok
        doc = plan(api)
        jpt = doc.pools["default.chat"].joules_per_token
        assert jpt is not None
        _, corr = planner.corrections["h100-8b"]
        assert corr.rejected == ("n4",)  # the broken meter never counts
        published = doc.eps_scales.get(KEY, 1.0)  # 3 significant digits
        assert published == pytest.approx(corr.scale, rel=5e-3)
        history.append((corr.scale, jpt / jpt0, published, router_eps(doc) / eps0))
    # bounded: from the first measurement period on, all three within 3 % of the truth
    for scale, plan_ratio, published, router_ratio in history:
        assert scale == pytest.approx(TRUE_SCALE, rel=0.03), history
        assert plan_ratio == pytest.approx(scale, rel=1e-3), history  # energy coefficients
        assert router_ratio == pytest.approx(published, rel=1e-9), history  # scoring eps
    # the drift is told once: a condition, one Warning Event, the alert's gauges
    assert eps_drift(api) == ("True", "MeasuredEpsDrift")
    cond = api.objects[PROFILE_PATH]["status"]["conditions"][0]
    assert "1.3" in cond["message"] and "outliers rejected: n4" in cond["message"]
    # core/v1 Events about a cluster-scoped object: namespace default (API validation)
    events = [o for p, o in api.objects.items()
              if p.startswith("/api/v1/namespaces/default/events/")]
    assert len(events) == 1
    assert events[0]["involvedObject"] == {"apiVersion": "joulepool.dev/v1alpha1",
                                           "kind": "GPUProfile", "name": "h100-8b",
                                           "uid": "u-prof"}
    assert (events[0]["type"], events[0]["reason"]) == ("Warning", "MeasuredEpsDrift")
    # Unknown, then True once: a scale moving by < 5 % does not rewrite the condition
    assert len(api.writes(PROFILE_PATH + "/status")) == 2
    reg = planner.metrics.registry
    labels = {"profile": "h100-8b", "product": "H100", "model": H100_8B.model}
    assert reg.get_sample_value("joulepool_profile_eps_drift", labels) == 1
    assert reg.get_sample_value("joulepool_profile_eps_scale", labels) == pytest.approx(
        history[-1][0])


async def test_stale_measurements_return_the_plan_to_the_profile() -> None:
    planner, api, world = make_planner()
    world.add_node("n1")
    world.add_pool(pool("chat", 20))
    measured = Agent("n1", 32, 1980.0).run_period(T0)
    api.objects[PROFILE_PATH] = gpu_profile().model_dump(mode="json", by_alias=True)
    planner.sources.profiles = {"h100-8b": [gpu_profile([measured])]}
    planner.clock = lambda: T0
    await reconcile(planner, world)
    assert eps_drift(api) == ("True", "MeasuredEpsDrift")
    assert plan(api).eps_scales[KEY] == pytest.approx(TRUE_SCALE, rel=0.03)
    planner.clock = lambda: T0 + timedelta(seconds=planner.feedback.max_age_s + 1)
    await reconcile(planner, world)  # the agent stopped publishing: its entry went stale
    assert plan(api).eps_scales == {}
    assert planner.corrections["h100-8b"][1].stale == ("n1",)
    assert eps_drift(api) == ("Unknown", "NotEnoughMeasurements")


def test_verdict_within_the_threshold_is_false() -> None:
    corr = Correction(scale=1.1, tokens=1e5, used=("n1",), reason="")
    v = verdict(corr, FeedbackParams())
    assert (v.status, v.reason) == ("False", "WithinThreshold")
    assert "1.10x" in v.message and "±15%" in v.message


async def test_a_failed_condition_write_is_reported_and_retried() -> None:
    planner, api, world = make_planner()
    world.add_node("n1")
    world.add_pool(pool("chat", 20))
    api.objects[PROFILE_PATH] = gpu_profile().model_dump(mode="json", by_alias=True)
    planner.sources.profiles = {"h100-8b": [gpu_profile(
        [Agent("n1", 32, 1980.0).run_period(T0)])]}
    planner.clock = lambda: T0
    api.fail.append(("PATCH", "gpuprofiles/h100-8b/status", 500))
    report = await reconcile(planner, world)
    assert any("EpsDrift" in e for e in report.errors)
    assert plan(api).eps_scales[KEY] > 1.2  # the plan does not wait for the condition
    await reconcile(planner, world)
    assert eps_drift(api) == ("True", "MeasuredEpsDrift")


def test_the_operator_keeps_the_measurements_it_watches() -> None:
    """kopf's index holds parse_profile(body): status.measured must survive it (it did
    not, and the real-API test caught it); a status that does not validate is dropped,
    never the profile."""
    body = gpu_profile([Agent("n1", 32, 1980.0).run_period(T0)]).model_dump(
        mode="json", by_alias=True)
    kept = parse_profile(body)
    assert kept.status is not None and kept.status.measured[0].node == "n1"
    assert kept.status.measured[0].tokens_per_second is not None
    body["status"]["measured"][0]["joulesPerToken"] = -1
    assert parse_profile(body).status is None
