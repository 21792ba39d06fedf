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
from heapq import heapify, heappop, heappush
from typing import Any

from joulepool.core.batching import mixed_step, prefill_chunk_tokens
from joulepool.core.llf import LLFQueue
from joulepool.core.routing import (
    credibility_at,
    endpoint_queue_tokens,
    prefill_queue,
    prefill_weight,
    slot_load,
    slot_load_spread,
    slot_load_terms,
)
from joulepool.core.scoring import EndpointState, RoutingProfile
from joulepool.sim.candidates import CandidateIndex, Row
from joulepool.sim.tables import NEEDED, ProfileTable

INF = math.inf


class InstanceState(IntEnum):
    """Life cycle: PENDING (waiting for GPUs) -> [STARTING ->] ACTIVE -> DRAINING -> RETIRED."""

    ACTIVE = 0  #: holds its GPUs and takes new requests
    DRAINING = 1  #: holds its GPUs, finishes what it has, takes nothing new
    PENDING = 2  #: planned, waiting for its node's GPUs to be released
    RETIRED = 3  #: gone; its GPUs (if it had any) are free
    STARTING = 4  #: holds its GPUs, loads the model; takes no requests yet


ACTIVE = InstanceState.ACTIVE
DRAINING = InstanceState.DRAINING
PENDING = InstanceState.PENDING
RETIRED = InstanceState.RETIRED
STARTING = InstanceState.STARTING


