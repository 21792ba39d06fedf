"""benchmarks/bench_planner.py's build comparison runs and compares like with like (no
timing asserted: speed claims live in the benchmark's output)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from bench_helpers import load_bench

import joulepool


@pytest.fixture
def bench() -> Iterator[ModuleType]:
    yield from load_bench("bench_planner.py")


def test_build_side_by_side_times_this_checkout_and_the_baseline(bench, capsys):
    src = Path(joulepool.__file__).resolve().parents[1]  # this checkout as its own baseline
    medians = bench.build_side_by_side(pools=2, repeats=1, baseline_src=src)  # equal problems
    assert set(medians) == {"this", "baseline"} and all(v > 0 for v in medians.values())
    assert bench.main(["--sizes", "a", "--repeats", "1", "--build-pools", "2"]) == 0
    assert "build of 2 prompt-tail pools" in capsys.readouterr().out


def test_a_baseline_that_cannot_build_is_named(bench, tmp_path):
    with pytest.raises(RuntimeError, match="holds no joulepool package"):
        bench.build_side_by_side(pools=1, repeats=1, baseline_src=tmp_path)
