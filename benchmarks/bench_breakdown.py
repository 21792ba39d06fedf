"""Where a policy's joules go, against the energy floor's (``joulepool bench breakdown``).

Runs one cell (cluster, trace, load, SLO set) for the given policies with every
instance's energy integration split by what the instance was doing, and prints,
beside the floor's (core/bound.py) split of the same window:

* idle: GPUs that hold no instance, and the idle (static) power of the GPUs that
  do, empty or busy: every schedule pays all of it, the floor included;
* start-up: instances loading their model (planner moves);
* prefill above idle: joules and J per prompt token;
* decode above idle: joules and J per output token, by decode batch (powers of
  two) and the share of decode time at each clock band;
* the window edge: output tokens generated in the window against those its
  requests ask for (``x floor`` is the window energy over the floor of the work
  done in the window, ``joulepool.sim.runner.window_work_floor``).

Then where the requests go, per policy: each GPU product's energy, busy share,
requests served and first tokens late; first-token attainment per class; and
the planner's first plan (instances per class and mode, with the binding bound).

The split sums to the run's window energy (checked in
tests/unit/test_bench_breakdown.py). Method and findings: docs/marginal-energy.md.
"""

from __future__ import annotations

import argparse
import functools
import math
from collections import defaultdict
from typing import Any

import numpy as np

from joulepool.bench import load_benchmark
from joulepool.core.bound import FloorDemand, FloorResult, decode_columns, prefill_columns
from joulepool.core.classes import CLASS_NAMES, SLO_SETS
from joulepool.core.profiles import ServingProfile
from joulepool.sim import engine as sim_engine
from joulepool.sim.cluster import ClusterError
from joulepool.sim.engine import EngineParams
from joulepool.sim.instance import STARTING, Instance
from joulepool.sim.report import summarise
from joulepool.sim.runner import (
    Experiment,
    ExperimentResult,
    floor_demand_name,
    floor_demands,
    run_experiment,
)
from joulepool.sim.trace import TraceError
from joulepool.sim.workload import Workload

Split = dict[str, Any]


def _instrumented(split: Split, window_s: float) -> type[Instance]:
    """An Instance whose settle also adds each interval (clipped to the window) to
    ``split``: J by category, decode J/tokens/seconds by batch bucket, decode seconds
    by clock."""

    class Counted(Instance):
        #: decoding requests per floor demand (kept as requests join and leave the batch)
        __slots__ = ("decoding_by_demand",)

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.decoding_by_demand: dict[str, int] = defaultdict(int)

        def settle(self, t: float) -> None:
            dt = min(t, window_s) - self.last_t
            if dt > 0.0:
                _count(self, dt, split)
            super().settle(t)

        def join(self, rid: int, prefill_len: float, remaining: float) -> None:
            self.decoding_by_demand[split["rid_demand"][rid]] += 1
            super().join(rid, prefill_len, remaining)

        def pop_finished(self) -> list[int]:
            done = super().pop_finished()
            for rid in done:
                self.decoding_by_demand[split["rid_demand"][rid]] -= 1
            return done

        def drop_decoding(self, rid: int, prefill_len: float) -> float:
            self.decoding_by_demand[split["rid_demand"][rid]] -= 1
            return super().drop_decoding(rid, prefill_len)

    return Counted


def _count(inst: Instance, dt: float, split: Split) -> None:
    tab = inst.table
    idle = tab.power_w[inst.ci][0]
    energy = split["energy_j"]
    if inst.state == STARTING:
        energy["startup"] += inst.power * dt
        return
    energy["idle_on"] += idle * dt
    if inst.prefill_rid < 0 and inst.b == 0:
        split["empty_s"] += dt
        energy["idle_on"] += (inst.power - idle) * dt  # 0 unless idle draw differs
        return
    b = inst.b
    decode_share = tab.itl_s[inst.ci][b] / inst.itl if b and inst.itl > 0.0 else 0.0
    if inst.prefill_rid >= 0:
        pf = (tab.prefill_power_w[inst.ci] - idle) * (1.0 - decode_share) * dt
        energy["prefill"] += pf
        split["prefill_tokens"] += inst.pf_rate * dt
        row = split["prefill_points"][
            (split["rid_demand"][inst.prefill_rid], tab.profile.key, inst.ci)]
        row[0] += pf
        row[1] += inst.pf_rate * dt
        dec = (tab.power_w[inst.ci][b] - idle) * decode_share * dt if b else 0.0
    else:
        dec = (inst.power - idle) * dt
    if b:
        energy["decode"] += dec
        bucket = 2 ** int(math.log2(b))
        row = split["decode_by_batch"][bucket]
        row[0] += dec
        row[1] += b * dt / inst.itl
        split["decode_tokens"] += b * dt / inst.itl
        split["decode_s_by_clock"][tab.clocks[inst.ci] / tab.clocks[-1]] += dt
        _count_decode_points(inst, dec, dt, split)


