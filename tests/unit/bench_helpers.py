"""Loading a benchmark script (benchmarks/*.py, not a package) as a module in tests."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_bench(filename: str) -> Iterator[ModuleType]:
    """Yield ``benchmarks/<filename>`` imported under a test-only name (registered in
    ``sys.modules`` while in use: pickled functions name their module, and the pool's
    workers import this file under that name, joulepool.bench.import_file_as);
    for a fixture: ``yield from load_bench("bench_energy.py")``."""
    name = f"{Path(filename).stem}_under_test"
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / filename)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)
