"""The node cache: GPU accounting from pods, plan handling, the columnar table."""

from __future__ import annotations

from joulepool.kube import testing as T
from joulepool.kube.state import ClusterState


def _state() -> ClusterState:
    s = ClusterState()
    s.replace_nodes([T.node("h0", "H100", 8), T.node("a0", "A100", 4), T.node("x0", "Mystery")])
    return s


def test_node_records_map_product_labels() -> None:
    s = _state()
    assert s.nodes["h0"].product == "H100"
    assert s.nodes["a0"].product == "A100" and s.nodes["a0"].allocatable_gpus == 4
    assert s.nodes["x0"].product is None
    v = s.node_version
    s.upsert_node(T.node("h0", "H100", 8))  # heartbeat: nothing we use changed
    assert s.node_version == v
    s.delete_node("x0")
    assert "x0" not in s.nodes and s.node_version == v + 1


def test_gpu_accounting_follows_pod_lifecycle() -> None:
    s = _state()
    s.upsert_pod(T.pod("p1", gpus=2, node_name="h0"))
    s.upsert_pod(T.pod("p2", gpus=1, node_name="h0", pool=None))
    s.upsert_pod(T.pod("p3", gpus=4))  # pending: holds nothing
    assert s.used_gpus == {"h0": 3}
    assert s.pool_gpus == {("h0", "default.chat"): 2}
    s.upsert_pod(T.pod("p1", gpus=2, node_name="h0", phase="Succeeded"))
    assert s.used_gpus == {"h0": 1}
    assert "default/p1" not in s.pods
    s.delete_pod("default/p2")
    assert s.used_gpus == {}
    s.replace_pods([T.pod("q", gpus=1, node_name="a0")])
    assert s.used_gpus == {"a0": 1} and set(s.pods) == {"default/q"}


def test_bad_plan_keeps_previous() -> None:
    s = _state()
    good = T.plan({"default.chat": [("h0", "H100", 4)]})
    assert s.set_plan_json(good.to_json())
    assert s.plan is not None and s.plan.version == 7
    assert not s.set_plan_json('{"pools": {"x": {"name": 3}}}')
    assert not s.set_plan_json("not json")
    assert s.plan is not None and "default.chat" in s.plan.pools
    assert "keeping the previous" in s.plan_error


def test_planned_share_from_nodes_or_assignments() -> None:
    s = _state()
    p = T.plan({"default.chat": [("h0", "H100", 4)]})
    s.set_plan(p)
    assert s.planned_share("default.chat", "h0") == 4
    assert s.planned_share("default.chat", "a0") is None
    p.nodes.clear()
    s.set_plan(p)
    assert s.planned_share("default.chat", "h0") == 4  # from the assignments


def test_table_is_cached_and_tracks_pods() -> None:
    s = _state()
    t1 = s.table()
    assert t1.names == ["a0", "h0", "x0"]
    assert s.table() is t1
    s.upsert_pod(T.pod("p", gpus=3, node_name="h0"))
    t2 = s.table()
    assert t2 is not t1 and t2.names is t1.names
    assert t2.used.tolist() == [0.0, 3.0, 0.0]
    assert t2.products == ["A100", "H100"] and t2.product_ids.tolist() == [0, 1, -1]
    assert t2.host_prefix[1] == '{"Host":"h0","Score":'


def test_dirty_pools() -> None:
    s = _state()
    assert s.take_dirty_pools() is None  # everything, initially
    s.upsert_pod(T.pod("p", pool="ns.a", node_name="h0", ready=True, ip="1.2.3.4"))
    assert s.take_dirty_pools() == {"ns.a"}
    assert s.take_dirty_pools() == set()
    s.set_plan(T.plan({"ns.a": [("h0", "H100", 1)]}))
    assert s.take_dirty_pools() is None


def test_readiness_needs_every_source() -> None:
    s = ClusterState()
    assert not s.ready and s.not_synced() == ["nodes", "pods", "plan"]
    for src in ("nodes", "pods", "plan"):
        s.mark_synced(src)
    assert s.ready


