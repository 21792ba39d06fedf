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


def test_pooled_times_the_operators_plan_per_instance_and_pooled_at_size_a(bench, capsys):
    got = bench.pooled_side_by_side("a", repeats=1)
    per, pooled = got["plans"]["per_instance"], got["plans"]["pooled"]
    # the per-instance plan is one solve; the pooled fixed point re-solves at least once
    assert per.solves == 1 and 1 < pooled.solves <= 1 + bench.POOL_ROUNDS
    assert per.result.feasible and pooled.result.feasible
    assert got["bound_s"] == 2 * pooled.problem.time_limit_s and got["gpus"] == 30
    assert bench.main(["--pooled", "--sizes", "a", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "POOL_ROUNDS=3" in out and "(a)" in out and "30 free GPUs" in out
    assert "feasible=True/True" in out


def test_an_unknown_size_is_a_usage_error(bench):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--pooled", "--sizes", "d"])
    assert exc.value.code == 2
