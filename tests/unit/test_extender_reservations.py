"""One-node answers with reservations hold a plan's per-node share while kube-scheduler
binds asynchronously (filter for the next pod before the watch shows the last bound)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from test_extender_filter_forms import MODE_NAMES, clusters

from joulepool.extender.reservations import Reservations
from joulepool.extender.scheduler import Scheduler
from joulepool.extender.wire import ExtenderArgs
from joulepool.kube import testing as T
from joulepool.kube.state import ClusterState


def _state(plan: dict[str, list[T.Assignment]], nodes: list[dict]) -> ClusterState:
    state = ClusterState()
    state.replace_nodes(nodes)
    state.replace_pods([])
    state.set_plan(T.plan(plan))
    for src in ("nodes", "pods", "plan"):
        state.mark_synced(src)
    return state


def _filter(sched: Scheduler, pod: dict, names: list[str]) -> list[str]:
    out = sched.filter(ExtenderArgs.model_validate(T.extender_args(pod, names=names)), {})
    return list(out.node_names or [])


NODES = [T.node("a", "L4", 4), T.node("b", "L4", 4), T.node("c", "L4", 4)]


def test_back_to_back_pods_never_exceed_the_share() -> None:
    """Plan: 3 on a, 1 on b. Five pods filtered before any binding is seen: 3 go to a,
    1 to b, the fifth finds no room (bound-pods-only counting let all five through a)."""
    clock = [0.0]
    state = _state({"ns.chat": [("a", "L4", 3), ("b", "L4", 1)]}, NODES)
    sched = Scheduler(state)
    sched.reservations = Reservations(ttl_s=30, clock=lambda: clock[0])
    answers = [_filter(sched, T.pod(f"p{i}", pool="ns.chat", gpus=1, mode="1xL4"),
                       ["a", "b", "c"]) for i in range(5)]
    assert all(len(a) <= 1 for a in answers)
    placed = [a[0] for a in answers if a]
    assert sorted(placed) == ["a", "a", "a", "b"]
    assert answers[4] == []


def test_retry_replaces_the_pods_own_reservation() -> None:
    state = _state({"ns.chat": [("a", "L4", 1)]}, NODES)
    sched = Scheduler(state)
    pod = T.pod("p0", pool="ns.chat", gpus=1, mode="1xL4")
    assert _filter(sched, pod, ["a", "b"]) == ["a"]
    assert _filter(sched, pod, ["a", "b"]) == ["a"]  # the same pod again: still room
    assert _filter(sched, T.pod("p1", pool="ns.chat", gpus=1, mode="1xL4"), ["a"]) == []


def test_bound_pod_replaces_its_reservation_without_double_count() -> None:
    state = _state({"ns.chat": [("a", "L4", 2)]}, NODES)
    sched = Scheduler(state)
    assert _filter(sched, T.pod("p0", pool="ns.chat", gpus=1, mode="1xL4"), ["a"]) == ["a"]
    state.upsert_pod(T.pod("p0", pool="ns.chat", gpus=1, mode="1xL4", node_name="a"))
    assert _filter(sched, T.pod("p1", pool="ns.chat", gpus=1, mode="1xL4"), ["a"]) == ["a"]
    assert len(sched.reservations) == 1  # p0's was dropped: it is counted as bound now
    assert _filter(sched, T.pod("p2", pool="ns.chat", gpus=1, mode="1xL4"), ["a"]) == []


def test_reservation_expires() -> None:
    clock = [0.0]
    state = _state({"ns.chat": [("a", "L4", 1)]}, NODES)
    sched = Scheduler(state)
    sched.reservations = Reservations(ttl_s=30, clock=lambda: clock[0])
    assert _filter(sched, T.pod("p0", pool="ns.chat", gpus=1, mode="1xL4"), ["a"]) == ["a"]
    assert _filter(sched, T.pod("p1", pool="ns.chat", gpus=1, mode="1xL4"), ["a"]) == []
    clock[0] = 31.0  # p0's binding never showed (failed, or p0 deleted)
    assert _filter(sched, T.pod("p1", pool="ns.chat", gpus=1, mode="1xL4"), ["a"]) == ["a"]


def test_most_room_first_and_other_pools_unaffected() -> None:
    state = _state({"ns.chat": [("a", "L4", 1), ("b", "L4", 3)],
                    "ns.batch": [("a", "L4", 2)]}, NODES)
    sched = Scheduler(state)
    assert _filter(sched, T.pod("c0", pool="ns.chat", gpus=1), ["a", "b"]) == ["b"]
    assert _filter(sched, T.pod("b0", pool="ns.batch", gpus=1), ["a", "b"]) == ["a"]
    assert _filter(sched, T.pod("b1", pool="ns.batch", gpus=1), ["a", "b"]) == ["a"]
    assert _filter(sched, T.pod("b2", pool="ns.batch", gpus=1), ["a", "b"]) == []
    # pods of no pool are never narrowed nor reserved
    assert _filter(sched, T.pod("x", pool=None, gpus=1), ["a", "b", "c"]) == ["a", "b", "c"]


@settings(max_examples=100, deadline=None)
@given(clusters(), st.sampled_from([None, *MODE_NAMES]))
def test_forms_agree_with_reservations(cluster: tuple, mode: str | None) -> None:
    """The same pod filtered in either form (a retry) gets the same one-node answer."""
    nodes, pods, plan, request, pool = cluster
    state = ClusterState()
    state.replace_nodes(nodes)
    state.replace_pods(pods)
    state.set_plan_json(json.dumps(plan, default=str))
    for src in ("nodes", "pods", "plan"):
        state.mark_synced(src)
    sched = Scheduler(state)
    pod = T.pod("new", pool=pool, gpus=request, mode=mode)
    names = [n["metadata"]["name"] for n in nodes]
    by_name = sched.filter(ExtenderArgs.model_validate(T.extender_args(pod, names=names)), {})
    raw = T.extender_args(pod, nodes=nodes)
    full = sched.filter(ExtenderArgs.model_validate(raw), raw)
    assert full.nodes is not None
    assert by_name.node_names == [n["metadata"]["name"] for n in full.nodes["items"]]
    assert len(by_name.node_names or []) <= (1 if request > 0 else len(names))
    assert by_name.failed_nodes == full.failed_nodes
    assert by_name.failed_and_unresolvable_nodes == full.failed_and_unresolvable_nodes


def _terminating(pod: dict) -> dict:
    pod["metadata"]["deletionTimestamp"] = "2026-12-06T23:00:00Z"
    return pod


def test_deleting_all_of_a_pools_pods_at_once_frees_their_share() -> None:
    """Plan: 4 on a. Four pods bound; all deleted at once, the ReplicaSet's replacements
    are filtered while the old pods are still terminating, or after some were deleted
    before their binding was seen: every replacement gets a place, at most the share."""
    clock = [0.0]  # node a has 8 GPUs: the share, not the node's capacity, is checked
    state = _state({"ns.chat": [("a", "L4", 4)]}, [T.node("a", "L4", 8)])
    sched = Scheduler(state)
    sched.reservations = Reservations(ttl_s=30, clock=lambda: clock[0])
    spec = {"pool": "ns.chat", "gpus": 1, "mode": "1xL4"}
    for i in range(4):
        state.upsert_pod(T.pod(f"old{i}", node_name="a", **spec))
    assert _filter(sched, T.pod("extra", **spec), ["a"]) == []  # the share is full
    for i in range(4):  # deleted at once: terminating, still bound
        state.upsert_pod(_terminating(T.pod(f"old{i}", node_name="a", **spec)))
    assert state.used_gpus == {"a": 4}  # still on the node for kube-scheduler's fit
    assert state.pool_gpus == {} and state.mode_gpus == {}  # but no longer in the share
    # two replacements reserved; deleted before their binding was seen (a second round)
    assert _filter(sched, T.pod("new0", **spec), ["a"]) == ["a"]
    assert _filter(sched, T.pod("new1", **spec), ["a"]) == ["a"]
    state.upsert_pod(T.pod("new0", **spec))  # seen pending, then deleted
    state.delete_pod("default/new0")
    state.upsert_pod(_terminating(T.pod("new1", **spec)))  # terminating before bound
    assert set(sched.reservations.by_pod) == {"default/new1"}  # new0: released at once
    for i in range(4):
        state.delete_pod(f"default/old{i}")
    answers = [_filter(sched, T.pod(f"rep{i}", **spec), ["a"]) for i in range(5)]
    assert answers == [["a"]] * 4 + [[]]  # without waiting for any reservation to expire
    assert clock[0] == 0.0


def test_reservation_released_by_the_pods_deletion_event() -> None:
    state = _state({"ns.chat": [("a", "L4", 1)]}, NODES)
    sched = Scheduler(state)
    spec = {"pool": "ns.chat", "gpus": 1, "mode": "1xL4"}
    assert _filter(sched, T.pod("p0", **spec), ["a"]) == ["a"]
    assert len(sched.reservations) == 1
    state.upsert_pod(T.pod("p0", **spec))
    state.delete_pod("default/p0")
    assert len(sched.reservations) == 0
    assert _filter(sched, T.pod("p1", **spec), ["a"]) == ["a"]
    state.upsert_pod(T.pod("p1", **spec))
    state.replace_pods([])  # a re-list that no longer has p1 releases it too
    assert len(sched.reservations) == 0
