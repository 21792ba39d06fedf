"""Profiles: calibration points reproduced, laws monotone, every number sourced."""

import dataclasses

import numpy as np
import pytest

from joulepool.core.classes import CLASS_NAMES, ClassBoundaries, freesh_slo
from joulepool.core.energy import grams_co2, grams_co2_per_hour, joules_per_token
from joulepool.core.profiles import (
    A100_8B,
    DEFAULT_HEADROOM,
    DEFAULT_PROFILES,
    H100,
    H100_8B,
    H100_70B,
    L4_8B,
    BatchPoint,
    Figure,
    Headroom,
    ServingProfile,
    _serving_model,
    _violations,
    assumed,
    default_batched_tokens,
    find_profile,
    kv_capacity_tokens,
    product_for_label,
)


def test_reproduces_published_h100_points():
    # ML.ENERGY: 8B b=64 is 610 W, 11.5 ms, 0.119 J/token; 70B TP4 b=512 is 0.421 J/token
    assert float(H100_8B.power_w(64)) == pytest.approx(610)
    assert float(H100_8B.itl_s(64)) == pytest.approx(0.0115)
    assert float(H100_8B.joules_per_token(64)) == pytest.approx(0.119, rel=0.1)
    assert float(H100_70B.joules_per_token(512)) == pytest.approx(0.421, rel=0.01)


def test_energy_per_token_falls_with_batch_and_lower_clock():
    b = np.array([1, 8, 64, 256])
    jpt = H100_8B.joules_per_token(b)
    assert np.all(np.diff(jpt) < 0)
    assert float(H100_8B.joules_per_token(64, 1400)) < float(H100_8B.joules_per_token(64))
    assert float(H100_8B.itl_s(64, 1400)) > float(H100_8B.itl_s(64))
    # DVFS saving lands in the literature's 30-45 % band at 0.7 x f_max
    saving = 1 - float(H100_8B.joules_per_token(64, 1386)) / float(H100_8B.joules_per_token(64))
    assert 0.25 < saving < 0.5


def test_idle_power_at_zero_batch_and_h100_most_efficient_at_scale():
    assert float(H100_8B.power_w(0)) == H100.idle_w.value
    assert float(H100_8B.joules_per_token(256)) < float(A100_8B.joules_per_token(256))
    assert L4_8B.max_batch.value < A100_8B.max_batch.value


def test_every_default_number_carries_a_source():
    def figures(obj):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if isinstance(v, Figure):
                yield v
            elif dataclasses.is_dataclass(v):
                yield from figures(v)
            elif isinstance(v, tuple):
                for item in v:
                    if dataclasses.is_dataclass(item):
                        yield from figures(item)

    for prof in DEFAULT_PROFILES:
        for fig in figures(prof):
            assert fig.source.strip(), prof.key
    assert H100.idle_w.assumed and not H100.tdp_w.assumed


def test_supported_clocks_and_lookup():
    clocks = H100.supported_clocks()
    assert clocks[0] == H100.f_min_mhz.value and clocks[-1] == 1980
    assert np.all(np.diff(clocks) == 15)
    assert product_for_label("NVIDIA-H100-80GB-HBM3") is H100
    assert product_for_label("NVIDIA-A100-SXM4-40GB").name == "A100"
    assert product_for_label("Tesla-T4") is None
    assert find_profile("L4", "llama-3.1-70b") is None  # 140 GB of weights do not fit


def test_operating_point_respects_slo():
    power, rps = H100_8B.operating_point(1000, 200, 0.3, 0.05)
    assert rps > 0 and power > H100_8B.idle_w
    assert float(H100_8B.itl_s(H100_8B.best_batch(0.05))) <= 0.05
    assert H100_8B.operating_point(1000, 200, 0.01, 0.05)[1] == 0.0  # prefill too slow
    assert L4_8B.operating_point(1000, 200, 1.0, 0.01)[1] == 0.0  # no batch meets TPOT


