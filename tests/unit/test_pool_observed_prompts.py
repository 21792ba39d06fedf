"""Observed prompt lengths: node agents count the prompts each pool's engines served
(their prompt-length histograms) into the pool's ``status.observedInputTokens``; the
planner plans with the longer, at each quantile, of those and the declared quantiles."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError
from test_nodeagent_agent import Rig
from test_nodeagent_prefill_floor import PromptEngine
from test_pool_prompt_tail import NODES, pool

from joulepool.api.models import EnergyPolicySpec, InferencePoolStatus, ObservedPromptLengths
from joulepool.core.classes import PromptLengths
from joulepool.nodeagent.publisher import PoolPromptPublisher, PromptCounts
from joulepool.nodeagent.signals import Histogram as H
from joulepool.pooling import build_problem, observed_prompt_lengths, plan_pools

NOW = datetime(2026, 12, 7, 4, 0, tzinfo=UTC)
BOUNDS = (100.0, 1000.0, 2000.0, 5000.0, 10000.0)


def counts(prompts: list[float], bounds: tuple[float, ...] = BOUNDS) -> list[float]:
    arr = np.asarray(prompts)
    return [float(np.count_nonzero(arr <= b)) for b in bounds] + [float(arr.size)]


def entry(node: str, prompts: list[float], age_s: float = 30.0,
          bounds: tuple[float, ...] = BOUNDS) -> ObservedPromptLengths:
    return ObservedPromptLengths(node=node, bounds=list(bounds), counts=counts(prompts, bounds),
                                 updated_at=NOW - timedelta(seconds=age_s))


LONG = [700.0] * 250 + [3000.0] * 30 + [9000.0] * 20  # 1 in 15 prompts between 5k and 10k
SHORT = [700.0] * 300


# ------------------------------------------------------------------ the status entry
@pytest.mark.parametrize("bad,message", [
    ({"bounds": [100.0, 50.0], "counts": [1, 2, 3]}, "ascend strictly"),
    ({"bounds": [100.0], "counts": [1, 2, 3]}, "one value per bound"),
    ({"bounds": [100.0], "counts": [3, 2]}, "cumulative"),
    ({"bounds": [math.inf], "counts": [1, 2]}, "finite"),
])
def test_bad_observed_entries_are_rejected(bad, message):
    with pytest.raises(ValidationError) as err:
        ObservedPromptLengths.model_validate({"node": "n", **bad})
    assert message in str(err.value)


# ------------------------------------------------------------------ from entries to lengths
def test_fresh_entries_are_summed_and_stale_or_thin_ones_are_not():
    got = observed_prompt_lengths([entry("a", LONG[:150]), entry("b", LONG[150:])], NOW)
    want = PromptLengths.from_histogram(BOUNDS, counts(LONG))
    assert got == want
    # a stale node's entry does not count; too few prompts: nothing observed
    assert observed_prompt_lengths([entry("a", LONG, age_s=3600.0)], NOW) is None
    assert observed_prompt_lengths([entry("a", LONG[:100])], NOW) is None
    # a node whose engines bucket differently: the layout with the most prompts wins
    other = (1.0, 2.0, 5.0, 10_000.0)
    mixed = observed_prompt_lengths([entry("a", LONG), entry("b", SHORT[:50], bounds=other)],
                                    NOW)
    assert mixed == want


def test_observed_long_prompts_keep_the_pool_off_the_a100():
    seen = {"default.chat": observed_prompt_lengths([entry("a", LONG)], NOW)}
    assert seen["default.chat"] is not None
    modes = [m.name for m in build_problem([pool()], NODES, EnergyPolicySpec()).modes]
    a100 = modes.index("1xA100")
    mean_only = build_problem([pool()], NODES, EnergyPolicySpec()).capacity_rps[0]
    observed = build_problem([pool()], NODES, EnergyPolicySpec(), observed=seen).capacity_rps[0]
    assert mean_only[a100] > 2.0 and observed[a100] == 0.0
    out = plan_pools([pool()], NODES, EnergyPolicySpec(), observed=seen).outcomes
    assert {a.mode for a in out["default.chat"].assignments} == {"1xH100"}


def test_declared_and_observed_the_longer_at_each_quantile_counts():
    declared_long = [{"quantile": 0.5, "tokens": 700}, {"quantile": 0.9, "tokens": 3000},
                     {"quantile": 0.99, "tokens": 9000}]
    short_seen = {"default.chat": observed_prompt_lengths([entry("a", SHORT)], NOW)}
    # short prompts observed do not undo a declared tail (a rare long prompt the window
    # missed), and long prompts observed override a declared short one
    kept = plan_pools([pool(declared_long)], NODES, EnergyPolicySpec(), observed=short_seen)
    assert {a.mode for a in kept.outcomes["default.chat"].assignments} == {"1xH100"}
    declared_short = [{"quantile": 0.5, "tokens": 700}, {"quantile": 0.99, "tokens": 900}]
    long_seen = {"default.chat": observed_prompt_lengths([entry("a", LONG)], NOW)}
    moved = plan_pools([pool(declared_short)], NODES, EnergyPolicySpec(), observed=long_seen)
    assert {a.mode for a in moved.outcomes["default.chat"].assignments} == {"1xH100"}
    alone = plan_pools([pool(declared_short)], NODES, EnergyPolicySpec())
    assert {a.mode for a in alone.outcomes["default.chat"].assignments} == {"1xA100"}


# ------------------------------------------------------------------ the agent's side
class NotFound(Exception):
    status = 404


class FakePools:
    """CustomObjectsApi's two calls on namespaced pools, with resourceVersions."""

    def __init__(self, objects: dict[tuple[str, str], dict[str, Any]]) -> None:
        self.objects = objects
        self.patches: list[tuple[str, str, dict[str, Any]]] = []

    def get_namespaced_custom_object(self, group, version, namespace, plural, name, **kw):
        assert kw.get("_request_timeout") and plural == "inferencepools"
        if (namespace, name) not in self.objects:
            raise NotFound(name)
        return self.objects[(namespace, name)]

    def patch_namespaced_custom_object_status(self, group, version, namespace, plural, name,
                                              body, **kw):
        assert kw.get("_request_timeout") and plural == "inferencepools"
        obj = self.objects[(namespace, name)]
        assert body["metadata"]["resourceVersion"] == obj["metadata"]["resourceVersion"]
        obj.setdefault("status", {}).update(body["status"])
        obj["metadata"]["resourceVersion"] = str(int(obj["metadata"]["resourceVersion"]) + 1)
        self.patches.append((namespace, name, body))


