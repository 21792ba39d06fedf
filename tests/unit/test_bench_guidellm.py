"""``joulepool bench guidellm``'s own logic, without GuideLLM: its arguments, the local
tokenizer it writes, the scenario it hands GuideLLM, reading GuideLLM's report (a real
0.8.1 report, trimmed) and the side-by-side table, and its refusals to set GuideLLM up
(exit 2). The GuideLLM run itself is the benchmark's, not a test's."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
from bench_helpers import load_bench

REPORT = Path(__file__).resolve().parents[1] / "data" / "guidellm" / "report-trimmed.json"


@pytest.fixture(scope="module")
def bench():
    yield from load_bench("bench_guidellm.py")


# --------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------
def test_arguments_parse_rates_and_default_to_a_cache_venv(bench, monkeypatch,
                                                           tmp_path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    args = bench.parse_args(["--rates", "2.5,10", "--seconds", "3", "--no-stream"])
    assert args.rates == [2.5, 10.0] and args.seconds == 3.0 and args.stream is False
    assert args.venv == tmp_path / "joulepool" / "guidellm-0.8.1"
    assert bench.default_venv("guidellm") == tmp_path / "joulepool" / "guidellm-latest"


@pytest.mark.parametrize("flags", [["--rates", "0"], ["--rates", "5,x"], ["--rates", "5,5"],
                                   ["--rates", "nan"], ["--rates", "-1"], ["--runs", "0"],
                                   ["--seconds", "inf"], ["--warmup", "1"],
                                   ["--profile", "sweep"], ["--output-tokens", "0"],
                                   ["--guidellm", "guidellm==../../x"]])
def test_bad_arguments_exit_2(bench, flags: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(flags)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


# --------------------------------------------------------------------------
# The local tokenizer
# --------------------------------------------------------------------------
def test_tokenizer_vocabulary_is_the_folded_words_once_after_unk_and_period(bench) -> None:
    files = bench.tokenizer_files(["Zeta", "alpha", "zeta", "beta"])
    tokenizer = json.loads(files["tokenizer.json"])
    vocab = tokenizer["model"]["vocab"]
    assert vocab == {"[UNK]": 0, ".": 1, "alpha": 2, "beta": 3, "zeta": 4}
    assert tokenizer["model"]["type"] == "WordLevel"
    assert tokenizer["model"]["unk_token"] == "[UNK]"
    assert tokenizer["added_tokens"][0]["id"] == 0 and tokenizer["added_tokens"][0]["special"]
    config = json.loads(files["tokenizer_config.json"])
    assert config["unk_token"] == "[UNK]"
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


@pytest.mark.parametrize("words", [[], ["two words"], ["don't"], [""]])
def test_tokenizer_refuses_what_it_cannot_make_one_token(bench, words: list[str]) -> None:
    with pytest.raises(ValueError):
        bench.tokenizer_files(words)


def test_tokenizer_loads_in_the_tokenizers_library(bench) -> None:
    """Where the ``tokenizers`` library is installed (GuideLLM's venv, not the test
    extra): the file loads, known words are one token each, others are [UNK]."""
    tokenizers = pytest.importorskip("tokenizers")
    files = bench.tokenizer_files(["quick", "brown", "fox"])
    tok = tokenizers.Tokenizer.from_str(files["tokenizer.json"])
    enc = tok.encode("Quick brown fox. Brown dog")
    assert enc.tokens == ["quick", "brown", "fox", ".", "brown", "[UNK]"]
    assert tok.decode(enc.ids[:3]) == "quick brown fox"


# --------------------------------------------------------------------------
# Scenario, report, table
# --------------------------------------------------------------------------
def test_scenario_names_the_target_rates_tokenizer_and_report(bench, tmp_path) -> None:
    args = bench.parse_args(["--rates", "5,20", "--seconds", "4", "--prompt-tokens", "64",
                             "--output-tokens", "16", "--profile", "poisson"])
    spec = bench.scenario("127.0.0.1:9", "m", args, tmp_path / "tok", tmp_path / "r.json")
    backend = spec["spec"]["backend"]
    assert backend["target"] == "http://127.0.0.1:9" and backend["model"] == "m"
    assert backend["request_format"] == "/v1/completions" and backend["stream"] is True
    assert backend["validate_backend"] is True  # GET /health: the proxy and engines serve it
    assert spec["spec"]["profile"]["kind"] == "poisson"
    assert [b["profile.rate"] for b in spec["benchmarks"]] == [5.0, 20.0]
    assert spec["spec"]["constraints"] == [{"kind": "max_duration", "seconds": 4.0}]
    assert spec["spec"]["tokenizer"]["model"] == str(tmp_path / "tok")
    assert spec["spec"]["data"] == [{"kind": "synthetic_text", "prompt_tokens": 64,
                                     "output_tokens": 16}]
    assert spec["spec"]["outputs"] == [{"kind": "json", "path": str(tmp_path / "r.json")}]
    json.dumps(spec)  # what run_guidellm writes


def test_figures_read_from_a_real_guidellm_report(bench) -> None:
    """The values are the trimmed 0.8.1 report's own (rates 5 and 10), so a figure read
    from the wrong key or statistic, or scaled wrongly, fails."""
    figures = bench.read_figures(json.loads(REPORT.read_text()))
    assert sorted(figures) == [5.0, 10.0]
    five, ten = figures[5.0], figures[10.0]
    assert five["req/s"] == 5.125 and ten["req/s"] == 10.125  # mean, not median
    assert five["TTFT p99 ms"] == pytest.approx(22.478342056274414)
    assert ten["TTFT p99 ms"] == pytest.approx(15.889167785644531)
    assert five["ITL p50 ms"] == pytest.approx(0.013166858303931451)
    # GuideLLM reports request latency in seconds; the table in ms
    assert five["latency p50 ms"] == pytest.approx(5.0814151763916016)
    assert ten["latency p50 ms"] == pytest.approx(5.435943603515625)
    assert (five["completed"], five["errored"]) == (41, 0)
    assert (ten["completed"], ten["errored"]) == (81, 0)


def test_a_missing_figure_is_none_and_an_empty_report_an_error(bench) -> None:
    report = json.loads(REPORT.read_text())
    del report["benchmarks"][0]["metrics"]["time_to_first_token_ms"]
    rate = report["benchmarks"][0]["config"]["strategy"]["rate"]
    row = bench.read_figures(report)[rate]
    assert row["TTFT p50 ms"] is None and row["TTFT p99 ms"] is None
    assert row["req/s"] is not None
    with pytest.raises(ValueError):
        bench.read_figures({"benchmarks": []})


# --------------------------------------------------------------------------
# Setting GuideLLM up
# --------------------------------------------------------------------------
def _fake_python(path: Path, version: str) -> str:
    path.write_text(f"#!/bin/sh\necho {version}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_an_old_interpreter_is_refused(bench, tmp_path) -> None:
    with pytest.raises(bench.SetupError, match=r">= 3\.10"):
        bench.ensure_guidellm(tmp_path / "venv", _fake_python(tmp_path / "py", "3 9"),
                              ["guidellm"])
    assert not (tmp_path / "venv").exists()


def test_a_folder_that_is_not_a_venv_is_left_alone(bench, tmp_path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "keep.txt").write_text("x")
    with pytest.raises(bench.SetupError, match="not a virtual environment"):
        bench.ensure_guidellm(folder, sys.executable, ["guidellm"])
    assert (folder / "keep.txt").read_text() == "x"


def test_a_venv_recording_the_same_requirements_is_reused(bench, tmp_path, capsys) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "guidellm").write_text("")
    _fake_python(venv / "bin" / "python", "")  # the venv's own interpreter runs
    major, minor = sys.version_info[:2]
    (venv / "joulepool-requirements.txt").write_text(
        f"torch==1\nguidellm==2\npython {major}.{minor}\n")
    assert bench.ensure_guidellm(venv, sys.executable, ["torch==1", "guidellm==2"]) == \
        venv / "bin" / "guidellm"
    assert "reusing" in capsys.readouterr().out


def test_setup_failure_exits_2_with_the_reason(bench, tmp_path, capsys) -> None:
    missing = tmp_path / "no-such-python"
    assert bench.main(["--python", str(missing), "--venv", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err
    assert "GuideLLM cannot be set up" in err and str(missing) in err
    assert not os.path.exists(tmp_path / "v")


def _fake_venv_python(venv: Path, script: str) -> None:
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f"#!/bin/sh\n{script}\n")
    python.chmod(python.stat().st_mode | stat.S_IXUSR)


@pytest.mark.parametrize("check_output", ["", "12 40"])
def test_a_tokenizer_check_without_its_counts_is_a_setup_error(bench, tmp_path,
                                                               check_output: str) -> None:
    venv = tmp_path / "venv"
    _fake_venv_python(venv, f'case "$2" in *get_words_list*) echo alpha beta;; '
                            f'*) echo "{check_output}";; esac')
    with pytest.raises(bench.SetupError, match="not three counts"):
        bench.build_tokenizer(venv, tmp_path / "tok")


@pytest.mark.parametrize("report", [None, "not json", "[]", '{"benchmarks": []}'])
def test_a_missing_or_bad_report_is_a_failed_run(bench, tmp_path, report: str | None) -> None:
    program = tmp_path / "guidellm"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    if report is not None:
        (tmp_path / "r.json").write_text(report)
    spec = {"spec": {"outputs": [{"kind": "json", "path": str(tmp_path / "r.json")}]}}
    with pytest.raises(RuntimeError, match=r"guidellm run \(direct-run1\): report"):
        bench.run_guidellm(program, spec, tmp_path, "direct-run1", True, 60)
