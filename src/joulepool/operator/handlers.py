"""kopf handlers: thin translations from watch events to indexes and plan triggers.

Module-level handlers in one :data:`registry` (several operators in one process share
it: the handlers keep no state), with their state in a typed memo
(:class:`OperatorMemo`, given to ``kopf.operator(memo=...)``; kopf hands every handler
a shallow copy, so all of them share the one planner).

Nothing here plans or writes status.  Indexes keep the in-memory view of pools, GPU
nodes, GPU profiles, the energy policy and the operator's own Deployments (kopf fills
them from the initial listings before any handler runs, so the first plan after a
restart sees the whole cluster); handlers post Events for bad input and call
:meth:`Planner.trigger`.  Every (re)listing (events of type ``None``) also asks the
planner to check for objects deleted while the watch was down (:mod:`.listings`).  The
one handler that waits is the InferencePool finalizer: it holds the pool until a plan
without it is published and its Deployments are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import kopf

from joulepool.api.contract import ENERGYPOLICIES, GPUPROFILES, INFERENCEPOOLS, POOL_LABEL
from joulepool.api.load import ResourceError
from joulepool.api.models import GROUP, VERSION
from joulepool.operator import events
from joulepool.operator.config import OperatorConfig
from joulepool.operator.listings import Indexed
from joulepool.operator.planning import POLICY_NAME, Planner
from joulepool.operator.resources import (
    MANAGED_BY,
    MANAGED_BY_LABEL,
    deployment_from_body,
    node_from_body,
    parse_policy,
    parse_pool,
    parse_profile,
    read_node,
)

log = logging.getLogger("joulepool.operator.handlers")

POOLS = (GROUP, VERSION, INFERENCEPOOLS)
PROFILES = (GROUP, VERSION, GPUPROFILES)
POLICIES = (GROUP, VERSION, ENERGYPOLICIES)
NODES = ("v1", "nodes")
DEPLOYMENTS = ("apps", "v1", "deployments")
OWNED: dict[str, Any] = {
    MANAGED_BY_LABEL: MANAGED_BY, POOL_LABEL: kopf.PRESENT}

#: how long the finalizer waits for a plan without the pool before kopf retries it
RELEASE_TIMEOUT_S = 120.0

#: the registry every handler below is registered in (``kopf.operator(registry=...)``)
registry = kopf.OperatorRegistry()


@dataclass
class OperatorMemo:
    """What the handlers share: the planner (and its client), the settings, the login
    arguments for a re-login, and the planning loop's task."""

    planner: Planner
    config: OperatorConfig
    login_kwargs: dict[str, Any] = field(default_factory=dict)
    planning_task: asyncio.Task[None] | None = None

    async def relogin(self) -> kopf.ConnectionInfo | None:
        """Log in again with the arguments of the last login (the client's 401 path)."""
        return await login_info(self.config, **self.login_kwargs)


# ---------------------------------------------------------------- login
async def login_info(config: OperatorConfig, **kwargs: Any) -> kopf.ConnectionInfo | None:
    """Credentials: the configured connection (tests), else the official client's view of
    the kubeconfig / service account, else kopf's own readers; None when there are none."""
    if config.connection is not None:
        return config.connection
    info: kopf.ConnectionInfo | None = None
    try:  # the official client understands every kubeconfig (exec plugins, OIDC, ...)
        info = await asyncio.to_thread(kopf.login_via_client, **kwargs)
    except Exception as exc:
        log.debug("login via the kubernetes client failed: %s", exc)
    if info is None:
        try:
            info = (kopf.login_with_service_account(**kwargs)
                    or kopf.login_with_kubeconfig(**kwargs))
        except (OSError, ValueError, KeyError) as exc:
            log.error("no Kubernetes credentials: not in a pod and no usable kubeconfig "
                      "(%s)", exc)
            return None
    return info


@kopf.on.login(registry=registry)
async def login(memo: OperatorMemo, **kwargs: Any) -> kopf.ConnectionInfo | None:
    info = await login_info(memo.config, **kwargs)
    if info is not None:
        memo.login_kwargs.clear()
        memo.login_kwargs.update(kwargs)
        memo.planner.client.set_connection(info)
    return info


