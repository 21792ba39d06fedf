"""Energy at iso-SLO over a scenario matrix: traces x loads x clusters x SLO sets.

    joulepool bench energy [--duration S] [--min-requests N] [--jobs N] [--traces ...]
                           [--loads ...] [--clusters ...] [--slos ...] [--policies ...]
                           [--seed N] [--no-miad-period-signal] [--json FILE]

Cells: {bundled Azure 2023 conversation trace, synthetic prefill-heavy
(prompts ~2,000, responses ~30), synthetic decode-heavy (prompts ~200,
responses ~600)} x {load 0.2, 0.5, 0.8} x {joulesched-320, freesh-3site} x
{FREESH's SLOs (TTFT 300/600 ms by prompt class, TPOT 150 ms), the interactive
set (TPOT 50 ms, FREESH's TTFT; ``core.classes.INTERACTIVE_SLOS`` says where the
figures come from)}. ``--clusters`` and ``--traces`` also take files, the
same ones ``joulepool simulate --cluster/--trace`` reads (a cluster YAML; a trace
CSV with TIMESTAMP,ContextTokens,GeneratedTokens), so the verdict can be checked on
clusters and traces the matrix does not contain (``benchmarks/heldout/``,
docs/simulator.md "Held-out scenarios"); a file that cannot be read exits 2 with
the reason. The SLO set reaches every policy: deadlines, TTFT/TPOT
attainment, the planner's sizing and eligibility, the routers' SLO and the
operating batch behind eps.

``load`` is relative to the cluster's capacity at SLO
(``sim.runner.capacity_at_slo``, the same definition as ``joulepool simulate
--load``): the rate the static deployment sustains within the cell's SLOs for the
trace's mean request, what least-loaded can serve at SLO. Loads up to 3 are
accepted so that the estimate itself can be checked: ``--policies least-loaded
--loads 0.5,1,1.5,2`` shows where least-loaded's attainment actually breaks.

Each cell simulates max(--duration, --min-requests / rate) seconds, so a cell of
a small cluster at low load still holds --min-requests requests (default
3,000: the binomial standard error of a 98 % attainment is then 0.26 pp, under
the 0.5 pp tolerance of the iso-SLO test; queueing makes neighbouring requests'
outcomes correlated, so read that as a lower bound). The request count of each
cell is printed with it. Arrivals follow the trace's per-minute rate shape from its
first minute, so a cell of 60 s sees one minute of it: to exercise a trace's
bursts or daily swing, give a --duration that covers them (docs/simulator.md,
"Held-out scenarios": the bursty trace over 720 s).

Per cell, each policy's energy and carbon vs ``least-loaded``, deadline misses,
TTFT/TPOT attainment, P99, and whether ``combined`` meets the iso-SLO target
(misses <= max(1 %, least-loaded's + 0.5 pp), TTFT and TPOT attainment within
0.5 pp of least-loaded's) and is not dominated (no other policy meeting it
with > 1 % less energy, or carbon on carbon-objective clusters). The last line
counts the cells where ``combined`` meets iso-SLO and lists its energy ratio to
least-loaded per cell. Cells run in parallel processes, the largest first.

Run time: the default matrix (36 cells, --duration 60, 5 policies) simulates
about 740,000 requests per policy, 3.7 million in all; the joulesched-320 cells
are the bulk of it (at load 0.8 on the decode-heavy trace, 2,020 req/s for
60 s). It took 697 s wall (264 s of CPU) with --jobs 2 on a shared 2-core
machine under load ~12.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import joulepool
from joulepool.bench import init_worker
from joulepool.core.classes import SLO_SETS, slo_set
from joulepool.sim.cluster import (
    ClusterError,
    SimCluster,
    freesh_3site,
    joulesched_320,
    resolve_cluster,
)
from joulepool.sim.engine import EngineParams
from joulepool.sim.report import summarise
from joulepool.sim.runner import Experiment, run_experiment, trace_capacity
from joulepool.sim.trace import Trace, TraceError, load_trace
from joulepool.workers import submit_all, worker_context

CLUSTERS = {"joulesched-320": joulesched_320, "freesh-3site": freesh_3site}
TRACES = ("bundled", "prefill-heavy", "decode-heavy")
POLICIES = ("least-loaded", "round-robin", "joulesched", "freesh", "combined")
SYNTH_REQUESTS = 20_000
SYNTH_SPAN_S = 3_600.0
#: requests a cell holds at least (module docstring: why 3,000)
MIN_REQUESTS = 3_000
#: a cell's simulated time is capped (a load so small that --min-requests would take
#: longer is refused with a message)
MAX_CELL_S = 7 * 86_400.0
#: loads above 1 check the capacity estimate itself (least-loaded past its capacity at SLO)
MAX_LOAD = 3.0
ROWS = ("energy_j", "gco2_per_h", "deadline_miss_rate", "ttft_attainment", "tpot_attainment",
        "p99_ms", "x_floor")


def synthetic_trace(name: str, mean_in: float, mean_out: float, seed: int = 0) -> Trace:
    """Poisson arrivals over an hour with lognormal token counts (sigma 0.5) at these means."""
    rng = np.random.default_rng(seed)
    arrival = np.sort(rng.uniform(0.0, SYNTH_SPAN_S, SYNTH_REQUESTS))
    arrival -= arrival[0]
    sigma = 0.5
    mu_in, mu_out = math.log(mean_in) - sigma**2 / 2, math.log(mean_out) - sigma**2 / 2
    inp = np.maximum(1, rng.lognormal(mu_in, sigma, SYNTH_REQUESTS)).astype(np.int64)
    out = np.maximum(2, rng.lognormal(mu_out, sigma, SYNTH_REQUESTS)).astype(np.int64)
    return Trace(name, arrival, inp, out)


@functools.cache
def trace_named(name: str) -> Trace:
    """A built-in trace (``TRACES``) or a trace CSV file (``sim.trace.load_trace``:
    TraceError naming the file and line if it is malformed)."""
    if name == "bundled":
        return load_trace()
    if name == "prefill-heavy":
        return synthetic_trace("synthetic prefill-heavy", 2000.0, 30.0, 1)
    if name == "decode-heavy":
        return synthetic_trace("synthetic decode-heavy", 200.0, 600.0, 2)
    if Path(name).is_file():
        return load_trace(name)
    raise TraceError(f"unknown {name}; known: {', '.join(TRACES)}, or a trace CSV file "
                     "(TIMESTAMP,ContextTokens,GeneratedTokens)")


@functools.cache
def cluster_named(name: str) -> SimCluster:
    """A built-in cluster (``CLUSTERS``) or a cluster YAML file (``sim.cluster.
    load_cluster_file``: ClusterError naming the file and key if it is invalid)."""
    if name in CLUSTERS or Path(name).is_file():
        return resolve_cluster(name)
    raise ClusterError(f"unknown {name}; known: {', '.join(CLUSTERS)}, or a cluster YAML file")


def short_name(name: str) -> str:
    """How a cell prints a cluster or trace: a built-in's name, a file's stem."""
    return name if name in CLUSTERS or name in TRACES else Path(name).stem


@dataclass(frozen=True)
class Cell:
    trace: str
    load: float
    cluster: str
    slos: str
    duration_s: float  # --duration: the least a cell simulates
    min_requests: int
    policies: tuple[str, ...]
    seed: int
    #: the simulator's MIAD period signal (EngineParams.miad_period_signal)
    miad_period_signal: bool = True
    #: pool-level TTFT sizing for JouleSched-routed pools (EngineParams.pool_ttft)
    pool_ttft: bool = False
    #: JouleSched's room at its pool's size (EngineParams.pool_room)
    pool_room: bool = False


def cell_duration(cell: Cell, rate_rps: float) -> float:
    """max(--duration, --min-requests / rate), s."""
    return max(cell.duration_s, cell.min_requests / rate_rps)


@functools.cache
def capacity_rps(cluster: str, trace: str, slos: str) -> float:
    """The cluster's capacity at SLO for the trace (``sim.runner.capacity_at_slo``)."""
    return trace_capacity(cluster_named(cluster), trace_named(trace), slo_set(slos)).slo_rps


