"""The real operator (kopf + planning loop) against kmock's API server over HTTP.

Every test starts an emulated API server, runs ``kopf.operator`` with
joulepool's registry in the same event loop, and drives it like a user would:
HTTP requests to the API server, then waits for the operator's writes.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import kmock
from operator_fixtures import (
    OP_NAMESPACE,
    Cluster,
    cluster_and_operator,
    condition,
    emulator,
    eventually,
    node,
    operator_running,
    pool,
)

from joulepool.api.contract import GIE_API_VERSION, POOL_LABEL
from joulepool.operator.config import PickerRef

H100 = "NVIDIA-H100-80GB-HBM3"
A100 = "NVIDIA-A100-SXM4-80GB"
GIE_RESOURCE = f"{GIE_API_VERSION}/inferencepools"
PICKER = PickerRef("joulepool-epp", OP_NAMESPACE, 9002, "FailOpen")


async def _cond(c: Cluster, name: str, type_: str, status: str = "True",
                reason: str | None = None, namespace: str = "default") -> dict[str, Any] | None:
    obj = await c.pool(name, namespace)
    cond = condition(obj, type_)
    if cond and cond["status"] == status and (reason is None or cond["reason"] == reason):
        return obj
    return None


async def _until(c: Cluster, name: str, type_: str, status: str = "True",
                 reason: str | None = None, namespace: str = "default") -> dict[str, Any]:
    return await eventually(  # type: ignore[no-any-return]
        lambda: _cond(c, name, type_, status, reason, namespace),
        what=f"{namespace}/{name} {type_}={status} {reason or ''}")


async def test_create_pool_plans_publishes_and_deploys() -> None:
    async with cluster_and_operator() as (c, _op):
        await c.create(node("gpu-a", H100, 8, "us-east"))
        await c.create(pool("chat", rps=20))
        obj = await _until(c, "chat", "Planned")
        st = obj["status"]
        assert st["observedGeneration"] == obj["metadata"]["generation"]
        assert st["replicas"] == 2  # 20 req/s * 1.1 headroom over 14.2 req/s per 1xH100
        assert st["assignments"] == [{"site": "us-east", "node": "gpu-a", "gpuProduct": "H100",
                                      "mode": "1xH100", "gpus": 2, "instances": 2}]
        assert st["expectedPowerWatts"] > 0 and st["joulesPerToken"] > 0
        assert st["lastPlanTime"].endswith("Z")
        assert condition(obj, "Infeasible")["status"] == "False"  # type: ignore[index]
        assert condition(obj, "Invalid")["status"] == "False"  # type: ignore[index]
        assert condition(obj, "Ready")["reason"] == "ReplicasNotReady"  # type: ignore[index]
        assert obj["metadata"]["finalizers"] == ["joulepool.dev/finalizer"]

        cm, doc = await eventually(lambda: _plan_with(c, "default.chat"))
        assert doc.version >= 1 and doc.feasible
        assert cm["metadata"]["labels"]["joulepool.dev/plan-version"] == str(doc.version)
        assert cm["metadata"]["annotations"]["joulepool.dev/plan-version"] == str(doc.version)
        assert doc.nodes["gpu-a"].pools == {"default.chat": 2}

        deps = await eventually(c.deployments)
        dep = deps["chat-1xh100-gpu-a"]
        assert dep["spec"]["replicas"] == 2
        labels = {POOL_LABEL: "default.chat", "joulepool.dev/mode": "1xH100",
                  "joulepool.dev/placement": "chat-1xh100-gpu-a"}
        assert dep["spec"]["selector"]["matchLabels"] == labels
        tpl = dep["spec"]["template"]
        assert tpl["metadata"]["labels"] == {"app": "chat", **labels}
        assert tpl["spec"]["schedulerName"] == "joulepool-scheduler"
        res = tpl["spec"]["containers"][0]["resources"]
        assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "1"
        owner = dep["metadata"]["ownerReferences"][0]
        assert owner["kind"] == "InferencePool" and owner["name"] == "chat"
        assert owner["uid"] == obj["metadata"]["uid"] and owner["controller"] is True

        # the Deployment becomes ready (as kube-controller-manager would report): Ready=True
        await c.patch(
            "/apis/apps/v1/namespaces/default/deployments/chat-1xh100-gpu-a",
            {"status": {"replicas": 2, "readyReplicas": 2}})
        ready = await _until(c, "chat", "Ready", "True")
        assert condition(ready, "Ready")["message"] == "2/2 replicas ready"  # type: ignore[index]


async def _plan_with(c: Cluster, key: str, absent: bool = False) -> Any:
    cm, doc = await c.plan()
    if doc is None:
        return None
    return (cm, doc) if (key in doc.pools) != absent else None


async def test_demand_change_replans_with_new_replicas() -> None:
    async with cluster_and_operator() as (c, _op):
        await c.create(node("gpu-a", H100, 8))
        p = await c.create(pool("chat", rps=4))
        await _until(c, "chat", "Planned")
        _, doc1 = await c.plan()
        assert (await c.deployments())["chat-1xh100-gpu-a"]["spec"]["replicas"] == 1

        await c.patch(p, {"spec": {"demand": {"requestsPerSecond": 40}}})

        async def replanned() -> Any:
            obj = await c.pool("chat")
            return obj if obj and obj["status"].get("replicas") == 4 else None

        obj = await eventually(replanned, what="4 replicas")
        assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"] == 2
        deps = await eventually(
            lambda: _replicas(c, "chat-1xh100-gpu-a", 4), what="Deployment scaled to 4")
        assert deps
        _, doc2 = await c.plan()
        assert doc2.version > doc1.version
        assert doc2.pools["default.chat"].replicas == 4


def _per_node(obj: Any) -> dict[str, int]:
    return {a["node"]: a["instances"] for a in obj["status"]["assignments"]}


async def _replicas(c: Cluster, name: str, n: int) -> bool:
    dep = (await c.deployments()).get(name)
    return bool(dep and dep["spec"]["replicas"] == n)


async def test_gpu_node_added_and_removed_replans() -> None:
    async with cluster_and_operator() as (c, _op):
        await c.create(node("gpu-a", H100, 8))
        # 150 req/s * 1.1 needs 13 H100 instances (13.4 req/s each in a pool of 13): one
        # 8-GPU node is not enough
        await c.create(pool("big", rps=150))
        obj = await _until(c, "big", "Infeasible", "True")
        assert "unmet demand" in condition(obj, "Infeasible")["message"]  # type: ignore[index]
        # no feasible plan yet: the best partial plan serves (all 8 GPUs)
        assert condition(obj, "Planned")["reason"] == "PartiallyPlanned"  # type: ignore[index]
        assert obj["status"]["replicas"] == 8

        await c.create(node("gpu-b", H100, 8))
        obj = await _until(c, "big", "Planned", "True", "Planned")
        assert condition(obj, "Infeasible")["status"] == "False"  # type: ignore[index]
        assert obj["status"]["replicas"] == 13
        assert {a["node"] for a in obj["status"]["assignments"]} == {"gpu-a", "gpu-b"}
        _, doc = await c.plan()
        assert doc.feasible and sum(doc.nodes[n].pools["default.big"] for n in doc.nodes) == 13

        # demand beyond the cluster makes the new plan infeasible: the last feasible plan
        # keeps serving while every node it uses is still there
        big = await c.pool("big")
        await c.patch(big, {"spec": {"demand": {"requestsPerSecond": 400}}})  # type: ignore[arg-type]
        obj = await _until(c, "big", "Planned", "True", "LastFeasiblePlan")
        assert condition(obj, "Infeasible")["status"] == "True"  # type: ignore[index]
        assert obj["status"]["replicas"] == 13
        cm, kept = await c.plan()
        assert kept.feasible and kept.version == doc.version  # nothing republished
        assert cm["metadata"]["annotations"]["joulepool.dev/latest-plan-feasible"] == "false"
        deps = await c.deployments()
        assert {n: d["spec"]["replicas"] for n, d in deps.items()} == {
            f"big-1xh100-{n}": k for n, k in _per_node(obj).items()}
        assert sum(_per_node(obj).values()) == 13
        await c.patch(big, {"spec": {"demand": {"requestsPerSecond": 150}}})  # type: ignore[arg-type]
        await _until(c, "big", "Planned", "True", "Planned")

        # a node of the plan dies (unreachable taint): the kept plan is dropped, the best
        # partial plan serves on what is left; the Deployment is scaled, never deleted
        await c.patch("/api/v1/nodes/gpu-b", {"spec": {"taints": [
            {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}]}})
        obj = await _until(c, "big", "Planned", "False", "PartiallyPlanned")
        assert obj["status"]["replicas"] == 8
        assert {a["node"] for a in obj["status"]["assignments"]} == {"gpu-a"}
        _, partial = await c.plan()
        assert not partial.feasible and partial.version > doc.version
        assert partial.pools["default.big"].nodes() == {"gpu-a"}
        await eventually(lambda: _replicas(c, "big-1xh100-gpu-a", 8), what="scaled to the plan")
        # gpu-b's Deployment is scaled to 0, not deleted, while the plan is infeasible
        await eventually(lambda: _replicas(c, "big-1xh100-gpu-b", 0), what="gpu-b's to 0")
        await c.delete("/api/v1/nodes/gpu-b")

        # a bigger node arrives: feasible again, the plan moves
        await c.create(node("gpu-c", H100, 8))
        obj = await _until(c, "big", "Planned", "True", "Planned")
        assert {a["node"] for a in obj["status"]["assignments"]} <= {"gpu-a", "gpu-c"}


async def test_mixed_modes_get_one_deployment_each() -> None:
    """Each planned mode gets its own Deployment with the mode's instances.

    Every step waits on the whole condition (the pool's status and its Deployments
    agreeing), with a generous deadline: under load a Deployment may still carry an
    earlier pass's replicas when the status already shows the next plan, or the reverse."""
    async with cluster_and_operator() as (c, _op):
        await c.create(node("h100-0", H100, 2))
        await c.create(node("a100-0", A100, 8))
        # 40 req/s * 1.1 = 44: two H100 instances (2 x 13.75 req/s) and seven A100 ones
        # (7 x 2.43 req/s: core's sustainable rates, with queueing headroom)
        await c.create(pool("chat", rps=40))

        async def both_modes_deployed() -> Any:
            obj = await _cond(c, "chat", "Planned", "True", "Planned")
            if obj is None:
                return None
            modes = {a["mode"]: a["instances"] for a in obj["status"]["assignments"]}
            deps = await c.deployments()
            replicas = {n: d["spec"]["replicas"] for n, d in deps.items()}
            wanted = {"chat-1xh100-h100-0": modes.get("1xH100"),
                      "chat-1xa100-a100-0": modes.get("1xA100")}
            return (modes, deps) if replicas == wanted else None

        modes, deps = await eventually(both_modes_deployed,
                                       what="one Deployment per mode, as planned")
        assert set(modes) == {"1xH100", "1xA100"}
        assert deps["chat-1xh100-h100-0"]["spec"]["replicas"] == modes["1xH100"]
        assert deps["chat-1xa100-a100-0"]["spec"]["replicas"] == modes["1xA100"]
        # demand drops to 4.4 req/s: two A100 instances (2 x 326 W) beat one H100 (688 W),
        # so the H100 mode is no longer planned and its Deployment goes away
        await c.patch("/apis/joulepool.dev/v1alpha1/namespaces/default/inferencepools/chat",
                      {"spec": {"demand": {"requestsPerSecond": 4}}})

        async def one_left() -> Any:
            deps = await c.deployments()
            obj = await c.pool("chat")
            assignments = ((obj or {}).get("status") or {}).get("assignments") or []
            if len(deps) != 1 or len(assignments) != 1:
                return None
            (left,) = deps.values()
            (a,) = assignments
            if left["metadata"]["labels"]["joulepool.dev/mode"] != a["mode"] or \
                    left["spec"]["replicas"] != a["instances"]:
                return None
            return left, a

        left, a = await eventually(one_left, what="one Deployment left")
        assert left["metadata"]["labels"]["joulepool.dev/mode"] == a["mode"] == "1xA100"
        assert left["spec"]["replicas"] == a["instances"] == 2


