"""Benchmark: a router replica killed under load, and the requests lost.

Each run (:mod:`joulepool.fakes.replicakill`): two ``joulepool router`` processes in
front of fake vLLM engines behind a connection-level round-robin balancer (a Service),
the real OpenAI SDK (``--max-retries``, its default 2 unless set) sending ``--requests``
completions over ``--concurrency`` connections, one replica SIGKILLed once
``--kill-after`` of them are done. Reported per run: requests that failed for good,
their share, requests the SDK had to retry, connections the dead replica refused, the
run's time. The balancer probes each replica's ``/readyz`` every ``--probe-period``
seconds (the dead one leaves the rotation as its endpoint leaves the Service); with 0 it
never does. Target from issue 12: under 0.1 % lost.

    joulepool bench router_replica_kill [--runs 3] [--requests 5000] [--concurrency 32]
        [--out results/bench_router_replica_kill.json] [--check]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from joulepool.fakes.replicakill import ReplicaKillReport, ReplicaKillSettings, run_replica_kill

TARGET = 1e-3


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="joulepool bench router_replica_kill",
                                 description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3,
                    help="independent runs, each with fresh routers and engines "
                    "(default %(default)d)")
    ap.add_argument("--requests", type=int, default=5000,
                    help="completions sent per run (default %(default)d)")
    ap.add_argument("--concurrency", type=int, default=32,
                    help="client connections sending them at once (default %(default)d)")
    ap.add_argument("--max-tokens", type=int, default=6,
                    help="tokens each completion asks for (default %(default)d)")
    ap.add_argument("--kill-after", type=float, default=1 / 3,
                    help="share of the requests done before the SIGKILL, in [0, 1)")
    ap.add_argument("--max-retries", type=int, default=2,
                    help="the OpenAI SDK's max_retries (its default is 2)")
    ap.add_argument("--probe-period", type=float, default=1.0,
                    help="seconds between the Service's readiness probes (0: the dead "
                    "replica stays in rotation for the whole run)")
    ap.add_argument("--out", type=Path, default=None,
                    help="also write the machine, the settings and every run's report "
                    "as JSON to this file")
    ap.add_argument("--check", action="store_true", help="exit 1 when a run loses >= 0.1 %%")
    return ap.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """ValueError naming the first flag whose value cannot make a run (a kill share of 1
    or more never kills; a negative probe period or no requests or connections hang)."""
    at_least = [("--runs", args.runs, 1), ("--requests", args.requests, 1),
                ("--concurrency", args.concurrency, 1), ("--max-tokens", args.max_tokens, 1),
                ("--max-retries", args.max_retries, 0)]
    for flag, value, low in at_least:
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, not {value}")
    if not 0 <= args.kill_after < 1:
        raise ValueError(f"--kill-after must be in [0, 1), not {args.kill_after:g}")
    if not 0 <= args.probe_period < math.inf:
        raise ValueError(f"--probe-period must be >= 0 s and finite, not {args.probe_period:g}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        check_args(args)
    except ValueError as exc:
        print(f"bench router_replica_kill: {exc}", file=sys.stderr)
        return 2
    # the fake engines run in this process: their log of each response the killed
    # router never read ("Error handling request ... Connection lost") is expected
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    settings = ReplicaKillSettings(requests=args.requests, concurrency=args.concurrency,
                                   max_tokens=args.max_tokens, kill_after=args.kill_after,
                                   max_retries=args.max_retries,
                                   probe_period_s=args.probe_period)
    runs: list[ReplicaKillReport] = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            report = asyncio.run(run_replica_kill(Path(tmp), settings))
        runs.append(report)
        print(f"run {i + 1}: {report.failed} of {report.requests} failed "
              f"({100 * report.failure_ratio:.3f} %), {report.retried} retried, "
              f"{report.refused} connections refused by the dead replica, "
              f"{report.elapsed_s:.1f} s", flush=True)
    worst = max(r.failure_ratio for r in runs)
    print(f"worst run: {100 * worst:.3f} % lost (target < {100 * TARGET:.1f} %); median "
          f"retried {statistics.median(r.retried for r in runs)}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "settings": vars(args) | {"out": str(args.out)},
            "runs": [r.to_json() for r in runs]}, indent=2))
    return 1 if args.check and worst >= TARGET else 0


if __name__ == "__main__":
    sys.exit(main())
