"""``joulepool simulate`` end to end on a small cluster file: table, JSON, plots, errors."""

from __future__ import annotations

import json

import pytest
import yaml

from joulepool.cli import main
from joulepool.sim.cluster import ClusterError, freesh_3site, joulesched_320, load_cluster_file
from joulepool.sim.policies import DEFAULT_ORDER, parse_policies

SMALL = {
    "name": "tiny",
    "stepSeconds": 60,
    "nodes": [
        {"name": "h", "site": "east", "product": "H100", "gpus": 4},
        {"name": "a", "site": "west", "product": "A100", "gpus": 4},
    ],
    "carbon": [{"site": "east", "series": [400, 420]}, {"site": "west", "gramsPerKWh": 100}],
    "simulator": {"model": "llama-3.1-8b", "durationSeconds": 60, "rate": 6},
}


@pytest.fixture()
def small_file(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(SMALL))
    return p


def test_simulate_small_cluster_writes_table_json_and_plots(small_file, tmp_path, capsys):
    out = tmp_path / "res"
    rc = main(["simulate", "--cluster", str(small_file), "--quiet", "--out", str(out),
               "--policies", "round-robin,joulesched,freesh", "--repeat", "2", "--jobs", "1"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "policy" in text and "joulesched" in text and "energy floor" in text
    assert "arrivals: non-homogeneous Poisson" in text and "chat 6" in text
    # the planner's forecast and queueing headroom are stated with the run
    assert "planner: forecast per 300-s step = each class's busiest 60-s rate" in text
    assert "queueing headroom: P(wait > TTFT SLO - prefill) <= 0.01" in text
    assert "±" in text  # confidence intervals with --repeat 2
    doc = json.loads((out / "tiny-result.json").read_text())
    assert set(doc["policies"]) == {"round-robin", "joulesched", "freesh"}
    rr = doc["policies"]["round-robin"]
    assert len(rr["runs"]) == 2 and rr["summary"]["energy_mj_per_h"]["n"] == 2
    # the engine's counts are in every run's summary
    assert {"rejected", "truncated", "preemptions", "startups"} <= set(rr["runs"][0])
    assert doc["repeats"][0]["floor"]["feasible"] is True
    for name in ("energy", "latency-cdf", "clock-power"):
        png = out / f"tiny-{name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG"
    assert "results:" in text and "tiny-energy.png" in text


def test_parallel_jobs_give_the_same_numbers(small_file, tmp_path, capsys):
    docs = []
    for jobs in ("1", "2"):
        out = tmp_path / f"j{jobs}"
        assert main(["simulate", "--cluster", str(small_file), "--quiet", "--out", str(out),
                     "--policies", "round-robin,miad-only", "--jobs", jobs, "--no-plots",
                     "--seed", "4"]) == 0
        docs.append(json.loads((out / "tiny-result.json").read_text()))
    capsys.readouterr()
    for p in ("round-robin", "miad-only"):
        a, b = (d["policies"][p]["runs"][0] for d in docs)
        assert a["energy_j"] == b["energy_j"] and a["p99_ms"] == b["p99_ms"]



@pytest.mark.parametrize("jobs", ["1", "2"])
def test_progress_is_shown_without_a_terminal(small_file, tmp_path, capsys, jobs):
    """stderr is no terminal here (as in a piped ``make demo``): one line as the run
    starts and one per finished policy run, counted; --quiet prints none of them."""
    argv = ["simulate", "--cluster", str(small_file), "--out", str(tmp_path), "--no-plots",
            "--policies", "round-robin,miad-only", "--jobs", jobs]
    assert main(argv) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == ("simulating 60 s of tiny under 2 policy run(s) in "
                        f"{jobs} process(es)...")
    done = sorted(line.split("] ", 1)[1].split(" (", 1)[0] for line in lines[1:])
    assert done == ["miad-only", "round-robin"]
    assert [line.split(",")[0].strip() for line in lines[1:]] == ["[1/2", "[2/2"]
    assert main([*argv, "--quiet"]) == 0
    assert capsys.readouterr().err == ""

@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--policies", "round-robin,fastest"], "unknown policy fastest"),
        (["--cluster", "nowhere.yaml"], "neither a built-in cluster"),
        (["--duration", "-5"], "--duration must be a positive"),
        (["--mix", "0.5,0.5"], "--mix"),
        (["--assume", "gamma"], "KEY=NUMBER"),
        (["--assume", "zeta=2"], "unknown assumption"),
        (["--assume", "memory_power_share=1.5"], "memory_power_share must be in [0, 1]"),
        (["--assume", "bandwidth_clock=0"], "bandwidth_clock_ratio must be in (0, 1]"),
        (["--repeat", "0"], "--repeat"),
        (["--headroom", "1.5"], "--headroom must be in [0, 1]"),
        (["--max-num-batched-tokens", "0"], "max_num_batched_tokens must be >= 1"),
        (["--gpu-memory-utilization", "0"], "gpu_memory_utilization must be in (0, 1]"),
    ],
)
def test_bad_arguments_exit_2(argv, words, tmp_path, capsys):
    rc = main(["simulate", "--quiet", "--out", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and words in err


def test_cluster_file_errors(tmp_path):
    bad = dict(SMALL, simulator={"model": "gpt-9"})
    p = tmp_path / "b.yaml"
    p.write_text(yaml.safe_dump(bad))
    with pytest.raises(ClusterError, match="gpt-9"):
        load_cluster_file(p)
    p.write_text(yaml.safe_dump(dict(SMALL, simulator={"colour": 1})))
    with pytest.raises(ClusterError, match="unknown key"):
        load_cluster_file(p)
    p.write_text(yaml.safe_dump({"nodes": [{"name": "x", "product": "TPU", "gpus": 4}]}))
    with pytest.raises(ClusterError, match="unknown GPU product"):
        load_cluster_file(p)
    p.write_text("nodes: [")
    with pytest.raises(ClusterError, match="invalid YAML"):
        load_cluster_file(p)


def test_cluster_file_defaults(small_file):
    cl = load_cluster_file(small_file)
    assert cl.static_modes == {"H100": 1, "A100": 1}
    assert cl.carbon_at("east", 0) == 400 and cl.carbon_at("east", 61) == 420
    assert cl.carbon_at("west", 1000) == 100
    assert cl.default_arrival == ("rate", 6.0)


def test_builtin_clusters():
    j = joulesched_320()
    counts = j.gpu_counts()
    assert counts == {("site-1", "A100"): 160, ("site-1", "H100"): 128, ("site-1", "L4"): 32}
    f = freesh_3site()
    assert f.gpu_counts() == {
        ("site-1", "A100"): 4, ("site-1", "H100"): 4, ("site-2", "A100"): 12,
        ("site-2", "H100"): 2, ("site-3", "A100"): 8,
    }
    series = {s: f.carbon_g_per_kwh[s] for s in f.sites}
    assert all(len(set(v)) > 1 for v in series.values())  # time-varying per site
    assert f.model == "llama-3.1-70b" and set(f.plan_modes) == {
        "2xA100", "4xA100", "8xA100", "4xH100"}


def test_policy_names():
    assert parse_policies("all") == DEFAULT_ORDER
    assert len(DEFAULT_ORDER) == 8
    assert parse_policies("freesh, joulesched") == ("freesh", "joulesched")
    with pytest.raises(ValueError, match="unknown policy"):
        parse_policies("nope")


def test_workers_that_cannot_start_exit_1_with_the_reason(small_file, tmp_path, capsys,
                                                          monkeypatch):
    """--jobs 2 whose workers refuse to start (they import another joulepool than this
    process's): exit code 1 and the reason on stderr, no traceback."""
    import joulepool

    monkeypatch.setattr(joulepool, "__file__", str(tmp_path / "joulepool" / "__init__.py"))
    with pytest.raises(SystemExit) as stop:
        main(["simulate", "--cluster", str(small_file), "--quiet", "--out", str(tmp_path),
              "--policies", "round-robin,joulesched", "--jobs", "2"])
    assert stop.value.code == 1
    assert "a simulator worker process failed to start" in capsys.readouterr().err
