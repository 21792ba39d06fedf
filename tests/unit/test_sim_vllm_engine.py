"""The engine's vLLM mechanics, by hand: chunked prefill mixed into decode steps under a
token budget, KV-cache admission and recompute preemption, the context bound, and the
start-up time and energy of an instance the planner starts.

H100 / llama-3.1-8b at f_max (checked in test_sim_engine.test_profile_numbers_used_by_hand_
tests): prefill 0.05 ms per token at 688 W; decode b=1 6.775 ms at 420 W, b=2 6.85 ms at
442 W; idle 75 W. KV cache: 32 layers x 8 KV heads x 128 x 2 x 2 bytes = 128 KiB a token.
"""

from __future__ import annotations

import math

import pytest
from sim_helpers import cluster, workload

from joulepool.core.classes import ClassBoundaries
from joulepool.core.profiles import (
    GIB,
    H100_8B,
    L4_8B,
    MODELS,
    kv_capacity_tokens,
    max_model_len,
    startup,
)
from joulepool.sim.engine import EngineParams, Simulator, simulate
from joulepool.sim.instance import Instance
from joulepool.sim.planning import PlannedInstances, WindowPlan
from joulepool.sim.policies import POLICIES
from joulepool.sim.runner import model_tables
from joulepool.sim.tables import build_table

RR = POLICIES["round-robin"]
PF = 0.05e-3  # s per prompt token
ITL1, ITL2 = 0.006775, 0.00685


def _run(cl, wl, policy=RR, plans=None, **params):
    return simulate(cl, wl, policy, model_tables(cl), plans, EngineParams(**params))


def _utilisation_for(kv_tokens: float) -> float:
    """gpu_memory_utilization that leaves exactly ``kv_tokens`` of KV cache on one H100."""
    arch = MODELS["llama-3.1-8b"]
    return ((arch.weights_bytes.value + kv_tokens * arch.kv_bytes_per_token)
            / (H100_8B.product.memory_gb.value * GIB))


# ------------------------------------------------------------------ core figures
def test_kv_bytes_per_token_and_capacity_from_the_architecture():
    assert MODELS["llama-3.1-8b"].kv_bytes_per_token == 128 * 1024
    assert MODELS["llama-3.1-70b"].kv_bytes_per_token == 320 * 1024
    # one H100 at 0.9 of 80 GiB, less 16.06 GB of weights, over 128 KiB
    expect = (0.9 * 80 * GIB - 8.03e9 * 2) / (128 * 1024)
    assert kv_capacity_tokens(H100_8B) == pytest.approx(expect)
    assert 467_000 < expect < 468_000
    # an L4 (24 GiB) keeps ~54k tokens: its longest sequence is cut below the 128k context
    l4 = kv_capacity_tokens(L4_8B)
    assert 50_000 < l4 < 56_000
    assert max_model_len(L4_8B, l4) == math.floor(l4 * 0.99)
    assert max_model_len(H100_8B, kv_capacity_tokens(H100_8B)) == 131072
    assert kv_capacity_tokens(H100_8B, _utilisation_for(2000.0)) == pytest.approx(2000.0)


def test_start_up_time_and_power_from_weights_and_warm_up():
    s, w = startup(H100_8B)
    load = 8.03e9 * 2 / 2e9  # 8.03 s of weights at 2 GB/s, idle power
    assert s == pytest.approx(load + 20.0)
    assert s * w == pytest.approx(load * 75.0 + 20.0 * 688.0)


# ------------------------------------------------------------------ chunked prefill
def test_mixed_step_time_and_power():
    """One decoding request (b = 1) and a 1000-token prompt under a budget of 101 tokens
    a step: chunks of 100, each step 6.775 + 100 x 0.05 = 11.775 ms, drawing
    (6.775 x 420 + 5 x 688) / 11.775 W; the prompt takes 10 steps."""
    inst = Instance(0, build_table(H100_8B, 0.15), "n", "s1", 0, False, 1.0, False,
                    budget=101)
    evq: list[tuple[float, int, int]] = []
    inst.heap.append((50.0, 9))
    inst.b = 1
    inst.enqueue(0, 1000.0, 10, 0.0)
    assert inst.admit_next(0.0, [1000.0])
    inst.retime(0.0, evq)
    step = ITL1 + 100 * PF
    assert inst.itl == pytest.approx(step)
    assert inst.power == pytest.approx((ITL1 * 420 + 100 * PF * 688) / step, rel=1e-6)
    assert inst.prefill_end == pytest.approx(10 * step)
    assert evq[-1][0] == pytest.approx(10 * step)  # before the decode completion at V = 50
    inst.settle(5 * step)
    token_clock = inst.V
    assert token_clock == pytest.approx(5.0)
    assert inst.pf_left == pytest.approx(500.0)