def test_the_publisher_replaces_its_own_entry_keeps_fresh_others_and_is_rate_limited():
    other = entry("n2", SHORT).model_dump(mode="json", by_alias=True)
    gone = entry("n3", SHORT, age_s=7200.0).model_dump(mode="json", by_alias=True)
    mine_old = entry("n1", SHORT[:10]).model_dump(mode="json", by_alias=True)
    api = FakePools({("default", "chat"): {
        "metadata": {"name": "chat", "resourceVersion": "7"},
        "status": {"observedInputTokens": [mine_old, other, gone], "replicas": 2}}})
    t = [100.0]
    pub = PoolPromptPublisher(api, now=lambda: NOW, min_interval_s=60.0, monotonic=lambda: t[0])
    c = PromptCounts("default.chat", "n1", BOUNDS, tuple(counts(LONG)))
    assert pub.publish(c)
    status = InferencePoolStatus.model_validate(api.objects[("default", "chat")]["status"])
    assert [e.node for e in status.observed_input_tokens] == ["n1", "n2"]
    assert status.observed_input_tokens[0].counts == counts(LONG)
    assert status.replicas == 2  # the operator's fields are untouched
    assert not pub.publish(c)  # within the interval
    t[0] += 61.0
    assert pub.publish(c) and len(api.patches) == 2
    assert not pub.publish(PromptCounts("default.gone", "n1", BOUNDS, (0, 0, 0, 0, 0, 1)))


async def test_the_agent_sums_each_pools_engines_and_publishes_them():
    rig = Rig(count=2, slo=(1.0, 0.05))

    class Recorder:
        def __init__(self) -> None:
            self.published: list[PromptCounts] = []

        def due(self, pool: str) -> bool:
            return True

        def publish(self, c: PromptCounts) -> bool:
            self.published.append(c)
            return True

    rec = Recorder()
    rig.agent.prompt_publisher = rec  # type: ignore[assignment]
    await rig.agent.start()
    for i, (gpu, pool_key) in enumerate([(0, "default.chat"), (1, "default.chat")]):
        e = PromptEngine(rig.gpus, [gpu], 4, url=f"http://e{i}", prompt=1000.0)
        e.page = H((*BOUNDS, math.inf), tuple(counts(LONG[150 * i:150 * (i + 1)])))
        e.pool = pool_key
        rig.engines.append(e)
    await rig.ticks(1)
    await rig.agent._publishing_prompts
    (c,) = rec.published  # one pool, both engines' prompts
    assert c.pool == "default.chat" and c.node == "n1" and c.bounds == BOUNDS
    assert list(c.counts) == counts(LONG)


# ------------------------------------------------------------------ the operator's side
async def test_the_operator_replans_when_agents_report_a_long_tail():
    from test_operator_planning import make_planner, plan, reconcile
    from test_operator_planning import pool as pool_body

    planner, api, world = make_planner()
    world.add_node("a1", product="A100")
    world.add_node("h1", product="H100")
    body = pool_body("chat", 2)
    world.add_pool(body)
    await reconcile(planner, world)
    first = plan(api).pools["default.chat"]
    assert {a.product for a in first.assignments if a.instances} == {"A100"}
    solves = planner.solves
    # a node agent reports what the pool's engines served (its status, as it patches it)
    path = "/apis/joulepool.dev/v1alpha1/namespaces/default/inferencepools/chat"
    now = datetime(2026, 1, 1, tzinfo=UTC)  # the planner's clock in make_planner
    api.objects[path].setdefault("status", {})["observedInputTokens"] = [
        entry("a1", LONG).model_copy(update={"updated_at": now}).model_dump(
            mode="json", by_alias=True)]
    world.refresh_pools()
    await reconcile(planner, world)
    assert planner.solves == solves + 1  # a new tail is a new input
    second = plan(api).pools["default.chat"]
    assert {a.product for a in second.assignments if a.instances} == {"H100"}
    await reconcile(planner, world)
    assert planner.solves == solves + 1  # the same tail: no new solve


