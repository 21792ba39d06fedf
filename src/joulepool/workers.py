"""Checks for worker processes that start clean (``forkserver``/``spawn``) rather than as
forks of their parent: such a worker imports ``joulepool`` from the fork server's path
(``PYTHONPATH``, the installed package, the directory it started in), which need not be
where its parent's came from."""

from __future__ import annotations

import os

import joulepool


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
