"""Objects deleted while a watch was down: found by a fresh listing, dropped from the inputs.

After a watch ends with ``410 Gone`` kopf lists the resource again and resumes watching,
but it sends no DELETED event for what disappeared in between, and its indexes keep those
objects forever: a Deployment deleted in the gap would never be recreated, a Node deleted
in the gap would stay in the plan. Every (re)listing shows up in the event handlers as
events of type ``None``; on the first one the planner asks :class:`GoneObjects` to list
that resource itself and to mark the indexed keys the listing no longer has as gone.

A key is only marked if no event for it arrived between the start of the listing and its
answer (an object created meanwhile is not mistaken for a deleted one); any later event
that shows the object present clears the mark.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from joulepool.operator.kube import KubeClient, path_for

log = logging.getLogger("joulepool.operator.listings")


@dataclass(frozen=True)
class Listed:
    """One resource the planner reads from a kopf index, and how to list it."""

    kind: str  # the planner's name for it
    group_version: str
    plural: str
    namespaced: bool = False
    label_selector: str | None = None

    def key_of(self, item: Mapping[str, Any]) -> Hashable:
        meta = item.get("metadata") or {}
        if self.namespaced:
            return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
        return str(meta.get("name") or "")


class GoneObjects:
    """Index keys that a listing showed to be gone (per kind), and the listings pending."""

    def __init__(self) -> None:
        self.gone: dict[str, set[Hashable]] = {}
        self.pending: set[str] = set()
        self._seq: dict[tuple[str, Hashable], int] = {}
        #: counters for logs, tests and the chaos run
        self.listings = 0
        self.marked = 0

    def seen(self, kind: str, key: Hashable) -> None:
        """An event for ``key`` arrived (present, or DELETED: the index drops it anyway)."""
        self._seq[(kind, key)] = self._seq.get((kind, key), 0) + 1
        self.gone.get(kind, set()).discard(key)

    def relisted(self, kind: str) -> bool:
        """kopf is (re)listing ``kind``; True if a check was not already pending."""
        new = kind not in self.pending
        self.pending.add(kind)
        return new

    def skip(self, kind: str) -> frozenset[Hashable]:
        return frozenset(self.gone.get(kind, ()))

    async def check(
        self, client: KubeClient, listed: Listed, indexed: Iterable[Hashable],
        namespaces: Sequence[str] = (),
    ) -> set[Hashable]:
        """List ``listed`` (in ``namespaces``, or cluster-wide) and mark the ``indexed``
        keys it lacks as gone; returns the keys newly marked. Raises ApiError."""
        keys = set(indexed)
        before = {k: self._seq.get((listed.kind, k), 0) for k in keys}
        present: set[Hashable] = set()
        params = {"labelSelector": listed.label_selector} if listed.label_selector else None
        for ns in (namespaces if listed.namespaced and namespaces else [None]):
            doc = await client.request("GET", path_for(listed.group_version, listed.plural, ns),
                                       params=params)
            present |= {listed.key_of(i) for i in (doc or {}).get("items") or ()}
        self.listings += 1
        self.pending.discard(listed.kind)
        newly = {k for k in keys - present
                 if self._seq.get((listed.kind, k), 0) == before[k]
                 and k not in self.gone.get(listed.kind, set())}
        if newly:
            self.gone.setdefault(listed.kind, set()).update(newly)
            self.marked += len(newly)
            log.info("%s deleted while the watch was down: %s", listed.kind,
                     ", ".join(sorted(map(str, newly))))
        return newly
