"""Simulator speed: simulated requests per wall-clock second, per policy, default scale.

    python benchmarks/bench_sim.py [--runs 3] [--policies all] [--cluster joulesched-320]
                                   [--duration S] [--check]

Default scale is what ``joulepool simulate`` runs with no arguments: the
joulesched-320 cluster (320 GPUs, llama-3.1-8b), the bundled Azure 2023
conversation trace as a non-homogeneous Poisson process at 0.8 x the
round-robin-stable rate (about 270 req/s), 600 simulated seconds, seed 0.
Each policy runs ``--runs`` times in this one process, one after another;
the figure is the median of (requests simulated / wall seconds of the
engine run). Workload generation, planning and the energy floor are done
once beforehand and are not timed (they are the same for every policy).
Target: >= 20,000 simulated requests per wall-clock second per policy.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

TARGET_RPS = 20_000.0


def main(argv: list[str] | None = None) -> int:
    from joulepool.sim.cluster import resolve_cluster
    from joulepool.sim.engine import simulate
    from joulepool.sim.planning import plan_windows
    from joulepool.sim.policies import POLICIES, parse_policies
    from joulepool.sim.runner import Experiment, model_tables, resolve_rate, static_capacity
    from joulepool.sim.trace import load_trace
    from joulepool.sim.workload import build_workload

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per policy (median)")
    parser.add_argument("--policies", default="all")
    parser.add_argument("--cluster", default="joulesched-320")
    parser.add_argument("--duration", type=float, help="simulated seconds (default: cluster's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="exit 1 if a policy misses target")
    args = parser.parse_args(argv)

    cluster = resolve_cluster(args.cluster)
    duration = args.duration or cluster.duration_s
    trace = load_trace()
    tables = model_tables(cluster)
    cap = static_capacity(cluster, float(trace.input_tokens.mean()),
                          float(trace.output_tokens.mean()), tables)
    kind, value = cluster.default_arrival
    exp = Experiment(cluster, trace, duration, arrival_mode=kind,  # type: ignore[arg-type]
                     arrival_value=value)
    mode, rate, _ = resolve_rate(exp, cap)
    t0 = time.perf_counter()
    wl = build_workload(trace, duration, mode=mode, value=rate, seed=args.seed)
    plans = plan_windows(cluster, wl)
    setup = time.perf_counter() - t0
    print(f"cluster={cluster.name} duration={duration:g}s requests={wl.requests} "
          f"({wl.mean_rate_rps:.0f} req/s) runs={args.runs} setup={setup:.2f}s "
          f"python={platform.python_version()}")
    print(f"{'policy':14} {'median req/s':>13} {'min':>9} {'max':>9} {'wall s':>7}  status")
    missed = False
    for name in parse_policies(args.policies):
        rates: list[float] = []
        walls: list[float] = []
        for _ in range(max(1, args.runs)):
            r0 = time.perf_counter()
            simulate(cluster, wl, POLICIES[name], tables, plans, seed=args.seed,
                     static_capacity_rps=cap.per_mode_rps)
            wall = time.perf_counter() - r0
            walls.append(wall)
            rates.append(wl.requests / wall)
        med = statistics.median(rates)
        ok = med >= TARGET_RPS
        missed |= not ok
        print(f"{name:14} {med:13,.0f} {min(rates):9,.0f} {max(rates):9,.0f} "
              f"{statistics.median(walls):7.2f}  {'ok' if ok else 'BELOW TARGET'}")
    print(f"target: >= {TARGET_RPS:,.0f} simulated requests per wall-clock second per policy")
    return 1 if (args.check and missed) else 0


if __name__ == "__main__":
    raise SystemExit(main())
