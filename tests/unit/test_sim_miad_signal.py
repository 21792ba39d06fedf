"""The simulator's MIAD reads what the engine's metrics would show, its inter-token-latency
histogram's sum and count, through core's miad_signal, the node agent's function
(docs/simulator.md "MIAD")."""

from __future__ import annotations

import numpy as np
import pytest
from sim_helpers import cluster

import joulepool.sim.engine as sim_engine
from joulepool.core.controllers import PeriodLatencies, SLOSignal, miad_signal
from joulepool.sim.engine import EngineParams, Simulator
from joulepool.sim.policies import POLICIES
from joulepool.sim.runner import model_tables
from joulepool.sim.workload import Workload

TPOT_S = 0.05


def _workload(n: int = 400, seed: int = 3, ttft: float = 2.0) -> Workload:
    """Poisson arrivals at ~8 req/s for 50 s, short and long prompts (mixed prefill steps),
    one class, interactive; TTFT ``ttft`` s, TPOT 50 ms."""
    rng = np.random.default_rng(seed)
    arrival = np.cumsum(rng.exponential(1 / 8.0, n))
    inp = np.where(rng.random(n) < 0.2, 6000, 200).astype(np.int64)
    out = rng.integers(1, 300, n).astype(np.int64)
    return Workload(
        arrival_s=arrival, input_tokens=inp, output_tokens=out, predicted_tokens=out.copy(),
        category=np.zeros(n, dtype=np.int64), bulk=np.zeros(n, dtype=np.bool_),
        cls=np.zeros(n, dtype=np.int64), ttft_slo_s=np.full(n, ttft),
        tpot_slo_s=np.full(n, TPOT_S), deadline_s=ttft + out * TPOT_S * 10.0,
        duration_s=float(arrival[-1]), scale=1.0)


def _run(params: EngineParams, monkeypatch: pytest.MonkeyPatch
         ) -> tuple[Simulator, Workload, list[tuple[PeriodLatencies, SLOSignal]]]:
    """A one-H100 miad-only run (KV cache off: no preemption) with every MIAD read kept."""
    seen: list[tuple[PeriodLatencies, SLOSignal]] = []
    def spy(period: PeriodLatencies) -> SLOSignal:
        sig = miad_signal(period)
        seen.append((period, sig))
        return sig

    monkeypatch.setattr(sim_engine, "miad_signal", spy)
    one = cluster([("n", "H100", 1)])
    wl = _workload()
    sim = Simulator(one, wl, POLICIES["miad-only"], model_tables(one), params=params)
    sim.run()
    return sim, wl, seen


def test_the_simulated_itl_histogram_counts_every_gap_of_every_request(monkeypatch):
    """Summed over a run, the instance's ITL histogram holds each request's gaps: its sum
    is the time from each request's first token to its last, its count the output tokens
    after the first (an exact identity; a mean step unweighted by batch breaks it), and
    MIAD read it period by period through core's miad_signal."""
    sim, wl, seen = _run(EngineParams(kv_cache=False), monkeypatch)
    (inst,) = [i for i in sim.instances if i.itl_count > 0]
    req = sim.req
    out = wl.output_tokens
    t_first, t_done = np.asarray(req.t_first), np.asarray(req.t_done)
    assert not np.isnan(t_done).any()  # all served
    many = out > 1
    assert inst.itl_count == pytest.approx(float((out[many] - 1).sum()))
    assert inst.itl_sum == pytest.approx(float((t_done - t_first)[many].sum()), rel=1e-9)
    # MIAD's reads are the histogram's increments (in TPOT SLOs), nothing counted twice
    read_sum = sum(p.itl_sum for p, _ in seen) * TPOT_S
    read_count = sum(p.itl_count for p, _ in seen)
    assert read_count == pytest.approx(inst.miad_itl_count)
    assert read_sum == pytest.approx(inst.miad_itl_sum, rel=1e-9)
    assert read_count > 0.9 * inst.itl_count  # most of the run was read before it drained
    # the TPOT MIAD stepped on is the period's mean ITL (in TPOT SLOs)
    steps = [(p, sig) for p, sig in seen if p.itl_count > 0]
    assert steps and all(sig.mean_itl_s == pytest.approx(p.itl_sum / p.itl_count)
                         for p, sig in steps)


def test_the_prefill_floor_follows_the_batch_the_prompt_would_share_steps_with():
    """MIAD's clock floor is the node agent's: the lowest clock at which the pool's
    quantile prompt gets its first token (core.batching.unqueued_first_token_s: the step
    in progress, then mixed steps beside the batch) within 0.9 x TTFT; a bigger batch
    needs a higher clock."""
    from joulepool.core.batching import unqueued_first_token_s
    from joulepool.core.controllers import prefill_clock_floor, prefill_floor_quantile

    one = cluster([("n", "H100", 1)])
    wl = _workload(n=40, ttft=0.5)
    sim = Simulator(one, wl, POLICIES["miad-only"], model_tables(one))
    sim.run()
    inst = sim.instances[0]
    tab = inst.table
    prompt = float(np.quantile(wl.input_tokens, prefill_floor_quantile()))
    floors = []
    for b in (0, 8, 64):
        inst.b = b
        want = prefill_clock_floor(
            lambda f, b=b: unqueued_first_token_s(
                inst.budget, b, prompt, tab.itl_s[tab.clocks.index(f)][b],
                tab.prefill_s_per_token[tab.clocks.index(f)]),
            tab.clocks, 0.5, 0.1)
        assert sim._clock_floor(inst) == want
        floors.append(want)
    assert tab.clocks[0] < floors[0] <= floors[1] <= floors[2]
    assert floors[0] < floors[2]
