"""The simulator's planner windows: peak-minute forecast, core's sizing, stated assumptions."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from sim_helpers import cluster, workload

from joulepool.core.classes import CLASS_NAMES, freesh_slo
from joulepool.core.profiles import DEFAULT_HEADROOM
from joulepool.sim.planning import (
    FORECAST_BIN_S,
    PLAN_ALPHA,
    _step_edges,
    plan_problem,
    plan_windows,
    planner_assumptions,
    step_forecast,
)


def _bursty(duration: float = 300.0):
    """SS requests (200 in, 50 out): 1 per s, but 3 per s in the second minute."""
    t = [float(s) for s in range(60)]
    t += [60.0 + k / 3.0 for k in range(180)]
    t += [float(s) for s in range(120, int(duration))]
    n = len(t)
    return workload(t, [200] * n, [50] * n, duration=duration)


def test_forecast_is_the_steps_busiest_minute():
    wl = _bursty()
    peak, mean = step_forecast(wl, 0.0, 300.0, 300.0, 1)
    ss = CLASS_NAMES.index("SS")
    assert peak[ss, 0] == pytest.approx(3.0)
    assert mean[ss, 0] == pytest.approx((60 + 180 + 180) / 300.0)
    assert peak[[i for i in range(4) if i != ss], 0].sum() == 0.0
    problem = plan_problem(cluster([("h", "H100", 8)]), wl, 0.0)
    assert problem.forecast_rps[ss, 0] == pytest.approx(3.0)
    assert problem.alpha == PLAN_ALPHA == 1.1


def test_forecast_bins_merge_a_short_tail_and_follow_the_run_end():
    edges = _step_edges(0.0, 610.0, 300.0, 3)
    assert list(edges[0]) == [0, 60, 120, 180, 240, 300]
    assert list(edges[2]) == [600.0, 610.0]  # a step shorter than a bin is one bin
    e = _step_edges(0.0, 100.0, 300.0, 1)[0]
    assert list(e) == [0.0, 60.0, 100.0]  # 40 s: long enough to be its own bin
    e = _step_edges(0.0, 80.0, 300.0, 1)[0]
    assert list(e) == [0.0, 80.0]  # 20 s tail merged into the first bin
    assert FORECAST_BIN_S == 60.0


def test_window_capacity_is_cores_operating_point_with_headroom():
    cl = cluster([("h", "H100", 8), ("a", "A100", 8)])
    wl = _bursty()
    (plan,) = plan_windows(cl, wl)
    assert plan.feasible and plan.headroom_scale == 1.0 and plan.headroom_note == ""
    mean_in, mean_out = wl.class_means()
    ss = CLASS_NAMES.index("SS")
    slo = freesh_slo("SS")
    for mode in ("1xH100", "1xA100"):
        prof = cl.mode_profile(mode)
        assert prof is not None
        power, rps = prof.operating_point(float(mean_in[ss]), float(mean_out[ss]), slo.ttft_s,
                                          slo.tpot_s, headroom=DEFAULT_HEADROOM)
        assert plan.capacity_rps[mode][ss] == pytest.approx(rps)
        sp = plan.serving[mode][ss]
        assert sp.rps == pytest.approx(rps) and sp.power_w == pytest.approx(power)
        assert 0 < sp.utilisation <= 1
    served = sum(pi.count * plan.capacity_rps[pi.mode][pi.cls] for pi in plan.instances)
    assert served >= PLAN_ALPHA * 3.0 - 1e-9  # the busiest minute, with alpha on top
    assert plan.peak_to_mean == pytest.approx(3.0 / 1.4)
    text = plan.describe()
    assert "of throughput" in text and "busiest minute" in text and "alpha 1.1" in text


def test_a_cluster_too_small_for_the_headroom_plans_with_less_and_says_so():
    # 3 req/s of 2000-token prompts (LS) on one H100: 3.1 req/s per instance with the full
    # headroom is short of 3.3, with less it fits
    n = 900
    t = list(np.linspace(0.0, 299.0, n))
    wl = workload(t, [2000] * n, [50] * n, duration=300.0)
    (plan,) = plan_windows(cluster([("h", "H100", 1)]), wl)
    assert plan.feasible and 0 < plan.headroom_scale < 1
    assert "queueing headroom" in plan.headroom_note
    assert plan.headroom_note in plan.describe()


def test_assumptions_line_states_forecast_alpha_and_headroom():
    line = planner_assumptions()
    assert "busiest 60-s rate" in line and "alpha 1.1" in line
    assert "P(wait > TTFT SLO - prefill) <= 0.01" in line and "perfect peak forecast" in line
    assert "alpha 1.5" in planner_assumptions(1.5)
    none = planner_assumptions(1.1, DEFAULT_HEADROOM.scaled(0.0))
    assert "P(wait > TTFT SLO - prefill) <= 1 " in none and "TPOT <= 1 x SLO" in none


def test_experiment_headroom_scale_reaches_the_planner():
    from joulepool.sim.runner import Experiment, run_experiment
    from joulepool.sim.trace import load_trace

    cl = cluster([("h", "H100", 8)])
    caps = []
    for scale in (1.0, 0.0):
        exp = Experiment(cl, load_trace(), 60.0, arrival_mode="rate", arrival_value=3.0,
                         policies=("freesh",), headroom_scale=scale)
        res = run_experiment(exp)
        (plan,) = res.repeats[0].plans
        caps.append(plan.capacity_rps["1xH100"])
        assert any(line.startswith("planner:") for line in res.description)
    assert all(a <= b for a, b in zip(caps[0], caps[1], strict=True))
    assert any(a < b for a, b in zip(caps[0], caps[1], strict=True))


def test_nhpp_forecast_is_the_expected_rate_not_the_noisy_count():
    """With NHPP arrivals the forecaster knows each minute's expected rate: the forecast is
    its busiest minute in the step times the class's share, not the busiest realised count
    (which a small class's Poisson noise would inflate)."""
    from joulepool.sim.trace import load_trace
    from joulepool.sim.workload import build_workload

    wl = build_workload(load_trace(), 600.0, mode="rate", value=3.0, seed=1)
    assert wl.minute_rate_rps is not None and wl.minute_rate_rps.size == 10
    assert wl.minute_rate_rps.mean() == pytest.approx(3.0)
    peak, mean = step_forecast(wl, 0.0, 600.0, 300.0, 2)
    share = np.bincount(wl.cls, minlength=4) / wl.requests
    for k in range(2):
        minutes = wl.minute_rate_rps[5 * k: 5 * k + 5]
        assert peak[:, k] == pytest.approx(share * minutes.max())
        assert mean[:, k] == pytest.approx(share * minutes.mean())
    # the realised busiest minute of the smallest class lies well above its expected rate
    small = int(np.argmin(share))
    noisy, _ = step_forecast(dataclasses.replace(wl, minute_rate_rps=None), 0.0, 600.0, 300.0, 2)
    assert noisy[small].max() > peak[small].max()
    replayed = build_workload(load_trace(), 600.0, mode="replay")
    assert replayed.minute_rate_rps is None


def test_sl_is_not_given_a_mode_most_of_its_prompts_cannot_prefill_in_time():
    """docs/marginal-energy.md's finding: on freesh-3site with the bundled trace, SL's mean
    prompt (~960 tokens) prefills within its 0.3-s TTFT on a 4xA100, but most SL prompts
    (just under the 1024-token boundary) do not: the window's problem, built with the
    trace's own prompt lengths, no longer lets SL use 4xA100, and every SL prompt fits
    the modes it keeps."""
    from joulepool.core.problem import prompt_prefill_s
    from joulepool.sim.cluster import freesh_3site
    from joulepool.sim.trace import load_trace
    from joulepool.sim.workload import build_workload

    sim = freesh_3site()
    wl = build_workload(load_trace(), 600.0, mode="replay")
    sl = CLASS_NAMES.index("SL")
    prompts = wl.input_tokens[wl.cls == sl]
    mean_in, mean_out = wl.class_means()
    slo = freesh_slo("SL")
    a100 = sim.mode_profile("4xA100")
    assert a100 is not None
    at_mean = a100.serving_point(float(mean_in[sl]), float(mean_out[sl]), slo.ttft_s,
                                 slo.tpot_s)
    assert at_mean.rps > 0  # the mean prompt alone calls 4xA100 eligible
    assert np.mean(prompt_prefill_s(a100, _lengths(prompts), at_mean.batch) > slo.ttft_s) > 0.5
    problem = plan_problem(sim, wl, 0.0)
    modes = [m.name for m in problem.modes]
    assert problem.capacity_rps[sl, modes.index("4xA100")] == 0.0
    kept = [m for j, m in enumerate(modes) if problem.capacity_rps[sl, j] > 0]
    assert kept and "4xA100" not in kept
    for name in kept:
        prof = sim.mode_profile(name)
        assert prof is not None
        assert np.all(prompt_prefill_s(prof, _lengths(prompts), 1.0) <= slo.ttft_s)


def _lengths(prompts):
    from joulepool.core.classes import PromptLengths

    lengths = PromptLengths.from_samples(prompts)
    assert lengths is not None
    return lengths
