"""Benchmark of the endpoint picker's decision alone: ``PoolRouter.decide`` at 1,000 endpoints.

What ``joulepool bench picker`` measures end to end (gRPC, the body read, the answer
built) holds one core-router decision per request; this times that decision in
process, so that a change to it shows without the transport's noise. A pool of
``--endpoints`` endpoints (``constant``: the picker benchmark's endpoints file, fixed
numbers in three GPU kinds; ``profiles``: the built-in 8B serving profiles, rooms at a
stream, MIAD clocks), ``--inflight`` requests in flight: each iteration decides one
request (the picker benchmark's token counts, every fourth bulk) and reports the
oldest one in flight complete, so every decision also pays for a completion, as in
the picker.

Figures per round (median over ``--rounds`` rounds of ``--decisions`` each, every
round in a fresh process):

    cpu_us p50 / p99     thread CPU time of one decide + report (what a core spends,
                         whatever else the machine runs)
    wall_us p50 / p99    the same by the wall clock (preemption included)

With ``--baseline-src DIR`` (the ``src`` of another checkout, e.g. ``git worktree add
/tmp/ref 895eff6``) every round also runs that source's router (same interpreter and
packages), alternating with this checkout's, so the two are compared under the same
machine load; the ratios are medians of per-round ratios. ``--profile`` prints
cProfile's top functions of this checkout's loop.

    .venv/bin/joulepool bench decide [--endpoints 1000] [--kind constant|profiles]
        [--rounds 5] [--decisions 3000] [--baseline-src /tmp/ref/src] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: (J/token, tokens/s) of the picker benchmark's three kinds (bench_picker.KINDS)
KINDS = ((0.12, 2400.0), (0.2, 1500.0), (0.45, 700.0))
TTFT_S, TPOT_S = 1.0, 0.1


def _pool(n: int, kind: str) -> Any:
    from joulepool.core.controllers import MIADController, miad_step_target_s
    from joulepool.core.profiles import DEFAULT_PROFILES
    from joulepool.core.router import Endpoint, PoolRouter
    from joulepool.core.routing import EndpointModel

    if kind == "constant":
        models = [EndpointModel.constant(e, t) for e, t in KINDS]
    else:
        target = miad_step_target_s(TPOT_S, MIADController.margin)
        models = [EndpointModel.from_profile(p, TPOT_S, serving=(1200.0, 250.0, TTFT_S),
                                             step_target_s=target)
                  for p in DEFAULT_PROFILES[:3]]
    pool = PoolRouter("default.chat")
    pool.ttft_s, pool.tpot_s = TTFT_S, TPOT_S
    pool.set_endpoints(
        Endpoint(f"10.{i // 65000}.{(i // 250) % 250}.{i % 250 + 1}:8000", models[i % 3])
        for i in range(n))
    return pool


def _loop(pool: Any, decisions: int, inflight: int) -> tuple[list[float], list[float]]:
    """Per iteration (decide + one report): thread CPU and wall seconds."""
    from joulepool.core.classes import Tier

    flying: list[Any] = []
    cpu, wall = [], []
    start = time.monotonic()
    for i in range(decisions):
        out, prompt = float(64 + (i * 37) % 512), float(50 + i % 400)
        tier = Tier.BULK if i % 4 == 0 else Tier.INTERACTIVE
        c0, t0 = time.thread_time(), time.perf_counter()
        now = time.monotonic() - start
        flying.append(pool.decide(out, prompt, tier, None, now))
        if len(flying) > inflight:
            d = flying.pop(0)
            pool.report(d.endpoint, d.request_id, 64.0, True, None, now)
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - t0)
    return cpu, wall


def _worker(argv: Sequence[str]) -> None:
    """``--worker N KIND DECISIONS INFLIGHT OUT``: one round, its figures to OUT."""
    import gc

    import numpy as np

    n, kind, decisions, inflight, out = argv
    pool = _pool(int(n), kind)
    _loop(pool, 500, int(inflight))  # warm up
    gc.collect()
    gc.freeze()  # as the routing service does after start-up (kube.service)
    cpu, wall = _loop(pool, int(decisions), int(inflight))
    res = {}
    for name, xs in (("cpu", cpu), ("wall", wall)):
        arr = np.array(xs) * 1e6
        res[f"{name}_us_p50"] = float(np.percentile(arr, 50))
        res[f"{name}_us_p99"] = float(np.percentile(arr, 99))
        res[f"{name}_us_mean"] = float(arr.mean())
    Path(out).write_text(json.dumps(res))


def _round(src: Path | None, args: argparse.Namespace, out: Path) -> dict[str, float]:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [
            env.get("PYTHONPATH")])])
    subprocess.run([sys.executable, __file__, "--worker", str(args.endpoints), args.kind,
                    str(args.decisions), str(args.inflight), str(out)], env=env, check=True)
    res: dict[str, float] = json.loads(out.read_text())
    return res


def _profile(args: argparse.Namespace) -> None:
    import cProfile
    import pstats

    pool = _pool(args.endpoints, args.kind)
    _loop(pool, 500, args.inflight)
    prof = cProfile.Profile()
    prof.runcall(_loop, pool, args.decisions, args.inflight)
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        _worker(argv[1:])
        return 0
    ap = argparse.ArgumentParser(prog="joulepool bench decide", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoints", type=int, default=1000)
    ap.add_argument("--kind", choices=("constant", "profiles"), default="constant")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--decisions", type=int, default=3000)
    ap.add_argument("--inflight", type=int, default=16)
    ap.add_argument("--baseline-src", type=Path, default=None)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    for flag, value in (("--endpoints", args.endpoints), ("--rounds", args.rounds),
                        ("--decisions", args.decisions), ("--inflight", args.inflight)):
        if value < 1:
            print(f"joulepool bench decide: {flag} must be at least 1", file=sys.stderr)
            return 2
    if args.baseline_src is not None and not (args.baseline_src / "joulepool").is_dir():
        print(f"joulepool bench decide: --baseline-src {args.baseline_src}: no joulepool "
              "package there", file=sys.stderr)
        return 2
    if args.profile:
        _profile(args)
        return 0
    import tempfile

    runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            res = {}
            if args.baseline_src is not None:
                base = _round(args.baseline_src.resolve(), args, Path(tmp) / "base.json")
                res.update({f"baseline_{k}": v for k, v in base.items()})
            res.update(_round(None, args, Path(tmp) / "this.json"))
            res["load_average"] = os.getloadavg()[0]
            runs.append(res)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in res.items()),
                  flush=True)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"median of {args.rounds} rounds, {args.endpoints} {args.kind} endpoints, "
          f"{args.decisions} decisions each (decide + one report), load average "
          f"{med['load_average']:.1f}:")
    print(f"  this checkout: CPU p50 {med['cpu_us_p50']:.1f} us p99 {med['cpu_us_p99']:.1f} "
          f"us; wall p50 {med['wall_us_p50']:.1f} us p99 {med['wall_us_p99']:.1f} us")
    if args.baseline_src is not None:
        print(f"  baseline {args.baseline_src}: CPU p50 {med['baseline_cpu_us_p50']:.1f} us "
              f"p99 {med['baseline_cpu_us_p99']:.1f} us; wall p50 "
              f"{med['baseline_wall_us_p50']:.1f} us p99 {med['baseline_wall_us_p99']:.1f} us")
        for key in ("cpu_us_p50", "cpu_us_p99", "cpu_us_mean"):
            ratio = statistics.median(r[key] / r[f"baseline_{key}"] for r in runs)
            print(f"  this / baseline {key}: {ratio:.2f}x (median of per-round ratios)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
