"""Pytest plugin: no process a test starts outlives the pytest process that started it.

Loaded by ``tests/conftest.py`` (and by ``-p procguard`` where ``tests/`` is on the path).
Fixtures start node agents, fake engines, operators, API servers and control planes as
subprocesses and stop them in their teardown; a pytest that is interrupted never runs
some of those teardowns, and the children keep running (ports held, CPU used, clocks of
the simulated GPUs moved under the next run). Three nets, from the strongest:

* a watchdog process (this file run as a script, in a session of its own) is told the
  pid of every child ``subprocess.Popen`` starts (``asyncio``'s subprocesses go through
  it too), whatever thread starts it; when pytest dies, however it dies (SIGKILL
  included), its pipe closes and the watchdog stops those still running (their process
  group where they lead one; SIGTERM, SIGKILL after :data:`GRACE_S`; a pid is signalled
  only while /proc shows the same process, by its start time);
* SIGTERM to pytest interrupts the run as Ctrl-C does (``KeyboardInterrupt``), so the
  fixtures' teardowns run (SIGTERM's default would end pytest at once);
* at the end of the session every child still running is sent SIGTERM (its process
  group, where it leads one: ``start_new_session``), then SIGKILL after
  :data:`GRACE_S` seconds.

Only pytest's own children are known: what they start themselves is theirs to stop on
SIGTERM (joulepool's components do); a control plane that ``up.sh`` starts as daemons is
stopped by its fixture's teardown, which the second net lets run. The children are not
marked with ``prctl(PR_SET_PDEATHSIG)``: that needs a ``preexec_fn``, which makes
``subprocess`` fork instead of vfork, and a fork of a process that has loaded gRPC runs
gRPC's fork handlers in the child, which then aborts (seen: a CLI child killed by
SIGABRT, "epoll_wait error: Bad file descriptor").
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import pytest

#: seconds the children still running at the end of a session get between SIGTERM and
#: SIGKILL
GRACE_S = 5.0

#: every child started while the plugin is on and not known to be done: pid -> (its
#: start time, a weak reference to its Popen). Not polled (polling a child an asyncio
#: watcher waits for would steal its exit status), and not kept alive: a Popen its owner
#: drops goes to ``subprocess``'s own list, which reaps the child when it exits (a Popen
#: held here for the session left every such child a zombie until the end)
_children: dict[int, tuple[str | None, weakref.ref[subprocess.Popen[Any]]]] = {}
_children_lock = threading.Lock()
_original_init: Callable[..., None] | None = None
#: the write end of the watchdog's pipe (None: no watchdog)
_watchdog: Any = None
#: one line to the watchdog at a time: children start from any thread, and a text
#: stream's lines written from two threads at once can interleave
_watchdog_lock = threading.Lock()


def _guarded_init(self: subprocess.Popen[Any], *args: Any, **kwargs: Any) -> None:
    assert _original_init is not None
    _original_init(self, *args, **kwargs)
    start = _start_time(self.pid)
    with _children_lock:
        _prune_children()
        _children[self.pid] = (start, weakref.ref(self))
    _tell_watchdog(self.pid, start)


def _prune_children() -> None:
    """Forget the children known to be done: waited for (their Popen's ``returncode``
    set), or whose Popen is gone and whose pid no longer runs the same process."""
    for pid, (start, ref) in list(_children.items()):
        proc = ref()
        done = proc.returncode is not None if proc is not None else _start_time(pid) != start
        if done:
            del _children[pid]


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22): with
    the pid, it names one process (pids are reused); None when it is gone."""
    try:
        stat = open(f"/proc/{pid}/stat").read()  # noqa: SIM115 (read at once)
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields[19] if fields[0] not in ("Z", "X") else None


def _tell_watchdog(pid: int, start: str | None) -> None:
    """Send the watchdog child ``pid``'s line (``start``: its start time; None: it is
    gone already, nothing to send)."""
    if _watchdog is None or start is None:
        return
    # the watchdog is gone: the other two nets still hold
    with _watchdog_lock, contextlib.suppress(OSError, ValueError):
        _watchdog.write(f"{pid} {start}\n")
        _watchdog.flush()