def test_mode_accounting_and_shares() -> None:
    s = _state()
    s.upsert_pod(T.pod("m1", gpus=4, node_name="h0", mode="4xH100"))
    s.upsert_pod(T.pod("m2", gpus=1, node_name="h0", mode="1xH100"))
    s.upsert_pod(T.pod("m3", gpus=1, node_name="h0"))  # pool label only
    s.upsert_pod(T.pod("m4", gpus=2, node_name="h0", pool=None, mode="2xH100"))  # no pool
    s.upsert_pod(T.pod("m5", gpus=4, mode="4xH100"))  # pending
    assert s.pool_gpus == {("h0", "default.chat"): 6}
    assert s.mode_gpus == {("h0", "default.chat", "4xH100"): 4,
                           ("h0", "default.chat", "1xH100"): 1}
    assert s.pods["default/m1"].mode == "4xH100" and s.pods["default/m4"].mode is None
    s.delete_pod("default/m1")
    assert s.mode_gpus == {("h0", "default.chat", "1xH100"): 1}
    s.replace_pods([T.pod("q", gpus=2, node_name="a0", mode="2xA100")])
    assert s.mode_gpus == {("a0", "default.chat", "2xA100"): 2}

    assert s.mode_shares("default.chat", "4xH100") == {}  # no plan yet
    s.set_plan(T.plan({"default.chat": [("h0", "H100", 1, 4), ("h0", "H100", 2, 1),
                                        ("a0", "A100", 1, 4), ("x0", "H100", 0, 4)]}))
    assert s.mode_shares("default.chat", "4xH100") == {"h0": 4}  # x0: no instances
    assert s.mode_shares("default.chat", "1xH100") == {"h0": 2}
    assert s.mode_shares("default.chat", "4xA100") == {"a0": 4}
    assert s.mode_shares("default.chat", "8xL4") == {}
    assert s.mode_shares("other.pool", "4xH100") == {}
    s.set_plan(T.plan({"default.chat": [("a0", "H100", 2, 4)]}))
    assert s.mode_shares("default.chat", "4xH100") == {"a0": 8}  # follows the new plan


def test_confirm_pods_applies_a_read_newer_than_the_watch() -> None:
    s = _state()
    for name in ("gone", "going", "stays"):
        s.upsert_pod(T.pod(name, gpus=2, node_name="h0"))
    assert s.used_gpus == {"h0": 6} and s.pool_gpus == {("h0", "default.chat"): 6}
    seen = s.pods_holding_gpus("h0")
    assert seen == {f"default/{n}": f"uid-default-{n}" for n in ("gone", "going", "stays")}
    going = T.pod("going", gpus=2, node_name="h0")
    going["metadata"]["deletionTimestamp"] = "2026-12-07T00:00:00Z"
    # a pod the watch delivers after the read was issued is not the read's to judge
    s.upsert_pod(T.pod("late", gpus=1, node_name="h0"))
    v = s.pod_version
    assert s.confirm_pods(seen, [going, T.pod("stays", gpus=2, node_name="h0")]) == 2
    assert "default/gone" not in s.pods and s.pods["default/going"].terminating
    assert s.used_gpus == {"h0": 5}  # the terminating pod still holds its node's GPUs
    assert s.pool_gpus == {("h0", "default.chat"): 3}  # ...but not the pool's share
    assert s.pod_version > v
    # the watch catches up late: its older events cannot bring either back
    s.upsert_pod(T.pod("gone", gpus=2, node_name="h0"))
    s.upsert_pod(T.pod("going", gpus=2, node_name="h0"))
    assert "default/gone" not in s.pods and s.pods["default/going"].terminating
    s.delete_pod("default/going")
    s.delete_pod("default/gone")
    assert s.used_gpus == {"h0": 3}
    # a later pod of the same name (new uid) is a different pod
    again = T.pod("gone", gpus=2, node_name="h0")
    again["metadata"]["uid"] = "uid-2"
    s.upsert_pod(again)
    assert s.pods["default/gone"].uid == "uid-2"
    assert s.confirm_pods({"default/gone": "uid-default-gone"}, []) == 0
    assert "default/gone" in s.pods
