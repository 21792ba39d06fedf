"""The vectorised NodeNames filter and the per-node full-Nodes filter agree,
for pool-level pods and for pods with a serving mode label."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from joulepool.extender.scheduler import PlacementSettings, Scheduler
from joulepool.extender.wire import ExtenderArgs
from joulepool.kube import testing as T
from joulepool.kube.state import ClusterState

#: every node that passes is answered (no one-node reservation): the forms are compared
ALL_PASSING = PlacementSettings(reserve=False)

POOLS = ["ns.a", "ns.b"]
PRODUCTS = ["H100", "A100", "L4"]
#: (product, GPUs per instance): the modes ``<gpus>x<product>`` the plans use
MODES = [("H100", 1), ("H100", 4), ("A100", 2)]
MODE_NAMES = [f"{g}x{p}" for p, g in MODES]


@st.composite
def clusters(draw: st.DrawFn) -> tuple[list[dict], list[dict], dict, int, str]:
    n = draw(st.integers(1, 12))
    nodes = [T.node(f"n{i}", draw(st.sampled_from(PRODUCTS)), draw(st.integers(0, 8)))
             for i in range(n)]
    pods = []
    for k in range(draw(st.integers(0, 15))):
        pods.append(T.pod(f"p{k}", pool=draw(st.sampled_from([*POOLS, None])),
                          node_name=f"n{draw(st.integers(0, n - 1))}",
                          gpus=draw(st.integers(0, 4)),
                          mode=draw(st.sampled_from([None, *MODE_NAMES]))))
    assignments: dict[str, list[T.Assignment]] = {pool: [] for pool in POOLS}
    for pool in POOLS:
        for i in range(n):
            for product, per in MODES:  # some nodes get several modes of one pool
                if draw(st.integers(0, 2)) == 0:
                    assignments[pool].append(
                        (f"n{i}", product, draw(st.integers(0, 3)), per))
    plan = T.plan({k: v for k, v in assignments.items() if v})
    if draw(st.booleans()):  # shares from the assignments rather than plan.nodes
        plan.nodes.clear()
    return nodes, pods, plan.model_dump(by_alias=True), draw(st.integers(0, 5)), draw(
        st.sampled_from(POOLS))


@settings(max_examples=150, deadline=None)
@given(clusters(), st.sampled_from([None, *MODE_NAMES, "8xL4"]))
def test_names_form_matches_full_form(cluster: tuple, mode: str | None) -> None:
    nodes, pods, plan, request, pool = cluster
    state = ClusterState()
    state.replace_nodes(nodes)
    state.replace_pods(pods)
    state.set_plan_json(json.dumps(plan, default=str))
    for src in ("nodes", "pods", "plan"):
        state.mark_synced(src)
    sched = Scheduler(state, settings=ALL_PASSING)
    pod = T.pod("new", pool=pool, gpus=request, mode=mode)
    names = [n["metadata"]["name"] for n in nodes]
    by_name = sched.filter(ExtenderArgs.model_validate(T.extender_args(pod, names=names)), {})
    raw = T.extender_args(pod, nodes=nodes)
    full = sched.filter(ExtenderArgs.model_validate(raw), raw)
    assert full.nodes is not None
    assert by_name.node_names == [n["metadata"]["name"] for n in full.nodes["items"]]
    assert by_name.failed_nodes == full.failed_nodes
    assert by_name.failed_and_unresolvable_nodes == full.failed_and_unresolvable_nodes


def test_mode_pods_are_judged_by_their_mode_in_both_forms() -> None:
    """The issue's repro without HTTP: rag = 1 x 4xH100 on h0 and 1 x 8xA100 on a0."""
    state = ClusterState()
    nodes = [T.node("h0", "H100", 8), T.node("a0", "A100", 8)]
    state.replace_nodes(nodes)
    state.replace_pods([])
    state.set_plan(T.plan({"ns.rag": [("h0", "H100", 1, 4), ("a0", "A100", 1, 8)]}))
    for src in ("nodes", "pods", "plan"):
        state.mark_synced(src)
    sched = Scheduler(state, settings=ALL_PASSING)
    for mode, gpus, where in (("4xH100", 4, ["h0"]), ("8xA100", 8, ["a0"]),
                              (None, 4, ["h0", "a0"])):
        pod = T.pod("new", pool="ns.rag", gpus=gpus, mode=mode)
        by_name = sched.filter(ExtenderArgs.model_validate(
            T.extender_args(pod, names=["h0", "a0"])), {})
        raw = T.extender_args(pod, nodes=nodes)
        full = sched.filter(ExtenderArgs.model_validate(raw), raw)
        assert full.nodes is not None
        assert by_name.node_names == where, mode
        assert [n["metadata"]["name"] for n in full.nodes["items"]] == where, mode
        assert by_name.failed_and_unresolvable_nodes == full.failed_and_unresolvable_nodes