def test_throughput_is_the_saturation_rate_with_the_tpot_batch():
    """1 / (prefill + (o - 1) * itl(b*) / b*): H100 8B, 2000-token prompt (0.1 s), 200
    tokens, the first of which the prefill's last step makes."""
    b = H100_8B.best_batch(0.15)
    assert b == 512
    expect = 1.0 / (0.1 + 199 * float(H100_8B.itl_s(512)) / 512)
    assert H100_8B.throughput_rps(2000, 200, 0.15) == pytest.approx(expect)
    assert L4_8B.throughput_rps(1000, 200, 0.01) == 0.0


def _flat_profile() -> ServingProfile:
    """10 ms per decode step at any batch (up to 2), 400 W; 10,000 prompt tokens/s."""
    return ServingProfile(
        product=H100, model="flat-test", gpus=1,
        points=(BatchPoint(1, assumed(10.0, "test"), assumed(400.0, "test")),),
        max_batch=assumed(2, "test"), prefill_tokens_per_s=assumed(10000, "test"))


def test_serving_model_state_by_hand():
    """1000-token prompts (0.1 s of compute, one chunk under the 8192-token budget), 11
    output tokens (10 decoded after the prefill's), 2 req/s, 2 batch slots:

    u = 2 x 0.1 = 0.2; completions/s at k decoding mu_k = k (1 - u) / (10 x 0.01) = 8, 16;
    birth-death weights 1, 2/8, (2/8)(2/16) = 1/32, queued beyond 2 slots (1/32) 2/14;
    Z = 1.2857: P(0, 1, 2+) = 0.7778, 0.1944, 0.0278 (= P(an arrival finds them full));
    S = 0.1 + 0.01 x P(decoding) = 0.102222 (one decode step per chunk); rho = 2 S."""
    prof = _flat_profile()
    m = _serving_model(prof, 1000.0, 11.0, 0.6, 0.15, None, DEFAULT_HEADROOM, 8192.0, 1e9)
    assert not isinstance(m, str) and m.slots == 2
    s = m.at(2.0)
    assert s.compute == pytest.approx(0.2)
    z = 1 + 0.25 + 1 / 32 + (1 / 32) * 2 / 14
    full = (1 / 32 + (1 / 32) * 2 / 14) / z
    assert s.batch == pytest.approx((0.25 + 2 * (1 / 32 + (1 / 32) * 2 / 14)) / z)
    assert s.prefill_s == pytest.approx(0.1 + 0.01 * (1 - 1 / z))
    assert s.rho == pytest.approx(2.0 * s.prefill_s)
    # M/G/1 prefill wait tail (prompt SCV 1 on S's compute share) and the slot wait tail
    c2 = (0.1 / s.prefill_s) ** 2
    tail = s.rho * np.exp(-2 * (1 - s.rho) * (0.6 - s.prefill_s) / (s.prefill_s * (1 + c2)))
    assert s.ttft_miss == pytest.approx(tail)
    assert s.slot_miss == pytest.approx(full * np.exp(-(16 - 2) * (0.6 - s.prefill_s)))
    # KV held: N requests x (P + o) tokens, and the prompt being prefilled
    assert s.kv_tokens == pytest.approx(s.batch * 1011 + s.rho * 1000)


def test_serving_model_mixed_step_prefill_and_kv_slots():
    """A 5000-token prompt under a 2048-token budget beside one decoding request takes
    5000 / 2047 chunks, each with a decode step; a KV cache of 12,000 tokens less the
    watermark and one prompt holds (12000 x 0.99 - 5000) / 5011 = 1.37 requests: 1 slot."""
    prof = _flat_profile()
    m = _serving_model(prof, 5000.0, 11.0, 5.0, 0.15, None, DEFAULT_HEADROOM, 2048.0, 12000.0)
    assert not isinstance(m, str) and m.slots == 1
    s = m.at(0.5)
    busy = s.batch  # one slot: P(decoding) = mean batch
    assert s.prefill_s == pytest.approx(0.5 + 0.01 * busy * 5000 / 2047)
    too_small = _serving_model(prof, 5000.0, 11.0, 5.0, 0.15, None, DEFAULT_HEADROOM, 2048.0,
                               9000.0)
    assert too_small == "the KV cache cannot hold a mean request"
    sp = prof.serving_point(5000.0, 11.0, 5.0, 0.15, kv_tokens=9000.0)
    assert sp.rps == 0.0 and "KV cache" in sp.binding


