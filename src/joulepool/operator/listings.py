"""Objects deleted while a watch was down: found by a fresh listing, dropped from the inputs.

After a watch ends with ``410 Gone`` kopf lists the resource again and resumes watching,
but it sends no DELETED event for what disappeared in between, and its indexes keep those
objects forever: a Deployment deleted in the gap would never be recreated, a Node deleted
in the gap would stay in the plan. Every (re)listing shows up in the event handlers as
events of type ``None``; on the first one the planner asks :class:`GoneObjects` to list
that resource itself and to mark the indexed keys the listing no longer has as gone.

The index values are :class:`Indexed` (the object's uid and resourceVersion with the
value), and marks are by uid: an object recreated under the same name is a new uid, and
where kopf's index holds both the vanished object and its successor under one key,
:func:`current_values` serves the newest that is not gone. An object is only marked if no
event for its key arrived between the start of the listing and its answer (an object
created meanwhile is not mistaken for a deleted one); an event for its uid clears it.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

from joulepool.operator.kube import KubeClient, path_for

log = logging.getLogger("joulepool.operator.listings")


@dataclass(frozen=True)
class Indexed:
    """A kopf index value with the identity of the object it came from."""

    uid: str
    resource_version: str
    value: Any

    @classmethod
    def of(cls, body: Mapping[str, Any], value: Any) -> Indexed:
        meta = body.get("metadata") or {}
        return cls(str(meta.get("uid") or ""), str(meta.get("resourceVersion") or ""), value)


def _rv_order(item: Indexed) -> tuple[int, str]:
    rv = item.resource_version
    return (int(rv), rv) if rv.isdigit() else (-1, rv)


def current_values(
    index: Mapping[Any, Iterable[Any]] | None, gone: AbstractSet[str] = frozenset(),
) -> Iterator[Any]:
    """Every value of a kopf index (key -> store of values), one per key for
    :class:`Indexed` values (the newest whose uid is not ``gone``); None values skipped.
    Plain values (tests feed the planner plain mappings) are passed through."""
    if index is None:
        return
    for store in list(index.values()):
        values = list(store)
        wrapped = [v for v in values if isinstance(v, Indexed) and v.uid not in gone]
        plain = [v for v in values if not isinstance(v, Indexed)]
        if wrapped:
            plain.append(max(wrapped, key=_rv_order).value)
        yield from (v for v in plain if v is not None)


@dataclass(frozen=True)
class Listed:
    """One resource the planner reads from a kopf index, and how to list it."""

    kind: str  # the planner's name for it
    group_version: str
    plural: str
    namespaced: bool = False
    label_selector: str | None = None


class GoneObjects:
    """Uids that a listing showed to be gone (per kind), and the listings pending."""

    def __init__(self) -> None:
        self.gone: dict[str, set[str]] = {}
        self.pending: set[str] = set()
        self._seq: dict[tuple[str, Hashable], int] = {}
        #: counters for logs, tests and the chaos run
        self.listings = 0
        self.marked = 0

    def seen(self, kind: str, key: Hashable, uid: str = "") -> None:
        """An event for ``key`` (object ``uid``) arrived."""
        self._seq[(kind, key)] = self._seq.get((kind, key), 0) + 1
        self.gone.get(kind, set()).discard(uid)

    def relisted(self, kind: str) -> bool:
        """kopf is (re)listing ``kind``; True if a check was not already pending."""
        new = kind not in self.pending
        self.pending.add(kind)
        return new

    def skip(self, kind: str) -> frozenset[str]:
        return frozenset(self.gone.get(kind, ()))

    async def check(
        self, client: KubeClient, listed: Listed, index: Mapping[Any, Iterable[Any]] | None,
        namespaces: Sequence[str] = (),
    ) -> set[Hashable]:
        """List ``listed`` (in ``namespaces``, or cluster-wide) and mark the objects of
        ``index`` the listing lacks as gone; returns the keys of the objects newly marked.
        Raises ApiError."""
        entries = [(k, v.uid) for k, store in list((index or {}).items()) for v in list(store)
                   if isinstance(v, Indexed)]
        before = {k: self._seq.get((listed.kind, k), 0) for k, _uid in entries}
        present: set[str] = set()
        params = {"labelSelector": listed.label_selector} if listed.label_selector else None
        for ns in (namespaces if listed.namespaced and namespaces else [None]):
            doc = await client.request("GET", path_for(listed.group_version, listed.plural, ns),
                                       params=params)
            present |= {str((i.get("metadata") or {}).get("uid") or "")
                        for i in (doc or {}).get("items") or ()}
        self.listings += 1
        self.pending.discard(listed.kind)
        gone = self.gone.setdefault(listed.kind, set())
        newly = {(k, uid) for k, uid in entries if uid not in present and uid not in gone
                 and self._seq.get((listed.kind, k), 0) == before[k]}
        if newly:
            gone.update(uid for _k, uid in newly)
            self.marked += len(newly)
            log.info("%s deleted while the watch was down: %s", listed.kind,
                     ", ".join(sorted(str(k) for k, _uid in newly)))
        return {k for k, _uid in newly}
