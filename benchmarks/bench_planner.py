"""Pool planner (FREESH MILP) solve time at three sizes.

    python benchmarks/bench_planner.py [--repeats 5] [--objective carbon] [--sizes a,b,c]
                                       [--build-pools N] [--pooled [--time-limit S]]

(a) the published FREESH size: 3 sites, 24 A100 + 6 H100, 4 types, 4 modes, 6 steps;
(b) 320 GPUs (160 A100, 128 H100, 32 L4) over 3 sites, 10 classes, 6 modes;
(c) 10,000 GPUs (5000 A100, 4000 H100, 1000 L4) over 10 sites, 50 classes, 6 modes.

(b) and (c) are synthetic and seeded: per-class power and req/s are the
published FREESH figures of the class's type scaled by assumed random factors;
8xH100 and 1xL4 figures are assumptions; nodes have 8 GPUs of which a random
few are already taken (free 8/6/4/2/0), demand is sized to about 55 % of the
free GPUs at each class's most GPU-efficient mode, and carbon intensity per
site and step is random (50-600 gCO2/kWh). The time is the wall time of
``solve()`` (model build, HiGHS, decomposition), median over the repeats.

``--build-pools N`` also times building the operator's problem (pooling.build_problem)
of N pools with declared prompt tails (p50/p90/p99 700/3,000/9,000 tokens) over the
example cluster, median over the repeats; with ``--baseline-src DIR`` (the ``src``
folder of another checkout, e.g. ``git worktree add /tmp/ref <rev>``) the same build
in that checkout, in a subprocess, interleaved repeat by repeat, and the two problems'
capacities must be equal.

``--pooled`` times the operator's plan instead, per instance and at pool-level TTFT
(docs/planner.md, "Pool-level TTFT"), side by side repeat by repeat. The pooled fixed
point (``core.sizing.plan_pooled``) re-solves with each (class, mode)'s L[r, m] and
P[r, m] recomputed from the serving model at the pool sizes the last plan deployed, so
it needs serving profiles; (b) and (c) above are raw PlanProblem matrices with none,
so it cannot run on them. It therefore times what the operator runs
(``pooling.plan_pools``: ``plan_pooled`` over ``pooling.build_problem``, builds
included, the plan document's description left out) on InferencePools over nodes of
the same sizes: (a) FREESH's 6 nodes (30 GPUs, 3 sites), 4 pools; (b) the 320-GPU nodes
of (b), 10 pools; (c) the 10,000-GPU nodes of (c), 50 pools. One pool in four serves
Llama-3.1-70B (TTFT/TPOT 2 s/0.15 s), the others 8B (1 s/0.1 s); prompts ~1,000
tokens (lognormal), 200-400 output tokens; each pool's demand is its random share of
55 % of the free GPUs at its best mode per product; carbon per site and step is random
(50-600 gCO2/kWh). Per instance is ``pool_rounds=0`` (``plan_with_headroom``), pooled
``POOL_ROUNDS``. Printed: median seconds of each, their ratio, the solves each made
(per instance/pooled), the pooled plan's slowest repeat against its bound (twice the
problem's ``time_limit_s``: one solve, then rounds only while they fit in the same time
again) and whether it held; ``--check`` exits 1 if it did not. ``--time-limit S`` sets
every solve's limit (to see what the fixed point does when one solve is not cut short).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from joulepool.api.models import EnergyPolicySpec, InferencePool
from joulepool.core.planner import (
    FREESH_CAPACITY_RPS,
    FREESH_MODES,
    FREESH_POWER_W,
    Mode,
    PlanNode,
    PlanProblem,
    freesh_published_problem,
    solve,
)
from joulepool.core.problem import PoolSizes
from joulepool.core.profiles import Headroom
from joulepool.core.sizing import POOL_ROUNDS, SizedPlan, plan_pooled
from joulepool.pooling import build_problem as build_pool_problem

MODES: tuple[Mode, ...] = (*FREESH_MODES, Mode("8xH100", "H100", 8), Mode("1xL4", "L4", 1))
#: target seconds per size, from the design brief
TARGETS = {"a": 0.1, "b": 1.0, "c": 30.0}


def _type_tables() -> tuple[np.ndarray, np.ndarray]:
    """[4 types, 6 modes] power W and req/s: FREESH's published 4 modes + 2 assumed."""
    power = np.zeros((4, len(MODES)))
    rps = np.zeros((4, len(MODES)))
    power[:, :4] = FREESH_POWER_W
    rps[:, :4] = FREESH_CAPACITY_RPS
    # assumed: 8xH100 draws 1.9x and serves 1.8x a 4xH100 (or 0.8x an 8xA100 if 4xH100 can't)
    power[:, 4] = 1.9 * FREESH_POWER_W[:, 3]
    rps[:, 4] = np.where(
        FREESH_CAPACITY_RPS[:, 3] > 0,
        1.8 * FREESH_CAPACITY_RPS[:, 3],
        0.8 * FREESH_CAPACITY_RPS[:, 2],
    )
    # assumed: one L4 (72 W TDP) serves only short-short requests, slowly
    power[:, 5] = 72.0
    rps[:, 5] = [0.6, 0.0, 0.0, 0.0]
    return power, rps


