"""Least-laxity-first queue."""

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from joulepool.core.llf import LLFQueue, laxity, llf_deadline

reqs = st.lists(
    st.tuples(st.floats(0, 100), st.floats(0.01, 2), st.integers(1, 2000)), max_size=60
)


@given(reqs, st.floats(1, 5000))
def test_pops_in_non_decreasing_laxity(items, tps):
    q: LLFQueue[int] = LLFQueue()
    lax = {}
    for i, (arrival, ttft, tokens) in enumerate(items):
        d = llf_deadline(arrival, ttft, tokens, tps)
        q.push(i, d, tokens, tps)
        lax[i] = laxity(d, 0.0, tokens, tps)
    popped = [q.pop() for _ in range(len(q))]
    values = [lax[i] for i in popped]
    assert all(a <= b + 1e-9 for a, b in itertools.pairwise(values))


def test_ties_pop_in_push_order_and_empty_raises():
    q: LLFQueue[str] = LLFQueue()
    for name in "abc":
        q.push(name, 10.0, 100, 100.0)
    assert [q.pop(), q.pop(), q.pop()] == ["a", "b", "c"]
    with pytest.raises(IndexError):
        q.pop()


def test_short_urgent_request_beats_long_early_one():
    """FREESH's toy example: R0 (10 tokens) then R1 (2 tokens) at 1 token/s."""
    q: LLFQueue[str] = LLFQueue()
    q.push("R0", llf_deadline(0, 0, 10, 1.0, k=1.5), 10, 1.0)
    q.push("R1", llf_deadline(1, 0, 2, 1.0, k=1.5), 2, 1.0)
    # R0: deadline 15, laxity at t=1 is 15-1-10 = 4; R1: deadline 4, laxity 4-1-2 = 1
    assert q.peek_laxity(1.0) == pytest.approx(1.0)
    assert [q.pop(), q.pop()] == ["R1", "R0"]


def test_first_token_milestone_orders_the_queue_until_it_has_passed():
    """A long response (late last-token deadline) that arrived first is admitted
    before a later short one while its first token can still be on time; once its
    first-token milestone is past, the ones that can still make theirs go first."""
    tps = 10.0
    q: LLFQueue[str] = LLFQueue()
    # long: arrived at 0, TTFT 0.3 s (prefill must start by 0.25), 600 tokens
    q.push("long", llf_deadline(0.0, 0.3, 600, 1 / 0.15), 600, tps, start_by_s=0.25)
    # short: arrived at 0.1, TTFT 0.3 s (start by 0.35), 10 tokens: a far earlier
    # last-token laxity (0.1 + 0.3 + 1.5 - 1 = 0.9 vs 0.3 + 90 - 60 = 30.3)
    q.push("short", llf_deadline(0.1, 0.3, 10, 1 / 0.15), 10, tps, start_by_s=0.35)
    assert q.peek(0.2) == "long"  # keyed on the last token only, "short" would go first
    q2: LLFQueue[str] = LLFQueue()
    q2.push("long", llf_deadline(0.0, 0.3, 600, 1 / 0.15), 600, tps, start_by_s=0.25)
    q2.push("short", llf_deadline(0.1, 0.3, 10, 1 / 0.15), 10, tps, start_by_s=0.35)
    # at 0.3 "long" can no longer start in time: it is ordered by its last token (30.3)
    assert q2.pop(0.3) == "short" and q2.pop(0.3) == "long"
    with pytest.raises(IndexError):
        q2.peek(1.0)
