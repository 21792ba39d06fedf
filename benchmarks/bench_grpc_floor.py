"""Variants of a do-nothing ext_proc server side by side: what grpc.aio's settings buy.

The endpoint picker's CPU per exchange is half gRPC's (``docs/gateway.md``,
"Performance"). This benchmark measures settings of the gRPC server alone: for each
variant a server that decides nothing (every message answered "continue", on
grpc.aio and uvloop as the router) runs in its own process, and ``bench picker``'s
load generator plays the gateway (16 streams, one stream per request, Envoy's
messages), full exchanges then request-only ones, ``--seconds`` each. Every round
runs every variant in turn (``--rounds``; the order reverses each round, so no variant
always runs first); the figures are exchanges per CPU-second of the server process,
medians over the rounds.

Variants (``--variants``, comma-separated):

    picker          the picker's server: epp.SERVER_OPTIONS, the stream closed after
                    the response's last message (bench picker's floor)
    defaults        grpcio's default options, the stream left to the gateway's
                    half-close (the picker before these settings)
    channelz-on     the picker's, with grpcio's default channelz (on)
    wait-eof        the picker's, the stream left to the gateway's half-close
    one-cpu         the picker's, the process on one CPU (``--cpu``, default the last)
    asyncio-loop    the picker's on asyncio's own event loop instead of uvloop
    OPTION=VALUE    the picker's plus this grpc server option (an int when it reads
                    as one), e.g. grpc.http2.bdp_probe=0
    env:NAME=VALUE  the picker's with this environment variable, e.g.
                    env:GRPC_POLL_STRATEGY=poll

Every variant's server has SO_REUSEPORT off (epp.NO_SHARED_PORT), so that a port
another server holds makes it fail to start rather than share that port.

    .venv/bin/joulepool bench grpc_floor [--rounds 5 --seconds 3]
        [--variants picker,defaults,channelz-on,wait-eof,one-cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_VARIANTS = "picker,defaults,channelz-on,wait-eof,one-cpu"


@dataclass
class Variant:
    """One server: its grpc options (None: grpcio's defaults), whether it closes after
    the response's last message, its CPU, environment and event loop."""

    name: str
    options: list[tuple[str, int | str]] | None
    close: bool = True
    cpu: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    loop: str = "uvloop"


def _value(raw: str) -> int | str:
    try:
        return int(raw)
    except ValueError:
        return raw


def variant(name: str, cpu: int) -> Variant:
    """The variant ``name`` (module doc); ValueError for an unknown one."""
    from joulepool.router import epp

    picker = list(epp.SERVER_OPTIONS)
    if name == "picker":
        return Variant(name, picker)
    if name == "defaults":
        return Variant(name, None, close=False)
    if name == "channelz-on":
        return Variant(name, [o for o in picker if o[0] != "grpc.enable_channelz"])
    if name == "wait-eof":
        return Variant(name, picker, close=False)
    if name == "one-cpu":
        return Variant(name, picker, cpu=cpu)
    if name == "asyncio-loop":
        return Variant(name, picker, loop="asyncio")
    if name.startswith("env:") and "=" in name:
        key, raw = name[4:].split("=", 1)
        return Variant(name, picker, env={key: raw})
    if "=" in name:
        key, raw = name.split("=", 1)
        return Variant(name, [*picker, (key, _value(raw))])
    raise ValueError(f"unknown variant {name!r} (see --help)")


def _with_no_shared_port(options: Sequence[Sequence[Any]] | None
                         ) -> list[tuple[Any, ...]]:
    """A variant's server options (None: grpcio's defaults) with
    :data:`joulepool.router.epp.NO_SHARED_PORT` where they do not set that option."""
    from joulepool.router import epp

    chosen = [tuple(o) for o in options or ()]
    if all(o[0] != epp.NO_SHARED_PORT[0] for o in chosen):
        chosen.append(epp.NO_SHARED_PORT)
    return chosen


def _serve(argv: Sequence[str]) -> None:
    """The do-nothing server: ``PORT OPTIONS-JSON CLOSE LOOP`` (OPTIONS null: grpcio's
    defaults)."""
    import grpc
    import uvloop
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

    from joulepool.bench import load_benchmark

    picker = load_benchmark("picker")
    port, raw_options, close, loop = argv
    options = json.loads(raw_options)
    replies = picker._continue_replies()
    closes = close == "1"

    class Continue(pb_grpc.ExternalProcessorServicer):
        async def Process(self, request_iterator: Any, context: Any) -> None:
            while (req := await context.read()) is not grpc.aio.EOF:
                await context.write(replies[req.WhichOneof("request")])
                if closes and picker._last_message(req):
                    return

    async def serve() -> None:
        server = grpc.aio.server(options=_with_no_shared_port(options))
        pb_grpc.add_ExternalProcessorServicer_to_server(Continue(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("floor listening on", port, flush=True)
        await server.wait_for_termination()

    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve())


def measure(v: Variant, seconds: float, tmp: Path) -> tuple[float, float]:
    """(full, request-only) exchanges per CPU-second of variant ``v``'s server."""
    from joulepool.bench import load_benchmark

    picker = load_benchmark("picker")
    out = []
    for respond in (True, False):
        port, proc = picker._on_free_port(lambda p: picker._started(subprocess.Popen(
            picker._pinned([sys.executable, __file__, "--serve", str(p),
                            json.dumps(v.options), "1" if v.close else "0", v.loop], v.cpu),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **v.env})))
        try:
            picker._drive(port, 0.5, 16, respond, 1, tmp)  # warm up
            cpu0 = picker._cpu_seconds(proc.pid)
            done, _ = picker._drive(port, seconds, 16, respond, 1, tmp)
            cpu = picker._cpu_seconds(proc.pid) - cpu0
        finally:
            proc.terminate()
            proc.wait(10)
        out.append(done / cpu if cpu > 0 else float("nan"))
    return out[0], out[1]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--serve"]:
        _serve(argv[1:])
        return 0
    ap = argparse.ArgumentParser(prog="joulepool bench grpc_floor", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--cpu", type=int, default=max(os.sched_getaffinity(0)),
                    help="the CPU of the one-cpu variant")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = ap.parse_args(argv)
    try:
        variants = [variant(n.strip(), args.cpu) for n in args.variants.split(",")
                    if n.strip()]
    except ValueError as exc:
        print(f"joulepool bench grpc_floor: {exc}", file=sys.stderr)
        return 2
    results: dict[str, list[tuple[float, float]]] = {v.name: [] for v in variants}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            loads.append(os.getloadavg()[0])
            for v in (variants if r % 2 == 0 else variants[::-1]):
                results[v.name].append(measure(v, args.seconds, Path(tmp)))
                full, req_only = results[v.name][-1]
                print(f"round {r + 1} {v.name}: full {full:.0f}, request-only "
                      f"{req_only:.0f} per CPU-second", flush=True)
    print(f"medians of {args.rounds} rounds (load average {min(loads):.1f} to "
          f"{max(loads):.1f}), exchanges per CPU-second of the server, full / request-only:")
    med = {}
    for name, got in results.items():
        med[name] = (statistics.median(g[0] for g in got),
                     statistics.median(g[1] for g in got))
        print(f"  {name:40s} {med[name][0]:6.0f} / {med[name][1]:6.0f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rounds": results, "median": med,
                                        "load_average": loads}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