def synthetic_nodes(gpus: int, sites: int, rng: np.random.Generator) -> list[PlanNode]:
    """8-GPU nodes, half A100, 0.4 H100, 0.1 L4, over ``sites`` sites, a random few of
    each node's GPUs already taken (free 8/6/4/2/0)."""
    site_names = [f"site-{i}" for i in range(sites)]
    share = {"A100": 0.5, "H100": 0.4, "L4": 0.1}
    free_choices = np.array([8, 6, 4, 2, 0])
    free_probs = np.array([0.70, 0.08, 0.10, 0.07, 0.05])
    site_weights = rng.dirichlet(np.full(sites, 4.0))
    nodes: list[PlanNode] = []
    for product, frac in share.items():
        n_nodes = round(gpus * frac / 8)
        site_of = rng.choice(sites, size=n_nodes, p=site_weights)
        free = rng.choice(free_choices, size=n_nodes, p=free_probs)
        for i in range(n_nodes):
            name = f"{site_names[site_of[i]]}-{product.lower()}-{i}"
            nodes.append(PlanNode(name, site_names[site_of[i]], product, int(free[i])))
    return nodes


def synthetic_problem(
    gpus: int, sites: int, classes: int, seed: int = 0, objective: str = "carbon", steps: int = 6
) -> PlanProblem:
    rng = np.random.default_rng(seed)
    site_names = [f"site-{i}" for i in range(sites)]
    nodes = synthetic_nodes(gpus, sites, rng)
    base_p, base_l = _type_tables()
    kind = np.arange(classes) % 4
    power = base_p[kind] * rng.lognormal(0.0, 0.1, size=(classes, len(MODES)))
    rps = base_l[kind] * rng.lognormal(0.0, 0.15, size=(classes, len(MODES)))
    drop = rng.random(rps.shape) < 0.05  # some modes miss some classes' SLOs ...
    drop[np.arange(classes), np.argmax(rps, axis=1)] = False  # ... but never the best one
    rps[drop] = 0.0

    free_total = sum(n.gpus for n in nodes)
    per_gpu = (rps / np.array([m.gpus for m in MODES])).max(axis=1)
    weight = rng.lognormal(0.0, 1.0, size=classes)
    peak = 0.55 * free_total * per_gpu * weight / weight.sum()  # demand alpha * forecast at peak
    phase = rng.uniform(0, 2 * np.pi, size=classes)
    shape = 1.0 + 0.2 * np.sin(phase[:, None] + 2 * np.pi * np.arange(steps)[None, :] / steps)
    alpha = 1.1
    forecast = peak[:, None] / alpha * shape / shape.max(axis=1, keepdims=True)

    carbon = {
        s: tuple(rng.uniform(50, 600) * (1 + 0.1 * np.sin(rng.uniform(0, 6) + np.arange(steps))))
        for s in site_names
    }
    return PlanProblem(
        classes=tuple(f"class-{i}" for i in range(classes)),
        modes=MODES,
        nodes=tuple(nodes),
        power_w=power,
        capacity_rps=rps,
        forecast_rps=forecast,
        alpha=alpha,
        objective="carbon" if objective == "carbon" else "energy",
        carbon_g_per_kwh=carbon,
    )


