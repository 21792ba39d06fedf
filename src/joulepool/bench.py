"""``joulepool bench NAME``: run a benchmark script from benchmarks/ (speed claims live there)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def _bench_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "benchmarks"


def _available() -> dict[str, Path]:
    d = _bench_dir()
    return {p.stem.removeprefix("bench_"): p for p in sorted(d.glob("bench_*.py"))}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="benchmark name (e.g. planner, sim, extender, operator) "
                                     "or 'all'")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER,
                        help="arguments passed to the benchmark script")


def run(args: argparse.Namespace) -> int:
    from joulepool.cli import UsageError

    found = _available()
    if not found:
        raise UsageError(f"no benchmarks found in {_bench_dir()} (run from a source checkout)")
    names = list(found) if args.name == "all" else [args.name]
    for name in names:
        if name not in found:
            raise UsageError(f"unknown benchmark {name!r}; choose from {sorted(found)} or all")
    rc = 0
    for name in names:
        module = load_benchmark(name)
        if args.name == "all" and not in_all(module):
            print(f"== bench {name}: not part of 'all' (it installs a toolchain of its own "
                  f"outside the project); run it as: joulepool bench {name} ==", flush=True)
            continue
        print(f"== bench {name} ==", flush=True)
        rc = max(rc, int(module.main(list(args.bench_args)) or 0))
    return rc


def in_all(module: ModuleType) -> bool:
    """Whether ``joulepool bench all`` runs this benchmark: yes unless its module sets
    ``IN_ALL = False`` (those that install a separate toolchain on first use, such as a
    load generator's virtual environment, run only when named)."""
    return bool(getattr(module, "IN_ALL", True))


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/bench_<name>.py imported by path as module ``bench_<name>`` (once per
    process: a later call returns the same module). KeyError for an unknown name."""
    return import_file_as(f"bench_{name}", str(_available()[name]))


def init_worker(parent_package_file: str, module_name: str, path: str) -> None:
    """A benchmark's pool initializer: check the worker runs its parent's ``joulepool``
    (:func:`joulepool.workers.require_parent_package`), then :func:`import_file_as`."""
    from joulepool.workers import require_parent_package

    require_parent_package(parent_package_file)
    import_file_as(module_name, path)


def import_file_as(module_name: str, path: str) -> ModuleType:
    """The module ``module_name`` if this process has it, else the Python file ``path``
    imported and registered under that name. A benchmark's worker processes run it from
    their pool initializer (:func:`init_worker`), so that functions of a script imported
    by path (pickled by module and name) resolve there too."""
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
