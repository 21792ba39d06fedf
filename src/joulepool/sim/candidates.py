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
Endpoints whose rows are equal (e.g. idle instances of one type at one clock) score
equally, so only the lowest index among them is scored.

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
from bisect import insort
from collections.abc import Callable

import numpy as np

from joulepool.core.routing import (
    endpoint_late,
    first_token_s,
    marginal_energy_floor,
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

_LATE = 0  # placement of a row with no batch room: late for every request
_ODD = 1  # placement of a row outside the bound's assumptions


class CandidateIndex:
    """A pool's rows grouped by (eps_n, pi_n, X_n(1)), then by the whole row.

    The owner calls :meth:`put` whenever it writes a row of the pool's columns, with
    the same numbers; :meth:`best` then names the endpoint the JouleSched profile of
    ``core.scoring`` picks first (k = 1, no subset, no KV-cache usage reported), or
    None (see the module doc).
    """

    __slots__ = ("groups", "odd", "placed", "rows")

    def __init__(self) -> None:
        #: (eps, pi, wake) -> row -> positions holding that row, ascending
        self.groups: dict[_Energy, dict[Row, list[int]]] = {}
        #: position -> its (energy key, row), or _LATE / _ODD
        self.placed: dict[int, tuple[_Energy, Row] | int] = {}
        self.odd = 0  # positions placed _ODD
        self.rows: dict[int, Row] = {}  # position -> its row

    @staticmethod
    def serves(profile: RoutingProfile) -> bool:
        """Whether :meth:`best` answers for ``profile``: core's JouleSched scorer alone at
        weight 1, the lowest-cost picker, and at most the KV-cache filter (which keeps
        every endpoint while none reports its KV-cache usage, as in the simulator)."""
        return (len(profile.scorers) == 1 and type(profile.scorers[0][0]) is JouleSchedScorer
                and profile.scorers[0][1] == 1.0 and type(profile.picker) is LowestCostPicker
                and all(type(f) is KVCacheFilter for f in profile.filters))

    def put(self, pos: int, row: Row) -> None:
        """Row ``pos`` of the pool's columns now holds ``row``."""
        placed = self.placed
        old = placed.get(pos)
        if old is not None:  # take it out of where it was (each row hashed once)
            if type(old) is tuple:
                rows = self.groups[old[0]]
                same = rows.pop(old[1])
                if len(same) > 1:
                    same.remove(pos)
                    rows[old[1]] = same
                elif not rows:
                    del self.groups[old[0]]
            elif old == _ODD:
                self.odd -= 1
        self.rows[pos] = row
        eps, pi, wake, left = row[0], row[1], row[2], row[3]
        if row[11] < 1.0:  # no batch room: late whatever the request (slo_infeasible)
            placed[pos] = _LATE
        elif eps != eps or pi != pi or wake != wake or not left >= 0.0:
            placed[pos] = _ODD
            self.odd += 1
        else:
            key = (eps, pi, wake)
            group = self.groups.get(key)
            if group is None:
                self.groups[key] = {row: [pos]}
            else:
                alone = [pos]
                equal = group.setdefault(row, alone)
                if equal is not alone:
                    insort(equal, pos)
            placed[pos] = (key, row)

    def best(self, r: RequestInfo, endpoints: Callable[[], EndpointState]) -> int | None:
        """The position the JouleSched rule picks first for request ``r``, or None when
        the caller must run the rule on every endpoint. ``endpoints()`` returns the
        pool's columns, at least core.routing.first_token_s's inputs of every row as
        :meth:`put` here (read only when no endpoint keeps the SLO)."""
        lam = r.lam
        if self.odd or not 0.0 <= lam < INF:
            return None
        tokens, prompt, out, deadline, ttft = (r.tokens, r.input_tokens, r.output_tokens,
                                               r.deadline_s, r.ttft_slo_s)
        groups = self.groups
        order = sorted(
            (marginal_energy_floor(key[0], key[1], out, prompt, key[2]), key) for key in groups)
        best_cost, best_eta, best_pos = INF, INF, -1
        for floor, key in order:
            if floor > best_cost:
                break  # this group and every later one cost more than the best
            for row, same in groups[key].items():
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
        return self._soonest(r, endpoints())

    def _soonest(self, r: RequestInfo, endpoints: EndpointState) -> int | None:
        """No endpoint keeps the SLO with a finite cost: the rule ranks the endpoints that
        can serve (finite cost) by core.routing.overflow_rank, then their first token,
        then ETA, then index, as least-loaded routing would send the request. The
        endpoints at the soonest first token among the least overloaded rows hold that
        choice if one of them can serve; else None."""
        first = first_token_s(endpoints.prefill_wait_s, endpoints.prefill_step_s,
                              endpoints.prefill_chunk_tokens, endpoints.prefill_s_per_token,
                              r.input_tokens)
        if not first.size:
            return None
        rank = overflow_rank(endpoints.outstanding, endpoints.tpot_batch,
                             endpoints.inv_capacity)
        least = rank[rank.argmin()]  # the first NaN if there is one
        if least != least:
            return None
        first = np.where(rank == least, first, INF)
        soonest = first[first.argmin()]  # the first NaN if there is one
        if not soonest < INF:
            return None
        best_eta, best_pos = INF, -1
        scored: dict[Row, tuple[float, float]] = {}  # equal rows score once
        for pos in np.flatnonzero(first == soonest).tolist():
            row = self.rows[pos]
            got = scored.get(row)
            if got is None:
                got = scored[row] = score_endpoint(
                    row[0], row[4], row[5], row[6], r.tokens, r.input_tokens, r.deadline_s,
                    r.lam, row[1], r.output_tokens, row[2], row[3])
            cost, eta = got
            if not math.isfinite(cost):
                continue
            if eta != eta:
                return None  # NaN ETAs rank last: leave it to the rule
            if eta < best_eta or best_pos < 0:
                best_eta, best_pos = eta, pos  # positions ascend: ties keep the first
        return best_pos if best_pos >= 0 else None