# ---------------------------------------------------------------- lifecycle
@kopf.on.startup(registry=registry)
async def startup(memo: OperatorMemo, **kwargs: Any) -> None:
    sources = memo.planner.sources
    sources.pools = kwargs["jp_pools"]
    sources.nodes = kwargs["jp_nodes"]
    sources.profiles = kwargs["jp_profiles"]
    sources.policies = kwargs["jp_policies"]
    sources.deployments = kwargs["jp_deployments"]
    memo.planning_task = asyncio.get_running_loop().create_task(
        memo.planner.run(), name="joulepool planning loop")


@kopf.on.probe(id="planning", registry=registry)
async def planning_probe(memo: OperatorMemo, **_: Any) -> dict[str, Any]:
    """Part of kopf's liveness answer (``/healthz``); fails if the loop has died."""
    task, planner = memo.planning_task, memo.planner
    if task is not None and task.done():
        raise RuntimeError("the planning loop has stopped")
    published = planner.published
    return {"passes": planner.passes, "solves": planner.solves,
            "planVersion": published.version if published is not None else None,
            "lastPassOk": planner.last_report.ok}


@kopf.on.cleanup(registry=registry)
async def cleanup(memo: OperatorMemo, **_: Any) -> None:
    task = memo.planning_task
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await memo.planner.carbon.close()
    await memo.planner.client.close()


# ---------------------------------------------------------------- indexes
@kopf.index(*POOLS, id="jp_pools", registry=registry)
def jp_pools(body: kopf.Body, **_: Any) -> dict[str, Any]:
    entry = parse_pool(body)
    return {entry.key: Indexed.of(body, entry)}


@kopf.index(*NODES, id="jp_nodes", registry=registry)
def jp_nodes(body: kopf.Body, name: str, **_: Any) -> dict[str, Any]:
    return {name: Indexed.of(body, node_from_body(body))}  # None: not a GPU node


@kopf.index(*PROFILES, id="jp_profiles", registry=registry)
def jp_profiles(body: kopf.Body, name: str, **_: Any) -> dict[str, Any]:
    try:
        return {name: Indexed.of(body, parse_profile(body))}
    except ResourceError as exc:
        return {name: Indexed.of(body, exc)}


@kopf.index(*POLICIES, id="jp_policies", registry=registry)
def jp_policies(body: kopf.Body, name: str, **_: Any) -> dict[str, Any]:
    try:
        return {name: Indexed.of(body, (name, parse_policy(body)))}
    except ResourceError as exc:
        return {name: Indexed.of(body, (name, exc))}


