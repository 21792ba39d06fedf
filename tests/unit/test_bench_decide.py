"""``joulepool bench decide`` runs end to end on a small pool, side by side with a
baseline source, and refuses bad arguments with exit 2 (no timing asserted: the speed
figures are the benchmark's, not a test's)."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench_helpers import load_bench

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="module")
def bench():
    yield from load_bench("bench_decide.py")


@pytest.mark.parametrize("kind", ["constant", "profiles"])
def test_rounds_side_by_side_complete(bench, kind: str, capsys) -> None:
    assert bench.main(["--endpoints", "40", "--kind", kind, "--rounds", "1",
                       "--decisions", "60", "--inflight", "8",
                       "--baseline-src", str(SRC)]) == 0
    out = capsys.readouterr().out
    assert "this checkout: CPU p50" in out and "this / baseline cpu_us_p50" in out


def test_the_loop_routes_and_completes(bench) -> None:
    """Every iteration decides one request and, past the window, reports one: the
    ledger holds the window, not every request."""
    pool = bench._pool(30, "profiles")
    cpu, wall = bench._loop(pool, 50, 5)
    assert len(cpu) == len(wall) == 50 and min(cpu) >= 0.0
    assert sum(len(e.ledger) for e in pool.endpoints) == 5


@pytest.mark.parametrize("flags", [["--rounds", "0"], ["--endpoints", "0"],
                                   ["--baseline-src", "/nonexistent"]])
def test_bad_arguments_are_usage_errors(bench, flags: list[str], capsys) -> None:
    assert bench.main(flags) == 2
    assert flags[0] in capsys.readouterr().err