def _start_watchdog() -> None:
    global _watchdog
    if _original_init is None or not os.path.isdir("/proc"):
        return
    read, write = os.pipe()
    try:
        proc = subprocess.Popen.__new__(subprocess.Popen)
        _original_init(proc, [sys.executable, __file__], stdin=read, start_new_session=True,
                       stdout=subprocess.DEVNULL)
    except OSError:
        os.close(write)
        return
    finally:
        os.close(read)
    proc.returncode = 0  # not ours to wait for: it ends when this process does
    _watchdog = os.fdopen(write, "w")


def _watch(lines: Any, grace_s: float = GRACE_S) -> None:
    """The watchdog: read ``pid start`` lines until the pipe closes (pytest ended), then
    stop every one of those processes that is still the same process. A line that is
    not ``pid start`` is skipped: the watchdog must outlive any line it is sent."""
    known: dict[int, str] = {}
    for line in lines:
        fields = line.split()
        if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit():
            known[int(fields[0])] = fields[1]
    alive = {pid: s for pid, s in known.items() if _start_time(pid) == s}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, start in alive.items():
            if _start_time(pid) == start:
                _signal(pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(
                _start_time(pid) == s for pid, s in alive.items()):
            time.sleep(0.05)


def _terminate_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"pytest got signal {signum}")


def _arm_sigterm() -> None:
    """Make SIGTERM interrupt the run (re-armed per test: an event loop that handled
    SIGTERM itself puts the default back when it closes)."""
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _terminate_on_sigterm)


def _signal(pid: int, sig: int) -> None:
    """``sig`` to process ``pid``, to its whole process group where it leads one."""
    with contextlib.suppress(OSError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def stop_children(grace_s: float = GRACE_S) -> list[int]:
    """SIGTERM every child still running, SIGKILL those left after ``grace_s``; the pids
    it had to stop. A child whose Popen its owner dropped is known by its pid and start
    time (signalled only while that pid runs the same process)."""
    with _children_lock:
        known = list(_children.items())
        _children.clear()
    procs: list[subprocess.Popen[Any]] = []
    dropped: dict[int, str] = {}
    for pid, (start, ref) in known:
        proc = ref()
        if proc is not None:
            if proc.poll() is None:
                procs.append(proc)
        elif start is not None and _start_time(pid) == start:
            dropped[pid] = start
    stopped = [p.pid for p in procs] + list(dropped)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        procs = [p for p in procs if p.poll() is None]
        dropped = {pid: s for pid, s in dropped.items() if _start_time(pid) == s}
        for pid in [p.pid for p in procs] + list(dropped):
            _signal(pid, sig)
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5.0)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(deadline - time.monotonic(), 0.0))
        while time.monotonic() < deadline and any(
                _start_time(pid) == s for pid, s in dropped.items()):
            time.sleep(0.05)
    return stopped


def pytest_configure(config: object) -> None:
    global _original_init
    if _original_init is not None:
        return
    _original_init = subprocess.Popen.__init__
    subprocess.Popen.__init__ = _guarded_init  # type: ignore[method-assign]
    _start_watchdog()
    _arm_sigterm()


def pytest_runtest_setup(item: object) -> None:
    _arm_sigterm()


@pytest.hookimpl(trylast=True)  # after the fixtures' own teardowns
def pytest_sessionfinish(session: object, exitstatus: int) -> None:
    left = stop_children()
    if left:
        sys.stderr.write(f"\nprocguard: stopped {len(left)} process(es) the tests left "
                         f"running: {', '.join(map(str, left))}\n")


def pytest_unconfigure(config: object) -> None:
    global _original_init, _watchdog
    if _watchdog is not None:
        with contextlib.suppress(OSError):
            _watchdog.close()  # the watchdog finds its children stopped already
        _watchdog = None
    if _original_init is not None:
        subprocess.Popen.__init__ = _original_init  # type: ignore[method-assign]
        _original_init = None


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the pipe's end stops it
    _watch(sys.stdin)
