"""The planning loop without kopf: inputs as plain mappings, the API as an in-memory fake."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from joulepool.api.plan import PlanDocument
from joulepool.core.problem import node_from_label
from joulepool.operator.config import OperatorConfig
from joulepool.operator.kube import APPLY_PATCH, ApiError, KubeClient, patch_merge_retrying
from joulepool.operator.planning import Planner, index_values
from joulepool.operator.resources import deployment_from_body, node_from_body, parse_pool

CM = "/api/v1/namespaces/ops/configmaps/joulepool-plan"


class FakeAPI(KubeClient):
    """Objects by URL path; merge patches; optional scripted failures."""

    def __init__(self) -> None:
        super().__init__(retry_delays=(0.0, 0.0))
        self.objects: dict[str, dict[str, Any]] = {}
        self.log: list[tuple[str, str]] = []
        self.fail: list[tuple[str, str, int]] = []  # (method, path fragment, status) once each
        self.rv = 100

    async def request(self, method: str, path: str, body: Any = None, params: Any = None,
                      content_type: str = "") -> dict[str, Any] | None:
        self.log.append((method, path))
        for i, (m, frag, status) in enumerate(self.fail):
            if m == method and frag in path:
                del self.fail[i]
                raise ApiError(status, "Injected")
        if method == "GET":
            if path not in self.objects:
                raise ApiError(404, "NotFound")
            return self.objects[path]
        if method == "POST":
            url = f"{path}/{body['metadata']['name']}"
            if url in self.objects:
                raise ApiError(409, "AlreadyExists")
            self.objects[url] = json.loads(json.dumps(body))
            return self.objects[url]
        if method == "PATCH" and content_type == APPLY_PATCH:  # server-side apply: upsert
            assert params == {"fieldManager": "joulepool-operator", "force": "true"}
            if path not in self.objects:
                self.objects[path] = {}
            _merge(self.objects[path], body)
            self._stamp(self.objects[path])
            return self.objects[path]
        if method == "PATCH":
            base = path.removesuffix("/status")
            if base not in self.objects:
                raise ApiError(404, "NotFound")
            _merge(self.objects[base], body)
            self._stamp(self.objects[base])
            return self.objects[base]
        if method == "DELETE":
            if self.objects.pop(path, None) is None:
                raise ApiError(404, "NotFound")
            return {}
        raise AssertionError(method)

    def _stamp(self, obj: dict[str, Any]) -> None:
        self.rv += 1
        obj.setdefault("metadata", {})["resourceVersion"] = str(self.rv)

    def writes(self, fragment: str = "") -> list[tuple[str, str]]:
        return [(m, p) for m, p in self.log if m != "GET" and fragment in p]


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif isinstance(v, dict) and isinstance(target.get(k), dict):
            _merge(target[k], v)
        else:
            target[k] = json.loads(json.dumps(v))


def pool(name: str, rps: float, uid: str | None = None, **extra: Any) -> dict[str, Any]:
    meta = {"name": name, "namespace": "default", "uid": uid or f"u-{name}", "generation": 1,
            "finalizers": ["joulepool.dev/finalizer"], **extra}
    return {"apiVersion": "joulepool.dev/v1alpha1", "kind": "InferencePool", "metadata": meta,
            "spec": {"model": "llama-3.1-8b", "slo": {"ttftSeconds": 1, "tpotSeconds": 0.1},
                     "demand": {"requestsPerSecond": rps, "meanInputTokens": 1000,
                                "meanOutputTokens": 200},
                     "template": {"spec": {"containers": [{"name": "e", "image": "i"}]}}}}


class World:
    """The planner's sources as plain dicts (what kopf's indexes hold), fed from the fake API."""

    def __init__(self, api: FakeAPI) -> None:
        self.api = api
        self.pools: dict[str, list[Any]] = {}
        self.nodes: dict[str, list[Any]] = {}
        self.policies: dict[str, list[Any]] = {}

    def add_pool(self, body: dict[str, Any]) -> None:
        name = body["metadata"]["name"]
        path = f"/apis/joulepool.dev/v1alpha1/namespaces/default/inferencepools/{name}"
        self.api.objects.setdefault(path, body)
        e = parse_pool(self.api.objects[path])
        self.pools[e.key] = [e]

    def refresh_pools(self) -> None:  # statuses written by the planner, as the watch would see
        for k in list(self.pools):
            name = k.split(".", 1)[1]
            path = f"/apis/joulepool.dev/v1alpha1/namespaces/default/inferencepools/{name}"
            if path in self.api.objects:
                self.pools[k] = [parse_pool(self.api.objects[path])]

    def add_node(self, name: str, gpus: int = 8, product: str = "H100") -> None:
        self.nodes[name] = [node_from_label(name, "s1", product, gpus)]

    def deployments(self) -> dict[Any, list[Any]]:
        return {p: [deployment_from_body(b)] for p, b in self.api.objects.items()
                if "/deployments/" in p}


def make_planner(api: FakeAPI | None = None, **cfg: Any) -> tuple[Planner, FakeAPI, World]:
    api = api or FakeAPI()
    config = OperatorConfig(namespace="ops", debounce_seconds=0.01, max_delay_seconds=0.2,
                            resync_after_error_seconds=0.05, **cfg)
    planner = Planner(config, api, clock=lambda: datetime(2026, 1, 1, tzinfo=UTC))
    world = World(api)
    planner.sources.pools = world.pools
    planner.sources.nodes = world.nodes
    planner.sources.policies = world.policies
    planner.sources.profiles = {}
    return planner, api, world


async def reconcile(planner: Planner, world: World, force: bool = False) -> Any:
    planner.sources.deployments = world.deployments()
    report = await planner.reconcile(force=force)
    world.refresh_pools()
    return report


def plan(api: FakeAPI) -> PlanDocument:
    return PlanDocument.from_json(api.objects[CM]["data"]["plan.json"])


def status(api: FakeAPI, name: str) -> dict[str, Any]:
    return api.objects[f"/apis/joulepool.dev/v1alpha1/namespaces/default/inferencepools/{name}"][
        "status"]


def conds(api: FakeAPI, name: str) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status(api, name)["conditions"]}


def test_index_values_flattens_and_skips_none() -> None:
    assert list(index_values({"a": [1, None], "b": [2]})) == [1, 2]
    assert list(index_values(None)) == []


async def test_one_pass_publishes_deploys_and_writes_status() -> None:
    planner, api, world = make_planner()
    world.add_node("n1")
    world.add_pool(pool("chat", 20))
    report = await reconcile(planner, world)
    assert report.ok and report.solved and report.published_version == 1
    assert report.deployments_applied == 1 and report.statuses_written == 1
    doc = plan(api)
    assert doc.version == 1 and doc.pools["default.chat"].replicas == 2
    dep = api.objects["/apis/apps/v1/namespaces/default/deployments/chat-1xh100-n1"]
    assert dep["spec"]["replicas"] == 2
    assert conds(api, "chat")["Planned"] == ("True", "Planned")
    # nothing changed: no solve, no writes
    n = len(api.writes())
    report = await reconcile(planner, world)
    assert not report.solved and len(api.writes()) == n and planner.solves == 1


async def test_infeasible_plan_keeps_the_last_feasible_one() -> None:
    planner, api, world = make_planner()
    world.add_node("n1")
    world.add_node("n2")
    # 13 instances of 1xH100: a pool of 13 carries 13.4 req/s each (one alone 11.9)
    world.add_pool(pool("big", 150))
    await reconcile(planner, world)
    v1 = plan(api)
    assert v1.feasible and v1.pools["default.big"].replicas == 13
    # demand grows beyond the cluster; every node of the kept plan is still there
    big = api.objects["/apis/joulepool.dev/v1alpha1/namespaces/default/inferencepools/big"]
    big["spec"]["demand"]["requestsPerSecond"] = 400
    world.refresh_pools()
    report = await reconcile(planner, world)
    assert report.ok and report.feasible is False and report.published_version is None
    assert plan(api).version == v1.version  # not republished
    ann = api.objects[CM]["metadata"]["annotations"]
    assert ann["joulepool.dev/latest-plan-feasible"] == "false"
    c = conds(api, "big")
    assert c["Planned"] == ("True", "LastFeasiblePlan")
    assert c["Infeasible"] == ("True", "UnmetDemand")
    assert status(api, "big")["replicas"] == 13
    assert replicas_of(api, "big-1xh100-") == {"n1": 8, "n2": 5}
    # a new pool while infeasible: not served, says why
    world.add_pool(pool("small", 1))
    await reconcile(planner, world)
    assert conds(api, "small")["Planned"] == ("False", "NoFeasiblePlan")
    assert "default.small" not in plan(api).pools


async def test_deleting_pool_is_released_and_its_deployments_deleted() -> None:
    planner, api, world = make_planner()
    world.add_node("n1")
    world.add_pool(pool("a", 20))
    world.add_pool(pool("b", 20))
    await reconcile(planner, world)
    assert set(plan(api).pools) == {"default.a", "default.b"}
    path = "/apis/joulepool.dev/v1alpha1/namespaces/default/inferencepools/a"
    api.objects[path]["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    world.add_pool(api.objects[path])
    world.refresh_pools()
    n_status = len(api.writes("/inferencepools/a/status"))
    report = await reconcile(planner, world)
    assert report.solved and report.deployments_deleted == 1
    doc = plan(api)
    assert set(doc.pools) == {"default.b"} and doc.version == 2
    assert all("default.a" not in n.pools for n in doc.nodes.values())
    assert "/apis/apps/v1/namespaces/default/deployments/a-1xh100" not in api.objects
    assert len(api.writes("/inferencepools/a/status")) == n_status  # no status for a dying pool


async def test_invalid_pool_keeps_its_last_valid_spec_and_unadopted_pools_wait() -> None:
    planner, api, world = make_planner()
    world.add_node("n1")
    world.add_pool(pool("chat", 20))
    world.add_pool(pool("new", 4, finalizers=[]))
    await reconcile(planner, world)
    assert "default.new" in plan(api).pools  # planned...
    assert "status" not in api.objects[
        "/apis/joulepool.dev/v1alpha1/namespaces/default/inferencepools/new"]  # ...not written
    path = "/apis/joulepool.dev/v1alpha1/namespaces/default/inferencepools/chat"
    api.objects[path]["spec"]["slo"]["tpotSeconds"] = -1
    world.refresh_pools()
    await reconcile(planner, world)
    c = conds(api, "chat")
    assert c["Invalid"] == ("True", "InvalidSpec") and c["Planned"] == ("True", "Planned")
    assert plan(api).pools["default.chat"].replicas == 2


async def test_plan_version_continues_from_the_published_configmap() -> None:
    planner, api, world = make_planner()
    api.objects[CM] = {"metadata": {"name": "joulepool-plan", "annotations": {
        "joulepool.dev/plan-version": "41"}}, "data": {}}
    world.add_node("n1")
    world.add_pool(pool("chat", 4))
    report = await reconcile(planner, world)
    assert report.published_version == 42 and plan(api).version == 42
    assert ("POST", "/api/v1/namespaces/ops/configmaps") not in api.log  # applied in place


async def test_failed_writes_are_reported_and_redone_next_pass() -> None:
    planner, api, world = make_planner()
    world.add_node("n1")
    world.add_pool(pool("chat", 4))
    api.fail += [("PATCH", "/status", 500), ("PATCH", "/deployments", 503)]
    report = await reconcile(planner, world)
    assert not report.ok and len(report.errors) == 2
    report = await reconcile(planner, world)
    assert report.ok and report.statuses_written == 1 and report.deployments_applied == 1


async def test_status_conflict_rereads_the_object() -> None:
    api = FakeAPI()
    path = "/apis/joulepool.dev/v1alpha1/namespaces/default/inferencepools/x"
    api.objects[path] = {"metadata": {"uid": "u"}, "status": {"replicas": 1}}
    api.fail.append(("PATCH", "/status", 409))
    seen: list[Any] = []

    def make(cur: dict[str, Any] | None) -> dict[str, Any]:
        seen.append(json.loads(json.dumps(cur)))
        return {"status": {"replicas": 2}}

    await patch_merge_retrying(api, path + "/status", make, None)
    assert seen[0] is None and seen[1]["status"]["replicas"] == 1  # recomputed on a re-read
    assert api.objects[path]["status"] == {"replicas": 2}
    with pytest.raises(ApiError):
        api.fail.append(("PATCH", "/status", 422))
        await patch_merge_retrying(api, path + "/status", make, None)


async def _within(seconds: float, condition: Callable[[], bool]) -> bool:
    """Poll ``condition`` every 50 ms until it holds or ``seconds`` pass (a loaded CI
    machine can take several periods to run one pass; fixed sleeps flaked there)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def test_loop_debounces_triggers_and_replans_periodically() -> None:
    planner, api, world = make_planner(plan_interval_seconds=0.3)
    world.add_node("n1")
    world.add_pool(pool("chat", 4))
    planner.sources.deployments = {}
    task = asyncio.create_task(planner.run())
    try:
        tickets = [planner.trigger(f"t{i}") for i in range(5)]
        assert await planner.wait_for_pass(tickets[-1], timeout=5)
        assert planner.passes == 1  # five triggers, one pass
        solves = planner.solves
        # periodic re-plan, no trigger
        assert await _within(20.0, lambda: planner.solves >= solves + 1)
        # a failed pass is retried after resync_after_error_seconds without a trigger
        api.fail += [("PATCH", "/status", 500)] * 3
        passes = planner.passes
        await planner.wait_for_pass(planner.trigger(), timeout=5)
        assert await _within(
            20.0, lambda: planner.passes >= passes + 2 and planner.last_report.ok)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_changed_memo() -> None:
    planner, _, _ = make_planner()
    assert planner.changed("a", 1) and not planner.changed("a", 1)
    assert planner.changed("a", 2) and planner.changed("a", None)
    assert not planner.changed("a", None) and not planner.changed("b", None)


