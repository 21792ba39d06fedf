"""Publishing the online J/token estimate to ``GPUProfile`` status, at a bounded rate.

``GPUProfile`` is cluster scoped and one per GPU product x served model (x TP
degree); its ``status.measured`` holds one :class:`MeasuredProfile` per node.
Each agent replaces only its own node's entry, with the object's
``resourceVersion`` so concurrent agents cannot overwrite each other (a 409
is retried at the next opportunity). Entries of nodes that stopped
reporting are dropped after a while and the list is capped, so the object
does not grow with every node that ever served the model. The matching
profile is LISTed once, then read by name.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from joulepool.api.contract import GPUPROFILES, INFERENCEPOOLS
from joulepool.api.models import (
    GROUP,
    OBSERVED_MAX_AGE_S,
    VERSION,
    MeasuredProfile,
    ObservedPromptLengths,
)
from joulepool.core.profiles import product_for_label
from joulepool.nodeagent.background import API_TIMEOUT

log = logging.getLogger("joulepool.nodeagent.publisher")

PLURAL = GPUPROFILES


@dataclass(frozen=True)
class Measurement:
    product: str  # core product name, e.g. H100
    model: str
    gpus: int | None  # GPUs per instance, when known
    joules_per_token: float
    samples: int
    node: str
    #: operating point of the estimate (core.feedback): instance tokens/s, SM clock MHz
    tokens_per_second: float | None = None
    clock_mhz: float | None = None


class ProfilePublisher(Protocol):
    def publish(self, m: Measurement) -> bool:
        """Write one measurement; True if a GPUProfile was updated."""
        ...


class RateLimited:
    """At most one publication per (product, model, gpus) every ``min_interval_s``."""

    def __init__(self, inner: ProfilePublisher, min_interval_s: float = 60.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.inner = inner
        self.min_interval_s = min_interval_s
        self.monotonic = monotonic
        self._last: dict[tuple[str, str, int | None], float] = {}

    def due(self, m: Measurement) -> bool:
        last = self._last.get((m.product, m.model, m.gpus))
        return last is None or self.monotonic() - last >= self.min_interval_s

    def publish(self, m: Measurement) -> bool:
        if not self.due(m):
            return False
        self._last[(m.product, m.model, m.gpus)] = self.monotonic()
        return self.inner.publish(m)


Key = tuple[str, str, int | None]


def _gpus_of(obj: dict[str, Any]) -> int:
    try:
        return int((obj.get("spec") or {}).get("gpus", 1))
    except (TypeError, ValueError):
        return 1


def _matches(obj: dict[str, Any], m: Measurement) -> bool:
    spec = obj.get("spec") or {}
    product = product_for_label(str(spec.get("product", "")))
    if (product.name if product else spec.get("product")) != m.product:
        return False
    return bool(spec.get("model") == m.model)


def _updated_at(entry: dict[str, Any]) -> datetime | None:
    raw = entry.get("updatedAt")
    if isinstance(raw, datetime):
        t = raw
    elif isinstance(raw, str) and raw:
        try:
            t = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            return None
    else:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def merge_node_entry(existing: list[dict[str, Any]], entry: dict[str, Any], node: str,
                     now: datetime, max_age_s: float, max_entries: int) -> list[dict[str, Any]]:
    """A status list of per-node entries with ``node``'s replaced by ``entry``: other
    nodes' entries older than ``max_age_s`` dropped, at most ``max_entries`` (the
    freshest), ordered by node."""
    kept: list[tuple[datetime | None, dict[str, Any]]] = []
    for e in existing:
        if not isinstance(e, dict) or e.get("node") == node:
            continue
        t = _updated_at(e)
        if t is not None and (now - t).total_seconds() > max_age_s:
            continue  # a node that stopped reporting
        kept.append((t, e))
    # the freshest first (no timestamp: oldest), ours always in
    kept.sort(key=lambda te: te[0].timestamp() if te[0] else float("-inf"), reverse=True)
    merged = [entry, *(e for _, e in kept[: max_entries - 1])]
    merged.sort(key=lambda e: str(e.get("node", "")))
    return merged


class KubeProfilePublisher:
    """Patches ``status.measured`` of the matching GPUProfile via CustomObjectsApi.

    The matching profile is found by LIST once per (product, model, gpus) and
    then read by name (GET). Entries of other nodes not updated for
    ``max_age_s`` (nodes gone, agents stopped) are dropped, and the list is
    capped at ``max_entries`` (the freshest kept), so the object stays small.
    """

    def __init__(self, api: Any | None = None,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC),
                 max_age_s: float = 600.0, max_entries: int = 64) -> None:
        if max_age_s <= 0 or max_entries < 1:
            raise ValueError("max_age_s must be > 0 and max_entries >= 1")
        self._api = api
        self.now = now
        self.max_age_s = max_age_s
        self.max_entries = max_entries
        self._names: dict[Key, tuple[str, bool]] = {}  # key -> (name, matched gpus exactly)
        self._said_no_match: set[Key] = set()

    @property
    def api(self) -> Any:
        if self._api is None:
            from kubernetes import client

            self._api = client.CustomObjectsApi()
        return self._api

    def _by_name(self, key: Key, m: Measurement) -> dict[str, Any] | None:
        """The cached match, read by name; None (and forgotten) if gone or changed."""
        name, exact = self._names[key]
        try:
            obj = self.api.get_cluster_custom_object(GROUP, VERSION, PLURAL, name,
                                                     _request_timeout=API_TIMEOUT)
        except Exception as exc:
            if getattr(exc, "status", None) != 404:
                raise
            obj = None
        if not isinstance(obj, dict) or not _matches(obj, m) or (
                exact and m.gpus is not None and _gpus_of(obj) != m.gpus):
            del self._names[key]
            return None
        return obj

    def _matching(self, m: Measurement) -> dict[str, Any] | None:
        key: Key = (m.product, m.model, m.gpus)
        if key in self._names:
            obj = self._by_name(key, m)
            if obj is not None:
                return obj
        items = self.api.list_cluster_custom_object(
            GROUP, VERSION, PLURAL, _request_timeout=API_TIMEOUT).get("items", [])
        candidates = [o for o in items if _matches(o, m)]
        found: dict[str, Any] | None = None
        exact = False
        if m.gpus is not None:
            same = [o for o in candidates if _gpus_of(o) == m.gpus]
            if same:
                found, exact = same[0], True
        if found is None and len(candidates) == 1:
            found = candidates[0]
        if found is not None:
            name = (found.get("metadata") or {}).get("name")
            if name:
                self._names[key] = (str(name), exact)
        return found

    def _merge(self, existing: list[dict[str, Any]], entry: dict[str, Any],
               node: str) -> list[dict[str, Any]]:
        return merge_node_entry(existing, entry, node, self.now(), self.max_age_s,
                                self.max_entries)

    def publish(self, m: Measurement) -> bool:
        obj = self._matching(m)
        key: Key = (m.product, m.model, m.gpus)
        if obj is None:
            if key not in self._said_no_match:
                self._said_no_match.add(key)
                gpus = f", spec.gpus: {m.gpus}" if m.gpus is not None else ""
                log.info(
                    "no GPUProfile matches product %s, model %s%s: this node's J/token "
                    "estimate for it will not be published. To publish it, create a "
                    "GPUProfile (apiVersion joulepool.dev/v1alpha1) with spec.product: %s, "
                    "spec.model: %s%s and the profile fields (see `kubectl explain "
                    "gpuprofile.spec`); the agent picks it up at the next publication.",
                    m.product, m.model, f" ({m.gpus} GPU(s) per instance)" if m.gpus else "",
                    m.product, m.model, gpus)
            return False
        self._said_no_match.discard(key)
        entry = MeasuredProfile.model_validate({
            "joulesPerToken": m.joules_per_token, "samples": m.samples, "node": m.node,
            "updatedAt": self.now(), "tokensPerSecond": m.tokens_per_second,
            "clockMHz": m.clock_mhz,
        }).model_dump(mode="json", by_alias=True, exclude_none=True)
        measured = self._merge((obj.get("status") or {}).get("measured") or [], entry, m.node)
        meta = obj.get("metadata") or {}
        body = {"metadata": {"resourceVersion": meta.get("resourceVersion")},
                "status": {"measured": measured}}
        self.api.patch_cluster_custom_object_status(GROUP, VERSION, PLURAL, meta["name"], body,
                                                    _request_timeout=API_TIMEOUT)
        return True


@dataclass(frozen=True)
class PromptCounts:
    """The prompt lengths this node's engines of one pool served: their prompt-length
    histograms summed (cumulative, since each engine started)."""

    pool: str  # pool key, namespace.name
    node: str
    bounds: tuple[float, ...]  # finite bucket upper bounds, tokens
    counts: tuple[float, ...]  # cumulative per bound, then the total


class PoolPromptPublisher:
    """Replaces this node's entry in ``status.observedInputTokens`` of the pool, at most
    once per ``min_interval_s`` per pool, with the object's ``resourceVersion`` (a 409 is
    retried at the next opportunity), as :class:`KubeProfilePublisher` does for
    GPUProfiles; other nodes' entries older than ``max_age_s`` are dropped and the list
    is capped. The operator plans with them (docs/planner.md, "Prompt-length tail").
    The interval is at most a third of ``max_age_s`` (default: the operator's
    ``OBSERVED_MAX_AGE_S``), so a node's entry stays fresh across a missed write
    whatever ``--publish-interval`` the GPUProfile updates use."""

    def __init__(self, api: Any | None = None,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC),
                 min_interval_s: float = 60.0, max_age_s: float = OBSERVED_MAX_AGE_S,
                 max_entries: int = 64,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._api = api
        self.now = now
        self.min_interval_s = min(min_interval_s, max_age_s / 3.0)
        self.monotonic = monotonic
        self.max_age_s = max_age_s
        self.max_entries = max_entries
        self._last: dict[str, float] = {}

    @property
    def api(self) -> Any:
        if self._api is None:
            from kubernetes import client

            self._api = client.CustomObjectsApi()
        return self._api

    def due(self, pool: str) -> bool:
        """Whether ``pool``'s entry may be written now (``min_interval_s`` since the last)."""
        last = self._last.get(pool)
        return last is None or self.monotonic() - last >= self.min_interval_s

    def publish(self, c: PromptCounts) -> bool:
        """Write one pool's entry when due; True if the pool's status was updated. A pool
        that does not exist (404) is skipped."""
        if not self.due(c.pool):
            return False
        now_s = self.monotonic()
        # pools whose interval is over need no memory (pools this node no longer serves)
        for pool in [p for p, t in self._last.items() if now_s - t >= self.min_interval_s]:
            del self._last[pool]
        self._last[c.pool] = now_s
        namespace, name = c.pool.split(".", 1)
        try:
            obj = self.api.get_namespaced_custom_object(
                GROUP, VERSION, namespace, INFERENCEPOOLS, name, _request_timeout=API_TIMEOUT)
        except Exception as exc:
            if getattr(exc, "status", None) == 404:
                return False
            raise
        entry = ObservedPromptLengths.model_validate({
            "node": c.node, "bounds": list(c.bounds), "counts": list(c.counts),
            "updatedAt": self.now()}).model_dump(mode="json", by_alias=True, exclude_none=True)
        observed = merge_node_entry(
            (obj.get("status") or {}).get("observedInputTokens") or [], entry, c.node,
            self.now(), self.max_age_s, self.max_entries)
        meta = obj.get("metadata") or {}
        body = {"metadata": {"resourceVersion": meta.get("resourceVersion")},
                "status": {"observedInputTokens": observed}}
        self.api.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, INFERENCEPOOLS, name, body, _request_timeout=API_TIMEOUT)
        return True
