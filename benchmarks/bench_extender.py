"""Benchmark of ``joulepool extender`` (scheduler verbs over 5,000 nodes) and ``joulepool
router`` (routing over 1,000 endpoints).

Each service runs as its own process (``joulepool extender --no-cluster``,
``joulepool router --no-cluster``) fed from the same generated files: a NodeList
of ``--nodes`` GPU nodes (H100 / A100 / L4 thirds), ``--endpoints`` ready serving
pods bound to them (the router's endpoints, modelled with the default serving
profiles) and a plan that assigns the pool to every H100 and A100 node. A load
generator in this process (an aiohttp client, ``--concurrency`` connections,
loopback only) sends:

    prioritize   ExtenderArgs with a full Pod and NodeNames of all nodes
                 (the nodeCacheCapable form)
    filter       the same body to the filter verb
    filter+mode  filter for a pod that also carries the serving mode label (1xH100):
                 judged against that (pool, mode)'s nodes and GPU shares
    route        POST /v1/route, mixed tiers and token counts
    route+complete   route, then POST /v1/complete for it (the feedback loop)

Each scenario stops after its request budget or ``--time-limit`` seconds.
Figures per scenario:

    server p50/p90/p99/max  the service's own time per request (body read; parse,
                            decide, encode), from its Server-Timing header
    server CPU p50/p99      the same span in CPU time of the service's event-loop
                            thread: what the work costs, without the time the
                            process sat preempted on a busy machine
    client p50/p99          round trip seen by the load generator
    req/s                   wall-clock throughput at this concurrency
    req/s per core          requests / CPU seconds the service process used
                            (user + system, from /proc), i.e. the rate one core sustains

Targets from issue 4: prioritize server p99 <= 5 ms; route server p99 <= 1 ms.
``--check`` makes a missed target exit 1.

    .venv/bin/python benchmarks/bench_extender.py [--out results/bench_extender.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from joulepool.kube import testing as T

POOL = "default.chat"
TARGETS_MS = {"prioritize": 5.0, "route": 1.0}


def build_inputs(workdir: Path, n_nodes: int, n_endpoints: int) -> tuple[Path, Path, list[str]]:
    products = ("H100", "A100", "L4")
    nodes = []
    for i in range(n_nodes):
        product = products[i % 3]
        nodes.append(T.node(f"gpu-{product.lower()}-{i:05d}", product,
                            gpus=4 if product == "L4" else 8,
                            region=("eu-west", "us-east", "ap-south")[i // 3 % 3]))
    names = [n["metadata"]["name"] for n in nodes]
    planned = [n for i, n in enumerate(names) if i % 3 < 2]  # H100 and A100 nodes
    pods = []
    for k in range(n_endpoints):
        node = planned[k % len(planned)]
        pods.append(T.pod(f"chat-{k:05d}", node_name=node, gpus=1, ready=True,
                          ip=f"10.{k // 65536 % 256}.{k // 256 % 256}.{k % 256}"))
    nodes_file = workdir / "nodes.json"
    nodes_file.write_text(json.dumps({"kind": "List", "items": nodes + pods}))
    products_of = {n["metadata"]["name"]: products[i % 3] for i, n in enumerate(nodes)}
    plan = T.plan({POOL: [(n, products_of[n], 4) for n in planned]})
    plan_file = workdir / "plan.json"
    plan_file.write_text(plan.to_json())
    return nodes_file, plan_file, names


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def start_server(nodes_file: Path, plan_file: Path, command: str = "extender"
                 ) -> tuple[subprocess.Popen[str], str]:
    extra = ["--max-nodes", "20000"] if command == "extender" else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "joulepool.cli", command, "--no-cluster",
         "--nodes-file", str(nodes_file), "--plan-file", str(plan_file),
         "--host", "127.0.0.1", "--port", "0", "--scrape-interval-seconds", "0",
         "--file-poll-seconds", "0", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on" not in line:
        err = proc.stderr.read() if proc.stderr else ""
        proc.kill()
        raise RuntimeError(f"{command} did not start: {line}{err}")
    return proc, line.split()[-1]


def _server_ms(headers: Any) -> tuple[float, float]:
    """(wall, CPU) milliseconds from ``Server-Timing: app;dur=W, cpu;dur=C``."""
    out = {}
    for part in headers.get("Server-Timing", "").split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            out[name] = float(dur)
    return out.get("app", float("nan")), out.get("cpu", float("nan"))


async def run_scenario(
    name: str, base: str, pid: int, make: Any, budget: int, warmup: int, concurrency: int,
    time_limit: float,
) -> dict[str, Any]:
    """``make(i)`` -> list of (path, body bytes, verb) requests done in order by one call."""
    server: dict[str, list[float]] = {}
    server_cpu: dict[str, list[float]] = {}
    client: dict[str, list[float]] = {}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int, record: bool) -> None:
            prev: dict[str, Any] = {}
            for path, body, verb in make(i, prev):
                t0 = time.perf_counter()
                async with session.post(base + path, data=body,
                                        headers={"Content-Type": "application/json"}) as r:
                    payload = await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"{verb}: HTTP {r.status}: {payload[:200]!r}")
                    dt = (time.perf_counter() - t0) * 1e3
                    if record:
                        wall_ms, cpu_ms = _server_ms(r.headers)
                        server.setdefault(verb, []).append(wall_ms)
                        server_cpu.setdefault(verb, []).append(cpu_ms)
                        client.setdefault(verb, []).append(dt)
                    if verb == "route":
                        prev.update(json.loads(payload))

        for i in range(warmup):
            await one(i, False)
        counter = iter(range(budget))
        deadline = time.monotonic() + time_limit

        async def worker() -> None:
            for i in counter:
                if time.monotonic() > deadline:
                    return
                await one(i, True)

        cpu0, t0 = cpu_seconds(pid), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0

    out: dict[str, Any] = {"scenario": name, "wall_s": round(wall, 3),
                           "server_cpu_s": round(cpu, 3), "verbs": {}}
    total = sum(len(v) for v in server.values())
    out["requests"] = total
    out["req_per_s"] = round(total / wall, 1) if wall > 0 else None
    out["req_per_s_per_core"] = round(total / cpu, 1) if cpu > 0 else None
    for verb, values in server.items():
        s = np.asarray(values)
        sc = np.asarray(server_cpu[verb])
        c = np.asarray(client[verb])
        out["verbs"][verb] = {
            "n": int(s.size),
            "server_ms": {q: round(float(np.nanpercentile(s, p)), 3)
                          for q, p in (("p50", 50), ("p90", 90), ("p99", 99))}
            | {"max": round(float(np.nanmax(s)), 3)},
            "server_cpu_ms": {q: round(float(np.nanpercentile(sc, p)), 3)
                              for q, p in (("p50", 50), ("p90", 90), ("p99", 99))},
            "client_ms": {q: round(float(np.percentile(c, p)), 3)
                          for q, p in (("p50", 50), ("p99", 99))},
        }
    return out


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="bench_extender", description=(__doc__ or "").split("\n\n")[0]
    )
    ap.add_argument("--nodes", type=int, default=5000)
    ap.add_argument("--endpoints", type=int, default=1000)
    ap.add_argument("--prioritize-requests", type=int, default=1500)
    ap.add_argument("--route-requests", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--time-limit", type=float, default=30.0, help="seconds per scenario")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(list(argv) if argv is not None else None)
    if min(args.nodes, args.endpoints, args.concurrency) < 1:
        ap.error("--nodes, --endpoints and --concurrency must be >= 1")
    return args


Make = Any  # (i, prev) -> iterable of (path, body, verb)


def _scenarios(args: argparse.Namespace, names: list[str]) -> list[tuple[str, Make, int, int,
                                                                            str]]:
    """(name, request maker, budget, warm-up, server) of each scenario; server is
    "extender" or "router"."""
    rng = random.Random(42)
    sched_body = json.dumps(T.extender_args(T.pod("chat-new", gpus=1), names=names)).encode()
    mode_body = json.dumps(T.extender_args(T.pod("chat-new", gpus=1, mode="1xH100"),
                                           names=names)).encode()
    route_bodies = [
        json.dumps({"pool": POOL, "inputTokens": rng.randint(50, 4000),
                    "outputTokens": rng.randint(20, 800),
                    "tier": "bulk" if rng.random() < 0.1 else "interactive"}).encode()
        for _ in range(1000)
    ]

    def prio(i: int, prev: dict[str, Any]) -> list[tuple[str, bytes, str]]:
        return [("/scheduler/prioritize", sched_body, "prioritize")]

    def filt(i: int, prev: dict[str, Any]) -> list[tuple[str, bytes, str]]:
        return [("/scheduler/filter", sched_body, "filter")]

    def filt_mode(i: int, prev: dict[str, Any]) -> list[tuple[str, bytes, str]]:
        return [("/scheduler/filter", mode_body, "filter")]

    def route(i: int, prev: dict[str, Any]) -> list[tuple[str, bytes, str]]:
        return [("/v1/route", route_bodies[i % len(route_bodies)], "route")]

    class RouteThenComplete:
        def __init__(self, i: int, prev: dict[str, Any]) -> None:
            self.i, self.prev = i, prev

        def __iter__(self) -> Any:
            yield "/v1/route", route_bodies[self.i % len(route_bodies)], "route"
            done = {"pool": POOL, "endpoint": self.prev["endpoint"],
                    "requestId": self.prev["requestId"], "ttftSeconds": 0.2,
                    "e2eSeconds": 4.0, "outputTokens": 300,
                    "deadlineMet": self.i % 50 != 0, "joules": 30.0}
            yield "/v1/complete", json.dumps(done).encode(), "complete"

    filters = max(args.prioritize_requests // 3, 1)
    return [
        ("prioritize", prio, args.prioritize_requests, 30, "extender"),
        ("filter", filt, filters, 10, "extender"),
        ("filter+mode", filt_mode, filters, 10, "extender"),
        ("route", route, args.route_requests, 500, "router"),
        ("route+complete", RouteThenComplete, args.route_requests // 2, 200, "router"),
    ]


def _run_all(args: argparse.Namespace) -> tuple[list[dict[str, Any]], float]:
    """Every scenario against an extender and a router process; (results, the
    extender's start-up seconds)."""
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-extender-") as tmp:
        nodes_file, plan_file, names = build_inputs(Path(tmp), args.nodes, args.endpoints)
        t_start = time.perf_counter()
        proc, base = start_server(nodes_file, plan_file)
        startup_s = time.perf_counter() - t_start
        router_proc, router_base = start_server(nodes_file, plan_file, "router")
        servers = {"extender": (proc, base), "router": (router_proc, router_base)}
        try:
            for name, make, budget, warmup, which in _scenarios(args, names):
                server, url = servers[which]
                res = asyncio.run(run_scenario(name, url, server.pid, make, budget, warmup,
                                               args.concurrency, args.time_limit))
                results.append(res)
                print(_line(res), flush=True)
        finally:
            for p in (proc, router_proc):
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
    return results, startup_s


def _verdicts(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target of TARGETS_MS against its scenario's server p99, printed."""
    verdicts = []
    for verb, target in TARGETS_MS.items():
        res = next(r for r in results if r["scenario"] == verb)
        p99 = res["verbs"][verb]["server_ms"]["p99"]
        ok = p99 <= target
        verdicts.append({"verb": verb, "target_p99_ms": target, "p99_ms": p99, "met": ok})
        print(f"target {verb}: server p99 {p99:.3f} ms <= {target} ms: {'MET' if ok else 'MISSED'}")
    return verdicts


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    results, startup_s = _run_all(args)
    verdicts = _verdicts(results)
    report = {
        "benchmark": "extender",
        "nodes": args.nodes, "endpoints": args.endpoints, "concurrency": args.concurrency,
        "startup_s": round(startup_s, 2),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "loadavg_end": os.getloadavg()},
        "scenarios": results, "targets": verdicts,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    print(f"load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    return 1 if args.check and not all(v["met"] for v in verdicts) else 0

def _line(res: dict[str, Any]) -> str:
    parts = [f"{res['scenario']:<15} {res['requests']:>6} req {res['req_per_s']:>8} req/s "
             f"{res['req_per_s_per_core']:>8} req/s/core"]
    for verb, v in res["verbs"].items():
        s, sc, c = v["server_ms"], v["server_cpu_ms"], v["client_ms"]
        parts.append(f"  {verb}: server p50 {s['p50']:.3f} p90 {s['p90']:.3f} "
                     f"p99 {s['p99']:.3f} max {s['max']:.3f} ms (CPU p50 {sc['p50']:.3f} "
                     f"p99 {sc['p99']:.3f}); client p50 {c['p50']:.3f} p99 {c['p99']:.3f} ms")
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
