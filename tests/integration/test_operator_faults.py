"""API errors, watch restarts and operator restarts: retried, and no update is lost.

Faults are injected in the emulated API server (``FaultyEmulator.faults``):
a matching request is answered with the error before any state changes, as
a real API server does.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from operator_fixtures import (
    Cluster,
    Fault,
    cluster_and_operator,
    condition,
    emulator,
    eventually,
    node,
    operator_running,
    pool,
)

STATUS = "/inferencepools/chat/status"


async def _replicas(c: Cluster, n: int, name: str = "chat") -> Any:
    obj = await c.pool(name)
    cond = condition(obj, "Planned")
    if obj and cond and cond["status"] == "True" and obj["status"].get("replicas") == n:
        return obj
    return None


async def test_409_and_500_on_status_patch_are_retried() -> None:
    async with cluster_and_operator() as (c, op):
        c.server.faults += [Fault("PATCH", STATUS, 500, times=2), Fault("PATCH", STATUS, 409)]
        await c.create(node("gpu-a"))
        await c.create(pool("chat", rps=20))
        obj = await eventually(lambda: _replicas(c, 2), what="status written")
        assert [f.hits for f in c.server.faults] == [2, 1]
        assert op.client.retries >= 2  # the two 500s, retried with backoff inside the call
        assert obj["status"]["assignments"][0]["instances"] == 2


async def test_5xx_and_409_on_deployment_and_configmap_writes() -> None:
    async with cluster_and_operator() as (c, _op):
        c.server.faults += [
            Fault("PATCH", "/namespaces/joulepool-system/configmaps", 503, times=2),
            Fault("PATCH", "/namespaces/default/deployments", 500, times=1),
            # a 409 on the apply (e.g. a conflict the server could not resolve): the pass
            # reports it, and the next pass applies it again
            Fault("PATCH", "/namespaces/default/deployments", 409, times=1),
        ]
        await c.create(node("gpu-a"))
        await c.create(pool("chat", rps=20))
        await eventually(lambda: _replicas(c, 2))

        async def deployed() -> Any:
            dep = (await c.deployments()).get("chat-1xh100-gpu-a")
            return dep if dep and dep["spec"]["replicas"] == 2 else None

        await eventually(deployed, what="Deployment created despite the faults")
        _, doc = await c.plan()
        assert doc is not None and "default.chat" in doc.pools
        assert [f.hits for f in c.server.faults] == [2, 1, 1]


async def test_persistent_failure_is_resynced_later_and_no_update_lost() -> None:
    async with cluster_and_operator() as (c, op):
        await c.create(node("gpu-a"))
        p = await c.create(pool("chat", rps=4))
        await eventually(lambda: _replicas(c, 1))
        # every retry inside one pass fails: the pass is incomplete, a later pass writes it
        c.server.faults.append(Fault("PATCH", STATUS, 500, times=12))
        await c.patch(p, {"spec": {"demand": {"requestsPerSecond": 40}}})
        obj = await eventually(lambda: _replicas(c, 4), what="4 replicas after 12 500s")
        assert c.server.faults[0].hits == 12
        assert obj["status"]["observedGeneration"] == 2
        # the pass that wrote the status completes after the write (on a loaded machine
        # well after it): until then the last report is the failed pass's
        await eventually(lambda: op.planner.last_report.ok, what="a complete pass")


async def test_500_on_kopfs_own_patch_is_retried_by_kopf() -> None:
    async with cluster_and_operator() as (c, _op):
        c.server.faults.append(Fault("PATCH", "/inferencepools/chat", 500, times=2))
        await c.create(node("gpu-a"))
        await c.create(pool("chat", rps=4))
        obj = await eventually(lambda: _replicas(c, 1), what="planned")
        assert obj["metadata"]["finalizers"] == ["joulepool.dev/finalizer"]
        assert c.server.faults[0].hits == 2


async def test_watch_restarts_lose_no_update() -> None:
    # client-side watch timeout of 0.3 s: kopf's watch streams end and restart all the time
    async with cluster_and_operator(watch_server_timeout=1,
                                    watch_client_timeout=0.3) as (c, _op):
        await c.create(node("gpu-a"))
        p = await c.create(pool("chat", rps=4))
        await eventually(lambda: _replicas(c, 1))
        for rps, n in ((20, 2), (40, 4), (4, 1)):
            await c.patch(p, {"spec": {"demand": {"requestsPerSecond": rps}}})
            await eventually(lambda n=n: _replicas(c, n), what=f"{n} replicas")  # type: ignore[misc]


async def test_restart_resumes_and_continues_the_plan_version() -> None:
    async with emulator() as server, aiohttp.ClientSession(base_url=str(server.url)) as s:
        c = Cluster(server, s)
        await c.create(node("gpu-a"))
        p = await c.create(pool("chat", rps=4))
        async with operator_running(server):
            await eventually(lambda: _replicas(c, 1))
            _, doc1 = await c.plan()
        # changed while no operator runs
        await c.patch(p, {"spec": {"demand": {"requestsPerSecond": 40}}})
        await c.create(pool("rag", rps=4))
        async with operator_running(server) as op2:
            await eventually(lambda: _replicas(c, 4), what="resumed chat re-planned")
            await eventually(lambda: _replicas(c, 1, "rag"), what="rag planned")
            _, doc2 = await c.plan()
            assert doc1 is not None and doc2 is not None and doc2.version > doc1.version
            deps = await c.deployments()
            assert set(deps) == {"chat-1xh100-gpu-a", "rag-1xh100-gpu-a"}
            assert deps["chat-1xh100-gpu-a"]["spec"]["replicas"] == 4
            assert op2.planner.solves >= 1


async def test_restart_with_an_infeasible_pool_keeps_the_healthy_pools_deployment() -> None:
    """The plan in force is read back from the ConfigMap: a pool that became infeasible
    while no operator ran cannot make the restarted one drop the healthy pool's plan."""
    async with emulator() as server, aiohttp.ClientSession(base_url=str(server.url)) as s:
        c = Cluster(server, s)
        await c.create(node("gpu-a"))
        await c.create(pool("chat", rps=20))
        async with operator_running(server):
            await eventually(lambda: _replicas(c, 2))
            _, doc1 = await c.plan()
            dep1 = (await c.deployments())["chat-1xh100-gpu-a"]
        assert doc1 is not None and doc1.feasible
        await c.create(pool("greedy", rps=5000))  # far beyond the cluster
        async with operator_running(server) as op2:
            async def greedy_seen() -> Any:
                obj = await c.pool("greedy")
                cond = condition(obj, "Planned")
                return obj if cond and cond["reason"] == "NoFeasiblePlan" else None

            await eventually(greedy_seen, what="greedy planned as infeasible")
            obj = await c.pool("chat")
            assert condition(obj, "Planned")["reason"] == "LastFeasiblePlan"  # type: ignore[index]
            assert obj["status"]["replicas"] == 2  # type: ignore[index]
            cm, doc2 = await c.plan()
            assert doc2 is not None and doc2.version == doc1.version and doc2.feasible
            assert set(doc2.pools) == {"default.chat"}
            assert cm["metadata"]["annotations"][  # type: ignore[index]
                "joulepool.dev/latest-plan-feasible"] == "false"
            deps = await c.deployments()
            assert set(deps) == {"chat-1xh100-gpu-a"}
            assert deps["chat-1xh100-gpu-a"]["spec"] == dep1["spec"]
            assert op2.planner.in_force_feasible and op2.planner.solves >= 1


