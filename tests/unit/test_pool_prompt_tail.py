"""An InferencePool's declared prompt-length distribution (``demand.inputTokenQuantiles``):
validation, and the planner keeping the pool off modes that cannot prefill its tail
(core.problem.prompt_tail_miss, as for the simulator's classes)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from joulepool.api.models import EnergyPolicySpec, InferencePool
from joulepool.core.problem import node_from_label
from joulepool.pooling import build_problem, plan_pools

LONG_TAIL = [{"quantile": 0.5, "tokens": 700}, {"quantile": 0.9, "tokens": 3000},
             {"quantile": 0.99, "tokens": 9000}]


def pool(quantiles: list[dict[str, Any]] | None = None, **demand: Any) -> InferencePool:
    d: dict[str, Any] = {"requestsPerSecond": 2, "meanInputTokens": 1000,
                         "meanOutputTokens": 200, **demand}
    if quantiles is not None:
        d["inputTokenQuantiles"] = quantiles
    return InferencePool.model_validate({
        "apiVersion": "joulepool.dev/v1alpha1", "kind": "InferencePool",
        "metadata": {"name": "chat", "namespace": "default"},
        "spec": {"model": "llama-3.1-8b", "slo": {"ttftSeconds": 1.0, "tpotSeconds": 0.1},
                 "demand": d,
                 "template": {"spec": {"containers": [{"name": "e", "image": "i"}]}}}})


NODES = [node_from_label("a100", "s1", "A100", 8), node_from_label("h100", "s1", "H100", 8)]


@pytest.mark.parametrize("quantiles,message", [
    ([], "at least 1 item"),
    ([{"quantile": 0.0, "tokens": 5}], "greater than 0"),
    ([{"quantile": 1.2, "tokens": 5}], "less than or equal to 1"),
    ([{"quantile": 0.5, "tokens": -1}], "greater than 0"),
    ([{"quantile": 0.5, "tokens": 5}, {"quantile": 0.5, "tokens": 6}], "0.5 is given twice"),
    ([{"quantile": 0.5, "tokens": 500}, {"quantile": 0.9, "tokens": 400}],
     "must not fall as the quantile rises"),
    ([{"quantile": 0.5, "tokens": 5, "weight": 1}], "Extra inputs"),
])
def test_bad_quantiles_are_rejected_with_a_reason(quantiles, message):
    with pytest.raises(ValidationError) as err:
        pool(quantiles)
    assert message in str(err.value)
    assert "inputTokenQuantiles" in str(err.value)


def test_quantiles_are_kept_in_order_whatever_order_they_are_given_in():
    p = pool(list(reversed(LONG_TAIL)))
    got = p.spec.demand.input_token_quantiles
    assert got is not None and [q.quantile for q in got] == [0.5, 0.9, 0.99]
    lengths = p.spec.demand.prompt_lengths()
    assert lengths is not None and max(lengths.tokens) == 9000.0
    assert pool().spec.demand.prompt_lengths() is None


def test_the_planner_keeps_a_long_prompt_pool_off_a_mode_that_cannot_prefill_its_tail():
    """Mean prompt 1,000 tokens prefills in 0.15 s on an A100, well inside the 1 s TTFT,
    about 4.5 % of the declared prompts are longer than the 6,667 tokens an A100 prefills
    in 1 s (budget 1 %): with the quantiles the A100 is not eligible; the pool goes to an
    H100."""
    modes = [m.name for m in build_problem([pool()], NODES, EnergyPolicySpec()).modes]
    mean_only = build_problem([pool()], NODES, EnergyPolicySpec()).capacity_rps[0]
    tail = build_problem([pool(LONG_TAIL)], NODES, EnergyPolicySpec()).capacity_rps[0]
    a100, h100 = modes.index("1xA100"), modes.index("1xH100")
    assert mean_only[a100] > 2.0 and tail[a100] == 0.0
    assert tail[h100] > 0.5 * mean_only[h100]  # an H100 prefills 9,000 tokens in 0.45 s
    before = plan_pools([pool()], NODES, EnergyPolicySpec()).outcomes["default.chat"]
    after = plan_pools([pool(LONG_TAIL)], NODES, EnergyPolicySpec()).outcomes["default.chat"]
    assert before.planned and {a.mode for a in before.assignments} == {"1xA100"}
    assert after.planned and {a.mode for a in after.assignments} == {"1xH100"}


def test_a_short_tail_changes_nothing():
    short = [{"quantile": 0.5, "tokens": 900}, {"quantile": 0.99, "tokens": 2000}]
    mean_only = build_problem([pool()], NODES, EnergyPolicySpec()).capacity_rps
    declared = build_problem([pool(short)], NODES, EnergyPolicySpec()).capacity_rps
    assert (declared > 0).tolist() == (mean_only > 0).tolist()
    out = plan_pools([pool(short)], NODES, EnergyPolicySpec()).outcomes["default.chat"]
    assert {a.mode for a in out.assignments} == {"1xA100"}


async def test_quantiles_the_crd_let_through_become_an_invalid_spec_condition():
    """Where the API server's CRD predates the rules (an older chart), the operator's
    own validation says what is wrong on the pool and keeps planning its last valid spec."""
    from test_operator_planning import make_planner, reconcile, status
    from test_operator_planning import pool as pool_body

    planner, api, world = make_planner()
    world.add_node("n1")
    world.add_pool(pool_body("chat", 2))
    await reconcile(planner, world)
    path = "/apis/joulepool.dev/v1alpha1/namespaces/default/inferencepools/chat"
    api.objects[path]["spec"]["demand"]["inputTokenQuantiles"] = [
        {"quantile": 0.5, "tokens": 900}, {"quantile": 0.9, "tokens": 400}]
    world.refresh_pools()
    await reconcile(planner, world)
    cond = {c["type"]: c for c in status(api, "chat")["conditions"]}["Invalid"]
    assert (cond["status"], cond["reason"]) == ("True", "InvalidSpec")
    assert "inputTokenQuantiles" in cond["message"] and "must not fall" in cond["message"]
