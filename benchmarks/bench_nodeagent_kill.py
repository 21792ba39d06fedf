"""Node-agent kill harness, the large seeded run (issue 14): no GPU left locked.

    python benchmarks/bench_nodeagent_kill.py [--trials 60] [--seed 0] [--gpus 2]
        [--control clocks|power]
    joulepool bench nodeagent_kill -- --trials 90

Real ``joulepool node-agent`` processes on a simulated GPU state file with a
fake engine; per trial: hung / failing NVML calls injected on random GPUs,
``/healthz`` probed during them, then SIGTERM, SIGINT or SIGKILL (equal
shares, seeded order); after SIGKILL, ``--reset-and-exit`` or a restarted
agent recovers. Prints the counts (trials per signal, injected faults,
recoveries, GPUs left locked, health failures, slowest stop) as JSON; exits 1
if any GPU was left locked. See ``joulepool.fakes.killharness``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from joulepool.fakes.killharness import KillSettings, run_kill_harness

    p = argparse.ArgumentParser(prog="bench_nodeagent_kill")
    p.add_argument("--trials", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--control", choices=("clocks", "power"), default="clocks")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="joulepool-kill-") as d:
        report = run_kill_harness(Path(d), KillSettings(trials=args.trials, seed=args.seed,
                                                        gpus=args.gpus, control=args.control))
    out = {**report.as_dict(), "seed": args.seed, "gpus": args.gpus, "control": args.control,
           "seconds": round(time.monotonic() - t0, 1)}
    print(json.dumps(out, indent=1))
    return 0 if report.ok() else 1


if __name__ == "__main__":
    raise SystemExit(main())
