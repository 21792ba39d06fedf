"""HTTP fuzzing of ``joulepool extender`` (scheduler verbs) and ``joulepool router``
(routing API): >= 10,000 generated requests per endpoint (``joulepool.fuzz``), seeded
and reproducible.

Each service runs as its own process from the same generated files (GPU nodes, ready serving pods,
a plan). For every endpoint the fuzzer sends structural mutations of a valid request
(hostile numbers and quantities, wrong types, deep nesting, truncation, invalid UTF-8,
other methods, paths and content types) with ``--concurrency`` connections and checks:
no 5xx, no answer slower than ``--max-latency`` seconds, every request answered, the
service healthy at the end and nothing logged as an internal error. Exit 1 on any
violation.

    joulepool bench fuzz [--per-endpoint 10000] [--seed 14] [--out results/fuzz.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from joulepool import fuzz


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="joulepool bench fuzz", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-endpoint", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-latency", type=float, default=1.0, metavar="SECONDS")
    ap.add_argument("--out", type=Path, help="write the summary as JSON here")
    ap.add_argument("--services", default="extender,router",
                    help="comma-separated services to fuzz (default: extender,router)")
    args = ap.parse_args(argv)
    services = {x.strip() for x in args.services.split(",") if x.strip()}
    if not services <= {"extender", "router"}:
        ap.error(f"--services: unknown {sorted(services - {'extender', 'router'})}")
    reports: list[tuple[str, fuzz.FuzzReport, int]] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        svc_args, names = fuzz.write_extender_inputs(Path(tmp))
        for command, endpoints in (
                ("extender", fuzz.extender_endpoints("default.chat", names[:12])),
                ("router", fuzz.router_endpoints("default.chat"))):
            if command not in services:
                continue
            got = _fuzz_service(command, svc_args, endpoints, args)
            if got is None:
                return 1
            reports.append((command, *got))
    wall = time.perf_counter() - t0
    print(f"{'endpoint':28} {'requests':>9} {'p99 ms':>8} {'max ms':>8} {'viol.':>6}  statuses")
    for command, report, _ in reports:
        for r in report.results:
            s = r.summary()
            print(f"{command + ' ' + s['endpoint']:28} {s['requests']:9d} {s['p99_ms']:8.2f} "
                  f"{s['max_ms']:8.2f} {s['violations']:6d}  {s['statuses']}")
    internal = sum(n for _, _, n in reports)
    total = sum(r.total for _, r, _ in reports)
    healthy = all(r.healthy_after for _, r, _ in reports)
    print(f"total {total} requests in {wall:.1f} s, seed {args.seed}; healthy after: "
          f"{healthy}; internal errors logged: {internal}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "seed": args.seed, "per_endpoint": args.per_endpoint, "wall_s": wall,
            "healthy_after": healthy, "internal_errors": internal,
            "endpoints": [{"service": c, **r.summary()} for c, rep, _ in reports
                          for r in rep.results]}, indent=2))
    bad = [rep for _, rep, _ in reports if not rep.ok]
    for rep in bad:
        print(rep.describe_violations(), file=sys.stderr)
    return 1 if bad or internal else 0


def _fuzz_service(command: str, svc_args: list[str], endpoints: list[fuzz.Endpoint],
                  args: argparse.Namespace) -> tuple[fuzz.FuzzReport, int] | None:
    """Start ``joulepool <command>``, fuzz its endpoints; (report, internal errors logged)."""
    proc = subprocess.Popen([sys.executable, "-m", "joulepool.cli", command, *svc_args,
                             "--host", "127.0.0.1", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on" not in line:
        print(line, proc.stderr.read() if proc.stderr else "", file=sys.stderr)
        proc.kill()
        return None
    try:
        report = asyncio.run(fuzz.run(line.split()[-1], endpoints, args.per_endpoint,
                                      args.seed, args.concurrency, args.max_latency))
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    return report, err.count("internal error") + err.count("Traceback")


if __name__ == "__main__":
    sys.exit(main())