class Instance:
    """One serving instance; plain attributes for speed in the event loop.

    Decoding requests all advance at one token per ``itl`` seconds, so the
    instance keeps a virtual token clock ``V`` (tokens generated per request so
    far) and a heap of (V at which the request finishes, request id).

    One request at a time is prefilled, in chunks mixed into the decode steps
    (vLLM's chunked prefill): each step carries the batch's decode tokens and
    ``min(budget - b, prompt)`` prompt tokens, so a step takes the decode step
    time plus the chunk's prefill time (docs/simulator.md). KV cache: the
    tokens held are ``kv_fixed + b * V`` (each decoding request's prefill
    length less the V it joined at, plus the prefilling request's whole
    prefill length, reserved at admission).
    """

    __slots__ = (
        "V",
        "b",
        "budget",
        "busy_t",
        "ce",
        "ci",
        "cls",
        "cw",
        "dec_end",
        "energy",
        "eps",
        "eps_k",
        "eps_live",
        "follows_load",
        "gpu_ids",
        "gpus",
        "heap",
        "idx",
        "inv_cap",
        "itl",
        "itl_count",
        "itl_row",
        "itl_sum",
        "kv_end",
        "kv_fixed",
        "kv_full",
        "kv_of",
        "kv_room",
        "last_t",
        "llf",
        "max_len",
        "maxb",
        "miad_itl_count",
        "miad_itl_sum",
        "miad_running",
        "mix_n",
        "mu",
        "n_out",
        "node",
        "nwait",
        "opb",
        "pf_e",
        "pf_left",
        "pf_len",
        "pf_pow",
        "pf_rate",
        "pf_tok",
        "pf_w",
        "plog",
        "pool",
        "pool_rooms",
        "pos",
        "pow_row",
        "power",
        "prefill_end",
        "prefill_rid",
        "q_tok",
        "req_tps",
        "room",
        "site",
        "sl_sq",
        "sl_sum",
        "start_s",
        "start_w",
        "state",
        "table",
        "tpot_batch",
        "tps_row",
        "tt_max",
        "tt_ring",
        "v_busy",
        "version",
        "wait_in",
        "waiting",
        "xs",
    )

    def __init__(self, idx: int, table: ProfileTable, node: str, site: str, cls: int,
                 llf: bool, inv_cap: float, eps_live: bool,
                 plog: list[tuple[float, int, float]] | None = None,
                 budget: int | None = None, kv_tokens: float = INF, max_len: float = INF,
                 start: tuple[float, float] = (0.0, 0.0),
                 follows_load: bool = False) -> None:
        self.idx = idx
        #: its clock follows its load (MIAD): the marginal energy reads X(b) at the clock
        #: each batch needs (ProfileTable.excess_needed_j), not at f_max
        self.follows_load = follows_load
        self.inv_cap = inv_cap  # 1 / req/s it sustains (least-loaded's weight)
        self.eps_live = eps_live
        self.table = table
        self.node = node
        self.site = site
        #: request classes it serves (planner pools; an index into the simulator's class
        #: sets, whose first few are the single classes), else 0
        self.cls = cls
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
        # the engine's inter-token-latency histogram's _sum (s) and _count: one gap per
        # decoding request and step (mixed prefill-and-decode steps included)
        self.itl_sum = 0.0
        self.itl_count = 0.0
        self.miad_itl_sum = 0.0  # itl_sum at the last MIAD step
        self.miad_itl_count = 0.0  # itl_count at the last MIAD step
        self.miad_running = 0  # requests running (vLLM's gauge) at the last MIAD step
        self.heap: list[tuple[float, int]] = []
        self.llf = llf
        self.waiting: Any = LLFQueue() if llf else deque()
        self.nwait = 0
        self.prefill_rid = -1  # request being prefilled, -1 for none
        self.prefill_end = INF  # s, when its last chunk is done (set by retime)
        self.pf_len = 0.0  # tokens the running prefill has in all
        self.pf_left = 0.0  # of which still to prefill
        self.pf_rate = 0.0  # prompt tokens per s at the current step
        self.budget = table.batched_tokens if budget is None else budget  # tokens per step
        self.dec_end = INF  # s, the next decode completion
        self.kv_end = INF  # s, when the KV cache fills before that completion
        self.kv_full = kv_tokens  # tokens of KV cache
        self.kv_room = kv_tokens * (1.0 - table.kv_watermark)  # admission limit
        self.kv_fixed = 0.0  # KV tokens held = kv_fixed + b * V
        self.kv_of: dict[int, float] = {}  # decoding request: its prefill length - V at join
        self.max_len = max_len  # longest prompt + output the engine takes, tokens
        self.start_s, self.start_w = start  # start-up: s, W of the instance
        self.version = 0  # bumps invalidate the instance's scheduled event
        self.n_out = 0  # requests routed here, unfinished
        self.q_tok = 0.0  # predicted decode tokens of the requests routed here, unfinished
        #: core.routing.slot_load of the requests routed here, unfinished: their sum and
        #: the sum of their squares (a member's credible slot load sizes its batch room)
        self.sl_sum = 0.0
        self.sl_sq = 0.0
        self.wait_in = 0.0  # prompt tokens of the requests waiting for admission
        self.v_busy = 0.0  # V by which the longest request in flight is done (predicted)
        self.tt_max = -1.0  # worst TTFT / SLO since the last MIAD step (-1: none)
        #: the worst TTFT / SLO of each of the last MIAD periods (the engine's TTFT window)
        self.tt_ring: deque[float] | None = None
        self.plog = plog
        # b*_n of the marginal rule: requests it carries at once within the SLO (the
        # engine sets core.routing.sustainable_batch; the TPOT operating batch until then)
        self.opb = table.operating_batch[table.top]
        #: requests it carries at once within the SLO at the slot load it is credited
        #: with (the engine sets core.routing.room_at_slot_load; b*_n until then): its
        #: batch room's limit, while eps_n stays at its pool's b*_n (:attr:`opb`)
        self.room = self.opb
        #: requests routed here and unfinished when its rooms were last set (-1: never)
        self.mix_n = -1
        #: (b*_n, TPOT batch) at its pool's stream (the engine sets them)
        self.pool_rooms: tuple[int, int] = (self.opb, self.opb)
        #: its site's carbon weight (core.routing.carbon_weights; 1: energy objective)
        self.cw = 1.0
        #: requests it carries within TPOT whatever the first token (the engine sets
        #: core.routing.sustainable_batch without TTFT; inf until then)
        self.tpot_batch = math.inf
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
        # EngineParams); else, when the clock follows the load (MIAD), X(b) at the clock
        # batch b needs and pi at f_max; else both at f_max. eps_n follows the requests
        # in flight
        ce = self.ce = ci if self.eps_live else (NEEDED if self.follows_load else t.top)
        self.xs = t.excess_row(ce)
        self.eps_k = t.marginal_eps_row(ce, self.opb)
        self.pf_e = t.prefill_excess_j[ci if self.eps_live else t.top]
        self.eps = self.marginal_eps()
        self.pf_w = prefill_weight(self.mu, self.pf_tok)
        # LLF: a request is served at the per-request rate of the operating batch
        self.req_tps = 1.0 / self.itl_row[op]

    def set_carry(self, batch: int) -> None:
        """b*_n = ``batch``: the requests it carries at once within the SLO (the engine's
        core.routing.sustainable_batch for its pool)."""
        self.opb = self.room = batch
        self.mix_n = -1  # its rooms are read afresh at its next sync
        self.eps_k = self.table.marginal_eps_row(self.ce, batch)

    def marginal_eps(self) -> float:
        """eps_n: decode J per output token a request adds joining the ones in flight
        (core.routing.marginal_decode_j_per_token, tabulated by requests in flight)."""
        row = self.eps_k
        k = self.n_out
        return row[k] if k < len(row) else row[-1]

    def v_at(self, t: float) -> float:
        """The token clock V at ``t`` (s), without settling."""
        return self.V + (t - self.last_t) / self.itl if self.itl > 0.0 else self.V

    def extend_busy(self, t: float, predicted_tokens: float) -> None:
        """A request routed here at ``t`` decodes ``predicted_tokens``: the busy period
        lasts at least that many steps more (the marginal energy's R_n)."""
        end = self.v_at(t) + predicted_tokens
        if self.n_out <= 1 or end > self.v_busy:
            self.v_busy = end

    def row(self, t: float) -> tuple[float, float, float, float, float, float, float, float,
                                      float, float, float, float]:
        """Its row of the pool's routing columns at ``t`` (sim.candidates.Row; the
        columns in :data:`ROW_COLUMNS`' order): eps_n, pi_n, X_n(1); R_n, the decode
        steps the requests in flight have left (the longest, as predicted when routed;
        0 when none is in flight); q_n, mu_n, w_n; core.routing.prefill_queue of this
        engine's exact queue (when a new prompt's prefill would start, and the step and
        chunk it would run at; the running prefill's end as of the last event, an
        over-estimate until the next); the prefill time per token; the batch room. The
        energy terms are weighed by its site's carbon weight :attr:`cw`."""
        # (v_at and marginal_eps written out: this runs after every change of load)
        n_out = self.n_out
        eps_k = self.eps_k
        left = 0.0
        if n_out:
            itl = self.itl
            left = self.v_busy - (self.V + (t - self.last_t) / itl if itl > 0.0 else self.V)
            if not left > 0.0:
                left = 0.0
        prefilling = self.prefill_rid >= 0
        q_tok, wait_in, pf_tok, pf_w = self.q_tok, self.wait_in, self.pf_tok, self.pf_w
        wait, step, chunk = prefill_queue(self.itl_row, pf_tok, self.budget,
                                          self.b + prefilling, self.nwait, wait_in,
                                          self.prefill_end - t if prefilling else 0.0,
                                          q_tok / n_out if n_out else 0.0)
        cw = self.cw  # marginal carbon on a carbon-objective cluster (x 1.0 otherwise)
        return ((eps_k[n_out] if n_out < len(eps_k) else eps_k[-1]) * cw, self.pf_e * cw,
                self.xs[1] * cw, left, endpoint_queue_tokens(q_tok, wait_in, pf_w), self.mu,
                pf_w, wait, step, chunk, pf_tok, self.room - n_out)

    def settle(self, t: float) -> None:
        """Integrate energy, busy time and the token clock up to ``t`` (s)."""
        dt = t - self.last_t
        if dt > 0.0:
            self.energy += self.power * dt
            if self.prefill_rid >= 0:
                self.pf_left -= dt * self.pf_rate
                self.busy_t += dt
                if self.itl > 0.0:
                    dv = dt / self.itl
                    self.V += dv
                    self.itl_sum += self.b * dt
                    self.itl_count += self.b * dv
            elif self.itl > 0.0:
                dv = dt / self.itl
                self.V += dv
                self.busy_t += dt
                self.itl_sum += self.b * dt
                self.itl_count += self.b * dv
            self.last_t = t

    def period_itl(self, t: float) -> tuple[float, float]:
        """(s, gaps): the increase since the last call, settled to ``t``, of the engine's
        inter-token-latency histogram's ``_sum`` and ``_count`` (each decoding request
        adds one gap of the step time per step, mixed prefill steps included): what the
        node agent reads between two scrapes (core.controllers.PeriodLatencies)."""
        self.settle(t)
        ds = self.itl_sum - self.miad_itl_sum
        dn = self.itl_count - self.miad_itl_count
        self.miad_itl_sum = self.itl_sum
        self.miad_itl_count = self.itl_count
        return ds, dn

    def retime(self, t: float, evq: list[tuple[float, int, int]]) -> None:
        """After a change at ``t``: draw and step time for what it does now (a mixed
        prefill-and-decode step, decode or idle), and its next event (prefill end, next
        completion or the KV cache full) pushed on ``evq``; any event pushed before is
        now stale (its version no longer matches).

        A mixed step carries ``b`` decode tokens and a prompt chunk of ``min(budget - b,
        prefill length)`` tokens (:func:`core.batching.prefill_chunk_tokens`); it takes
        the decode step time plus the chunk's prefill time and draws each part's power
        for its part of the step (:func:`core.batching.mixed_step`, the formula the
        serving model sizes instances with)."""
        b = self.b
        ev = INF
        if self.prefill_rid >= 0:
            chunk = prefill_chunk_tokens(self.budget, b, self.pf_len)
            if b:
                step, self.power = mixed_step(self.itl_row[b], self.pow_row[b], chunk,
                                              self.pf_tok, self.pf_pow)
                self.itl = step
            else:
                step, self.power = mixed_step(0.0, 0.0, chunk, self.pf_tok, self.pf_pow)
                self.itl = 0.0
            rate = self.pf_rate = chunk / step
            left = self.pf_left
            ev = self.prefill_end = t + left / rate if left > 0.0 else t
        elif b:
            self.power = self.pow_row[b]
            self.itl = self.itl_row[b]
        else:
            self.power = self.pow_row[0]
            self.itl = 0.0
        if self.plog is not None:
            self.plog.append((t, self.idx, self.power))
        self.version += 1
        if b:
            top = self.heap[0][0]
            # the KV cache fills before the next completion (and someone can be preempted)
            if self.kv_fixed + b * top > self.kv_full and (b > 1 or self.prefill_rid >= 0):
                full = (self.kv_full - self.kv_fixed) / b  # V at which it is full
                self.dec_end = INF
                kv_end = self.kv_end = t + (full - self.V) * self.itl if full > self.V else t
                if kv_end < ev:
                    ev = kv_end
            else:
                self.kv_end = INF
                dec_end = self.dec_end = t + (top - self.V) * self.itl
                if dec_end < ev:
                    ev = dec_end
        if ev < INF:
            heappush(evq, (ev, self.idx, self.version))

    def pop_finished(self) -> list[int]:
        """The decoding requests whose last token is due now (the token clock reached
        them), taken out of the batch."""
        rh = self.heap
        if rh[0][0] > self.V:
            self.V = rh[0][0]
        lim = self.V + 1e-7
        done = []
        kv_of = self.kv_of
        while rh and rh[0][0] <= lim:
            rid = heappop(rh)[1]
            done.append(rid)
            self.kv_fixed -= kv_of.pop(rid, 0.0)
        self.b -= len(done)
        return done

    def join(self, rid: int, prefill_len: float, remaining: float) -> None:
        """Request ``rid``'s prefill (``prefill_len`` tokens) ended with a token; it decodes
        ``remaining`` more tokens in the batch."""
        self.prefill_rid = -1
        self.kv_fixed -= self.V  # its KV: prefill_len + (V - V at join), counted in b * V
        self.kv_of[rid] = prefill_len - self.V
        heappush(self.heap, (self.V + remaining, rid))
        self.b += 1

    def drop_prefill(self) -> int:
        """Stop the running prefill (preempted or finished without decoding); frees its
        reserved KV. Returns its request."""
        rid = self.prefill_rid
        self.prefill_rid = -1
        self.kv_fixed -= self.pf_len
        return rid

    def drop_decoding(self, rid: int, prefill_len: float) -> float:
        """Take decoding request ``rid`` (its prefill was ``prefill_len`` tokens) out of
        the batch (preempted); frees its KV. Returns the decode tokens it generated
        (whole steps)."""
        rh = self.heap
        k = next(i for i, e in enumerate(rh) if e[1] == rid)
        rh[k] = rh[-1]
        rh.pop()
        heapify(rh)
        kv = self.kv_of.pop(rid)
        self.kv_fixed -= kv
        self.b -= 1
        return float(math.floor(self.V - (prefill_len - kv) + 1e-7))

    def latest_decoding(self) -> int:
        """The decoding request that joined last (vLLM preempts the last one it scheduled)."""
        kv_of = self.kv_of  # joined later = larger V at join; insertion order is join order
        return next(reversed(kv_of))

    def enqueue(self, rid: int, input_tokens: float, predicted_tokens: float,
                llf_deadline_s: float, first_token_by_s: float = INF) -> None:
        """Take request ``rid``, routed here, into the admission queue (LLF: by the least
        laxity of its first token, due by ``first_token_by_s``, and its last token)."""
        self.n_out += 1
        self.q_tok += predicted_tokens
        load = slot_load(input_tokens, predicted_tokens)
        self.sl_sum += load
        self.sl_sq += load * load
        self.wait_in += input_tokens
        if self.llf:
            self.waiting.push(rid, llf_deadline_s, predicted_tokens, self.req_tps,
                              first_token_by_s - input_tokens * self.pf_tok)
        else:
            self.waiting.append(rid)
        self.nwait += 1

    def admit_next(self, t: float, prefill_len: Sequence[float]) -> bool:
        """The admission rule, in this one place: if a request waits, nothing is
        prefilling, the batch has room and the KV cache has room for the head of the
        queue's ``prefill_len`` tokens (below the watermark), settle to ``t`` and start
        prefilling it (FCFS or LLF order; the head blocks the queue, as in vLLM).
        Returns whether one was admitted."""
        if not self.nwait or self.prefill_rid >= 0 or self.b >= self.maxb:
            return False
        if t > self.last_t:  # (the caller often settled at t already)
            self.settle(t)
        rid = self.waiting.peek(t) if self.llf else self.waiting[0]
        need = prefill_len[rid]
        if self.kv_fixed + self.b * self.V + need > self.kv_room:
            return False
        if self.llf:
            self.waiting.pop()
        else:
            self.waiting.popleft()
        self.nwait -= 1
        self.wait_in -= need
        self.prefill_rid = rid
        self.pf_len = self.pf_left = need
        self.kv_fixed += need
        self.prefill_end = t + self.pf_tok * need  # alone; retime re-times it in the batch
        return True

    def requeue(self, rid: int, prefill_len: float, llf_deadline_s: float,
                remaining_tokens: float, first_token_by_s: float = INF) -> None:
        """A preempted request goes back to the head of the queue (FCFS; by laxity with
        LLF) to prefill ``prefill_len`` tokens again."""
        if self.llf:
            self.waiting.push(rid, llf_deadline_s, remaining_tokens, self.req_tps,
                              first_token_by_s - prefill_len * self.pf_tok)
        else:
            self.waiting.appendleft(rid)
        self.nwait += 1
        self.wait_in += prefill_len

    def change_clock(self, ci: int, t: float, evq: list[tuple[float, int, int]]) -> None:
        """Move to clock index ``ci`` at ``t``: the step time, and with it the prefill's
        and the decode's progress rates, follow the new clock; the next event is
        re-timed."""
        self.settle(t)
        self.set_clock(ci)
        self.retime(t, evq)


