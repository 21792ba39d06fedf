"""core.routing's first-token prediction: by hand, against core.batching, and against
the simulated engine it predicts (the SLO guard of the marginal-energy rule)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sim_helpers import cluster

from joulepool.core.batching import prefill_time_s
from joulepool.core.routing import first_token_s, prefill_queue
from joulepool.sim.engine import Simulator
from joulepool.sim.policies import POLICIES
from joulepool.sim.runner import model_tables, static_capacity
from joulepool.sim.trace import load_trace
from joulepool.sim.workload import Workload, build_workload

#: decode step by batch 0..4 (index 0 unused), s; prefill 0.1 ms per token; budget 100
ITL = [0.01, 0.01, 0.02, 0.03, 0.04]
PF, BUDGET = 1e-4, 100.0


def test_an_idle_engine_serves_the_first_token_after_the_prompt_alone() -> None:
    wait, step, chunk = prefill_queue(ITL, PF, BUDGET, 0, 0, 0)
    assert (wait, step, chunk) == (0.0, 0.0, BUDGET)
    assert float(first_token_s(wait, step, chunk, PF, 50)) == pytest.approx(0.005)


def test_every_prompt_ahead_pays_its_steps_decode_time() -> None:
    # 2 running, 2 waiting with 300 prompt tokens: while they prefill the batch is 3
    # (2 + half the queue), 97 prompt tokens per step: 300 / 97 steps of 30 ms plus
    # their 30 ms of prefill; the request's own prefill then runs beside a batch of 4
    wait, step, chunk = prefill_queue(ITL, PF, BUDGET, 2, 2, 300)
    assert wait == pytest.approx(300 / 97 * 0.03 + 300 * PF)
    assert (step, chunk) == (0.04, 96.0)
    # two short prompts still take a step each
    wait, _, _ = prefill_queue(ITL, PF, BUDGET, 2, 2, 20)
    assert wait == pytest.approx(2 * 0.03 + 20 * PF)
    # the running prefill's remainder comes first
    assert prefill_queue(ITL, PF, BUDGET, 2, 0, 0, prefill_left_s=0.2)[0] == 0.2


def test_no_batch_slot_waits_for_completions() -> None:
    # 4 running of 4: one completion needed, at 100 tokens per request and 4 per step
    wait, _, _ = prefill_queue(ITL, PF, BUDGET, 4, 0, 0, mean_output_tokens=100)
    assert wait == pytest.approx(100 * 0.04 / 4)
    # counts an engine does not report (NaN) are none
    assert prefill_queue(ITL, PF, BUDGET, math.nan, math.nan, math.nan)[0] == 0.0


@pytest.mark.parametrize("batch", [0, 1, 3, 4])
@pytest.mark.parametrize("prompt", [1.0, 60.0, 250.0])
def test_own_prefill_is_core_batchings_prefill_time(batch: int, prompt: float) -> None:
    _, step, chunk = prefill_queue(ITL, PF, BUDGET, batch, 0, 0)
    assert float(first_token_s(0.0, step, chunk, PF, prompt)) == pytest.approx(
        prefill_time_s(BUDGET, batch, prompt, ITL[batch] if batch else 0.0, PF))


def mixed_cluster_sim(policy: str, load: float) -> tuple[Simulator, Workload]:
    """A simulator of ``policy`` on 2 H100, 4 A100 and 2 L4 (one static instance each),
    fed 120 s of the bundled trace at ``load`` x the static deployment's capacity at the
    trace's mean request (seed 1), and its workload."""
    cl = cluster([("h", "H100", 2), ("a", "A100", 4), ("l", "L4", 2)])
    tables = model_tables(cl)
    cap = static_capacity(cl, 1150.0, 210.0, tables)
    total = sum(cap.per_mode_rps[f"1x{p}"] * n for p, n in (("H100", 2), ("A100", 4),
                                                           ("L4", 2)))
    wl = build_workload(load_trace(), 120.0, mode="rate", value=load * total, seed=1)
    return Simulator(cl, wl, POLICIES[policy], tables,
                     static_capacity_rps=cap.per_mode_rps), wl


def test_the_engine_serves_the_first_token_no_later_than_predicted(monkeypatch) -> None:
    """JouleSched on a small mixed cluster at half its capacity: every request whose
    predicted first token kept the TTFT SLO met it; the prediction is an upper bound
    (the running prefill is taken as of the last event) but rarely a loose one."""
    sim, wl = mixed_cluster_sim("joulesched", 0.5)
    pick = Simulator._pick_instance
    predicted: list[float] = []

    def recording_pick(self, rid, t):  # type: ignore[no-untyped-def]
        inst = pick(self, rid, t)  # the first token predicted where it went
        st, i = self.pools[inst.pool].state, inst.pos
        predicted.append(float(first_token_s(
            st.prefill_wait_s[i], st.prefill_step_s[i], st.prefill_chunk_tokens[i],
            st.prefill_s_per_token[i], self.req.input[rid])))
        return inst

    monkeypatch.setattr(Simulator, "_pick_instance", recording_pick)
    result = sim.run()
    pred = np.asarray(predicted)
    actual = result.t_first - wl.arrival_s
    on_time = pred <= wl.ttft_slo_s
    assert on_time.mean() > 0.99
    assert np.all(actual[on_time] <= wl.ttft_slo_s[on_time])
    assert np.mean(actual > pred + 1e-3) < 0.01  # rarely later than predicted
    assert np.median((pred - actual) / actual) < 0.1  # and mostly close