async def test_the_operator_forgets_the_observed_tail_of_a_deleted_pool():
    """The per-pool memory of observed tails (and of invalid entries said) is pruned with
    the pool, as its written status is: pools that come and go do not grow it."""
    from test_operator_planning import make_planner, reconcile
    from test_operator_planning import pool as pool_body

    planner, api, world = make_planner()
    world.add_node("h1", product="H100")
    for name in ("chat", "gone"):
        world.add_pool(pool_body(name, 2))
    now = datetime(2026, 1, 1, tzinfo=UTC)  # the planner's clock in make_planner
    for name in ("chat", "gone"):
        path = f"/apis/joulepool.dev/v1alpha1/namespaces/default/inferencepools/{name}"
        api.objects[path].setdefault("status", {})["observedInputTokens"] = [
            entry("a1", LONG).model_copy(update={"updated_at": now}).model_dump(
                mode="json", by_alias=True), {"node": "bad"}]
    world.refresh_pools()
    for (e,) in world.pools.values():
        assert planner.observed_moved(e)
    await reconcile(planner, world)
    assert set(planner.observed_tails) == {"default.chat", "default.gone"}
    del world.pools["default.gone"]
    await reconcile(planner, world)
    assert set(planner.observed_tails) == {"default.chat"}
    assert planner.invalid_observed == {"default.chat"}  # said once per pool while it lives


def test_the_operator_status_comparison_ignores_the_node_agents_entries():
    """observedInputTokens is the node agents' field: a status the operator would write
    equals the one there when only that field differs (no write after a restart)."""
    from joulepool.operator.resources import same_status

    mine = {"replicas": 2, "conditions": [{"type": "Planned", "status": "True"}],
            "assignments": []}
    theirs = {**mine, "observedInputTokens": [
        entry("a1", LONG).model_dump(mode="json", by_alias=True)]}
    assert same_status(mine, theirs) and same_status(theirs, mine)
    assert not same_status(mine, {**mine, "replicas": 3})


def test_the_publisher_remembers_only_the_pools_still_inside_their_interval():
    """The publisher's per-pool rate-limit memory does not grow with every pool the node
    ever served: a pool whose interval is over is forgotten at the next publication."""
    api = FakePools({("default", f"p{i}"): {"metadata": {"name": f"p{i}",
                                                         "resourceVersion": "1"}}
                     for i in range(50)})
    t = [0.0]
    pub = PoolPromptPublisher(api, now=lambda: NOW, min_interval_s=60.0, monotonic=lambda: t[0])
    for i in range(50):
        assert pub.publish(PromptCounts(f"default.p{i}", "n1", BOUNDS, tuple(counts(LONG))))
        t[0] += 30.0
    assert len(pub._last) <= 2
    assert not pub.due("default.p49") and pub.due("default.p0")


def test_a_long_publish_interval_still_keeps_the_nodes_entry_fresh_for_the_operator():
    """--publish-interval also paces GPUProfile updates and may be long; a pool's entry is
    still rewritten within a third of the age after which the operator ignores it."""
    from joulepool.pooling import OBSERVED_MAX_AGE_S

    api = FakePools({("default", "chat"): {"metadata": {"name": "chat",
                                                        "resourceVersion": "1"}}})
    t = [0.0]
    pub = PoolPromptPublisher(api, now=lambda: NOW, min_interval_s=3600.0,
                              monotonic=lambda: t[0])
    c = PromptCounts("default.chat", "n1", BOUNDS, tuple(counts(LONG)))
    assert pub.publish(c)
    t[0] += OBSERVED_MAX_AGE_S / 3.0
    assert pub.publish(c) and len(api.patches) == 2


def test_lastplantime_holds_when_only_the_node_agents_entries_are_in_the_previous_status():
    """After an operator restart or a conflict re-read the previous status carries the
    agents' observedInputTokens; the plan is the same, so lastPlanTime must not move."""
    from joulepool.operator.resources import with_times

    mine = {"replicas": 2, "conditions": [{"type": "Planned", "status": "True"}],
            "assignments": []}
    there = {**mine, "lastPlanTime": "2026-12-07T03:00:00Z",
             "conditions": [{"type": "Planned", "status": "True",
                             "lastTransitionTime": "2026-12-07T03:00:00Z"}],
             "observedInputTokens": [entry("a1", LONG).model_dump(mode="json", by_alias=True)]}
    out = with_times({**mine, "conditions": [dict(mine["conditions"][0])]}, there, NOW)
    assert out["lastPlanTime"] == "2026-12-07T03:00:00Z"
