"""core.problem: the one node type and the one builder of the planner's problem."""

from __future__ import annotations

import math

import numpy as np
import pytest

from joulepool.api.models import EnergyPolicySpec, InferencePool
from joulepool.core.classes import PromptLengths
from joulepool.core.planner import NO_ELIGIBLE_MODE, Mode, PlanNode, solve
from joulepool.core.problem import (
    PromptTailMiss,
    ServiceClass,
    build_problem,
    node_from_label,
    prompt_prefill_s,
    prompt_tail_miss,
)
from joulepool.core.profiles import DEFAULT_HEADROOM, DEFAULT_PROFILES, find_profile
from joulepool.core.routing import steady_batch, steady_request_energy_j, wake_energy_j
from joulepool.pooling import build_problem as build_pool_problem

H100, A100 = Mode("1xH100", "H100", 1), Mode("1xA100", "A100", 1)
L4 = Mode("1xL4", "L4", 1)
CHAT = ServiceClass("chat", 1000.0, 200.0, 1.0, 0.1, (4.0, 6.0))


def _profile(r: int, mode: Mode):  # type: ignore[no-untyped-def]
    return find_profile(mode.product, "llama-3.1-8b", mode.gpus)


def test_node_from_label_names_the_core_product() -> None:
    assert node_from_label("n", "east", "NVIDIA-H100-80GB-HBM3", 8) == PlanNode(
        "n", "east", "H100", 8)
    assert node_from_label("n", "east", "Mystery-GPU", 8).product == "Mystery-GPU"
    with pytest.raises(ValueError):
        node_from_label("n", "", "H100", 8)


def test_matrices_are_core_serving_points() -> None:
    built = build_problem([CHAT], [H100, A100], [PlanNode("h", "s", "H100", 8),
                                                  PlanNode("empty", "s", "A100", 0)],
                          lambda r, m: _profile(r, m) if m is H100 else None,
                          step_s=300.0, alpha=1.1, objective="energy")
    p = built.problem
    sp = _profile(0, H100).serving_point(1000.0, 200.0, 1.0, 0.1)
    assert (p.power_w[0, 0], p.capacity_rps[0, 0]) == (sp.power_w, sp.rps) and sp.rps > 0
    assert (p.power_w[0, 1], p.capacity_rps[0, 1]) == (0.0, 0.0)  # not allowed
    assert built.serving["1xA100"] == (None,)
    assert [n.name for n in p.nodes] == ["h"]  # nodes without GPUs left out
    assert p.forecast_rps.tolist() == [[4.0, 6.0]] and (p.step_s, p.alpha) == (300.0, 1.1)


def test_forecasts_must_have_one_length() -> None:
    other = ServiceClass("b", 100.0, 50.0, 2.0, 0.2, (1.0,))
    with pytest.raises(ValueError, match="lengths"):
        build_problem([CHAT, other], [H100], [], _profile, step_s=300.0, alpha=1.0,
                      objective="energy")


def test_operator_and_cli_build_through_the_same_builder() -> None:
    pool = InferencePool.model_validate({
        "metadata": {"name": "chat", "namespace": "ns"},
        "spec": {"model": "llama-3.1-8b", "gpuProducts": ["H100"],
                 "slo": {"ttftSeconds": 1.0, "tpotSeconds": 0.1},
                 "demand": {"requestsPerSecond": 5, "meanInputTokens": 1000,
                            "meanOutputTokens": 200}}})
    nodes = [PlanNode("h", "s", "H100", 8), PlanNode("a", "s", "A100", 8)]
    policy = EnergyPolicySpec(windowSteps=2)
    from_pool = build_pool_problem([pool], nodes, policy, DEFAULT_PROFILES)
    cls = ServiceClass("ns.chat", 1000.0, 200.0, 1.0, 0.1, (5.0, 5.0))
    direct = build_problem([cls], from_pool.modes, nodes,
                           lambda r, m: _profile(r, m) if m.product == "H100" else None,
                           step_s=policy.step_seconds, alpha=policy.alpha,
                           objective="energy").problem
    assert from_pool.classes == direct.classes
    assert np.array_equal(from_pool.power_w, direct.power_w)
    assert np.array_equal(from_pool.capacity_rps, direct.capacity_rps)
    assert np.array_equal(from_pool.forecast_rps, direct.forecast_rps)


# ------------------------------------------------------------ the prompt-length tail

