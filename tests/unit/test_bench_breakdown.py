"""``joulepool bench breakdown``: the split of a run's window energy adds up to it."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest
from bench_helpers import BENCHMARKS, load_bench
from sim_helpers import cluster

from joulepool.core.classes import CLASS_NAMES
from joulepool.sim.runner import Experiment
from joulepool.sim.trace import load_trace


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    yield from load_bench("bench_breakdown.py")


@pytest.mark.parametrize("policy", ["least-loaded", "combined"])
def test_split_sums_to_the_runs_window_energy(bench: ModuleType, policy: str) -> None:
    cl = cluster([("h", "H100", 4), ("a", "A100", 2), ("l", "L4", 2)])
    exp = Experiment(cluster=cl, trace=load_trace(), duration_s=60.0, arrival_mode="rate",
                     arrival_value=12.0, policies=(policy,), seed=1)
    res, splits = bench.breakdown(exp)
    run = res.runs[policy][0]
    split = splits[policy]
    parts = split["energy_j"]
    # idle_free is the rest by construction: check each part against what the run saw
    assert parts["idle_free"] >= 0.0 and parts["idle_on"] > 0.0
    assert sum(parts.values()) == pytest.approx(run.energy_j, rel=1e-9)
    decode_tokens = sum(v[1] for v in split["decode_by_batch"].values())
    assert decode_tokens == pytest.approx(split["decode_tokens"])
    # tokens decoded in the window: every request's first token comes with its prefill
    assert split["decode_tokens"] <= run.tokens_in_window + 1e-6
    assert split["decode_tokens"] > 0.5 * run.tokens_in_window
    assert split["prefill_tokens"] > 0.0 and parts["prefill"] > 0.0
    assert sum(v[0] for v in split["decode_by_batch"].values()) == pytest.approx(
        parts["decode"])
    # the GPUs' idle power over the window is all paid, by free GPUs or by instances
    idle_w = sum(cl.idle_w(n.product) * n.gpus for n in cl.nodes)
    assert parts["idle_free"] + parts["idle_on"] + parts["startup"] == pytest.approx(
        idle_w * 60.0, rel=1e-6) or parts["startup"] > 0.0
    text = bench.render(res, splits)
    assert "energy floor" in text and policy in text
    # per operating point: the same decode and prefill joules and tokens, by demand
    points = split["decode_points"].values()
    assert sum(v[0] for v in points) == pytest.approx(parts["decode"], rel=1e-9)
    assert sum(v[1] for v in points) == pytest.approx(split["decode_tokens"], rel=1e-9)
    pf_points = split["prefill_points"].values()
    assert sum(v[0] for v in pf_points) == pytest.approx(parts["prefill"], rel=1e-9)
    assert sum(v[1] for v in pf_points) == pytest.approx(split["prefill_tokens"], rel=1e-9)
    wl = res.repeats[0].workload
    for (demand, _key, b, _ci), (_j, tokens) in split["decode_points"].items():
        cls, tier = demand.split("/")
        assert b >= 1 and tokens >= 0.0
        assert ((wl.cls == CLASS_NAMES.index(cls)) & (wl.bulk == (tier == "bulk"))).any()
    # the gap to the floor: its terms add up to the run's energy over the floor's
    gap = bench.gap_to_floor(res, split)
    floor = res.repeats[0].floor
    assert gap["unexplained"] == pytest.approx(0.0, abs=1e-6 * run.energy_j)
    assert sum(gap.values()) == pytest.approx(run.energy_j - floor.energy_j, rel=1e-9)
    assert gap["idle"] == pytest.approx(0.0, abs=1e-6 * floor.idle_j)
    assert gap["work"] <= 1e-6 * run.energy_j  # the floor does at least the run's work


def test_the_plan_is_printed_when_a_later_policy_plans(bench: ModuleType, capsys) -> None:
    # least-loaded plans nothing; freesh, listed second, does: its first plan is printed
    small = BENCHMARKS / "heldout" / "small-8.yaml"
    args = ["--cluster", str(small), "--trace", "prefill-heavy", "--load", "0.3",
            "--duration", "5"]
    assert bench.main([*args, "--policies", "freesh"]) == 0
    alone = [x for x in capsys.readouterr().out.splitlines() if x.startswith("plan @")]
    assert len(alone) == 1
    assert bench.main([*args, "--policies", "least-loaded,freesh"]) == 0
    plans = [x for x in capsys.readouterr().out.splitlines() if x.startswith("plan @")]
    # the same plan, but for its solve time (wall clock)
    assert [p.split(" ms): ", 1)[1] for p in plans] == [alone[0].split(" ms): ", 1)[1]]


def test_cli_refuses_a_non_positive_load(bench: ModuleType, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        bench.main(["--load", "0"])
    assert e.value.code == 2
    assert "--load and --duration must be positive" in capsys.readouterr().err


def test_cli_takes_a_cluster_file_and_refuses_a_bad_one(bench: ModuleType, capsys,
                                                        tmp_path) -> None:
    small = BENCHMARKS / "heldout" / "small-8.yaml"
    assert bench.main(["--cluster", str(small), "--trace", "prefill-heavy", "--load", "0.3",
                       "--duration", "5", "--policies", "least-loaded"]) == 0
    out = capsys.readouterr().out
    assert "least-loaded decode by batch" in out
    # where the requests go: per product, and first tokens per class
    line = next(x for x in out.splitlines() if x.startswith("least-loaded by product: "))
    assert "A100 " in line and "H100 " in line and "L4 " in line and " late" in line
    served = sum(int(part.split(" served")[0].rsplit(", ", 1)[1].replace(",", ""))
                 for part in line.split("; ") if " served, " in part)
    requests = int(out.split("requests ", 1)[1].split(":")[0].replace(",", ""))
    assert served + int(line.split("never served ")[1].split(";")[0]) == requests
    assert "first tokens on time by class: SS " in line
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens\n0,5\n")
    with pytest.raises(SystemExit) as e:
        bench.main(["--cluster", str(small), "--trace", str(bad)])
    assert e.value.code == 2
    assert f"{bad}:1: header" in capsys.readouterr().err