def test_node_heartbeat_is_no_change() -> None:
    body = {"metadata": {"name": "n", "labels": {"nvidia.com/gpu.product": "H100"},
                         "resourceVersion": "1"},
            "status": {"allocatable": {"nvidia.com/gpu": "8"}, "conditions": [{"t": 1}]}}
    planner, _, _ = make_planner()
    assert planner.changed(("node", "n"), node_from_body(body))
    body["metadata"]["resourceVersion"] = "2"
    body["status"]["conditions"] = [{"t": 2}]
    assert not planner.changed(("node", "n"), node_from_body(body))


def test_plan_pools_partial_describes_the_best_partial_plan() -> None:
    from joulepool.api.models import EnergyPolicySpec
    from joulepool.pooling import plan_pools

    e = parse_pool(pool("big", 150))
    nodes = [node_from_label("n1", "s1", "H100", 8)]
    strict = plan_pools([e.pool], nodes, EnergyPolicySpec())  # type: ignore[list-item]
    best = plan_pools([e.pool], nodes, EnergyPolicySpec(), partial=True)  # type: ignore[list-item]
    assert not strict.result.feasible and not best.result.feasible
    assert strict.outcomes["default.big"].replicas == 0  # the CLI's view: nothing planned
    out = best.outcomes["default.big"]
    assert out.replicas == 8 and not out.planned and "unmet demand" in out.message
    assert not best.document.feasible and best.document.pools["default.big"].replicas == 8


