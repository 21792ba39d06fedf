"""core.sizing: plan with the most queueing headroom the cluster can carry."""

from __future__ import annotations

import numpy as np
import pytest

from joulepool.core.planner import Mode, PlanNode, PlanProblem
from joulepool.core.profiles import DEFAULT_HEADROOM, H100_8B, Headroom
from joulepool.core.sizing import plan_with_headroom

# one class: 2000-token prompts (0.1 s prefill on an H100), 200-token answers, FREESH's LS SLO
MEAN_IN, MEAN_OUT, TTFT, TPOT = 2000.0, 200.0, 0.6, 0.15
H100_MODE = Mode("1xH100", "H100", 1)


def _builder(rps: float, gpus: int = 8, extra_class: bool = False):
    seen: list[Headroom] = []

    def build(hr: Headroom) -> PlanProblem:
        seen.append(hr)
        power, cap = H100_8B.operating_point(MEAN_IN, MEAN_OUT, TTFT, TPOT, headroom=hr)
        classes = ("LS", "XX") if extra_class else ("LS",)
        rows = len(classes)
        return PlanProblem(
            classes=classes,
            modes=(H100_MODE,),
            nodes=(PlanNode("h0", "s", "H100", gpus),),
            power_w=np.full((rows, 1), power),
            # "XX": a class no mode can serve at all, whatever the headroom
            capacity_rps=np.asarray([[cap], [0.0]][:rows]),
            forecast_rps=np.full((rows, 1), rps),
            alpha=1.1,
        )

    return build, seen


def test_full_headroom_when_it_fits_in_one_solve():
    build, seen = _builder(rps=5.0)  # 5.5 req/s: 2 instances at 3.1 req/s each
    sized = plan_with_headroom(build)
    assert sized.result.feasible and sized.scale == 1.0 and not sized.relaxed
    assert sized.solves == 1 and seen == [DEFAULT_HEADROOM] and sized.note() == ""
    assert sized.result.instances("LS") == 2


def test_relaxes_only_as_far_as_the_cluster_needs():
    # 33 req/s: 8 instances at the full headroom's 3.1 req/s are short, with none they serve 65
    build, seen = _builder(rps=30.0)
    sized = plan_with_headroom(build, rounds=6)
    assert sized.result.feasible and 0.0 < sized.scale < 1.0
    assert sized.solves == 2 + 6 and len(seen) == 8  # rounds=6 asked
    cap = sized.problem.capacity_rps[0, 0]
    assert 8 * cap >= 33.0 - 1e-6
    # a little more headroom (the next bisection point up) would not fit
    tighter = DEFAULT_HEADROOM.scaled(sized.scale + 1 / 64)
    _, cap_up = H100_8B.operating_point(MEAN_IN, MEAN_OUT, TTFT, TPOT, headroom=tighter)
    assert 8 * cap_up < 33.0
    assert "planned with" in sized.note() and f"{sized.scale:.0%}" in sized.note()
    assert sized.headroom.ttft_miss.value > DEFAULT_HEADROOM.ttft_miss.value


def test_beyond_any_headroom_serves_about_as_much_as_with_none():
    build, _ = _builder(rps=200.0)  # 220 req/s on 8 GPUs that serve 65 with no headroom
    sized = plan_with_headroom(build)
    assert not sized.result.feasible and sized.scale < 0.5 and "planned with" in sized.note()
    assert sized.result.instances("LS") == 8  # the partial plan serves all it can
    # the least unmet demand: every instance at the rate with no headroom left (the scale
    # 0 of the asked headroom, which keeps its prompt SCV: prompt variability lengthens
    # waits, and with them TPOT, with no headroom too)
    zero = DEFAULT_HEADROOM.scaled(0.0)
    none = 8 * H100_8B.operating_point(MEAN_IN, MEAN_OUT, TTFT, TPOT, headroom=zero)[1]
    unmet = sum(s.shortfall_rps for s in sized.result.shortfalls)
    assert unmet <= 1.01 * (220.0 - none) + 1e-6  # within 1 % of the least unmet demand


def test_headroom_is_kept_when_it_is_not_what_leaves_demand_unmet():
    build, _ = _builder(rps=5.0, extra_class=True)  # "XX" can never be served
    sized = plan_with_headroom(build)
    assert not sized.result.feasible and sized.scale == 1.0 and sized.solves == 3
    assert [s.cls for s in sized.result.shortfalls] == ["XX"]
    assert sized.result.instances("LS") == 2


def test_asked_headroom_is_respected():
    build, seen = _builder(rps=5.0)
    none = Headroom.none()
    sized = plan_with_headroom(build, none)
    assert seen == [none] and sized.headroom is none and sized.result.instances("LS") == 1


@pytest.mark.parametrize("rounds, scale", [(0, 0.0), (1, 0.5)])
def test_bisection_rounds(rounds, scale):
    build, _ = _builder(rps=30.0)  # half the headroom (6.3 req/s per instance) fits
    sized = plan_with_headroom(build, rounds=rounds)
    assert sized.result.feasible and sized.scale == scale and sized.solves == 2 + rounds
