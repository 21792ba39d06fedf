"""The simulator's plots: the data they draw is what the run recorded (checked by hand on a
tiny two-site run) and each figure has the axes, scales, series and titles a reader needs
(matplotlib objects inspected, not pixels)."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
from sim_helpers import cluster

from joulepool.core.classes import CLASS_NAMES
from joulepool.core.controllers import PIController
from joulepool.core.planner import PlanNode
from joulepool.sim.cluster import freesh_3site
from joulepool.sim.engine import EngineParams
from joulepool.sim.planning import PlannedInstances, WindowPlan
from joulepool.sim.plots import (
    carbon_sites_plot,
    classes_plot,
    scenario_title,
    tail_latency_plot,
    tail_share,
    tradeoff_plot,
    write_plots,
)
from joulepool.sim.report import plan_class_series, summarise
from joulepool.sim.runner import Experiment, run_experiment
from joulepool.sim.trace import load_trace

POLICIES = ("least-loaded", "joulesched", "freesh")
PI_PERIOD_S = 10.0


def two_sites():
    """An H100 node at east (400 then 420 gCO2/kWh by 60-s step), an A100 node at west."""
    base = cluster([("h", "H100", 2), ("a", "A100", 2)])
    nodes = (PlanNode("h", "east", "H100", 2), PlanNode("a", "west", "A100", 2))
    return replace(base, name="two-sites", nodes=nodes, carbon_step_s=60.0,
                   carbon_g_per_kwh={"east": (400.0, 420.0), "west": (100.0,)})


@pytest.fixture(scope="module")
def tiny():
    exp = Experiment(cluster=two_sites(), trace=load_trace(), duration_s=150.0,
                     arrival_mode="rate", arrival_value=3.0, policies=POLICIES, seed=2,
                     params=EngineParams(pi_period_s=PI_PERIOD_S))
    res = run_experiment(exp)
    return res, summarise(res)


def test_carbon_per_site_and_step_by_hand(tiny):
    res, _ = tiny
    for policy, runs in res.runs.items():
        run = runs[0]
        # steps close at 60 s, 120 s and at the window's end, 150 s
        assert run.carbon_step_starts_s.tolist() == [0.0, 60.0, 120.0]
        east, west = run.site_energy_j["east"], run.site_energy_j["west"]
        assert east.size == west.size == 3 and (east > 0).all() and (west > 0).all()
        # g = J / 3.6e6 x g/kWh, at each step's intensity (the east series repeats)
        assert run.site_carbon_g["east"] == pytest.approx(east * [400, 420, 400] / 3.6e6)
        assert run.site_carbon_g["west"] == pytest.approx(west * 100 / 3.6e6)
        total = run.site_carbon_g["east"].sum() + run.site_carbon_g["west"].sum()
        assert run.carbon_g == pytest.approx(total), policy
        assert east.sum() + west.sum() == pytest.approx(run.energy_j)


def test_lambda_series_is_the_pi_controllers_trajectory(tiny):
    res, _ = tiny
    assert res.runs["least-loaded"][0].lam_series == []  # no JouleSched, no lambda
    lam = res.runs["joulesched"][0].lam_series
    t = [x for x, _ in lam]
    assert lam[0] == (0.0, PIController.lam)
    assert t == sorted(t) and len(t) == len(set(t))
    # one point per PI update, at most one per period
    assert all(b - a >= PI_PERIOD_S - 1e-9 for a, b in itertools.pairwise(t))
    assert len(lam) <= 150.0 / PI_PERIOD_S + 1 and len(lam) >= 2


def test_plan_class_series_counts_instances_and_gpus():
    res = run_experiment(Experiment(cluster=freesh_3site(), trace=load_trace(),
                                    duration_s=30.0, arrival_mode="rate", arrival_value=0.5,
                                    policies=("least-loaded",)))
    assert plan_class_series(res).start_s.size == 0  # no planner policy, no plan
    def plan(start_s, *instances):
        return WindowPlan(start_s=start_s, instances=instances, feasible=True, status="",
                          objective=0.0, unit="", solve_time_s=0.0, forecast_peak_rps=(),
                          problems=())

    plans = [
        plan(1800.0, PlannedInstances("n", "8xA100", 3, 1)),
        plan(0.0, PlannedInstances("n", "2xA100", 0, 2), PlannedInstances("m", "4xH100", 2, 1),
             PlannedInstances("m", "2xA100", 2, 1)),
    ]
    res = replace(res, repeats=[replace(res.repeats[0], plans=plans)])
    s = plan_class_series(res)
    assert s.start_s.tolist() == [0.0, 1800.0]
    assert s.instances.tolist() == [[2, 0, 2, 0], [0, 0, 0, 1]]
    assert s.gpus.tolist() == [[4, 0, 6, 0], [0, 0, 0, 8]]


def test_tail_share_by_hand():
    x, y = tail_share(np.array([3.0, 1.0, np.inf, 2.0]))
    assert x.tolist() == [1.0, 2.0, 3.0] and y.tolist() == [0.75, 0.5, 0.25]
    x, y = tail_share(np.array([1.0, 2.0]))  # the slowest has no one above it: left out
    assert x.tolist() == [1.0] and y.tolist() == [0.5]


def _labels(ax):
    return [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]


def test_titles_name_cluster_trace_load_and_slos(tiny):
    res, _ = tiny
    title = scenario_title(res)
    rate = res.repeats[0].workload.mean_rate_rps
    share = rate / res.capacity.slo_rps
    assert title.startswith("two-sites | trace azure_conv_2023.csv | load ")
    assert f"load {share:.0%} of capacity at SLO ({rate:.3g} req/s) | SLOs freesh" in title


def test_tail_latency_plot(tiny, tmp_path):
    res, _ = tiny
    fig = tail_latency_plot(res, tmp_path / "tail.png")
    assert (tmp_path / "tail.png").read_bytes()[:4] == b"\x89PNG"
    e2e, ttft = fig.axes
    for ax in (e2e, ttft):
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
        assert _labels(ax) == list(POLICIES)
    assert "end-to-end" in e2e.get_xlabel() and "first token" in ttft.get_xlabel()
    # the drawn tail is the run's: least-loaded's end-to-end latencies
    wl = res.repeats[0].workload
    run = res.runs["least-loaded"][0]
    x, y = tail_share(np.where(np.isnan(run.t_done), np.inf, run.t_done - wl.arrival_s))
    line = e2e.get_lines()[0]
    assert np.allclose(line.get_ydata(), y) and np.allclose(line.get_xdata(), np.maximum(x, 1e-3))
    assert scenario_title(res) in fig._suptitle.get_text()


def test_carbon_sites_plot(tiny, tmp_path):
    res, _ = tiny
    fig = carbon_sites_plot(res, tmp_path / "c.png")
    intensity, east, west = fig.axes
    assert _labels(intensity) == ["east", "west"]
    assert intensity.get_lines()[0].get_ydata().tolist() == [400, 420, 400]
    assert _labels(east) == list(POLICIES) and _labels(west) == list(POLICIES)
    run = res.runs["freesh"][0]
    hours = np.array([60.0, 60.0, 30.0]) / 3600.0
    assert np.allclose(east.get_lines()[2].get_ydata(), run.site_carbon_g["east"] / hours)
    assert "east" in east.get_ylabel() and "gCO2/h" in west.get_ylabel()
    assert scenario_title(res) in intensity.get_title()


def test_classes_plot(tiny, tmp_path):
    res, _ = tiny
    fig = classes_plot(res, tmp_path / "k.png")
    lam_ax, inst_ax, gpu_ax = fig.axes
    assert _labels(lam_ax) == ["joulesched"]  # the policies that route with lambda
    lam = res.runs["joulesched"][0].lam_series
    line = lam_ax.get_lines()[0]
    held = [(150.0, lam[-1][1])] if lam[-1][0] < 150.0 else []  # held to the window's end
    assert list(zip(line.get_xdata(), line.get_ydata(), strict=True)) == lam + held
    series = plan_class_series(res)
    assert series.start_s.size >= 1
    bars = inst_ax.containers
    assert [b.get_label() for b in bars] == list(CLASS_NAMES)
    for r, container in enumerate(bars):
        assert [p.get_height() for p in container.patches] == series.instances[:, r].tolist()
    assert [b.get_label() for b in gpu_ax.containers] == list(CLASS_NAMES)
    assert "lambda" in lam_ax.get_ylabel() and scenario_title(res) in lam_ax.get_title()


def test_tradeoff_plot_puts_energy_and_carbon_against_p99_and_attainment(tiny, tmp_path):
    res, summary = tiny
    fig = tradeoff_plot(res, summary, tmp_path / "t.png")
    energy, carbon = fig.axes
    for ax, key in ((energy, "energy_mj_per_h"), (carbon, "gco2_per_h")):
        assert ax.get_xscale() == "log" and "P99" in ax.get_xlabel()
        points = {c.get_label(): tuple(c.get_offsets()[0]) for c in ax.collections}
        assert set(points) == set(POLICIES)
        for policy, (x, y) in points.items():
            st = summary.stats[policy]
            assert x == pytest.approx(st["p99_ms"].mean / 1e3)
            assert y == pytest.approx(st[key].mean)
        texts = {t.get_text().split("\n")[0]: t.get_text() for t in ax.texts}
        ll = summary.stats["least-loaded"]
        assert f"TTFT {ll['ttft_attainment'].mean:.1%}" in texts["least-loaded"]
        assert f"TPOT {ll['tpot_attainment'].mean:.1%}" in texts["least-loaded"]
    assert scenario_title(res) in fig._suptitle.get_text()


def test_write_plots_adds_carbon_sites_only_for_several_sites(tiny, tmp_path, monkeypatch):
    res, summary = tiny
    paths = write_plots(res, summary, tmp_path, "x")
    assert {p.name for p in paths} == {f"x-{n}.png" for n in (
        "energy", "latency-cdf", "tail-latency", "clock-power", "tradeoff", "lambda-classes",
        "carbon-sites")}
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    import joulepool.sim.plots as plots

    drawn: list[str] = []
    for name in ("energy_plot", "latency_plot", "tail_latency_plot", "clock_power_plot",
                 "tradeoff_plot", "classes_plot", "carbon_sites_plot"):
        monkeypatch.setattr(plots, name, lambda *a, name=name: drawn.append(name))
    one = replace(res, experiment=replace(res.experiment, cluster=cluster([("h", "H100", 2)])))
    names = {p.name for p in write_plots(one, summary, tmp_path, "y")}
    assert "y-carbon-sites.png" not in names and "carbon_sites_plot" not in drawn
    assert len(drawn) == len(names) == 6


def test_x_floor_is_window_energy_over_the_floor_of_the_work_done_in_the_window(tiny):
    from joulepool.sim.runner import window_work_floor

    res, summary = tiny
    rep = res.repeats[0]
    for policy, runs in res.runs.items():
        run = runs[0]
        again = window_work_floor(res.experiment.cluster, rep.workload, run)
        assert run.work_floor is not None and again.feasible
        assert again.energy_j == pytest.approx(run.work_floor.energy_j)
        assert summary.runs[policy][0]["x_floor"] == pytest.approx(run.energy_j / again.energy_j)
        assert summary.runs[policy][0]["x_floor"] >= 1.0
        assert again.energy_j <= rep.floor.energy_j * (1 + 1e-9)