DEP = "/apis/apps/v1/namespaces/default/deployments/"


def replicas_of(api: FakeAPI, prefix: str) -> dict[str, int]:
    """spec.replicas of the Deployments named ``prefix<node>``, by node (one per node)."""
    return {p.removeprefix(DEP + prefix): d["spec"]["replicas"]
            for p, d in api.objects.items() if p.startswith(DEP + prefix)}


async def test_kept_plan_is_dropped_when_one_of_its_nodes_is_gone() -> None:
    """A last feasible plan on a dead node serves nobody: the best partial plan replaces it."""
    planner, api, world = make_planner()
    world.add_node("n1")
    world.add_node("n2")
    # 13 instances of 1xH100: a pool of 13 carries 13.4 req/s each (one alone 11.9)
    world.add_pool(pool("big", 150))
    await reconcile(planner, world)
    assert plan(api).feasible and plan(api).pools["default.big"].replicas == 13
    del world.nodes["n2"]  # gone (a NotReady / unreachable node leaves the index the same way)
    report = await reconcile(planner, world)
    assert report.ok and report.feasible is False and report.published_version == 2
    doc = plan(api)
    assert not doc.feasible and doc.pools["default.big"].nodes() == {"n1"}
    assert doc.pools["default.big"].replicas == 8
    assert conds(api, "big")["Planned"] == ("False", "PartiallyPlanned")
    # n1's Deployment keeps its 8; n2's is scaled to 0, not deleted (the plan is infeasible)
    assert replicas_of(api, "big-1xh100-") == {"n1": 8, "n2": 0}


