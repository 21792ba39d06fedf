"""Traces and workloads: the vendored file, malformed files, NHPP scaling, tiers, classes."""

from __future__ import annotations

import numpy as np
import pytest

from joulepool.cli import main
from joulepool.sim.trace import ATTRIBUTION, TraceError, load_trace, vendored_trace_path
from joulepool.sim.workload import build_workload, mean_shape_rate, predictor_sigma

HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


@pytest.fixture(scope="module")
def trace():
    return load_trace()


def test_vendored_trace_is_the_azure_conversation_trace(trace):
    assert trace.requests == 19366
    assert trace.arrival_s[0] == 0.0 and np.all(np.diff(trace.arrival_s) >= 0)
    assert 58 * 60 < trace.arrival_s[-1] < 59 * 60
    assert np.median(trace.input_tokens) == 1020 and np.median(trace.output_tokens) == 129
    assert "Splitwise" in ATTRIBUTION and "CC-BY 4.0" in ATTRIBUTION
    assert vendored_trace_path().name == "azure_conv_2023.csv"


def test_numeric_timestamps_and_unsorted_rows(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text(HEADER + "10.5,100,20\n2.0,50,5\n\n3,60,6\n")
    t = load_trace(p)
    assert t.arrival_s.tolist() == [0.0, 1.0, 8.5]
    assert t.input_tokens.tolist() == [50, 60, 100]


@pytest.mark.parametrize(
    ("body", "line", "words"),
    [
        ("2023-11-16 18:15:46.1,374,44\n2023-11-16 18:15:47.2,12x,5\n", 3, "ContextTokens"),
        ("0,1,1\n1,2\n", 3, "expected 3 fields"),
        ("0,1,1\n1,2,0\n", 3, "GeneratedTokens must be >= 1"),
        ("0,1,1\nyesterday,2,3\n", 3, "timestamp"),
        ("0,-4,1\n", 2, "ContextTokens must be >= 0"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, body, line, words):
    p = tmp_path / "bad.csv"
    p.write_text(HEADER + body)
    with pytest.raises(TraceError) as exc:
        load_trace(p)
    assert f"bad.csv:{line}:" in str(exc.value) and words in str(exc.value)


def test_missing_column_and_empty_file(tmp_path):
    p = tmp_path / "h.csv"
    p.write_text("TIMESTAMP,Context,GeneratedTokens\n0,1,1\n")
    with pytest.raises(TraceError, match=r"h.csv:1: .*ContextTokens"):
        load_trace(p)
    e = tmp_path / "e.csv"
    e.write_text("")
    with pytest.raises(TraceError, match=r"e.csv:1: empty"):
        load_trace(e)
    h = tmp_path / "only.csv"
    h.write_text(HEADER)
    with pytest.raises(TraceError, match="no requests"):
        load_trace(h)


def test_malformed_trace_exits_2_naming_the_line(tmp_path, capsys):
    p = tmp_path / "broken.csv"
    p.write_text(HEADER + "0,10,10\n1,20,20\n2,abc,30\n")
    rc = main(["simulate", "--trace", str(p), "--duration", "5", "--quiet",
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "broken.csv:4:" in err and "ContextTokens" in err
    assert "Traceback" not in err


def test_nhpp_keeps_the_per_minute_shape(trace):
    wl = build_workload(trace, trace.span_s, mode="scale", value=20.0, seed=1)
    counts = np.bincount((wl.arrival_s // 60).astype(int), minlength=59)[:58]
    expected = 20.0 * trace.minute_counts()[:58]
    assert np.corrcoef(counts, expected)[0, 1] > 0.97
    assert counts.sum() == pytest.approx(expected.sum(), rel=0.02)


def test_rate_mode_hits_the_mean_rate_and_resamples_token_pairs(trace):
    wl = build_workload(trace, 600.0, mode="rate", value=100.0, seed=2)
    assert wl.mean_rate_rps == pytest.approx(100.0, rel=0.03)
    assert wl.scale == pytest.approx(100.0 / mean_shape_rate(trace, 600.0))
    pairs = set(zip(trace.input_tokens.tolist(), trace.output_tokens.tolist(), strict=True))
    assert all(p in pairs for p in zip(wl.input_tokens.tolist(), wl.output_tokens.tolist(),
                                       strict=True))
    assert wl.description[0].startswith("arrivals: non-homogeneous Poisson")


def test_replay_is_the_trace(trace):
    wl = build_workload(trace, 600.0, mode="replay", seed=0)
    keep = trace.arrival_s < 600.0
    assert np.array_equal(wl.arrival_s, trace.arrival_s[keep])
    assert np.array_equal(wl.output_tokens, trace.output_tokens[keep])
    assert wl.scale == 1.0


def test_tier_mix_classes_and_predictor(trace):
    wl = build_workload(trace, 1200.0, mode="rate", value=100.0, seed=3)
    shares = np.bincount(wl.category, minlength=3) / wl.requests
    assert shares == pytest.approx([0.64, 0.28, 0.08], abs=0.015)
    assert np.array_equal(wl.bulk, wl.category == 2)
    mae = np.mean(np.abs(wl.predicted_tokens - wl.output_tokens) / wl.output_tokens)
    assert mae == pytest.approx(0.12, abs=0.02)
    assert predictor_sigma(0.0) == 0.0
    # bulk requests get 10x the SLOs; deadlines follow TTFT + tokens x TPOT
    assert np.allclose(wl.deadline_s, wl.ttft_slo_s + wl.output_tokens * wl.tpot_slo_s)
    assert set(np.round(wl.tpot_slo_s[wl.bulk], 6)) == {1.5}
    assert set(np.round(wl.ttft_slo_s[~wl.bulk], 6)) <= {0.3, 0.6}


def test_workload_is_deterministic_per_seed(trace):
    a = build_workload(trace, 120.0, mode="rate", value=50.0, seed=9)
    b = build_workload(trace, 120.0, mode="rate", value=50.0, seed=9)
    c = build_workload(trace, 120.0, mode="rate", value=50.0, seed=10)
    assert np.array_equal(a.arrival_s, b.arrival_s) and np.array_equal(a.cls, b.cls)
    assert not np.array_equal(a.arrival_s[:50], c.arrival_s[:50])