#: EndpointState's columns in the order of a row (sim.candidates.Row)
ROW_COLUMNS = ("eps_j_per_token", "prefill_j_per_token", "wake_j_per_token",
               "batch_left_tokens", "queue_tokens", "tps", "prefill_weight", "prefill_wait_s",
               "prefill_step_s", "prefill_chunk_tokens", "prefill_s_per_token", "batch_room")


class Pool:
    """A pool's instances as core.scoring's endpoint columns, and its routing profile
    (core's plugins, the ones the routing service runs).

    With ``indexed`` (JouleSched routing) every row is put in a
    :class:`CandidateIndex`, which names the rule's first choice from a few rows, and
    the columns are written from it only when read (:attr:`state`): most requests
    never read them."""

    __slots__ = ("_state", "columns", "dirty", "guest_pos", "index", "members",
                 "mix", "mix_of", "mix_puts", "out", "profile", "spread")

    def __init__(self, members: list[Instance], profile: RoutingProfile,
                 indexed: bool = False, home: int | None = None,
                 shared_ttft: Sequence[float] | None = None) -> None:
        """``home``: the pool's index; a member whose ``pool`` is another one is a guest
        here (an instance shared by several classes' pools), whose row this pool keeps
        in :attr:`guest_pos` (its ``pos`` is its home pool's). None: every member's home.
        ``shared_ttft``: per member, the tightest TTFT SLO (s, on the scale of the
        requests' ``ttft_slo_s``) of the other classes it serves, inf where none (the
        ``shared_ttft_s`` column; None: all inf)."""
        self.members = members
        self.profile = profile
        #: instance idx -> row, for guest members (empty without shared instances)
        self.guest_pos: dict[int, int] = {}
        if indexed and not CandidateIndex.serves(profile):
            raise ValueError(f"routing profile {profile.name!r} is not the one the candidate "
                             "index answers for (JouleSched scorer, lowest-cost picker)")
        self.index = CandidateIndex() if indexed else None
        #: with ``index``: the rows not yet in the columns, each with its (outstanding,
        #: TPOT batch) as last synced, written to the columns with the row when read
        self.dirty: dict[int, tuple[int, float]] = {}
        self._state = st = EndpointState(len(members))
        self.out = st.outstanding  # least-loaded: (out + 1) x inv_capacity
        self.columns = tuple(getattr(st, name) for name in ROW_COLUMNS)
        #: core.routing.SlotLoadMoments' six sums over the members, and each member's
        #: terms in them (kept as members' loads change; summed afresh every
        #: len(members) changes so that rounding does not build up)
        self.mix: tuple[float, ...] = (0.0,) * 6
        self.mix_of = [(0.0,) * 6 for _ in members]
        self.mix_puts = 0
        for pos, inst in enumerate(members):
            if home is None or inst.pool == home:
                inst.pos = pos
            else:
                self.guest_pos[inst.idx] = pos
            st.inv_capacity[pos] = inst.inv_cap
            st.tpot_batch[pos] = inst.tpot_batch
            self.mix_of[pos] = slot_load_terms(inst.n_out, inst.sl_sum, inst.sl_sq)
        self._sum_mix()
        if shared_ttft is not None:
            st.shared_ttft_s[:] = shared_ttft
            if self.index is not None:
                self.index.shared_ttft = {pos: float(v) for pos, v in enumerate(shared_ttft)
                                          if v < math.inf}
        for inst in members:
            self.set_rule(inst)

    @property
    def state(self) -> EndpointState:
        """The columns, every row as last synced (:meth:`endpoints`)."""
        return self.endpoints()

    def endpoints(self) -> EndpointState:
        """The columns, every row as last synced."""
        if self.dirty:
            assert self.index is not None
            rows = self.index.rows
            columns, st = self.columns, self._state
            for pos, load in self.dirty.items():
                for column, value in zip(columns, rows[pos], strict=True):
                    column[pos] = value
                st.outstanding[pos], st.tpot_batch[pos] = load
            self.dirty.clear()
        return self._state

    def _sum_mix(self) -> None:
        """The six sums afresh from the members' terms."""
        mix_of = self.mix_of
        self.mix = (tuple(math.fsum(column) for column in zip(*mix_of, strict=True))
                    if mix_of else (0.0,) * 6)
        self.mix_puts = 0
        self.spread = slot_load_spread(*self.mix)

    def note_mix(self, inst: Instance) -> tuple[float, float]:
        """``inst``'s requests changed: its terms of the pool's slot-load sums. Returns
        the pool's :attr:`spread` (EPV, VHM) after the change."""
        pos = self.guest_pos.get(inst.idx, inst.pos) if self.guest_pos else inst.pos
        new = slot_load_terms(inst.n_out, inst.sl_sum, inst.sl_sq)
        mix_of = self.mix_of
        old = mix_of[pos]
        if new == old:
            return self.spread
        mix_of[pos] = new
        puts = self.mix_puts = self.mix_puts + 1
        if puts >= len(self.members):
            self._sum_mix()
            return self.spread
        # (each sum as ``sum += new - old``, the six written out: this runs per change of
        # a member's requests)
        m0, m1, m2, m3, m4, m5 = self.mix
        n0, n1, n2, n3, n4, n5 = new
        o0, o1, o2, o3, o4, o5 = old
        mix = self.mix = (m0 + (n0 - o0), m1 + (n1 - o1), m2 + (n2 - o2), m3 + (n3 - o3),
                          m4 + (n4 - o4), m5 + (n5 - o5))
        spread = self.spread = slot_load_spread(*mix)
        return spread

    def credibility(self, n: float) -> float:
        """core.routing.slot_load_credibility of a member holding ``n`` requests (the
        pool's spread kept by :meth:`note_mix`)."""
        epv, vhm = self.spread
        return credibility_at(n, epv, vhm)

    def set_rule(self, inst: Instance) -> None:
        """Every column of ``inst``'s row (after a clock change or a rebuild)."""
        self.sync(inst, inst.last_t)

    def sync_load(self, inst: Instance) -> None:
        """The outstanding requests of ``inst`` (all least-loaded reads)."""
        self.out[self.guest_pos.get(inst.idx, inst.pos) if self.guest_pos else inst.pos] = \
            inst.n_out

    def sync(self, inst: Instance, t: float) -> None:
        """Every column of ``inst``'s row at ``t`` (after its load or clock changed):
        outstanding requests, eps_n, pi_n, X_n(1), R_n, q_n, mu_n, w_n, the prefill
        queue, the prefill time per token and the batch room."""
        self.put(inst, inst.row(t))

    def put(self, inst: Instance, row: Row) -> None:
        """:meth:`sync` with ``inst``'s row already read (:meth:`Instance.row`): one read
        serves every pool the instance is a member of."""
        pos = self.guest_pos.get(inst.idx, inst.pos) if self.guest_pos else inst.pos
        n_out = inst.n_out
        tpot_batch = inst.tpot_batch  # sized at its mix
        index = self.index
        if index is not None:  # the columns are written when read (endpoints)
            index.put(pos, row, n_out, tpot_batch)
            self.dirty[pos] = (n_out, tpot_batch)
        else:
            self.out[pos] = n_out
            self._state.tpot_batch[pos] = tpot_batch
            for column, value in zip(self.columns, row, strict=True):
                column[pos] = value
