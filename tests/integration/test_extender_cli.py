"""``joulepool extender`` as a process: starts from files, serves, stops on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from joulepool.kube import testing as T


def test_cli_serves_from_files_and_stops_on_sigterm(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(T.plan({"default.chat": [("h0", "H100", 2)]}).to_json())
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text(json.dumps([T.node("h0"), T.node("a0", "A100"),
                                 T.pod("c0", node_name="h0", ready=True, ip="10.0.0.9")]))
    cfg = tmp_path / "extender.yaml"
    cfg.write_text(f"plan-file: {plan}\nnodes-file: {nodes}\nscrape-interval-seconds: 0\n")
    env = {**os.environ, "JOULEPOOL_EXTENDER_CLUSTER": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "joulepool.cli", "extender", "--config", str(cfg),
         "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, line + (proc.stderr.read() if
                                                                proc.stderr else "")
        base = line.split()[-1]
        with urllib.request.urlopen(base + "/readyz", timeout=10) as resp:
            assert resp.status == 200
        req = urllib.request.Request(
            base + "/scheduler/filter", method="POST",
            data=json.dumps(T.extender_args(T.pod("c1"), names=["h0", "a0"])).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert json.loads(resp.read())["NodeNames"] == ["h0"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