def expected_requests(cell: Cell) -> float:
    """Requests the cell will simulate, on average (its share of the matrix's work)."""
    rate = cell.load * capacity_rps(cell.cluster, cell.trace, cell.slos)
    return rate * cell_duration(cell, rate) if rate > 0 else 0.0


def run_cell(cell: Cell) -> dict[str, Any]:
    t0 = time.perf_counter()
    cluster = cluster_named(cell.cluster)
    trace = trace_named(cell.trace)
    slos = slo_set(cell.slos)
    rate = cell.load * capacity_rps(cell.cluster, cell.trace, cell.slos)
    if rate <= 0:
        return {"cell": cell, "rate": 0.0, "rows": {}, "objective": cluster.objective,
                "requests": 0, "duration_s": 0.0, "wall_s": time.perf_counter() - t0,
                "error": "no static instance serves the mean request within these SLOs"}
    duration = cell_duration(cell, rate)
    if duration > MAX_CELL_S:
        return {"cell": cell, "rate": rate, "rows": {}, "objective": cluster.objective,
                "requests": 0, "duration_s": duration, "wall_s": time.perf_counter() - t0,
                "error": f"{cell.min_requests} requests at {rate:.3g} req/s would take "
                         f"{duration:,.0f} s (over {MAX_CELL_S:,.0f})"}
    exp = Experiment(cluster=cluster, trace=trace, duration_s=duration, arrival_mode="load",
                     arrival_value=cell.load, policies=cell.policies, seed=cell.seed, jobs=1,
                     slos=slos, params=EngineParams(miad_period_signal=cell.miad_period_signal,
                                                    pool_ttft=cell.pool_ttft,
                                                    pool_room=cell.pool_room))
    res = run_experiment(exp)
    summary = summarise(res)
    rows = {p: {k: float(summary.runs[p][0][k]) for k in ROWS} for p in cell.policies}
    return {"cell": cell, "rate": rate, "rows": rows, "objective": cluster.objective,
            "requests": res.repeats[0].workload.requests, "duration_s": duration,
            "wall_s": time.perf_counter() - t0}


