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
  requests ask for (``x floor`` divides J per generated token by the floor's J
  per requested token).

Then where the requests go, per policy: each GPU product's energy, busy share,
requests served and first tokens late; first-token attainment per class; and
the planner's first plan (instances per class and mode, with the binding bound).

The split sums to the run's window energy (checked in
tests/unit/test_bench_breakdown.py). Method and findings: docs/marginal-energy.md.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from typing import Any

import numpy as np

from joulepool.bench import load_benchmark
from joulepool.core.classes import CLASS_NAMES, SLO_SETS
from joulepool.sim import engine as sim_engine
from joulepool.sim.cluster import ClusterError
from joulepool.sim.engine import EngineParams
from joulepool.sim.instance import STARTING, Instance
from joulepool.sim.report import summarise
from joulepool.sim.runner import Experiment, ExperimentResult, run_experiment
from joulepool.sim.trace import TraceError

Split = dict[str, Any]


def _instrumented(split: Split, window_s: float) -> type[Instance]:
    """An Instance whose settle also adds each interval (clipped to the window) to
    ``split``: J by category, decode J/tokens/seconds by batch bucket, decode seconds
    by clock."""

    class Counted(Instance):
        __slots__ = ()

        def settle(self, t: float) -> None:
            dt = min(t, window_s) - self.last_t
            if dt > 0.0:
                _count(self, dt, split)
            super().settle(t)

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


def breakdown(exp: Experiment) -> tuple[ExperimentResult, dict[str, Split]]:
    """Run ``exp`` one policy at a time in this process, each with its split."""
    splits: dict[str, Split] = {}
    results: list[ExperimentResult] = []
    original = sim_engine.Instance
    try:
        for policy in exp.policies:
            split: Split = {
                "energy_j": defaultdict(float), "empty_s": 0.0, "prefill_tokens": 0.0,
                "decode_tokens": 0.0, "decode_by_batch": defaultdict(lambda: [0.0, 0.0]),
                "decode_s_by_clock": defaultdict(float),
            }
            sim_engine.Instance = _instrumented(split, exp.duration_s)  # type: ignore[misc]
            one = Experiment(**{**exp.__dict__, "policies": (policy,), "jobs": 1})
            results.append(run_experiment(one))
            run = results[-1].runs[policy][0]
            split["energy_j"]["idle_free"] = run.energy_j - sum(split["energy_j"].values())
            splits[policy] = split
    finally:
        sim_engine.Instance = original  # type: ignore[misc]
    first = results[0]
    for other in results[1:]:
        first.runs.update(other.runs)
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
    ap.add_argument("--miad-period-signal", action=argparse.BooleanOptionalAction,
                    default=True,
                    help="the simulator's MIAD period signal "
                         "(EngineParams.miad_period_signal, on by default)")
    args = ap.parse_args(argv)
    if not args.load > 0 or not args.duration > 0:
        ap.error("--load and --duration must be positive")
    try:
        cluster, trace = be.cluster_named(args.cluster), be.trace_named(args.trace)
    except (ClusterError, TraceError) as exc:
        ap.error(str(exc))
    exp = Experiment(cluster=cluster, trace=trace,
                     duration_s=args.duration, arrival_mode="load", arrival_value=args.load,
                     policies=tuple(args.policies.split(",")), seed=args.seed, jobs=1,
                     slos=SLO_SETS[args.slos],
                     params=EngineParams(miad_period_signal=args.miad_period_signal))
    res, splits = breakdown(exp)
    print(render(res, splits))
    print("\n".join(where_requests_go(res)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
