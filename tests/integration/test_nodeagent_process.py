"""The real commands as processes: fake-engine + sidecar sharing a simulated GPU state file.

Signals are real (SIGTERM / SIGINT to the process), the GPU state is the file
both processes share, the SLO signal comes over HTTP from the fake engine.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from joulepool.core.profiles import H100
from joulepool.fakes.gpus import SimulatedGPUs
from joulepool.fakes.killharness import child_env

# the console script's code path (``python -m joulepool.cli`` would load joulepool.cli twice,
# as __main__ and as joulepool.cli, so its UsageError class would not match the commands')
PY = [sys.executable, "-c", "import sys; from joulepool.cli import main; sys.exit(main())"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: deadline of every wait for a process, s: generous, as starting one (Python, numpy,
#: aiohttp) took over 15 s on this 2-core machine at load 12
WAIT_S = 60.0


def wait_for(pred, timeout: float = WAIT_S, every: float = 0.05, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def gpus_in(path: Path) -> list[dict]:
    return json.loads(path.read_text())["gpus"]


def http_get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.read().decode()
    except OSError:
        return None


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> Iterator[tuple[Path, str]]:
    """A node: three simulated H100s in a state file and a fake engine on all three."""
    d = tmp_path_factory.mktemp("node")
    state = d / "gpu-state.json"
    SimulatedGPUs.open(state, "H100", 3, node="kind-worker")
    port = free_port()
    engine = subprocess.Popen(
        [*PY, "fake-engine", "--port", str(port), "--host", "127.0.0.1",
         "--gpu-state", str(state), "--gpu-index", "0,1,2"],
        env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http_get(url + "/health") == "ok", what="fake engine")
        yield state, url
    finally:
        stop(engine)


def start_sidecar(state: Path, *extra: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(
        [*PY, "sidecar", "--backend", "simulated", "--gpu-state", str(state), "--kubernetes",
         "off", "--interval", "0.05", "--metrics-host", "127.0.0.1", "--metrics-port",
         str(port), *extra],
        env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, port


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_agent_walks_clocks_down_then_signal_resets_every_gpu(node, sig):
    state, url = node
    proc, port = start_sidecar(state, "--engine-url", url, "--ttft-slo", "1", "--tpot-slo",
                               "0.1")
    try:
        # an idle engine at a loose SLO: MIAD steps every GPU's clock down
        locked = wait_for(
            lambda: (g := gpus_in(state)) and all(
                x["locked"] and x["locked"][1] <= H100.f_max_mhz.value - 90 for x in g) and g,
            what="clocks locked below f_max on all GPUs")
        assert len(locked) == 3
        metrics = wait_for(lambda: http_get(f"http://127.0.0.1:{port}/metrics"))
        assert 'joulepool_gpu_target_clock_hertz{gpu="2",node=' in metrics
        assert "joulepool_sidecar_monitor_only" in metrics
        assert http_get(f"http://127.0.0.1:{port}/healthz").startswith("ok controlling")
    finally:
        code = stop(proc, sig)
    out = proc.stdout.read() if proc.stdout else ""
    assert code == 0, out
    assert [g["locked"] for g in gpus_in(state)] == [None, None, None], out


def test_stale_locks_are_reset_at_start(node):
    state, _ = node
    gpus = SimulatedGPUs.open(state)
    for i in range(3):
        gpus.set_locked(i, 990.0, 1005.0)  # a predecessor was killed -9 and left these
    proc, _ = start_sidecar(state)  # no engines: nothing to control, only safety
    try:
        wait_for(lambda: all(g["locked"] is None for g in gpus_in(state)),
                 what="stale locks reset")
    finally:
        assert stop(proc) == 0


def test_unprivileged_agent_runs_monitor_only_and_keeps_running(node):
    state, url = node
    proc, port = start_sidecar(state, "--sim-unprivileged", "--engine-url", url,
                               "--ttft-slo", "1", "--tpot-slo", "0.1")
    try:
        metrics = wait_for(
            lambda: (m := http_get(f"http://127.0.0.1:{port}/metrics"))
            and "joulepool_sidecar_monitor_only{node=" in m
            and any(x.startswith("joulepool_gpu_energy_joules_total{") and 'gpu="0"' in x
                    for x in m.splitlines()) and m,
            what="agent metrics")
        line = [x for x in metrics.splitlines()
                if x.startswith("joulepool_sidecar_monitor_only{")]
        assert line and line[0].endswith(" 1.0")
        time.sleep(0.3)  # several periods: still alive, never locked anything
        assert proc.poll() is None
        assert all(g["locked"] is None for g in gpus_in(state))
        assert "monitor-only" in http_get(f"http://127.0.0.1:{port}/healthz")
    finally:
        assert stop(proc) == 0


def test_lowering_the_clock_slows_the_engine_process(node):
    """The sidecar's clock decision reaches the engine process through the file."""
    state, url = node
    gpus = SimulatedGPUs.open(state)

    def completion_seconds() -> float:
        req = urllib.request.Request(url + "/v1/completions", method="POST",
                                     data=json.dumps({"prompt": "hi", "max_tokens": 60}).encode(),
                                     headers={"Content-Type": "application/json"})
        t0 = time.monotonic()
        with urllib.request.urlopen(req, timeout=10) as r:
            assert json.loads(r.read())["usage"]["completion_tokens"] == 60
        return time.monotonic() - t0

    for i in range(3):
        gpus.reset(i)
    fast = min(completion_seconds() for _ in range(2))
    for i in range(3):
        gpus.set_locked(i, 990.0, 990.0)
    time.sleep(0.1)
    slow = min(completion_seconds() for _ in range(2))
    for i in range(3):
        gpus.reset(i)
    assert slow / fast > 1.1, (fast, slow)  # the profile says ~1.23 at half clock


def test_nvml_backend_without_a_driver_fails_clearly():
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA driver")
    except Exception:
        pass
    r = subprocess.run([*PY, "sidecar", "--backend", "nvml", "--kubernetes", "off",
                        "--metrics-port", "0"], env=child_env(), capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 1
    assert "cannot use the nvml GPU backend" in r.stderr
    assert "--backend simulated" in r.stderr


def test_bad_flags_and_env_exit_2():
    r = subprocess.run([*PY, "sidecar", "--backend", "simulated", "--interval", "0"],
                       env=child_env(), capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--interval" in r.stderr
    r = subprocess.run([*PY, "sidecar", "--backend", "simulated"],
                       env={**child_env(), "JOULEPOOL_INTERVAL": "soon"}, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2 and "JOULEPOOL_INTERVAL" in r.stderr  # names the variable
    r = subprocess.run([*PY, "sidecar", "--backend", "simulated", "--engine-url", "nohost"],
                       env=child_env(), capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--engine-url" in r.stderr


def test_fake_engine_on_port_0_prints_the_address_it_bound():
    """A harness starts ``fake-engine --port 0`` and reads where it listens from its
    output (the router's and extender's ``listening on`` line); the engine answers there."""
    engine = subprocess.Popen(
        [*PY, "fake-engine", "--port", "0", "--host", "127.0.0.1"],
        env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert engine.stdout is not None
        lines = [engine.stdout.readline() for _ in range(2)]
        assert lines[1].startswith("joulepool fake-engine listening on http://127.0.0.1:"), lines
        url = lines[1].split()[-1]
        assert not url.endswith(":0")
        assert http_get(url + "/health") == "ok"
    finally:
        stop(engine)