def test_serving_point_keeps_every_headroom_bound():
    for prof in DEFAULT_PROFILES:
        for name in CLASS_NAMES:
            slo = freesh_slo(name)
            mean_in = 2000 if name[0] == "L" else 400
            mean_out = 600 if name[1] == "L" else 150
            sp = prof.serving_point(mean_in, mean_out, slo.ttft_s, slo.tpot_s)
            if sp.rps == 0.0:
                continue
            assert 0.0 < sp.rps <= sp.throughput_rps * (1 + 1e-9), prof.key
            assert 0.0 < sp.utilisation <= 1.0 + 1e-9
            assert sp.ttft_miss <= DEFAULT_HEADROOM.ttft_miss.value * (1 + 1e-6)
            assert sp.tpot_miss <= DEFAULT_HEADROOM.tpot_miss.value * (1 + 1e-6)
            assert sp.tpot_s <= 0.9 * slo.tpot_s * (1 + 1e-6)
            assert 1.0 <= sp.batch <= prof.max_batch.value
            assert 0.0 < sp.kv_share < 1.0
            assert sp.prefill_utilisation < 1.0
            busiest = float(prof.power_w(np.arange(1, prof.max_batch.value + 1)).max())
            assert prof.idle_w <= sp.power_w <= busiest + 1e-9
            # (power, rate) for the planner are the serving point's
            assert prof.operating_point(mean_in, mean_out, slo.ttft_s, slo.tpot_s) == (
                sp.power_w, sp.rps)


@pytest.mark.parametrize("scale", [1.0, 0.5, 0.0])
def test_serving_point_is_the_largest_rate_meeting_every_bound(scale):
    """At the rate the state meets every bound; just above it the binding one breaks."""
    hr = DEFAULT_HEADROOM.scaled(scale)
    for prof in DEFAULT_PROFILES:
        for mean_in, mean_out, ttft, tpot in ((430, 140, 0.3, 0.15), (970, 520, 0.3, 0.15),
                                               (2050, 210, 0.6, 0.15), (1120, 530, 0.6, 0.15),
                                               (500, 200, 1.0, 0.05)):
            sp = prof.serving_point(mean_in, mean_out, ttft, tpot, headroom=hr)
            if sp.rps == 0.0:
                continue
            m = _serving_model(prof, mean_in, mean_out, ttft, tpot, None, hr,
                               default_batched_tokens(prof.product), kv_capacity_tokens(prof))
            assert not isinstance(m, str)
            assert _violations(m, m.at(sp.rps), hr) == [], (prof.key, mean_in)
            assert _violations(m, m.at(sp.rps * 1.002), hr), (prof.key, mean_in)
            assert sp.binding in _violations(m, m.at(sp.rps * (1 + 1e-6)), hr), prof.key


def test_less_headroom_sustains_more():
    rates = [H100_8B.serving_point(2000, 200, 0.6, 0.15, headroom=DEFAULT_HEADROOM.scaled(s)).rps
             for s in (1.0, 0.5, 0.0)]
    assert rates[0] < rates[1] < rates[2]
    none = H100_8B.serving_point(2000, 200, 0.6, 0.15, headroom=Headroom.none())
    # no headroom: the fluid model's TPOT limit, just under the saturation throughput
    # (decode pauses for prefill, so TPOT binds before the batch is full)
    assert none.binding == "tpot" and none.tpot_s == pytest.approx(0.15, rel=1e-4)
    assert rates[0] < none.rps < H100_8B.throughput_rps(2000, 200, 0.15)