def _problems(objective: str) -> dict[str, tuple[str, Callable[[], PlanProblem]]]:
    return {
        "a": (
            "FREESH published: 30 GPUs, 3 sites, 4 classes, 4 modes",
            lambda: freesh_published_problem(
                objective="carbon" if objective == "carbon" else "energy"
            ),
        ),
        "b": (
            "320 GPUs, 3 sites, 10 classes, 6 modes",
            lambda: synthetic_problem(320, 3, 10, seed=1, objective=objective),
        ),
        "c": (
            "10,000 GPUs, 10 sites, 50 classes, 6 modes",
            lambda: synthetic_problem(10_000, 10, 50, seed=2, objective=objective),
        ),
    }


#: --pooled sizes: label, GPUs (None: the FREESH published nodes), sites, pools, seed
POOLED_SIZES: dict[str, tuple[str, int | None, int, int, int]] = {
    "a": ("FREESH's nodes: 30 GPUs, 3 sites, 4 pools", None, 3, 4, 0),
    "b": ("320 GPUs, 3 sites, 10 pools", 320, 3, 10, 1),
    "c": ("10,000 GPUs, 10 sites, 50 pools", 10_000, 10, 50, 2),
}


def _pool(i: int, rps: float, rng: np.random.Generator) -> InferencePool:
    """Pool ``i``: one in four serves the 70B model; prompts ~1,000 tokens (lognormal),
    200-400 output tokens, TTFT/TPOT SLOs 1 s/0.1 s (8B) or 2 s/0.15 s (70B)."""
    big = i % 4 == 3
    tokens_in = int(np.clip(rng.lognormal(np.log(1000), 0.5), 200, 6000))
    return InferencePool.model_validate({
        "kind": "InferencePool", "metadata": {"name": f"pool-{i}", "namespace": "bench"},
        "spec": {"model": "llama-3.1-70b" if big else "llama-3.1-8b",
                 "slo": {"ttftSeconds": 2.0 if big else 1.0,
                         "tpotSeconds": 0.15 if big else 0.1},
                 "demand": {"requestsPerSecond": rps, "meanInputTokens": tokens_in,
                            "meanOutputTokens": int(rng.integers(200, 401))}}})


def _mean_best_rate_per_gpu(problem: PlanProblem) -> np.ndarray:
    """Each class's req/s per GPU at its best mode on each product, averaged over the
    products weighted by their free GPUs (a product it cannot use counts as 0)."""
    free: dict[str, int] = {}
    for n in problem.nodes:
        free[n.product] = free.get(n.product, 0) + n.gpus
    rate = problem.capacity_rps / np.array([m.gpus for m in problem.modes])
    total = np.zeros(len(problem.classes))
    for product, gpus in free.items():
        on = [j for j, m in enumerate(problem.modes) if m.product == product]
        if on:
            total += gpus * rate[:, on].max(axis=1)
    return total / max(1, sum(free.values()))