@kopf.index(*DEPLOYMENTS, labels=OWNED, id="jp_deployments", registry=registry)
def jp_deployments(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> dict[Any, Any]:
    return {(namespace, name): Indexed.of(body, deployment_from_body(body))}


# ---------------------------------------------------------------- InferencePools
@kopf.on.resume(*POOLS, registry=registry)
@kopf.on.create(*POOLS, registry=registry)
@kopf.on.update(*POOLS, registry=registry)
async def pool_changed(body: kopf.Body, memo: OperatorMemo, **_: Any) -> None:
    entry = parse_pool(body)
    if not entry.valid:
        kopf.warn(body, reason="InvalidSpec", message=entry.error or "invalid spec")
    memo.planner.trigger(f"InferencePool {entry.key}")


@kopf.on.event(*POOLS, registry=registry)
async def pool_event(type: str | None, body: kopf.Body, memo: OperatorMemo, **_: Any) -> None:
    """Listing book-keeping; pools are planned from their create/update handlers, and
    when the prompt tail their node agents report (status) moves."""
    entry = parse_pool(body)
    _listing(memo, "pools", type, entry.key, body)
    if type != "DELETED" and memo.planner.observed_moved(entry):
        memo.planner.trigger(f"InferencePool {entry.key} observed prompt lengths")


@kopf.on.delete(*POOLS, registry=registry)
async def pool_deleted(body: kopf.Body, memo: OperatorMemo, **_: Any) -> None:
    """Hold the pool until a plan without it is published and its Deployments are gone."""
    planner, retry = memo.planner, memo.config.resync_after_error_seconds
    entry = parse_pool(body)
    ticket = planner.trigger(f"InferencePool {entry.key} deleted")
    try:
        ok = await planner.wait_for_pass(ticket, timeout=RELEASE_TIMEOUT_S)
    except TimeoutError:
        ok = False
    published = planner.published
    if not ok or (published is not None and entry.key in published.pools):
        raise kopf.TemporaryError("waiting for a plan without this pool to be published",
                                  delay=retry)
    try:
        await planner.delete_deployments_of(entry.key)
    except Exception as exc:
        raise kopf.TemporaryError(f"deleting Deployments: {exc}", delay=retry) from exc
    log.info("InferencePool %s released", entry.key)


# ---------------------------------------------------------------- other inputs
def _listing(memo: OperatorMemo, kind: str, type_: str | None, key: Hashable,
             body: kopf.Body) -> None:
    """Book-keeping common to every watched input: an event for ``key`` was seen; a
    ``None`` event means kopf is (re)listing ``kind``."""
    memo.planner.gone.seen(kind, key, str(body.get("metadata", {}).get("uid") or ""))
    if type_ is None:
        memo.planner.relisted(kind)


@kopf.on.event(*NODES, registry=registry)
async def node_event(type: str | None, body: kopf.Body, name: str, memo: OperatorMemo,
                     **_: Any) -> None:
    _listing(memo, "nodes", type, name, body)
    info, error = (None, None) if type == "DELETED" else read_node(body)
    if memo.planner.changed(("node", name), info if error is None else error):
        if error is not None:
            log.warning("Node %s: %s", name, error)
            await events.warn(memo.planner.client, body, "InvalidGPUQuantity", error)
        memo.planner.trigger(f"Node {name}")


@kopf.on.event(*PROFILES, registry=registry)
async def profile_event(type: str | None, body: kopf.Body, name: str, memo: OperatorMemo,
                        **_: Any) -> None:
    _listing(memo, "profiles", type, name, body)
    spec = None if type == "DELETED" else dict(body.get("spec") or {})
    # the node agents' measurements (status.measured) correct the profile too (feedback);
    # the operator's own status.conditions do not count, so its writes wake nothing
    measured = (body.get("status") or {}).get("measured") if spec is not None else None
    if not memo.planner.changed(("profile", name),
                                repr((spec, measured)) if spec is not None else None):
        return
    if spec is not None:
        try:
            parse_profile(body)
        except ResourceError as exc:
            await events.warn(memo.planner.client, body, "InvalidSpec",
                              f"{exc}; profile ignored")
    memo.planner.trigger(f"GPUProfile {name}")


@kopf.on.event(*POLICIES, registry=registry)
async def policy_event(type: str | None, body: kopf.Body, name: str, memo: OperatorMemo,
                       **_: Any) -> None:
    _listing(memo, "policies", type, name, body)
    spec = None if type == "DELETED" else dict(body.get("spec") or {})
    if not memo.planner.changed(("policy", name), repr(spec) if spec is not None else None):
        return
    if spec is not None and name != POLICY_NAME:
        await events.warn(memo.planner.client, body, "Ignored",
                          f"only the EnergyPolicy named {POLICY_NAME!r} is used")
        return
    if spec is not None:
        try:
            parse_policy(body)
        except ResourceError as exc:
            await events.warn(memo.planner.client, body, "InvalidSpec",
                              f"{exc}; keeping the last valid policy")
    memo.planner.trigger(f"EnergyPolicy {name}")


@kopf.on.event(*DEPLOYMENTS, labels=OWNED, registry=registry)
async def deployment_event(type: str | None, body: kopf.Body, namespace: str | None, name: str,
                           memo: OperatorMemo, **_: Any) -> None:
    namespace = namespace or ""
    _listing(memo, "deployments", type, (namespace, name), body)
    if type == "DELETED":
        memo.planner.forget_deployment(namespace, name)
        info = None
    else:
        d = deployment_from_body(body)
        info = (d.replicas, d.ready_replicas, d.spec_hash, d.foreign_spec)
    if memo.planner.changed(("deployment", namespace, name), info):
        memo.planner.trigger(f"Deployment {namespace}/{name}")