def test_prompt_lengths_quantiles() -> None:
    measured = PromptLengths.from_samples(np.arange(1, 1001), points=1000)
    assert measured is not None and len(measured.tokens) == 1000
    assert measured.array().mean() == pytest.approx(500.5)
    assert PromptLengths.from_samples([]) is None
    q = PromptLengths.from_samples([10.0] * 99 + [1000.0], points=100)
    assert q is not None and q.tokens[:99] == (10.0,) * 99 and q.tokens[99] > 10.0
    with pytest.raises(ValueError):
        PromptLengths((3.0, 1.0))


def test_prompt_lengths_from_declared_quantiles() -> None:
    q = PromptLengths.from_quantiles([0.5, 0.9, 0.99], [700.0, 2500.0, 6000.0], points=1000)
    arr = q.array()
    # the point at probability (k + 1/2) / N is the declared quantile function there
    assert arr[700] == pytest.approx(700.0 + (0.7005 - 0.5) / 0.4 * 1800.0)
    assert arr[950] == pytest.approx(2500.0 + (0.9505 - 0.9) / 0.09 * 3500.0)
    assert arr[:490].max() == 700.0 and arr.min() == 700.0  # below p50: flat, at p50's
    assert arr[990:].min() == 6000.0 and arr.max() == 6000.0  # above p99: flat, at p99's
    assert np.mean(arr > 2500.0) == pytest.approx(0.1, abs=0.002)
    one = PromptLengths.from_quantiles([0.99], [4000.0], points=10)
    assert one.tokens == (4000.0,) * 10
    for probs, toks in (([], []), ([0.5], [1.0, 2.0]), ([0.0], [1.0]), ([1.5], [1.0]),
                        ([0.9, 0.5], [1.0, 2.0]), ([0.5, 0.5], [1.0, 1.0]),
                        ([0.5, 0.9], [2.0, 1.0]), ([0.5], [0.0]), ([0.5], [np.inf])):
        with pytest.raises(ValueError):
            PromptLengths.from_quantiles(probs, toks)


