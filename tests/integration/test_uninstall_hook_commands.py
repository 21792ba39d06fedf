"""The chart's uninstall reset hook, run: the reset DaemonSet's containers with exactly the
arguments the chart renders (kind's simulated backend; clocks and power-limit control)
against simulated GPUs a killed agent left locked, as processes. ``helm uninstall`` itself
(Helm's SDK running the hooks in weight order, the hook Jobs' commands on the hook
ServiceAccount, hook clean-up) is tests/realk8s/test_uninstall_hooks_real.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "chart"))
from chartlib import Rendered, render_raw

from joulepool.fakes.gpus import SimulatedGPUs
from joulepool.fakes.killharness import PY, child_env

KIND_VALUES = Path(__file__).resolve().parents[2] / "kind" / "values.yaml"


def _kind_values(**node_agent: Any) -> dict[str, Any]:
    import yaml

    values: dict[str, Any] = yaml.safe_load(KIND_VALUES.read_text())
    values["nodeAgent"] = {**values.get("nodeAgent", {}), **node_agent}
    return values


def _reset_containers(r: Rendered, product: str) -> tuple[list[str], list[str]]:
    """(reset init container args, holding container args) of one product's reset DaemonSet."""
    ds = next(d for d in r.all("DaemonSet")
              if d["metadata"]["labels"]["app.kubernetes.io/component"] == "node-agent-reset"
              and d["metadata"]["name"].endswith(f"-{product.lower()}"))
    spec = ds["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    (hold,) = spec["containers"]
    return list(init["args"]), list(hold["args"])


def _local(args: list[str], state: Path) -> list[str]:
    """The container's args with the GPU state file (a hostPath) moved to ``state``."""
    args = list(args)
    args[args.index("--gpu-state") + 1] = str(state)
    return args


def _gpus(state: Path) -> list[dict[str, Any]]:
    return list(json.loads(state.read_text())["gpus"])


@pytest.mark.parametrize("control", ["clocks", "power"])
def test_the_rendered_reset_command_restores_every_gpu(tmp_path: Path, control: str) -> None:
    r = Rendered(render_raw(_kind_values(control=control)))
    init_args, hold_args = _reset_containers(r, "H100")
    assert "--reset-and-exit" in init_args
    assert init_args[init_args.index("--control") + 1] == control
    state = tmp_path / "state.json"
    count = int(init_args[init_args.index("--count") + 1])
    gpus = SimulatedGPUs.open(state, "H100", count, node="kind-worker")
    for i in range(count):  # what an agent killed with SIGKILL leaves behind
        gpus.set_locked(i, 990.0, 1005.0)
        gpus.set_power_limit(i, 350.0)
    assert all(g["locked"] and g["power_limit_w"] == 350.0 for g in _gpus(state))

    done = subprocess.run([*PY, *_local(init_args, state)], env=child_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"reset {count} of {count} GPU(s)" in done.stdout
    after = _gpus(state)
    if control == "clocks":
        assert [g["locked"] for g in after] == [None] * count
    else:  # the power limit back to its default (None: the board's own)
        assert [g["power_limit_w"] for g in after] == [None] * count

    # the holding container: Ready until SIGTERM, then exits 0 (the DaemonSet goes away)
    hold = subprocess.Popen([*PY, *hold_args], env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        assert hold.stdout is not None
        line = hold.stdout.readline()
        assert "holding until SIGTERM" in line and time.monotonic() < deadline
        hold.send_signal(signal.SIGTERM)
        assert hold.wait(30) == 0
    finally:
        if hold.poll() is None:
            hold.kill()


def test_the_rendered_reset_command_fails_while_a_gpu_stays_locked(tmp_path: Path) -> None:
    """A reset that keeps failing exits non-zero (the kubelet retries the init container and
    the last hook Job reports the node), never 0 with a GPU still locked."""
    r = Rendered(render_raw(_kind_values()))
    init_args, _ = _reset_containers(r, "L4")
    args = _local(init_args, tmp_path / "state.json")
    args[args.index("--reset-grace") + 1] = "2"
    gpus = SimulatedGPUs.open(tmp_path / "state.json", "L4", 4, node="kind-worker")
    gpus.set_locked(1, 990.0, 1005.0)
    gpus.inject(1, "error", 600)  # GPU 1 refuses every call
    done = subprocess.run([*PY, *args], env=child_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0, done.stdout + done.stderr
    assert "still possibly locked: 1" in done.stdout
    assert _gpus(tmp_path / "state.json")[1]["locked"] is not None
