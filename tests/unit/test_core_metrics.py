"""core.metrics: Jain's index, slowdown, Student-t intervals."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from joulepool.core.metrics import (
    class_mean_slowdown,
    jain_index,
    mean_ci,
    relative_change,
    slowdown,
)


def test_jain_known_values():
    assert jain_index([3, 3, 3]) == pytest.approx(1.0)
    assert jain_index([1, 0, 0, 0]) == pytest.approx(0.25)
    assert jain_index([1, 2]) == pytest.approx(9 / 10)
    assert jain_index([2, np.nan, 2]) == pytest.approx(1.0)
    assert jain_index([]) == 1.0 and jain_index([0, 0]) == 1.0
    with pytest.raises(ValueError):
        jain_index([1, -1])


@given(st.lists(st.floats(0.001, 1e6), min_size=1, max_size=30))
def test_jain_bounds_and_scale_invariance(xs):
    j = jain_index(xs)
    assert 1 / len(xs) - 1e-9 <= j <= 1 + 1e-9
    assert jain_index([7 * x for x in xs]) == pytest.approx(j)


def test_slowdown_and_class_means():
    s = slowdown([2.0, 3.0, 8.0, np.nan], [1.0, 1.0, 2.0, 1.0])
    assert s[:3].tolist() == [2.0, 3.0, 4.0] and math.isnan(s[3])
    means = class_mean_slowdown(s, [0, 0, 2, 2], 4)
    assert means[0] == 2.5 and means[2] == 4.0
    assert math.isnan(means[1]) and math.isnan(means[3])
    with pytest.raises(ValueError):
        slowdown([1.0], [0.0])


def test_mean_ci_student_t():
    ci = mean_ci([1.0, 2.0, 3.0])
    # t(0.975, 2) = 4.302653; s = 1
    assert ci.mean == 2.0 and ci.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert ci.low < 2.0 < ci.high and ci.n == 3
    one = mean_ci([5.0])
    assert one.mean == 5.0 and math.isnan(one.half_width)
    assert math.isnan(mean_ci([]).mean)
    with pytest.raises(ValueError):
        mean_ci([1, 2], level=1.5)


def test_relative_change():
    assert relative_change(75.0, 100.0) == pytest.approx(-0.25)
    assert math.isnan(relative_change(1.0, 0.0))
