"""core's serving model held to the simulated engine.

One instance (``sim`` on a one-GPU cluster, Poisson arrivals) is loaded at the rate
``ServingProfile.serving_point`` calls sustainable and must meet the headroom's
targets there (TTFT and TPOT attainment >= 1 - the miss targets, mean TPOT within
the margin and within 10 % of the model's); at 1.3x that rate it must miss one of
them (the model is not overly conservative either). Prompts vary +-25 % around the
mean (SCV 1/48, which the model is given as ``Headroom.prefill_scv``); outputs are
exponential (the model's assumption for the KV cache and the TPOT tail).
"""

from __future__ import annotations

import numpy as np
import pytest
from sim_helpers import one_instance_run

from joulepool.core.profiles import H100_8B, L4_8B, Headroom, ServingProfile, assumed

REQUESTS = 20_000
SPREAD = 0.25  # prompts uniform in mean x [1 - SPREAD, 1 + SPREAD]
HEADROOM = Headroom(prefill_scv=assumed(SPREAD**2 / 3, "the test's uniform prompts"))



def _engine(prof: ServingProfile, prompt: float, output: float, ttft: float, tpot: float,
            rate: float, instances: int = 1) -> tuple[float, float, float]:
    """(TTFT attainment, TPOT attainment, mean TPOT s) of one simulated instance
    (least-loaded), or of a pool of ``instances`` at ``rate`` req/s in all behind
    JouleSched, whose first-token guard sends a prompt where it starts in time (the
    soonest start when none does): one M/G/n prefill queue."""
    rng = np.random.default_rng(7)
    arrival = np.cumsum(rng.exponential(1.0 / rate, REQUESTS))
    arrival -= arrival[0]
    lo, hi = (1.0 - SPREAD) * prompt, (1.0 + SPREAD) * prompt
    inp = np.round(rng.uniform(lo, hi, REQUESTS)).astype(np.int64)
    out = np.maximum(2, np.round(rng.exponential(output - 1.5, REQUESTS) + 1.5)).astype(np.int64)
    run, warm = one_instance_run(prof.product.name, prof.gpus, arrival, inp, out, ttft,
                                 tpot, instances,
                                 "least-loaded" if instances == 1 else "joulesched")
    first, done = run.t_first[warm], run.t_done[warm]
    decode = (done - first)
    return (float(np.mean(first - arrival[warm] <= ttft)),
            float(np.mean(decode / (out[warm] - 1) <= tpot)),
            float(decode.sum() / (out[warm] - 1).sum()))


CASES = [  # profile, mean prompt, mean output, TTFT SLO, TPOT SLO; binding bound
    pytest.param(H100_8B, 200, 600, 0.3, 0.15, id="h100-decode-heavy-ttft"),
    pytest.param(H100_8B, 1000, 250, 0.6, 0.15, id="h100-mixed-ttft"),
    pytest.param(H100_8B, 2000, 30, 0.3, 0.05, id="h100-prefill-heavy-tpot"),
    pytest.param(L4_8B, 200, 600, 0.3, 0.15, id="l4-decode-heavy-ttft"),
    pytest.param(L4_8B, 400, 150, 1.0, 0.15, id="l4-tpot"),
    pytest.param(L4_8B, 1500, 1500, 2.0, 0.15, id="l4-long-kv"),
]


@pytest.mark.parametrize(("prof", "prompt", "output", "ttft", "tpot"), CASES)
def test_engine_meets_the_targets_at_the_serving_point(
        prof: ServingProfile, prompt: float, output: float, ttft: float, tpot: float) -> None:
    hr = HEADROOM
    sp = prof.serving_point(prompt, output, ttft, tpot, headroom=hr)
    assert sp.rps > 0.0, sp.binding
    ttft_ok, tpot_ok, mean_tpot = _engine(prof, prompt, output, ttft, tpot, sp.rps)
    assert ttft_ok >= 1.0 - hr.ttft_miss.value, (sp.binding, ttft_ok)
    assert tpot_ok >= 1.0 - hr.tpot_miss.value, (sp.binding, tpot_ok)
    assert mean_tpot <= (1.0 - hr.tpot_margin.value) * tpot * 1.03, (sp.tpot_s, mean_tpot)
    assert mean_tpot == pytest.approx(sp.tpot_s, rel=0.1)  # the model's mean TPOT


