"""Placements the extender has decided but the pod watch has not shown bound yet.

kube-scheduler binds asynchronously: it filters the next pod while the previous one's
binding is still in flight, and the extender learns of a binding only through its pod
watch. Counting bound pods alone, two pods of one pool can both be let onto the last GPU
of the pool's planned share on a node (the issue this module exists for: 3 and 4 instances
bound where the plan said 4 and 3). So the filter sends a pool pod to exactly one node and
reserves the pod's GPUs there; the reservation counts against the pool's (and mode's)
share until the watch shows the pod bound (its GPUs are then counted as held), the pod is
filtered again (a retry replaces it), the watch shows it deleted or terminating (it will
never bind: its replacement must get the place), or ``ttl_s`` passes (binding failed).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from joulepool.kube.state import ClusterState

#: seconds a reservation outlives a binding the watch never shows (failed bind, deleted pod)
DEFAULT_TTL_S = 30.0


@dataclass(frozen=True)
class Reservation:
    node: str
    pool: str
    mode: str | None
    gpus: int
    expires: float  #: monotonic seconds


class Reservations:
    """Reservations by pod key (``namespace/name``)."""

    def __init__(self, ttl_s: float = DEFAULT_TTL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self.by_pod: dict[str, Reservation] = {}

    def __len__(self) -> int:
        return len(self.by_pod)

    def prune(self, state: ClusterState) -> None:
        """Drop reservations of pods the cache shows bound (counted there now) or
        terminating, and expired ones. (Deleted pods are dropped by :meth:`drop`, which
        the extender hooks to the cache's pod removals.)"""
        if not self.by_pod:
            return
        now = self.clock()
        for key, r in list(self.by_pod.items()):
            rec = state.pods.get(key)
            if r.expires <= now or (rec is not None and (rec.node or rec.terminating)):
                del self.by_pod[key]

    def drop(self, pod_key: str) -> None:
        self.by_pod.pop(pod_key, None)

    def add(self, pod_key: str, node: str, pool: str, mode: str | None, gpus: int) -> None:
        self.by_pod[pod_key] = Reservation(node, pool, mode, gpus, self.clock() + self.ttl_s)

    def held(self, pool: str, mode: str | None) -> dict[str, int]:
        """GPUs reserved per node for ``pool`` (all modes when ``mode`` is None) or for
        its ``mode``."""
        out: dict[str, int] = {}
        for r in self.by_pod.values():
            if r.pool == pool and (mode is None or r.mode == mode):
                out[r.node] = out.get(r.node, 0) + r.gpus
        return out
