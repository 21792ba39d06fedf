"""``joulepool bench picker`` runs end to end on a small pool: the saturated runs and
the run at an offered rate complete exchanges over real gRPC, the offered rate is
what paces the open-loop run, and the synchronous-server floor answers the gateway's
messages (no timing asserted: the speed figures are the benchmark's, not a test's)."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
from bench_helpers import load_bench


@pytest.fixture(scope="module")
def bench():
    yield from load_bench("bench_picker.py")


def test_saturated_and_paced_runs_complete(bench, tmp_path: Path) -> None:
    out = tmp_path / "picker.json"
    rates, seconds = (40.0, 80.0), 1.0
    assert bench.main(["--endpoints", "30", "--runs", "1", "--seconds", str(seconds),
                       "--concurrency", "4", "--rate", "40,80", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    med = doc["median"]
    assert med["decisions"] > 0
    assert med["request_only_decisions"] > 0
    assert med["decisions_per_core_s"] > 0
    assert doc["rates"] == list(rates)
    assert doc["load_generator"] == ("native" if bench.loadgen_unavailable() is None
                                     else "python")
    for rate in rates:
        # open loop: about rate x seconds arrivals (Poisson), not as many as fit
        assert 0 < med[f"paced_{rate:g}_decisions"] <= 3 * rate * seconds
        assert med[f"paced_{rate:g}_p99_ms"] >= med[f"paced_{rate:g}_p50_ms"] > 0
        # the router's own histograms over the same window, read from its /metrics
        for part in ("decision", "pick"):
            assert (med[f"paced_{rate:g}_server_{part}_p99_ms"]
                    >= med[f"paced_{rate:g}_server_{part}_p50_ms"] > 0)
    assert med["in_process_p50_ms"] > 0
    # both front ends side by side in the run (the compiled one where it is built)
    from joulepool.router import epp_native

    front_ends = doc["front_ends"]
    if epp_native.UNAVAILABLE is None:
        assert front_ends == ["native", "python"]
        assert med["python_decisions"] > 0 and med["python_request_only_decisions"] > 0
        assert med["ratio_python_decisions_per_core_s"] > 0
        assert med["paced_40_server_queue_p99_ms"] > 0  # the native front end's alone
        assert "python_paced_40_server_queue_p99_ms" not in med
    else:
        assert front_ends == ["python"]


def test_python_load_generator_is_the_fallback(bench, tmp_path: Path) -> None:
    out = tmp_path / "picker.json"
    assert bench.main(["--endpoints", "30", "--runs", "1", "--seconds", "0.5",
                       "--concurrency", "2", "--rate", "40", "--front-ends", "python",
                       "--load-generator", "python", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["load_generator"] == "python"
    assert doc["median"]["paced_40_decisions"] > 0


@pytest.mark.parametrize("rate", ["fast", "-5", "inf", "200,nan"])
def test_bad_rates_are_usage_errors(bench, rate: str) -> None:
    assert bench.main(["--rate", rate]) == 2


@pytest.mark.parametrize("flags", [["--cpu", "99999"], ["--client-cpu", "-1"],
                                   ["--fifo", "0"], ["--fifo", "100"],
                                   ["--saturated-client-fifo", "0"]])
def test_bad_placement_is_a_usage_error(bench, flags: list[str], capsys) -> None:
    """A CPU the process may not run on, or a priority SCHED_FIFO does not have: exit 2
    with the reason, before any server starts (the pinning shim failed in the child)."""
    assert bench.main(flags) == 2
    assert flags[0] in capsys.readouterr().err


def test_unknown_load_generator_is_a_usage_error(bench) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["--load-generator", "rust"])
    assert exc.value.code == 2


def test_histogram_quantile_interpolates_as_prometheus(bench) -> None:
    from joulepool.router.epp import LATENCY_BUCKETS

    counts = [0] * (len(LATENCY_BUCKETS) + 1)
    assert math.isnan(bench.histogram_quantile(0.99, counts))
    counts[0] = 10  # all in (0, first bound]: linear within it
    assert bench.histogram_quantile(0.5, counts) == pytest.approx(LATENCY_BUCKETS[0] / 2)
    counts[3] = 10  # half in (b2, b3]: p75 is the middle of that bucket
    mid = (LATENCY_BUCKETS[2] + LATENCY_BUCKETS[3]) / 2
    assert bench.histogram_quantile(0.75, counts) == pytest.approx(mid)
    counts[-1] = 80  # above every bound: the last bound, as histogram_quantile says
    assert bench.histogram_quantile(0.99, counts) == LATENCY_BUCKETS[-1]


@pytest.mark.parametrize("rate", [0.0, 100.0])
def test_native_load_generator_plays_full_exchanges(bench, tmp_path: Path,
                                                    rate: float) -> None:
    """The compiled load generator against the picker: closed loop and open loop, every
    exchange completed with status OK, waits that are waits, the router's learning fed
    (its completions counted), the Poisson rate what paces the open loop."""
    if bench.loadgen_unavailable() is not None:
        pytest.skip(bench.loadgen_unavailable())
    path = tmp_path / "endpoints.json"
    bench.endpoints_file(path, 30)
    port = bench._free_port()
    server = bench._start_server(path, port, None, 4)
    try:
        before = server.latency()
        done, waits = bench._drive(port, 1.0, 4, True, 1, tmp_path, rate,
                                   bench.Clients("native"))
        after = server.latency()
    finally:
        server.proc.terminate()
        server.proc.wait(10)
    assert done == len(waits) > 0
    assert all(0 < w < 10 for w in waits)
    if rate:
        assert done <= 3 * rate
    picked = sum(after["decision"][0]) - sum(before["decision"][0])
    assert picked == done  # one pick per exchange, each seen by the server
    res = json.loads((tmp_path / "client0.json").read_text())
    assert res["errors"] == 0 and res["unfinished"] == 0
    assert len(res["lags"]) == (done if rate else 0)


def test_native_load_generator_refuses_bad_arguments(bench, tmp_path: Path) -> None:
    import subprocess

    if bench.loadgen_unavailable() is not None:
        pytest.skip(bench.loadgen_unavailable())
    bad = tmp_path / "messages.bin"
    bad.write_bytes(b"\x05\x00\x00\x00ab")  # a length past the end
    out = str(tmp_path / "out.json")
    for argv in (["1", "1"], ["1", "0", "10", "1", "1", str(bad), out],
                 ["1", "1", "10", "1", "1", str(bad), out]):
        res = subprocess.run([str(bench.LOADGEN), *argv], capture_output=True, text=True,
                             timeout=30)
        assert res.returncode == 2, (argv, res.stderr)
        assert "eppload" in res.stderr or "usage" in res.stderr


def test_unknown_front_end_is_a_usage_error(bench) -> None:
    assert bench.main(["--front-ends", "rust"]) == 2


def test_sync_floor_serves_full_exchanges(bench, tmp_path: Path) -> None:
    path = tmp_path / "endpoints.json"
    bench.endpoints_file(path, 3)
    port = bench._free_port()
    proc = bench._start_router(path, port, bench.SYNC_FLOOR, 4)
    try:
        done, waits = asyncio.run(bench._load(port, 0.5, 4, respond=True))
    finally:
        proc.terminate()
        proc.wait(10)
    assert done == len(waits) > 0


async def _one_full_exchange_then_eof(port: int, bench) -> object:
    """A full exchange without the gateway's half-close; what the next read gives."""
    import grpc
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = pb_grpc.ExternalProcessorStub(channel).Process()
        for msg in bench._messages(0):
            await call.write(msg)
            await call.read()
        return await asyncio.wait_for(call.read(), 10)


