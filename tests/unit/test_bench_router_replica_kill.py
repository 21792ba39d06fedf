"""``joulepool bench router_replica_kill``: bad arguments exit 2 with a message naming
the flag, before any router or engine starts (they used to hang or time out)."""

from __future__ import annotations

import pytest
from bench_helpers import load_bench

from joulepool.cli import main as cli_main


@pytest.fixture(scope="module")
def bench():
    yield from load_bench("bench_router_replica_kill.py")


@pytest.fixture
def no_runs(bench, monkeypatch):
    """A run that would start means validation let bad arguments through."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("a run started")
    monkeypatch.setattr(bench, "run_replica_kill", refuse)


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--runs", "0"], "--runs must be >= 1, not 0"),
        (["--requests", "-1"], "--requests must be >= 1, not -1"),
        (["--concurrency", "0"], "--concurrency must be >= 1, not 0"),
        (["--max-tokens", "0"], "--max-tokens must be >= 1, not 0"),
        (["--max-retries", "-1"], "--max-retries must be >= 0, not -1"),
        (["--kill-after", "2"], "--kill-after must be in [0, 1), not 2"),
        (["--kill-after", "1"], "--kill-after must be in [0, 1), not 1"),
        (["--kill-after", "-0.1"], "--kill-after must be in [0, 1), not -0.1"),
        (["--kill-after", "nan"], "--kill-after must be in [0, 1), not nan"),
        (["--probe-period", "-1"], "--probe-period must be >= 0 s and finite, not -1"),
        (["--probe-period", "inf"], "--probe-period must be >= 0 s and finite, not inf"),
    ],
)
def test_bad_arguments_exit_2(bench, no_runs, argv, words, capsys):
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench router_replica_kill: ") and words in err


def test_good_arguments_pass(bench):
    for argv in ([], ["--kill-after", "0", "--probe-period", "0", "--max-retries", "0"],
                 ["--runs", "1", "--requests", "1", "--concurrency", "1", "--max-tokens", "1"]):
        bench.check_args(bench._parse(argv))


def test_bad_arguments_exit_2_through_the_cli(capsys):
    assert cli_main(["bench", "router_replica_kill", "--kill-after", "2"]) == 2
    assert "--kill-after must be in [0, 1)" in capsys.readouterr().err


def test_every_option_has_help(bench, capsys):
    with pytest.raises(SystemExit):
        bench._parse(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag, words in [("--runs", "independent runs"), ("--requests", "completions sent"),
                        ("--concurrency", "client connections"),
                        ("--max-tokens", "tokens each completion"),
                        ("--out", "as JSON to this file")]:
        assert f"{flag} " in out and words in out, flag
