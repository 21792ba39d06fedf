"""core.highs.quiet_stdout: HiGHS's unconditional debug print stays off standard output."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from joulepool.cli import main
from joulepool.core import highs
from joulepool.core.highs import quiet_stdout

ROOT = Path(__file__).resolve().parents[2]
LIBC = ctypes.CDLL(None)
HIGHS_DEBUG_LINE = "HighsMipSolverData::transformNewIntegerFeasibleSolution"


def _c_print(text: str) -> None:
    """``printf`` from C, as HiGHS does (buffered by C's stdio, not Python's)."""
    LIBC.printf(b"%s", text.encode())


def _flushed(capfd: pytest.CaptureFixture[str]) -> tuple[str, str]:
    LIBC.fflush(None)  # C's buffered output reaches the captured descriptor now
    out, err = capfd.readouterr()
    return out, err


def test_c_prints_inside_are_discarded_and_outside_kept(capfd) -> None:
    # (capfd hands Python's sys.stdout its file directly: only C's prints go through
    # descriptor 1 here)
    _c_print("c-before\n")  # still in C's buffer: written before the block
    with quiet_stdout():
        _c_print("inside\n")
    _c_print("c-after\n")
    out, _err = _flushed(capfd)
    assert out.splitlines() == ["c-before", "c-after"]


def test_nested_and_concurrent_blocks_restore_stdout_once(capfd) -> None:
    started, release = threading.Barrier(2), threading.Event()

    def solve() -> None:
        with quiet_stdout():
            started.wait(5)
            release.wait(5)
            _c_print("thread inside\n")

    thread = threading.Thread(target=solve)
    thread.start()
    with quiet_stdout():
        started.wait(5)
        with quiet_stdout():
            _c_print("nested inside\n")
    _c_print("still inside the thread's block\n")  # the thread's block is open
    release.set()
    thread.join(5)
    _c_print("after both\n")
    out, _err = _flushed(capfd)
    assert out == "after both\n"
    assert highs._depth == 0 and highs._saved_fd is None


def test_an_infeasible_shared_plan_prints_only_the_plan(tmp_path: Path, capfd) -> None:
    # the examples' pools far beyond the cluster: HiGHS repairs integer solutions on
    # the way (the solve that printed its debug line to stdout)
    docs = list(yaml.safe_load_all((ROOT / "examples" / "pools.yaml").read_text()))
    docs[2]["spec"]["demand"]["requestsPerSecond"] = 5000
    pools = tmp_path / "pools.yaml"
    pools.write_text(yaml.safe_dump_all(docs))
    assert main(["plan", "-f", str(pools)]) == 1
    out, err = _flushed(capfd)
    assert "cannot be met" in out
    assert HIGHS_DEBUG_LINE not in out and HIGHS_DEBUG_LINE not in err


def test_a_process_without_stdout_still_solves(tmp_path: Path) -> None:
    """Descriptor 1 closed (``joulepool plan >&-``): nothing to redirect, the block runs
    (os.dup(1) raised EBADF and ``joulepool plan`` died with a traceback)."""
    child = ("import os, sys\n"
             "os.close(1)\n"
             "from joulepool.core.highs import quiet_stdout\n"
             "with quiet_stdout():\n"
             "    with quiet_stdout():\n"
             "        pass\n"
             "print('done', file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "done"
