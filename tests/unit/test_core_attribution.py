"""Per-pool attribution of measured GPU energy (core.attribution)."""

import pytest

from joulepool.core.attribution import Work, attribute
from joulepool.core.energy import J_PER_KWH

CHAT = Work("default.chat", "llama-3.1-8b", "east")
RAG = Work("default.rag", "llama-3.1-70b", "east")


def test_each_gpu_goes_to_its_engines_and_idle_to_nobody():
    shares, idle = attribute(
        {"0": 100.0, "1": 60.0, "2": 40.0, "3": 7.0},
        {"0": [CHAT], "1": [RAG], "2": [RAG, CHAT]}, g_per_kwh=360.0)
    assert shares[CHAT].joules == pytest.approx(120.0)
    assert shares[RAG].joules == pytest.approx(80.0)
    assert idle == 7.0
    assert shares[CHAT].grams_co2 == pytest.approx(120.0 / J_PER_KWH * 360.0)
    total = sum(s.joules for s in shares.values()) + idle
    assert total == pytest.approx(207.0)  # nothing lost, nothing counted twice


def test_unknown_intensity_leaves_grams_at_zero_and_bad_energy_is_rejected():
    shares, _ = attribute({"0": 10.0}, {"0": [CHAT]}, None)
    assert shares[CHAT].joules == 10.0 and shares[CHAT].grams_co2 == 0.0
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="GPU 0"):
            attribute({"0": bad}, {"0": [CHAT]}, 100.0)


def test_pool_meter_counts_make_joules_per_token_a_division():
    from prometheus_client import CollectorRegistry

    from joulepool.nodeagent.poolmeter import PoolMeter

    reg = CollectorRegistry()
    meter = PoolMeter(reg)
    for _ in range(3):
        meter.record({"0": 50.0, "1": 5.0}, {"0": [CHAT]}, "east", 400.0)
        meter.tokens(CHAT, 100)
    meter.tokens(CHAT, -7)  # an engine restart: ignored
    labels = {"pool": "default.chat", "model": "llama-3.1-8b", "site": "east"}
    joules = reg.get_sample_value("joulepool_pool_energy_joules_total", labels)
    tokens = reg.get_sample_value("joulepool_pool_output_tokens_total", labels)
    grams = reg.get_sample_value("joulepool_pool_carbon_grams_total", labels)
    assert joules == 150.0 and tokens == 300.0 and joules / tokens == 0.5
    assert grams == pytest.approx(150.0 / J_PER_KWH * 400.0)
    assert reg.get_sample_value("joulepool_gpu_idle_energy_joules_total", {"site": "east"}) == 15