async def _names(c: Cluster, names: set[str]) -> Any:
    deps = await c.deployments()
    return deps if set(deps) == names else None


async def test_delete_releases_gpus_and_cleans_up() -> None:
    async with cluster_and_operator() as (c, _op):
        await c.create(node("gpu-a", H100, 8))
        await c.create(pool("chat", rps=60))  # 5 instances (a pool of 5)
        await c.create(pool("rag", rps=60))  # 5 instances: only 8 GPUs, so one is short
        await _until(c, "rag", "Infeasible", "True")
        await _until(c, "chat", "Infeasible", "True")

        await c.delete("/apis/joulepool.dev/v1alpha1/namespaces/default/inferencepools/chat")
        # the finalizer holds the pool until a plan without it is published, then lets go
        await eventually(lambda: _gone(c, "chat"), what="pool chat deleted")
        _, doc = await eventually(lambda: _plan_with(c, "default.chat", absent=True))
        assert "default.rag" in doc.pools
        assert all("default.chat" not in n.pools for n in doc.nodes.values())
        deps = await eventually(lambda: _names(c, {"rag-1xh100-gpu-a"}),
                                what="chat Deployment gone")
        # the others were re-planned with the released GPUs: rag is now fully served
        obj = await _until(c, "rag", "Planned", "True", "Planned")
        assert obj["status"]["replicas"] == 5 and deps["rag-1xh100-gpu-a"]["spec"]["replicas"] == 5
        assert condition(obj, "Infeasible")["status"] == "False"  # type: ignore[index]