def test_headroom_scaling_and_validation():
    hr = DEFAULT_HEADROOM
    assert hr.scaled(1.0) is hr and hr.scaled(2.0) is hr
    zero = hr.scaled(0.0)
    assert zero.ttft_miss.value == 1.0 and zero.tpot_margin.value == 0.0
    half = hr.scaled(0.5)
    assert half.ttft_miss.value == pytest.approx(0.1) and half.tpot_margin.value == 0.05
    assert half.prefill_scv is hr.prefill_scv and "50% of the headroom" in half.ttft_miss.source
    assert hr.ttft_miss.assumed and hr.tpot_margin.assumed and hr.prefill_scv.assumed
    assert hr.tpot_miss.assumed and half.tpot_miss.value == pytest.approx(0.1)
    assert "P(wait > TTFT SLO - prefill) <= 0.01" in hr.describe()
    for bad in ({"ttft_miss": assumed(0.0, "x")}, {"tpot_margin": assumed(1.0, "x")},
                {"prefill_scv": assumed(-1.0, "x")}, {"tpot_miss": assumed(0.0, "x")}):
        with pytest.raises(ValueError):
            Headroom(**bad)


def test_not_eligible_says_why():
    sp = H100_8B.serving_point(1000, 200, 0.01, 0.05)
    assert sp.rps == 0.0 and "prefill" in sp.binding
    sp = L4_8B.serving_point(1000, 200, 1.0, 0.01)
    assert sp.rps == 0.0 and "TPOT" in sp.binding
    # the L4's batch-1 step (53 ms) meets a 55 ms TPOT, but not 90 % of it
    sp = L4_8B.serving_point(200, 100, 1.0, 0.055)
    assert sp.rps == 0.0 and "headroom" in sp.binding
    assert L4_8B.serving_point(200, 100, 1.0, 0.055, headroom=Headroom.none()).rps > 0


def test_classes_and_slos():
    b = ClassBoundaries()
    assert b.classify(100, 443) == "SS" and b.classify(100, 444) == "SL"
    assert b.classify(2000, 10) == "LS"
    idx = b.classify_many([100, 2000], [500, 500])
    assert [CLASS_NAMES[i] for i in idx] == ["SL", "LL"]
    assert freesh_slo("LS").ttft_s == 0.6 and freesh_slo("SS").ttft_s == 0.3
    with pytest.raises(ValueError):
        freesh_slo("XX")
    assert freesh_slo("SS").deadline_for(100, 2.0) == pytest.approx(2 * (0.3 + 15))


def test_energy_conversions():
    assert joules_per_token(600, 6000) == 0.1
    assert grams_co2(3.6e6, 400) == pytest.approx(400)
    assert grams_co2_per_hour(1000, 400) == pytest.approx(400)
    with pytest.raises(ValueError):
        joules_per_token(1, 0)


# ------------------------------------------- calibration against published measurements
#: ML.ENERGY leaderboard v3, Llama-3.1-8B on one H100 80GB, bf16, chat, default clocks:
#: batch -> (J/token, median ITL ms or None, output tok/s or None)
MLENERGY_H100_8B = {
    8: (0.455, 7.3, 1070.0),
    64: (0.119, 11.5, 5147.0),
    256: (0.077, None, 9010.0),
    512: (0.070, None, None),
}


def _without(profile, batch):
    return dataclasses.replace(profile, points=tuple(p for p in profile.points
                                                     if p.batch != batch))


@pytest.mark.parametrize("batch", sorted(MLENERGY_H100_8B))
def test_h100_8b_matches_ml_energy_at_every_measured_batch(batch):
    jpt, itl_ms, tok_s = MLENERGY_H100_8B[batch]
    assert float(H100_8B.joules_per_token(batch)) == pytest.approx(jpt, rel=0.10)
    if itl_ms is not None:
        assert float(H100_8B.itl_s(batch)) * 1e3 == pytest.approx(itl_ms, rel=0.10)
    if tok_s is not None:
        assert float(H100_8B.decode_tokens_per_s(batch)) == pytest.approx(tok_s, rel=0.10)


