"""Scenario inputs: SLO sets reach every part of a run; ``--load`` is relative to the
static deployment's capacity at SLO (``sim.runner.capacity_at_slo``)."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from sim_helpers import cluster

from joulepool.cli import main
from joulepool.core.classes import (
    CLASS_NAMES,
    FREESH_SLOS,
    INTERACTIVE_SLOS,
    SLO,
    SLO_SETS,
    freesh_slo,
    slo_set,
)
from joulepool.sim.planning import plan_problem
from joulepool.sim.runner import (
    Experiment,
    capacity_at_slo,
    floor_for,
    model_tables,
    resolve_rate,
    run_experiment,
    static_capacity,
    trace_capacity,
)
from joulepool.sim.trace import load_trace
from joulepool.sim.workload import build_workload

TRACE = load_trace()


def test_slo_sets_by_class_and_name():
    assert INTERACTIVE_SLOS.for_class("LS") == SLO(ttft_s=0.6, tpot_s=0.05)
    assert INTERACTIVE_SLOS.for_class("SL") == SLO(ttft_s=0.3, tpot_s=0.05)
    for name in CLASS_NAMES:  # FREESH's bounds are unchanged
        assert FREESH_SLOS.for_class(name) == freesh_slo(name)
    assert slo_set("interactive") is INTERACTIVE_SLOS and set(SLO_SETS) == {
        "freesh", "interactive"}
    with pytest.raises(ValueError, match="unknown SLO set 'fast'; known: freesh, interactive"):
        slo_set("fast")
    with pytest.raises(ValueError, match="unknown request class"):
        INTERACTIVE_SLOS.for_class("XX")
    assert "MLPerf" in INTERACTIVE_SLOS.source  # where the figures come from


def test_workload_carries_the_slo_set_to_every_request():
    wl = build_workload(TRACE, 120.0, mode="rate", value=5.0, seed=3, slos=INTERACTIVE_SLOS,
                        bulk_slack=10.0)
    assert wl.slos is INTERACTIVE_SLOS
    inter = ~wl.bulk
    assert np.all(wl.tpot_slo_s[inter] == 0.05) and np.all(wl.tpot_slo_s[wl.bulk] == 0.5)
    long_prompt = (wl.cls >= 2) & inter
    assert np.all(wl.ttft_slo_s[long_prompt] == 0.6)
    assert np.allclose(wl.deadline_s, wl.ttft_slo_s + wl.output_tokens * wl.tpot_slo_s)
    assert any("SLOs interactive: TTFT 300 ms" in d and "TPOT 50 ms" in d
               for d in wl.description)
    # the same seed with FREESH's set: same requests, looser targets
    base = build_workload(TRACE, 120.0, mode="rate", value=5.0, seed=3, bulk_slack=10.0)
    assert np.array_equal(base.arrival_s, wl.arrival_s)
    assert np.all(base.tpot_slo_s[inter] == 0.15)


def test_planner_and_floor_use_the_workload_slos(monkeypatch):
    """An L4 cannot decode llama-3.1-8b at 50 ms per token: under the interactive set the
    planner's problem leaves it no class; the energy floor gets the set's targets."""
    import joulepool.sim.runner as runner

    seen: list[tuple[float, float]] = []
    real_floor = runner.energy_floor

    def spy(demands, *args, **kwargs):
        seen.extend((d.ttft_s, d.tpot_s) for d in demands)
        return real_floor(demands, *args, **kwargs)

    monkeypatch.setattr(runner, "energy_floor", spy)
    cl = cluster([("h", "H100", 2), ("l", "L4", 4)])
    assert model_tables(cl)["1xL4"].profile.best_batch(0.05) == 0
    runs = {}
    for slos in (FREESH_SLOS, INTERACTIVE_SLOS):
        wl = build_workload(TRACE, 300.0, mode="rate", value=2.0, seed=1, slos=slos)
        problem = plan_problem(cl, wl, 0.0)
        l4 = [m.name for m in problem.modes].index("1xL4")
        usable = problem.capacity_rps[:, l4] > 0
        if problem.eligible is not None:
            usable &= problem.eligible[:, l4]
        seen.clear()
        runs[slos.name] = (usable, floor_for(cl, wl), set(seen))
    assert runs["freesh"][0].any() and not runs["interactive"][0].any()
    # interactive tier at the set's TPOT, bulk at 10 x it; TTFT by prompt class
    assert runs["interactive"][2] == {(0.3, 0.05), (0.6, 0.05), (3.0, 0.5), (6.0, 0.5)}
    assert runs["freesh"][2] == {(0.3, 0.15), (0.6, 0.15), (3.0, 1.5), (6.0, 1.5)}
    # tighter targets never lower the floor
    assert runs["interactive"][1].energy_j >= runs["freesh"][1].energy_j


def test_eps_tables_follow_the_tpot_of_the_slo_set():
    cl = cluster([("h", "H100", 1)])
    loose = model_tables(cl, FREESH_SLOS.tpot_s)["1xH100"]
    tight = model_tables(cl, INTERACTIVE_SLOS.tpot_s)["1xH100"]
    assert tight.operating_batch[tight.top] < loose.operating_batch[loose.top]
    assert tight.eps_j_per_token[tight.top] > loose.eps_j_per_token[loose.top]


def test_capacity_at_slo_sums_serving_points_over_the_static_deployment():
    cl = cluster([("h", "H100", 2), ("a", "A100", 3), ("l", "L4", 1)])
    tables = model_tables(cl)
    cap = static_capacity(cl, 600.0, 200.0, tables)
    for mode, n in {"1xH100": 2, "1xA100": 3, "1xL4": 1}.items():
        prof = tables[mode].profile
        # a 600-token prompt is a short one: TTFT 300 ms, TPOT 150 ms
        expect = prof.serving_point(600.0, 200.0, 0.3, 0.15).rps
        assert cap.per_mode_slo_rps[mode] == pytest.approx(expect)
        assert capacity_at_slo(prof, 600.0, 200.0) == pytest.approx(expect)
        assert cap.instances[mode] == n
    assert cap.slo_rps == pytest.approx(sum(cap.per_mode_slo_rps[m] * n
                                            for m, n in cap.instances.items()))
    # within SLO, an instance serves less than its saturation throughput
    assert all(cap.per_mode_slo_rps[m] <= cap.per_mode_rps[m] for m in cap.instances)
    # a tighter TPOT never raises the capacity
    tight = static_capacity(cl, 600.0, 200.0, model_tables(cl, 0.05), INTERACTIVE_SLOS)
    assert all(tight.per_mode_slo_rps[m] <= cap.per_mode_slo_rps[m] for m in cap.instances)
    assert tight.per_mode_slo_rps["1xL4"] == 0.0


def test_load_is_a_fraction_of_the_capacity_at_slo():
    cl = cluster([("h", "H100", 2), ("a", "A100", 2)])
    exp = Experiment(cluster=cl, trace=TRACE, duration_s=120.0, arrival_mode="load",
                     arrival_value=0.5, policies=("least-loaded",))
    cap = trace_capacity(cl, TRACE)
    mode, rate, notes = resolve_rate(exp, cap)
    assert mode == "rate" and rate == pytest.approx(0.5 * cap.slo_rps)
    assert "load 0.5 x the static deployment's capacity at SLO" in notes[0]
    res = run_experiment(exp)
    assert res.capacity.slo_rps == pytest.approx(cap.slo_rps)
    wl = res.repeats[0].workload
    # the NHPP's expected mean rate is the asked rate; the realised one is near it
    assert wl.requests == pytest.approx(rate * 120.0, rel=0.25)
    assert any("of the static deployment's capacity at SLO" in d for d in res.description)


def _l4_cluster_file(tmp_path):
    p = tmp_path / "l4.yaml"
    p.write_text(yaml.safe_dump({
        "name": "l4-only", "nodes": [{"name": "l", "site": "s", "product": "L4", "gpus": 2}],
        "simulator": {"model": "llama-3.1-8b", "durationSeconds": 30}}))
    return p


def test_simulate_load_without_capacity_at_slo_exits_2(tmp_path, capsys):
    rc = main(["simulate", "--cluster", str(_l4_cluster_file(tmp_path)), "--slos",
               "interactive", "--load", "0.5", "--quiet", "--no-plots", "--out",
               str(tmp_path / "o"), "--policies", "least-loaded"])
    err = capsys.readouterr().err
    assert rc == 2 and "no static instance of the cluster serves" in err and "--rate" in err


def test_simulate_slos_option(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--slos", "fast", "--quiet", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "invalid choice: 'fast'" in capsys.readouterr().err


def test_simulate_help_says_what_load_means(capsys):
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "fraction of the cluster's capacity at SLO" in text
    assert "0.5 = half of what it can serve" in text
    assert "interactive: TTFT 300 ms (short prompt) / 600 ms (long), TPOT 50 ms" in text
