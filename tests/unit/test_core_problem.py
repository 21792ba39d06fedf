"""core.problem: the one node type and the one builder of the planner's problem."""

from __future__ import annotations

import numpy as np
import pytest

from joulepool.api.models import EnergyPolicySpec, InferencePool
from joulepool.core.planner import Mode, PlanNode
from joulepool.core.problem import ServiceClass, build_problem, node_from_label
from joulepool.core.profiles import DEFAULT_PROFILES, find_profile
from joulepool.pooling import build_problem as build_pool_problem

H100, A100 = Mode("1xH100", "H100", 1), Mode("1xA100", "A100", 1)
CHAT = ServiceClass("chat", 1000.0, 200.0, 1.0, 0.1, (4.0, 6.0))


def _profile(r: int, mode: Mode):  # type: ignore[no-untyped-def]
    return find_profile(mode.product, "llama-3.1-8b", mode.gpus)


def test_node_from_label_names_the_core_product() -> None:
    assert node_from_label("n", "east", "NVIDIA-H100-80GB-HBM3", 8) == PlanNode(
        "n", "east", "H100", 8)
    assert node_from_label("n", "east", "Mystery-GPU", 8).product == "Mystery-GPU"
    with pytest.raises(ValueError):
        node_from_label("n", "", "H100", 8)


def test_matrices_are_core_serving_points() -> None:
    built = build_problem([CHAT], [H100, A100], [PlanNode("h", "s", "H100", 8),
                                                  PlanNode("empty", "s", "A100", 0)],
                          lambda r, m: _profile(r, m) if m is H100 else None,
                          step_s=300.0, alpha=1.1, objective="energy")
    p = built.problem
    sp = _profile(0, H100).serving_point(1000.0, 200.0, 1.0, 0.1)
    assert (p.power_w[0, 0], p.capacity_rps[0, 0]) == (sp.power_w, sp.rps) and sp.rps > 0
    assert (p.power_w[0, 1], p.capacity_rps[0, 1]) == (0.0, 0.0)  # not allowed
    assert built.serving["1xA100"] == (None,)
    assert [n.name for n in p.nodes] == ["h"]  # nodes without GPUs left out
    assert p.forecast_rps.tolist() == [[4.0, 6.0]] and (p.step_s, p.alpha) == (300.0, 1.1)


def test_forecasts_must_have_one_length() -> None:
    other = ServiceClass("b", 100.0, 50.0, 2.0, 0.2, (1.0,))
    with pytest.raises(ValueError, match="lengths"):
        build_problem([CHAT, other], [H100], [], _profile, step_s=300.0, alpha=1.0,
                      objective="energy")


def test_operator_and_cli_build_through_the_same_builder() -> None:
    pool = InferencePool.model_validate({
        "metadata": {"name": "chat", "namespace": "ns"},
        "spec": {"model": "llama-3.1-8b", "gpuProducts": ["H100"],
                 "slo": {"ttftSeconds": 1.0, "tpotSeconds": 0.1},
                 "demand": {"requestsPerSecond": 5, "meanInputTokens": 1000,
                            "meanOutputTokens": 200}}})
    nodes = [PlanNode("h", "s", "H100", 8), PlanNode("a", "s", "A100", 8)]
    policy = EnergyPolicySpec(windowSteps=2)
    from_pool = build_pool_problem([pool], nodes, policy, DEFAULT_PROFILES)
    cls = ServiceClass("ns.chat", 1000.0, 200.0, 1.0, 0.1, (5.0, 5.0))
    direct = build_problem([cls], from_pool.modes, nodes,
                           lambda r, m: _profile(r, m) if m.product == "H100" else None,
                           step_s=policy.step_seconds, alpha=policy.alpha,
                           objective="energy").problem
    assert from_pool.classes == direct.classes
    assert np.array_equal(from_pool.power_w, direct.power_w)
    assert np.array_equal(from_pool.capacity_rps, direct.capacity_rps)
    assert np.array_equal(from_pool.forecast_rps, direct.forecast_rps)
