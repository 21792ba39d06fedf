"""Simulator speed: simulated requests per wall-clock second, per policy, default scale.

    python benchmarks/bench_sim.py [--runs 3] [--policies all] [--cluster joulesched-320]
                                   [--duration S] [--check]
                                   [--against GIT_REF | --baseline-src DIR]

Default scale is what ``joulepool simulate`` runs with no arguments: the
joulesched-320 cluster (320 GPUs, llama-3.1-8b), the bundled Azure 2023
conversation trace as a non-homogeneous Poisson process at the cluster's
default load (half its capacity at SLO: about 570 req/s), 600 simulated
seconds, seed 0.
Each policy runs ``--runs`` times in this one process, one after another;
the figure is the median of (requests simulated / wall seconds of the
engine run). Workload generation, planning and the energy floor are done
once beforehand and are not timed (they are the same for every policy).
Target: >= 20,000 simulated requests per wall-clock second per policy.

``--same-results GIT_REF`` checks that a speed change changed no number: this
checkout and GIT_REF each run every policy (the production router's too, and
two with the power log recorded) on short runs of both built-in clusters
(joulesched-320 for 30 s, freesh-3site for 1,800 s, their default load), and
every RunResult field is compared (wall time and the planner's solve times in
the notes excepted): bit-identical, or within 1e-9 relative where a sum's
order changed; exit 1 otherwise. Run it before and after an engine change
(re-recording against main when main's behaviour moved).

``--against GIT_REF`` measures this checkout's simulator side by side with
the one at GIT_REF (e.g. ``main`` or a commit): the ref's ``src/`` is
extracted with ``git archive`` and each side runs in its own worker process
(set up once), the two taking turns run by run and policy by policy (the
order flipping every run), so both see the same machine load. It prints
each side's median requests per wall-clock second and per CPU second of its
process, and the ratios of medians (this checkout / ref); on a shared,
loaded machine the CPU-second figures are the steadier comparison.
``--baseline-src DIR`` does the same against the ``src`` folder of another
checkout (e.g. a worktree with uncommitted changes), as ``bench picker`` does.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import platform
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np

TARGET_RPS = 20_000.0
REPO = Path(__file__).resolve().parents[1]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per policy (median)")
    parser.add_argument("--policies", default="all")
    parser.add_argument("--cluster", default="joulesched-320")
    parser.add_argument("--duration", type=float, help="simulated seconds (default: cluster's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="exit 1 if a policy misses target")
    baseline = parser.add_mutually_exclusive_group()
    baseline.add_argument("--against", metavar="GIT_REF",
                          help="also time the simulator at GIT_REF, interleaved with this one")
    baseline.add_argument("--baseline-src", metavar="DIR", type=Path,
                          help="also time the simulator in DIR (another checkout's src), "
                               "interleaved with this one")
    parser.add_argument("--same-results", metavar="GIT_REF",
                        help="check every RunResult field equals GIT_REF's (no timing)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--results-worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


class _Setup:
    """The benchmark's scenario, built once: cluster, workload, plans, capacities."""

    def __init__(self, args: argparse.Namespace) -> None:
        from joulepool.sim.cluster import resolve_cluster
        from joulepool.sim.planning import plan_windows
        from joulepool.sim.runner import Experiment, model_tables, resolve_rate, static_capacity
        from joulepool.sim.trace import load_trace
        from joulepool.sim.workload import build_workload

        self.seed = args.seed
        self.cluster = resolve_cluster(args.cluster)
        self.duration = args.duration or self.cluster.duration_s
        trace = load_trace()
        self.tables = model_tables(self.cluster)
        self.cap = static_capacity(self.cluster, float(trace.input_tokens.mean()),
                                   float(trace.output_tokens.mean()), self.tables)
        kind, value = self.cluster.default_arrival
        exp = Experiment(self.cluster, trace, self.duration,
                         arrival_mode=kind,  # type: ignore[arg-type]
                         arrival_value=value)
        mode, rate, _ = resolve_rate(exp, self.cap)
        t0 = time.perf_counter()
        self.wl = build_workload(trace, self.duration, mode=mode, value=rate, seed=args.seed)
        self.plans = plan_windows(self.cluster, self.wl)
        self.setup_s = time.perf_counter() - t0

    def time_one(self, name: str) -> tuple[float, float]:
        """(wall, CPU) seconds of one engine run of policy ``name`` (CPU: this process's)."""
        from joulepool.sim.engine import simulate
        from joulepool.sim.policies import POLICIES

        c0, r0 = time.process_time(), time.perf_counter()
        simulate(self.cluster, self.wl, POLICIES[name], self.tables, self.plans, seed=self.seed,
                 static_capacity_rps=self.cap.per_mode_rps)
        return time.perf_counter() - r0, time.process_time() - c0


def _worker(args: argparse.Namespace) -> int:
    """Line protocol for --against: 'ready <requests>', then 'wall cpu' per policy name."""
    setup = _Setup(args)
    print(f"ready {setup.wl.requests}", flush=True)
    for line in sys.stdin:
        wall, cpu = setup.time_one(line.strip())
        print(f"{wall:.9f} {cpu:.9f}", flush=True)
    return 0


