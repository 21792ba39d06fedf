"""The proxy's per-pool waiting room: least-laxity-first while every engine is full.

When every endpoint of a pool is at its limit (:func:`saturated`: the engine
reports requests waiting for admission, the router has a full batch in flight
there, or its KV cache is >= :data:`KV_CACHE_LIMIT` full), a new request would
only queue inside an engine, in the engine's order. The proxy holds it instead,
in core's least-laxity-first queue (:class:`joulepool.core.llf.LLFQueue`), and
lets the most urgent one go each time a request of the pool finishes (and on
the service's 1 s tick). Bulk requests are shed (429) while the pool is
saturated, before any interactive one waits; an interactive request is shed
when the room is full (``max_waiting``) or it waited ``max_wait_s``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

from joulepool.core.classes import Tier
from joulepool.core.llf import LLFQueue
from joulepool.core.router import PoolRouter
from joulepool.core.scoring import KVCacheFilter

#: an engine whose KV cache is this full takes no more requests (core's kv-cache filter)
KV_CACHE_LIMIT = KVCacheFilter.limit


def saturated(pool: PoolRouter) -> bool:
    """Every endpoint of the pool is at its limit: its engine reports requests waiting
    for admission or a KV cache >= KV_CACHE_LIMIT full, or the router has a full batch
    in flight there (where the serving profile gives the batch limit)."""
    if not pool.endpoints:
        return False
    full = pool.waiting > 0
    full |= (pool.max_batch > 1) & (pool.ledger_count >= pool.max_batch)
    full |= pool.state.kv_cache_usage >= KV_CACHE_LIMIT
    return bool(full.all())


class Shed(Exception):
    """The request is refused (HTTP 429) with this reason."""


@dataclass
class _Ticket:
    future: asyncio.Future[None]


@dataclass
class WaitingRoom:
    """Per-pool LLF queues of held requests."""

    max_waiting: int = 1000
    max_wait_s: float = 30.0
    queues: dict[str, LLFQueue[_Ticket]] = field(default_factory=dict)

    def waiting(self, pool: str) -> int:
        q = self.queues.get(pool)
        return len(q) if q is not None else 0

    async def enter(self, pool: PoolRouter, tier: Tier, deadline_s: float,
                    output_tokens: float, now: float) -> None:
        """Return when the request may be routed (at once unless the pool is saturated
        or others wait); Shed when it is refused. ``deadline_s``: from ``now``."""
        q = self.queues.get(pool.key)
        if not saturated(pool) and not q:
            return
        if tier is Tier.BULK:
            raise Shed(f"pool {pool.key!r} is saturated: bulk requests are shed first")
        if q is None:
            q = self.queues[pool.key] = LLFQueue()
        if len(q) >= self.max_waiting:
            raise Shed(f"pool {pool.key!r} is saturated and {len(q)} requests wait")
        tps = float(np.mean(pool.tps)) if len(pool.endpoints) else 0.0
        ticket = _Ticket(asyncio.get_running_loop().create_future())
        q.push(ticket, now + deadline_s, output_tokens, tps if tps > 0 else 1.0)
        self.release(pool)  # room already (others wait but the pool has a free slot)
        try:
            await asyncio.wait_for(asyncio.shield(ticket.future), self.max_wait_s)
        except TimeoutError:
            ticket.future.cancel()
            raise Shed(f"pool {pool.key!r} stayed saturated for {self.max_wait_s:g} s"
                       ) from None
        finally:
            if not ticket.future.done():  # the client went away: skip its ticket
                ticket.future.cancel()

    def release(self, pool: PoolRouter) -> None:
        """Let waiting requests go, most urgent first, while the pool has room."""
        q = self.queues.get(pool.key)
        while q and not saturated(pool):
            ticket = q.pop()
            if not ticket.future.done():
                ticket.future.set_result(None)
                return  # one at a time: it is routed before the next check

    def release_all(self, pools: dict[str, PoolRouter]) -> None:
        for key, q in list(self.queues.items()):
            if not q:
                del self.queues[key]
            elif key in pools:
                self.release(pools[key])
