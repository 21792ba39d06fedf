"""Two small helpers the simulator added to core: ETA tie-breaks and prefill power."""

import numpy as np
import pytest

from joulepool.core.cost import joulesched_cost
from joulepool.core.profiles import DEFAULT_PROFILES, H100_8B, LAWS


def test_best_by_eta_breaks_cost_ties_by_eta():
    # identical devices, nothing late: every cost ties; the emptiest queue wins
    cb = joulesched_cost([0.1, 0.1, 0.1], [500, 100, 300], [1000, 1000, 1000], 200, 30, 10)
    assert cb.best() == 0 and cb.best_by_eta() == 1
    # a strictly cheaper device still wins whatever its ETA
    cb = joulesched_cost([0.2, 0.1, 0.2], [0, 900, 0], [1000, 1000, 1000], 200, 30, 10)
    assert cb.best_by_eta() == 1
    # equal cost and equal ETA: the first index
    cb = joulesched_cost([0.1, 0.1], [100, 100], [1000, 1000], 200, 30, 10)
    assert cb.best_by_eta() == 0
    with pytest.raises(ValueError):
        joulesched_cost([], [], [], 1, 1, 1).best_by_eta()


def test_prefill_power_is_the_busiest_point_at_that_clock():
    assert "prefill_power" in LAWS
    for p in DEFAULT_PROFILES:
        assert float(p.prefill_power_w()) == pytest.approx(float(p.power_w(p.max_batch.value)))
    lo = float(H100_8B.prefill_power_w(H100_8B.f_min))
    assert H100_8B.idle_w < lo < float(H100_8B.prefill_power_w())
    clocks = H100_8B.product.supported_clocks()
    assert np.all(np.diff(H100_8B.prefill_power_w(clocks)) >= 0)


def test_best_by_eta_small_and_large_paths_agree():
    rng = np.random.default_rng(0)
    for n in (3, 600):
        eps = rng.choice([0.1, 0.2], size=n)
        q = rng.integers(0, 5, size=n) * 100.0
        cb = joulesched_cost(eps, q, np.full(n, 1000.0), 200, 30, 10)
        order = sorted(range(n), key=lambda i: (cb.cost[i], cb.eta_s[i], i))
        assert cb.best_by_eta() == order[0]