def _header(setup: _Setup, args: argparse.Namespace) -> None:
    wl = setup.wl
    print(f"cluster={setup.cluster.name} duration={setup.duration:g}s requests={wl.requests} "
          f"({wl.mean_rate_rps:.0f} req/s) runs={args.runs} setup={setup.setup_s:.2f}s "
          f"python={platform.python_version()}")


def _single(args: argparse.Namespace, names: tuple[str, ...]) -> bool:
    """Time this checkout alone; True if some policy is below target."""
    setup = _Setup(args)
    _header(setup, args)
    print(f"{'policy':14} {'median req/s':>13} {'min':>9} {'max':>9} {'wall s':>7}  status")
    missed = False
    for name in names:
        walls = [setup.time_one(name)[0] for _ in range(max(1, args.runs))]
        rates = [setup.wl.requests / w for w in walls]
        med = statistics.median(rates)
        ok = med >= TARGET_RPS
        missed |= not ok
        print(f"{name:14} {med:13,.0f} {min(rates):9,.0f} {max(rates):9,.0f} "
              f"{statistics.median(walls):7.2f}  {'ok' if ok else 'BELOW TARGET'}")
    return missed


def _extract(ref: str, into: Path) -> Path:
    """``src/`` of ``ref`` (a git ref of this repository) under ``into``."""
    blob = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", ref, "src"],
                          check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(blob)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def _spawn(src: Path, argv: list[str]) -> tuple[Any, int]:
    env = dict(os.environ, PYTHONPATH=str(src))
    proc = subprocess.Popen([sys.executable, __file__, "--worker", *argv], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    ready = proc.stdout.readline().split()
    if not ready or ready[0] != "ready":
        raise SystemExit(f"benchmark worker for {src} failed to start")
    return proc, int(ready[1])


def _ask(proc: Any, name: str) -> tuple[float, float]:
    proc.stdin.write(name + "\n")
    proc.stdin.flush()
    wall, cpu = proc.stdout.readline().split()
    return float(wall), float(cpu)


def _worker_argv(argv: list[str]) -> list[str]:
    """``argv`` less the options only the parent reads (--check, the baseline's)."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--against", "--baseline-src"):
            skip = True
        elif a != "--check" and not a.startswith(("--against=", "--baseline-src=")):
            out.append(a)
    return out


def _against(args: argparse.Namespace, argv: list[str], names: tuple[str, ...]) -> bool:
    """Time this checkout and the baseline (``--against`` ref or ``--baseline-src``
    folder) interleaved; True if ours is below target."""
    worker_argv = _worker_argv(argv)
    with tempfile.TemporaryDirectory(prefix="bench-sim-") as tmp:
        if args.baseline_src is not None:
            src = args.baseline_src.resolve()
            if not (src / "joulepool").is_dir():
                raise SystemExit(f"--baseline-src {src}: no joulepool package there")
            ref = "baseline"
        else:
            ref = args.against
            src = _extract(ref, Path(tmp))
        sides = {"this": REPO / "src", ref: src}
        procs = {k: _spawn(src, worker_argv) for k, src in sides.items()}
        print(f"side by side: this checkout vs {ref if ref != 'baseline' else src}; requests "
              + ", ".join(f"{k}={n}" for k, (_, n) in procs.items())
              + f"; runs={args.runs}; python={platform.python_version()}")
        walls: dict[tuple[str, str], list[tuple[float, float]]] = {}
        order = list(sides)
        for run in range(max(1, args.runs)):
            for name in names:
                for side in order if run % 2 == 0 else order[::-1]:
                    walls.setdefault((side, name), []).append(_ask(procs[side][0], name))
        for proc, _ in procs.values():
            proc.stdin.close()
            proc.wait()
    return _report_pairs(walls, {k: n for k, (_, n) in procs.items()}, names, ref)


def _report_pairs(times: dict[tuple[str, str], list[tuple[float, float]]],
                  requests: dict[str, int], names: tuple[str, ...], ref: str) -> bool:
    """Per policy and side the median requests per wall and per CPU second, and the
    ratios this / ref (the CPU figure is the one a loaded, shared machine disturbs least)."""
    r = ref[:10]
    print(f"{'':14} {'per wall-clock second':^37} {'per CPU second':^37}")
    print(f"{'policy':14} {'this':>10} {r:>10} {'this/ref':>9}   "
          f"{'this':>10} {r:>10} {'this/ref':>9}   status")
    missed = False
    for name in names:
        med = {
            (s, k): statistics.median(requests[s] / t[k] for t in times[(s, name)])
            for s in requests for k in (0, 1)
        }
        ok = med[("this", 0)] >= TARGET_RPS
        missed |= not ok
        print(f"{name:14} {med[('this', 0)]:10,.0f} {med[(ref, 0)]:10,.0f} "
              f"{med[('this', 0)] / med[(ref, 0)]:9.3f}   {med[('this', 1)]:10,.0f} "
              f"{med[(ref, 1)]:10,.0f} {med[('this', 1)] / med[(ref, 1)]:9.3f}   "
              f"{'ok' if ok else 'BELOW TARGET'}")
    return missed


#: --same-results: cluster -> simulated seconds (short runs at the cluster's default load)
RESULT_RUNS = {"joulesched-320": 30.0, "freesh-3site": 1800.0}
#: relative difference allowed where floating-point sums were reordered
RESULT_RTOL = 1e-9


def _results_worker() -> int:
    """Every RunResult field of every policy on RESULT_RUNS, pickled to stdout as plain
    data (so the other checkout can read it): {(cluster, policy, power log): fields}."""
    import dataclasses

    from joulepool.sim.engine import EngineParams, simulate
    from joulepool.sim.policies import POLICIES

    out = {}
    for cluster, duration in RESULT_RUNS.items():
        args = _parse_args(["--cluster", cluster, "--duration", str(duration)])
        setup = _Setup(args)
        for name, spec in POLICIES.items():
            for record in (False, True) if name in ("joulesched", "combined") else (False,):
                r = simulate(setup.cluster, setup.wl, spec, setup.tables, setup.plans,
                             EngineParams(record_power=record), seed=setup.seed,
                             static_capacity_rps=setup.cap.per_mode_rps)
                fields = {f.name: getattr(r, f.name) for f in dataclasses.fields(r)}
                del fields["wall_s"]
                # the planner's solve time, e.g. "(optimal, 157 ms)", is no result
                fields["notes"] = [re.sub(r"[0-9.]+ m?s\)", "T)", n) for n in r.notes]
                out[(cluster, name, record)] = fields
    sys.stdout.buffer.write(pickle.dumps(out))
    return 0


def _run_results(src: Path) -> dict[Any, Any]:
    proc = subprocess.run([sys.executable, __file__, "--results-worker"],
                          env=dict(os.environ, PYTHONPATH=str(src)), capture_output=True,
                          check=False)
    if proc.returncode:
        raise SystemExit(f"results worker for {src} failed:\n{proc.stderr.decode()[-2000:]}")
    data: dict[Any, Any] = pickle.loads(proc.stdout)
    return data


def _difference(a: Any, b: Any) -> float:
    """Largest relative difference between two results' values (0: bit-identical,
    NaN where they agree; inf: a structural difference)."""
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return math.inf
        return max((_difference(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, list | tuple) and a and isinstance(a[0], list | tuple | dict | str):
        if not isinstance(b, list | tuple) or len(a) != len(b):
            return math.inf
        return max(_difference(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, str) or a is None:
        return 0.0 if a == b else math.inf
    try:
        x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    except (TypeError, ValueError):
        return 0.0 if a == b else math.inf
    if x.shape != y.shape:
        return math.inf
    same = (x == y) | (np.isnan(x) & np.isnan(y))
    if same.all():
        return 0.0
    x, y = x[~same], y[~same]
    return float(np.max(np.abs(x - y) / np.maximum(np.abs(x), np.abs(y))))


def _same_results(ref: str) -> bool:
    """Compare this checkout's results with ``ref``'s; True when all agree."""
    with tempfile.TemporaryDirectory(prefix="bench-sim-") as tmp:
        ours, theirs = _run_results(REPO / "src"), _run_results(_extract(ref, Path(tmp)))
    if ours.keys() != theirs.keys():
        print(f"different runs: {sorted(ours.keys() ^ theirs.keys())}")
        return False
    worst = 0.0
    for key in ours:
        # a field only one side has (added or renamed since ``ref``) is named, not compared
        only = sorted(ours[key].keys() ^ theirs[key].keys())
        if only:
            print(f"{key[0]:15} {key[1]:18} fields on one side only, not compared: {only}")
        shared = ours[key].keys() & theirs[key].keys()
        d = _difference({k: ours[key][k] for k in shared}, {k: theirs[key][k] for k in shared})
        worst = max(worst, d)
        status = "bit-identical" if d == 0 else f"max relative difference {d:.3g}"
        print(f"{key[0]:15} {key[1]:18} {'power log ' if key[2] else '':10} {status}")
    ok = worst <= RESULT_RTOL
    print(f"{len(ours)} runs: {'same results' if ok else 'RESULTS DIFFER'} "
          f"(worst relative difference {worst:.3g}, allowed {RESULT_RTOL:g})")
    return ok


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse_args(argv)
    if args.worker:
        return _worker(args)
    if args.results_worker:
        return _results_worker()
    if args.same_results:
        return 0 if _same_results(args.same_results) else 1
    from joulepool.sim.policies import parse_policies

    names = parse_policies(args.policies)
    baseline = args.against or args.baseline_src is not None
    missed = _against(args, argv, names) if baseline else _single(args, names)
    print(f"target: >= {TARGET_RPS:,.0f} simulated requests per wall-clock second per policy")
    return 1 if (args.check and missed) else 0


if __name__ == "__main__":
    raise SystemExit(main())
