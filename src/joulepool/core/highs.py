"""Keeping HiGHS's unconditional prints off the process's standard output.

SciPy's ``milp`` runs HiGHS with its logging off (``disp=False``), yet the HiGHS that
SciPy 1.17 vendors (1.12) still ``printf``\\ s one debug line,
``HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();``, whenever
it repairs an integer solution that presolve's postsolve left slightly infeasible
(upstream ERGO-Code/HiGHS issue 2783, removed after 1.12). No HiGHS option reaches that
``printf``, and it lands in whatever reads joulepool's standard output (``joulepool plan``'s
document, a pipe into ``kubectl``). :func:`quiet_stdout` sends file descriptor 1 to
``/dev/null`` for the length of a solve.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0  # solves inside quiet_stdout now, in any thread
_saved_fd: int | None = None  # the real descriptor 1 while _depth > 0


def _c_fflush() -> Callable[[], object] | None:
    """C's ``fflush``, or None where there is no C library to look it up in."""
    try:
        fflush = ctypes.CDLL(None).fflush
    except (OSError, AttributeError):
        return None
    fflush.argtypes = [ctypes.c_void_p]
    return lambda: fflush(None)


_fflush_all = _c_fflush()


def _flush() -> None:
    """Python's and C's buffered standard output written now, to where descriptor 1
    points now (C's stdio buffers a pipe's or a file's output in blocks)."""
    if sys.stdout is not None:
        sys.stdout.flush()
    if _fflush_all is not None:
        _fflush_all()


@contextmanager
def quiet_stdout() -> Iterator[None]:
    """Within the block, what anything in this process writes to file descriptor 1 (C
    code's ``printf``, HiGHS's included) is discarded; before it, Python's and C's
    buffered output is written to the real standard output, and after it descriptor 1
    is the real one again. Nested and concurrent blocks (threads) share one
    redirection: the first in saves the real descriptor, the last out restores it.
    Another thread's standard output during a block is discarded too (logs go to
    standard error)."""
    global _depth, _saved_fd
    with _lock:
        if _depth == 0:
            _flush()
            try:
                _saved_fd = os.dup(1)
            except OSError:  # no descriptor 1 (stdout closed): no output to keep clean
                _saved_fd = None
            else:
                devnull = os.open(os.devnull, os.O_WRONLY)
                try:
                    os.dup2(devnull, 1)
                finally:
                    os.close(devnull)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved_fd is not None:
                _flush()  # what the block printed goes to /dev/null, not later to 1
                os.dup2(_saved_fd, 1)
                os.close(_saved_fd)
                _saved_fd = None
