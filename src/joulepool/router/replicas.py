"""The router replicas share their completion counts through the API server.

Every ``--replica-sync-seconds`` the service reads every replica's Lease, feeds the
fresh peers' increments and lambdas to its pools' PI loops
(:meth:`kube.pools.Router.absorb_peers`, :mod:`core.replicas`), then publishes its
pools' cumulative completions and misses (per tier) and its lambdas, as they are
after that, in its own Lease (:class:`kube.leases.LeaseStore`). Off without
``--cluster`` or with ``--replica-sync-seconds 0``: each replica then learns from
its own traffic only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from joulepool.kube.leases import LeaseStore
from joulepool.kube.pools import Router

log = logging.getLogger(__name__)

#: the service's LeaseStore once sharing runs (tests reach in)
STORE = web.AppKey("replica_store", LeaseStore)


#: longest Kubernetes object name (a DNS-1123 subdomain)
MAX_NAME = 253


def replica_name(configured: str | None) -> str:
    """This replica's name, and its Lease's: the setting (already validated; the chart
    passes the pod name), else the host name (a pod's host name is its name) made a
    DNS-1123 subdomain (:func:`dns_subdomain`)."""
    return configured or dns_subdomain(socket.gethostname(), fallback="joulepool-router")


def dns_subdomain(text: str, fallback: str) -> str:
    """``text`` as a valid Kubernetes object name: lower case, each character other than
    ``a-z0-9.-`` replaced by ``-``, each dot-separated label trimmed to start and end
    alphanumeric (empty labels dropped), at most 253 characters; ``fallback`` when
    nothing is left (``"My_Host"`` -> ``"my-host"``)."""
    labels = (re.sub(r"[^a-z0-9-]", "-", label).strip("-")
              for label in text.lower().split("."))
    name = ".".join(label for label in labels if label)[:MAX_NAME].rstrip("-.")
    return name or fallback


async def sync_once(router: Router, store: LeaseStore) -> int:
    """Read every replica's record and feed the pools, then publish this replica's
    counts and (new) lambdas; returns the number of fresh peers. Raises what the API
    call raised (the pools keep what they absorbed)."""
    records = await asyncio.to_thread(store.read)
    peers = router.absorb_peers(records, store.replica, time.time(), time.monotonic())
    counts, lambdas = router.replica_counts()
    await asyncio.to_thread(store.publish, counts, lambdas, time.time())
    return peers


async def _share_forever(router: Router, store: LeaseStore, period_s: float,
                         on_peers: Any) -> None:
    failing = False
    while True:
        try:
            peers = await sync_once(router, store)
            on_peers(peers)
            if failing:
                log.info("sharing counts through Lease %s/%s works again",
                         store.namespace, store.replica)
            failing = False
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # API errors, network: keep routing on local counts
            if not failing:
                log.warning("cannot share counts through Lease %s/%s: %s; the PI loop "
                            "uses this replica's counts until it can", store.namespace,
                            store.replica, exc)
            failing = True
        await asyncio.sleep(period_s)


async def replica_sharing(app: web.Application) -> AsyncIterator[None]:
    """aiohttp cleanup context of the router service: the sharing loop (module doc)."""
    from joulepool.kube.watch import load_kube_config
    from joulepool.router.app import ROUTER

    svc = app[ROUTER]
    s = svc.settings
    if not s.cluster or s.replica_sync_seconds <= 0:
        yield
        return
    if svc.api_client is None:
        svc.api_client = load_kube_config(str(s.kubeconfig) if s.kubeconfig else None)
    store = LeaseStore(svc.api_client, s.plan_namespace(), replica_name(s.replica_name),
                       s.replica_ttl_seconds, s.replica_uid)
    app[STORE] = store
    task = asyncio.create_task(_share_forever(
        svc.router, store, s.replica_sync_seconds, svc.metrics.replica_peers.set))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
