"""Operator chaos run: seeded API faults, watch drops with deletions in the gap, and an
oracle that counts lost updates (see tests/integration/operator_chaos.py).

    python benchmarks/bench_operator_chaos.py [--runs 12] [--actions 40] [--rate 0.2]
    joulepool bench operator_chaos -- [--runs 12] ...

Each run is seeded (``--seed`` + run index): the same arguments inject the same faults
into the same user actions (timing still varies: the operator runs in its own thread).
Prints one line per run and the totals as JSON; exits 1 if any update was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any


def _harness() -> Any:
    here = Path(__file__).resolve().parents[1] / "tests" / "integration"
    if str(here) not in sys.path:
        sys.path.insert(0, str(here))
    import operator_chaos

    return operator_chaos


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench operator_chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--actions", type=int, default=40, help="user actions per run")
    parser.add_argument("--rate", type=float, default=0.2,
                        help="share of the operator's requests answered with a fault")
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=90.0,
                        help="seconds a run may take to converge after the faults stop")
    args = parser.parse_args(argv)
    chaos = _harness()
    results = []
    for i in range(args.runs):
        r = asyncio.run(chaos.run_chaos(args.seed + i, args.actions, args.rate, args.timeout))
        results.append(r)
        print(f"seed {r.seed}: {r.actions} actions, {r.faults_injected} faults "
              f"{dict(sorted(r.faults.items()))}, {r.watch_drops} watch drops "
              f"({r.gap_deletions} deletions in the gap), lost updates: "
              f"{len(r.lost_updates)}"
              + (f", converged in {r.seconds_to_converge:.1f} s"
                 if r.seconds_to_converge is not None else ""), flush=True)
        for problem in r.lost_updates:
            print(f"    LOST: {problem}", flush=True)
    print(json.dumps(chaos.summary(results), indent=2))
    return 1 if any(r.lost_updates for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
