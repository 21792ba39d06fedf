"""core.feedback: measured J/token corrects a profile by one scale, at the measured load."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from joulepool.core.estimators import EnergyPerTokenEstimator
from joulepool.core.feedback import (
    FeedbackParams,
    Measured,
    OperatingPointEstimator,
    corrected_profile,
    correction,
    inliers,
    measured_batch,
)
from joulepool.core.profiles import H100_8B

NOW = datetime(2026, 1, 1, tzinfo=UTC)
TRUE_SCALE = 1.3  # the GPUs really draw 30 % more than the profile says


def measure(node: str, batch: int, clock: float | None, scale: float = TRUE_SCALE,
            tokens: float = 5000.0, age_s: float = 0.0) -> Measured:
    """What an agent publishes for a GPU whose true eps is ``scale`` x the profile's."""
    return Measured(
        joules_per_token=scale * float(H100_8B.joules_per_token(batch, clock)),
        tokens=tokens, node=node, updated_at=NOW - timedelta(seconds=age_s),
        tokens_per_second=float(H100_8B.decode_tokens_per_s(batch, clock)),
        clock_mhz=clock)


def test_measured_batch_inverts_the_profiles_throughput() -> None:
    for b in (1, 7, 32, 100):
        for f in (None, 1410.0):
            tps = float(H100_8B.decode_tokens_per_s(b, f))
            assert measured_batch(H100_8B, tps, f) == pytest.approx(b, abs=1e-6)
    assert measured_batch(H100_8B, 1e-3, None) == 1.0  # clamped to the batch range
    assert measured_batch(H100_8B, 1e9, None) == H100_8B.max_batch.value


def test_load_differences_are_not_profile_error() -> None:
    """A correct profile, measured at very different loads and clocks: no correction."""
    ms = [measure("a", 2, 1200.0, scale=1.0), measure("b", 128, None, scale=1.0),
          measure("c", 16, 1600.0, scale=1.0)]
    eps = [m.joules_per_token for m in ms]
    assert max(eps) / min(eps) > 3  # raw J/token differ a lot between the nodes
    c = correction(H100_8B, ms, NOW)
    assert c.scale == pytest.approx(1.0, abs=1e-9) and not c.drifted and not c.rejected


def test_a_profile_30_percent_wrong_is_corrected_and_flagged() -> None:
    ms = [measure("a", 8, 1400.0), measure("b", 64, None), measure("c", 24, 1700.0)]
    c = correction(H100_8B, ms, NOW)
    # shrunk towards the profile by prior_tokens / (prior_tokens + kept tokens) in log space
    expected = math.exp(math.log(TRUE_SCALE) * 15000 / (500 + 15000))
    assert c.scale == pytest.approx(expected) and c.drifted
    assert c.used == ("a", "b", "c") and c.tokens == 15000
    fixed = corrected_profile(H100_8B, c.scale)
    for b, f in ((1, None), (8, 1400.0), (200, 1100.0)):
        assert float(fixed.joules_per_token(b, f)) == pytest.approx(
            c.scale * float(H100_8B.joules_per_token(b, f)))
        assert float(fixed.itl_s(b, f)) == float(H100_8B.itl_s(b, f))  # latency untouched
    assert "measured x" in fixed.points[0].power_w.source


def test_an_outlier_node_is_rejected_by_median_mad() -> None:
    ms = [measure(n, 16, None) for n in "abcde"] + [measure("broken", 16, None, scale=4.0)]
    c = correction(H100_8B, ms, NOW)
    assert c.rejected == ("broken",) and set(c.used) == set("abcde")
    assert c.scale == pytest.approx(TRUE_SCALE, rel=0.02)
    # without the rejection the broken node would drag the scale well above the truth
    with_it = correction(H100_8B, ms, NOW, FeedbackParams(mad_k=1e6))
    assert with_it.scale > 1.5 and not with_it.rejected


def test_inliers_keep_nodes_that_agree_exactly() -> None:
    assert inliers([0.1, 0.1, 0.1], FeedbackParams()) == [True, True, True]
    assert inliers([0.1, 0.1, 0.1, 0.5], FeedbackParams()) == [True, True, True, False]
    assert inliers([], FeedbackParams()) == []


def test_stale_and_pointless_measurements_leave_the_profile_alone() -> None:
    old = measure("old", 16, None, age_s=901.0)
    no_point = Measured(joules_per_token=1.0, tokens=1e6, node="v1-agent", updated_at=NOW)
    no_time = Measured(joules_per_token=1.0, tokens=1e6, node="t", tokens_per_second=100.0)
    c = correction(H100_8B, [old, no_point, no_time], NOW)
    assert c.scale == 1.0 and c.stale == ("old", "v1-agent", "t") and not c.drifted
    assert c.reason == "no fresh measurement"
    # the same measurement just within the bound counts
    assert correction(H100_8B, [measure("old", 16, None, age_s=899.0)], NOW).scale > 1.2


def test_too_few_tokens_keep_the_profile() -> None:
    c = correction(H100_8B, [measure("a", 16, None, tokens=1999.0)], NOW)
    assert c.scale == 1.0 and c.used == ("a",) and "2000 tokens needed" in c.reason


def test_scale_is_bounded() -> None:
    c = correction(H100_8B, [measure("a", 16, None, scale=50.0, tokens=1e6)], NOW)
    assert c.scale == FeedbackParams().max_scale


def test_params_are_validated() -> None:
    with pytest.raises(ValueError):
        FeedbackParams(max_age_s=0)
    with pytest.raises(ValueError):
        FeedbackParams(min_scale=1.5)
    with pytest.raises(ValueError):
        corrected_profile(H100_8B, 0.0)


def test_agent_estimators_converge_within_bounded_periods() -> None:
    """The node agent's two estimators (same half-life) over 60 s periods: a 30 %-wrong
    profile is within 3 % of the truth after 2 periods, whatever the (changing) load."""
    rng = np.random.default_rng(7)
    eps_est, op_est = EnergyPerTokenEstimator(half_life_s=300.0), OperatingPointEstimator(300.0)
    scales = []
    for period in range(6):
        for _second in range(60):
            batch = 24 + 8 * period  # the load drifts from period to period
            clock = 1500.0
            tps = float(H100_8B.decode_tokens_per_s(batch, clock))
            tokens = tps * rng.uniform(0.9, 1.1)
            joules = tokens * TRUE_SCALE * float(H100_8B.joules_per_token(batch, clock))
            eps_est.update(joules, tokens, 1.0)
            op_est.update(tokens, 1.0, clock)
        assert eps_est.value is not None and op_est.tokens_per_second is not None
        m = Measured(eps_est.value, eps_est.samples, "n", NOW, op_est.tokens_per_second,
                     op_est.clock_mhz)
        scales.append(correction(H100_8B, [m], NOW).scale)
    assert all(abs(s / TRUE_SCALE - 1) < 0.03 for s in scales[1:]), scales


def test_operating_point_estimator_ignores_idle_periods() -> None:
    op = OperatingPointEstimator(half_life_s=1e9)
    assert op.tokens_per_second is None and op.clock_mhz is None
    op.update(100.0, 1.0, 1000.0)
    op.update(0.0, 5.0, 300.0)  # idle: ages the sums, adds nothing
    op.update(300.0, 1.0, 2000.0)
    assert op.tokens_per_second == pytest.approx(200.0)
    assert op.clock_mhz == pytest.approx(1500.0)
    with pytest.raises(ValueError):
        op.update(-1.0, 1.0, 1000.0)
