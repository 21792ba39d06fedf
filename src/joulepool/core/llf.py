"""Least-laxity-first ordering (FREESH 2.2).

    deadline = arrival + k * (TTFT_slo + L_out / tps)
    laxity   = deadline - now - remaining_tokens / tps

For requests waiting on one engine, ``now`` is common to all and their
remaining tokens do not change while they wait, so ordering by
``deadline - remaining / tps`` is ordering by laxity: a heap keyed on it
gives O(log n) push and pop. Ties pop in arrival (push) order.

A request waiting for admission has two milestones, not one: its first token
by ``arrival + TTFT_slo`` and its last by the deadline. Its laxity is the
least of the two:

    laxity = min(first_token_by - now - prefill_s, deadline - now - remaining / tps)

Keyed on the last token only, a long response (a late deadline) waits behind
every shorter arrival and misses its TTFT although its deadline holds; the
queue order is what decides the first token (once admitted, every request
decodes at the batch's shared pace), so the first-token milestone usually
binds (docs/marginal-energy.md). Once a request's first-token milestone has
passed (``now`` later than it, given to :meth:`LLFQueue.peek` / ``pop``), it
cannot be met any more and the request is ordered by its last token alone:
deadline order would otherwise let every request that is already late delay
the ones that can still make it (the domino effect of earliest-deadline-first
under overload).
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


def llf_deadline(arrival_s: float, ttft_slo_s: float, output_tokens: float, tps: float,
                 k: float = 1.0) -> float:
    """Absolute deadline of a request, FREESH's form."""
    return arrival_s + k * (ttft_slo_s + output_tokens / tps)


def laxity(deadline_s: float, now_s: float, remaining_tokens: float, tps: float) -> float:
    """Time a request can still wait before it must run flat out to make its deadline."""
    return deadline_s - now_s - remaining_tokens / tps


@dataclass
class LLFQueue(Generic[T]):
    """Min-laxity priority queue with stable ties."""

    #: (key, push order, item, key once the first-token milestone has passed; NaN: none)
    _heap: list[tuple[float, int, T, float]] = field(default_factory=list)
    _seq: itertools.count[int] = field(default_factory=itertools.count)

    def push(self, item: T, deadline_s: float, remaining_tokens: float, tps: float,
             start_by_s: float = math.inf) -> None:
        """Queue ``item``; ``start_by_s`` is when its prefill must start for the first
        token to meet the TTFT SLO (first-token deadline less its prefill time, s;
        inf: no first-token milestone, e.g. a request that has had its first token)."""
        key = deadline_s - remaining_tokens / tps  # laxity + now
        if start_by_s < key:
            heapq.heappush(self._heap, (start_by_s, next(self._seq), item, key))
        else:
            heapq.heappush(self._heap, (key, next(self._seq), item, math.nan))

    def _demote_missed(self, now_s: float) -> None:
        """Re-key the head while its first-token milestone is past (by its last token)."""
        h = self._heap
        while h and h[0][0] < now_s and h[0][3] == h[0][3]:  # NaN: no milestone left
            _, seq, item, last = h[0]
            heapq.heapreplace(h, (last, seq, item, math.nan))

    def pop(self, now_s: float = -math.inf) -> T:
        """The most urgent item, taken out; with ``now_s``, first-token milestones
        already past no longer count."""
        if not self._heap:
            raise IndexError("pop from an empty LLF queue")
        self._demote_missed(now_s)
        return heapq.heappop(self._heap)[2]

    def peek(self, now_s: float = -math.inf) -> T:
        """The most urgent item, left in the queue (``now_s`` as for :meth:`pop`)."""
        if not self._heap:
            raise IndexError("peek into an empty LLF queue")
        self._demote_missed(now_s)
        return self._heap[0][2]

    def peek_laxity(self, now_s: float) -> float:
        """Laxity of the most urgent request at ``now_s``."""
        if not self._heap:
            raise IndexError("peek into an empty LLF queue")
        return self._heap[0][0] - now_s

    def __len__(self) -> int:
        return len(self._heap)

    def __bool__(self) -> bool:
        return bool(self._heap)