async def test_periodic_replan_without_changes() -> None:
    """Timers re-plan with nothing changed: the solver runs, nothing is republished.

    Waits on conditions with generous deadlines (the machine may be loaded): under load
    the node and the pool can reach the operator in separate passes, so the plan that
    serves the pool is not necessarily version 1; what must hold is that the periodic
    passes after it publish nothing new."""
    async with cluster_and_operator(plan_interval_seconds=0.3) as (c, op):
        await c.create(node("gpu-a"))
        await c.create(pool("chat", rps=4))
        await eventually(lambda: _replicas(c, 1), what="the pool planned")

        async def serving_plan() -> Any:
            _, doc = await c.plan()
            return doc if doc is not None and "default.chat" in doc.pools else None

        serving = await eventually(serving_plan, what="the serving plan")
        solves = op.planner.solves
        await eventually(lambda: op.planner.solves >= solves + 3,
                         what="periodic re-plans")
        _, doc = await c.plan()
        assert doc is not None and doc.version == serving.version  # not republished
        assert doc.pools == serving.pools and doc.nodes == serving.nodes


async def test_liveness_endpoint_reports_the_planning_loop() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with cluster_and_operator(liveness_port=port) as (c, _op):
        await c.create(node("gpu-a"))
        await c.create(pool("chat", rps=4))
        await eventually(lambda: _replicas(c, 1))
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/healthz") as r:
            assert r.status == 200
            body = await r.json()
        assert body["planning"]["planVersion"] == 1 and body["planning"]["lastPassOk"]
        # bound to the configured address only (default loopback 127.0.0.1), not to every
        # interface: another local address of the machine is refused (old code: 0.0.0.0)
        async with aiohttp.ClientSession() as s:
            try:
                async with s.get(f"http://127.0.0.2:{port}/healthz") as r:
                    reached = r.status
            except aiohttp.ClientConnectionError:
                reached = None
        assert reached is None


POOL_URL = "/apis/joulepool.dev/v1alpha1/namespaces/default/inferencepools/chat"


