"""Checks for worker processes that start clean (``forkserver``/``spawn``) rather than as
forks of their parent: such a worker imports ``joulepool`` from the fork server's path
(``PYTHONPATH``, the installed package, the directory it started in), which need not be
where its parent's came from."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.context import BaseContext
from typing import Any, TypeVar

import joulepool

_T = TypeVar("_T")


#: how pool workers start: from a clean server process (``forkserver``), never a fork of
#: this process, whose other threads (a progress bar, a test's servers) may hold locks
#: that a forked child would inherit held and wait on for ever; ``spawn`` where the
#: platform has no fork server
START_METHOD = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


def worker_context(preload: Sequence[str]) -> BaseContext:
    """The multiprocessing context pool workers start from (:data:`START_METHOD`); with
    a fork server, ``preload`` (module names) imported once in the server, so that every
    worker forks from it ready to run."""
    ctx = mp.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        ctx.set_forkserver_preload(list(preload))
    return ctx


def require_parent_package(parent_file: str) -> None:
    """Raise RuntimeError unless this process imported ``joulepool`` from ``parent_file``
    (the parent's ``joulepool.__file__``): a worker running another checkout's code
    would unpickle the parent's objects into other classes without an error."""
    here = joulepool.__file__ or ""
    if os.path.realpath(here) != os.path.realpath(parent_file):
        raise RuntimeError(
            f"this worker process imported joulepool from {here}, its parent from "
            f"{parent_file}: workers import it from PYTHONPATH or the installed package "
            "as their fork server started, not from sys.path edits made at run time")


def submit_all(pool: ProcessPoolExecutor, fn: Callable[[Any], _T],
               items: Iterable[Any]) -> list[Future[_T]]:
    """``pool.submit(fn, item)`` for each item, in order. A pool starts its workers as
    tasks are submitted, so a worker that has already failed to start shows here:
    :class:`BrokenProcessPool` either way (the executor's own, or an ``OSError`` from
    starting the next worker through a fork server the failure closed), for the caller
    to report as it reports a worker that fails later."""
    futures: list[Future[_T]] = []
    for item in items:
        try:
            futures.append(pool.submit(fn, item))
        except OSError as exc:
            raise BrokenProcessPool(f"a worker process could not be started: {exc}") from exc
    return futures