def _count_decode_points(inst: Instance, dec_j: float, dt: float, split: Split) -> None:
    """Add an interval's decode J and tokens to ``split["decode_points"]``, keyed by the
    floor's operating point (demand, profile key, batch, clock index), each demand
    taking its requests' share of the batch."""
    b = inst.b
    key = inst.table.profile.key
    for demand, n in inst.decoding_by_demand.items():  # type: ignore[attr-defined]
        if not n:
            continue
        row = split["decode_points"][(demand, key, b, inst.ci)]
        row[0] += dec_j * n / b
        row[1] += n * dt / inst.itl


def _reading_demands(split: Split) -> type[sim_engine.Simulator]:
    """A Simulator that writes each request's floor demand name (``"LS/interactive"``,
    :func:`joulepool.sim.runner.floor_demands`) to ``split["rid_demand"]``."""

    class Reading(sim_engine.Simulator):
        def __init__(self, cluster: Any, workload: Workload, *args: Any) -> None:
            split["rid_demand"] = [
                floor_demand_name(c, b)
                for c, b in zip(workload.cls.tolist(), workload.bulk.tolist(), strict=True)]
            super().__init__(cluster, workload, *args)

    return Reading


def breakdown(exp: Experiment) -> tuple[ExperimentResult, dict[str, Split]]:
    """Run ``exp`` one policy at a time in this process, each with its split: one result
    with every policy's runs and, per repeat, the plans of the first policy that plans
    (none when no policy does)."""
    splits: dict[str, Split] = {}
    results: list[ExperimentResult] = []
    original, original_sim = sim_engine.Instance, sim_engine.Simulator
    try:
        for policy in exp.policies:
            split: Split = {
                "energy_j": defaultdict(float), "empty_s": 0.0, "prefill_tokens": 0.0,
                "decode_tokens": 0.0, "decode_by_batch": defaultdict(lambda: [0.0, 0.0]),
                "decode_s_by_clock": defaultdict(float),
                "decode_points": defaultdict(lambda: [0.0, 0.0]),
                "prefill_points": defaultdict(lambda: [0.0, 0.0]),
            }
            sim_engine.Instance = _instrumented(split, exp.duration_s)  # type: ignore[misc]
            sim_engine.Simulator = _reading_demands(split)  # type: ignore[misc]
            one = Experiment(**{**exp.__dict__, "policies": (policy,), "jobs": 1})
            results.append(run_experiment(one))
            run = results[-1].runs[policy][0]
            split["energy_j"]["idle_free"] = run.energy_j - sum(split["energy_j"].values())
            split["policy"] = policy
            splits[policy] = split
    finally:
        sim_engine.Instance = original  # type: ignore[misc]
        sim_engine.Simulator = original_sim  # type: ignore[misc]
    first = results[0]
    for other in results[1:]:
        first.runs.update(other.runs)
        for mine, theirs in zip(first.repeats, other.repeats, strict=True):
            if not mine.plans:  # the first policy plans nothing: a later one's plans
                mine.plans = theirs.plans
    return first, splits


