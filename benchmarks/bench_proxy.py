"""Benchmark of the router's OpenAI-compatible proxy: overhead vs calling the engine directly.

Processes (loopback only): ``--engines`` instant OpenAI engines (this script with
``--serve-engine``: an aiohttp server answering ``/v1/completions`` at once with a
fixed completion and ``usage``, or ``--stream-tokens`` SSE chunks) and one
``joulepool router --no-cluster`` whose endpoints file lists them. The engines
answer instantly so the difference measured is the proxy's own work.

A load generator in this process (aiohttp, ``--concurrency`` connections) sends
the same OpenAI request in rounds: one round straight to an engine, one through
the proxy, alternating, ``--runs`` times each (side by side in one run, so machine
noise hits both alike). Figures per mode (non-streaming, streaming):

    direct p50 / proxied p50    client round trip, median over the runs of each run's p50
    added p50                   proxied p50 - direct p50 (median over runs of the paired
                                difference)
    proxied req/s per core      requests / CPU seconds the router process used
                                (user + system, /proc): the rate one core sustains
    router CPU ms per request   its inverse: the proxy's own work per request, which
                                bounds the added latency on an idle machine
    saturated req/s per core    the same from a round per run at ``--saturate``
                                connections (default 32), the router busy: a throughput
                                figure, as requests in flight share the event loop's
                                wake-ups and system calls (one connection at a time
                                pays every wake-up alone)

On a shared, loaded machine the latency figures carry the machine's scheduling
noise; the CPU figures much less so.

With ``--baseline-src DIR`` (the ``src`` folder of another checkout, e.g. ``git
worktree add /tmp/ref main``), a second router runs from that source (same
interpreter and packages, ``PYTHONPATH=DIR``) and each run measures it right after
this checkout's, against the same engine, so the ``baseline`` figures and the
ratios compare the two under the same machine load.

Targets from issue 12: added p50 <= 1 ms; >= 1,000 proxied req/s per core
(non-streaming; ``--check`` holds both per-core figures, one connection and saturated,
to it and exits 1 when a target is missed).

    joulepool bench proxy [--runs 5] [--requests 1000] [--saturate 32]
        [--baseline-src DIR] [--out results/bench_proxy.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

MODEL = "llama-3.1-8b"
POOL = "default.chat"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


# --------------------------------------------------------------------------
# The instant engine (a child process)
# --------------------------------------------------------------------------
def serve_engine(stream_tokens: int) -> None:
    from aiohttp import web

    whole = json.dumps({
        "id": "cmpl-1", "object": "text_completion", "created": 0, "model": MODEL,
        "choices": [{"index": 0, "text": " hi", "logprobs": None, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9},
    }).encode()
    chunk = (b'data: {"id":"cmpl-1","object":"text_completion","created":0,"model":"'
             + MODEL.encode() + b'","choices":[{"index":0,"text":" t","logprobs":null,'
             b'"finish_reason":null}]}\n\n')

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.Response(body=whole, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(stream_tokens):
            await resp.write(chunk)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})  # vLLM's GET /health, for load generators

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        app.router.add_get("/health", health)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        print(f"listening on 127.0.0.1:{port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def spawn(args: list[str], env: dict[str, str] | None = None, timeout_s: float = 120.0
          ) -> tuple[subprocess.Popen[str], str]:
    """Start ``args`` and wait for its first line, ``listening on HOST:PORT``, at most
    ``timeout_s`` seconds; (process, ``HOST:PORT``). RuntimeError (the process killed)
    when the line says otherwise or does not come in time."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()
                                                          if proc.stdout else ""),
                              daemon=True)
    reader.start()
    reader.join(timeout_s)
    if reader.is_alive():
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{args[:4]} printed no start-up line in {timeout_s:.0f} s: "
                           f"killed")
    line = lines[0]
    if "listening on" not in line:
        proc.kill()
        _, err = proc.communicate()
        raise RuntimeError(f"{args[:4]} did not start: {line}{err}")
    return proc, line.split()[-1].removeprefix("http://")