async def _gone(c: Cluster, name: str) -> bool:
    return await c.pool(name) is None


async def test_invalid_spec_is_reported_and_others_stay_planned() -> None:
    async with cluster_and_operator() as (c, _op):
        await c.create(node("gpu-a", H100, 8))
        await c.create(pool("good", rps=4))
        bad = pool("bad", rps=4)
        bad["spec"]["slo"]["ttftSeconds"] = -1  # the CRD schema would refuse it; kmock does not
        await c.create(bad)
        obj = await _until(c, "bad", "Invalid", "True")
        cond = condition(obj, "Invalid")
        assert cond["reason"] == "InvalidSpec"  # type: ignore[index]
        assert "spec.slo.ttftSeconds" in cond["message"]  # type: ignore[index]
        assert condition(obj, "Planned")["status"] == "False"  # type: ignore[index]
        good = await _until(c, "good", "Planned", "True")
        assert condition(good, "Invalid")["status"] == "False"  # type: ignore[index]

        async def warned() -> Any:
            return [e for e in await c.events() if e.get("reason") == "InvalidSpec"
                    and e["involvedObject"]["name"] == "bad"]

        events = await eventually(warned, what="an InvalidSpec event")
        assert events[0]["type"] == "Warning"
        assert "spec.slo.ttftSeconds" in events[0]["message"]
        assert set(await c.deployments()) == {"good-1xh100-gpu-a"}

        # a spec the schema cannot judge: a template container without an image
        await c.patch(good, {"spec": {"template": {"spec": {"containers": [{"name": "x"}]}}}})
        obj = await _until(c, "good", "Invalid", "True")
        assert "spec.template.spec.containers[0]" in condition(obj, "Invalid")["message"]  # type: ignore[index]
        # ...the pool keeps being served from its last valid spec
        assert condition(obj, "Planned")["status"] == "True"  # type: ignore[index]
        assert set(await c.deployments()) == {"good-1xh100-gpu-a"}

        # fixing the bad pool plans it
        await c.patch(bad, {"spec": {"slo": {"ttftSeconds": 1.0}}})
        await _until(c, "bad", "Planned", "True")
        await _until(c, "bad", "Invalid", "False")