def render(res: ExperimentResult, splits: dict[str, Split]) -> str:
    floor = res.repeats[0].floor
    wl = res.repeats[0].workload
    summary = summarise(res)
    mj = 1e-6
    asked = float(wl.output_tokens.sum())
    prompts = float(wl.input_tokens.sum())
    lines = [
        f"requests {wl.requests:,}: {asked:,.0f} output and {prompts:,.0f} prompt tokens "
        f"asked in the {res.experiment.duration_s:g} s window",
        f"{'':<14}{'total MJ':>9}{'idle MJ':>9}{'start MJ':>9}{'prefill MJ':>11}"
        f"{'J/prompt tok':>13}{'decode MJ':>10}{'J/out tok':>10}{'tokens %':>9}{'x floor':>8}",
        f"{'energy floor':<14}{floor.energy_j * mj:>9.3f}{floor.idle_j * mj:>9.3f}{0:>9.3f}"
        f"{floor.prefill_j * mj:>11.3f}{floor.prefill_j / prompts:>13.4f}"
        f"{floor.decode_j * mj:>10.3f}{floor.decode_j / asked:>10.4f}{100:>9.1f}{1:>8.2f}",
    ]
    for policy, split in splits.items():
        run = res.runs[policy][0]
        e = split["energy_j"]
        m = summary.runs[policy][0]
        lines.append(
            f"{policy:<14}{run.energy_j * mj:>9.3f}{(e['idle_free'] + e['idle_on']) * mj:>9.3f}"
            f"{e['startup'] * mj:>9.3f}{e['prefill'] * mj:>11.3f}"
            f"{e['prefill'] / max(split['prefill_tokens'], 1.0):>13.4f}{e['decode'] * mj:>10.3f}"
            f"{e['decode'] / max(split['decode_tokens'], 1.0):>10.4f}"
            f"{100 * run.tokens_in_window / asked:>9.1f}{m['x_floor']:>8.2f}")
    lines.append(f"floor decodes at a token-weighted mean batch of {floor.decode_batch:.0f}")
    for policy, split in splits.items():
        tok = split["decode_tokens"] or 1.0
        rows = sorted(split["decode_by_batch"].items())
        lines.append(f"{policy} decode by batch (share of decode tokens, J/token): " + ", ".join(
            f"{b}-{2 * b - 1}: {100 * v[1] / tok:.0f} % {v[0] / max(v[1], 1.0):.3f}"
            for b, v in rows if v[1] / tok >= 0.005))
        secs = sum(split["decode_s_by_clock"].values()) or 1.0
        bands = defaultdict(float)
        for ratio, s in split["decode_s_by_clock"].items():
            bands[min(int(ratio * 10), 9)] += s
        lines.append(f"{policy} decode time by clock (share of f_max): " + ", ".join(
            f"{10 * k}-{10 * k + 10} %: {100 * s / secs:.0f} %" for k, s in sorted(bands.items())
            if s / secs >= 0.005) + f"; instances empty {split['empty_s']:,.0f} instance-s")
    return "\n".join(lines)


#: the terms of :func:`gap_to_floor`, in the order they are taken, and what each means
GAP_TERMS = (
    ("decode clock", "decode above the cheapest clock meeting TPOT at the batch it ran"),
    ("decode batch", "that, above the cheapest operating point on the same GPU (the floor's "
                     "column there)"),
    ("decode product", "that, above the floor's own J/token for the class (other GPUs)"),
    ("prefill clock", "prefill above the cheapest clock meeting TTFT on the same GPU"),
    ("prefill product", "that, above the floor's prefill J/token for the class"),
    ("start-up", "instances loading their model"),
    ("idle", "idle power beyond the floor's (every GPU, the whole window)"),
    ("work", "tokens the floor does that the run did not do in the window, at the floor's "
             "J/token (negative)"),
)


def _floor_j_per_token(floor: FloorResult) -> dict[tuple[str, str], float]:
    """(demand, kind) -> the floor's J above idle per token over its columns."""
    j: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for col in floor.columns:
        row = j[(col.demand, col.kind)]
        row[0] += col.dynamic_j
        row[1] += col.tokens
    return {k: v[0] / v[1] for k, v in j.items() if v[1] > 0}


@functools.cache
def _cheapest_decode(p: ServingProfile, tpot_s: float, batch: int) -> tuple[float, float]:
    """(J/token above idle at ``batch`` at its cheapest clock meeting ``tpot_s`` (at f_max
    when none does), the cheapest J/token of any column meeting it on ``p``)."""
    clocks = p.product.supported_clocks()
    per_token = (p.power_w(batch, clocks) - p.idle_w) / p.decode_tokens_per_s(batch, clocks)
    ok = p.itl_s(batch, clocks) <= tpot_s
    at_batch = float(per_token[ok].min()) if ok.any() else float(per_token[-1])
    best = _cheapest_column(p, tpot_s)
    return at_batch, best if math.isfinite(best) else at_batch


@functools.cache
def _cheapest_column(p: ServingProfile, tpot_s: float) -> float:
    """The least J/token above idle of ``p``'s decode columns meeting ``tpot_s`` (the
    floor's, core.bound.decode_columns); inf when none does."""
    tps, dyn, _, _ = decode_columns(p, tpot_s, True)
    return float((dyn / tps).min()) if tps.size else math.inf


@functools.cache
def _cheapest_prefill(p: ServingProfile, d: FloorDemand) -> float:
    """The least prefill J/token above idle on ``p`` at a clock whose prefill of ``d``'s
    mean prompt meets its TTFT (at any clock when none does)."""
    tps, dyn, _, _ = prefill_columns(p, d.mean_input_tokens, d.ttft_s, True)
    if not tps.size:
        tps, dyn, _, _ = prefill_columns(p, d.mean_input_tokens, d.ttft_s, False)
    return float((dyn / tps).min())