def meets_slo(row: dict[str, float], base: dict[str, float]) -> bool:
    """The issue's iso-SLO test against least-loaded's row."""
    return bool(
        row["deadline_miss_rate"] <= max(0.01, base["deadline_miss_rate"] + 0.005)
        and row["ttft_attainment"] >= base["ttft_attainment"] - 0.005
        and row["tpot_attainment"] >= base["tpot_attainment"] - 0.005)


def verdict(out: dict[str, Any]) -> str:
    rows, base = out["rows"], out["rows"].get("least-loaded")
    comb = rows.get("combined")
    if base is None or comb is None:
        return "-"
    if not meets_slo(comb, base):
        return "FAIL: misses SLO"
    key = "gco2_per_h" if out["objective"] == "carbon" else "energy_j"
    better = [p for p, r in rows.items() if p != "combined" and meets_slo(r, base)
              and r[key] < 0.99 * comb[key]]
    return f"FAIL: dominated by {', '.join(better)}" if better else "ok"


def cell_name(c: Cell) -> str:
    return f"{short_name(c.cluster)}/{short_name(c.trace)}/{c.load:g}/{c.slos}"


def render(out: dict[str, Any]) -> str:
    c: Cell = out["cell"]
    head = (f"== {short_name(c.cluster)} | trace {short_name(c.trace)} | load {c.load:g} "
            f"({out['rate']:.3g} req/s) | "
            f"SLOs {c.slos} | {out['requests']:,} requests over {out['duration_s']:,.0f} s "
            f"({out['wall_s']:.0f} s wall)")
    if "error" in out:
        return f"{head} | not run: {out['error']}"
    rows, base = out["rows"], out["rows"]["least-loaded"]
    lines = [f"{head} | combined: {verdict(out)}",
             f"  {'policy':<13} {'E vs LL':>8} {'CO2 vs LL':>9} {'miss':>7} {'TTFT ok':>8} "
             f"{'TPOT ok':>8} {'P99 ms':>9} {'x floor':>7}"]
    for p, r in rows.items():
        lines.append(
            f"  {p:<13} {r['energy_j'] / base['energy_j'] - 1:>+8.1%} "
            f"{r['gco2_per_h'] / base['gco2_per_h'] - 1:>+9.1%} {r['deadline_miss_rate']:>7.2%} "
            f"{r['ttft_attainment']:>8.1%} {r['tpot_attainment']:>8.1%} {r['p99_ms']:>9,.0f} "
            f"{r['x_floor']:>7.2f}")
    return "\n".join(lines)