async def test_watch_namespace_and_scheduler_name() -> None:
    async with cluster_and_operator(watch_namespaces=("team-a",),
                                    scheduler_name="custom-sched") as (c, _op):
        await c.create(node("gpu-a", H100, 8))
        await c.create(pool("mine", namespace="team-a", rps=4))
        await c.create(pool("theirs", namespace="team-b", rps=4))
        await _until(c, "mine", "Planned", namespace="team-a")
        dep = (await eventually(lambda: c.deployments("team-a")))["mine-1xh100-gpu-a"]
        assert dep["spec"]["template"]["spec"]["schedulerName"] == "custom-sched"
        theirs = await c.pool("theirs", "team-b")
        assert theirs is not None and not theirs.get("status")
        _, doc = await c.plan()
        assert set(doc.pools) == {"team-a.mine"}


T4_PROFILE = {
    "apiVersion": "joulepool.dev/v1alpha1", "kind": "GPUProfile", "metadata": {"name": "t4-8b"},
    "spec": {"product": "Tesla-T4", "model": "llama-3.1-8b", "gpus": 1, "idleWatts": 20,
             "batchPoints": [{"batch": 1, "interTokenLatencySeconds": 0.03, "powerWatts": 50},
                             {"batch": 8, "interTokenLatencySeconds": 0.05, "powerWatts": 70}],
             "maxBatch": 8, "prefillTokensPerSecond": 2000,
             "clock": {"minMHz": 300, "maxMHz": 1590}},
}


