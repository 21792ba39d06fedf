"""tests/procguard.py: a process a fixture starts does not outlive the pytest that started
it, however that pytest ends. Each case runs a small pytest in a subprocess whose fixture
starts a child and never stops it (a leaky fixture, or one whose teardown an interrupted
run never reaches), ends that pytest, and checks the child is gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]

INNER = '''
import os, signal, subprocess, sys, threading, time
import pytest

# a shell that starts a run in the background (`make test &`) leaves SIGINT ignored, and
# Python then never raises KeyboardInterrupt for it: give this pytest Ctrl-C back
signal.signal(signal.SIGINT, signal.default_int_handler)

def _record(proc, name):
    path = os.path.join(os.environ["PIDS"], name)
    with open(path + ".tmp", "w") as f:
        f.write(str(proc.pid))
    os.rename(path + ".tmp", path)

@pytest.fixture
def leaky():
    # started and never stopped: the fixture has no teardown
    _record(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]), "main")
    # and one from another thread
    t = threading.Thread(target=lambda: _record(subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"]), "thread"))
    t.start()
    t.join()
    yield

def test_runs(leaky):
    if os.environ.get("HANG"):
        time.sleep(600)
'''


def _gone(pid: int) -> bool:
    """No such process, or only its zombie (dead, not yet reaped by init)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _wait_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.05)
    return False


def _run_inner(tmp_path: Path, guard: bool, hang: bool) -> tuple[subprocess.Popen[bytes],
                                                                 Path]:
    (tmp_path / "test_inner.py").write_text(INNER)
    pids = tmp_path / "pids"
    pids.mkdir()
    env = {**os.environ, "PIDS": str(pids), "PYTHONPATH": str(TESTS),
           "HANG": "1" if hang else ""}
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_inner.py")]
    if guard:
        argv[3:3] = ["-p", "procguard"]
    inner = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
    return inner, pids


def _children(pids: Path, inner: subprocess.Popen[bytes], timeout: float = 60.0
              ) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {p.name: int(p.read_text()) for p in pids.iterdir() if "." not in p.name}
        if len(found) == 2:
            return found
        if inner.poll() is not None and len(found) < 2:
            break
        time.sleep(0.05)
    out = inner.stdout.read().decode() if inner.stdout and inner.poll() is not None else ""
    raise AssertionError(f"the inner pytest started no children: {out}")


@pytest.mark.parametrize("how", ["finishes", "SIGKILL", "SIGTERM", "SIGINT"])
def test_a_fixtures_child_does_not_outlive_its_pytest(tmp_path: Path, how: str) -> None:
    inner, pids = _run_inner(tmp_path, guard=True, hang=how != "finishes")
    try:
        children = _children(pids, inner)
        if how != "finishes":
            inner.send_signal(getattr(signal, how))
        inner.wait(60)
        out = inner.stdout.read().decode() if inner.stdout else ""
        for name, pid in children.items():
            assert _wait_gone(pid), f"{how}: the {name} child {pid} outlived pytest:\n{out}"
        if how == "finishes":
            assert inner.returncode == 0, out
            assert "procguard: stopped 2 process(es)" in out
    finally:
        _clean_up(inner, pids)


def test_without_the_guard_the_child_outlives_a_killed_pytest(tmp_path: Path) -> None:
    """The check above can fail: the same run without the plugin leaves its child."""
    inner, pids = _run_inner(tmp_path, guard=False, hang=True)
    try:
        children = _children(pids, inner)
        inner.send_signal(signal.SIGKILL)
        inner.wait(60)
        time.sleep(1.0)
        assert not _gone(children["main"])
    finally:
        _clean_up(inner, pids)


def _clean_up(inner: subprocess.Popen[bytes], pids: Path) -> None:
    """This test's own cleanup, by pid: the inner run and its children still running."""
    for pid in [int(p.read_text()) for p in pids.iterdir() if "." not in p.name]:
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)
    if inner.poll() is None:
        inner.kill()
        inner.wait(10)


def test_the_watchdog_skips_lines_it_cannot_read_and_stops_the_rest(tmp_path: Path) -> None:
    """A malformed line (two threads' writes interleaved, a torn write) does not end the
    watchdog before it stops the children it was told of."""
    import procguard

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        start = procguard._start_time(child.pid)
        assert start is not None
        procguard._watch(["garbage\n", "12 34 56\n", "\n", f"{child.pid}{child.pid} 1\n",
                          "abc 12\n", f"{child.pid} {start}\n", "77\n"], grace_s=10.0)
        assert child.wait(10) == -signal.SIGTERM
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)


def test_threads_telling_the_watchdog_at_once_write_whole_lines() -> None:
    """Children start from any thread: each one's ``pid start`` line reaches the
    watchdog whole, also where the stream's write is not one atomic step (here: one
    character at a time, letting other threads run in between)."""
    import threading
    import time as clock

    import procguard

    class Trickle:
        """A text stream over a pipe that writes a character at a time."""

        def __init__(self, fd: int) -> None:
            self.out = os.fdopen(fd, "w")

        def write(self, text: str) -> None:
            for ch in text:
                self.out.write(ch)
                self.out.flush()
                clock.sleep(0)

        def flush(self) -> None:
            self.out.flush()

    read, write = os.pipe()
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(os.fdopen(read)))
    reader.start()
    pid, start = os.getpid(), procguard._start_time(os.getpid())
    saved, stream = procguard._watchdog, Trickle(write)
    procguard._watchdog = stream
    try:
        threads = [threading.Thread(target=lambda: [procguard._tell_watchdog(pid, start)
                                                    for _ in range(200)])
                   for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        procguard._watchdog = saved
        stream.out.close()
    reader.join(30)
    assert not reader.is_alive()
    assert len(lines) == 4 * 200
    assert set(lines) == {f"{pid} {start}\n"}


def test_children_that_ended_are_reaped_and_forgotten_before_the_session_ends() -> None:
    """A child whose Popen its owner drops without waiting is reaped once it exits (by
    ``subprocess``, at the next start), not left a zombie for the rest of the session;
    one waited for is forgotten. (Before, the guard held every Popen to the end.)"""
    import gc

    import procguard

    if procguard._original_init is None:
        pytest.skip("procguard is not loaded in this session")
    dropped = subprocess.Popen([sys.executable, "-c", "pass"])
    waited = subprocess.Popen([sys.executable, "-c", "pass"])
    waited.wait(30)
    pid = dropped.pid
    assert _wait_gone(pid)  # exited: a zombie until someone reaps it
    del dropped
    gc.collect()
    subprocess.Popen(["true"]).wait(30)  # subprocess reaps the dropped ones here
    assert not Path(f"/proc/{pid}").exists(), "the dropped child was left a zombie"
    assert pid not in procguard._children and waited.pid not in procguard._children


def test_the_session_end_stops_a_running_child_whose_popen_was_dropped() -> None:
    """Known by pid and start time only, a running child is still stopped at the end."""
    import gc

    import procguard

    if procguard._original_init is None:
        pytest.skip("procguard is not loaded in this session")
    pid = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]).pid
    gc.collect()
    try:
        assert pid in procguard._children
        with procguard._children_lock:  # stop only this one, not the session's others
            others = {k: v for k, v in procguard._children.items() if k != pid}
            procguard._children = {pid: procguard._children[pid]}
        try:
            assert procguard.stop_children(grace_s=10.0) == [pid]
        finally:
            with procguard._children_lock:
                procguard._children.update(others)
        assert _wait_gone(pid)
    finally:
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)
