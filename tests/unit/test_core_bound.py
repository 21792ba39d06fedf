"""core.bound: the LP energy floor against brute force and simple cases."""

import math

import numpy as np
import pytest

from joulepool.core.bound import FloorDemand, FloorGPUs, energy_floor
from joulepool.core.profiles import A100_8B, H100_8B, L4_8B


def _brute_dynamic_j_per_token(profile, tpot_s):
    """Cheapest decode J/token above idle over every clock and feasible batch."""
    best = math.inf
    for f in profile.product.supported_clocks():
        b = np.arange(1, int(profile.max_batch.value) + 1)
        ok = profile.itl_s(b, f) <= tpot_s
        if not ok.any():
            continue
        dyn = (profile.power_w(b[ok], f) - profile.idle_w) / profile.decode_tokens_per_s(b[ok], f)
        best = min(best, float(dyn.min()))
    return best


def _brute_prefill_j_per_token(profile, mean_in, ttft_s):
    """Cheapest prefill J/token above idle with the class's prompts' prefill time, on
    average, within TTFT: a mix of at most two clocks (one row beside the tokens)."""
    f = profile.product.supported_clocks()
    j = (profile.prefill_power_w(f) - profile.idle_w) * profile.prefill_s(1.0, f)
    t = profile.prefill_s(mean_in, f)  # s per prompt at each clock
    best = float(j[t <= ttft_s].min())
    for i in range(f.size):
        for k in range(f.size):
            if t[i] > ttft_s >= t[k]:  # share w at clock i: w t_i + (1 - w) t_k = TTFT
                w = (ttft_s - t[k]) / (t[i] - t[k])
                best = min(best, float(w * j[i] + (1 - w) * j[k]))
    return best


def test_uncapacitated_floor_is_idle_plus_cheapest_tokens():
    d = FloorDemand("c", output_tokens=1e5, input_tokens=5e5, mean_input_tokens=500,
                    ttft_s=0.6, tpot_s=0.15)
    res = energy_floor([d], [FloorGPUs("s", "H100", 8)], [H100_8B], horizon_s=3600)
    assert res.feasible and res.status == "optimal"
    idle = 8 * 75.0 * 3600
    # 1,000 requests: their first tokens come with their prefills
    dec = _brute_dynamic_j_per_token(H100_8B, 0.15) * (1e5 - 1e3)
    pre = _brute_prefill_j_per_token(H100_8B, 500, 0.6) * 5e5
    assert res.idle_j == pytest.approx(idle)
    # the LP's batch grid may only match the brute force, never beat it
    assert res.dynamic_j == pytest.approx(dec + pre, rel=0.02)
    assert res.dynamic_j >= (dec + pre) * (1 - 1e-9)
    assert res.joules_per_token == pytest.approx(res.energy_j / 1e5)


def test_floor_splits_its_dynamic_energy_into_decode_and_prefill():
    """The split the breakdown bench compares a run with: decode + prefill = dynamic,
    each the brute-force cheapest J/token times its tokens, and the batch it decodes
    at the largest meeting TPOT at the cheapest clock (512 on an H100 at 150 ms)."""
    d = FloorDemand("c", output_tokens=1e5, input_tokens=5e5, mean_input_tokens=500,
                    ttft_s=0.6, tpot_s=0.15)
    res = energy_floor([d], [FloorGPUs("s", "H100", 8)], [H100_8B], horizon_s=3600)
    assert res.decode_j + res.prefill_j == pytest.approx(res.dynamic_j, rel=1e-12)
    assert res.decode_j == pytest.approx(
        _brute_dynamic_j_per_token(H100_8B, 0.15) * (1e5 - 1e3), rel=0.02)
    assert res.prefill_j == pytest.approx(_brute_prefill_j_per_token(H100_8B, 500, 0.6) * 5e5,
                                          rel=1e-9)
    assert res.decode_batch == pytest.approx(512)
    none = energy_floor([], [FloorGPUs("s", "A100", 3)], [A100_8B], horizon_s=10)
    assert math.isnan(none.decode_j) and math.isnan(none.decode_batch)


