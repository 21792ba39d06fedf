"""The JouleSched rule's first choice in a pool without scoring every endpoint.

The rule (``core/routing.py``) scores a request on every endpoint of its pool and
takes, among the endpoints predicted to keep the SLO, the lowest cost, then the
lowest ETA, then the lowest index. Scoring 320 endpoints per request is numpy's
fixed cost per call many times over, most of a run's time (docs/simulator.md,
"Speed"). Yet a cost is at least its energy term, and the energy term of the
endpoints that share eps_n, X_n(1) and pi_n has one lower bound per request
(:func:`core.routing.marginal_energy_floor`). So :class:`CandidateIndex` keeps the
pool's rows grouped by those three numbers and, for a request, scores the groups
one endpoint at a time (core's scalar forms of the rule, bit for bit the vectorised
numbers) from the lowest bound up, and stops at the first group whose bound is
above the best cost found: no endpoint left can win or tie.

Two more facts keep the work small. Endpoints with no room in their batch are late
for every request (:func:`core.routing.slo_infeasible`) and are not indexed.
Endpoints whose rows are equal (idle instances of one type at one clock) score
equally, so only the lowest index among them is scored. (Rows of endpoints with work
queued or in flight practically never repeat: they are kept by position, which
spares hashing twelve floats twice per row written. Which rows are merged only
changes how many are scored, never the answer: ties go to the lowest index.)

When no endpoint keeps the SLO the rule takes the soonest first token among the
least overloaded endpoints (:func:`core.routing.overflow_rank`). While some endpoint
is within its TPOT batch, those are the least overloaded, whatever the request; the
index keeps them grouped by their prefill time per token pi_s and, within a group,
sorted by wait + step. A request's first token on an endpoint,
``wait + max(1, l / chunk) x step + pi_s x l`` (:func:`core.routing.first_token_s`),
is at least ``(wait + step) + pi_s x l`` computed in floating point (step >= 0, so
each rounded operation is monotone), so a group is read in that order only until
the bound exceeds the soonest first token found: a few endpoints instead of a
vectorised pass over the pool. Many endpoints tie there (those at one batch size with
a free prefill slot have equal waits, steps and chunks), so a group holds each tie
once, with its endpoints sorted by q_n: among endpoints of equal w_n and mu_n the ETA
((q_n + w_n x l) + tokens) / mu_n never decreases as q_n grows, so a tie is read only
up to its first ETA past the best. That structure is brought up to date only when a
request reaches the search, with the rows put since (fewer than the puts: an
endpoint often changes several times in between).

:meth:`CandidateIndex.best` answers None when it cannot name the rule's choice
cheaply and exactly: a lambda outside [0, inf), a row whose numbers break the
bound's assumptions (NaN, a negative R_n), an ETA of NaN, or, when no endpoint
keeps the SLO (the rule then takes the soonest first token), a NaN first token
or none of the soonest able to serve. The caller then runs the rule on every endpoint
(``core.scoring``). ``tests/unit/test_sim_candidates.py`` holds the
answers to the full rule's on random pools.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections.abc import Callable, Iterable

import numpy as np

from joulepool.core.batching import first_token_after_s
from joulepool.core.routing import (
    delays_tighter_ttft,
    endpoint_late,
    first_token_s,
    marginal_energy_floors,
    overflow_rank,
    score_endpoint,
)
from joulepool.core.scoring import (
    EndpointState,
    JouleSchedScorer,
    KVCacheFilter,
    LowestCostPicker,
    RequestInfo,
    RoutingProfile,
)

INF = math.inf

#: a pool row as the index reads it: (eps_n, pi_n, X_n(1), R_n, q_n, mu_n, w_n, prefill
#: wait s, prefill step s, prefill chunk tokens, s per prompt token, batch room), the
#: columns of core.scoring.EndpointState the JouleSched profile reads
Row = tuple[float, float, float, float, float, float, float, float, float, float, float,
            float]
_Energy = tuple[float, float, float]  # (eps_n, pi_n, X_n(1))
#: a tie in the soonest search: (wait + step, wait, step, chunk, w_n, mu_n), the inputs
#: that make positions of one prefill time per token equal in first token and in how
#: their ETA follows q_n
_Tie = tuple[float, float, float, float, float, float]
#: a prefill time per token's ties, ascending, and each tie's (q_n, position), ascending
_Firsts = tuple[list[_Tie], dict[_Tie, list[tuple[float, int]]]]
#: where a position is in the soonest search: its group's prefill s per token, its tie,
#: its entry (q_n, position) and the tie's list of entries holding it
_FirstPlaced = tuple[float, _Tie, tuple[float, int], list[tuple[float, int]]]
#: an energy group: an idle row -> (that row, the positions holding it, ascending), and
#: a busy row's position -> (its row, [that position])
_Group = dict[Row | int, tuple[Row, list[int]]]

_LATE = 0  # placement of a row with no batch room: late for every request
_ODD = 1  # placement of a row outside the bound's assumptions


def _search_regular(row: Row) -> bool:
    """Whether a row's first-token and ETA inputs meet the soonest search's assumptions.

    First token: every first token finite or +inf (never NaN) for a prompt of
    0 <= l < inf tokens, and at least (wait + step) + pf_s x l in floating point
    (step >= 0, max(1, l / chunk) >= 1). ETA: q_n and w_n finite, 0 < mu_n < inf, so
    that for a request of finite tokens the ETA ((q_n + w_n x l) + tokens) / mu_n is
    never NaN and, among rows of equal w_n and mu_n, never decreases as q_n grows (each
    rounded operation is monotone). So: wait, step, chunk, s per token, q_n, mu_n and w_n
    finite (their sum is: a sum of finite numbers too large to be finite is taken as
    not regular too, which only sends a request to the full rule), step >= 0,
    chunk >= 1, s per token >= 0 and mu_n > 0."""
    q, mu, w, wait, step, chunk, pf_s = row[4:11]
    total = q + mu + w + wait + step + chunk + pf_s
    return total - total == 0.0 and step >= 0.0 and chunk >= 1.0 and pf_s >= 0.0 and mu > 0.0


class CandidateIndex:
    """A pool's rows grouped by (eps_n, pi_n, X_n(1)), then by the whole row; and the
    rows within their TPOT batch by prefill time per token, sorted by wait + step, and
    within a tie of first-token and ETA inputs (:data:`_Tie`) by q_n.

    The owner calls :meth:`put` for every position of the pool's columns, and again
    whenever it writes a row, with the same numbers; :meth:`best` then names the
    endpoint the JouleSched profile of ``core.scoring`` picks first (k = 1, no subset,
    no KV-cache usage reported), or None (see the module doc).
    """

    __slots__ = ("first_odd", "first_placed", "firsts", "groups", "odd", "placed", "rows",
                 "shared_ttft", "stale", "within")

    def __init__(self) -> None:
        #: (eps, pi, wake) -> the rows of that energy key (_Group)
        self.groups: dict[_Energy, _Group] = {}
        #: position -> (the group holding it, its key there, the group's energy key), or
        #: _LATE / _ODD
        self.placed: dict[int, tuple[_Group, Row | int, _Energy] | int] = {}
        self.odd = 0  # positions placed _ODD
        self.rows: dict[int, Row] = {}  # position -> its row
        # The soonest search's structure, brought up to date only when a request needs it
        # (most never do): the positions put since then are ``stale``, each with whether
        # it is within its TPOT batch (outstanding + 1 <= tpot_batch) as last put
        self.stale: dict[int, bool] = {}
        #: prefill s per token -> the ties (_Tie) of the positions within their TPOT
        #: batch whose first-token and ETA inputs are regular, ascending, and each
        #: tie's (q_n, position), ascending (_Firsts)
        self.firsts: dict[float, _Firsts] = {}
        #: position within its TPOT batch -> where it is in firsts (_FirstPlaced), or
        #: _ODD
        self.first_placed: dict[int, _FirstPlaced | int] = {}
        self.within = 0  # positions within their TPOT batch
        self.first_odd = 0  # of which with first-token or ETA inputs that are not regular
        #: position -> its ``shared_ttft_s`` column where finite (shared instances: a
        #: late request with a looser TTFT ranks them after the rest,
        #: core.routing.overflow_rank), set by the owner with that column
        self.shared_ttft: dict[int, float] = {}

    @staticmethod
    def serves(profile: RoutingProfile) -> bool:
        """Whether :meth:`best` answers for ``profile``: core's JouleSched scorer alone at
        weight 1, the lowest-cost picker, and at most the KV-cache filter (which keeps
        every endpoint while none reports its KV-cache usage, as in the simulator)."""
        return (len(profile.scorers) == 1 and type(profile.scorers[0][0]) is JouleSchedScorer
                and profile.scorers[0][1] == 1.0 and type(profile.picker) is LowestCostPicker
                and all(type(f) is KVCacheFilter for f in profile.filters))

    def put(self, pos: int, row: Row, outstanding: float = 0.0,
            tpot_batch: float = INF) -> None:
        """Row ``pos`` of the pool's columns now holds ``row``, and its ``outstanding``
        and ``tpot_batch`` columns (core.routing.overflow_rank's inputs) these numbers
        (the defaults are EndpointState's)."""
        placed = self.placed
        old = placed.get(pos)
        if type(old) is tuple:
            eps, pi, wake = row[0], row[1], row[2]
            if old[1] == pos and row[4] != 0.0 and row[11] >= 1.0 and row[3] >= 0.0 \
                    and eps == eps and pi == pi and wake == wake:
                # busy before and now (most puts): its entry only, moved when its energy
                # group changed (eps_n follows the requests in flight); _place's busy case
                key = (eps, pi, wake)
                group = old[0]
                if key != old[2]:
                    del group[pos]
                    if not group:
                        del self.groups[old[2]]
                    found = self.groups.get(key)
                    if found is None:
                        found = self.groups[key] = {}
                    group = found
                    placed[pos] = (group, pos, key)
                group[pos] = (row, [pos])
            else:
                self._unplace(pos, old)
                self._place(pos, row)
        elif old == _LATE and row[11] < 1.0:
            pass  # late before and now (most puts while the pool is full): stays there
        else:
            if old is not None:
                self._unplace(pos, old)
            self._place(pos, row)
        self.rows[pos] = row
        # core.routing.overflow_rank's test
        self.stale[pos] = outstanding + 1.0 <= tpot_batch

    def _unplace(self, pos: int, old: tuple[_Group, Row | int, _Energy] | int) -> None:
        """Take position ``pos`` out of where it was placed (``old``)."""
        if type(old) is tuple:
            rows, old_row, old_key = old
            same = rows[old_row][1]
            if len(same) > 1:
                same.remove(pos)
            else:
                del rows[old_row]
            if not rows:
                del self.groups[old_key]
        elif old == _ODD:
            self.odd -= 1

    def _place(self, pos: int, row: Row) -> None:
        """Place position ``pos`` by its ``row``: late, odd, or in its energy group (idle
        rows merged with their equals, busy ones by position)."""
        placed = self.placed
        if row[11] < 1.0:  # no batch room: late whatever the request (slo_infeasible)
            placed[pos] = _LATE
        elif (row[0] != row[0] or row[1] != row[1] or row[2] != row[2]
              or not row[3] >= 0.0):  # NaN energy numbers or R_n
            placed[pos] = _ODD
            self.odd += 1
        else:
            key = (row[0], row[1], row[2])  # (eps_n, pi_n, X_n(1))
            group = self.groups.get(key)
            if group is None:
                group = self.groups[key] = {}
            if row[4] == 0.0:  # q_n = 0, idle: equal rows held once
                entry = group.get(row)
                if entry is None:
                    group[row] = (row, [pos])
                else:
                    insort(entry[1], pos)
                placed[pos] = (group, row, key)
            else:
                group[pos] = (row, [pos])
                placed[pos] = (group, pos, key)

    def _refresh_firsts(self) -> None:
        """Bring the soonest search's structure up to date with the rows put since."""
        put_first, rows, first_placed = self._put_first, self.rows, self.first_placed
        for pos, within in self.stale.items():
            old = first_placed.pop(pos, None)
            if old is None:
                if within:
                    self.within += 1
                    put_first(pos, rows[pos])
            else:
                if type(old) is tuple:
                    self._drop_first(old)
                else:
                    self.first_odd -= 1
                if within:
                    put_first(pos, rows[pos])
                else:
                    self.within -= 1
        self.stale.clear()

    def _put_first(self, pos: int, row: Row) -> None:
        """Place position ``pos``, within its TPOT batch, in the soonest search. The
        caller has already taken it out of the search if it was there."""
        if _search_regular(row):
            wait, step, pf_s = row[7], row[8], row[10]
            tie = (wait + step, wait, step, row[9], row[6], row[5])
            entry = (row[4], pos)
            group = self.firsts.get(pf_s)
            if group is None:
                same = [entry]
                self.firsts[pf_s] = ([tie], {tie: same})
            else:
                ties, members = group
                held = members.get(tie)
                if held is None:
                    insort(ties, tie)
                    same = members[tie] = [entry]
                else:
                    insort(held, entry)
                    same = held
            self.first_placed[pos] = (pf_s, tie, entry, same)
        else:
            self.first_placed[pos] = _ODD
            self.first_odd += 1

    def _drop_first(self, placed: _FirstPlaced) -> None:
        """Take a position out of the soonest search, ``placed`` where :meth:`_put_first`
        put it."""
        pf_s, tie, entry, same = placed
        if len(same) > 1:
            del same[bisect_left(same, entry)]
            return
        ties, members = self.firsts[pf_s]
        del members[tie]
        if members:
            del ties[bisect_left(ties, tie)]
        else:
            del self.firsts[pf_s]

    def best(self, r: RequestInfo, endpoints: Callable[[], EndpointState]) -> int | None:
        """The position the JouleSched rule picks first for request ``r``, or None when
        the caller must run the rule on every endpoint. ``endpoints()`` returns the
        pool's columns, at least core.routing.first_token_s's and overflow_rank's inputs
        of every row as :meth:`put` here (read only when no endpoint keeps the SLO and
        the soonest search cannot answer alone)."""
        lam = r.lam
        if self.odd or not 0.0 <= lam < INF:
            return None
        tokens, prompt, out, deadline, ttft = (r.tokens, r.input_tokens, r.output_tokens,
                                               r.deadline_s, r.ttft_slo_s)
        groups = self.groups
        keys = list(groups)
        # the groups by their bounds, lowest first (the order only decides how soon the
        # search stops, never its answer: ties in any order; a lone group's bound is
        # never above the best cost, infinite until it is scored)
        if len(keys) > 1:
            floors = marginal_energy_floors(keys, out, prompt)
            order: Iterable[int] = sorted(range(len(keys)), key=floors.__getitem__)
        else:
            floors, order = [-INF], range(len(keys))  # one group or none
        best_cost, best_eta, best_pos = INF, INF, -1
        for k in order:
            if floors[k] > best_cost:
                break  # this group and every later one cost more than the best
            for row, same in groups[keys[k]].values():
                eps, pi, wake, left, q, mu, w, wait, step, chunk, pf_s, room = row
                if endpoint_late(wait, step, chunk, pf_s, room, prompt, ttft):
                    continue
                cost, eta = score_endpoint(eps, q, mu, w, tokens, prompt, deadline, lam, pi,
                                           out, wake, left)
                if cost > best_cost or not -INF < cost < INF:
                    continue  # worse, or cannot serve (the rule leaves it out)
                if eta != eta:
                    return None  # the rule's ranking puts NaN ETAs last: leave it to it
                if cost < best_cost or eta < best_eta or (
                        eta == best_eta and same[0] < best_pos):
                    best_cost, best_eta, best_pos = cost, eta, same[0]
        if best_pos >= 0:
            return best_pos
        if self.stale:
            self._refresh_firsts()
        if self.within and not self.first_odd and 0.0 <= prompt < INF:
            pos = self._soonest_within(r)
            # the soonest within TPOT over every row is the rule's choice unless its
            # prefill would delay a tighter class's first tokens (such rows rank last)
            if pos is None or not self.shared_ttft.get(pos, INF) < ttft:
                return pos
        return self._soonest(r, endpoints())

    def _soonest_within(self, r: RequestInfo) -> int | None:
        """:meth:`_soonest` while some endpoint is within its TPOT batch (those are the
        least overloaded) and every one of them is in :attr:`firsts`: the soonest first
        token among them, found group by group in the order of its lower bound."""
        prompt = float(r.input_tokens)
        soonest = INF
        #: the ties whose first token is ``soonest``: (their positions by q_n, the tie)
        at: list[tuple[list[tuple[float, int]], _Tie]] = []
        for pf_s, (ties, members) in self.firsts.items():
            own = pf_s * prompt  # first_token_after_s's last term
            if ties[0][0] + own > soonest:
                continue  # the whole group comes later
            last = None  # (wait, step, chunk) of the tie before: equal inputs, equal
            first = INF  # first token (ties differing only in w_n and mu_n)
            for tie in ties:
                low, wait, step, chunk = tie[0], tie[1], tie[2], tie[3]
                if low + own > soonest:
                    break  # this tie and every later one in the group come later
                key = (wait, step, chunk)
                if key != last:
                    last = key
                    first = first_token_after_s(wait, step, chunk, pf_s, prompt)
                if first < soonest:
                    soonest = first
                    at = [(members[tie], tie)]
                elif first == soonest:
                    at.append((members[tie], tie))
        if not soonest < INF:
            return None
        if not -INF < r.tokens < INF:  # ETAs may be NaN or not follow q_n: one by one
            return self._earliest_eta(r, sorted(pos for same, _ in at for _, pos in same))
        best_eta, best_pos = INF, -1
        for same, tie in at:
            eta, pos = self._earliest_in_tie(r, same, tie[4], tie[5], best_eta)
            if pos >= 0 and (eta < best_eta or (eta == best_eta and pos < best_pos)
                             or best_pos < 0):
                best_eta, best_pos = eta, pos
        return best_pos if best_pos >= 0 else None

    def _earliest_in_tie(self, r: RequestInfo, same: list[tuple[float, int]], w: float,
                         mu: float, bound: float) -> tuple[float, int]:
        """(ETA s, position) of the lowest ETA that can serve (finite cost) among one
        tie's ``same`` (q_n, position), ascending, the first position on equal ETAs;
        (inf, -1) when none can serve or none is at or below ``bound`` s. Every row has
        these ``w`` and ``mu`` and regular ETA inputs, and the request finite tokens:
        ETAs never decrease along ``same`` (:func:`_search_regular`), so the scan stops at
        the first one past the best."""
        rows = self.rows
        prompt, tokens = r.input_tokens, r.tokens
        best_eta, best_pos = bound, -1
        for q, pos in same:
            # the ETA as score_endpoint computes it (the same operations)
            eta = ((q + w * float(prompt) if prompt > 0 else q) + tokens) / mu
            if eta > best_eta:
                break
            if best_pos >= 0 and not pos < best_pos:
                continue  # an equal ETA at a later position
            row = rows[pos]
            cost, _ = score_endpoint(row[0], q, mu, w, tokens, prompt, r.deadline_s, r.lam,
                                     row[1], r.output_tokens, row[2], row[3])
            if -INF < cost < INF:
                best_eta, best_pos = eta, pos
        return best_eta, best_pos

    def _earliest_eta(self, r: RequestInfo, positions: list[int]) -> int | None:
        """Among ``positions`` (ascending), the one that can serve (finite cost) with the
        lowest ETA, the first on ties; None if none can serve or an ETA is NaN."""
        best_eta, best_pos = INF, -1
        rows = self.rows
        prompt, tokens = r.input_tokens, r.tokens
        scored: dict[Row, tuple[float, float]] = {}  # equal rows score once
        for pos in positions:
            row = rows[pos]
            # the ETA first, as score_endpoint computes it (the same operations): a
            # position that cannot beat the best ETA so far needs no cost (many tie at
            # the soonest first token: instances at one batch with a free prefill slot)
            q = row[4] + row[6] * float(prompt) if prompt > 0 else row[4]
            mu = row[5]
            eta = (q + tokens) / mu if mu > 0 else INF
            if eta == eta and best_pos >= 0 and not eta < best_eta:
                continue
            got = scored.get(row) if scored else None
            if got is None:
                got = score_endpoint(
                    row[0], row[4], row[5], row[6], tokens, prompt, r.deadline_s,
                    r.lam, row[1], r.output_tokens, row[2], row[3])
                if len(positions) > 1:
                    scored[row] = got
            cost, eta = got
            if not -INF < cost < INF:
                continue
            if eta != eta:
                return None  # NaN ETAs rank last: leave it to the rule
            if eta < best_eta or best_pos < 0:
                best_eta, best_pos = eta, pos  # positions ascend: ties keep the first
        return best_pos if best_pos >= 0 else None

    def _soonest(self, r: RequestInfo, endpoints: EndpointState) -> int | None:
        """No endpoint keeps the SLO with a finite cost: the rule ranks the endpoints that
        can serve (finite cost) by core.routing.overflow_rank, then their first token,
        then ETA, then index, as least-loaded routing would send the request. The
        endpoints at the soonest first token among the least overloaded rows hold that
        choice if one of them can serve; else None. (Over the columns, vectorised:
        :meth:`_soonest_within` answers the usual case without them.)"""
        first = first_token_s(endpoints.prefill_wait_s, endpoints.prefill_step_s,
                              endpoints.prefill_chunk_tokens, endpoints.prefill_s_per_token,
                              r.input_tokens)
        if not first.size:
            return None
        rank = overflow_rank(endpoints.outstanding, endpoints.tpot_batch,
                             endpoints.inv_capacity,
                             delays_tighter_ttft(endpoints.shared_ttft_s, r.ttft_slo_s))
        least = rank[rank.argmin()]  # the first NaN if there is one
        if least != least:
            return None
        first = np.where(rank == least, first, INF)
        soonest = first[first.argmin()]  # the first NaN if there is one
        if not soonest < INF:
            return None
        return self._earliest_eta(r, np.flatnonzero(first == soonest).tolist())
