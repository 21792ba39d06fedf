"""``bench_proxy``'s process handling, shared by ``bench guidellm`` and ``bench
inference_perf``: a child that never prints its start-up line is killed, and stopping
reaps every child, one that ignores SIGTERM included."""

from __future__ import annotations

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
