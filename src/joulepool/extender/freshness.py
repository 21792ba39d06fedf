"""Before filter refuses a node as full, check the pods that fill it still exist.

The extender counts a node's GPUs from its pod watch. kube-scheduler asks about a
replacement pod as soon as its own watch sees it, which can be before the
extender's watch delivers the deletion of the pod it replaces: the node then looks
full (or the pool's share there taken) only because of a pod the API server has
already deleted, and the replacement would wait for kube-scheduler's next retry
(seconds, up to its backoff) or be sent elsewhere.

So when filter refuses every candidate for its GPUs or for the plan's share while the
cache counts pods there, :class:`PodFreshness` lists the pods bound to those nodes from
the API server (a quorum read) and corrects the cache
(:meth:`joulepool.kube.state.ClusterState.confirm_pods`); the extender then filters
again. Bounded: at most ``max_nodes`` nodes per call; the same pod's question about the
same node read at most once per ``min_interval_s`` (kube-scheduler retries a refused pod
with backoff anyway); at most ``reads_per_second`` reads in all (a token bucket, so a
cluster that is really full costs the API server little); every read within
``timeout_s``. A read that fails, times out or is over budget changes nothing: the first
answer stands. The extender's ``--fresh-read-*`` settings set these limits; their
defaults are the ``DEFAULT_*`` constants here.

The limit is per pod rather than per node on purpose: a read made for another pod just
before the deletion must not stop the replacement's own read just after it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from joulepool.extender.metrics import Metrics
from joulepool.kube.state import ClusterState

log = logging.getLogger(__name__)

ListNodePods = Callable[[str], list[dict[str, Any]]]

#: default limits (the extender's settings ``fresh_read_*``, ``fresh_reads_per_second``)
DEFAULT_TIMEOUT_S = 2.0
DEFAULT_MIN_INTERVAL_S = 1.0
DEFAULT_MAX_NODES = 8
DEFAULT_READS_PER_SECOND = 10.0


class PodFreshness:
    """Re-reads the pods of nodes that look full; see the module docstring."""

    def __init__(self, state: ClusterState, list_node_pods: ListNodePods,
                 timeout_s: float = DEFAULT_TIMEOUT_S,
                 min_interval_s: float = DEFAULT_MIN_INTERVAL_S,
                 max_nodes: int = DEFAULT_MAX_NODES,
                 reads_per_second: float = DEFAULT_READS_PER_SECOND,
                 clock: Callable[[], float] = time.monotonic,
                 metrics: Metrics | None = None) -> None:
        self.state = state
        self.metrics = metrics
        self.list_node_pods = list_node_pods
        self.timeout_s = timeout_s
        self.min_interval_s = min_interval_s
        self.max_nodes = max_nodes
        self.clock = clock
        self.reads_per_second = reads_per_second
        self._tokens = reads_per_second
        self._refilled = clock()
        #: (pod key, node) -> when it was last read for that pod
        self._checked: dict[tuple[str, str], float] = {}
        #: reads done, and cache corrections they made (for tests and /metrics)
        self.reads = 0
        self.corrections = 0

    def due(self, pod: str, nodes: Iterable[str]) -> list[str]:
        """The nodes worth a read now for ``pod``: the cache counts GPU pods there and
        they were not read for this pod in the last ``min_interval_s``; at most
        ``max_nodes``, and no more than the read budget has left."""
        now = self.clock()
        self._tokens = min(self.reads_per_second, self._tokens
                           + (now - self._refilled) * self.reads_per_second)
        self._refilled = now
        out: list[str] = []
        for node in nodes:
            if len(out) >= min(self.max_nodes, int(self._tokens)):
                break
            if (self.state.used_gpus.get(node, 0) > 0 and now - self._checked.get(
                    (pod, node), -1e18) >= self.min_interval_s):
                out.append(node)
        return out

    async def refresh(self, pod: str, nodes: Iterable[str]) -> int:
        """Read the due ``nodes``' pods (for the pod keyed ``pod``) and correct the cache;
        returns the corrections."""
        due = self.due(pod, nodes)
        if not due:
            return 0
        now = self.clock()
        self._tokens -= len(due)
        if len(self._checked) > 4 * 4096:
            self._checked.clear()
        for node in due:
            self._checked[(pod, node)] = now
        seen = {node: self.state.pods_holding_gpus(node) for node in due}  # before the reads
        reads = [asyncio.to_thread(self.list_node_pods, node) for node in due]
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*reads, return_exceptions=True), self.timeout_s)
        except TimeoutError:
            log.warning("pod re-read of %s timed out after %.1fs", ", ".join(due),
                        self.timeout_s)
            self._count("failed", len(due))
            return 0
        fixed = 0
        for node, result in zip(due, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("pod re-read of node %s failed: %s", node, result)
                self._count("failed")
                continue
            self.reads += 1
            n = self.state.confirm_pods(seen[node], result)
            self._count("corrected" if n else "current")
            fixed += n
        if fixed:
            self.corrections += fixed
            log.info("the pod watch was behind on %s: %d pod(s) already deleted or "
                     "terminating", ", ".join(due), fixed)
        return fixed

    def _count(self, result: str, n: int = 1) -> None:
        if self.metrics is not None:
            self.metrics.fresh_reads.labels(result).inc(n)
