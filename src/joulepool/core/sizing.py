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

The planner (:mod:`joulepool.core.planner`) is unchanged but for its
``partial`` switch: this module only chooses which L[r, m] it sees. The
operator, ``joulepool plan`` and the simulator all size pools through it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from joulepool.core.planner import PlanProblem, PlanResult, solve
from joulepool.core.profiles import DEFAULT_HEADROOM, Headroom

__all__ = ["HEADROOM_ROUNDS", "SizedPlan", "plan_with_headroom"]

#: bisection rounds on the headroom scale when the full headroom does not fit:
#: the scale is found to 1/2**rounds (one MILP solve per round; each costs about
#: as much as the plan itself, ~0.1-0.8 s at 1,000 pools)
HEADROOM_ROUNDS = 4
#: unmet demand within this share of the least possible counts as "as little as
#: possible" (the partial-plan MILP stops within its own relative gap)
SHORTFALL_TOL_REL = 1e-2


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


def plan_with_headroom(
    build: Callable[[Headroom], PlanProblem],
    headroom: Headroom | None = None,
    rounds: int = HEADROOM_ROUNDS,
) -> SizedPlan:
    """Solve ``build(headroom)``; relax the headroom only as far as unmet demand requires.

    ``build`` makes the window's problem with every L[r, m] and P[r, m] from
    ``operating_point(..., headroom=h)`` for the headroom ``h`` it is given.
    """
    asked = headroom or DEFAULT_HEADROOM
    problem = build(asked)
    # the full headroom first, and only whether it fits: the normal case ends here
    result = solve(problem, partial=False)
    if result.feasible:
        return SizedPlan(problem, result, asked, 1.0, asked, 1)
    none = asked.scaled(0.0)
    problem0 = build(none)
    result0 = solve(problem0)
    solves = 2
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
        result = solve(problem)  # again, with its partial plan
        solves += 1
        if good(result):  # headroom is not what leaves demand unmet
            return SizedPlan(problem, result, asked, 1.0, asked, solves)
    best = SizedPlan(problem0, result0, none, 0.0, asked, solves)
    lo, hi = 0.0, 1.0  # lo: serves as much as possible; hi: does not
    for _ in range(max(0, rounds)):
        mid = 0.5 * (lo + hi)
        hr = asked.scaled(mid)
        p = build(hr)
        r = solve(p, partial=not result0.feasible)
        solves += 1
        if good(r):
            lo = mid
            best = SizedPlan(p, r, hr, mid, asked, solves)
        else:
            hi = mid
    return SizedPlan(best.problem, best.result, best.headroom, best.scale, asked, solves)
