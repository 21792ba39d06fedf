"""core.batching: one engine step with chunked prefill, by hand."""

from __future__ import annotations

import numpy as np
import pytest

from joulepool.core.batching import (
    mixed_step,
    prefill_chunk_tokens,
    prefill_steps,
    prefill_time_s,
    prefill_times_s,
    unqueued_first_token_s,
)


def test_chunk_is_the_budget_left_capped_by_the_prompt_and_at_least_one() -> None:
    assert prefill_chunk_tokens(2048, 48, 5000.0) == 2000.0  # budget left
    assert prefill_chunk_tokens(2048, 48, 700.0) == 700.0  # whole prompt fits
    assert prefill_chunk_tokens(2048, 2048, 700.0) == 1.0  # batch took the budget
    assert prefill_chunk_tokens(8192, 0, 9000.0) == 8192.0


def test_mixed_step_adds_time_and_energy() -> None:
    # 20 ms decode step at 400 W + 1000 prompt tokens at 50 us/token (50 ms) at 600 W
    step, power = mixed_step(0.020, 400.0, 1000.0, 50e-6, 600.0)
    assert step == pytest.approx(0.070)
    assert power * step == pytest.approx(0.020 * 400.0 + 0.050 * 600.0)  # 38 J
    assert power == pytest.approx(38.0 / 0.070)
    # nothing decoding: the chunk alone at prefill power
    assert mixed_step(0.0, 0.0, 1000.0, 50e-6, 600.0) == (pytest.approx(0.050), 600.0)
    # no chunk: a pure decode step
    assert mixed_step(0.020, 400.0, 0.0, 50e-6, 600.0) == (pytest.approx(0.020), 400.0)


def test_prefill_time_is_own_compute_plus_one_decode_step_per_chunk() -> None:
    # L4-like: budget 2048, 48 decoding, 5000-token prompt in chunks of 2000: 2.5 steps
    assert prefill_steps(2048, 48, 5000.0) == pytest.approx(2.5)
    t = prefill_time_s(2048, 48, 5000.0, decode_s=0.060, prefill_s_per_token=0.4e-3)
    assert t == pytest.approx(5000 * 0.4e-3 + 2.5 * 0.060)  # 2.15 s
    # a prompt that fits one step pays one decode step
    assert prefill_time_s(8192, 100, 1000.0, 0.020, 50e-6) == pytest.approx(0.050 + 0.020)
    # nothing decoding: the prompt's compute only
    assert prefill_time_s(8192, 0, 1000.0, 0.020, 50e-6) == pytest.approx(0.050)
    assert prefill_steps(8192, 10, 0.0) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_prefill_times_over_an_array_equal_the_scalar_ones(seed: int) -> None:
    """The planner's vectorised form gives :func:`prefill_time_s` prompt by prompt, on
    random budgets, batches (idle, budget used up, normal) and prompts (empty ones too)."""
    rng = np.random.default_rng(seed)
    prompts = np.concatenate([[0.0, 1.0, 0.5], rng.lognormal(6.0, 1.5, 997)])
    for budget, batch in [(8192.0, 0.0), (8192.0, 8192.5), (2048.0, 2047.5),
                          (float(rng.uniform(512, 16384)), float(rng.uniform(0.5, 256)))]:
        decode_s, per_token = float(rng.uniform(0.005, 0.1)), float(rng.uniform(1e-5, 1e-3))
        got = prefill_times_s(budget, batch, prompts, decode_s, per_token)
        want = np.array([prefill_time_s(budget, batch, float(p), decode_s, per_token)
                         for p in prompts])
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=0.0)


def test_first_token_waits_for_the_step_in_progress_then_shares_steps_with_the_batch():
    """Idle: the prompt's own compute. Beside b decoding requests: one decode step (the
    step in progress), then the prompt in chunks of budget - b tokens, each step carrying
    the batch's decode step too."""
    assert unqueued_first_token_s(8192, 0, 3000, 0.02, 1e-4) == pytest.approx(0.3)
    # 8,192 - 192 = 8,000 tokens a step: 20,000 tokens take 2.5 steps
    assert unqueued_first_token_s(8192, 192, 20_000, 0.02, 1e-4) == pytest.approx(
        0.02 + 2.0 + 2.5 * 0.02)
    assert unqueued_first_token_s(8192, 64, 500, 0.02, 1e-4) == pytest.approx(
        0.02 + 0.05 + 0.02)
    # a batch past the budget still moves the prompt one token a step
    assert unqueued_first_token_s(64, 100, 10, 0.02, 1e-4) == pytest.approx(
        0.02 + 10 * 0.02 + 10 * 1e-4)


@pytest.mark.parametrize("seed", range(3))
def test_the_unqueued_first_token_is_the_step_in_progress_plus_the_prefill_time(seed: int):
    """unqueued_first_token_s (core.batching.first_token_after_s with the wait of the step
    in progress) is that step plus :func:`prefill_time_s` beside the same batch: the two
    forms of a prompt's mixed prefill agree."""
    rng = np.random.default_rng(seed)
    for _ in range(500):
        budget = float(rng.choice([2048, 8192, 16384]))
        batch = float(rng.choice([0, 1, rng.integers(2, 300)]))
        prompt = float(rng.integers(1, 30_000))
        decode, pf = float(rng.uniform(0.005, 0.1)), float(rng.uniform(1e-5, 5e-4))
        wait = decode if batch > 0 else 0.0
        assert unqueued_first_token_s(budget, batch, prompt, decode, pf) == pytest.approx(
            wait + prefill_time_s(budget, batch, prompt, decode, pf), rel=1e-12)
