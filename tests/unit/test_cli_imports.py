"""The CLI commands that serve no gRPC never load it.

gRPC's C core starts poller threads and installs fork handlers once it is loaded; a
command that only plans or simulates has no use for either. Each command runs in a fresh
interpreter, which then reports the gRPC modules it holds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

_CHILD = ("import json, sys\n"
          "from joulepool.cli import main\n"
          "code = main(sys.argv[1:])\n"
          "loaded = sorted(m for m in sys.modules if m.split('.')[0].startswith('grpc'))\n"
          "print('\\n' + json.dumps({'code': code, 'grpc': loaded}))\n")

TINY = {
    "name": "tiny",
    "stepSeconds": 60,
    "nodes": [{"name": "h", "site": "east", "product": "H100", "gpus": 2},
              {"name": "a", "site": "west", "product": "A100", "gpus": 2}],
    "carbon": [{"site": "east", "gramsPerKWh": 400}, {"site": "west", "gramsPerKWh": 100}],
    "simulator": {"model": "llama-3.1-8b", "durationSeconds": 30, "rate": 2},
}


def _grpc_modules_after(args: list[str], cwd: Path) -> list[str]:
    done = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["code"] == 0, done.stderr[-2000:]
    return list(report["grpc"])


@pytest.mark.parametrize("command", ["plan", "plan-cluster", "simulate", "crds"])
def test_commands_that_serve_no_grpc_do_not_load_it(command: str, tmp_path: Path) -> None:
    cluster = tmp_path / "tiny.yaml"
    cluster.write_text(yaml.safe_dump(TINY))
    args = {
        "plan": ["plan", "-f", str(EXAMPLES / "pools.yaml")],
        "plan-cluster": ["plan", "-f", str(EXAMPLES / "pools.yaml"),
                         "--cluster", str(EXAMPLES / "cluster.yaml"), "-o", "json"],
        "simulate": ["simulate", "--cluster", str(cluster), "--policies",
                     "round-robin,combined", "--jobs", "2", "--no-plots", "--quiet",
                     "--out", str(tmp_path / "out")],
        "crds": ["crds", "--out", str(tmp_path / "crds")],
    }[command]
    assert _grpc_modules_after(args, tmp_path) == []


def test_the_probe_sees_grpc_when_a_command_loads_it(tmp_path: Path) -> None:
    """The check above can fail: the same probe reports gRPC for the endpoint picker."""
    done = subprocess.run(
        [sys.executable, "-c", "import joulepool.router.epp\n" + _CHILD, "crds", "--out",
         str(tmp_path / "crds")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert "grpc" in report["grpc"]
