"""The scheduling policies a run compares, as combinations of four choices.

* pools: ``static`` (every GPU runs the cluster's static mode and serves
  every class) or ``planner`` (core's FREESH MILP places instances per
  class every plan interval; unplanned GPUs idle);
* routing inside a pool: ``round-robin``, ``least-loaded`` (fewest
  outstanding requests per req/s the instance sustains) or ``joulesched``
  (core's cost with the PI-tuned lambda and the bulk tier's lower lambda,
  scored by core.routing's endpoint rule, the one the production router uses:
  eps_n and mu_n are the device's profiled J/token and tokens/s at its
  operating batch, the largest meeting the TPOT SLO, as in the paper's
  offline profiles; eps at f_max so the router does not chase the clock
  controller, mu at the current clock; q_n counts the prefill of the prompts
  ahead and of the request's own; ties go to the lowest ETA, then index);
  ``joulesched-router`` puts the production request router itself
  (core.router.PoolRouter, the routing service's, default settings) in the loop: the same rule
  fed by the router's own inputs (ledger of routed tokens, scraped counts,
  PI step per 50 completions or 10 s) instead of the simulator's exact state;
* queue on each instance: ``fcfs`` or ``llf`` (core's least-laxity-first);
* clock: ``max`` (locked at f_max) or ``miad`` (core's MIAD controller,
  every second, per GPU instance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class PolicySpec:
    name: str
    pools: Literal["static", "planner"]
    routing: Literal["round-robin", "least-loaded", "joulesched", "joulesched-router"]
    queue: Literal["fcfs", "llf"]
    clock: Literal["max", "miad"]
    description: str

    @property
    def uses_planner(self) -> bool:
        return self.pools == "planner"

    @property
    def pooled_ttft(self) -> bool:
        """Whether its router sends each prompt only where it starts within its TTFT, the
        soonest start otherwise (JouleSched's first-token guard), so that a pool's
        prefills queue as one M/G/n queue (core.queueing): its pools are planned at
        pool-level rates. Least-loaded balances outstanding requests, decoding ones
        included, and is planned per instance (docs/planner.md, "Pool-level TTFT")."""
        return self.routing in ("joulesched", "joulesched-router")


POLICIES: dict[str, PolicySpec] = {
    p.name: p
    for p in (
        PolicySpec("round-robin", "static", "round-robin", "fcfs", "max",
                   "baseline: static instances, round-robin, FCFS, max clock"),
        PolicySpec("least-loaded", "static", "least-loaded", "fcfs", "max",
                   "static instances, fewest outstanding requests, FCFS, max clock"),
        PolicySpec("joulesched", "static", "joulesched", "fcfs", "max",
                   "JouleSched: cost eps*t + lambda*late, PI lambda, bulk tier; max clock"),
        PolicySpec("freesh", "planner", "least-loaded", "llf", "miad",
                   "FREESH: planner pools, least-loaded in pool, LLF, MIAD clocks"),
        PolicySpec("combined", "planner", "joulesched", "llf", "miad",
                   "joulepool: planner pools + JouleSched routing in pool + LLF + MIAD"),
        PolicySpec("max-clock", "planner", "joulesched", "llf", "max",
                   "ablation: combined with clocks locked at max (no MIAD)"),
        PolicySpec("miad-only", "static", "least-loaded", "fcfs", "miad",
                   "ablation: least-loaded with MIAD clocks, nothing else"),
        PolicySpec("planner-only", "planner", "least-loaded", "fcfs", "max",
                   "ablation: planner pools, least-loaded in pool, FCFS, max clock"),
        # not in the default set: the production router (core.router) driven by the simulator
        PolicySpec("joulesched-router", "static", "joulesched-router", "fcfs", "max",
                   "JouleSched through the production request router "
                   "(core.router.PoolRouter, as joulepool router runs it); max clock"),
    )
}

#: what ``--policies all`` (the default) runs: the issue's eight
DEFAULT_ORDER: tuple[str, ...] = (
    "round-robin", "least-loaded", "joulesched", "freesh", "combined",
    "max-clock", "miad-only", "planner-only",
)


def parse_policies(text: str) -> tuple[str, ...]:
    """Comma-separated policy names (or ``all``); unknown names raise ValueError."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names or names == ["all"]:
        return DEFAULT_ORDER
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policy {', '.join(unknown)}; choose from {', '.join(POLICIES)}")
    return tuple(dict.fromkeys(names))
