"""One serving instance of the simulator and the routing columns of a pool of them.

An :class:`Instance` is one model replica on ``gpus`` GPUs of one node running
continuous batching (see :mod:`joulepool.sim.engine` for the model). Its
attributes are plain slots because the event loop reads them millions of
times per run; units are in the comments of :meth:`Instance.__init__`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from enum import IntEnum
from heapq import heappop, heappush
from typing import Any

from joulepool.core.llf import LLFQueue
from joulepool.core.routing import (
    endpoint_queue_tokens,
    marginal_decode_j_per_token,
    prefill_weight,
)
from joulepool.core.scoring import EndpointState, RoutingProfile
from joulepool.sim.tables import ProfileTable

INF = math.inf


class InstanceState(IntEnum):
    """Life cycle: PENDING (waiting for GPUs) -> ACTIVE -> DRAINING -> RETIRED."""

    ACTIVE = 0  #: holds its GPUs and takes new requests
    DRAINING = 1  #: holds its GPUs, finishes what it has, takes nothing new
    PENDING = 2  #: planned, waiting for its node's GPUs to be released
    RETIRED = 3  #: gone; its GPUs (if it had any) are free


ACTIVE = InstanceState.ACTIVE
DRAINING = InstanceState.DRAINING
PENDING = InstanceState.PENDING
RETIRED = InstanceState.RETIRED


class Instance:
    """One serving instance; plain attributes for speed in the event loop.

    Decoding requests all advance at one token per ``itl`` seconds, so the
    instance keeps a virtual token clock ``V`` (tokens generated per request so
    far) and a heap of (V at which the request finishes, request id).
    """

    __slots__ = (
        "V",
        "b",
        "busy_t",
        "ci",
        "cls",
        "energy",
        "eps",
        "eps_live",
        "gpu_ids",
        "gpus",
        "heap",
        "idx",
        "inv_cap",
        "itl",
        "itl_row",
        "last_t",
        "llf",
        "maxb",
        "mu",
        "n_out",
        "node",
        "nwait",
        "opb",
        "pf_e",
        "pf_pow",
        "pf_tok",
        "pf_w",
        "plog",
        "pool",
        "pos",
        "pow_row",
        "power",
        "prefill_end",
        "prefill_rid",
        "q_tok",
        "req_tps",
        "site",
        "state",
        "table",
        "tp_max",
        "tps_row",
        "tt_max",
        "version",
        "wait_in",
        "waiting",
        "xs",
    )

    def __init__(self, idx: int, table: ProfileTable, node: str, site: str, cls: int,
                 llf: bool, inv_cap: float, eps_live: bool,
                 plog: list[tuple[float, int, float]] | None = None) -> None:
        self.idx = idx
        self.inv_cap = inv_cap  # 1 / req/s it sustains (least-loaded's weight)
        self.eps_live = eps_live
        self.table = table
        self.node = node
        self.site = site
        self.cls = cls  # request class it serves (planner pools), else 0
        self.gpus = table.gpus
        self.gpu_ids: tuple[int, ...] = ()
        self.state = PENDING
        self.pool = -1
        self.pos = -1  # row in its pool's columns, -1 when in none
        self.maxb = table.max_batch
        self.b = 0  # requests decoding
        self.V = 0.0  # virtual token clock, tokens per decoding request
        self.last_t = 0.0  # s, when energy, V and busy time were last settled
        self.energy = 0.0  # J drawn since activation (all its GPUs)
        self.busy_t = 0.0  # s spent prefilling or decoding
        self.heap: list[tuple[float, int]] = []
        self.llf = llf
        self.waiting: Any = LLFQueue() if llf else deque()
        self.nwait = 0
        self.prefill_rid = -1  # request being prefilled, -1 for none
        self.prefill_end = INF
        self.version = 0  # bumps invalidate the instance's scheduled event
        self.n_out = 0  # requests routed here, unfinished
        self.q_tok = 0.0  # predicted decode tokens of the requests routed here, unfinished
        self.wait_in = 0.0  # prompt tokens of the requests waiting for admission
        self.tt_max = -1.0  # worst TTFT / SLO since the last MIAD step (-1: none)
        self.tp_max = -1.0  # worst TPOT / SLO since the last MIAD step (-1: none)
        self.plog = plog
        # b*_n of the marginal rule: requests it carries at once within the SLO (the
        # engine sets core.routing.sustainable_batch; the TPOT operating batch until then)
        self.opb = table.operating_batch[table.top]
        self.set_clock(table.top)
        self.power = self.pow_row[0]  # W, all its GPUs
        self.itl = 0.0  # s per token while decoding, 0 otherwise

    def set_clock(self, ci: int) -> None:
        """Run at ``table.clocks[ci]``: re-read every clocked table row."""
        t = self.table
        self.ci = ci
        self.itl_row = t.itl_s[ci]
        self.pow_row = t.power_w[ci]
        self.tps_row = t.tps[ci]
        self.pf_tok = t.prefill_s_per_token[ci]
        self.pf_pow = t.prefill_power_w[ci]
        op = t.operating_batch[ci]
        # core.routing's rule: mu_n = profiled tokens/s at the operating batch (largest
        # meeting TPOT) at the current clock; eps_n = profiled J/token at the operating
        # batch, at f_max unless asked to follow the clock (then the router chases MIAD's
        # down-clocked GPUs; see EngineParams); w_n converts prompt tokens to decode tokens
        self.mu = self.tps_row[op]
        # the marginal energy (core.routing): X(b) and pi at the current clock if asked
        # to follow it (then the router chases MIAD's down-clocked GPUs; see
        # EngineParams), else at f_max; eps_n follows the requests in flight
        ce = ci if self.eps_live else t.top
        self.xs = t.excess_step_j[ce]
        self.pf_e = t.prefill_excess_j[ce]
        self.eps = self.marginal_eps()
        self.pf_w = prefill_weight(self.mu, self.pf_tok)
        # LLF: a request is served at the per-request rate of the operating batch
        self.req_tps = 1.0 / self.itl_row[op]

    def marginal_eps(self) -> float:
        """eps_n: decode J per output token a request adds joining the ones in flight."""
        return marginal_decode_j_per_token(self.xs, self.n_out, self.opb)

    def settle(self, t: float) -> None:
        """Integrate energy, busy time and the token clock up to ``t`` (s)."""
        dt = t - self.last_t
        if dt > 0.0:
            self.energy += self.power * dt
            if self.itl > 0.0:
                self.V += dt / self.itl
                self.busy_t += dt
            elif self.prefill_rid >= 0:
                self.busy_t += dt
            self.last_t = t

    def retime(self, t: float, evq: list[tuple[float, int, int]]) -> None:
        """After a change at ``t``: draw and token interval for what it does now
        (prefill, decode or idle), and its next event (prefill end or next completion)
        pushed on ``evq``; any event pushed before is now stale (its version no longer
        matches)."""
        if self.prefill_rid >= 0:
            self.power = self.pf_pow
            self.itl = 0.0
        elif self.b > 0:
            self.power = self.pow_row[self.b]
            self.itl = self.itl_row[self.b]
        else:
            self.power = self.pow_row[0]
            self.itl = 0.0
        if self.plog is not None:
            self.plog.append((t, self.idx, self.power))
        self.version += 1
        if self.prefill_rid >= 0:
            heappush(evq, (self.prefill_end, self.idx, self.version))
        elif self.b > 0:
            heappush(evq, (t + (self.heap[0][0] - self.V) * self.itl, self.idx, self.version))

    def pop_finished(self) -> list[int]:
        """The decoding requests whose last token is due now (the token clock reached
        them), taken out of the batch."""
        rh = self.heap
        if rh[0][0] > self.V:
            self.V = rh[0][0]
        lim = self.V + 1e-7
        done = []
        while rh and rh[0][0] <= lim:
            done.append(heappop(rh)[1])
        self.b -= len(done)
        return done

    def enqueue(self, rid: int, input_tokens: float, predicted_tokens: float,
                llf_deadline_s: float) -> None:
        """Take request ``rid``, routed here, into the admission queue."""
        self.n_out += 1
        self.q_tok += predicted_tokens
        self.wait_in += input_tokens
        if self.llf:
            self.waiting.push(rid, llf_deadline_s, predicted_tokens, self.req_tps)
        else:
            self.waiting.append(rid)
        self.nwait += 1

    def admit_next(self, t: float, input_tokens: Sequence[float]) -> bool:
        """The admission rule, in this one place: if a request waits, nothing is
        prefilling and the batch has room, settle to ``t`` and start prefilling the next
        waiting request (FCFS or LLF order). Returns whether one was admitted."""
        if not self.nwait or self.prefill_rid >= 0 or self.b >= self.maxb:
            return False
        self.settle(t)  # a no-op when the caller settled at t already
        rid = self.waiting.pop() if self.llf else self.waiting.popleft()
        self.nwait -= 1
        self.wait_in -= input_tokens[rid]
        self.prefill_rid = rid
        self.prefill_end = t + self.pf_tok * input_tokens[rid]
        return True

    def change_clock(self, ci: int, t: float, evq: list[tuple[float, int, int]]) -> None:
        """Move to clock index ``ci`` at ``t``: a running prefill stretches or shrinks
        by the ratio of per-token prefill times; the next event is re-timed."""
        self.settle(t)
        old_pf = self.pf_tok
        self.set_clock(ci)
        if self.prefill_rid >= 0:
            self.prefill_end = t + (self.prefill_end - t) * self.pf_tok / old_pf
        self.retime(t, evq)


class Pool:
    """A pool's instances as core.scoring's endpoint columns, and its routing profile
    (core's plugins, the ones the routing service runs)."""

    __slots__ = ("backlog", "eps", "members", "mu", "out", "pf_e", "profile", "q", "room",
                 "state", "w")

    def __init__(self, members: list[Instance], profile: RoutingProfile) -> None:
        self.members = members
        self.profile = profile
        self.state = st = EndpointState(len(members))
        self.out = st.outstanding  # least-loaded: (out + 1) x inv_capacity
        self.q = st.queue_tokens  # q_n, decode tokens ahead
        self.mu = st.tps
        self.eps = st.eps_j_per_token
        self.pf_e = st.prefill_j_per_token
        self.backlog = st.prefill_backlog_s
        self.room = st.batch_room
        self.w = st.prefill_weight
        for pos, inst in enumerate(members):
            inst.pos = pos
            self.out[pos] = inst.n_out
            st.inv_capacity[pos] = inst.inv_cap
            self.set_rule(inst)

    def set_rule(self, inst: Instance) -> None:
        """eps_n, pi_n, mu_n, w_n and q_n of ``inst`` (after a clock change or a rebuild)."""
        pos = inst.pos
        self.eps[pos] = inst.marginal_eps()
        self.pf_e[pos] = inst.pf_e
        self.mu[pos] = inst.mu
        self.w[pos] = inst.pf_w
        self.q[pos] = endpoint_queue_tokens(inst.q_tok, inst.wait_in, inst.pf_w)
