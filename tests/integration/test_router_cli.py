"""``joulepool router`` as a process: starts from files, routes, stops on SIGTERM; bad
settings are a message and exit code 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from joulepool.kube import testing as T


def _joulepool(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "joulepool.cli", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})},
    )


def test_cli_routes_from_files_and_stops_on_sigterm(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(T.plan({"default.chat": [("h0", "H100", 2)]}).to_json())
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text(json.dumps([T.node("h0"), T.pod("c0", node_name="h0", ready=True,
                                                      ip="10.0.0.9")]))
    cfg = tmp_path / "router.yaml"
    cfg.write_text(f"plan-file: {plan}\nnodes-file: {nodes}\nscrape-interval-seconds: 0\n")
    proc = _joulepool("router", "--config", str(cfg), "--host", "127.0.0.1", "--port", "0",
                      env={"JOULEPOOL_ROUTER_CLUSTER": "false",
                           "JOULEPOOL_ROUTER_ROUTING": "least-loaded"})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "joulepool router listening on http://127.0.0.1:" in line, line + (
            proc.stderr.read() if proc.stderr else "")
        base = line.split()[-1]
        with urllib.request.urlopen(base + "/readyz", timeout=10) as resp:
            assert resp.status == 200
        req = urllib.request.Request(
            base + "/v1/route", method="POST",
            data=json.dumps({"pool": "default.chat", "outputTokens": 10}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            out = json.loads(resp.read())
        assert out["endpoint"] == "10.0.0.9:8000"
        # least-loaded has no energy term: null, not a made-up number
        assert out["cost"]["energyJoules"] is None and out["cost"]["total"] == 1.0
        with urllib.request.urlopen(base + "/v1/pools", timeout=10) as resp:
            pools = json.loads(resp.read())["pools"]
        assert pools["default.chat"]["routing"] == "least-loaded"  # from the environment
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_settings_exit_2_naming_them(tmp_path: Path) -> None:
    proc = _joulepool("router", "--no-cluster", "--routing", "fastest")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "routing" in err and "joulesched" in err, err
    proc = _joulepool("router", "--no-cluster")  # nothing to route from
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "--endpoints-file" in err, err
    proc = _joulepool("router", "--no-cluster", "--endpoints-file", str(tmp_path / "nope"))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "no such file" in err, err