def synthetic_pools(key: str, objective: str = "carbon"
                    ) -> tuple[list[InferencePool], list[PlanNode], EnergyPolicySpec]:
    """The operator's inputs at size ``key`` of :data:`POOLED_SIZES`: pools, nodes and the
    policy (random per-site carbon series). Each pool's demand is its random share of
    55 % of the free GPUs at its best mode per product (:func:`_mean_best_rate_per_gpu`),
    as :func:`synthetic_problem` sizes its demand."""
    _, gpus, sites, count, seed = POOLED_SIZES[key]
    rng = np.random.default_rng(seed)
    nodes = (list(freesh_published_problem().nodes) if gpus is None
             else synthetic_nodes(gpus, sites, rng))
    steps = EnergyPolicySpec().window_steps
    policy = EnergyPolicySpec.model_validate({"objective": objective, "carbon": [
        {"site": s, "series": [round(float(v), 1) for v in rng.uniform(50, 600, size=steps)]}
        for s in sorted({n.site for n in nodes})]})
    draft = [_pool(i, 1.0, rng) for i in range(count)]
    problem = build_pool_problem(draft, nodes, policy)
    per_gpu = _mean_best_rate_per_gpu(problem)
    weight = rng.lognormal(0.0, 1.0, size=count)
    rps = 0.55 * sum(n.gpus for n in nodes) * per_gpu * weight / weight.sum()
    pools = [p.model_copy(update={"spec": p.spec.model_copy(update={
        "demand": p.spec.demand.model_copy(update={"requests_per_second": round(float(r), 3)})})})
        for p, r in zip(draft, rps, strict=True)]
    return pools, nodes, policy


def time_plan(pools: list[InferencePool], nodes: list[PlanNode], policy: EnergyPolicySpec,
              pool_rounds: int, time_limit_s: float | None = None) -> tuple[float, SizedPlan]:
    """Wall seconds of the operator's plan (``pooling.plan_pools``'s ``plan_pooled`` over
    ``pooling.build_problem``, builds included) with ``pool_rounds`` pooled re-solves
    (0: per instance), and the plan; ``time_limit_s``: the problems' (None: default)."""
    def build(hr: Headroom, sizes: PoolSizes) -> PlanProblem:
        problem = build_pool_problem(pools, nodes, policy, headroom=hr, pool_sizes=sizes)
        if time_limit_s is None:
            return problem
        return dataclasses.replace(problem, time_limit_s=time_limit_s)

    t0 = time.perf_counter()
    sized = plan_pooled(build, pool_rounds=pool_rounds)
    return time.perf_counter() - t0, sized


def pooled_side_by_side(key: str, repeats: int, objective: str = "carbon",
                        time_limit_s: float | None = None) -> dict[str, Any]:
    """Per-instance (pool_rounds 0) and pooled (:data:`POOL_ROUNDS`) plans of size
    ``key``, taking turns repeat by repeat: median and max seconds, solves, the plans,
    and the pooled window's bound (2 x the problem's ``time_limit_s``)."""
    pools, nodes, policy = synthetic_pools(key, objective)
    times: dict[str, list[float]] = {"per_instance": [], "pooled": []}
    plans: dict[str, SizedPlan] = {}
    for _ in range(max(1, repeats)):
        for name, rounds in (("per_instance", 0), ("pooled", POOL_ROUNDS)):
            seconds, plans[name] = time_plan(pools, nodes, policy, rounds, time_limit_s)
            times[name].append(seconds)
    bound = 2.0 * plans["pooled"].problem.time_limit_s
    return {"median": {k: statistics.median(v) for k, v in times.items()},
            "max": {k: max(v) for k, v in times.items()}, "plans": plans, "bound_s": bound,
            "held": max(times["pooled"]) <= bound, "nodes": len(nodes),
            "gpus": sum(n.gpus for n in nodes)}


