"""A pool member's batch room at the slot load it is credited with (core.routing):
slot loads undo the held sample's length bias, Buhlmann-Straub credibility weighs a
member's own requests against its pool's stream, the room is read on a grid."""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest

from joulepool.core.profiles import H100_8B
from joulepool.core.routing import (
    SLOT_LOAD_BINS_PER_OCTAVE,
    SlotLoadMoments,
    member_rooms,
    room_at_slot_load,
    slot_load,
    slot_load_bin,
    slot_load_credibility,
    slot_load_terms,
    sustainable_batch,
    tpot_gate,
)


def _held_sample(rng: np.random.Generator, prompts: np.ndarray, outputs: np.ndarray,
                 n: int) -> np.ndarray:
    """Indices of ``n`` requests an endpoint holds at a random instant while serving this
    stream: each request is in flight for a time in proportion to its response."""
    return rng.choice(prompts.size, size=n, p=outputs / outputs.sum())


def test_the_mean_slot_load_of_held_requests_is_the_streams_prompt_over_response():
    """Held requests over-represent long responses; the plain mean of their slot loads is
    the stream's mean prompt over mean response (what the TPOT bound falls with), the
    ratio of their mean prompt to their mean response is not."""
    rng = np.random.default_rng(1)
    m = 200_000
    outputs = np.maximum(rng.exponential(200.0, m), 1.0)
    prompts = rng.lognormal(np.log(1500.0), 0.8, m)
    stream = prompts.mean() / outputs.mean()
    held = _held_sample(rng, prompts, outputs, 400_000)
    loads = np.array([slot_load(p, o) for p, o in zip(prompts[held], outputs[held],
                                                       strict=True)])
    assert loads.mean() == pytest.approx(stream, rel=0.02)
    biased = prompts[held].mean() / outputs[held].mean()
    assert biased < 0.7 * stream  # the held ratio of means: length-biased, far too light


def test_slot_load_counts_at_least_one_step():
    assert slot_load(1000.0, 10.0) == 100.0
    assert slot_load(1000.0, 0.0) == 1000.0  # a request with no response: one step


def _by_hand(groups: list[list[float]], n: float) -> float:
    """Buhlmann-Straub credibility written out from its textbook definitions."""
    sizes = [len(g) for g in groups if g]
    means = [sum(g) / len(g) for g in groups if g]
    big_n, m = sum(sizes), len(sizes)
    grand = sum(sum(g) for g in groups) / big_n
    epv = sum((x - mu) ** 2 for g, mu in zip([g for g in groups if g], means, strict=True)
              for x in g) / (big_n - m)
    vhm = (sum(s * (mu - grand) ** 2 for s, mu in zip(sizes, means, strict=True))
           - (m - 1) * epv) / (big_n - sum(s * s for s in sizes) / big_n)
    return max(0.0, n / (n + epv / vhm)) if vhm > 0 else 0.0


def _moments(groups: list[list[float]]) -> SlotLoadMoments:
    return SlotLoadMoments.of([(len(g), sum(g), sum(x * x for x in g)) for g in groups])


def test_credibility_is_buhlmann_straubs():
    groups = [[9.0, 11.0, 10.0, 12.0], [2.0, 3.0], [5.0, 6.0, 4.0], [], [20.0, 18.0, 25.0]]
    mo = _moments(groups)
    assert mo.members == 4 and mo.requests == 12
    for n in (1, 2, 3, 4, 10):
        z = slot_load_credibility(n, mo.requests, mo.members, mo.total, mo.squares,
                                  mo.member_squares, mo.count_squares)
        assert z == pytest.approx(_by_hand(groups, n), rel=1e-12)
        assert 0.0 < z < 1.0
    # the credible load: Z x the member's mean + (1 - Z) x the prior
    z2 = _by_hand(groups, 2)
    assert mo.credible(2, 5.0, 7.0) == pytest.approx(z2 * 2.5 + (1 - z2) * 7.0)


def test_members_of_one_stream_are_credited_with_the_pools_load():
    """Members that take requests from one stream at random differ only by sampling:
    Z is 0 (VHM <= 0) in most draws and small in the rest, so a member holding a
    long prompt with a short answer is not taken for a member that is full."""
    rng = np.random.default_rng(7)
    zs = []
    for _ in range(200):
        groups = [list(rng.lognormal(np.log(6.0), 1.0, int(rng.integers(1, 17))))
                  for _ in range(8)]
        mo = _moments(groups)
        zs.append(slot_load_credibility(4, mo.requests, mo.members, mo.total, mo.squares,
                                        mo.member_squares, mo.count_squares))
    assert np.mean(np.array(zs) == 0.0) > 0.5
    assert np.mean(zs) < 0.15


def test_members_the_router_sorted_by_mix_are_credited_with_their_own_load():
    rng = np.random.default_rng(8)
    light = [list(rng.lognormal(np.log(2.0), 0.3, 40)) for _ in range(4)]
    heavy = [list(rng.lognormal(np.log(20.0), 0.3, 40)) for _ in range(4)]
    mo = _moments(light + heavy)
    z = slot_load_credibility(40, mo.requests, mo.members, mo.total, mo.squares,
                              mo.member_squares, mo.count_squares)
    assert z > 0.95
    assert mo.credible(40, sum(heavy[0]), 11.0) == pytest.approx(
        sum(heavy[0]) / 40, rel=0.05)