def test_chunked_prefill_by_hand_in_a_run():
    """A (1000 in, 100 out) at 0: alone, prefill 0 -> 0.05. B (1000 in, 2 out) arrives at
    0.05 + 2 steps of A: its prompt goes in 10 chunks of 100 (budget 101 - 1 decode token),
    10 mixed steps of 11.775 ms: B's first token at 0.06355 + 0.11775 = 0.1813, A at 12
    tokens after its first. B's last token: one step at b = 2, 0.1813 + 0.00685. A's last
    86 at b = 1: + 86 x 6.775 ms."""
    cl = cluster([("n", "H100", 1)])
    tb = 0.05 + 2 * ITL1
    wl = workload([0.0, tb], [1000, 1000], [100, 2], duration=2.0)
    r = _run(cl, wl, max_num_batched_tokens=101)
    b_first = tb + 10 * (ITL1 + 100 * PF)
    assert r.t_first == pytest.approx([0.05, b_first], abs=1e-9)
    assert r.t_done[1] == pytest.approx(b_first + ITL2, abs=1e-9)
    assert r.t_done[0] == pytest.approx(b_first + ITL2 + 86 * ITL1, abs=1e-8)
    # the default budget (8192) takes B's prompt in one step of 6.775 + 50 ms
    d = _run(cl, wl)
    assert d.t_first[1] == pytest.approx(tb + ITL1 + 1000 * PF, abs=1e-9)


def test_bad_engine_params_are_refused():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineParams(max_num_batched_tokens=0)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineParams(gpu_memory_utilization=1.5)


# ------------------------------------------------------------------ KV cache
def test_kv_admission_blocks_then_admits():
    """2000 tokens of KV (admission up to 1980, the 1 % watermark). A (1200 in, 100 out)
    is admitted; B (900 in) would bring the cache to 2100: it waits, the batch half empty,
    until A is done at 0.06 + 99 x 6.775 ms, then prefills alone (45 ms)."""
    cl = cluster([("n", "H100", 1)])
    wl = workload([0.0, 0.001], [1200, 900], [100, 10], duration=2.0)
    r = _run(cl, wl, gpu_memory_utilization=_utilisation_for(2000.0))
    a_done = 0.06 + 99 * ITL1
    assert r.t_done[0] == pytest.approx(a_done, abs=1e-9)
    assert r.t_first[1] == pytest.approx(a_done + 900 * PF, abs=1e-9)
    free = _run(cl, wl)  # 467k tokens: B is prefilled in A's next step
    assert free.t_first[1] == pytest.approx(0.06 + ITL1 + 900 * PF, abs=1e-9)
    assert r.preemptions == 0


def test_preemption_recomputes_the_request_admitted_last():
    """2000 tokens of KV. A (1000 in, 900 out) then B (899 in, 900 out), both at 0.
    A prefills 0 -> 0.05; B fits (1000 + 899 <= 1980) and is prefilled in A's next step
    (6.775 + 44.95 ms): first token at 0.101725, A at 1001 tokens. At b = 2 the cache
    (1001 + 899 = 1900) is full after 50 steps: B, admitted last, is preempted with 51
    tokens out; its recompute (899 + 51 = 950 tokens) does not fit beside A until A is
    done (848 tokens to go at b = 1); then B prefills 950 tokens and decodes its last 848."""
    cl = cluster([("n", "H100", 1)])
    wl = workload([0.0, 0.0], [1000, 899], [900, 900], duration=20.0)
    r = _run(cl, wl, gpu_memory_utilization=_utilisation_for(2000.0))
    b_first = 0.05 + ITL1 + 899 * PF
    preempt_at = b_first + 50 * ITL2
    a_done = preempt_at + 848 * ITL1
    assert r.preemptions == 1
    assert r.t_first == pytest.approx([0.05, b_first], abs=1e-9)  # TTFT kept from the first
    assert r.t_done[0] == pytest.approx(a_done, abs=1e-8)
    assert r.t_done[1] == pytest.approx(a_done + 950 * PF + 848 * ITL1, abs=1e-8)
    assert any("1 preemptions" in n for n in r.notes)
    # with room for both nobody is preempted and both decode at b = 2
    assert _run(cl, wl).preemptions == 0


