"""Router replicas' counts through the API server: one ``coordination.k8s.io/v1`` Lease
per replica (the I/O of :mod:`core.replicas`; rationale in docs/routing.md).

Each replica owns the Lease named after it (its pod name) in its namespace:

* ``spec.holderIdentity`` the replica, ``spec.renewTime`` when it last published,
  ``spec.leaseDurationSeconds`` how long the record stays fresh without renewal;
* label ``app.kubernetes.io/component: router-replica`` (the replicas list each
  other by it);
* annotation ``joulepool.dev/router-counts``: JSON ``{"pools": {pool: {tier:
  {"completions": n, "misses": m}}}, "lambda": {pool: lambda}}``, cumulative since
  the replica started;
* an owner reference to the replica's Pod when its UID is known, so the Lease is
  garbage-collected with the Pod.

Through the kubernetes client's ``CoordinationV1Api``, synchronously: callers run
these in a thread. RBAC: ``leases`` ``list``, ``create`` and ``patch`` in the
namespace (the chart's router Role).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from joulepool.api.contract import (
    COMPONENT_LABEL,
    ROUTER_COUNTS_ANNOTATION,
    ROUTER_REPLICA_COMPONENT,
)
from joulepool.core.replicas import Counts, PoolTierCounts, ReplicaRecord

log = logging.getLogger(__name__)

#: largest annotation value written (the API server's limit is 256 KiB for all of them)
MAX_ANNOTATION_BYTES = 200_000


def encode_counts(counts: PoolTierCounts, lambdas: Mapping[str, float]) -> str:
    """The annotation's JSON text (pools sorted; non-finite lambdas left out)."""
    doc = {
        "pools": {
            pool: {tier: {"completions": c.completions, "misses": c.misses}
                   for tier, c in sorted(tiers.items())}
            for pool, tiers in sorted(counts.items())
        },
        "lambda": {p: lam for p, lam in sorted(lambdas.items()) if math.isfinite(lam)},
    }
    return json.dumps(doc, separators=(",", ":"))


def _count(x: Any) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise ValueError(f"a count must be a non-negative integer, not {x!r}")
    return x


def decode_counts(text: str) -> tuple[dict[str, dict[str, Counts]], dict[str, float]]:
    """The annotation's counts and lambdas; ValueError naming what is wrong."""
    doc = json.loads(text)
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    pools = doc.get("pools", {})
    lambdas = doc.get("lambda", {})
    if not isinstance(pools, dict) or not isinstance(lambdas, dict):
        raise ValueError("pools and lambda must be objects")
    counts: dict[str, dict[str, Counts]] = {}
    for pool, tiers in pools.items():
        if not isinstance(tiers, dict):
            raise ValueError(f"pools.{pool} must be an object")
        counts[pool] = {}
        for tier, c in tiers.items():
            if not isinstance(c, dict):
                raise ValueError(f"pools.{pool}.{tier} must be an object")
            counts[pool][tier] = Counts(_count(c.get("completions", 0)),
                                        _count(c.get("misses", 0)))
    lams: dict[str, float] = {}
    for pool, lam in lambdas.items():
        if isinstance(lam, bool) or not isinstance(lam, int | float) or not math.isfinite(lam):
            raise ValueError(f"lambda.{pool} must be a finite number")
        lams[pool] = float(lam)
    return counts, lams


def _timestamp(value: Any) -> float | None:
    if isinstance(value, datetime):
        dt = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return dt.timestamp()
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def record_of(lease: Any) -> ReplicaRecord | None:
    """The replica record a Lease (client model) carries; None when it carries none
    (no holder, renew time or annotation) or a malformed one (logged)."""
    meta, spec = lease.metadata, lease.spec
    text = (meta.annotations or {}).get(ROUTER_COUNTS_ANNOTATION) if meta else None
    if spec is None or not spec.holder_identity or text is None:
        return None
    renewed = _timestamp(spec.renew_time)
    if renewed is None or not spec.lease_duration_seconds:
        return None
    try:
        counts, lambdas = decode_counts(text)
    except ValueError as exc:
        log.warning("ignoring Lease %s: %s: %s", meta.name, ROUTER_COUNTS_ANNOTATION, exc)
        return None
    return ReplicaRecord(spec.holder_identity, renewed, float(spec.lease_duration_seconds),
                         counts, lambdas)


class LeaseStore:
    """Publishes this replica's Lease and reads every replica's, in ``namespace``."""

    def __init__(self, api_client: Any, namespace: str, replica: str,
                 ttl_s: float, pod_uid: str | None = None) -> None:
        from kubernetes import client

        self.api: Any = client.CoordinationV1Api(api_client)  # dict bodies, as JSON
        self.namespace = namespace
        self.replica = replica
        self.ttl_s = ttl_s
        self.pod_uid = pod_uid
        self._created = False

    def _body(self, counts: PoolTierCounts, lambdas: Mapping[str, float], now: float
              ) -> dict[str, Any]:
        text = encode_counts(counts, lambdas)
        if len(text) > MAX_ANNOTATION_BYTES:
            raise ValueError(f"replica counts are {len(text)} bytes, over "
                             f"{MAX_ANNOTATION_BYTES}: too many pools for one Lease")
        renew = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        meta: dict[str, Any] = {
            "name": self.replica,
            "labels": {COMPONENT_LABEL: ROUTER_REPLICA_COMPONENT},
            "annotations": {ROUTER_COUNTS_ANNOTATION: text},
        }
        if self.pod_uid:
            meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod",
                                        "name": self.replica, "uid": self.pod_uid}]
        return {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta,
            "spec": {"holderIdentity": self.replica, "renewTime": renew,
                     "leaseDurationSeconds": max(1, math.ceil(self.ttl_s))},
        }

    def publish(self, counts: PoolTierCounts, lambdas: Mapping[str, float], now: float
                ) -> None:
        """Create or renew this replica's Lease with its counts at ``now`` (wall s);
        the kubernetes client's ApiException on failure."""
        from kubernetes.client.exceptions import ApiException

        body = self._body(counts, lambdas, now)
        if not self._created:
            try:
                self.api.create_namespaced_lease(self.namespace, body)
                self._created = True
                return
            except ApiException as exc:
                if exc.status != 409:  # it exists (a restart with the same name): renew
                    raise
        try:
            self.api.patch_namespaced_lease(self.replica, self.namespace, body)
            self._created = True
        except ApiException as exc:
            if exc.status == 404:  # deleted under us: create it again next time
                self._created = False
            raise

    def read(self) -> list[ReplicaRecord]:
        """Every replica's record in the namespace (this one's too)."""
        leases = self.api.list_namespaced_lease(
            self.namespace, label_selector=f"{COMPONENT_LABEL}={ROUTER_REPLICA_COMPONENT}")
        return [r for r in (record_of(lease) for lease in leases.items) if r is not None]
