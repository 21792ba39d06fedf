"""Energy at iso-SLO over a scenario matrix: traces x loads x clusters.

    joulepool bench energy [--duration S] [--jobs N] [--traces ...] [--loads ...]
                           [--clusters ...] [--policies ...] [--seed N]

Cells: {bundled Azure 2023 conversation trace, synthetic prefill-heavy
(prompts ~2,000, responses ~30), synthetic decode-heavy (prompts ~200,
responses ~600)} x {load 0.2, 0.5, 0.8} x {joulesched-320, freesh-3site}, with
FREESH's SLOs (TTFT 300/600 ms by prompt class, TPOT 150 ms).

``load`` is relative to the cluster's capacity at SLO: the sum over the static
deployment's instances of the rate each sustains for the trace's mean prompt
and response within TTFT and TPOT (``ServingProfile.serving_point``, the
planner's L[r, m], queueing headroom included), the rate least-loaded can
serve at SLO. (``joulepool simulate --load`` still uses its older definition.)

Per cell, each policy's energy and carbon vs ``least-loaded``, deadline misses,
TTFT/TPOT attainment, P99, and whether ``combined`` meets the iso-SLO target
(misses <= max(1 %, least-loaded's + 0.5 pp), TTFT and TPOT attainment within
0.5 pp of least-loaded's) and is not dominated (no other policy meeting it
with > 1 % less energy, or carbon on carbon-objective clusters). Cells run in
parallel processes; shorter durations keep the matrix within minutes.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import sys
import time
import types
from dataclasses import dataclass
from typing import Any

import numpy as np

from joulepool.core.classes import ClassBoundaries, freesh_slo
from joulepool.sim.cluster import SimCluster, freesh_3site, joulesched_320
from joulepool.sim.engine import static_deployment
from joulepool.sim.report import summarise
from joulepool.sim.runner import Experiment, model_tables, run_experiment
from joulepool.sim.trace import Trace, load_trace

CLUSTERS = {"joulesched-320": joulesched_320, "freesh-3site": freesh_3site}
POLICIES = ("least-loaded", "round-robin", "joulesched", "freesh", "combined")
SYNTH_REQUESTS = 20_000
SYNTH_SPAN_S = 3_600.0


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


def traces() -> dict[str, Trace]:
    return {
        "bundled": load_trace(),
        "prefill-heavy": synthetic_trace("synthetic prefill-heavy", 2000.0, 30.0, 1),
        "decode-heavy": synthetic_trace("synthetic decode-heavy", 200.0, 600.0, 2),
    }


def capacity_at_slo(cluster: SimCluster, trace: Trace) -> float:
    """Requests/s the static deployment sustains at FREESH's SLO for the trace's means."""
    tables = model_tables(cluster)
    mean_in = float(trace.input_tokens.mean())
    mean_out = float(trace.output_tokens.mean())
    bounds = ClassBoundaries()
    cls = "LS" if mean_in >= bounds.prompt_tokens else "SS"
    slo = freesh_slo(cls)
    total = 0.0
    for _, mode, count in static_deployment(cluster, tables):
        sp = tables[mode].profile.serving_point(mean_in, mean_out, slo.ttft_s, slo.tpot_s)
        total += count * sp.rps
    return total


@dataclass(frozen=True)
class Cell:
    trace: str
    load: float
    cluster: str
    duration_s: float
    policies: tuple[str, ...]
    seed: int


def run_cell(cell: Cell) -> dict[str, Any]:
    cluster = CLUSTERS[cell.cluster]()
    trace = traces()[cell.trace]
    cap = capacity_at_slo(cluster, trace)
    exp = Experiment(cluster=cluster, trace=trace, duration_s=cell.duration_s,
                     arrival_mode="rate", arrival_value=cell.load * cap,
                     policies=cell.policies, seed=cell.seed, jobs=1)
    res = run_experiment(exp)
    summary = summarise(res)
    rows = {p: {k: float(summary.runs[p][0][k]) for k in (
        "energy_j", "gco2_per_h", "deadline_miss_rate", "ttft_attainment", "tpot_attainment",
        "p99_ms", "x_floor")} for p in cell.policies}
    return {"cell": cell, "rate": cell.load * cap, "rows": rows,
            "objective": cluster.objective}


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


def render(out: dict[str, Any]) -> str:
    c: Cell = out["cell"]
    rows, base = out["rows"], out["rows"]["least-loaded"]
    lines = [f"== {c.cluster} | trace {c.trace} | load {c.load:g} ({out['rate']:.1f} req/s) | "
             f"FREESH SLOs | combined: {verdict(out)}",
             f"  {'policy':<13} {'E vs LL':>8} {'CO2 vs LL':>9} {'miss':>7} {'TTFT ok':>8} "
             f"{'TPOT ok':>8} {'P99 ms':>9} {'x floor':>7}"]
    for p, r in rows.items():
        lines.append(
            f"  {p:<13} {r['energy_j'] / base['energy_j'] - 1:>+8.1%} "
            f"{r['gco2_per_h'] / base['gco2_per_h'] - 1:>+9.1%} {r['deadline_miss_rate']:>7.2%} "
            f"{r['ttft_attainment']:>8.1%} {r['tpot_attainment']:>8.1%} {r['p99_ms']:>9,.0f} "
            f"{r['x_floor']:>7.2f}")
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    ap.add_argument("--duration", type=float, default=300.0, help="simulated s per cell")
    ap.add_argument("--jobs", type=int, default=2, help="cells run in parallel")
    ap.add_argument("--traces", default="bundled,prefill-heavy,decode-heavy")
    ap.add_argument("--loads", default="0.2,0.5,0.8")
    ap.add_argument("--clusters", default="joulesched-320,freesh-3site")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = _parse(argv)
    policies = tuple(p for p in a.policies.split(",") if p)
    if "least-loaded" not in policies:
        policies = ("least-loaded", *policies)
    try:
        loads = [float(x) for x in a.loads.split(",") if x]
    except ValueError:
        print("bench energy: --loads must be numbers, e.g. 0.2,0.5")
        return 2
    names = [t for t in a.traces.split(",") if t]
    clusters = [c for c in a.clusters.split(",") if c]
    bad = [t for t in names if t not in ("bundled", "prefill-heavy", "decode-heavy")] + [
        c for c in clusters if c not in CLUSTERS]
    if bad or a.duration <= 0 or a.jobs < 1 or any(not 0 < x <= 1.5 for x in loads):
        print(f"bench energy: bad arguments {bad or ''} (duration > 0, jobs >= 1, 0 < load <= 1.5)")
        return 2
    cells = [Cell(t, x, c, a.duration, policies, a.seed)
             for c in clusters for t in names for x in loads]
    t0 = time.perf_counter()
    if __name__ not in sys.modules:  # loaded from a file by `joulepool bench`: let the
        module = types.ModuleType(__name__)  # forked workers find run_cell by name
        module.__dict__.update(globals())
        sys.modules[__name__] = module
    with mp.get_context("fork").Pool(a.jobs) as pool:
        for out in pool.imap(run_cell, cells):
            print(render(out), flush=True)
    print(f"{len(cells)} cells in {time.perf_counter() - t0:.0f} s wall ({a.jobs} processes)")
    return 0
