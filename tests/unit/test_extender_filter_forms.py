"""The vectorised NodeNames filter and the per-node full-Nodes filter agree."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from joulepool.extender import testing as T
from joulepool.extender.scheduler import Scheduler
from joulepool.extender.state import ClusterState
from joulepool.extender.wire import ExtenderArgs

POOLS = ["ns.a", "ns.b"]
PRODUCTS = ["H100", "A100", "L4"]


@st.composite
def clusters(draw: st.DrawFn) -> tuple[list[dict], list[dict], dict, int, str]:
    n = draw(st.integers(1, 12))
    nodes = [T.node(f"n{i}", draw(st.sampled_from(PRODUCTS)), draw(st.integers(0, 8)))
             for i in range(n)]
    pods = []
    for k in range(draw(st.integers(0, 15))):
        pods.append(T.pod(f"p{k}", pool=draw(st.sampled_from([*POOLS, None])),
                          node_name=f"n{draw(st.integers(0, n - 1))}",
                          gpus=draw(st.integers(0, 4))))
    assignments = {
        pool: [(f"n{i}", "H100", draw(st.integers(1, 8)))
               for i in range(n) if draw(st.booleans())]
        for pool in POOLS
    }
    plan = T.plan({k: v for k, v in assignments.items() if v})
    return nodes, pods, plan.model_dump(by_alias=True), draw(st.integers(0, 5)), draw(
        st.sampled_from(POOLS))


@settings(max_examples=150, deadline=None)
@given(clusters())
def test_names_form_matches_full_form(cluster: tuple) -> None:
    nodes, pods, plan, request, pool = cluster
    state = ClusterState()
    state.replace_nodes(nodes)
    state.replace_pods(pods)
    state.set_plan_json(json.dumps(plan, default=str))
    for src in ("nodes", "pods", "plan"):
        state.mark_synced(src)
    sched = Scheduler(state)
    pod = T.pod("new", pool=pool, gpus=request)
    names = [n["metadata"]["name"] for n in nodes]
    by_name = sched.filter(ExtenderArgs.model_validate(T.extender_args(pod, names=names)), {})
    raw = T.extender_args(pod, nodes=nodes)
    full = sched.filter(ExtenderArgs.model_validate(raw), raw)
    assert full.nodes is not None
    assert by_name.node_names == [n["metadata"]["name"] for n in full.nodes["items"]]
    assert by_name.failed_nodes == full.failed_nodes
    assert by_name.failed_and_unresolvable_nodes == full.failed_and_unresolvable_nodes