def test_no_credibility_without_two_members_or_degrees_of_freedom():
    for groups in ([[3.0, 4.0]], [[3.0], [9.0]], [[], [1.0, 2.0]]):
        mo = _moments(groups)
        assert slot_load_credibility(2, mo.requests, mo.members, mo.total, mo.squares,
                                     mo.member_squares, mo.count_squares) == 0.0
        assert mo.credible(1, 9.0, 5.0) == 5.0
    assert slot_load_terms(0, 5.0, 25.0) == (0.0,) * 6


def test_the_room_on_the_grid():
    """Bin 0 is the pool's load, so the pool's TPOT batch; a heavier load never has more
    room (prompt chunks mixed into every decode step), and the grid's step is 2^(1/8).
    b*_n is the pool's at most the TPOT batch at the member's load."""
    mean_in, mean_out = 2061.0, 212.0
    prior = slot_load(mean_in, mean_out)
    pool = sustainable_batch(H100_8B, mean_in, mean_out, math.inf, 0.15)
    assert room_at_slot_load(H100_8B, 0, prior, mean_out, 0.15) == pool
    rooms = [room_at_slot_load(H100_8B, k, prior, mean_out, 0.15)
             for k in range(-16, 17, 4)]
    assert all(a >= b for a, b in pairwise(rooms))
    assert rooms[0] > pool > rooms[-1]
    assert slot_load_bin(prior * 2.0, prior) == SLOT_LOAD_BINS_PER_OCTAVE
    assert slot_load_bin(prior * 2.0 ** (0.49 / SLOT_LOAD_BINS_PER_OCTAVE), prior) == 0
    # the first token binds the pool's b*_n (17 < 150): at most that
    assert member_rooms(17, 150, 5) == (5, 5) and member_rooms(17, 150, 200) == (17, 200)
    # TPOT binds it (17 = 17): b*_n follows the member's load both ways
    assert member_rooms(17, 17, 12) == (12, 12) and member_rooms(17, 17, 25) == (25, 25)




def test_the_production_router_sizes_rooms_at_the_credible_slot_load():
    """core.router.PoolRouter, with endpoints whose rooms are sized at a stream, gives each
    endpoint the b*_n and TPOT batch of the slot load its ledger is credited with, by the
    same core formulas the simulator uses; an endpoint with an empty ledger keeps its
    pool's rooms."""
    from joulepool.core.router import Endpoint, PoolRouter
    from joulepool.core.routing import EndpointModel

    mean_in, mean_out, ttft, tpot = 2061.0, 212.0, 1.0, 0.15
    model = EndpointModel.from_profile(H100_8B, tpot, serving=(mean_in, mean_out, ttft))
    assert model.batch_limit == sustainable_batch(H100_8B, mean_in, mean_out, ttft, tpot)
    pool = PoolRouter("ns.p")
    pool.set_endpoints([Endpoint(f"10.0.0.{k}:8000", model) for k in range(4)])
    # each endpoint's requests: (prompt, response) pairs taken in turn; 3 holds none
    requests = {0: [(300.0, 400.0), (1200.0, 300.0)], 1: [(4000.0, 40.0), (2500.0, 90.0)],
                2: [(300.0, 400.0), (2061.0, 212.0)]}
    held = []
    for i, ep in enumerate(pool.endpoints):
        mix = requests.get(i, [])
        loads = [slot_load(*mix[r % len(mix)]) for r in range(30 if mix else 0)]
        for r, load in enumerate(loads):
            ep.add_routed(f"r{i}-{r}", 1e9, mix[r % len(mix)][1], load)
        held.append((len(loads), math.fsum(loads), math.fsum(x * x for x in loads)))
    for i in range(len(pool.endpoints)):
        pool._refresh(i)
    room = pool._batch_room()
    moments = SlotLoadMoments.of(held)
    prior = slot_load(mean_in, mean_out)
    assert model.pool_slot_load == prior
    assert 0.0 < slot_load_credibility(30, moments.requests, moments.members, moments.total,
                                       moments.squares, moments.member_squares,
                                       moments.count_squares) < 1.0  # the prior counts
    for i, (n, total, _) in enumerate(held):
        if not n:
            assert room[i] == model.batch_limit
            assert pool.state.tpot_batch[i] == model.tpot_batch_limit
            continue
        k = slot_load_bin(moments.credible(n, total, prior), prior)
        want_tpot = min(room_at_slot_load(H100_8B, k, prior, mean_out, tpot), model.max_batch)
        want = member_rooms(model.batch_limit, model.tpot_carry_batch, want_tpot)
        assert room[i] == pytest.approx(want[0] - n)
        # overflow_rank's TPOT batch: core.routing.tpot_gate of the member's mean one
        assert pool.state.tpot_batch[i] == pytest.approx(
            min(tpot_gate(H100_8B, want[1], tpot), model.max_batch))
    # the endpoint holding the long prompts with short answers has the least room; the
    # light ones more within TPOT, and b*_n at most the pool's
    assert pool.state.tpot_batch[1] < model.tpot_batch_limit < pool.state.tpot_batch[0]
    assert room[1] + 30 < model.batch_limit and room[0] + 30 == model.batch_limit
    # forgetting the requests gives the pool's rooms back
    for r in range(30):
        pool.endpoints[1].drop_routed(f"r1-{r}")
    assert pool.endpoints[1].slot_loads == 0.0 and pool.endpoints[1].slot_load_squares == 0.0
