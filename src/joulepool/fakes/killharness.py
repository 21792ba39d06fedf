"""Node-agent kill harness: real agent processes, real signals, a faulty simulated NVML.

Each trial starts ``joulepool node-agent --backend simulated`` on a shared GPU
state file with a fake engine, so MIAD locks the clocks; injects hung and
failing NVML calls on random GPUs (``SimulatedGPUs.inject``, shorter than the
reset grace); checks that ``/healthz`` still answers during them; then sends
SIGTERM, SIGINT or SIGKILL at a random moment. After SIGTERM / SIGINT the
agent must exit 0 with no GPU locked (the time it took is reported; past its
grace plus ``EXIT_TIMEOUT_S`` it is a bad exit). After SIGKILL
nothing can reset, so recovery does: alternately ``node-agent
--reset-and-exit`` (must exit 0) or a restarted agent with no engine (must
reset at start-up). A GPU still locked after a trial's check is counted in
``left_locked``; the harness passes when that is 0.

Bounded and reproducible: the trial count and seed fix every choice (signal
order, faults, delays); every wait has a timeout. Used by
``tests/integration/test_nodeagent_kill.py`` (a few trials) and
``benchmarks/bench_nodeagent_kill.py`` (many).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from joulepool.fakes.gpus import SimulatedGPUs

# the console script's code path
PY = [sys.executable, "-c", "import sys; from joulepool.cli import main; sys.exit(main())"]
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGKILL)
#: longest wait for a child process to start serving, s: generous, as starting Python
#: and importing joulepool takes tens of seconds on a loaded 2-core machine; a child
#: that exits is noticed at once
STARTUP_TIMEOUT_S = 120.0
#: longest wait for a signalled agent to exit beyond its reset grace, s: a hang guard
#: (its exit code and the GPUs it leaves are what is checked), generous for the same reason
EXIT_TIMEOUT_S = 60.0


@dataclass
class KillSettings:
    trials: int = 6
    seed: int = 0
    gpus: int = 2
    call_timeout_s: float = 0.3
    reset_grace_s: float = 4.0
    interval_s: float = 0.05
    #: injected faults last at most this long, so a reset retried within the grace succeeds
    max_fault_s: float = 1.5
    max_faults_per_trial: int = 2
    #: what the agent steers: "clocks" or "power" (then a set power limit counts as locked)
    control: str = "clocks"


@dataclass
class KillReport:
    trials: int = 0
    signals: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    recoveries: Counter[str] = field(default_factory=Counter)
    left_locked: int = 0
    bad_exits: list[str] = field(default_factory=list)
    health_probes: int = 0
    health_failures: int = 0
    stop_seconds: list[float] = field(default_factory=list)

    def ok(self) -> bool:
        return self.left_locked == 0 and not self.bad_exits and self.health_failures == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "trials": self.trials, "signals": dict(self.signals), "faults": dict(self.faults),
            "recoveries": dict(self.recoveries), "gpus_left_locked": self.left_locked,
            "bad_exits": self.bad_exits, "health_probes": self.health_probes,
            "health_failures": self.health_failures,
            "max_stop_seconds": round(max(self.stop_seconds, default=0.0), 3),
        }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env() -> dict[str, str]:
    """The environment of a child ``joulepool`` process: this one's without its
    ``JOULEPOOL_*`` settings and ``KUBERNETES_*`` service variables (so only the
    child's flags configure it), with unbuffered output."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("JOULEPOOL_", "KUBERNETES_"))}
    e["PYTHONUNBUFFERED"] = "1"
    return e


def _get(url: str, timeout: float = 1.0) -> tuple[int, str] | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:
        return None


def _wait_for(pred: Callable[[], Any], timeout: float, every: float = 0.05) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(every)
    return None


def _kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


class KillHarness:
    def __init__(self, workdir: Path, settings: KillSettings) -> None:
        self.s = settings
        self.state = workdir / "gpu-state.json"
        self.gpus = SimulatedGPUs.open(self.state, "H100", settings.gpus, node="kill-node")
        self.rng = random.Random(settings.seed)
        self.report = KillReport()
        self.engine_url = ""

    def locked(self) -> list[int]:
        """GPUs with locked clocks or a power limit set."""
        return [g["index"] for g in json.loads(self.state.read_text())["gpus"]
                if g["locked"] or g.get("power_limit_w") is not None]

    @contextmanager
    def engine(self) -> Iterator[None]:
        port = _free_port()
        gpus = ",".join(str(i) for i in range(self.s.gpus))
        proc = subprocess.Popen(
            [*PY, "fake-engine", "--port", str(port), "--host", "127.0.0.1", "--gpu-state",
             str(self.state), "--gpu-index", gpus],
            env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
        self.engine_url = f"http://127.0.0.1:{port}"
        try:
            if not _wait_for(lambda: proc.poll() is not None
                             or _get(self.engine_url + "/health"), STARTUP_TIMEOUT_S) \
                    or proc.poll() is not None:
                raise RuntimeError("the fake engine did not start")
            yield
        finally:
            _kill(proc)

    def _agent_args(self, *extra: str) -> list[str]:
        return [*PY, "node-agent", "--backend", "simulated", "--gpu-state", str(self.state),
                "--kubernetes", "off", "--interval", str(self.s.interval_s),
                "--call-timeout", str(self.s.call_timeout_s),
                "--reset-grace", str(self.s.reset_grace_s), "--control", self.s.control, *extra]

    def start_agent(self, with_engine: bool) -> tuple[subprocess.Popen[str], int]:
        port = _free_port()
        extra = ["--metrics-host", "127.0.0.1", "--metrics-port", str(port)]
        if with_engine:
            extra += ["--engine-url", self.engine_url, "--ttft-slo", "1", "--tpot-slo", "0.1"]
        proc = subprocess.Popen(self._agent_args(*extra), env=child_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        return proc, port

    def inject_faults(self) -> None:
        for _ in range(self.rng.randint(1, self.s.max_faults_per_trial)):
            kind = self.rng.choice(("hang", "error"))
            index = self.rng.randrange(self.s.gpus)
            self.gpus.inject(index, kind, self.rng.uniform(0.2, self.s.max_fault_s))
            self.report.faults[kind] += 1

    def probe_health(self, port: int) -> None:
        self.report.health_probes += 1
        t0 = time.monotonic()
        got = _get(f"http://127.0.0.1:{port}/healthz", timeout=2.0)
        if got is None or got[0] != 200 or time.monotonic() - t0 > 1.0:
            self.report.health_failures += 1

    def _check(self, what: str) -> None:
        left = self.locked()
        if left:
            self.report.left_locked += len(left)
            self.report.bad_exits.append(f"{what}: GPUs {left} left locked")

    def recover(self, trial: int) -> None:
        """After SIGKILL: the reset mode, or a restarted agent, must unlock every GPU."""
        if sum(self.report.recoveries.values()) % 2 == 0:
            self.report.recoveries["reset-and-exit"] += 1
            r = subprocess.run(self._agent_args("--reset-and-exit", "--metrics-port", "0"),
                               env=child_env(), capture_output=True, text=True,
                               timeout=STARTUP_TIMEOUT_S + self.s.reset_grace_s)
            if r.returncode != 0:
                self.report.bad_exits.append(f"trial {trial}: reset-and-exit exited "
                                             f"{r.returncode}: {r.stdout[-300:]}")
            self._check(f"trial {trial} after reset-and-exit")
            return
        self.report.recoveries["restart"] += 1
        proc, _ = self.start_agent(with_engine=False)
        try:
            # it resets once it has started: start-up, then at most the reset grace
            _wait_for(lambda: not self.locked(), STARTUP_TIMEOUT_S + self.s.reset_grace_s)
            self._check(f"trial {trial} after restart")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                self._exit_code(proc, f"trial {trial}: the restarted agent")
            finally:
                _kill(proc)

    def _exit_code(self, proc: subprocess.Popen[str], what: str) -> int | None:
        """The signalled ``proc``'s exit code; None (a bad exit) if it is still running
        after its reset grace and :data:`EXIT_TIMEOUT_S`."""
        try:
            return proc.wait(self.s.reset_grace_s + EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.report.bad_exits.append(f"{what} did not exit within "
                                         f"{self.s.reset_grace_s + EXIT_TIMEOUT_S:g} s")
            return None

    def trial(self, i: int, sig: signal.Signals) -> None:
        self.report.trials += 1
        self.report.signals[sig.name] += 1
        proc, port = self.start_agent(with_engine=True)
        try:
            health = f"http://127.0.0.1:{port}/healthz"
            up = _wait_for(lambda: proc.poll() is not None or (_get(health) or (0,))[0] == 200,
                           STARTUP_TIMEOUT_S)
            locked = up and _wait_for(lambda: self.locked() or proc.poll() is not None,
                                      STARTUP_TIMEOUT_S)
            if not locked or proc.poll() is not None:
                self.report.bad_exits.append(f"trial {i}: the agent never came up and locked "
                                             "a clock")
            self.inject_faults()
            time.sleep(self.rng.uniform(0.0, 0.5))
            self.probe_health(port)
            t0 = time.monotonic()
            proc.send_signal(sig)
            code = self._exit_code(proc, f"trial {i}: the agent sent {sig.name}")
            self.report.stop_seconds.append(time.monotonic() - t0)
        finally:
            _kill(proc)
        if sig is signal.SIGKILL:
            self.recover(i)
            return
        if code is not None and code != 0:
            out = proc.stdout.read() if proc.stdout else ""
            self.report.bad_exits.append(f"trial {i}: {sig.name} exit {code}: {out[-300:]}")
        self._check(f"trial {i} after {sig.name}")

    def run(self) -> KillReport:
        order = [SIGNALS[i % len(SIGNALS)] for i in range(self.s.trials)]
        self.rng.shuffle(order)
        with self.engine():
            for i, sig in enumerate(order):
                self.trial(i, sig)
        for g in range(self.s.gpus):  # end every injected fault, then a last check
            self.gpus.inject(g, "hang", 0.0)
            self.gpus.inject(g, "error", 0.0)
        self._check("end")
        return self.report


def run_kill_harness(workdir: Path, settings: KillSettings) -> KillReport:
    return KillHarness(workdir, settings).run()
