"""Hostile files give a clear message and exit status 2, never a traceback: YAML nested
deeper than the parser's recursion, a trace whose timestamps span 1970-9999 (per-minute
arrays of 31 GiB), a simulated duration of thousands of years."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from joulepool.cli import main

DEEP = 5000  # levels; PyYAML recurses per level (Python's limit is 1000)


def _deep_yaml(tmp_path: Path, key: str) -> Path:
    path = tmp_path / "deep.yaml"
    path.write_text(f"{key}: " + "[" * DEEP + "]" * DEEP + "\n")
    return path


def test_plan_with_deeply_nested_yaml_exits_2(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "-f", str(_deep_yaml(tmp_path, "kind"))]) == 2
    err = capsys.readouterr().err
    assert "nested too deeply" in err and "deep.yaml" in err


def test_cluster_file_with_deeply_nested_yaml_exits_2(tmp_path: Path) -> None:
    pools = Path(__file__).resolve().parents[2] / "examples" / "pools.yaml"
    cluster = _deep_yaml(tmp_path, "nodes")
    code = main(["plan", "-f", str(pools), "--cluster", str(cluster)])
    assert code == 2


def test_simulate_with_deeply_nested_cluster_yaml_exits_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--cluster", str(_deep_yaml(tmp_path, "nodes"))]) == 2
    assert "nested too deeply" in capsys.readouterr().err


@pytest.mark.parametrize("args", [
    ["plan", "-f", "{binary}"],
    ["plan", "-f", "{pools}", "--cluster", "{binary}"],
    ["simulate", "--cluster", "{binary}"],
    ["bench", "energy", "--clusters", "{binary}"],
    ["bench", "breakdown", "--cluster", "{binary}"],
])
def test_a_file_that_is_not_utf8_text_exits_2(tmp_path: Path, args: list[str],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(128, 256)) * 4)
    pools = Path(__file__).resolve().parents[2] / "examples" / "pools.yaml"
    argv = [a.format(binary=binary, pools=pools) for a in args]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's error()
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert "binary.yaml" in err and "UTF-8" in err


#: The child sets its own limit before it imports joulepool. A ``preexec_fn`` would make
#: ``subprocess`` fork (not vfork) this test process, which has served gRPC in other tests:
#: gRPC's fork handlers restart its poller in the child, ``close_fds`` then closes the
#: poller's epoll fd under it, and the child aborts ("epoll_wait error: Bad file
#: descriptor", return code -6) before it reaches ``exec``.
_LIMIT = ("import resource, sys\n"
          "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n")
_LIMITED = _LIMIT + "from joulepool.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def _run_limited(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``joulepool ARGS`` with 2 GiB of address space (the old code tried 31 GiB)."""
    return subprocess.run([sys.executable, "-c", _LIMITED, *args], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)


def test_the_limited_child_really_runs_under_the_limit(tmp_path: Path) -> None:
    probe = _LIMIT + "print(resource.getrlimit(resource.RLIMIT_AS)[0])\n"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert int(done.stdout) == 2 << 30


def test_trace_spanning_millennia_exits_2(tmp_path: Path) -> None:
    trace = tmp_path / "span.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                     "1970-01-01 00:00:00.000000,100,10\n"
                     "9999-12-31 23:59:59.000000,100,10\n")
    done = _run_limited(["simulate", "--trace", str(trace), "--duration", "600"], tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "span.csv" in done.stderr and "days" in done.stderr


def test_simulated_duration_of_millennia_exits_2(tmp_path: Path) -> None:
    done = _run_limited(["simulate", "--duration", "1e13"], tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "duration" in done.stderr
