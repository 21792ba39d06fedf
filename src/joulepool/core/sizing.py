"""Pool sizing with queueing headroom: plan with the most headroom the cluster can carry.

The planner's L[r, m] is the rate one instance sustains *with* queueing
headroom (:meth:`~joulepool.core.profiles.ServingProfile.serving_point`,
:class:`~joulepool.core.profiles.Headroom`). A cluster that can carry the
forecast at its saturation rates may not be able to carry it with that
headroom. Declaring such a window infeasible and using the partial plan
would be the worst answer: the partial plan serves the classes whose
capacity is cheapest and leaves the others with no instance at all.

:func:`plan_with_headroom` therefore plans with the full headroom first (one
solve, the normal case) and, only when that leaves demand unmet that less
headroom would serve, shrinks the headroom uniformly
(:meth:`Headroom.scaled`) to the most the cluster can carry, by bisection
on the scale (:data:`HEADROOM_ROUNDS` more solves; the probes skip the
planner's partial-plan model when only "does it fit" matters). The result
says how far it had to go, so the shells can report it (``joulepool plan``,
the operator's status, the simulator). Windows that are short even with no
headroom at all stay infeasible, with the planner's binding reason, exactly
as before, and keep as much headroom as serves as much as no headroom does.

Pool-level TTFT (:func:`plan_pooled`, :func:`solve_pooled`): n instances of one
mode serving one class behind a soonest-start router are one M/G/n prefill
queue, so the rate one instance sustains grows with n
(:mod:`joulepool.core.queueing`), and the linear MILP cannot see that. A fixed
point keeps it linear: solve with the per-instance rates of one instance (n =
1, always sound: a larger pool only shortens waits), then re-solve with each
pool's rate at the size the last plan deployed, at most :data:`POOL_ROUNDS`
times, stopping when the sizes repeat or the time budget is spent. A plan
solved at pooled rates is used only if every pool it deploys sustains, at the
size it actually has, the rate the plan counted on (:func:`pools_hold`); the
best such plan (feasible first, then the least unmet demand, then the least
objective: ``_better``) is kept, and the
plan at n = 1 is the fallback (docs/planner.md, "Pool-level TTFT").

The planner (:mod:`joulepool.core.planner`) is unchanged but for its
``partial`` switch: this module only chooses which L[r, m] it sees. The
operator, ``joulepool plan`` and the simulator all size pools through it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from joulepool.core.planner import PlanProblem, PlanResult, solve
from joulepool.core.problem import PoolSizes
from joulepool.core.profiles import DEFAULT_HEADROOM, Headroom

__all__ = [
    "HEADROOM_ROUNDS",
    "POOL_ROUNDS",
    "PoolSizes",
    "SizedPlan",
    "largest_pools",
    "plan_pooled",
    "plan_with_headroom",
    "pool_sizes",
    "pools_hold",
    "shared_queues_hold",
    "solve_pooled",
]

#: bisection rounds on the headroom scale when the full headroom does not fit:
#: the scale is found to 1/2**rounds (one MILP solve per round; each costs about
#: as much as the plan itself, ~0.1-0.8 s at 1,000 pools)
HEADROOM_ROUNDS = 4
#: unmet demand within this share of the least possible counts as "as little as
#: possible" (the partial-plan MILP stops within its own relative gap)
SHORTFALL_TOL_REL = 1e-2
#: re-solves at the pool sizes the last plan deployed (:func:`solve_pooled`): sizes
#: settle in one or two in the simulator's windows (docs/planner.md, "Pool-level TTFT")
POOL_ROUNDS = 3
#: a pooled plan counts on no per-instance rate above what its pool sustains at its
#: size by more than this share (HiGHS's own feasibility tolerance is ~1e-7 relative)
POOL_RATE_TOL_REL = 1e-6


@dataclass(frozen=True)
class SizedPlan:
    """A solved window and the headroom its L[r, m] were computed with."""

    problem: PlanProblem
    result: PlanResult
    headroom: Headroom
    scale: float  # 1: the asked-for headroom; 0: none (the fluid model's limits)
    asked: Headroom
    solves: int

    @property
    def relaxed(self) -> bool:
        return self.scale < 1.0

    def note(self) -> str:
        """A line for status and reports; empty when the full headroom fitted."""
        if not self.relaxed:
            return ""
        why = ("the cluster cannot carry the forecast with the full queueing headroom "
               f"({self.asked.describe()})")
        if self.scale <= 0.0:
            return f"{why}: planned with none (the fluid model's SLO limits)"
        return f"{why}: planned with {self.scale:.0%} of it ({self.headroom.describe()})"


def _unmet(result: PlanResult) -> dict[str, float]:
    """Each short class's unmet share of its demand (the planner's partial-model measure)."""
    if result.feasible:
        return {}
    return {s.cls: s.shortfall_rps / s.demand_rps for s in result.shortfalls if s.demand_rps > 0}


def pool_sizes(result: PlanResult) -> dict[tuple[str, str], int]:
    """The pools ``result``'s plan deploys: (class, mode) -> instances of that mode
    serving that class (a shared instance counts in the pool of every class it serves)."""
    sizes: dict[tuple[str, str], int] = {}
    for a in result.plan:
        for cls in a.serves or (a.cls,):
            sizes[(cls, a.mode)] = sizes.get((cls, a.mode), 0) + a.instances
    return sizes


def largest_pools(problem: PlanProblem) -> dict[tuple[str, str], int]:
    """Each servable (class, mode)'s pool if it took every GPU of its product: the start
    of :func:`solve_pooled`'s fixed point when the n = 1 window has no plan."""
    gpus: dict[str, int] = {}
    for node in problem.nodes:
        gpus[node.product] = gpus.get(node.product, 0) + node.gpus
    return {(c, m.name): n for i, c in enumerate(problem.classes)
            for j, m in enumerate(problem.modes)
            if problem.capacity_rps[i, j] > 0 and (n := gpus.get(m.product, 0) // m.gpus) > 0}


def pools_hold(planned: PlanProblem, result: PlanResult, at_sizes: PlanProblem) -> bool:
    """Whether every pool ``result`` (solved on ``planned``) deploys sustains the
    per-instance rate it was planned at: ``at_sizes`` is the same window built at
    :func:`pool_sizes` of ``result``, and its L[r, m] must reach ``planned``'s for
    every deployed (class, mode), and its shared instances must keep their classes'
    TTFT there (:func:`shared_queues_hold`)."""
    cls = {c: i for i, c in enumerate(planned.classes)}
    mode = {m.name: j for j, m in enumerate(planned.modes)}
    for c, m in pool_sizes(result):
        i, j = cls[c], mode[m]
        need = float(planned.capacity_rps[i, j])
        if float(at_sizes.capacity_rps[i, j]) < need * (1.0 - POOL_RATE_TOL_REL):
            return False
    return shared_queues_hold(result, at_sizes)


def shared_queues_hold(result: PlanResult, problem: PlanProblem) -> bool:
    """Whether no shared instance of ``result`` puts a class next to one that breaks its
    TTFT by ``problem``'s ``shared_ttft_rps`` (below the other's L[r', m]: the
    planner's rule), e.g. the window rebuilt at the pool sizes the plan deploys. True
    without it."""
    if problem.shared_ttft_rps is None:
        return True
    breaks = problem.ttft_breaks(POOL_RATE_TOL_REL)
    cls = {c: i for i, c in enumerate(problem.classes)}
    mode = {m.name: j for j, m in enumerate(problem.modes)}
    for a in result.plan:
        j = mode[a.mode]
        for r in a.serves:
            for g in a.serves:
                if g != r and breaks[cls[r], cls[g], j]:
                    return False
    return True


def _better(a: tuple[PlanProblem, PlanResult], b: tuple[PlanProblem, PlanResult]
            ) -> tuple[PlanProblem, PlanResult]:
    """The better of two sound plans of one window: feasible first, then the least unmet
    demand, then the least objective (ties keep ``a``)."""
    def key(r: PlanResult) -> tuple[bool, float, float]:
        return (not r.feasible, sum(s.shortfall_rps for s in r.shortfalls), r.objective)
    return b if key(b[1]) < key(a[1]) else a


def solve_pooled(
    build: Callable[[PoolSizes], PlanProblem],
    partial: bool = True,
    rounds: int = POOL_ROUNDS,
) -> tuple[PlanProblem, PlanResult, int]:
    """(problem, result, solves): the window at pool-level rates (module doc).

    ``build(sizes)`` makes the window's problem with each (class, mode)'s L and P those
    of one instance in a pool of ``sizes`` instances (absent: 1). The first solve is at
    n = 1; each of at most ``rounds`` more is at the sizes the last plan deployed (the
    first, when the n = 1 window does not fit and ``partial`` is off, so that there is
    no plan: at :func:`largest_pools`), and
    starts only while the time spent plus the last solve's stays within the problem's
    ``time_limit_s``. The plan returned is the best (:func:`_better`) of the n = 1 plan
    and the pooled plans whose pools hold (:func:`pools_hold`).
    """
    t0 = time.perf_counter()
    sizes: dict[tuple[str, str], int] = {}
    problem = build(sizes)
    result = solve(problem, partial=partial)
    best, solves, seen = (problem, result), 1, [sizes]
    for k in range(max(0, rounds) + 1):
        # an n = 1 window that does not fit, asked without its partial plan, has no pools
        # to start from: start from the largest each (class, mode) could be
        deployed = (pool_sizes(result) if result.plan or k > 0 or result.feasible
                    else largest_pools(problem))
        # a plan at pooled rates: do its pools sustain them at the sizes it deploys?
        nxt = build(deployed) if sizes and deployed != sizes else None
        if sizes and (nxt is None or pools_hold(problem, result, nxt)):
            best = _better(best, (problem, result))
        elapsed = time.perf_counter() - t0
        if (k == rounds or not deployed or deployed in seen
                or elapsed + result.solve_time_s > problem.time_limit_s):
            break
        sizes, problem = deployed, (nxt if nxt is not None else build(deployed))
        seen.append(sizes)
        result = solve(problem, partial=partial)
        solves += 1
    return best[0], best[1], solves


def plan_with_headroom(
    build: Callable[[Headroom], PlanProblem],
    headroom: Headroom | None = None,
    rounds: int = HEADROOM_ROUNDS,
) -> SizedPlan:
    """Solve ``build(headroom)``; relax the headroom only as far as unmet demand requires.

    ``build`` makes the window's problem with every L[r, m] and P[r, m] from
    ``operating_point(..., headroom=h)`` for the headroom ``h`` it is given: per-instance
    rates, as :func:`plan_pooled` with no pool rounds.
    """
    return plan_pooled(lambda hr, sizes: build(hr), headroom, rounds, pool_rounds=0)


def plan_pooled(
    build: Callable[[Headroom, PoolSizes], PlanProblem],
    headroom: Headroom | None = None,
    rounds: int = HEADROOM_ROUNDS,
    pool_rounds: int = POOL_ROUNDS,
) -> SizedPlan:
    """Solve ``build(headroom, sizes)`` at pool-level rates (:func:`solve_pooled`, at most
    ``pool_rounds`` re-solves per solve); relax the headroom only as far as unmet demand
    requires.

    ``build(h, sizes)`` makes the window's problem with every L[r, m] and P[r, m] from
    the serving point of one instance in a pool of ``sizes[(class, mode)]`` (absent: 1)
    with the headroom ``h`` it is given.
    """
    asked = headroom or DEFAULT_HEADROOM

    def pooled(hr: Headroom, partial: bool) -> tuple[PlanProblem, PlanResult, int]:
        return solve_pooled(lambda sizes: build(hr, sizes), partial, pool_rounds)

    # the full headroom first, and only whether it fits: the normal case ends here
    problem, result, solves = pooled(asked, False)
    if result.feasible:
        return SizedPlan(problem, result, asked, 1.0, asked, solves)
    none = asked.scaled(0.0)
    problem0, result0, n = pooled(none, True)
    solves += n
    # with result0 feasible, probes only need to know whether they fit; otherwise even
    # no headroom leaves demand unmet: serve as much as that, with the most headroom
    # that still does (probes then need their partial plans to compare)
    floor = _unmet(result0)

    def good(r: PlanResult) -> bool:
        # no class may be shorter than with no headroom at all (within the MILP's gap):
        # a pool that fits must not lose capacity to another pool's headroom
        if result0.feasible:
            return r.feasible
        return all(
            share <= floor.get(cls, 0.0) * (1 + SHORTFALL_TOL_REL) + 1e-6
            for cls, share in _unmet(r).items()
        )

    if not result0.feasible:
        problem, result, n = pooled(asked, True)  # again, with its partial plan
        solves += n
        if good(result):  # headroom is not what leaves demand unmet
            return SizedPlan(problem, result, asked, 1.0, asked, solves)
    best = SizedPlan(problem0, result0, none, 0.0, asked, solves)
    lo, hi = 0.0, 1.0  # lo: serves as much as possible; hi: does not
    for _ in range(max(0, rounds)):
        mid = 0.5 * (lo + hi)
        hr = asked.scaled(mid)
        p, r, n = pooled(hr, not result0.feasible)
        solves += n
        if good(r):
            lo = mid
            best = SizedPlan(p, r, hr, mid, asked, solves)
        else:
            hi = mid
    return SizedPlan(best.problem, best.result, best.headroom, best.scale, asked, solves)
