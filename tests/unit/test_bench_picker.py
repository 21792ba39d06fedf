"""``joulepool bench picker`` runs end to end on a small pool: the saturated runs and
the run at an offered rate complete exchanges over real gRPC, the offered rate is
what paces the open-loop run, and the synchronous-server floor answers the gateway's
messages (no timing asserted: the speed figures are the benchmark's, not a test's)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from bench_helpers import load_bench


@pytest.fixture(scope="module")
def bench():
    yield from load_bench("bench_picker.py")


def test_saturated_and_paced_runs_complete(bench, tmp_path: Path) -> None:
    out = tmp_path / "picker.json"
    rate, seconds = 40.0, 1.0
    assert bench.main(["--endpoints", "30", "--runs", "1", "--seconds", str(seconds),
                       "--concurrency", "4", "--rate", str(rate), "--out", str(out)]) == 0
    med = json.loads(out.read_text())["median"]
    assert med["decisions"] > 0
    assert med["request_only_decisions"] > 0
    assert med["decisions_per_core_s"] > 0
    # open loop: about rate x seconds arrivals (Poisson), not as many as fit
    assert 0 < med["paced_decisions"] <= 3 * rate * seconds
    assert med["paced_p99_ms"] >= med["paced_p50_ms"] > 0
    assert med["in_process_p50_ms"] > 0
    # both front ends side by side in the run (the compiled one where it is built)
    from joulepool.router import epp_native

    front_ends = json.loads(out.read_text())["front_ends"]
    if epp_native.UNAVAILABLE is None:
        assert front_ends == ["native", "python"]
        assert med["python_decisions"] > 0 and med["python_request_only_decisions"] > 0
        assert med["ratio_python_decisions_per_core_s"] > 0
    else:
        assert front_ends == ["python"]


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
