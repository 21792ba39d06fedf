"""benchmarks/bench_planner.py's build comparison runs and compares like with like (no
timing asserted: speed claims live in the benchmark's output)."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest
from bench_helpers import load_bench

from joulepool.core import problem as core_problem


@pytest.fixture
def bench() -> Iterator[ModuleType]:
    yield from load_bench("bench_planner.py")


def test_build_side_by_side_times_both_variants_and_restores_the_planner(bench, capsys):
    before = (core_problem.prompt_prefill_s, core_problem._tail_rate)
    medians = bench.build_side_by_side(pools=2, repeats=1)  # asserts equal problems
    assert set(medians) == {"vectorised", "before"} and all(v > 0 for v in medians.values())
    assert (core_problem.prompt_prefill_s, core_problem._tail_rate) == before
    assert bench.main(["--sizes", "a", "--repeats", "1", "--build-pools", "2"]) == 0
    assert "build of 2 prompt-tail pools" in capsys.readouterr().out