def _policy(name: str = "default", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "joulepool.dev/v1alpha1", "kind": "EnergyPolicy",
            "metadata": {"name": name}, "spec": spec}


async def test_gpu_profiles_and_the_energy_policy_drive_the_plan() -> None:
    async with cluster_and_operator() as (c, _op):
        await c.create(node("t4-0", "Tesla-T4", 4))
        # 250-token prompts prefill in 0.125 s on the T4 profile, well inside the 1 s TTFT
        await c.create(pool("chat", demand={"requestsPerSecond": 0.3, "meanInputTokens": 250,
                                            "meanOutputTokens": 200}))
        obj = await _until(c, "chat", "Infeasible", "True")
        assert "no eligible mode" in condition(obj, "Infeasible")["message"]  # type: ignore[index]

        # a GPUProfile for the unknown product makes it servable
        await c.create(T4_PROFILE)
        obj = await _until(c, "chat", "Planned", "True", "Planned")
        assert obj["status"]["assignments"][0]["mode"] == "1xTesla-T4"
        assert obj["status"]["replicas"] == 1
        await eventually(lambda: _names(c, {"chat-1xtesla-t4-t4-0"}))

        # the EnergyPolicy's alpha: 0.3 req/s * 4 over 0.34 req/s per instance (core's
        # sustainable rate: 8 batch slots, rarely all full, 1 % of arrivals waiting past
        # the TTFT for one; step time linear in batch between the profile's points) = 4
        # instances
        await c.create(_policy(alpha=4))
        await eventually(lambda: _replicas_of(c, "chat", 4), what="4 replicas")

        # an invalid policy is reported and the last valid one stays in force
        await c.patch("/apis/joulepool.dev/v1alpha1/energypolicies/default",
                      {"spec": {"alpha": 0.5}})
        await c.create(_policy("other"))

        async def warned() -> Any:
            reasons = {(e["involvedObject"]["name"], e["reason"]) for e in await c.events()}
            return {("default", "InvalidSpec"), ("other", "Ignored")} <= reasons

        await eventually(warned, what="events about both policies")
        # Events about cluster-scoped objects: in namespace default, involvedObject without
        # a namespace (what kube-apiserver accepts and kubectl describe finds)
        for e in await c.events():
            if e["involvedObject"]["kind"] == "EnergyPolicy":
                assert e["metadata"]["namespace"] == "default", e
                assert "namespace" not in e["involvedObject"], e
        assert (await c.pool("chat"))["status"]["replicas"] == 4  # type: ignore[index]

        # without the profile the new plan is infeasible: the last feasible one keeps serving
        await c.delete("/apis/joulepool.dev/v1alpha1/gpuprofiles/t4-8b")
        obj = await _until(c, "chat", "Planned", "True", "LastFeasiblePlan")
        assert obj["status"]["replicas"] == 4


async def _replicas_of(c: Cluster, name: str, n: int) -> bool:
    obj = await c.pool(name)
    return bool(obj and (obj.get("status") or {}).get("replicas") == n)