@pytest.mark.parametrize("held_out", [64, 256])
def test_h100_8b_predicts_held_out_batches_within_ten_percent(held_out):
    """Drop a measured batch from the calibration points: the batch laws predict it.

    Step time linear in batch (weights read once per step, KV per sequence) gets the
    b=64 point within 5 % from b=8 and b=256; interpolating it in log2(batch), as the
    profile did before, put it 74 % too high.
    """
    prof = _without(H100_8B, held_out)
    jpt, itl_ms, tok_s = MLENERGY_H100_8B[held_out]
    assert float(prof.joules_per_token(held_out)) == pytest.approx(jpt, rel=0.10)
    if itl_ms is not None:
        assert float(prof.itl_s(held_out)) * 1e3 == pytest.approx(itl_ms, rel=0.10)
    if tok_s is not None:
        assert float(prof.decode_tokens_per_s(held_out)) == pytest.approx(tok_s, rel=0.10)


def test_h100_8b_between_measured_batches_follows_the_affine_step_time():
    """Between measured batches the step time is the line through its neighbours."""
    for lo, hi in ((8, 64), (64, 256), (256, 512)):
        mid = (lo + hi) // 2
        t_lo, t_hi = float(H100_8B.itl_s(lo)), float(H100_8B.itl_s(hi))
        want = t_lo + (t_hi - t_lo) * (mid - lo) / (hi - lo)
        assert float(H100_8B.itl_s(mid)) == pytest.approx(want, rel=1e-12)


def _saving(profile, batch):
    clocks = profile.product.supported_clocks()
    ratio = profile.joules_per_token(batch, clocks) / profile.joules_per_token(batch)
    return clocks, ratio


@pytest.mark.parametrize("batch", [8, 64, 256])
def test_h100_decode_dvfs_saving_is_in_the_published_band_and_u_shaped(batch):
    """Best-clock saving 25-45 % (published: 32-44 %); the lowest clock is past the minimum."""
    clocks, ratio = _saving(H100_8B, batch)
    best = int(np.argmin(ratio))
    assert 0.25 <= 1 - ratio[best] <= 0.45
    assert clocks[0] < clocks[best] < clocks[-1]  # an interior minimum: U-shaped
    assert ratio[0] > ratio[best] * 1.02
    assert np.all(np.diff(ratio[best:]) > 0)  # above it, a higher clock always costs more


def test_a100_energy_per_token_is_u_shaped_inside_its_dvfs_sweep():
    """VoltanaLLM measures a U-shaped energy-vs-clock curve on A100 (1005-1410 MHz)."""
    clocks, ratio = _saving(A100_8B, 64)
    best = int(np.argmin(ratio))
    assert clocks[0] < clocks[best] < clocks[-1]
    assert 0.1 <= 1 - ratio[best] <= 0.36


def test_prefill_is_more_clock_sensitive_than_decode():
    for prof in (H100_8B, A100_8B, L4_8B):
        f_min = prof.product.f_min_mhz.value
        assert float(prof.prefill_stretch(f_min)) > float(prof.decode_stretch(f_min)) > 1.0
        assert float(prof.prefill_s(1000, f_min)) / float(prof.prefill_s(1000)) == (
            pytest.approx(prof.f_max / f_min))


def test_clock_law_at_f_max_is_the_calibration_and_power_falls_with_the_clock():
    clocks = H100.supported_clocks()
    for b in (1, 8, 64, 512):
        assert float(H100_8B.power_w(b, H100.f_max_mhz.value)) == pytest.approx(
            float(H100_8B.power_w(b)))
        power = H100_8B.power_w(b, clocks)
        assert np.all(np.diff(power) > 0)
        assert np.all(power > H100.idle_w.value)
    prefill = H100_8B.prefill_power_w(clocks)
    assert np.all(np.diff(prefill) > 0)
    assert float(prefill[-1]) == pytest.approx(688)


