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
binds (docs/marginal-energy.md).
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

    _heap: list[tuple[float, int, T]] = field(default_factory=list)
    _seq: itertools.count[int] = field(default_factory=itertools.count)

    def push(self, item: T, deadline_s: float, remaining_tokens: float, tps: float,
             start_by_s: float = math.inf) -> None:
        """Queue ``item``; ``start_by_s`` is when its prefill must start for the first
        token to meet the TTFT SLO (first-token deadline less its prefill time, s;
        inf: no first-token milestone, e.g. a request that has had its first token)."""
        key = deadline_s - remaining_tokens / tps  # laxity + now
        if start_by_s < key:
            key = start_by_s
        heapq.heappush(self._heap, (key, next(self._seq), item))

    def pop(self) -> T:
        if not self._heap:
            raise IndexError("pop from an empty LLF queue")
        return heapq.heappop(self._heap)[2]

    def peek(self) -> T:
        """The most urgent item, left in the queue."""
        if not self._heap:
            raise IndexError("peek into an empty LLF queue")
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
