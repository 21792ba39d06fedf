"""``joulepool bench inference_perf``'s own logic, without inference-perf: its arguments,
the corpus and tokenizer it writes, the configuration it hands inference-perf, reading
inference-perf's per-stage reports (real 0.7.0 reports, trimmed) into the side-by-side
table, and its refusal to go on without Python >= 3.12 (exit 2). The inference-perf run
itself is the benchmark's, not a test's."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest
from bench_helpers import load_bench

from joulepool.bench import in_all

REPORTS = Path(__file__).resolve().parents[1] / "data" / "inference_perf" / "proxy-run"


@pytest.fixture(scope="module")
def bench():
    yield from load_bench("bench_inference_perf.py")


def test_arguments_default_to_a_cache_venv_and_found_python(bench, monkeypatch,
                                                            tmp_path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    args = bench.parse_args(["--rates", "2.5,10", "--seconds", "3", "--no-stream",
                             "--workers", "2"])
    assert args.rates == [2.5, 10.0] and args.seconds == 3 and args.stream is False
    assert args.workers == 2 and args.python is None
    assert args.venv == tmp_path / "joulepool" / "inference-perf-0.7.0"
    assert not in_all(bench)  # installs its own venv: run by name only


@pytest.mark.parametrize("flags", [["--rates", "0"], ["--rates", "5,5"], ["--seconds", "1.5"],
                                   ["--seconds", "0"], ["--workers", "0"],
                                   ["--profile", "sweep"], ["--prompt-tokens", "x"],
                                   ["--inference-perf", "inference-perf==../x"]])
def test_bad_arguments_exit_2(bench, flags: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(flags)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


# --------------------------------------------------------------------------
# Corpus and tokenizer
# --------------------------------------------------------------------------
def test_corpus_keeps_lower_case_letters_only_up_to_the_limit(bench) -> None:
    text = "Shall I compare thee to a summer's day?\nThou art more lovely, 1609."
    assert bench.corpus_words(text) == ["shall", "i", "compare", "thee", "to", "a", "summer",
                                        "s", "day", "thou", "art", "more", "lovely"]
    assert bench.corpus_words(text, limit=3) == ["shall", "i", "compare"]
    assert bench.corpus_text(["a", "b", "c"], per_line=2) == "a b\nc\n"


def test_a_prompt_cut_from_the_corpus_is_as_many_tokens_as_words(bench) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from joulepool.toolenv import tokenizer_files

    words = bench.corpus_words("From fairest creatures we desire increase, that thereby "
                               "beauty's rose might never die. " * 3)
    tok = tokenizers.Tokenizer.from_str(tokenizer_files(words)["tokenizer.json"])
    ids = tok.encode(bench.corpus_text(words, per_line=5)).ids
    assert len(ids) == len(words) and 0 not in ids  # no unknown token
    cut = tok.decode(ids[4:11])
    assert len(tok.encode(cut).ids) == 7


# --------------------------------------------------------------------------
# The configuration
# --------------------------------------------------------------------------
def test_config_names_the_target_stages_prompts_tokenizer_and_reports(bench, tmp_path) -> None:
    args = bench.parse_args(["--rates", "5,20", "--seconds", "4", "--prompt-tokens", "64",
                             "--output-tokens", "16", "--profile", "poisson"])
    cfg = bench.config("127.0.0.1:9", "m", args, tmp_path / "corpus.txt", tmp_path / "tok",
                       tmp_path / "reports")
    assert cfg["server"] == {"type": "vllm", "model_name": "m",
                             "base_url": "http://127.0.0.1:9", "ignore_eos": True}
    assert cfg["api"] == {"type": "completion", "streaming": True}
    assert cfg["load"]["type"] == "poisson" and cfg["load"]["num_workers"] == 1
    assert cfg["load"]["stages"] == [{"rate": 5.0, "duration": 4},
                                     {"rate": 20.0, "duration": 4}]
    data = cfg["data"]
    assert data["type"] == "synthetic" and data["corpus_file_path"] == str(tmp_path /
                                                                          "corpus.txt")
    assert data["input_distribution"] == {"type": "fixed", "min": 64, "max": 64,
                                          "mean": 64, "std_dev": 0}
    assert data["output_distribution"]["mean"] == 16
    assert cfg["tokenizer"] == {"pretrained_model_name_or_path": str(tmp_path / "tok")}
    assert cfg["storage"] == {"local_storage": {"path": str(tmp_path / "reports")}}
    assert cfg["report"]["request_lifecycle"]["per_stage"] is True
    json.dumps(cfg)  # what run_inference_perf writes (YAML reads JSON)


# --------------------------------------------------------------------------
# Reports and figures
# --------------------------------------------------------------------------
def test_figures_read_from_real_inference_perf_stage_reports(bench) -> None:
    """The values are the stage reports' own (a 0.7.0 run at 5 and 20 req/s), so a
    figure read from the wrong key or statistic, or not scaled to ms, fails."""
    figures = bench.read_reports(REPORTS)
    assert sorted(figures) == [5.0, 20.0]
    five, twenty = figures[5.0], figures[20.0]
    assert (five["completed"], five["errored"]) == (50, 0)
    assert (twenty["completed"], twenty["errored"]) == (200, 0)
    assert five["req/s"] == pytest.approx(5.396447000016775)
    assert twenty["req/s"] == pytest.approx(19.992794710745798)
    assert five["TTFT p50 ms"] == pytest.approx(2.883240000301157)
    assert five["latency p99 ms"] == pytest.approx(15.201109350036834)
    assert twenty["latency p99 ms"] == pytest.approx(103.67113631949901)
    assert five["ITL p99 ms"] == pytest.approx(0.1457193497481057)
    assert five["TPOT p50 ms"] == pytest.approx(0.005676209653874168)
    assert set(five) == set(bench.LABELS) | {"completed", "errored"}


def test_a_missing_figure_is_none_and_a_folder_without_stages_an_error(bench,
                                                                       tmp_path) -> None:
    stage = json.loads((REPORTS / "stage_0_lifecycle_metrics.json").read_text())
    del stage["successes"]["latency"]["time_to_first_token"]  # e.g. not streaming
    stage["failures"]["count"] = 3
    rate, row = bench.read_stage(stage)
    assert rate == 5.0 and row["TTFT p50 ms"] is None and row["errored"] == 3
    del stage["load_summary"]["requested_rate"]
    with pytest.raises(ValueError, match="requested_rate"):
        bench.read_stage(stage)
    (tmp_path / "summary_lifecycle_metrics.json").write_text("{}")
    with pytest.raises(ValueError, match="no stage_N"):
        bench.read_reports(tmp_path)


def test_table_puts_proxy_beside_direct_with_the_ratio(bench, tmp_path) -> None:
    from joulepool.bench import load_benchmark

    proxied = bench.read_reports(REPORTS)
    shutil.copytree(REPORTS, tmp_path / "direct")
    stage = json.loads((tmp_path / "direct" / "stage_0_lifecycle_metrics.json").read_text())
    stage["successes"]["latency"]["time_to_first_token"]["median"] /= 2
    (tmp_path / "direct" / "stage_0_lifecycle_metrics.json").write_text(json.dumps(stage))
    direct = bench.read_reports(tmp_path / "direct")
    shared = load_benchmark("proxy")
    table = shared.comparison_table(shared.median_figures([direct], bench.LABELS),
                                    shared.median_figures([proxied], bench.LABELS),
                                    bench.LABELS)
    ttft = next(line for line in table.splitlines()
                if line.split()[:3] == ["5", "TTFT", "p50"])
    assert ttft.endswith("2.00x")
    assert "TPOT p50 ms" in table


# --------------------------------------------------------------------------
# Setting inference-perf up
# --------------------------------------------------------------------------
def test_an_old_given_python_exits_2_naming_it(bench, tmp_path, capsys) -> None:
    old = tmp_path / "py"
    old.write_text("#!/bin/sh\necho 3 11\n")
    old.chmod(old.stat().st_mode | stat.S_IXUSR)
    assert bench.main(["--python", str(old), "--venv", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err
    assert "inference-perf cannot be set up" in err and "needs >= 3.12" in err
    assert str(old) in err
    assert not (tmp_path / "v").exists()


@pytest.mark.parametrize(("script", "message"), [
    ("echo /no/such/corpus.txt", "cannot read inference-perf's corpus"),
    ('case "$2" in *shakespeare*) echo "$CORPUS";; *) echo 1 2;; esac', "not four counts"),
])
def test_a_missing_corpus_or_a_short_check_is_a_setup_error(bench, tmp_path, monkeypatch,
                                                            script: str, message: str) -> None:
    corpus = tmp_path / "shakespeare.txt"
    corpus.write_text("to be or not to be that is the question " * 20)
    monkeypatch.setenv("CORPUS", str(corpus))
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f"#!/bin/sh\n{script}\n")
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(bench.SetupError, match=message):
        bench.build_corpus_and_tokenizer(tmp_path / "venv", tmp_path / "work", 4)