def test_floor_picks_the_cheapest_product_and_respects_capacity():
    d = FloorDemand("c", output_tokens=2e6, input_tokens=0, mean_input_tokens=100,
                    ttft_s=1.0, tpot_s=0.15)
    gpus = [FloorGPUs("s", "H100", 1), FloorGPUs("s", "A100", 4), FloorGPUs("s", "L4", 4)]
    profiles = [H100_8B, A100_8B, L4_8B]
    loose = energy_floor([d], gpus, profiles, horizon_s=3600)
    tight = energy_floor([d], gpus, profiles, horizon_s=200)  # H100 alone cannot do it
    assert loose.feasible and tight.feasible
    assert set(loose.usage) == {H100_8B.key}
    assert len(tight.usage) > 1
    too_much = energy_floor([d], gpus, profiles, horizon_s=5)
    assert not too_much.feasible and "infeasible" in too_much.status
    assert math.isnan(too_much.energy_j)


def test_slo_that_nothing_meets_is_relaxed_and_said():
    d = FloorDemand("strict", output_tokens=1e4, input_tokens=1e4, mean_input_tokens=4000,
                    ttft_s=0.01, tpot_s=0.001)
    res = energy_floor([d], [FloorGPUs("s", "L4", 2)], [L4_8B], horizon_s=3600)
    assert res.feasible and res.slo_relaxed == ("strict",)


def test_no_work_costs_idle_only():
    res = energy_floor([], [FloorGPUs("s", "A100", 3)], [A100_8B], horizon_s=10)
    assert res.feasible and res.energy_j == pytest.approx(3 * 60.0 * 10)
    with pytest.raises(ValueError):
        FloorDemand("x", -1, 0, 0, 1, 1)


def test_prompt_tokens_without_a_request_count_are_refused():
    """Prompt tokens with neither ``requests`` nor a mean prompt have no request count
    for the TTFT row (requests x TTFT = 0): a clear error, not an LP reported as work
    that does not fit the GPUs."""
    with pytest.raises(ValueError, match="need requests or mean_input_tokens"):
        FloorDemand("x", output_tokens=1e5, input_tokens=5e5, mean_input_tokens=0,
                    ttft_s=0.6, tpot_s=0.15)
    counted = FloorDemand("x", output_tokens=1e5, input_tokens=5e5, mean_input_tokens=0,
                          ttft_s=0.6, tpot_s=0.15, requests=1000)
    assert counted.n_requests == 1000
    res = energy_floor([counted], [FloorGPUs("s", "H100", 8)], [H100_8B], horizon_s=3600)
    assert res.feasible


def test_prompts_are_prefilled_on_the_gpus_that_decode_them():
    """A class with a TPOT (40 ms) no L4 meets (its step at batch 1 is 53 ms) is served
    on H100s alone, although an L4 prefills a prompt token for fewer joules above idle:
    the engine keeps a request's KV cache where it was prefilled, so the floor may not
    prefill on one GPU and decode on another (it did, which no engine here can run)."""
    d = FloorDemand("c", output_tokens=2e5, input_tokens=2e6, mean_input_tokens=500,
                    ttft_s=0.6, tpot_s=0.04)
    assert _brute_prefill_j_per_token(L4_8B, 500, 0.6) < _brute_prefill_j_per_token(
        H100_8B, 500, 0.6)
    both = energy_floor([d], [FloorGPUs("s", "H100", 8), FloorGPUs("s", "L4", 8)],
                        [H100_8B, L4_8B], horizon_s=3600)
    alone = energy_floor([d], [FloorGPUs("s", "H100", 8)], [H100_8B], horizon_s=3600)
    assert both.feasible and alone.feasible
    assert both.dynamic_j == pytest.approx(alone.dynamic_j, rel=1e-9)
    assert set(both.usage) == {H100_8B.key}