def print_pooled(sizes: list[str], repeats: int, objective: str,
                 time_limit_s: float | None = None) -> bool:
    """Print the per-instance vs pooled table; whether every size held its bound."""
    print(f"operator plan (plan_pooled over pooling.build_problem), objective={objective} "
          f"repeats={repeats} POOL_ROUNDS={POOL_ROUNDS}")
    print(f"{'size':4} {'per_inst_s':>10} {'pooled_s':>9} {'ratio':>6} {'solves':>7} "
          f"{'pooled_max_s':>12} {'bound_s':>7} held  detail")
    held = True
    for key in sizes:
        got = pooled_side_by_side(key, repeats, objective, time_limit_s)
        med, plans = got["median"], got["plans"]
        held &= got["held"]
        per, pooled = plans["per_instance"], plans["pooled"]
        print(f"({key}) {med['per_instance']:10.3f} {med['pooled']:9.3f} "
              f"{med['pooled'] / med['per_instance']:6.2f} {per.solves:>3}/{pooled.solves:<3} "
              f"{got['max']['pooled']:12.3f} {got['bound_s']:7.1f} {got['held']!s:5} "
              f"{POOLED_SIZES[key][0]}; {got['nodes']} nodes, {got['gpus']} free GPUs; "
              f"status={per.result.status}/{pooled.result.status} "
              f"feasible={per.result.feasible}/{pooled.result.feasible} "
              f"headroom={per.scale:.2f}/{pooled.scale:.2f} "
              f"objective={per.result.objective:.6g}/{pooled.result.objective:.6g} "
              f"{pooled.result.unit}")
    return held


#: times the build of pooling.build_problem: run by this checkout and, with a
#: ``sys.path`` pointing at another checkout's ``src``, by that one (public API only)
_BUILD_TIMER = """
import json, sys, time
from importlib import resources
import joulepool
from joulepool.api.cluster import load_cluster
from joulepool.api.models import EnergyPolicySpec, InferencePool
from joulepool.pooling import build_problem, nodes_from_cluster

pools, repeats = int(sys.argv[1]), int(sys.argv[2])
nodes = nodes_from_cluster(load_cluster(
    str(resources.files("joulepool") / "examples" / "cluster.yaml")).expanded())
tail = [{"quantile": 0.5, "tokens": 700}, {"quantile": 0.9, "tokens": 3000},
        {"quantile": 0.99, "tokens": 9000}]
body = [InferencePool.model_validate({
    "kind": "InferencePool", "metadata": {"name": f"p{i}", "namespace": "bench"},
    "spec": {"model": "llama-3.1-8b", "slo": {"ttftSeconds": 1.0, "tpotSeconds": 0.1},
             "demand": {"requestsPerSecond": 2, "meanInputTokens": 1000,
                        "meanOutputTokens": 200, "inputTokenQuantiles": tail}}})
    for i in range(pools)]
build_problem(body, nodes, EnergyPolicySpec())  # warm-up: imports, caches
times = []
for _ in range(repeats):
    t0 = time.perf_counter()
    problem = build_problem(body, nodes, EnergyPolicySpec())
    times.append(time.perf_counter() - t0)
print(json.dumps({"times": times, "module": joulepool.__file__,
                  "capacity": [[float(x) for x in row] for row in problem.capacity_rps]}))
"""


def _time_build(pools: int, repeats: int, src: Path | None = None) -> dict[str, Any]:
    """{"times": seconds of each of ``repeats`` builds of ``pools`` prompt-tail pools'
    problem, "capacity": its capacity_rps} in a fresh interpreter importing joulepool
    from ``src`` (None: this checkout's)."""
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    out = subprocess.run([sys.executable, "-c", _BUILD_TIMER, str(pools), str(repeats)],
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"build timer failed ({src or 'this checkout'}): "
                           f"{out.stderr.strip()[-400:]}")
    result: dict[str, Any] = json.loads(out.stdout)
    if src is not None and not Path(result["module"]).resolve().is_relative_to(src.resolve()):
        raise RuntimeError(f"{src} holds no joulepool package (imported {result['module']})")
    return result