def start_engines(n: int, stream_tokens: int, procs: list[subprocess.Popen[str]]
                  ) -> list[str]:
    """``n`` instant engines (:func:`serve_engine`, each in its own process, appended to
    ``procs``) streaming ``stream_tokens`` chunks; their ``HOST:PORT`` addresses."""
    engines = []
    for _ in range(n):
        proc, addr = spawn([sys.executable, __file__, "--serve-engine",
                            "--stream-tokens", str(stream_tokens)])
        procs.append(proc)
        engines.append(addr)
    return engines


def stop_all(procs: list[subprocess.Popen[str]], grace_s: float = 10.0) -> None:
    """Terminate the processes and reap each: one still running ``grace_s`` seconds
    later is killed (SIGKILL) and reaped, and the rest are still stopped."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def proxy_and_direct(engines: int, stream_tokens: int, workdir: Path, runs: int, tool: str,
                     run_one: Callable[[str, str], Any]) -> dict[str, list[Any]]:
    """Drive a load generator at the proxy and at one engine directly, side by side.

    Starts ``engines`` instant engines (``stream_tokens`` chunks each) and the routing
    service over them (endpoints file in ``workdir``), then calls ``run_one(target,
    label)`` ``runs`` times for each target, alternating which goes first in each run so
    that neither always meets a warmer machine; ``target`` is ``HOST:PORT`` (no scheme),
    ``label`` ``direct-run1``, ``proxy-run1`` .... Returns each target's results in run
    order, ``{"direct": [...], "proxy": [...]}``. Every process it started is stopped
    before it returns or raises."""
    procs: list[subprocess.Popen[str]] = []
    results: dict[str, list[Any]] = {"direct": [], "proxy": []}
    try:
        urls = start_engines(engines, stream_tokens, procs)
        ep_file = workdir / "endpoints.json"
        write_endpoints(ep_file, urls)
        router, _ = start_router(ep_file, None, procs)
        targets = {"direct": urls[0], "proxy": router}
        print(f"{tool}: {engines} instant engine(s) {', '.join(urls)}; proxy "
              f"(joulepool router) {router}; direct: {urls[0]}", flush=True)
        for i in range(runs):
            for name in (["direct", "proxy"] if i % 2 == 0 else ["proxy", "direct"]):
                results[name].append(run_one(targets[name], f"{name}-run{i + 1}"))
    finally:
        stop_all(procs)
    return results


# --------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------
async def one_round(session: aiohttp.ClientSession, url: str, body: bytes, n: int,
                    concurrency: int) -> list[float]:
    """``n`` requests at ``concurrency``; each request's round trip in ms."""
    times: list[float] = []
    counter = iter(range(n))

    async def worker() -> None:
        for _ in counter:
            t0 = time.perf_counter()
            async with session.post(url, data=body,
                                    headers={"Content-Type": "application/json"}) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status} from {url}")
            times.append((time.perf_counter() - t0) * 1e3)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return times


def _p50_and_cpu(times: list[float], cpu: float, n: int) -> tuple[float, float]:
    return float(np.percentile(times, 50)), (n / cpu if cpu > 0 else float("nan"))


async def saturated_round(addr: str, pid: int, body: bytes, n: int, concurrency: int
                          ) -> tuple[float, float]:
    """``n`` proxied requests at ``concurrency`` (the router saturated) on fresh
    connections (the router closes idle ones, so none is kept between rounds): requests
    per router CPU-second and per wall-clock second."""
    url = f"http://{addr}/v1/completions"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        await one_round(s, url, body, concurrency, concurrency)  # connections open
        cpu0, t0 = cpu_seconds(pid), time.perf_counter()
        await one_round(s, url, body, n, concurrency)
        cpu, wall = cpu_seconds(pid) - cpu0, time.perf_counter() - t0
    return (n / cpu if cpu > 0 else float("nan")), n / wall