@pytest.mark.parametrize(("prof", "prompt", "output", "ttft", "tpot"), CASES)
def test_engine_misses_a_target_at_1_3x_the_serving_point(
        prof: ServingProfile, prompt: float, output: float, ttft: float, tpot: float) -> None:
    hr = HEADROOM
    sp = prof.serving_point(prompt, output, ttft, tpot, headroom=hr)
    ttft_ok, tpot_ok, mean_tpot = _engine(prof, prompt, output, ttft, tpot, 1.3 * sp.rps)
    assert (ttft_ok < 1.0 - hr.ttft_miss.value or tpot_ok < 1.0 - hr.tpot_miss.value
            or mean_tpot > (1.0 - hr.tpot_margin.value) * tpot), (sp.binding, ttft_ok, tpot_ok)


def test_the_cases_cover_every_binding_bound() -> None:
    bound = {c.id: c.values[0].serving_point(*c.values[1:], headroom=HEADROOM).binding
             for c in CASES}
    assert {bound[i] for i in bound} == {"ttft", "tpot", "kv"}, bound
    assert all(bound[i] == i.rsplit("-", 1)[1] for i in bound), bound


#: TTFT-bound cases, as a pool of instances behind a soonest-start router (M/G/n): 4 of
#: each, and 8 of the one whose pool gains most
LONG_PROMPT = pytest.param(H100_8B, 2000, 200, 0.6, 0.15, id="h100-long-prompt-ttft")
POOL_CASES = [pytest.param(*c.values, 4, id=f"{c.id}-4") for c in CASES
              if c.id.endswith("-ttft")] + [
    pytest.param(*LONG_PROMPT.values, n, id=f"{LONG_PROMPT.id}-{n}") for n in (4, 8)]
POOL_ARGS = ("prof", "prompt", "output", "ttft", "tpot", "instances")


@pytest.mark.parametrize(POOL_ARGS, POOL_CASES)
def test_a_pool_meets_the_targets_at_its_pooled_serving_point(
        prof: ServingProfile, prompt: float, output: float, ttft: float, tpot: float,
        instances: int) -> None:
    hr = HEADROOM
    one = prof.serving_point(prompt, output, ttft, tpot, headroom=hr)
    sp = prof.serving_point(prompt, output, ttft, tpot, headroom=hr, pool_size=instances)
    assert sp.rps > one.rps  # the pool carries more per instance than one alone
    ttft_ok, tpot_ok, mean_tpot = _engine(prof, prompt, output, ttft, tpot,
                                          instances * sp.rps, instances)
    assert ttft_ok >= 1.0 - hr.ttft_miss.value, (sp.binding, ttft_ok)
    assert tpot_ok >= 1.0 - hr.tpot_miss.value, (sp.binding, tpot_ok)
    assert mean_tpot <= (1.0 - hr.tpot_margin.value) * tpot * 1.03, (sp.tpot_s, mean_tpot)


@pytest.mark.parametrize(POOL_ARGS, POOL_CASES)
def test_a_pool_misses_a_target_at_1_3x_its_pooled_serving_point(
        prof: ServingProfile, prompt: float, output: float, ttft: float, tpot: float,
        instances: int) -> None:
    hr = HEADROOM
    sp = prof.serving_point(prompt, output, ttft, tpot, headroom=hr, pool_size=instances)
    if sp.binding != "ttft":
        # waits for a batch slot stay per instance in the model, while the router also
        # pools the slots: conservative in a pool, so 1.3x may still meet every target
        assert sp.binding == "batch"
        pytest.skip("bound by the batch slots, which the model keeps per instance")
    ttft_ok, tpot_ok, mean_tpot = _engine(prof, prompt, output, ttft, tpot,
                                          1.3 * instances * sp.rps, instances)
    assert (ttft_ok < 1.0 - hr.ttft_miss.value or tpot_ok < 1.0 - hr.tpot_miss.value
            or mean_tpot > (1.0 - hr.tpot_margin.value) * tpot), (sp.binding, ttft_ok, tpot_ok)
