"""overflow_rank's TPOT batch: a quantile of the engine's batch, not its mean.

Measured on the held-out matrix (docs/experiments/simulator.md, "Why the held-out cells fail"):
with the mean decode batch at the TPOT-bound rate as the gate (1-6 requests with
~30-token answers), a busy H100 counted as full at once, so JouleSched sent prompts to
endpoints whose first token was later, or to a slower L4 (small-8 / short-chat: 108 of
318 requests on the L4 late). ``core.routing.tpot_gate`` is the batch the engine exceeds
at most the headroom's TPOT miss share of the time at that rate.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
from scipy.stats import poisson
from sim_helpers import cluster, workload

from joulepool.core.classes import PromptLengths
from joulepool.core.problem import ServiceClass
from joulepool.core.problem import serving_point as problem_serving_point
from joulepool.core.profiles import (
    DEFAULT_PROFILES,
    H100_8B,
    L4_8B,
    Headroom,
    ServingProfile,
    assumed,
)
from joulepool.core.routing import EndpointModel, gated_room, sustainable_batch, tpot_gate
from joulepool.sim.engine import simulate
from joulepool.sim.policies import POLICIES
from joulepool.sim.runner import model_tables


@pytest.mark.parametrize("prof", [H100_8B, L4_8B])
def test_the_gate_is_a_poisson_quantile_of_the_mean_within_the_tpot_batch(
        prof: ServingProfile) -> None:
    top = prof.best_batch(0.15)
    gates = [tpot_gate(prof, mean, 0.15) for mean in range(1, 2 * top)]
    assert all(b >= a for a, b in itertools.pairwise(gates))  # monotone
    for mean, gate in zip(range(1, 2 * top), gates, strict=True):
        assert gate >= mean  # never below the mean (the gate before)
        assert gate <= max(top, mean)  # never past the batch whose step meets TPOT
        if mean < top / 2:
            assert gate == min(int(poisson.ppf(0.99, mean)), top)
    assert tpot_gate(prof, 2, 0.15) >= 6  # a mean of 2 is exceeded 14 % of the time


def test_a_tighter_tpot_miss_target_lets_the_gate_reach_further() -> None:
    strict = Headroom(tpot_miss=assumed(0.001, "test"))
    loose = Headroom(tpot_miss=assumed(0.1, "test"))
    assert tpot_gate(H100_8B, 5, 0.15, headroom=loose) < tpot_gate(H100_8B, 5, 0.15) \
        < tpot_gate(H100_8B, 5, 0.15, headroom=strict)


def test_busy_h100s_are_not_skipped_for_a_late_l4() -> None:
    """2 H100 and 1 L4 behind JouleSched, short chat turns (prompts ~60, answers ~40) at
    140 req/s. Measured: 0.03 % of first tokens late, TPOT all kept; with the mean batch
    as the gate 2.9 % (231 of the 367 requests the L4 took were late), TPOT the same."""
    rng = np.random.default_rng(1)
    n, rate = 8000, 140.0

    def lognormal(mean: float, sigma: float) -> np.ndarray:
        x = np.round(rng.lognormal(np.log(mean) - sigma**2 / 2, sigma, n))
        return np.maximum(1, x).astype(np.int64)

    arrival = np.cumsum(rng.exponential(1.0 / rate, n))
    arrival -= arrival[0]
    prompts = np.minimum(lognormal(60.0, 0.6), 1023)
    answers = np.minimum(lognormal(40.0, 0.6), 443)
    cl = cluster([("h", "H100", 2), ("l", "L4", 1)])
    wl = workload(arrival.tolist(), prompts.tolist(), answers.tolist(), float(arrival[-1]))
    run = simulate(cl, wl, POLICIES["joulesched"], model_tables(cl))
    first = run.t_first - wl.arrival_s
    late = ~(first <= wl.ttft_slo_s)
    tpot = (run.t_done - run.t_first) / np.maximum(wl.output_tokens - 1, 1)
    assert late.mean() <= 0.002
    assert np.mean(tpot <= wl.tpot_slo_s) >= 0.999
    l4 = run.instance_product == run.products.index("L4")
    assert 0 < l4.sum() < 0.05 * n  # the L4 still takes some overflow


def test_an_instance_whose_step_alone_breaks_tpot_holds_none_within_it() -> None:
    """An L4 at a 50 ms TPOT: its decode step at batch 1 (53 ms) breaks it, so no batch
    keeps TPOT there. Its gate and its batch room are 0 (its b*_n stays at least 1: the
    marginal energy's tables read it); an instance that keeps TPOT keeps its room."""
    assert L4_8B.best_batch(0.05) == 0 < H100_8B.best_batch(0.05)
    carry = sustainable_batch(L4_8B, 300.0, 1500.0, 0.3, 0.05)
    assert carry >= 1
    assert [tpot_gate(L4_8B, mean, 0.05) for mean in (1, 2, 40)] == [0, 0, 0]
    assert gated_room(carry, tpot_gate(L4_8B, carry, 0.05)) == 0
    gate = tpot_gate(H100_8B, 100, 0.05)
    assert gate >= 100
    assert gated_room(100, gate) == 100 and gated_room(7.5, 1.0) == 7.5


@pytest.mark.parametrize("prof", [L4_8B, H100_8B])
def test_the_routers_endpoint_model_reads_no_room_where_no_batch_keeps_tpot(
        prof: ServingProfile) -> None:
    """core.router's rooms (EndpointModel): batch room and TPOT batch 0 for the L4 at a
    50 ms TPOT, at its pool's stream and at any slot load it is credited with; eps_n
    still read at a batch of at least 1. The H100's rooms are b*_n and its gate."""
    model = EndpointModel.from_profile(prof, 0.05, serving=(300.0, 1500.0, 0.3))
    if prof.best_batch(0.05) == 0:
        assert model.batch_limit == model.tpot_batch_limit == 0.0
        for k in (-8, 3, 8):
            assert model.rooms_at_slot_load(model.pool_slot_load * 2.0 ** (k / 8)) \
                == (0.0, 0.0)
        assert model.carry_batch >= 1 and math.isfinite(model.marginal_eps(0.0))
    else:
        assert model.batch_limit == sustainable_batch(prof, 300.0, 1500.0, 0.3, 0.05) >= 1
        assert model.tpot_batch_limit == min(tpot_gate(
            prof, sustainable_batch(prof, 300.0, 1500.0, math.inf, 0.05), 0.05),
            model.max_batch) >= model.batch_limit


def test_joulesched_sends_nothing_to_an_instance_that_cannot_keep_tpot() -> None:
    """An A100 and an L4 behind JouleSched at a 50 ms TPOT (the L4's step alone is 53 ms),
    prompts ~300, answers ~1,000 at 1.5 req/s (the A100 carries them all). Measured with
    the L4's room at 1: the idle L4 took 34 of the 600 requests, every one of them past
    TPOT (94.3 % within TPOT); now it takes none and every request keeps TPOT."""
    rng = np.random.default_rng(2)
    n, rate = 600, 1.5
    arrival = np.cumsum(rng.exponential(1.0 / rate, n))
    arrival -= arrival[0]
    prompts = np.maximum(1, np.round(rng.lognormal(np.log(300.0), 0.5, n))).astype(np.int64)
    answers = np.maximum(2, np.round(rng.exponential(1000.0, n))).astype(np.int64)
    cl = cluster([("a", "A100", 1), ("l", "L4", 1)])
    wl = workload(arrival.tolist(), prompts.tolist(), answers.tolist(), float(arrival[-1]))
    wl = dataclasses.replace(wl, tpot_slo_s=np.full(n, 0.05),
                             deadline_s=wl.ttft_slo_s + wl.output_tokens * 0.05)
    run = simulate(cl, wl, POLICIES["joulesched"], model_tables(cl, 0.05))
    l4 = run.instance_product == run.products.index("L4")
    tpot = (run.t_done - run.t_first) / np.maximum(wl.output_tokens - 1, 1)
    assert not l4.any()
    assert np.mean(tpot <= wl.tpot_slo_s) >= 0.99


@pytest.mark.parametrize("prof", DEFAULT_PROFILES, ids=lambda p: p.key)
@pytest.mark.parametrize("tpot_s", [0.03, 0.05, 0.15])
def test_the_planner_counts_no_capacity_where_the_router_holds_none_within_tpot(
        prof: ServingProfile, tpot_s: float) -> None:
    """The planner and the router read one rule for "no batch keeps TPOT here"
    (ServingProfile.best_batch 0): where the router's gate is 0 (it sends such an instance
    a request only when every endpoint is late), the planner's L[r, m] is 0 too, for
    short and long prompts, with and without prompt lengths, alone or in a pool. The
    planner may be stricter (its mean-TPOT margin), never looser. Held-out cells with L4s
    at the interactive set's 50 ms (docs/experiments/marginal-energy.md, "The six cells"): the plan
    gives the L4s nothing, as the router does."""
    prompts = PromptLengths.from_samples(np.geomspace(100.0, 8000.0, 200))
    classes = [ServiceClass("SS", 300.0, 200.0, 0.3, tpot_s, [1.0]),
               ServiceClass("LS", 2000.0, 30.0, 0.6, tpot_s, [1.0]),
               ServiceClass("LS", 2000.0, 30.0, 0.6, tpot_s, [1.0], prompt_tokens=prompts)]
    no_room = tpot_gate(prof, 1.0, tpot_s) == 0
    for cls, pool in itertools.product(classes, (1, 4)):
        point = problem_serving_point(prof, cls, None, pool_size=pool)
        if no_room:
            assert point.rps == 0.0, (cls, pool, point.binding)
    if prof is L4_8B:
        assert no_room == (tpot_s < float(L4_8B.itl_s(1)))  # its step at batch 1: 53.3 ms