# ------------------------------------------------------------------ context bound
def test_prompts_over_the_context_are_rejected_and_long_outputs_truncated():
    cl = cluster([("n", "H100", 1)])
    wl = workload([0.0, 1.0, 20.0], [140_000, 131_000, 100], [10, 500, 5], duration=60.0)
    r = _run(cl, wl)
    assert r.rejected == 1 and r.truncated == 1
    assert math.isnan(r.t_first[0]) and math.isnan(r.t_done[0])
    # the truncated one generates 131072 - 131000 = 72 tokens: 71 after its first
    assert r.t_done[1] - r.t_first[1] == pytest.approx(71 * ITL1, abs=1e-9)
    assert r.t_done[2] == pytest.approx(20.0 + 100 * PF + 4 * ITL1, abs=1e-9)
    assert any("1 requests had a prompt at or over" in n for n in r.notes)
    assert any("1 responses were cut" in n for n in r.notes)
    # the refused one leaves the system at once: Little's L counts only the served two
    served = [min(d, 60.0) - a for a, d in zip([0.0, 1.0, 20.0], r.t_done, strict=True)
              if not math.isnan(d)]
    assert r.little_l == pytest.approx(sum(served) / 60.0, rel=1e-9)
    off = _run(cl, wl, kv_cache=False)
    assert off.rejected == 0 and off.truncated == 0


def test_the_production_router_forgets_a_request_its_engine_refused():
    """Through the production router's own state machine: the refused prompt is released
    from its endpoint's ledger (the proxy's answer to the engine's 400), so no endpoint
    looks busier for a request it will never serve."""
    cl = cluster([("n", "H100", 1)])
    wl = workload([0.0, 20.0], [140_000, 100], [10, 5], duration=60.0)
    sim = Simulator(cl, wl, POLICIES["joulesched-router"], model_tables(cl), None,
                    EngineParams())
    r = sim.run()
    assert r.rejected == 1 and not math.isnan(r.t_done[1])
    assert r.little_l == pytest.approx((r.t_done[1] - 20.0) / 60.0, rel=1e-9)
    assert sim.prouter is not None and not sim.prouter.routed
    assert all(not e.ledger for e in sim.prouter.pool.endpoints)


# ------------------------------------------------------------------ start-up
def _plans(cls: int) -> list[WindowPlan]:
    def plan(start: float, node: str) -> WindowPlan:
        return WindowPlan(start, (PlannedInstances(node, "1xH100", cls, 1),), True, "optimal",
                          0.0, "J", 0.0, (0.0,) * 4, ())
    return [plan(0.0, "a"), plan(10.0, "b")]


def test_a_moved_instance_starts_late_and_its_start_up_energy_is_charged():
    """At 10 s the plan moves the instance from node a to node b: b's instance loads for
    8.03 + 20 s before serving; its GPU draws 8.03 s x 75 W + 20 s x 688 W meanwhile, not
    idle power. A request at 12 s finds no running instance anywhere and is dropped; one
    at 40 s is served by b."""
    cl = cluster([("a", "H100", 1), ("b", "H100", 1)])
    cls = int(ClassBoundaries().classify_many([100], [5])[0])
    wl = workload([12.0, 40.0], [100, 100], [5, 5], duration=60.0)
    planner = POLICIES["planner-only"]  # max clock: the two runs differ only by the start-up
    on = _run(cl, wl, planner, _plans(cls))
    off = _run(cl, wl, planner, _plans(cls), startup=False)
    start_s, _ = startup(H100_8B)
    assert on.startups == 1 and off.startups == 0
    assert math.isnan(on.t_done[0]) and not math.isnan(off.t_done[0])
    assert on.t_first[1] == pytest.approx(40.0 + 100 * PF, abs=1e-9)
    b = 1  # node b's GPU
    extra = (8.03 * 75.0 + 20.0 * 688.0) - start_s * 75.0  # over idling those seconds
    # ... less what serving the 12 s request (which `off` serves on b) drew above idle
    extra -= 100 * PF * (688.0 - 75.0) + 4 * ITL1 * (420.0 - 75.0)
    assert on.gpu_energy_j[b] - off.gpu_energy_j[b] == pytest.approx(extra, rel=1e-9)
    assert on.gpu_energy_j[0] == pytest.approx(off.gpu_energy_j[0], rel=1e-12)