@pytest.mark.parametrize("which", ["FLOOR", "SYNC_FLOOR", "NATIVE_FLOOR"])
def test_the_floors_close_the_stream_as_the_picker_does(bench, tmp_path: Path,
                                                        which: str) -> None:
    import grpc

    from joulepool.router import epp_native

    if which == "NATIVE_FLOOR" and epp_native.UNAVAILABLE is not None:
        pytest.skip(epp_native.UNAVAILABLE)

    path = tmp_path / "endpoints.json"
    bench.endpoints_file(path, 3)
    port = bench._free_port()
    proc = bench._start_router(path, port, getattr(bench, which), 4)
    try:
        assert asyncio.run(_one_full_exchange_then_eof(port, bench)) is grpc.aio.EOF
    finally:
        proc.terminate()
        proc.wait(10)


def test_cpu_confines_the_router_and_all_its_threads(bench, tmp_path: Path) -> None:
    import os

    path = tmp_path / "endpoints.json"
    bench.endpoints_file(path, 3)
    port = bench._free_port()
    cpu = max(os.sched_getaffinity(0))
    proc = bench._start_router(path, port, None, 4, cpu)
    try:
        asyncio.run(bench._load(port, 0.3, 2, respond=True))  # gRPC's threads started
        threads = os.listdir(f"/proc/{proc.pid}/task")
        assert len(threads) > 1
        assert all(os.sched_getaffinity(int(t)) == {cpu} for t in threads)
    finally:
        proc.terminate()
        proc.wait(10)