def test_floor_lists_the_operating_points_it_uses():
    """The columns it reports are its solution: their joules add up to its decode and
    prefill split, their tokens to each demand, their GPU-seconds fit the GPUs, and each
    decode column meets its demand's TPOT, each demand's prefill its TTFT on average."""
    demands = [FloorDemand("a", output_tokens=3e5, input_tokens=6e5, mean_input_tokens=400,
                           ttft_s=0.6, tpot_s=0.15),
               FloorDemand("b", output_tokens=1e5, input_tokens=2e6, mean_input_tokens=2000,
                           ttft_s=0.6, tpot_s=0.05)]
    gpus = [FloorGPUs("s", "H100", 1), FloorGPUs("s", "L4", 4)]
    profiles = {p.key: p for p in (H100_8B, L4_8B)}
    res = energy_floor(demands, gpus, list(profiles.values()), horizon_s=150)
    assert res.feasible and res.columns
    dec = [c for c in res.columns if c.kind == "decode"]
    pre = [c for c in res.columns if c.kind == "prefill"]
    assert sum(c.dynamic_j for c in dec) == pytest.approx(res.decode_j, rel=1e-9)
    assert sum(c.dynamic_j for c in pre) == pytest.approx(res.prefill_j, rel=1e-9)
    for d in demands:
        assert sum(c.tokens for c in dec if c.demand == d.name) >= d.decode_tokens * (1 - 1e-7)
        assert sum(c.tokens for c in pre if c.demand == d.name) >= d.input_tokens * (1 - 1e-7)
    for g in gpus:
        used = sum(c.instance_s * profiles[c.profile].gpus for c in res.columns
                   if profiles[c.profile].product.name == g.product)
        assert used <= g.count * 150 * (1 + 1e-7)
    tpot = {d.name: d.tpot_s for d in demands}
    for c in dec:
        p = profiles[c.profile]
        assert float(p.itl_s(c.batch, c.clock_mhz)) <= tpot[c.demand]
        assert c.tokens == pytest.approx(c.instance_s * float(
            p.decode_tokens_per_s(c.batch, c.clock_mhz)), rel=1e-9)
    for d in demands:  # prefill within TTFT on average over the demand's requests
        assert sum(c.instance_s for c in pre if c.demand == d.name) <= (
            d.n_requests * d.ttft_s * (1 + 1e-7))
    # the H100 alone cannot do it in 150 s: the L4s take part
    assert {c.profile for c in res.columns} == set(profiles)


def test_prompts_shorter_than_the_mean_may_prefill_at_clocks_the_mean_misses():
    """The TTFT binds each request, so the floor bounds the sum of the demand's prefill
    times by requests x TTFT, not each clock by the mean prompt: on an L4, where the mean
    prompt (800 tokens) prefills within 0.4 s only above the cheapest prefill clocks, the
    floor may prefill part of the tokens at the cheap clock (a schedule does that with the
    short prompts). It is below the mean-prompt rule's floor and equal to the two-clock
    brute force."""
    d = FloorDemand("c", output_tokens=1e4, input_tokens=8e5, mean_input_tokens=800,
                    ttft_s=0.4, tpot_s=0.15)
    f = L4_8B.product.supported_clocks()
    j = (L4_8B.prefill_power_w(f) - L4_8B.idle_w) * L4_8B.prefill_s(1.0, f)
    fits = L4_8B.prefill_s(800, f) <= 0.4
    assert fits.any() and not fits[int(np.argmin(j))]  # the cheapest clock misses the mean
    res = energy_floor([d], [FloorGPUs("s", "L4", 8)], [L4_8B], horizon_s=3600)
    mean_rule = float(j[fits].min()) * 8e5
    assert res.prefill_j < mean_rule * (1 - 1e-3)
    assert res.prefill_j == pytest.approx(_brute_prefill_j_per_token(L4_8B, 800, 0.4) * 8e5,
                                          rel=1e-6)