def gap_to_floor(res: ExperimentResult, split: Split) -> dict[str, float]:
    """A run's window energy minus the floor's, in J, split into :data:`GAP_TERMS`.

    Every decode interval of the run (its demand, GPU, batch and clock) is priced at
    its cheapest clock for that batch (the difference is "decode clock"), then at the
    cheapest operating point of that GPU for the demand ("decode batch"), then at the
    floor's J/token for the demand ("decode product"); prefill likewise. What the run
    did not do in the window is priced at the floor's J/token ("work"). The terms sum
    to the run's energy minus the floor's (the rest, "unexplained", is 0 up to rounding).
    """
    floor = res.repeats[0].floor
    demands = {d.name: d for d in floor_demands(res.repeats[0].workload)}
    profiles = {p.key: p for p in res.experiment.cluster.profiles}
    floor_j = _floor_j_per_token(floor)
    gap: dict[str, float] = defaultdict(float)
    done: dict[tuple[str, str], float] = defaultdict(float)
    for (name, key, b, _ci), (joules, tokens) in split["decode_points"].items():
        p, d = profiles[key], demands[name]
        at_batch, best = _cheapest_decode(p, d.tpot_s, b)
        gap["decode clock"] += joules - tokens * at_batch
        gap["decode batch"] += tokens * (at_batch - best)
        gap["decode product"] += tokens * (best - floor_j.get((name, "decode"), best))
        done[(name, "decode")] += tokens
    for (name, key, _ci), (joules, tokens) in split["prefill_points"].items():
        best = _cheapest_prefill(profiles[key], demands[name])
        gap["prefill clock"] += joules - tokens * best
        gap["prefill product"] += tokens * (best - floor_j.get((name, "prefill"), best))
        done[(name, "prefill")] += tokens
    for (name, kind), j in floor_j.items():
        d = demands[name]
        asked = d.decode_tokens if kind == "decode" else d.input_tokens
        gap["work"] += j * (done[(name, kind)] - asked)
    e = split["energy_j"]
    gap["start-up"] = e["startup"]
    gap["idle"] = e["idle_free"] + e["idle_on"] - floor.idle_j
    run = res.runs[split["policy"]][0]
    gap["unexplained"] = run.energy_j - floor.energy_j - sum(gap.values())
    return dict(gap)


def _render_gap(res: ExperimentResult, splits: dict[str, Split]) -> list[str]:
    """:func:`gap_to_floor` of each policy's run as a table, MJ per term."""
    lines = [f"{'gap to the floor, MJ':<22}" + "".join(
        f"{t[:15]:>16}" for t, _ in GAP_TERMS) + f"{'unexplained':>12}{'total':>8}"]
    for policy, split in splits.items():
        gap = gap_to_floor(res, split)
        lines.append(f"{policy:<22}" + "".join(f"{gap[t] * 1e-6:>16.3f}" for t, _ in GAP_TERMS)
                     + f"{gap['unexplained'] * 1e-6:>12.3f}"
                     + f"{sum(gap.values()) * 1e-6:>8.3f}")
    return lines


def floor_columns(floor: FloorResult) -> list[str]:
    """The floor's solution per demand: GPU, kind, batch, clock, instance-s, J/token."""
    lines = ["floor's operating points (demand, GPU, kind, batch, MHz, instance-s, tokens, "
             "J/token above idle):"]
    for col in sorted(floor.columns, key=lambda c: (c.demand, c.kind, c.profile, -c.tokens)):
        lines.append(f"  {col.demand:<17} {col.site}/{col.profile:<22} {col.kind:<8}"
                     f"{col.batch:>5.0f}{col.clock_mhz:>6.0f}{col.instance_s:>9,.1f}"
                     f"{col.tokens:>13,.0f}{col.joules_per_token:>8.4f}")
    return lines


def run_points(split: Split, policy: str) -> list[str]:
    """A run's decode and prefill per demand and GPU: tokens, J/token, mean batch and
    clock (token-weighted)."""
    rows: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0.0] * 4)
    for (name, key, b, ci), (joules, tokens) in split["decode_points"].items():
        row = rows[(name, key, "decode")]
        row[0] += joules
        row[1] += tokens
        row[2] += tokens * b
        row[3] += tokens * ci
    for (name, key, ci), (joules, tokens) in split["prefill_points"].items():
        row = rows[(name, key, "prefill")]
        row[0] += joules
        row[1] += tokens
        row[3] += tokens * ci
    lines = [f"{policy}'s operating points (demand, GPU, kind, tokens, J/token above idle, "
             "token-weighted mean batch and clock index):"]
    for (name, key, kind), (joules, tokens, bt, ct) in sorted(rows.items()):
        if tokens > 0:
            lines.append(f"  {name:<17} {key:<22} {kind:<8}{tokens:>13,.0f}"
                         f"{joules / tokens:>8.4f}{bt / tokens:>7.1f}{ct / tokens:>6.1f}")
    return lines