def test_fifo_without_the_right_to_it_is_a_usage_error(tmp_path: Path) -> None:
    """``--fifo`` where children may not run under SCHED_FIFO (no CAP_SYS_NICE, an
    RLIMIT_RTPRIO of 0): exit 2 saying so, before any server starts (it used to fail
    inside the first child: "router did not start: PermissionError")."""
    import os
    import resource
    import shutil
    import subprocess
    import sys

    prefix: list[str] = []
    if os.geteuid() == 0:  # root: drop CAP_SYS_NICE for the child
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv (util-linux) is needed to drop CAP_SYS_NICE as root")
        prefix = ["setpriv", "--bounding-set", "-sys_nice", "--inh-caps", "-sys_nice"]

    def no_rtprio() -> None:
        resource.setrlimit(resource.RLIMIT_RTPRIO, (0, 0))

    probe = subprocess.run([*prefix, sys.executable, "-c",
                            "import os; os.sched_setscheduler(0, os.SCHED_FIFO, "
                            "os.sched_param(10))"], preexec_fn=no_rtprio,
                           capture_output=True, check=False)
    if probe.returncode == 0:
        pytest.skip("SCHED_FIFO is permitted here even without CAP_SYS_NICE")
    bench_dir = Path(__file__).resolve().parents[2] / "benchmarks"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import bench_picker; "
            "sys.exit(bench_picker.main(['--fifo', '10', '--runs', '1', '--seconds', "
            "'0.1', '--endpoints', '3']))")
    run = subprocess.run([*prefix, sys.executable, "-c", code, str(bench_dir)],
                         preexec_fn=no_rtprio, capture_output=True, text=True,
                         check=False, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "--fifo 10" in run.stderr and "CAP_SYS_NICE" in run.stderr
    assert "router did not start" not in run.stderr + run.stdout


def test_a_baseline_without_the_compiled_front_end_is_a_usage_error(bench, tmp_path: Path,
                                                                    capsys) -> None:
    """Side by side on the native front end, a baseline source whose compiled front end
    is not built would serve the Python one: the figures would compare front ends, not
    sources. Exit 2 saying so (a Python-only comparison is still allowed)."""
    from joulepool.router import epp_native

    if epp_native.UNAVAILABLE is not None:
        pytest.skip("the compiled front end is not built here (make native)")
    (tmp_path / "joulepool" / "router").mkdir(parents=True)
    assert bench.main(["--baseline-src", str(tmp_path), "--front-ends", "native"]) == 2
    assert "compiled front end is not built" in capsys.readouterr().err
    assert bench.main(["--baseline-src", str(tmp_path / "nowhere"),
                       "--front-ends", "native"]) == 2
    assert "no joulepool package" in capsys.readouterr().err


def test_saturated_client_fifo_puts_the_saturated_load_generators_alone_under_fifo(
        bench, monkeypatch, tmp_path: Path) -> None:
    """``--saturated-client-fifo``: the saturated runs' load generators run under
    SCHED_FIFO (through the pinning shim), their servers and the offered-rate runs do
    not (``--fifo`` alone decides those)."""
    import argparse
    import sys

    runs = []
    monkeypatch.setattr(bench, "one_run", lambda *a, **k: runs.append(
        (a[6] if len(a) > 6 else k.get("rate", 0.0), k.get("how", a[-1]))) or {"x": 1.0})
    args = argparse.Namespace(seconds=1.0, concurrency=2, clients=1, cpu=None, rates=[50.0],
                              how=bench.Clients("python", None, None),
                              saturated_client_fifo=10)
    bench._measure(tmp_path / "endpoints.json", args, None)
    assert [(rate, how.fifo, how.client_fifo) for rate, how in runs] == [
        (0.0, None, 10), (0.0, None, 10), (50.0, None, None)]
    started = []
    monkeypatch.setattr(bench.subprocess, "Popen", lambda cmd, **kw: started.append(cmd))
    bench._client(1, 1.0, 2, True, 0.0, tmp_path / "out.json", runs[0][1])
    assert started[0][:2] == [sys.executable, "-c"] and started[0][3:5] == ["-", "10"]


def test_a_server_whose_port_was_taken_starts_on_another(bench, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """Another process takes the free port before the server binds it: the server is
    started again on another port (the router's own HTTP port is picked the same way)."""
    import socket

    path = tmp_path / "endpoints.json"
    bench.endpoints_file(path, 3)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        free = bench._free_port
        ports = iter([busy])
        monkeypatch.setattr(bench, "_free_port", lambda: next(ports, None) or free())
        port, proc = bench._on_free_port(
            lambda p: bench._start_router(path, p, bench.FLOOR, 4))
        try:
            assert port != busy
            done, _ = asyncio.run(bench._load(port, 0.3, 2, respond=True))
            assert done > 0
        finally:
            proc.terminate()
            proc.wait(10)


def test_a_server_that_fails_otherwise_is_not_started_again(bench) -> None:
    tries = []

    def start(port: int) -> None:
        tries.append(port)
        raise RuntimeError("router did not start: ImportError")

    with pytest.raises(RuntimeError, match="ImportError"):
        bench._on_free_port(start)
    assert len(tries) == 1