@pytest.mark.parametrize("seed", [4, 5])
def test_prompt_lengths_from_a_histogram_read_as_promql_reads_it(seed: int) -> None:
    from joulepool.core.estimators import histogram_quantile

    rng = np.random.default_rng(seed)
    prompts = np.round(rng.lognormal(np.log(1200.0), 1.1, 3000))
    bounds = np.array([1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000],
                      dtype=float)
    cum = [float(np.count_nonzero(prompts <= x)) for x in bounds] + [float(prompts.size)]
    got = PromptLengths.from_histogram(bounds, cum, points=200)
    assert got is not None
    for k, v in enumerate(got.tokens):
        want = histogram_quantile((k + 0.5) / 200, [*bounds, np.inf], cum)
        assert v == pytest.approx(want, rel=1e-9, abs=1e-9)
    # the share of prompts above a bucket bound is the histogram's (to one point in 200)
    assert np.mean(got.array() > 5000.0) == pytest.approx(np.mean(prompts > 5000.0), abs=0.006)
    assert PromptLengths.from_histogram(bounds, [0.0] * 15) is None
    with pytest.raises(ValueError):
        PromptLengths.from_histogram([10.0, 5.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError):
        PromptLengths.from_histogram([10.0], [3.0, 2.0])
    # every prompt beyond the last finite bound: the highest bound, as PromQL
    inf_only = PromptLengths.from_histogram([100.0], [0.0, 4.0], points=4)
    assert inf_only is not None and inf_only.tokens == (100.0,) * 4


def test_the_longer_of_two_prompt_distributions() -> None:
    a = PromptLengths((1.0, 5.0, 9.0))
    b = PromptLengths((2.0, 3.0, 20.0))
    assert a.longer(b).tokens == (2.0, 5.0, 20.0)
    with pytest.raises(ValueError):
        a.longer(PromptLengths((1.0,)))


def test_prompt_tail_miss_by_hand() -> None:
    s = [0.1, 0.2, 0.3, 0.8]  # prefill times of four equally likely prompts, T = 0.6
    assert prompt_tail_miss(s, 0.6, 0.0) == 0.25  # idle: only the 0.8-s prompt misses
    # rate 1/s: rho = E[S] = 0.35, E[S^2] = 0.195, wait given a wait: 0.195 / (2 0.35 0.65)
    theta = 0.195 / 0.455
    expected = (0.35 * (math.exp(-0.5 / theta) + math.exp(-0.4 / theta)
                        + math.exp(-0.3 / theta)) + 1.0) / 4.0
    assert prompt_tail_miss(s, 0.6, 1.0) == pytest.approx(expected)
    assert prompt_tail_miss(s, 0.6, 1.0 / 0.35) == 1.0  # saturated


def test_prompt_tail_miss_matches_a_queue_simulation() -> None:
    """FIFO M/G/1 prefill queue (Lindley's recursion) with lognormal prompts: the share of
    requests whose wait + own prefill exceeds T is what prompt_tail_miss predicts."""
    rng = np.random.default_rng(7)
    service = rng.lognormal(np.log(0.1), 0.5, 200_000)
    ttft, rate = 0.3, 3.0  # rho ~ 0.34
    gaps = rng.exponential(1.0 / rate, service.size)
    wait = np.zeros(service.size)
    for i in range(1, service.size):
        wait[i] = max(0.0, wait[i - 1] + service[i - 1] - gaps[i])
    simulated = float(np.mean(wait + service > ttft))
    predicted = prompt_tail_miss(service, ttft, rate)
    assert simulated == pytest.approx(predicted, rel=0.1)
    assert predicted > prompt_tail_miss(service, ttft, 0.0) > 0.0


def test_mode_whose_mean_prefill_fits_is_not_eligible_for_a_long_tail() -> None:
    """Half the prompts 100 tokens, half 3000 (mean 1550), TTFT 0.35 s: a 1xA100
    prefills the mean prompt in 0.23 s, so the mean alone calls it eligible, but half
    the prompts take 0.45 s; a 1xH100 prefills 3000 tokens in 0.15 s."""
    tail = PromptLengths((100.0,) * 500 + (3000.0,) * 500)
    cls = ServiceClass("tail", 1550.0, 200.0, 0.35, 0.1, (1.0,), tail)
    assert _profile(0, A100).serving_point(1550.0, 200.0, 0.35, 0.1).rps > 0
    built = build_problem([cls], [H100, A100], [PlanNode("n", "s", "H100", 8)], _profile,
                          step_s=300.0, alpha=1.0, objective="energy")
    assert built.problem.capacity_rps[0, 1] == 0.0
    assert built.serving["1xA100"][0] is not None
    assert "50.0 % of prompts" in built.serving["1xA100"][0].binding  # type: ignore[union-attr]
    h100 = _profile(0, H100).serving_point(1550.0, 200.0, 0.35, 0.1)
    assert 0 < built.problem.capacity_rps[0, 0] <= h100.rps
    served = built.serving["1xH100"][0]
    assert served is not None and served.ttft_miss <= DEFAULT_HEADROOM.ttft_miss.value + 1e-9


def test_a_class_without_measured_prompts_keeps_its_serving_points() -> None:
    cls = ServiceClass("mean-only", 1550.0, 200.0, 0.35, 0.1, (1.0,))
    built = build_problem([cls], [H100, A100], [PlanNode("n", "s", "H100", 8)], _profile,
                          step_s=300.0, alpha=1.0, objective="energy")
    at_mean = _profile(0, A100).serving_point(1550.0, 200.0, 0.35, 0.1)
    assert built.problem.capacity_rps[0, 1] == at_mean.rps > 0


def test_misses_no_mode_can_avoid_are_not_charged() -> None:
    """Prompts too long for every mode (here 3 % at 20,000 tokens) do not make every
    mode ineligible: the budget counts the misses beyond the fastest mode's."""
    tail = PromptLengths((200.0,) * 970 + (20_000.0,) * 30)
    cls = ServiceClass("huge", 794.0, 200.0, 0.5, 0.1, (1.0,), tail)
    built = build_problem([cls], [H100, A100], [PlanNode("n", "s", "H100", 8)], _profile,
                          step_s=300.0, alpha=1.0, objective="energy")
    assert built.problem.capacity_rps[0, 0] > 0 and built.problem.capacity_rps[0, 1] > 0


def test_a_heavy_tailed_class_whose_mean_prompt_is_too_long_gets_a_pool() -> None:
    """80 % of prompts 2,000 tokens, 20 % 20,000 (mean 5,600), TTFT 0.6 s, A100 and L4
    only. A 1xA100 prefills the mean prompt in 0.84 s: FREESH's mean rule leaves the class
    no mode and the window infeasible. Judged by its prompts, the 1xA100 serves the 80 %
    it prefills in 0.3 s (the 20 % no mode can prefill in time are not charged), the 1xL4
    (2,500 tokens/s: 0.8 s for 2,000 tokens) serves none, and the plan gives the class
    1xA100 instances enough for its demand at the rate its prompt tail allows."""
    nodes = [PlanNode("a100", "s", "A100", 8), PlanNode("l4", "s", "L4", 8)]
    means = dict(mean_input_tokens=5600.0, mean_output_tokens=200.0, ttft_s=0.6, tpot_s=0.1,
                 forecast_rps=(0.1,))
    mean_only = ServiceClass("long", **means)  # type: ignore[arg-type]
    freesh = build_problem([mean_only], [A100, L4], nodes, _profile, step_s=300.0,
                           alpha=1.0, objective="energy")
    assert not freesh.problem.capacity_rps.any()
    refused = solve(freesh.problem)
    assert not refused.feasible and refused.shortfalls[0].reason == NO_ELIGIBLE_MODE

    tail = PromptLengths((2000.0,) * 800 + (20_000.0,) * 200)
    heavy = ServiceClass("long", **means, prompt_tokens=tail)  # type: ignore[arg-type]
    built = build_problem([heavy], [A100, L4], nodes, _profile, step_s=300.0, alpha=1.0,
                          objective="energy")
    rate = built.problem.capacity_rps[0, 0]
    assert rate > 0 and built.problem.capacity_rps[0, 1] == 0.0
    l4 = built.serving["1xL4"][0]
    assert l4 is not None and "100.0 % of prompts" in l4.binding
    a100 = built.serving["1xA100"][0]
    assert a100 is not None
    budget = 0.2 + DEFAULT_HEADROOM.ttft_miss.value
    assert 0.2 <= a100.ttft_miss <= budget + 1e-9
    service = prompt_prefill_s(_profile(0, A100), tail, a100.batch)
    assert prompt_tail_miss(service, 0.6, rate) <= budget + 1e-9
    plan = solve(built.problem)
    assert plan.feasible and plan.instances("long") >= math.ceil(0.1 / rate)
    assert all(a.mode == "1xA100" for a in plan.plan)
    assert plan.served_rps("long") >= 0.1 - 1e-9


def _tail_miss_one_prompt_at_a_time(service: list[float], ttft: float, rate: float) -> float:
    """prompt_tail_miss's formula in plain Python, prompt by prompt (the reference)."""
    n = len(service)
    mean_s = sum(service) / n
    rho = rate * mean_s
    if rho >= 1.0:
        return 1.0
    if rho <= 0.0:
        return sum(1 for x in service if x >= ttft) / n
    wait_mean = sum(x * x for x in service) / n / (2.0 * mean_s * (1.0 - rho))
    return sum(1.0 if x >= ttft else rho * math.exp(-(ttft - x) / wait_mean)
               for x in service) / n


@pytest.mark.parametrize("seed", range(5))
def test_prompt_tail_miss_vectorised_equals_the_prompt_by_prompt_formula(seed: int) -> None:
    """On random prefill times, TTFTs and rates (idle, loaded, saturated): the numpy
    forms (prompt_tail_miss, and PromptTailMiss evaluated rate by rate as the planner's
    search does) equal the plain formula to 1e-12, and each other exactly."""
    rng = np.random.default_rng(seed)
    service = rng.lognormal(-2.0, 1.0, 1000)
    ttft = float(rng.uniform(0.2, 2.0))
    curve = PromptTailMiss(service, ttft)
    for rate in [0.0, *rng.uniform(0.0, 1.2 / service.mean(), 30)]:
        want = _tail_miss_one_prompt_at_a_time(service.tolist(), ttft, float(rate))
        got = prompt_tail_miss(service, ttft, float(rate))
        assert got == pytest.approx(want, rel=1e-12, abs=1e-12)
        assert curve(float(rate)) == got


def test_prompt_prefill_times_equal_the_scalar_step_model() -> None:
    """prompt_prefill_s (one numpy pass) gives core.batching.prefill_time_s of each
    prompt point on a real profile, at a few batches."""
    from joulepool.core.batching import prefill_time_s
    from joulepool.core.profiles import default_batched_tokens

    prof = find_profile("A100", "llama-3.1-8b")
    assert prof is not None
    prompts = PromptLengths.from_samples(np.random.default_rng(3).lognormal(6.5, 1.2, 5000))
    budget = float(default_batched_tokens(prof.product))
    for batch in (0.0, 1.0, 17.5, 256.0):
        decode_s, per_token = float(prof.itl_s(max(batch, 1.0))), float(prof.prefill_s(1.0))
        want = [prefill_time_s(budget, batch, p, decode_s, per_token) for p in prompts.tokens]
        np.testing.assert_allclose(prompt_prefill_s(prof, prompts, batch), want,
                                   rtol=1e-12, atol=0.0)


def _70b(r: int, mode: Mode):  # type: ignore[no-untyped-def]
    return find_profile(mode.product, "llama-3.1-70b", mode.gpus)


def test_a_shared_instance_prices_requests_at_the_batch_its_group_reaches() -> None:
    """The held-out mixed-70b cell (bursty trace, load 0.5): what the four classes leave
    over (each class's rate modulo its L, 1.68 instances' worth in all) keeps two shared
    4xH100 at a batch of about two, so a request there costs its share of a step, not a
    step at batch one (the wake price, 3x dearer for SS); priced at the wake, the planner
    gave SS a 4xH100 of its own beside the shared one (4 instances, every one near-empty);
    priced at the batch reached, SS rides the shared instance (3)."""
    h100 = Mode("4xH100", "H100", 4)
    classes = [ServiceClass("SS", 419.0, 176.0, 0.3, 0.15, (1.4,), share_key="m"),
               ServiceClass("SL", 420.0, 683.0, 0.3, 0.15, (0.2,), share_key="m"),
               ServiceClass("LS", 2182.0, 182.0, 0.6, 0.15, (0.42,), share_key="m"),
               ServiceClass("LL", 2496.0, 733.0, 0.6, 0.15, (0.07,), share_key="m")]
    nodes = [PlanNode("h0", "dc", "H100", 8), PlanNode("h1", "dc", "H100", 8)]
    built = build_problem(classes, [h100], nodes, _70b, step_s=300.0, alpha=1.1,
                          objective="energy")
    profile = _70b(0, h100)
    points = built.serving["4xH100"]
    left = [math.fmod(c.forecast_rps[0], points[r].rps) for r, c in enumerate(classes)]
    instances = math.ceil(sum(x / points[r].rps for r, x in enumerate(left)))
    tokens = sum(x * (c.mean_output_tokens - 1.0) for x, c in zip(left, classes, strict=True))
    assert instances == 2 and left[2] < classes[2].forecast_rps[0]  # LS fills one of its own
    batch = steady_batch(profile, tokens / instances)
    wake = built.problem.wake_j_per_request
    assert wake is not None and batch > 1.5
    for r, cls in enumerate(classes):
        b = max(1.0, min(batch, points[r].batch))
        assert wake[r, 0] == steady_request_energy_j(profile, cls.mean_input_tokens,
                                                     cls.mean_output_tokens, b)
        assert wake[r, 0] <= wake_energy_j(profile, cls.mean_input_tokens,
                                           cls.mean_output_tokens)
    assert wake[0, 0] < wake_energy_j(profile, 419.0, 176.0) / 3
    plan = solve(built.problem).plan
    assert not [a for a in plan if a.cls == "SS" and not a.serves]
    assert sum(a.instances for a in plan) == 3


def test_a_class_that_fills_instances_keeps_its_own() -> None:
    """A class whose demand fills whole instances leaves only its remainder to shared
    ones: the shared instance's batch is the remainder's, below the class's batch at L,
    so a full shared instance costs more than one of its own (the wake price's intent)."""
    h100 = Mode("1xH100", "H100", 1)
    big = ServiceClass("chat", 1000.0, 200.0, 1.0, 0.1, (20.0,), share_key="m")
    small = ServiceClass("new", 1000.0, 200.0, 1.0, 0.1, (0.5,), share_key="m")
    built = build_problem([big, small], [h100], [PlanNode("h0", "dc", "H100", 8)], _profile,
                          step_s=300.0, alpha=1.1, objective="energy")
    sp = built.serving["1xH100"][0]
    assert sp is not None and built.problem.wake_j_per_request is not None
    full = built.problem.idle_power_w[0] + sp.rps * built.problem.wake_j_per_request[0, 0]
    assert full > sp.power_w
    plan = solve(built.problem).plan
    assert [a for a in plan if a.cls == "chat" and not a.serves]


def test_a_class_that_shares_with_no_other_keeps_the_wake_price() -> None:
    h100 = Mode("4xH100", "H100", 4)
    alone = ServiceClass("SS", 419.0, 176.0, 0.3, 0.15, (1.4,))
    built = build_problem([alone], [h100], [PlanNode("h0", "dc", "H100", 8)], _70b,
                          step_s=300.0, alpha=1.1, objective="energy")
    assert built.problem.wake_j_per_request is not None
    assert built.problem.wake_j_per_request[0, 0] == wake_energy_j(_70b(0, h100), 419.0,
                                                                   176.0)