def where_requests_go(res: ExperimentResult) -> list[str]:
    """Per policy: energy (kJ), busy share, requests served and first tokens late by GPU
    product, and first-token attainment per class; then the first plan, if any."""
    wl = res.repeats[0].workload
    lines = []
    for policy, runs in res.runs.items():
        run = runs[0]
        late = ~(run.t_first - wl.arrival_s <= wl.ttft_slo_s)  # never served (NaN): late
        gpu_product = np.asarray(run.gpu_product)
        served = run.instance_product
        parts = []
        for i, product in enumerate(run.products):
            gpus = gpu_product == product
            if not gpus.any():
                continue
            mine = served == i
            parts.append(f"{product} {run.gpu_energy_j[gpus].sum() / 1e3:,.0f} kJ, busy "
                         f"{run.gpu_busy_s[gpus].sum() / (gpus.sum() * run.duration_s):.0%}, "
                         f"{int(mine.sum()):,} served, {int((late & mine).sum()):,} late")
        classes = ", ".join(
            f"{name} {np.mean(~late[wl.cls == c]):.3f}"
            for c, name in enumerate(CLASS_NAMES) if (wl.cls == c).any())
        lines.append(f"{policy} by product: {'; '.join(parts)}; never served "
                     f"{int((served < 0).sum()):,}; first tokens on time by class: {classes}")
    lines += [p.describe() for p in res.repeats[0].plans[:1]]
    return lines


def main(argv: list[str] | None = None) -> int:
    be = load_benchmark("energy")
    ap = argparse.ArgumentParser(prog="joulepool bench breakdown", description=__doc__.split(
        "\n\n")[0])
    ap.add_argument("--cluster", default="joulesched-320", metavar="NAME|FILE",
                    help=f"built-in cluster ({', '.join(be.CLUSTERS)}) or a cluster YAML "
                         "(default %(default)s)")
    ap.add_argument("--trace", default="bundled", metavar="NAME|FILE",
                    help=f"built-in trace ({', '.join(be.TRACES)}) or a trace CSV "
                         "(default %(default)s)")
    ap.add_argument("--load", type=float, default=0.5)
    ap.add_argument("--slos", default="freesh", choices=sorted(SLO_SETS))
    ap.add_argument("--duration", type=float, default=60.0, help="window, s (default 60)")
    ap.add_argument("--policies", default="least-loaded,combined")
    ap.add_argument("--seed", type=int, default=0)
    be.add_engine_flags(ap)
    ap.add_argument("--headroom", type=float, default=1.0, metavar="S",
                    help="share of the planner's queueing headroom, 0-1 (Experiment."
                         "headroom_scale; default 1: the planner's own)")
    ap.add_argument("--points", action="store_true",
                    help="also print the floor's operating points and each run's, per "
                         "demand (class/tier) and GPU")
    args = ap.parse_args(argv)
    if not args.load > 0 or not args.duration > 0:
        ap.error("--load and --duration must be positive")
    if not 0.0 <= args.headroom <= 1.0:
        ap.error("--headroom must be in [0, 1]")
    try:
        cluster, trace = be.cluster_named(args.cluster), be.trace_named(args.trace)
    except (ClusterError, TraceError) as exc:
        ap.error(str(exc))
    exp = Experiment(cluster=cluster, trace=trace,
                     duration_s=args.duration, arrival_mode="load", arrival_value=args.load,
                     policies=tuple(args.policies.split(",")), seed=args.seed, jobs=1,
                     slos=SLO_SETS[args.slos], headroom_scale=args.headroom,
                     params=EngineParams(miad_period_signal=args.miad_period_signal,
                                         pool_ttft=args.pool_ttft,
                                         pool_room=args.pool_room))
    res, splits = breakdown(exp)
    print(render(res, splits))
    print("\n".join(where_requests_go(res)))
    print("\n".join(_render_gap(res, splits)))
    if args.points:
        print("\n".join(floor_columns(res.repeats[0].floor)))
        for policy, split in splits.items():
            print("\n".join(run_points(split, policy)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