async def measure(engine: str, routers: dict[str, tuple[str, int]], stream: bool, runs: int,
                  requests: int, concurrency: int, saturate: int = 0) -> dict[str, Any]:
    """Rounds straight to ``engine`` and through each router (name -> (address, pid)),
    alternating; per router: p50, added p50 and requests per router CPU-second; with
    ``saturate`` > 0, also a round per run at that many connections (throughput)."""
    body = json.dumps({"model": MODEL, "prompt": "hello world", "max_tokens": 16,
                       "stream": stream}).encode()
    direct_url = f"http://{engine}/v1/completions"
    direct_p50: list[float] = []
    proxied: dict[str, list[tuple[float, float]]] = {name: [] for name in routers}
    saturated: dict[str, list[tuple[float, float]]] = {name: [] for name in routers}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await one_round(session, direct_url, body, 200, concurrency)  # warm up
        for addr, _ in routers.values():
            await one_round(session, f"http://{addr}/v1/completions", body, 200, concurrency)
        for _ in range(runs):
            d = await one_round(session, direct_url, body, requests, concurrency)
            direct_p50.append(float(np.percentile(d, 50)))
            for name, (addr, pid) in routers.items():
                cpu0 = cpu_seconds(pid)
                p = await one_round(session, f"http://{addr}/v1/completions", body,
                                    requests, concurrency)
                proxied[name].append(_p50_and_cpu(p, cpu_seconds(pid) - cpu0, requests))
            for name, (addr, pid) in routers.items():
                if saturate > 0:
                    saturated[name].append(await saturated_round(
                        addr, pid, body, 4 * requests, saturate))
    out: dict[str, Any] = {
        "mode": "streaming" if stream else "non-streaming",
        "runs": runs, "requests_per_run": requests, "concurrency": concurrency,
        "direct_p50_ms": round(statistics.median(direct_p50), 3),
    }
    for name, figures in proxied.items():
        prefix = "" if name == "this" else f"{name}_"
        added = [p - d for (p, _), d in zip(figures, direct_p50, strict=True)]
        per_core = statistics.median(c for _, c in figures)
        out.update({
            f"{prefix}proxied_p50_ms": round(statistics.median(p for p, _ in figures), 3),
            f"{prefix}added_p50_ms": round(statistics.median(added), 3),
            f"{prefix}added_p50_ms_runs": [round(x, 3) for x in added],
            f"{prefix}proxied_req_per_s_per_core": round(per_core, 1),
            f"{prefix}router_cpu_ms_per_request": round(1e3 / per_core, 3),
        })
        if saturated[name]:
            out.update({
                f"{prefix}saturated_req_per_s_per_core": round(statistics.median(
                    c for c, _ in saturated[name]), 1),
                f"{prefix}saturated_req_per_s": round(statistics.median(
                    w for _, w in saturated[name]), 1),
            })
    if "baseline" in proxied:
        out["cpu_ratio_baseline_over_this"] = round(statistics.median(
            c / b for (_, c), (_, b) in zip(proxied["this"], proxied["baseline"],
                                            strict=True)), 3)
    return out


def write_endpoints(path: Path, engines: list[str]) -> None:
    """The router's endpoints file: one interactive pool ``POOL`` serving ``MODEL`` on
    ``engines`` (``HOST:PORT``)."""
    path.write_text(json.dumps({"pools": {POOL: {
        "model": MODEL, "tier": "interactive",
        "slo": {"ttftSeconds": 1.0, "tpotSeconds": 0.1},
        "endpoints": [{"address": e, "joulesPerToken": 0.1 + 0.01 * i,
                       "tokensPerSecond": 1000} for i, e in enumerate(engines)],
    }}}))


def start_router(ep_file: Path, src: Path | None, procs: list[subprocess.Popen[str]]
                  ) -> tuple[str, int]:
    """A router (from ``src`` when given) proxying to the endpoints file; (address, pid)."""
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [
            env.get("PYTHONPATH")])])
    router, addr = spawn([
        sys.executable, "-m", "joulepool.cli", "router", "--no-cluster",
        "--endpoints-file", str(ep_file), "--host", "127.0.0.1", "--port", "0",
        "--scrape-interval-seconds", "0", "--file-poll-seconds", "0"], env)
    procs.append(router)
    return addr, router.pid