def summary_line(outs: list[dict[str, Any]]) -> str:
    """Cells where combined meets iso-SLO / cells run, and combined's energy over
    least-loaded's per cell ("!" marks a cell where it misses iso-SLO)."""
    if not any(o["cell"].policies.count("combined") for o in outs):
        return "summary: combined not among --policies"
    ran = [o for o in outs if "least-loaded" in o["rows"] and "combined" in o["rows"]]
    ok = [o for o in ran if meets_slo(o["rows"]["combined"], o["rows"]["least-loaded"])]
    ratios = []
    for o in ran:
        comb, base = o["rows"]["combined"], o["rows"]["least-loaded"]
        mark = "" if o in ok else "!"
        ratios.append(f"{cell_name(o['cell'])} {comb['energy_j'] / base['energy_j']:.2f}{mark}")
    undominated = sum(1 for o in ok if verdict(o) == "ok")
    return (f"summary: combined meets iso-SLO in {len(ok)}/{len(ran)} cells "
            f"({len(outs) - len(ran)} not run), and no other policy does so with > 1 % less "
            f"energy (carbon) in {undominated} of them; combined energy / least-loaded's per "
            f"cell (! = misses iso-SLO): {'; '.join(ratios) or 'none'}")


def add_engine_flags(ap: argparse.ArgumentParser) -> None:
    """The simulator's engine switches (:class:`EngineParams`) as flags, read as
    ``miad_period_signal``, ``pool_ttft`` and ``pool_room`` (bench energy and bench
    breakdown)."""
    ap.add_argument("--miad-period-signal", action=argparse.BooleanOptionalAction,
                    default=True,
                    help="the simulator's MIAD period signal (EngineParams."
                         "miad_period_signal, on by default; docs/marginal-energy.md)")
    ap.add_argument("--pool-ttft", action=argparse.BooleanOptionalAction, default=True,
                    help="pool-level TTFT sizing for JouleSched-routed pools (EngineParams."
                         "pool_ttft, on by default; --no-pool-ttft plans per instance; "
                         "docs/planner.md, \"Pool-level TTFT\")")
    ap.add_argument("--pool-room", action="store_true",
                    help="JouleSched's room b*_n at its pool's size (EngineParams.pool_room, "
                         "off by default)")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="joulepool bench energy",
                                 description=(__doc__ or "").split("\n", 1)[0])
    ap.add_argument("--duration", type=float, default=60.0,
                    help="simulated s per cell, at least (default %(default)g)")
    ap.add_argument("--min-requests", type=int, default=MIN_REQUESTS,
                    help="requests per cell, at least: a cell simulates max(--duration, "
                         "N / rate) s (default %(default)d)")
    ap.add_argument("--jobs", type=int, default=2, help="cells run in parallel")
    ap.add_argument("--traces", default=",".join(TRACES),
                    help=f"comma-separated traces: built-in ({', '.join(TRACES)}; default "
                         "all) or trace CSV files (TIMESTAMP,ContextTokens,GeneratedTokens, "
                         "as joulepool simulate --trace); a directory stands for its *.csv")
    ap.add_argument("--loads", default="0.2,0.5,0.8",
                    help="fractions of the cluster's capacity at SLO")
    ap.add_argument("--clusters", default=",".join(CLUSTERS),
                    help=f"comma-separated clusters: built-in ({', '.join(CLUSTERS)}; default "
                         "all) or cluster YAML files (as joulepool simulate --cluster); a "
                         "directory stands for its *.yaml")
    ap.add_argument("--slos", default=",".join(SLO_SETS),
                    help=f"SLO sets ({', '.join(SLO_SETS)}; default all)")
    ap.add_argument("--policies", default=",".join(POLICIES),
                    help=f"comma-separated routing policies (default {','.join(POLICIES)}); "
                         "least-loaded, the iso-SLO reference, is always run")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of each cell's workload draw from its trace, the same for "
                         "every policy (default %(default)d)")
    add_engine_flags(ap)
    ap.add_argument("--json", metavar="FILE", help="also write every cell's rows and verdict")
    return ap.parse_args(argv)


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _expand(flag: str, given: list[str], suffixes: tuple[str, ...]) -> list[str]:
    """``given`` with each directory replaced by its files of these suffixes, sorted
    (``--clusters benchmarks/heldout``); ValueError for a directory without any."""
    out: list[str] = []
    for name in given:
        p = Path(name)
        if name in CLUSTERS or name in TRACES or not p.is_dir():
            out.append(name)
            continue
        try:
            files = sorted(str(f) for f in p.iterdir() if f.is_file() and f.suffix in suffixes)
        except OSError as exc:
            raise ValueError(f"{flag}: {name}: cannot list: {exc.strerror or exc}") from None
        if not files:
            raise ValueError(f"{flag}: {name}: a directory with no {'/'.join(suffixes)} file")
        out += files
    return out