async def test_kept_plan_is_dropped_when_its_node_shrinks() -> None:
    planner, api, world = make_planner()
    world.add_node("n1")
    world.add_node("n2")
    world.add_pool(pool("big", 150))
    await reconcile(planner, world)
    world.add_node("n2", gpus=2)  # fewer GPUs than the kept plan books there
    await reconcile(planner, world)
    doc = plan(api)
    assert not doc.feasible and doc.version == 2
    assert sum(n.pools.get("default.big", 0) for n in doc.nodes.values()) == 10


async def test_an_infeasible_plan_scales_a_live_pools_deployment_to_zero_never_deletes() -> None:
    planner, api, world = make_planner()
    world.add_node("h1")
    world.add_node("a1", product="A100")
    world.add_pool(pool("chat", 20, uid="u-chat"))
    only_a100 = pool("a100", 4)
    only_a100["spec"]["gpuProducts"] = ["A100"]
    world.add_pool(only_a100)
    await reconcile(planner, world)
    assert plan(api).feasible
    (a100_dep,) = [p for p in api.objects if p.startswith(DEP + "a100-")]
    replicas = api.objects[a100_dep]["spec"]["replicas"]
    assert replicas >= 1
    del world.nodes["a1"]  # a100 cannot be served at all now; the kept plan used a1
    report = await reconcile(planner, world)
    assert report.ok and report.deployments_deleted == 0 and report.deployments_scaled_down == 1
    dep = api.objects[a100_dep]  # still there, with no pods
    assert dep["spec"]["replicas"] == 0
    assert api.objects[DEP + "chat-1xh100-h1"]["spec"]["replicas"] == 2
    n = len(api.writes("/deployments"))
    await reconcile(planner, world, force=True)
    assert len(api.writes("/deployments")) == n  # scaled once, not again every pass
    world.add_node("a1", product="A100")  # back: a feasible plan restores the Deployment
    await reconcile(planner, world)
    assert plan(api).feasible and api.objects[a100_dep]["spec"]["replicas"] == replicas
    # a feasible plan (or a deleted pool) still deletes what it no longer plans
    path = "/apis/joulepool.dev/v1alpha1/namespaces/default/inferencepools/a100"
    api.objects[path]["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    world.refresh_pools()
    await reconcile(planner, world)
    assert a100_dep not in api.objects


async def test_restart_restores_the_feasible_plan_in_force_from_the_configmap() -> None:
    """A new process (empty memory) with an infeasible pool present keeps serving the
    published feasible plan instead of replacing it with a partial plan."""
    planner, api, world = make_planner()
    world.add_node("n1")
    world.add_pool(pool("chat", 20))
    await reconcile(planner, world)
    v1 = plan(api)
    chat_dep = json.loads(json.dumps(api.objects[DEP + "chat-1xh100-n1"]))
    # the operator is down; a pool far beyond the cluster appears; the operator restarts
    planner2 = Planner(planner.config, api, clock=planner.clock)
    planner2.sources = planner.sources
    world.add_pool(pool("greedy", 5000))
    n = len(api.writes("/deployments"))
    report = await reconcile(planner2, world)
    assert report.ok and report.feasible is False and report.published_version is None
    doc = plan(api)
    assert doc.version == v1.version and doc.feasible and set(doc.pools) == {"default.chat"}
    assert api.objects[DEP + "chat-1xh100-n1"] == chat_dep  # untouched
    assert len(api.writes("/deployments")) == n
    assert conds(api, "chat")["Planned"] == ("True", "LastFeasiblePlan")
    assert status(api, "chat")["replicas"] == 2
    assert conds(api, "greedy")["Planned"] == ("False", "NoFeasiblePlan")
    assert api.objects[CM]["metadata"]["annotations"][
        "joulepool.dev/latest-plan-feasible"] == "false"
    # once the greedy pool shrinks to fit, the new feasible plan replaces the restored one
    path = "/apis/joulepool.dev/v1alpha1/namespaces/default/inferencepools/greedy"
    api.objects[path]["spec"]["demand"]["requestsPerSecond"] = 4
    world.refresh_pools()
    report = await reconcile(planner2, world)
    assert report.feasible and plan(api).version == v1.version + 1
    assert set(plan(api).pools) == {"default.chat", "default.greedy"}


async def test_restart_with_an_infeasible_published_plan_only_continues_the_version() -> None:
    planner, api, world = make_planner()
    world.add_node("n1")
    world.add_pool(pool("big", 150))
    await reconcile(planner, world)
    assert not plan(api).feasible
    planner2 = Planner(planner.config, api, clock=planner.clock)
    planner2.sources = planner.sources
    report = await reconcile(planner2, world)
    assert report.ok and report.published_version is None  # same partial plan: no new version
    assert planner2.in_force is not None and not planner2.in_force_feasible
    assert conds(api, "big")["Planned"] == ("False", "PartiallyPlanned")


async def test_restart_waits_when_the_configmap_cannot_be_read() -> None:
    planner, api, world = make_planner()
    world.add_node("n1")
    world.add_pool(pool("chat", 4))
    api.fail.append(("GET", "/configmaps/joulepool-plan", 500))
    report = await reconcile(planner, world)
    assert not report.ok and not api.writes()  # nothing written without the plan in force
    assert not api.fail
    report = await reconcile(planner, world)
    assert report.ok and plan(api).version == 1


async def test_scaled_down_deployment_is_restored_even_if_the_index_lags() -> None:
    planner, api, world = make_planner()
    world.add_node("h1")
    world.add_node("a1", product="A100")
    only_a100 = pool("a100", 4)
    only_a100["spec"]["gpuProducts"] = ["A100"]
    world.add_pool(only_a100)
    world.add_pool(pool("chat", 20))
    await reconcile(planner, world)
    before = world.deployments()  # the index as it was, with the full spec hash
    (a100_dep,) = [p for p in api.objects if p.startswith(DEP + "a100-")]
    replicas = api.objects[a100_dep]["spec"]["replicas"]
    del world.nodes["a1"]
    await reconcile(planner, world)
    assert api.objects[a100_dep]["spec"]["replicas"] == 0
    world.add_node("a1", product="A100")
    planner.sources.deployments = before  # the scale-down's watch event not seen yet
    await planner.reconcile()
    assert api.objects[a100_dep]["spec"]["replicas"] == replicas


class TerminatingAPI(FakeAPI):
    """Namespace ``default`` is being deleted: creating content there is refused."""

    async def request(self, method: str, path: str, body: Any = None, params: Any = None,
                      content_type: str = "") -> dict[str, Any] | None:
        if method == "PATCH" and "/deployments/" in path:
            raise ApiError(403, "Forbidden", 'deployments "x" is forbidden: unable to create '
                           "new content in namespace default because it is being terminated")
        return await super().request(method, path, body, params, content_type)


async def test_pool_in_a_namespace_being_deleted_is_not_planned_nor_retried() -> None:
    """The API refuses new content in a terminating namespace (403 "being terminated"):
    not an error to retry every few seconds, and the namespace's pools leave the plan."""
    planner, api, world = make_planner(TerminatingAPI())
    world.add_node("n1")
    world.add_pool(pool("chat", 20))
    report = await reconcile(planner, world)
    assert report.ok and planner.terminating == {"default"}
    assert planner.resync_delay() == pytest.approx(0.05)  # no failed pass counted before
    report = await reconcile(planner, world)
    assert report.ok and "default.chat" not in plan(api).pools
    # once the namespace's pools are gone, the namespace is forgotten
    world.pools.clear()
    await reconcile(planner, world)
    assert planner.terminating == set()
