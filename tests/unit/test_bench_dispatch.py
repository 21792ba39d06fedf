"""``joulepool bench``'s dispatcher: ``all`` runs every benchmark but those that set
``IN_ALL = False`` (a separate toolchain installed on first use), which still run by
name."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from joulepool import bench

SCRIPT = """
IN_ALL = {in_all}
def main(argv):
    print("ran {name}", argv)
    return 0
"""


@pytest.fixture
def bench_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name, in_all in (("dispatch_light", True), ("dispatch_heavy", False)):
        (tmp_path / f"bench_{name}.py").write_text(SCRIPT.format(in_all=in_all, name=name))
        monkeypatch.delitem(sys.modules, f"bench_{name}", raising=False)
    monkeypatch.setattr(bench, "_bench_dir", lambda: tmp_path)
    yield tmp_path
    for name in ("dispatch_light", "dispatch_heavy"):
        sys.modules.pop(f"bench_{name}", None)


def _run(name: str) -> int:
    return bench.run(argparse.Namespace(name=name, bench_args=["--x"]))


def test_all_skips_a_benchmark_that_opts_out_and_says_how_to_run_it(bench_dir, capsys) -> None:
    assert _run("all") == 0
    out = capsys.readouterr().out
    assert "ran dispatch_light ['--x']" in out
    assert "ran dispatch_heavy" not in out
    assert "joulepool bench dispatch_heavy" in out


def test_a_benchmark_that_opts_out_of_all_runs_by_name(bench_dir, capsys) -> None:
    assert _run("dispatch_heavy") == 0
    assert "ran dispatch_heavy ['--x']" in capsys.readouterr().out


def test_the_load_generator_benchmarks_opt_out_of_all() -> None:
    assert not bench.in_all(bench.load_benchmark("guidellm"))
    assert not bench.in_all(bench.load_benchmark("inference_perf"))
    assert bench.in_all(bench.load_benchmark("proxy"))