# --------------------------------------------------------------------------
# Shared by the published load generators' benches (bench guidellm, inference_perf)
# --------------------------------------------------------------------------
def positive_rates(text: str) -> list[float]:
    """``"5,20"`` -> [5.0, 20.0]: requests per second, each finite and > 0, no repeats.
    argparse.ArgumentTypeError otherwise."""
    try:
        rates = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"rates must be numbers separated by commas: "
                                         f"{text!r}") from None
    if not all(math.isfinite(r) and r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be finite and > 0: {text!r}")
    if len(set(rates)) != len(rates):
        raise argparse.ArgumentTypeError(f"rates repeat: {text!r}")
    return rates


def positive_int(text: str) -> int:
    """``text`` as an integer >= 1; argparse.ArgumentTypeError otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text!r}")
    return value


def load_generator_arguments(ap: argparse.ArgumentParser, tool: str, stage: str) -> None:
    """The options every published load generator's bench takes, added to ``ap``:
    ``--rates`` (one ``stage`` each), ``--profile``, ``--runs``, ``--engines``,
    ``--prompt-tokens``, ``--output-tokens``, ``--no-stream``, ``--quiet`` (hide
    ``tool``'s console output) and ``--out``. Each bench adds its own after them."""
    ap.add_argument("--rates", type=positive_rates, default=[5.0, 20.0],
                    help=f"requests per second, one {stage} each (default 5,20)")
    ap.add_argument("--profile", choices=("constant", "poisson"), default="constant",
                    help="arrivals at each rate: evenly spaced or Poisson")
    ap.add_argument("--runs", type=positive_int, default=1,
                    help="runs per target, alternating the targets' order (medians)")
    ap.add_argument("--engines", type=positive_int, default=2,
                    help="instant engines behind the proxy (direct: the first)")
    ap.add_argument("--prompt-tokens", type=positive_int, default=128)
    ap.add_argument("--output-tokens", type=positive_int, default=32,
                    help="tokens asked for; the instant engines stream that many chunks")
    ap.add_argument("--no-stream", dest="stream", action="store_false",
                    help="non-streaming requests (no time to first token or between "
                         "tokens then)")
    ap.add_argument("--quiet", action="store_true", help=f"hide {tool}'s console output")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON")


def median_figures(runs: Sequence[Mapping[float, Mapping[str, Any]]],
                   labels: Sequence[str]) -> dict[float, dict[str, Any]]:
    """Per rate and figure (``labels``), the median over ``runs`` (a load generator's
    figures per rate, one mapping per run) of the values present (None when none is);
    request counts (``completed``, ``errored``) summed."""
    rates = sorted({rate for run in runs for rate in run})
    out: dict[float, dict[str, Any]] = {}
    for rate in rates:
        rows = [run[rate] for run in runs if rate in run]
        merged: dict[str, Any] = {}
        for label in labels:
            values = [row[label] for row in rows if row.get(label) is not None]
            merged[label] = statistics.median(values) if values else None
        for count in ("completed", "errored"):
            merged[count] = sum(int(row.get(count, 0)) for row in rows)
        out[rate] = merged
    return out


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}" if abs(value) < 10 else f"{value:,.1f}"


def comparison_table(direct: Mapping[float, Mapping[str, Any]],
                     proxied: Mapping[float, Mapping[str, Any]],
                     labels: Sequence[str]) -> str:
    """The figures (``labels``) side by side, one line per rate and
    figure: direct, proxy, proxy / direct (``-`` where either is missing or direct is
    0), then each target's completed and errored requests."""
    header = f"{'rate':>7}  {'figure':<15} {'direct':>10} {'proxy':>10} {'proxy/direct':>13}"
    lines = [header, "-" * len(header)]
    for rate in sorted(set(direct) | set(proxied)):
        d, p = direct.get(rate, {}), proxied.get(rate, {})
        for label in labels:
            dv, pv = d.get(label), p.get(label)
            ratio = "-" if dv is None or pv is None or dv == 0 else f"{pv / dv:.2f}x"
            lines.append(f"{rate:>7g}  {label:<15} {_cell(dv):>10} {_cell(pv):>10} "
                         f"{ratio:>13}")
        lines.append(f"{rate:>7g}  {'requests':<15} {_requests(d):>10} {_requests(p):>10}")
    return "\n".join(lines)


def report_side_by_side(runs: Mapping[str, Sequence[Mapping[float, Mapping[str, Any]]]],
                        labels: Sequence[str], bench: str, headline: str,
                        settings: Mapping[str, Any], out: Path | None, load: float) -> int:
    """Print and keep a load generator's figures, proxy against direct: ``runs`` as
    :func:`proxy_and_direct` returns them, reduced to medians (:func:`median_figures`),
    printed after ``headline`` as :func:`comparison_table`; with ``out``, written as
    JSON (the machine, ``settings``, both targets' medians and every run). Exit code:
    1 when any request errored (the message names ``joulepool bench <bench>``), else 0."""
    direct = median_figures(runs["direct"], labels)
    proxied = median_figures(runs["proxy"], labels)
    print(f"\n{headline}")
    print(comparison_table(direct, proxied, labels))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "load_average": load},
            **settings,
            "direct": {f"{r:g}": v for r, v in direct.items()},
            "proxy": {f"{r:g}": v for r, v in proxied.items()},
            "each_run": {name: [{f"{r:g}": v for r, v in run.items()} for run in side]
                         for name, side in runs.items()},
        }, indent=2))
    errored = sum(row["errored"] for side in (direct, proxied) for row in side.values())
    if errored:
        print(f"bench {bench}: {errored} request(s) failed (see the load generator's "
              f"output above)", file=sys.stderr)
        return 1
    return 0


