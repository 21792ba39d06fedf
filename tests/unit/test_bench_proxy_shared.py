"""What ``bench_proxy`` shares with ``bench guidellm`` and ``bench inference_perf``:
its process handling (a child that never prints its start-up line is killed, and
stopping reaps every child, one that ignores SIGTERM included), the argument types,
the medians over runs and the side-by-side table."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
from bench_helpers import load_bench

_IGNORES_SIGTERM = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                    "print('ready', flush=True); time.sleep(600)")


@pytest.fixture(scope="module")
def bench():
    yield from load_bench("bench_proxy.py")


def test_a_child_without_its_start_up_line_is_killed(bench, monkeypatch) -> None:
    started: list[subprocess.Popen[str]] = []
    real_popen = subprocess.Popen

    def recording_popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(bench.subprocess, "Popen", recording_popen)
    with pytest.raises(RuntimeError, match="no start-up line"):
        bench.spawn([sys.executable, "-c", "import time; time.sleep(600)"], timeout_s=0.5)
    assert started[0].poll() is not None


def test_stopping_reaps_every_child_one_ignoring_sigterm_included(bench) -> None:
    procs = []
    for code in (_IGNORES_SIGTERM, "import time; print('ready', flush=True); time.sleep(600)",
                 _IGNORES_SIGTERM):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        procs.append(proc)
    bench.stop_all(procs, grace_s=0.2)
    assert [p.returncode for p in procs] == [-9, -15, -9]


@pytest.mark.parametrize("text", ["0", "5,x", "5,5", "nan", "-1", ""])
def test_bad_rates_are_refused(bench, text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        bench.positive_rates(text)


def test_rates_and_positive_integers_parse(bench) -> None:
    assert bench.positive_rates("5,20.5") == [5.0, 20.5]
    assert bench.positive_int("3") == 3
    for text in ("0", "1.5", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.positive_int(text)


LABELS = ("req/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "latency p50 ms")


def _row(bench, value: float | None, completed: int = 10, errored: int = 0) -> dict:
    row = {label: value for label in LABELS}
    row.update(completed=completed, errored=errored)
    return row


def test_medians_over_runs_skip_missing_values_and_sum_requests(bench) -> None:
    runs = [{5.0: _row(bench, 1.0)}, {5.0: _row(bench, 9.0, errored=1)},
            {5.0: _row(bench, 2.0)}, {20.0: _row(bench, None)}]
    merged = bench.median_figures(runs, LABELS)
    assert merged[5.0]["req/s"] == 2.0
    assert merged[5.0]["completed"] == 30 and merged[5.0]["errored"] == 1
    assert merged[20.0]["TTFT p50 ms"] is None


def test_table_gives_the_ratio_proxy_over_direct(bench) -> None:
    direct = {5.0: _row(bench, 2.0)}
    proxied = {5.0: _row(bench, 3.0, errored=2)}
    proxied[5.0]["ITL p50 ms"] = None
    direct[5.0]["TTFT p99 ms"] = 0.0
    lines = bench.comparison_table(direct, proxied, LABELS).splitlines()
    latency = next(line for line in lines if "latency p50 ms" in line)
    assert latency.split()[-3:] == ["2", "3", "1.50x"]
    itl = next(line for line in lines if "ITL p50 ms" in line)
    assert itl.split()[-2:] == ["-", "-"]
    ttft = next(line for line in lines if "TTFT p99 ms" in line)
    assert ttft.split()[-1] == "-"  # direct 0: no ratio
    requests = next(line for line in lines if "requests" in line)
    assert "10 (2 err)" in requests


def test_the_report_keeps_settings_medians_and_every_run_and_fails_on_errors(
        bench, tmp_path, capsys) -> None:
    import json

    runs = {"direct": [{5.0: _row(bench, 2.0)}, {5.0: _row(bench, 4.0)}],
            "proxy": [{5.0: _row(bench, 3.0)}, {5.0: _row(bench, 5.0, errored=1)}]}
    out = tmp_path / "figures" / "run.json"
    rc = bench.report_side_by_side(runs, LABELS, "guidellm", "the headline",
                                   {"rates": [5.0]}, out, 1.5)
    assert rc == 1  # one proxied request errored
    printed = capsys.readouterr()
    assert "the headline" in printed.out and "1.33x" in printed.out  # medians 3 and 4
    assert "bench guidellm: 1 request(s) failed" in printed.err
    kept = json.loads(out.read_text())
    assert kept["rates"] == [5.0] and kept["machine"]["load_average"] == 1.5
    assert kept["direct"]["5"]["req/s"] == 3.0 and kept["proxy"]["5"]["req/s"] == 4.0
    assert len(kept["each_run"]["proxy"]) == 2
    runs["proxy"][1][5.0]["errored"] = 0
    assert bench.report_side_by_side(runs, LABELS, "guidellm", "h", {}, None, 0.0) == 0
