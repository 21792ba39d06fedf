"""Pure helpers of the operator: parsing, Deployments, plan document, conditions, RBAC, CLI."""

from __future__ import annotations

import argparse
import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml

from joulepool.api.models import AssignmentStatus, InferencePool
from joulepool.api.plan import PlanDocument, PlannedInstance, PlannedNode, PlannedPool, PlannedSLO
from joulepool.operator import rbac
from joulepool.operator.resources import (
    SCALED_DOWN,
    DeploymentInfo,
    PlanView,
    build_deployment,
    deployment_from_body,
    deployment_name,
    desired_deployments,
    mode_slug,
    node_from_body,
    parse_pool,
    plan_configmap,
    plan_content,
    plan_without,
    pool_conditions,
    pool_status,
    read_node,
    same_status,
    scale_down_patch,
    spec_hash,
    version_of,
    with_times,
)
from joulepool.pooling import PoolOutcome


def pool_body(name: str = "chat", ns: str = "default", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "joulepool.dev/v1alpha1", "kind": "InferencePool",
        "metadata": {"name": name, "namespace": ns, "uid": "u1", "generation": 3,
                     "finalizers": ["joulepool.dev/finalizer"], "resourceVersion": "9",
                     "managedFields": [{"manager": "kubectl"}]},
        "spec": {"model": "llama-3.1-8b", "slo": {"ttftSeconds": 1, "tpotSeconds": 0.1},
                 "demand": {"requestsPerSecond": 4, "meanInputTokens": 1000,
                            "meanOutputTokens": 200},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": "engine", "image": "img"}]}}},
        "status": {"kopf": {"anything": 1}},
    }
    body["spec"].update(spec)
    return body


# ---------------------------------------------------------------- pools
def test_parse_valid_pool_ignores_status_and_extra_metadata() -> None:
    e = parse_pool(pool_body())
    assert e.valid and e.key == "default.chat" and e.uid == "u1" and e.generation == 3
    assert e.finalized and not e.deleting and e.error is None
    assert isinstance(e.pool, InferencePool)


@pytest.mark.parametrize(("patch", "field"), [
    ({"slo": {"ttftSeconds": -1, "tpotSeconds": 0.1}}, "spec.slo.ttftSeconds"),
    ({"demand": {"requestsPerSecond": 1}}, "spec.demand.meanInputTokens"),
    ({"bogus": 1}, "spec.bogus"),
    ({"template": {"spec": {"containers": [{"name": "x"}]}}}, "spec.template.spec.containers[0]"),
    ({"template": {"spec": {"containers": "x"}}}, "spec.template.spec.containers"),
    ({"template": {"spec": 3}}, "spec.template.spec"),
    ({"template": {"kind": "Pod"}}, "spec.template"),
])
def test_invalid_pool_names_the_field(patch: dict[str, Any], field: str) -> None:
    e = parse_pool(pool_body(**patch))
    assert not e.valid and e.field == field
    assert e.error is not None and e.error.startswith(field + ":")


def test_pool_key_must_fit_a_label_value() -> None:
    e = parse_pool(pool_body(name="p" * 60, ns="a-long-namespace"))
    assert not e.valid and e.field == "metadata.name" and "63" in (e.error or "")


def test_deleting_and_unadopted_pools() -> None:
    b = pool_body()
    b["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    b["metadata"]["finalizers"] = []
    e = parse_pool(b)
    assert e.deleting and not e.finalized


def test_pool_without_template_is_valid_but_not_deployable() -> None:
    b = pool_body()
    del b["spec"]["template"]
    e = parse_pool(b)
    assert e.valid
    planned = _planned_pool([("1xH100", 2, 1)])
    assert desired_deployments(e, e.pool, planned, "s") == {}  # type: ignore[arg-type]


# ---------------------------------------------------------------- nodes
def node_body(**kw: Any) -> dict[str, Any]:
    b: dict[str, Any] = {
        "metadata": {"name": "n1", "labels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
                                              "topology.kubernetes.io/region": "eu"}},
        "status": {"allocatable": {"nvidia.com/gpu": "6"}, "capacity": {"nvidia.com/gpu": "8"}},
    }
    b.update(kw)
    return b


def test_node_from_body_reads_product_site_and_allocatable() -> None:
    n = node_from_body(node_body())
    assert n is not None and (n.name, n.site, n.product, n.gpus) == ("n1", "eu", "H100", 6)


def test_node_capacity_fallback_default_site_and_exclusions() -> None:
    b = node_body(status={"capacity": {"nvidia.com/gpu": 8}})
    del b["metadata"]["labels"]["topology.kubernetes.io/region"]
    n = node_from_body(b)
    assert n is not None and n.gpus == 8 and n.site == "default"
    assert node_from_body(node_body(spec={"unschedulable": True})) is None
    assert node_from_body({"metadata": {"name": "cpu", "labels": {}}}) is None
    assert node_from_body(node_body(status={})) is None
    unknown = node_from_body(node_body(metadata={"name": "x", "labels": {
        "nvidia.com/gpu.product": "Tesla-T4"}}))
    assert unknown is not None and unknown.product == "Tesla-T4"


@pytest.mark.parametrize("bad", ["1e999", "1E999", "-1e999", "1e999999", "x", "1e30Ei"])
@pytest.mark.parametrize("where", ["allocatable", "capacity"])
def test_unreadable_gpu_quantity_leaves_the_node_out_with_a_reason(bad: str, where: str
                                                                     ) -> None:
    """'1e999' once overflowed (int(float('1e999')): OverflowError out of the watch
    handler); now the node is left out and the reason names the field and the value."""
    b = node_body(status={where: {"nvidia.com/gpu": bad}})
    assert node_from_body(b) is None
    node, error = read_node(b)
    assert node is None and error is not None
    assert f"status.{where}['nvidia.com/gpu']" in error and bad[:10] in error
    # an allocatable of 0 is none (as kube-scheduler reads it), not "look at capacity"
    assert node_from_body(node_body(status={"allocatable": {"nvidia.com/gpu": "0"},
                                            "capacity": {"nvidia.com/gpu": "8"}})) is None
    assert read_node(node_body()) == (node_from_body(node_body()), None)


@pytest.mark.parametrize(("spec", "conditions", "kept"), [
    ({}, [{"type": "Ready", "status": "True"}], True),
    ({}, [{"type": "MemoryPressure", "status": "False"}], True),  # no Ready condition yet
    ({}, [{"type": "Ready", "status": "False"}], False),
    ({}, [{"type": "Ready", "status": "Unknown"}], False),
    ({"taints": [{"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}]}, [], False),
    ({"taints": [{"key": "node.kubernetes.io/unreachable", "effect": "NoSchedule"}]}, [], False),
    ({"taints": [{"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}]}, [], False),
    ({"taints": [{"key": "node.kubernetes.io/not-ready", "effect": "PreferNoSchedule"}]}, [],
     True),
    ({"taints": [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}]}, [], True),  # tolerated
    ({"unschedulable": True}, [{"type": "Ready", "status": "True"}], False),
])
def test_dead_or_not_ready_nodes_have_no_gpus(
    spec: dict[str, Any], conditions: list[dict[str, Any]], kept: bool,
) -> None:
    b = node_body(spec=spec)
    b["status"]["conditions"] = conditions
    assert (node_from_body(b) is not None) == kept


# ---------------------------------------------------------------- deployments
def _planned_pool(modes: list[tuple[str, int, int]]) -> PlannedPool:
    return PlannedPool(
        namespace="default", name="chat", model="llama-3.1-8b", tier="interactive",
        slo=PlannedSLO(ttftSeconds=1, tpotSeconds=0.1), replicas=sum(m[1] for m in modes),
        assignments=[PlannedInstance(node=f"n{i}", site="s", product=m.split("x")[1], mode=m,
                                     instances=k, gpus=k * g, gpusPerInstance=g)
                     for i, (m, k, g) in enumerate(modes)])


def test_mode_slug_and_deployment_name() -> None:
    assert mode_slug("2xH100") == "2xh100"
    assert mode_slug("1x RTX_6000") == "1x-rtx-6000"
    assert deployment_name("chat", "4xA100", "gpu-1") == "chat-4xa100-gpu-1"
    long = deployment_name("p" * 70, "4xA100", "n")
    assert len(long) <= 63 and long != deployment_name("p" * 71, "4xA100", "n")
    # long node names: distinct nodes give distinct names within the label-value limit
    a = deployment_name("chat", "1xL4", "ip-10-0-0-1.eu-west-1.compute.internal.example")
    b = deployment_name("chat", "1xL4", "ip-10-0-0-2.eu-west-1.compute.internal.example")
    assert a != b and len(a) <= 63 and len(b) <= 63


def test_build_deployment_wires_scheduler_labels_gpus_and_owner() -> None:
    e = parse_pool(pool_body())
    assert e.pool is not None
    before = copy.deepcopy(e.pool.spec.template)
    d = build_deployment(e, e.pool, "2xH100", 3, 2, "joulepool-scheduler", "h1")
    assert e.pool.spec.template == before  # the pool's template is not mutated
    sel = {"joulepool.dev/pool": "default.chat", "joulepool.dev/mode": "2xH100",
           "joulepool.dev/placement": "chat-2xh100-h1"}
    assert d["metadata"]["name"] == "chat-2xh100-h1" and d["metadata"]["namespace"] == "default"
    assert d["spec"]["replicas"] == 3 and d["spec"]["selector"]["matchLabels"] == sel
    tpl = d["spec"]["template"]
    assert tpl["metadata"]["labels"] == {"app": "chat", **sel}
    assert tpl["spec"]["schedulerName"] == "joulepool-scheduler"
    c = tpl["spec"]["containers"][0]
    gpu = {"nvidia.com/gpu": "2"}
    assert c["resources"] == {"limits": gpu, "requests": gpu}
    assert {"name": "JOULEPOOL_MODE", "value": "2xH100"} in c["env"]
    (owner,) = d["metadata"]["ownerReferences"]
    assert owner == {"apiVersion": "joulepool.dev/v1alpha1", "kind": "InferencePool",
                     "name": "chat", "uid": "u1", "controller": True, "blockOwnerDeletion": True}
    assert d["metadata"]["annotations"]["joulepool.dev/spec-hash"] == spec_hash(d)
    info = deployment_from_body({**d, "status": {"readyReplicas": 2}})
    assert info == DeploymentInfo("default", "chat-2xh100-h1", "default.chat", "2xH100", 3, 2,
                                  spec_hash(d))


def test_gpus_go_to_the_container_that_asks_for_them() -> None:
    b = pool_body(template={"spec": {"containers": [
        {"name": "proxy", "image": "p"},
        {"name": "engine", "image": "e", "resources": {"limits": {"nvidia.com/gpu": 1}},
         "env": [{"name": "JOULEPOOL_GPUS", "value": "mine"}]}]}})
    e = parse_pool(b)
    d = build_deployment(e, e.pool, "4xA100", 1, 4, "s", "a1")  # type: ignore[arg-type]
    proxy, engine = d["spec"]["template"]["spec"]["containers"]
    assert "resources" not in proxy
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert {"name": "JOULEPOOL_GPUS", "value": "mine"} in engine["env"]  # user's value kept


def test_one_deployment_per_mode_and_node_with_that_modes_gpus() -> None:
    e = parse_pool(pool_body(model="llama-3.1-70b"))
    planned = _planned_pool([("4xH100", 1, 4), ("2xA100", 2, 2), ("2xA100", 1, 2)])
    out = desired_deployments(e, e.pool, planned, "s")  # type: ignore[arg-type]
    assert set(out) == {("default", "chat-4xh100-n0"), ("default", "chat-2xa100-n1"),
                        ("default", "chat-2xa100-n2")}
    a100 = out[("default", "chat-2xa100-n1")]
    assert a100["spec"]["replicas"] == 2 and out[("default", "chat-2xa100-n2")]["spec"][
        "replicas"] == 1
    gpu = a100["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "2"
    # each Deployment's pods may only land on its one node: the per-node shares hold by
    # construction, and the affinity has the one value kube-apiserver accepts
    assert _required_names(a100) == [["n1"]]
    assert _required_names(out[("default", "chat-2xa100-n2")]) == [["n2"]]
    assert _required_names(out[("default", "chat-4xh100-n0")]) == [["n0"]]
    # the selectors do not overlap: no Deployment can adopt another's pods
    selectors = [tuple(sorted(d["spec"]["selector"]["matchLabels"].items()))
                 for d in out.values()]
    assert len(set(selectors)) == len(selectors)


def _required_names(d: dict[str, Any]) -> list[list[str]]:
    aff = d["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
    terms = aff["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    out = []
    for t in terms:
        (expr,) = [f for f in t["matchFields"] if f["key"] == "metadata.name"]
        assert expr["operator"] == "In"
        out.append(expr["values"])
    return out


def test_node_affinity_is_anded_with_the_templates_own_terms() -> None:
    zone = {"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a"]}
    own = {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [zone]}, {"matchExpressions": [dict(zone, values=["b"])]}]},
        "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1, "preference": {}}]}}
    b = pool_body(template={"spec": {"affinity": own,
                                     "containers": [{"name": "e", "image": "i"}]}})
    e = parse_pool(b)
    assert e.pool is not None
    before = copy.deepcopy(e.pool.spec.template)
    d = build_deployment(e, e.pool, "2xH100", 2, 2, "s", "h1")
    assert e.pool.spec.template == before
    assert _required_names(d) == [["h1"], ["h1"]]  # added to every term
    aff = d["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
    terms = aff["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert [t["matchExpressions"][0]["values"] for t in terms] == [["a"], ["b"]]
    assert aff["preferredDuringSchedulingIgnoredDuringExecution"] == [
        {"weight": 1, "preference": {}}]
    # the node is part of the spec hash
    moved = build_deployment(e, e.pool, "2xH100", 2, 2, "s", "h3")
    assert spec_hash(moved) != spec_hash(d)


def test_scale_down_patch_keeps_the_deployment_and_marks_its_hash() -> None:
    p = scale_down_patch()
    assert p["spec"] == {"replicas": 0}
    assert p["metadata"]["annotations"]["joulepool.dev/spec-hash"] == SCALED_DOWN


# ---------------------------------------------------------------- plan document
def _doc() -> PlanDocument:
    return PlanDocument(
        version=4, generated_at=datetime(2026, 1, 1, tzinfo=UTC),
        pools={"default.a": _planned_pool([("1xH100", 1, 1)]),
               "default.b": _planned_pool([("1xH100", 2, 1)])},
        nodes={"n0": PlannedNode(site="s", product="H100", gpus=8,
                                 pools={"default.a": 1, "default.b": 2})})


def test_plan_without_releases_the_pools_gpus() -> None:
    doc = _doc()
    out = plan_without(doc, ["default.b"])
    assert set(out.pools) == {"default.b"} and out.nodes["n0"].pools == {"default.b": 2}
    assert set(doc.pools) == {"default.a", "default.b"}  # original untouched


def test_plan_content_ignores_version_and_time() -> None:
    a = _doc()
    b = a.model_copy(update={"version": 9, "generated_at": datetime(2027, 1, 1, tzinfo=UTC)})
    assert plan_content(a) == plan_content(b)
    assert plan_content(a) != plan_content(plan_without(a, ["default.a"]))


def test_plan_configmap_is_versioned() -> None:
    cm = plan_configmap(_doc(), "joulepool-plan", "ops", False, "no room")
    assert cm["metadata"]["labels"]["joulepool.dev/plan-version"] == "4"
    ann = cm["metadata"]["annotations"]
    assert ann["joulepool.dev/plan-version"] == "4"
    assert ann["joulepool.dev/latest-plan-feasible"] == "false"
    assert ann["joulepool.dev/latest-plan-message"] == "no room"
    assert PlanDocument.from_json(cm["data"]["plan.json"]).version == 4
    assert version_of(cm) == 4 and version_of(None) == 0
    del cm["metadata"]["annotations"]
    assert version_of(cm) == 4


# ---------------------------------------------------------------- conditions
def _outcome(key: str, planned: bool = True, replicas: int = 2) -> PoolOutcome:
    a = AssignmentStatus(site="s", node="n0", gpuProduct="H100", mode="1xH100",
                         gpus=replicas, instances=replicas)
    return PoolOutcome(key=key, replicas=replicas, assignments=(a,) if replicas else (),
                       expected_power_w=100.0 * replicas, joules_per_token=0.2,
                       grams_co2_per_hour=None, planned=planned,
                       message="2 instance(s) planned" if planned else "unmet demand 3 req/s")


def _view(in_force: dict[str, PoolOutcome], latest: dict[str, PoolOutcome],
          in_force_feasible: bool = True, latest_feasible: bool = True) -> PlanView:
    doc = PlanDocument(version=5, pools={k: _planned_pool([("1xH100", o.replicas, 1)])
                                         for k, o in in_force.items()})
    return PlanView(in_force=doc, in_force_outcomes=in_force,
                    in_force_feasible=in_force_feasible, latest_feasible=latest_feasible,
                    latest_outcomes=latest, latest_binding="H100 capacity at us-east",
                    latest_pools=frozenset(latest))


def _by_type(conds: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in conds}


def test_conditions_planned_and_ready() -> None:
    e = parse_pool(pool_body())
    v = _view({e.key: _outcome(e.key)}, {e.key: _outcome(e.key)})
    c = _by_type(pool_conditions(e, v, ready_replicas=1, deployable=True))
    assert c == {"Invalid": ("False", "Valid"), "Planned": ("True", "Planned"),
                 "Infeasible": ("False", "Feasible"), "Ready": ("False", "ReplicasNotReady")}
    c = _by_type(pool_conditions(e, v, ready_replicas=2, deployable=True))
    assert c["Ready"] == ("True", "ReplicasReady")
    c = _by_type(pool_conditions(e, v, ready_replicas=0, deployable=False))
    assert c["Ready"] == ("False", "NoTemplate")


def test_conditions_when_the_newest_plan_is_infeasible() -> None:
    e = parse_pool(pool_body())
    other = "default.other"
    # kept: this pool is short in the newest attempt, the last feasible plan serves it
    v = _view({e.key: _outcome(e.key)}, {e.key: _outcome(e.key, planned=False)},
              latest_feasible=False)
    conds = pool_conditions(e, v, 0, True)
    c = _by_type(conds)
    assert c["Planned"] == ("True", "LastFeasiblePlan")
    assert c["Infeasible"] == ("True", "UnmetDemand")
    assert "unmet demand" in next(x for x in conds if x["type"] == "Infeasible")["message"]
    # kept, this pool's demand is fine but another's is not
    v = _view({e.key: _outcome(e.key)}, {e.key: _outcome(e.key), other: _outcome(other, False)},
              latest_feasible=False)
    c = _by_type(pool_conditions(e, v, 0, True))
    assert c["Planned"] == ("True", "LastFeasiblePlan") and c["Infeasible"] == ("False", "Feasible")
    # a new pool that the last feasible plan does not know
    v = _view({}, {e.key: _outcome(e.key, planned=False)}, latest_feasible=False)
    c = _by_type(pool_conditions(e, v, 0, True))
    assert c["Planned"] == ("False", "NoFeasiblePlan") and c["Ready"][1] == "NoReplicasPlanned"
    # never a feasible plan: the partial plan serves
    v = _view({e.key: _outcome(e.key, planned=False)}, {e.key: _outcome(e.key, planned=False)},
              in_force_feasible=False, latest_feasible=False)
    c = _by_type(pool_conditions(e, v, 0, True))
    assert c["Planned"] == ("False", "PartiallyPlanned") and c["Infeasible"][0] == "True"


def test_conditions_of_an_invalid_pool() -> None:
    e = parse_pool(pool_body(slo={"ttftSeconds": 0, "tpotSeconds": 0.1}))
    v = _view({}, {})
    conds = pool_conditions(e, v, 0, False)
    c = _by_type(conds)
    assert c["Invalid"] == ("True", "InvalidSpec") and c["Planned"] == ("False", "InvalidSpec")
    assert "spec.slo.ttftSeconds" in conds[0]["message"]
    # served from its last valid spec
    v = _view({e.key: _outcome(e.key)}, {e.key: _outcome(e.key)})
    conds = pool_conditions(e, v, 0, True)
    assert _by_type(conds)["Planned"] == ("True", "Planned")
    assert "last valid spec" in next(x for x in conds if x["type"] == "Planned")["message"]


def test_status_fields_and_times() -> None:
    e = parse_pool(pool_body())
    v = _view({e.key: _outcome(e.key)}, {e.key: _outcome(e.key)})
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    s1 = with_times(pool_status(e, v, 0, True), {}, t0)
    assert s1["observedGeneration"] == 3 and s1["replicas"] == 2
    assert s1["assignments"][0]["gpuProduct"] == "H100" and s1["expectedPowerWatts"] == 200.0
    assert s1["gramsCO2PerHour"] is None  # JSON null: removed by the merge patch
    assert s1["lastPlanTime"] == "2026-01-01T00:00:00Z"
    # nothing changes: times are kept
    t1 = t0 + timedelta(minutes=5)
    s2 = with_times(pool_status(e, v, 0, True), s1, t1)
    assert s2 == s1 and same_status(s1, s2)
    # a periodic re-plan stamps lastPlanTime, conditions keep their transition times
    s3 = with_times(pool_status(e, v, 0, True), s1, t1, force=True)
    assert s3["lastPlanTime"] == "2026-01-01T00:05:00Z"
    assert all(c["lastTransitionTime"] == "2026-01-01T00:00:00Z" for c in s3["conditions"])
    # Ready flips: only its transition time moves
    s4 = with_times(pool_status(e, v, 2, True), s1, t1)
    times = {c["type"]: c["lastTransitionTime"] for c in s4["conditions"]}
    assert times["Ready"] == "2026-01-01T00:05:00Z" and times["Planned"] == "2026-01-01T00:00:00Z"
    assert not same_status(s4, s1)


# ---------------------------------------------------------------- RBAC
def test_rbac_rules_are_exact_and_least_privilege() -> None:
    for rule in rbac.CLUSTER_RULES + rbac.NAMESPACE_RULES:
        assert set(rule) == {"apiGroups", "resources", "verbs"}
        for k in ("apiGroups", "resources", "verbs"):
            assert rule[k] and "*" not in rule[k]
        assert not {"update", "deletecollection", "escalate", "bind"} & set(rule["verbs"])
    resources = {r for rule in rbac.CLUSTER_RULES for r in rule["resources"]}
    assert not resources & {"secrets", "kopfpeerings", "clusterkopfpeerings", "leases",
                            "customresourcedefinitions", "namespaces", "pods"}
    by = {res: rule["verbs"] for rule in rbac.CLUSTER_RULES for res in rule["resources"]}
    assert by["inferencepools/status"] == ["patch"]
    assert by["nodes"] == ["list", "watch"] and by["events"] == ["create"]
    assert by["gpuprofiles"] == by["energypolicies"] == ["list", "watch"]
    assert by["energypolicies/status"] == ["patch"]  # live carbon source status
    assert rbac.NAMESPACE_RULES == [
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create", "patch"]},
        # carbon source credentials: read only, and only in the operator's namespace
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]


def test_rbac_manifest_renders_the_same_rules() -> None:
    docs = list(yaml.safe_load_all(rbac.rbac_manifest("ops", "sa", "jp")))
    assert [d["kind"] for d in docs] == ["ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"]
    assert docs[0]["rules"] == rbac.CLUSTER_RULES and docs[2]["rules"] == rbac.NAMESPACE_RULES
    assert docs[2]["metadata"]["namespace"] == "ops"
    assert docs[1]["subjects"] == [{"kind": "ServiceAccount", "name": "sa", "namespace": "ops"}]


# ---------------------------------------------------------------- CLI
def _parse(argv: list[str]) -> argparse.Namespace:
    from joulepool.operator import cli

    p = argparse.ArgumentParser()
    cli.configure(p)
    return p.parse_args(argv)


def test_cli_flags_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from joulepool.operator.cli import config_from_args
    from joulepool.operator.config import OperatorConfig

    monkeypatch.setenv("POD_NAMESPACE", "jp-system")
    monkeypatch.setenv("WATCH_NAMESPACE", "a, b")
    cfg = config_from_args(_parse([]))
    assert isinstance(cfg, OperatorConfig)
    assert cfg.namespace == "jp-system" and cfg.watch_namespaces == ("a", "b")
    assert cfg.scheduler_name == "joulepool-scheduler" and cfg.debounce_seconds == 1.0
    assert cfg.liveness_port == 8080
    cfg = config_from_args(_parse(["--namespace", "x", "--watch-namespace", "c",
                                   "--watch-namespace", "d,c", "--scheduler-name", "s",
                                   "--debounce-seconds", "0.5", "--liveness", "0"]))
    assert isinstance(cfg, OperatorConfig)
    assert (cfg.namespace, cfg.watch_namespaces, cfg.scheduler_name, cfg.debounce_seconds,
            cfg.liveness_port) == ("x", ("c", "d"), "s", 0.5, None)


def test_cli_rejects_bad_values() -> None:
    from joulepool.cli import UsageError
    from joulepool.operator.cli import config_from_args

    with pytest.raises(UsageError):
        config_from_args(_parse(["--debounce-seconds", "-1"]))
    with pytest.raises(UsageError):
        config_from_args(_parse(["--liveness", "70000"]))


def test_cli_rbac_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    from joulepool.cli import main

    assert main(["operator", "--namespace", "ops", "rbac"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert docs[0]["rules"] == rbac.CLUSTER_RULES
    assert docs[2]["metadata"]["namespace"] == "ops"


def test_pool_port_reaches_the_router_through_the_pod_annotation() -> None:
    """spec.port is consumed: the operator annotates the pods, the router reads the port."""
    from joulepool.extender.wire import Pod

    def served_port(**spec: Any) -> int:
        body = pool_body(**spec)
        body["spec"]["template"]["spec"]["containers"][0]["ports"] = [
            {"name": "http", "containerPort": 8000}]
        e = parse_pool(body)
        assert e.pool is not None
        tpl = build_deployment(e, e.pool, "1xH100", 1, 1, "s", "n1")["spec"]["template"]
        pod = Pod.model_validate({**tpl, "metadata": {"name": "p", **tpl["metadata"]}})
        return pod.serving_port(1)

    assert served_port(port=9000) == 9000
    assert served_port() == 8000  # unset: the container port named http


def test_served_model_names_reach_the_engine_args_and_the_plan() -> None:
    """spec.servedModelNames is consumed: the GPU container gets vLLM's
    ``--served-model-name`` with every name (SGLang's one name), unless the template
    names the flag itself; the plan carries the names to the router."""
    import json

    from joulepool.api.models import EnergyPolicySpec
    from joulepool.core.planner import PlanNode
    from joulepool.pooling import plan_pools

    def args(template_labels: dict[str, str] | None = None, **container: Any) -> list[str]:
        body = pool_body(servedModelNames=["meta-llama/Llama-3.1-8B-Instruct", "chat"])
        c = body["spec"]["template"]["spec"]["containers"][0]
        c.update(container)
        if template_labels:
            body["spec"]["template"]["metadata"]["labels"].update(template_labels)
        e = parse_pool(body)
        assert e.pool is not None
        d = build_deployment(e, e.pool, "1xH100", 1, 1, "s", "n1")
        return list(d["spec"]["template"]["spec"]["containers"][0].get("args", []))

    assert args() == ["--served-model-name", "meta-llama/Llama-3.1-8B-Instruct", "chat"]
    assert args(args=["--model", "m"]) == [
        "--model", "m", "--served-model-name", "meta-llama/Llama-3.1-8B-Instruct", "chat"]
    assert args({"joulepool.dev/engine": "sglang"}) == [
        "--served-model-name", "meta-llama/Llama-3.1-8B-Instruct"]
    assert args(args=["--served-model-name=own"]) == ["--served-model-name=own"]
    assert args(command=["vllm", "serve", "--served-model-name", "x"]) == []
    e = parse_pool(pool_body())  # no names: the template is left alone
    assert e.pool is not None
    d = build_deployment(e, e.pool, "1xH100", 1, 1, "s", "n1")
    assert "args" not in d["spec"]["template"]["spec"]["containers"][0]
    named = parse_pool(pool_body(servedModelNames=["chat", "org/m"])).pool
    assert named is not None
    doc = plan_pools([named, e.pool.model_copy(update={"metadata": e.pool.metadata.model_copy(
        update={"name": "plain"})})], [PlanNode("h1", "east", "H100", 8)],
        EnergyPolicySpec()).document
    assert doc.pools["default.chat"].served_model_names == ["chat", "org/m"]
    assert doc.pools["default.plain"].served_model_names == []
    assert json.loads(doc.to_json())["pools"]["default.chat"]["servedModelNames"] == [
        "chat", "org/m"]


def test_served_model_names_are_distinct_and_bounded() -> None:
    for bad in (["a", "a"], [""], ["x" * 257], [f"m{i}" for i in range(17)]):
        e = parse_pool(pool_body(servedModelNames=bad))
        assert not e.valid and e.error is not None
        assert "servedModelNames" in str(e.error) or "spec" in str(e.error)
