"""The serving Deployments: desired state in, server-side applies, deletes and scale-downs out.

One Deployment per (pool, serving mode, node) (:func:`.resources.desired_deployments`),
written with server-side apply as the operator's field manager, conflicts forced: a
Deployment that is absent is created, one whose replicas or template someone changed by
hand is put back. Which Deployments to write is decided from what the watch shows
(:class:`.resources.DeploymentInfo`) and what this process last wrote
(:class:`Written`), so a steady state costs no API call:

* desired, and this process last wrote something else to it (another spec hash, or a
  scale to 0): apply;
* desired and never written by this process: apply unless the live object already
  matches (after a restart);
* written, and the live object changed since (another ``resourceVersion``): apply only if
  it drifted (:func:`.resources.drifted`), which a status update never is;
* not desired: delete, except that while the plan in force is infeasible a live pool's
  Deployment is scaled to 0, never deleted (a feasible plan brings it back).

Failures are returned per pool (:class:`Outcome`), so the pool's status can say that the
API rejected its Deployment instead of claiming it is planned.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from joulepool.api.contract import POOL_LABEL
from joulepool.operator.kube import ApiError, KubeClient, patch_merge_retrying, path_for
from joulepool.operator.resources import (
    SCALED_DOWN,
    SPEC_HASH_ANNOTATION,
    DeploymentInfo,
    drifted,
    scale_down_patch,
)

log = logging.getLogger("joulepool.operator.deployments")

Key = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True)
class Written:
    """What this process last wrote to one Deployment."""

    pool: str
    spec_hash: str  # or SCALED_DOWN
    resource_version: str  # as the API answered the write ("" if unknown)


@dataclass
class Outcome:
    """What one pass of Deployment writes did."""

    created_or_applied: int = 0
    deleted: int = 0
    scaled_down: int = 0
    #: error per failed write, in order
    errors: list[str] = field(default_factory=list)
    #: pool key -> the API's answer to a failed write of one of its Deployments
    pool_errors: dict[str, str] = field(default_factory=dict)
    #: namespaces the API said are being deleted (nothing can be created there)
    terminating: set[str] = field(default_factory=set)

    def fail(self, pool: str | None, what: str, exc: ApiError) -> None:
        if exc.namespace_terminating and pool is not None:
            self.terminating.add(pool.split(".", 1)[0])
            return  # not an error: the pool is on its way out with its namespace
        self.errors.append(f"{what}: {exc}")
        if pool is not None:
            self.pool_errors.setdefault(pool, f"{what}: {exc}")


def _path(k: Key) -> str:
    return path_for("apps/v1", "deployments", k[0], k[1])


class DeploymentWriter:
    """Writes the serving Deployments; remembers what it wrote (one per operator process)."""

    def __init__(self, client: KubeClient) -> None:
        self.client = client
        self.written: dict[Key, Written] = {}

    def forget(self, k: Key) -> None:
        """The Deployment is gone (watch DELETED, or confirmed absent by a listing)."""
        self.written.pop(k, None)

    def pool_of(self, k: Key, existing: Mapping[Key, DeploymentInfo]) -> str | None:
        seen = existing.get(k)
        if seen is not None:
            return seen.pool
        written = self.written.get(k)
        return written.pool if written is not None else None

    # -- decisions ------------------------------------------------------------------------
    def needs_apply(self, k: Key, body: Mapping[str, Any], seen: DeploymentInfo | None) -> bool:
        """Apply ``body`` now? (see the module docstring)"""
        h = body["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
        replicas = int(body["spec"]["replicas"])
        written = self.written.get(k)
        if written is not None:
            if written.spec_hash != h:
                return True  # this process wrote something else (or scaled it to 0)
            if seen is None or seen.resource_version == written.resource_version:
                return False  # the watch has not caught up, or nothing changed since
        return seen is None or drifted(seen, h, replicas)

    def needs_scale_down(self, k: Key, seen: DeploymentInfo | None) -> bool:
        if seen is not None:
            return not (seen.replicas == 0 and seen.spec_hash == SCALED_DOWN)
        written = self.written.get(k)
        return written is None or written.spec_hash != SCALED_DOWN

    # -- one pass -------------------------------------------------------------------------
    async def reconcile(
        self, desired: Mapping[Key, dict[str, Any]], existing: Mapping[Key, DeploymentInfo],
        keep: Iterable[Key], sem: asyncio.Semaphore,
    ) -> Outcome:
        """Apply what differs, delete what is not desired (scale ``keep`` to 0 instead)."""
        out = Outcome()
        keep_set = set(keep)
        jobs: list[Awaitable[None]] = [
            self._apply(k, body, out, sem) for k, body in desired.items()
            if self.needs_apply(k, body, existing.get(k))]
        for k in sorted((set(existing) | set(self.written)) - set(desired)):
            if k not in keep_set:
                jobs.append(self._delete(k, self.pool_of(k, existing), out, sem))
            elif self.needs_scale_down(k, existing.get(k)):
                jobs.append(self._scale_down(k, self.pool_of(k, existing), out, sem))
        if jobs:
            await asyncio.gather(*jobs)
        return out

    async def _apply(self, k: Key, body: dict[str, Any], out: Outcome,
                     sem: asyncio.Semaphore) -> None:
        pool = body["metadata"]["labels"][POOL_LABEL]
        async with sem:
            try:
                result = await self.client.apply(_path(k), body)
            except ApiError as exc:
                out.fail(pool, f"Deployment {k[0]}/{k[1]}", exc)
                return
        rv = str(((result or {}).get("metadata") or {}).get("resourceVersion") or "")
        self.written[k] = Written(pool, body["metadata"]["annotations"][SPEC_HASH_ANNOTATION],
                                  rv)
        out.created_or_applied += 1

    async def _delete(self, k: Key, pool: str | None, out: Outcome,
                      sem: asyncio.Semaphore) -> None:
        async with sem:
            try:
                await self.client.delete(_path(k))
            except ApiError as exc:
                if not exc.not_found:
                    out.fail(pool, f"Deployment {k[0]}/{k[1]} (delete)", exc)
                    return
        self.forget(k)
        out.deleted += 1

    async def _scale_down(self, k: Key, pool: str | None, out: Outcome,
                          sem: asyncio.Semaphore) -> None:
        async with sem:
            try:
                result = await patch_merge_retrying(self.client, _path(k),
                                                    lambda _cur: scale_down_patch(), None)
            except ApiError as exc:
                if exc.not_found:  # already gone: nothing to keep
                    self.forget(k)
                else:
                    out.fail(pool, f"Deployment {k[0]}/{k[1]} (scale to 0)", exc)
                return
        rv = str(((result or {}).get("metadata") or {}).get("resourceVersion") or "")
        self.written[k] = Written(pool or "", SCALED_DOWN, rv)
        out.scaled_down += 1

    async def delete_pool(self, key: str, existing: Mapping[Key, DeploymentInfo]) -> None:
        """Delete every Deployment of one pool (finalizer path); 404 counts as done."""
        known = {k for k, d in existing.items() if d.pool == key}
        known |= {k for k, w in self.written.items() if w.pool == key}
        for k in sorted(known):
            try:
                await self.client.delete(_path(k))
            except ApiError as exc:
                if not exc.not_found:
                    raise
            self.forget(k)