async def test_unreadable_gpu_quantity_is_an_event_and_others_stay_planned() -> None:
    """A Node whose GPU quantity is not one ('1e999' overflowed the operator's old parser
    inside the watch handler) is left out of the plan with a Warning Event about it; the
    pool is planned on the readable node."""
    async with cluster_and_operator() as (c, _op):
        bad = node("gpu-bad", H100, 8)
        bad["status"]["allocatable"]["nvidia.com/gpu"] = "1e999"
        await c.create(bad)
        await c.create(node("gpu-a", H100, 8))
        await c.create(pool("chat", rps=4))
        obj = await _until(c, "chat", "Planned", "True", "Planned")
        assert {a["node"] for a in obj["status"]["assignments"]} == {"gpu-a"}

        async def warned() -> Any:
            return [e for e in await c.events() if e.get("reason") == "InvalidGPUQuantity"]

        (event,) = await eventually(warned, what="an InvalidGPUQuantity event")
        assert event["type"] == "Warning" and event["metadata"]["namespace"] == "default"
        made = await c.get("/api/v1/nodes/gpu-bad")
        assert made is not None
        assert event["involvedObject"] == {"apiVersion": "v1", "kind": "Node",
                                           "name": "gpu-bad", "uid": made["metadata"]["uid"]}
        assert "status.allocatable['nvidia.com/gpu']" in event["message"]
        assert "1e999" in event["message"]
        _, doc = await c.plan()
        assert set(doc.nodes) == {"gpu-a"}


async def _shared(c: Cluster, want: bool) -> Any:
    """The plan document once its instances are (``want``) or are not shared."""
    _, doc = await c.plan()
    if doc is None or {"default.chat", "default.rag"} - set(doc.pools):
        return None
    shared = any(a.shared_with for p in doc.pools.values() for a in p.assignments)
    return doc if shared == want else None


async def test_energy_policy_share_instances_false_gives_every_pool_its_own() -> None:
    """Two small pools of one model share one instance by default; the EnergyPolicy's
    ``shareInstances: false`` plans them FREESH's way (an instance of its own each), and
    ``true`` shares again."""
    async with cluster_and_operator() as (c, _op):
        await c.create(node("gpu-a", H100, 8))
        await c.create(pool("chat", rps=0.05))
        await c.create(pool("rag", rps=0.05))
        doc = await eventually(lambda: _shared(c, True), what="a shared instance")
        (host,) = [k for k, p in doc.pools.items() if p.assignments]
        assert doc.pools[host].assignments[0].shared_with == [
            ({"default.chat", "default.rag"} - {host}).pop()]

        await c.create(_policy(shareInstances=False))
        doc = await eventually(lambda: _shared(c, False), what="an unshared plan")
        assert {k: p.replicas for k, p in doc.pools.items()} == {
            "default.chat": 1, "default.rag": 1}
        await eventually(lambda: _replicas_of(c, "chat", 1), what="chat's own instance")
        await eventually(lambda: _replicas_of(c, "rag", 1), what="rag's own instance")
        await eventually(lambda: _names(c, {"chat-1xh100-gpu-a", "rag-1xh100-gpu-a"}),
                         what="one Deployment per pool")

        await c.patch("/apis/joulepool.dev/v1alpha1/energypolicies/default",
                      {"spec": {"shareInstances": True}})
        await eventually(lambda: _shared(c, True), what="shared again")


async def _message(c: Cluster, name: str, type_: str, text: str) -> dict[str, Any] | None:
    cond = condition(await c.pool(name), type_)
    return cond if cond is not None and text in cond["message"] else None


async def test_a_guest_pool_is_ready_when_its_shared_instances_are() -> None:
    """chat has an instance of its own on gpu-a and one on gpu-b that it shares with rag
    (one GPU each; rag has none of its own). chat's ready replica on gpu-a serves rag
    nothing: rag is Ready only once the shared instance on gpu-b is."""
    async with cluster_and_operator() as (c, _op):
        await c.create(node("gpu-a", H100, 1))
        await c.create(node("gpu-b", H100, 1))
        await c.create(pool("chat", rps=12))
        await c.create(pool("rag", rps=0.05))
        doc = await eventually(lambda: _shared(c, True), what="a shared instance")
        assert doc.pools["default.rag"].assignments == []
        places = {(a.node, tuple(a.shared_with)) for a in doc.pools["default.chat"].assignments}
        assert places == {("gpu-a", ()), ("gpu-b", ("default.rag",))}
        await eventually(lambda: _names(c, {"chat-1xh100-gpu-a", "chat-1xh100-gpu-b"}),
                         what="chat's two Deployments")
        await _until(c, "rag", "Ready", "False", "ReplicasNotReady")

        await c.patch("/apis/apps/v1/namespaces/default/deployments/chat-1xh100-gpu-a",
                      {"status": {"replicas": 1, "readyReplicas": 1}})
        await eventually(lambda: _message(c, "chat", "Ready", "1/2 replicas ready"),
                         what="chat's replica on gpu-a counted")
        cond = condition(await c.pool("rag"), "Ready")
        assert cond is not None and cond["status"] == "False", cond
        assert "served on 1 shared instance(s) of default.chat, 0 of them ready" in \
            cond["message"]

        await c.patch("/apis/apps/v1/namespaces/default/deployments/chat-1xh100-gpu-b",
                      {"status": {"replicas": 1, "readyReplicas": 1}})
        ready = await _until(c, "rag", "Ready", "True", "ReplicasReady")
        assert "1 of them ready" in condition(ready, "Ready")["message"]  # type: ignore[index]