def _requests(row: Mapping[str, Any]) -> str:
    if not row:
        return "-"
    errored = int(row.get("errored", 0))
    return f"{int(row.get('completed', 0))}" + (f" ({errored} err)" if errored else "")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_proxy",
                                 description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--requests", type=int, default=1000, help="requests per round")
    ap.add_argument("--concurrency", type=int, default=1,
                    help="connections (1: latency without queueing in the router)")
    ap.add_argument("--saturate", type=int, default=32,
                    help="connections of the throughput round (0: none)")
    ap.add_argument("--engines", type=int, default=2)
    ap.add_argument("--stream-tokens", type=int, default=16)
    ap.add_argument("--baseline-src", type=Path, default=None,
                    help="also measure a router from this source folder, alternating")
    ap.add_argument("--serve-engine", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(argv)
    if args.serve_engine:
        serve_engine(args.stream_tokens)
        return 0
    procs: list[subprocess.Popen[str]] = []
    load = os.getloadavg()[0]
    try:
        engines = start_engines(args.engines, args.stream_tokens, procs)
        with tempfile.TemporaryDirectory() as tmp:
            ep_file = Path(tmp) / "endpoints.json"
            write_endpoints(ep_file, engines)
            routers = {"this": start_router(ep_file, None, procs)}
            if args.baseline_src is not None:
                routers["baseline"] = start_router(ep_file, args.baseline_src.resolve(),
                                                    procs)
            results = [asyncio.run(measure(engines[0], routers, stream, args.runs,
                                           args.requests, args.concurrency, args.saturate))
                       for stream in (False, True)]
    finally:
        stop_all(procs)
    out = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "load_average": load},
           "results": results}
    print(f"load average {load:.1f} (1 min, at the start)")
    for r in results:
        for prefix, label in (("", "this checkout"), ("baseline_", "baseline")):
            if f"{prefix}proxied_p50_ms" not in r:
                continue
            print(f"{r['mode']:>13} {label}: direct p50 {r['direct_p50_ms']:.3f} ms, proxied "
                  f"p50 {r[prefix + 'proxied_p50_ms']:.3f} ms, added p50 "
                  f"{r[prefix + 'added_p50_ms']:.3f} ms (runs "
                  f"{r[prefix + 'added_p50_ms_runs']}), proxied "
                  f"{r[prefix + 'proxied_req_per_s_per_core']:.0f} req/s per core "
                  f"({r[prefix + 'router_cpu_ms_per_request']:.3f} ms CPU per request)")
            if f"{prefix}saturated_req_per_s_per_core" in r:
                print(f"{'':>13} {label} saturated ({args.saturate} connections): "
                      f"{r[prefix + 'saturated_req_per_s_per_core']:.0f} req/s per core, "
                      f"{r[prefix + 'saturated_req_per_s']:.0f} req/s wall")
        if "cpu_ratio_baseline_over_this" in r:
            print(f"{r['mode']:>13}: router CPU per request, baseline / this checkout "
                  f"{r['cpu_ratio_baseline_over_this']:.2f}x (median of per-run ratios)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2))
    plain = results[0]
    per_core = [plain[k] for k in ("proxied_req_per_s_per_core",
                                   "saturated_req_per_s_per_core") if k in plain]
    missed = plain["added_p50_ms"] > 1.0 or min(per_core) < 1000
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