def test_clock_law_parameters_are_labelled_and_tunable():
    from joulepool.sim.runner import apply_assumptions

    for fig in (H100_8B.gamma, H100_8B.beta_decode, H100_8B.beta_prefill,
                H100_8B.memory_power_share, H100.voltage_knee_ratio, H100.bandwidth_clock_ratio):
        assert fig is not None and fig.assumed and len(fig.source) > 20
    (flat,) = apply_assumptions([H100_8B], {"memory_power_share": 0.0, "gamma": 3.0})
    assert flat.memory_power_share.value == 0.0 and flat.gamma.value == 3.0
    assert float(flat.power_w(64, 1200)) < float(H100_8B.power_w(64, 1200))


def test_a100_8b_single_stream_decode_agrees_with_a_published_measurement():
    """Cross-check of the derived A100 profile (no A100 figure entered it).

    Published: J. Musgrave, "vLLM throughput-latency sweep on NVIDIA A100" (blog, 2025):
    Llama-3.1-8B-Instruct bf16, vLLM 0.23, one A100 40GB, ~75 output tok/s at one
    request in flight. Memory-bound decode at batch 1 scales with HBM bandwidth:
    A100 40GB SXM 1,555 GB/s, A100 80GB SXM 2,039 GB/s (vendor specs).
    """
    itl_40gb_s = 1 / 75.0
    itl_80gb_s = itl_40gb_s * 1555 / 2039
    assert float(A100_8B.itl_s(1)) == pytest.approx(itl_80gb_s, rel=0.10)


def test_an_unbounded_kv_cache_leaves_the_batch_slots():
    """A product without GPU memory or an unknown model has no KV limit (inf tokens): the
    batch slots alone bound admission, as with a cache too large to fill."""
    free = H100_8B.serving_point(2000, 600, 0.6, 0.15, kv_tokens=float("inf"))
    huge = H100_8B.serving_point(2000, 600, 0.6, 0.15, kv_tokens=1e12)
    assert free.rps > 0 and free.rps == pytest.approx(huge.rps, rel=1e-6)
    assert free.kv_share == 0.0


def test_ttft_from_mean_false_drops_only_the_mean_prompt_ttft_bounds() -> None:
    """A 1xA100 prefills 6,667 tokens/s: a 5,600-token mean prompt takes 0.84 s, over a
    0.6 s TTFT, so FREESH's mean rule makes the mode not eligible. Judged by the prompts
    (the caller's prompt-tail fit), the serving model still bounds TPOT, batch and KV."""
    a100 = find_profile("A100", "llama-3.1-8b", 1)
    assert a100 is not None
    by_mean = a100.serving_point(5600.0, 200.0, 0.6, 0.1)
    assert by_mean.rps == 0.0 and by_mean.binding == "prefill alone exceeds TTFT"
    by_prompts = a100.serving_point(5600.0, 200.0, 0.6, 0.1, ttft_from_mean=False)
    assert 0.0 < by_prompts.rps < by_prompts.throughput_rps
    assert by_prompts.binding in {"tpot", "batch", "kv", "prefill"}
    # where the mean prompt fits, dropping the mean's wait bound can only raise the rate
    fits = a100.serving_point(1000.0, 200.0, 1.0, 0.1)
    assert fits.binding == "ttft"
    assert a100.serving_point(1000.0, 200.0, 1.0, 0.1, ttft_from_mean=False).rps > fits.rps


def test_a_prompt_the_kv_cache_holds_only_without_its_margin_is_not_eligible():
    """Prompts near the KV cache's size: room for one mean request but no whole slot
    with the queueing margin is 'the KV cache cannot hold a mean request', not an
    IndexError (a member credited with a very heavy slot load asks for such points:
    core.routing.room_at_slot_load)."""
    import math

    from joulepool.core.profiles import DEFAULT_PROFILES

    seen = 0
    for prof in DEFAULT_PROFILES:
        for prompt in np.geomspace(1000.0, 2e6, 60):
            for out in (1.0, 212.0):
                sp = prof.serving_point(float(prompt), out, math.inf, 0.15)
                if sp.rps == 0.0 and "KV cache" in sp.binding:
                    seen += 1
    assert seen > 0