def build_side_by_side(pools: int, repeats: int,
                       baseline_src: Path | None = None) -> dict[str, float]:
    """Median seconds to build the problem of ``pools`` prompt-tail pools over the
    example cluster: "this" checkout and, with ``baseline_src``, "baseline", taking
    turns one repeat at a time; the two problems' capacities must be equal."""
    runs: dict[str, Path | None] = {"this": None}
    if baseline_src is not None:
        runs["baseline"] = baseline_src
    times: dict[str, list[float]] = {name: [] for name in runs}
    capacity: dict[str, Any] = {}
    for _ in range(max(1, repeats)):
        for name, src in runs.items():
            got = _time_build(pools, 1, src)
            times[name] += got["times"]
            capacity[name] = got["capacity"]
    if len(capacity) == 2:
        assert capacity["this"] == capacity["baseline"], "the two builds differ"
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--objective", choices=("carbon", "energy"), default="carbon")
    parser.add_argument("--sizes", default="a,b,c", help="comma list of a, b, c")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--gap", type=float, default=None,
                        help="relative MIP gap (default: the planner's DEFAULT_MIP_REL_GAP)")
    parser.add_argument("--build-pools", type=int, default=0, metavar="N",
                        help="also time building N prompt-tail pools' problem (see the "
                             "module docstring)")
    parser.add_argument("--baseline-src", type=Path, default=None, metavar="DIR",
                        help="with --build-pools: also time the build in DIR (another "
                             "checkout's src), side by side")
    parser.add_argument("--pooled", action="store_true",
                        help="time the operator's plan per instance and pooled instead "
                             "(see the module docstring)")
    parser.add_argument("--time-limit", type=float, default=None, metavar="S",
                        help="with --pooled: each solve's time limit, seconds (default: "
                             "the planner's DEFAULT_TIME_LIMIT_S)")
    args = parser.parse_args(argv)
    sizes = [k.strip() for k in args.sizes.split(",") if k.strip()]
    if unknown := [k for k in sizes if k not in TARGETS]:
        parser.error(f"unknown size(s) {', '.join(unknown)}: give a, b or c")
    if args.pooled:
        held = print_pooled(sizes, args.repeats, args.objective, args.time_limit)
        return 1 if (args.check and not held) else 0
    if args.build_pools > 0:
        medians = build_side_by_side(args.build_pools, args.repeats,
                                     args.baseline_src and args.baseline_src.resolve())
        ratio = (f" (baseline / this: {medians['baseline'] / medians['this']:.2f}x)"
                 if "baseline" in medians else "")
        print(f"build of {args.build_pools} prompt-tail pools, median of {args.repeats}: "
              + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in medians.items()) + ratio)
    problems = _problems(args.objective)
    missed = False
    gap = problems["a"][1]().mip_rel_gap if args.gap is None else args.gap
    print(f"objective={args.objective} repeats={args.repeats} mip_rel_gap={gap:g}")
    print(f"{'size':4} {'median_s':>9} {'min_s':>8} {'max_s':>8} {'target_s':>8}  status  detail")
    for key in sizes:
        label, build = problems[key]
        problem = build()
        if args.gap is not None:
            problem = dataclasses.replace(problem, mip_rel_gap=args.gap)
        times: list[float] = []
        result = None
        for _ in range(max(1, args.repeats)):
            t0 = time.perf_counter()
            result = solve(problem)
            times.append(time.perf_counter() - t0)
        assert result is not None
        med = statistics.median(times)
        ok = result.feasible and med < TARGETS[key]
        missed |= not ok
        gpus = sum(n.gpus for n in problem.nodes)
        print(
            f"({key}) {med:9.4f} {min(times):8.4f} {max(times):8.4f} {TARGETS[key]:8.1f}  "
            f"{result.status:7} {label}; {len(problem.nodes)} nodes, {gpus} free GPUs; "
            f"feasible={result.feasible} gap={result.mip_gap:.1e} "
            f"objective={result.objective:.6g} {result.unit}"
        )
    return 1 if (args.check and missed) else 0


if __name__ == "__main__":
    raise SystemExit(main())