def _check_inputs(flag: str, given: list[str], read: Callable[[str], object]) -> None:
    """Each of ``given`` names a built-in or a readable file (``read`` loads it)."""
    if not given:
        raise ValueError(f"{flag}: unknown (none given)")
    if len({short_name(x) for x in given}) < len(given):
        raise ValueError(f"{flag}: two entries print the same name: {', '.join(given)}")
    for name in given:
        try:
            read(name)
        except (ClusterError, TraceError) as exc:
            raise ValueError(f"{flag}: {exc}") from None


def cells_from(a: argparse.Namespace) -> list[Cell]:
    """The matrix the arguments ask for (ValueError with the reason if they are bad)."""
    from joulepool.sim.policies import parse_policies

    try:
        loads = [float(x) for x in _split(a.loads)]
    except ValueError:
        raise ValueError(f"--loads {a.loads!r}: numbers, e.g. 0.2,0.5") from None
    if not loads or any(not 0 < x <= MAX_LOAD for x in loads):
        raise ValueError(f"--loads {a.loads!r}: each in (0, {MAX_LOAD:g}]")
    slos = _split(a.slos)
    bad = [x for x in slos if x not in SLO_SETS]
    if bad or not slos:
        raise ValueError(f"--slos: unknown {', '.join(bad) or '(none given)'}; known: "
                         f"{', '.join(SLO_SETS)}")
    traces = _expand("--traces", _split(a.traces), (".csv",))
    clusters = _expand("--clusters", _split(a.clusters), (".yaml", ".yml"))
    _check_inputs("--traces", traces, trace_named)
    _check_inputs("--clusters", clusters, cluster_named)
    if not (0 < a.duration < math.inf) or a.jobs < 1 or a.min_requests < 0:
        raise ValueError("--duration must be > 0, --jobs >= 1, --min-requests >= 0")
    policies = tuple(parse_policies(a.policies))
    if "least-loaded" not in policies:
        policies = ("least-loaded", *policies)
    return [Cell(t, x, c, s, a.duration, a.min_requests, policies, a.seed,
                 bool(getattr(a, "miad_period_signal", True)),
                 bool(getattr(a, "pool_ttft", False)),
                 bool(getattr(a, "pool_room", False)))
            for c in clusters for s in slos for t in traces for x in loads]


def main(argv: list[str] | None = None) -> int:
    a = _parse(argv)
    try:
        cells = cells_from(a)
    except ValueError as exc:
        print(f"bench energy: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    outs = []
    # workers start from a fork server, not as forks of this process (whose other threads
    # may hold locks); each imports this file under its name, to find run_cell and Cell
    ctx = worker_context(["joulepool.sim.runner", "joulepool.sim.report"])
    with ProcessPoolExecutor(a.jobs, mp_context=ctx, initializer=init_worker,
                             initargs=(joulepool.__file__, __name__, __file__)) as pool:
        try:
            futures = submit_all(pool, run_cell,  # largest first
                                 sorted(cells, key=expected_requests, reverse=True))
            for done in as_completed(futures):
                out = done.result()
                outs.append(out)
                print(render(out), flush=True)
        except BrokenProcessPool as exc:  # a worker failed to start (its error is above)
            pool.shutdown(wait=True, cancel_futures=True)
            print(f"bench energy: a worker process failed to start or died: {exc}",
                  file=sys.stderr)
            return 1
    outs.sort(key=lambda o: cells.index(o["cell"]))
    print(f"{len(cells)} cells, {sum(o['requests'] for o in outs):,} requests per policy, in "
          f"{time.perf_counter() - t0:.0f} s wall ({a.jobs} processes)")
    print(summary_line(outs))
    if a.json:
        write_json(a.json, outs)
    return 0


def write_json(path: str, outs: list[dict[str, Any]]) -> None:
    """The matrix as JSON: per cell its coordinates, rate, requests, rows and verdict."""
    import json
    from dataclasses import asdict

    doc = [{**asdict(o["cell"]), **{k: o[k] for k in ("rate", "requests", "duration_s",
                                                       "wall_s", "rows")},
            "error": o.get("error"), "verdict": verdict(o) if o["rows"] else None}
           for o in outs]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