@pytest.mark.parametrize("status", [409, 422])
async def test_finalizer_patch_failing_during_deletion_does_not_leave_the_pool_stuck(
        status: int) -> None:
    """kopf's PATCH that removes the finalizer answered 409/422 once: old code left the
    pool in Terminating forever (no new watch event, nothing retried it)."""
    async with cluster_and_operator(release_retry_seconds=1.0) as (c, _op):
        await c.create(node("gpu-a"))
        await c.create(pool("chat", rps=4))
        await eventually(lambda: _replicas(c, 1))
        c.server.faults.append(Fault("PATCH", "/inferencepools/chat", status, times=1))
        await c.delete(POOL_URL)

        async def gone() -> bool:
            return await c.pool("chat") is None

        await eventually(gone, what="pool released despite the failed PATCH")
        assert c.server.faults[0].hits == 1



async def test_a_failing_handler_is_reported_by_kopf_next_to_the_pool() -> None:
    """kopf's own report of a failing handler (the release waits while the Deployment's
    DELETE is answered 500) is a core/v1 Event about the pool in the pool's namespace, from
    joulepool-operator, where ``kubectl describe jpool`` lists it. kopf 1.4x posts its
    log messages only with ``settings.posting.loggers`` (older versions always did): old
    settings left the failure in the operator's log alone."""
    async with cluster_and_operator(release_retry_seconds=0.5) as (c, _op):
        await c.create(node("gpu-a"))
        await c.create(pool("chat", rps=4))
        await eventually(lambda: _replicas(c, 1))
        await eventually(lambda: _deployment(c, "chat-1xh100-gpu-a", 1), what="deployed")
        fault = Fault("DELETE", "/deployments/chat-1xh100-gpu-a", 500, times=10**6)
        c.server.faults.append(fault)
        await c.delete(POOL_URL)

        async def reported() -> list[dict[str, Any]]:
            return [e for e in await c.events()
                    if "Handler 'pool_deleted' failed temporarily" in e["message"]]

        (event, *_) = await eventually(reported,
                                       what="kopf's event about the failing release")
        assert event["type"] == "Error" and event["metadata"]["namespace"] == "default"
        assert {k: event["involvedObject"][k] for k in ("kind", "namespace", "name")} == {
            "kind": "InferencePool", "namespace": "default", "name": "chat"}
        assert event["source"]["component"] == "joulepool-operator"
        assert await c.pool("chat") is not None  # held while its Deployments stay
        fault.times = fault.hits  # the API server recovers: the pool is released

        async def gone() -> bool:
            return await c.pool("chat") is None

        await eventually(gone, what="pool released once DELETE works")

async def test_deployment_deleted_during_a_410_gap_is_recreated() -> None:
    """Old code: after 410 Gone kopf re-lists but its index keeps the vanished Deployment,
    so the operator believed it existed and never wrote it again. The re-listing is empty
    (no event at all): the operator's periodic listing check finds the gap."""
    async with cluster_and_operator(listing_check_seconds=1.0) as (c, op):
        await c.create(node("gpu-a"))
        await c.create(pool("chat", rps=20))
        await eventually(lambda: _replicas(c, 2))
        await eventually(lambda: _deployment(c, "chat-1xh100-gpu-a", 2), what="deployed")
        c.server.vanish("deployments", "default", "chat-1xh100-gpu-a")
        assert await c.server.expire_watches("deployments") >= 1
        await eventually(lambda: _deployment(c, "chat-1xh100-gpu-a", 2),
                         what="Deployment recreated after the gap")
        assert op.planner.gone.marked >= 1


async def test_node_deleted_during_a_410_gap_leaves_the_plan() -> None:
    async with cluster_and_operator() as (c, op):
        await c.create(node("gpu-a"))
        await c.create(node("gpu-b"))
        await c.create(pool("chat", rps=150))  # 13 instances of 1xH100: both nodes
        obj = await eventually(lambda: _replicas(c, 13))
        assert {a["node"] for a in obj["status"]["assignments"]} == {"gpu-a", "gpu-b"}
        c.server.vanish("nodes", None, "gpu-b")
        assert await c.server.expire_watches("nodes") >= 1

        async def replanned() -> Any:
            o = await c.pool("chat")
            nodes = {a["node"] for a in ((o or {}).get("status") or {}).get("assignments", [])}
            return o if nodes == {"gpu-a"} else None

        obj = await eventually(replanned, what="gpu-b out of the plan")
        assert obj["status"]["replicas"] == 8
        _, doc = await c.plan()
        assert doc is not None and "gpu-b" not in doc.nodes
        assert op.planner.gone.marked >= 1


async def _deployment(c: Cluster, name: str, replicas: int) -> Any:
    dep = (await c.deployments()).get(name)
    return dep if dep and dep["spec"]["replicas"] == replicas else None
