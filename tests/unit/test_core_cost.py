"""JouleSched cost: monotonicity, lambda = 0 choice, tiers, placement form, scores."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from joulepool.core.classes import Tier
from joulepool.core.cost import (
    choose_endpoint,
    effective_lambda,
    joulesched_cost,
    placement_cost,
    scores_from_costs,
)

pos = st.floats(min_value=0.01, max_value=1e4, allow_nan=False)
endpoints = st.lists(st.tuples(pos, st.floats(0, 1e5), pos), min_size=1, max_size=20)


@given(endpoints, pos, pos, st.floats(0, 1e3), st.floats(0.001, 10))
def test_cost_rises_with_eps_and_tokens(eps_q_mu, tokens, deadline, lam, bump):
    eps, q, mu = (np.array(x) for x in zip(*eps_q_mu, strict=True))
    base = joulesched_cost(eps, q, mu, tokens, deadline, lam).cost
    assert np.all(joulesched_cost(eps + bump, q, mu, tokens, deadline, lam).cost > base)
    assert np.all(joulesched_cost(eps, q, mu, tokens + bump, deadline, lam).cost > base)


@given(endpoints, pos, pos)
def test_lambda_zero_picks_lowest_eps(eps_q_mu, tokens, deadline):
    eps, q, mu = (np.array(x) for x in zip(*eps_q_mu, strict=True))
    chosen = choose_endpoint(eps, q, mu, tokens, deadline, lam=0.0)
    assert eps[chosen] == eps.min()
    assert chosen == int(np.argmin(eps))  # first on ties


def test_known_answer_and_breakdown():
    # efficient but queued endpoint 0 vs wasteful idle endpoint 1
    b = joulesched_cost([0.1, 0.3], [9000, 0], [1000, 1000], 1000, 5.0, lam=100.0)
    assert b.eta_s.tolist() == [10.0, 1.0]
    assert b.slack_s.tolist() == [5.0, 0.0]
    assert b.cost.tolist() == pytest.approx([100 + 500, 300])
    assert b.best() == 1 and b.ranking() == [1, 0]
    assert joulesched_cost([0.1, 0.3], [9000, 0], [1000, 1000], 1000, 5.0, 0.0).best() == 0


def test_zero_throughput_endpoint_never_wins_with_positive_lambda():
    assert choose_endpoint([0.01, 0.5], [0, 0], [0, 100], 10, 1.0, lam=1.0) == 1


def test_bulk_tier_is_lenient_about_lateness():
    args = ([0.1, 0.3], [9000, 0], [1000, 1000], 1000, 5.0, 100.0)
    assert choose_endpoint(*args, tier=Tier.INTERACTIVE) == 1
    assert choose_endpoint(*args, tier=Tier.BULK) == 0
    assert effective_lambda(10.0, "bulk") < effective_lambda(10.0, "interactive") == 10.0


def test_placement_prefers_efficient_node_until_it_runs_hot():
    eps, cap = [0.08, 0.2], [10000, 10000]
    assert placement_cost(eps, [0, 0], cap, 2000, 0.8, 1.0).best() == 0
    assert placement_cost(eps, [7500, 0], cap, 2000, 0.8, 2000.0).best() == 1


def test_scores_map_best_to_ten_and_ties_equal():
    assert scores_from_costs([5.0, 1.0, 3.0]) == [0, 10, 5]
    assert scores_from_costs([2.0, 2.0]) == [10, 10]
    assert scores_from_costs([1.0, np.inf]) == [10, 0]
    assert scores_from_costs([]) == []


@given(st.lists(st.floats(0, 1e6), min_size=1, max_size=50))
def test_scores_in_range_and_order_preserving(costs):
    scores = scores_from_costs(costs)
    assert all(0 <= s <= 10 for s in scores)
    order = np.argsort(costs, kind="stable")
    assert all(scores[order[i]] >= scores[order[i + 1]] for i in range(len(costs) - 1))
