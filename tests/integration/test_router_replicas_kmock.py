"""Router replicas sharing counts through Leases, against kmock's API server emulator
over loopback HTTP (the kubernetes client, its real requests): where ../shared/k8s is
not available this still runs the Lease I/O (create, renew by patch, list by label) and
the sync loop of two replicas. The real API server's version of this test is
tests/realk8s/test_router_replicas_real.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import kmock
import pytest

from joulepool.api.contract import ROUTER_COUNTS_ANNOTATION
from joulepool.core.classes import Tier
from joulepool.kube.files import EndpointsFile
from joulepool.kube.leases import LeaseStore
from joulepool.kube.pools import Router, RouterSettings
from joulepool.router.replicas import sync_once

POOL = "ns.chat"
ENDPOINT = "10.0.0.1:8000"


@pytest.fixture
async def api() -> AsyncIterator[Any]:
    from kubernetes import client

    emulator = kmock.KubernetesEmulator()
    emulator.resources["coordination.k8s.io/v1/leases"] = kmock.ResourceInfo(
        kind="Lease", singular="lease", namespaced=True,
        verbs={"get", "list", "watch", "create", "update", "patch", "delete"})
    async with emulator as server, kmock.Server(server):
        api_client = client.ApiClient(client.Configuration(host=str(server.url).rstrip("/")))
        yield api_client
        api_client.close()


def _replica() -> Router:
    router = Router(RouterSettings(pi_every=10, pi_period_s=1e9))
    router.set_static(EndpointsFile.model_validate({"pools": {POOL: {
        "model": "m", "endpoints": [{"address": ENDPOINT, "joulesPerToken": 0.1,
                                     "tokensPerSecond": 1000}]}}}))
    return router


async def test_two_replicas_converge_through_leases(api: Any) -> None:
    from kubernetes import client

    a, b = _replica(), _replica()
    stores = {"a": LeaseStore(api, "jp", "router-a", 5.0, pod_uid="uid-a"),
              "b": LeaseStore(api, "jp", "router-b", 5.0)}
    # an unrelated Lease in the namespace (kube-scheduler's) is no replica record
    await asyncio.to_thread(client.CoordinationV1Api(api).create_namespaced_lease, "jp", {
        "metadata": {"name": "joulepool-scheduler"},
        "spec": {"holderIdentity": "sched-1", "leaseDurationSeconds": 15}})
    # baselines: each publishes and sees the other (a first sees no one)
    assert await sync_once(a, stores["a"]) == 0
    assert await sync_once(b, stores["b"]) == 1
    assert await sync_once(a, stores["a"]) == 1
    lam0 = b.pool(POOL).pi.lam
    now = time.monotonic()
    for i in range(40):  # misses reported to replica a only: 25 % late
        a.pool(POOL).report(ENDPOINT, None, 10, i % 4 != 0, None, now, Tier.INTERACTIVE)
    await sync_once(a, stores["a"])
    await sync_once(b, stores["b"])  # b steps its PI loop on a's 40 completions
    assert b.pool(POOL).pi_updates == 1
    for _ in range(12):  # syncs alone (no new completions): the lambdas meet
        await sync_once(a, stores["a"])
        await sync_once(b, stores["b"])
    lam_a, lam_b = a.pool(POOL).pi.lam, b.pool(POOL).pi.lam
    assert lam_b > lam0 + 50 and b.pool(POOL).pi_updates == 1
    assert lam_b == pytest.approx(lam_a, rel=1e-6)
    lease = await asyncio.to_thread(client.CoordinationV1Api(api).read_namespaced_lease,
                                    "router-a", "jp")
    assert lease.spec.holder_identity == "router-a"
    assert lease.metadata.owner_references[0].uid == "uid-a"
    assert '"completions":40,"misses":10' in lease.metadata.annotations[
        ROUTER_COUNTS_ANNOTATION]


async def test_a_stale_replica_drops_out(api: Any) -> None:
    a, b = _replica(), _replica()
    store_a = LeaseStore(api, "jp2", "router-a", 1.0)
    store_b = LeaseStore(api, "jp2", "router-b", 1.0)
    await sync_once(a, store_a)
    assert await sync_once(b, store_b) == 1
    await asyncio.sleep(1.3)  # a stops renewing: past its TTL it is not counted
    assert await sync_once(b, store_b) == 0
    assert b.peers == 0