async def _gie_cluster(gie_crd: bool) -> contextlib.AbstractAsyncContextManager[Any]:
    """kmock with (``gie_crd``) or without GIE's InferencePool v1 served, and the operator
    with a picker configured (so it manages GIE pools when the CRD is there)."""

    @contextlib.asynccontextmanager
    async def run() -> AsyncIterator[Cluster]:
        async with emulator() as server:
            if gie_crd:
                server.resources[GIE_RESOURCE] = kmock.ResourceInfo(
                    kind="InferencePool", singular="inferencepool", namespaced=True,
                    verbs={"get", "list", "watch", "create", "update", "patch", "delete"})
            async with aiohttp.ClientSession(base_url=str(server.url)) as session, \
                    operator_running(server, picker=PICKER):
                yield Cluster(server, session)
    return run()


async def _gateway_reason(c: Cluster, name: str, reason: str) -> dict[str, Any] | None:
    cond = condition(await c.pool(name), "GatewayPool")
    return cond if cond is not None and cond["reason"] == reason else None


async def test_gie_managed_pools_get_instances_of_their_own() -> None:
    """With GIE's CRD served the operator writes one GIE InferencePool per pool, whose
    selector reaches only that pool's pods: two small pools that would share one instance
    get one each (shareInstances withheld) and each pool's GatewayPool condition says so."""
    async with await _gie_cluster(gie_crd=True) as c:
        await c.create(node("gpu-a", H100, 8))
        await c.create(pool("chat", rps=0.05))
        await c.create(pool("rag", rps=0.05))
        doc = await eventually(lambda: _shared(c, False), what="an unshared plan")
        assert {k: p.replicas for k, p in doc.pools.items()} == {
            "default.chat": 1, "default.rag": 1}
        for name in ("chat", "rag"):
            cond = await eventually(lambda n=name: _gateway_reason(c, n,  # type: ignore[misc]
                                                                   "PickerServiceElsewhere"),
                                    what=f"{name}'s GatewayPool condition")
            assert cond["status"] == "True"
            assert "not shared" in cond["message"] and "shareInstances" in cond["message"]
            gie = await eventually(lambda n=name: c.get(  # type: ignore[misc]
                f"/apis/{GIE_API_VERSION}/namespaces/default/inferencepools/{n}"),
                what=f"{name}'s GIE InferencePool")
            assert gie["spec"]["selector"]["matchLabels"] == {POOL_LABEL: f"default.{name}"}
        await eventually(lambda: _names(c, {"chat-1xh100-gpu-a", "rag-1xh100-gpu-a"}),
                         what="one Deployment per pool")
        # the policy saying false changes nothing, and the condition stops mentioning it
        await c.create(_policy(shareInstances=False))

        async def plain(name: str) -> Any:
            cond = await _gateway_reason(c, name, "PickerServiceElsewhere")
            return cond if cond is not None and "not shared" not in cond["message"] else None

        await eventually(lambda: plain("chat"), what="chat's condition without the note")
        assert (await _shared(c, False)) is not None


async def test_without_gie_crd_a_picker_changes_no_sharing() -> None:
    """The same pools with a picker configured but GIE's CRD absent share as before."""
    async with await _gie_cluster(gie_crd=False) as c:
        await c.create(node("gpu-a", H100, 8))
        await c.create(pool("chat", rps=0.05))
        await c.create(pool("rag", rps=0.05))
        await eventually(lambda: _shared(c, True), what="a shared instance")
        cond = await eventually(lambda: _gateway_reason(c, "rag", "CRDNotInstalled"),
                                what="rag's GatewayPool condition")
        assert cond["status"] == "False" and "not shared" not in cond["message"]
