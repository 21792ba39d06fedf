"""The simulator's state objects: one instance's admission, timing and energy; the GPU
ledger's conservation; the order of marks the engine relies on."""

from __future__ import annotations

import pytest
from sim_helpers import cluster

from joulepool.core.controllers import PeriodLatencies
from joulepool.core.profiles import H100_8B
from joulepool.sim.engine import Mark
from joulepool.sim.instance import Instance, InstanceState
from joulepool.sim.ledger import GPULedger
from joulepool.sim.tables import build_table

TABLE = build_table(H100_8B, 0.15)
INPUT = [1000.0, 500.0, 200.0]


def _instance(llf: bool = False) -> Instance:
    return Instance(0, TABLE, "n", "s1", 0, llf, 1.0, False)


def test_admission_rule_one_prefill_at_a_time_fcfs():
    inst = _instance()
    assert not inst.admit_next(0.0, INPUT)  # nobody waits
    inst.enqueue(0, INPUT[0], 10, 0.0)
    inst.enqueue(1, INPUT[1], 5, 0.0)
    assert inst.admit_next(0.0, INPUT)
    assert inst.prefill_rid == 0 and inst.nwait == 1
    assert inst.prefill_end == pytest.approx(TABLE.prefill_s_per_token[TABLE.top] * 1000.0)
    assert inst.wait_in == pytest.approx(500.0)  # only request 1's prompt still waits
    assert not inst.admit_next(0.01, INPUT)  # a prefill is running
    inst.prefill_rid = -1
    inst.b = inst.maxb
    assert not inst.admit_next(0.01, INPUT)  # the batch is full
    inst.b = 0
    assert inst.admit_next(0.05, INPUT) and inst.prefill_rid == 1


def test_retime_makes_earlier_events_stale_and_times_the_next_one():
    inst = _instance()
    evq: list[tuple[float, int, int]] = []
    inst.enqueue(0, INPUT[0], 10, 0.0)
    inst.admit_next(0.0, INPUT)
    inst.retime(0.0, evq)
    assert evq == [(inst.prefill_end, 0, inst.version)]
    assert inst.power == TABLE.prefill_power_w[TABLE.top] and inst.itl == 0.0
    first = inst.version
    # the prefill ends; the request decodes 9 more tokens at batch 1
    inst.settle(inst.prefill_end)
    t = inst.prefill_end
    inst.prefill_rid = -1
    inst.heap.append((inst.V + 9, 0))
    inst.b = 1
    inst.retime(t, evq)
    assert inst.version == first + 1  # the prefill-end event in evq is now stale
    itl = TABLE.itl_s[TABLE.top][1]
    assert evq[-1] == (pytest.approx(t + 9 * itl), 0, inst.version)
    assert inst.power == TABLE.power_w[TABLE.top][1]


def test_settle_integrates_energy_busy_time_and_token_clock():
    inst = _instance()
    evq: list[tuple[float, int, int]] = []
    inst.heap.append((5.0, 7))
    inst.b = 1
    inst.retime(0.0, evq)
    inst.settle(2 * inst.itl)
    token_clock = inst.V
    assert token_clock == pytest.approx(2.0)
    assert inst.busy_t == pytest.approx(2 * inst.itl)
    assert inst.energy == pytest.approx(TABLE.power_w[TABLE.top][1] * 2 * inst.itl)
    inst.settle(5 * inst.itl)
    assert inst.pop_finished() == [7] and inst.b == 0


def test_ledger_conserves_energy_when_gpus_change_hands():
    cl = cluster([("n", "H100", 2)])
    gpus = GPULedger(cl)
    idle = gpus.idle[0]
    two = Instance(0, build_table(H100_8B, 0.15), "n", "s1", 0, False, 1.0, False)
    two.gpus = 2
    assert gpus.take(two, 10.0) == (0, 1)
    two.gpu_ids = (0, 1)
    two.state = InstanceState.ACTIVE
    two.last_t = 10.0
    assert gpus.take(two, 10.0) is None  # no GPU left on the node
    two.power = 300.0
    two.settle(20.0)
    gpus.give_back(two, 20.0)
    # 10 s idle each, then half of the instance's 3000 J each, then idle again
    for g in (0, 1):
        assert gpus.cumulative_j(g, 30.0) == pytest.approx(idle * 10 + 1500.0 + idle * 10)
    assert gpus.node_free["n"] == [0, 1]


def test_marks_at_equal_times_run_carbon_step_then_plan_then_window_end():
    marks = sorted([(60.0, Mark.WINDOW_END), (60.0, Mark.PLAN_WINDOW), (60.0, Mark.CARBON_STEP)])
    assert [k for _, k in marks] == [Mark.CARBON_STEP, Mark.PLAN_WINDOW, Mark.WINDOW_END]


@pytest.mark.parametrize("eps_live", [False, True])
def test_marginal_eps_table_is_core_rule_at_every_load_and_clock(eps_live: bool):
    """The instance reads eps_n from a table by requests in flight; it is core's
    marginal_decode_j_per_token at every load (past b*_n too), clock and b*_n."""
    from joulepool.core.routing import marginal_decode_j_per_token

    inst = Instance(0, TABLE, "n", "s1", 0, False, 1.0, eps_live)
    for ci in (0, len(TABLE.clocks) // 2, TABLE.top):
        inst.set_clock(ci)
        xs = TABLE.excess_step_j[ci if eps_live else TABLE.top]
        for carry in (1, 7, TABLE.max_batch):
            inst.set_carry(carry)
            for k in range(0, carry + 5):
                inst.n_out = k
                assert inst.marginal_eps() == marginal_decode_j_per_token(xs, k, carry)


def _period_mean_itl(inst: Instance, t: float) -> float:
    """The period's mean ITL from the increments of the ITL histogram's sum and count
    (core.controllers.PeriodLatencies, as the node agent reads them); -1 when none."""
    itl_sum, itl_count = inst.period_itl(t)
    mean = PeriodLatencies(itl_sum=itl_sum, itl_count=itl_count).mean_itl
    return -1.0 if mean is None else mean


def test_period_itl_is_the_mean_step_every_decoding_request_saw():
    """MIAD's TPOT signal: the ITL histogram's sum over its count since the last call,
    a long mixed prefill step counted for its share, not for the whole period."""
    inst = _instance()
    inst.b, inst.itl = 10, 0.02  # decoding: a token per 20 ms
    inst.settle(1.0)  # 50 steps
    inst.prefill_rid, inst.itl, inst.pf_rate = 7, 0.2, 1000.0  # one 200-ms mixed step
    inst.settle(1.2)
    assert _period_mean_itl(inst, 1.2) == pytest.approx(1.2 / 51)
    inst.prefill_rid, inst.b, inst.itl = -1, 0, 0.0  # idle: nothing decoded since
    assert _period_mean_itl(inst, 2.0) == -1.0
    inst.b, inst.itl = 3, 0.01
    assert _period_mean_itl(inst, 2.5) == pytest.approx(0.01)  # settles to the call's time


def test_period_itl_weighs_each_step_by_the_requests_it_gave_a_token():
    """The engine's ITL histogram gets one gap per decoding request and step: a step of
    a bigger batch counts more (the plain mean step would be (10 x 0.01 + 10 x 0.05) / 20
    = 0.03 s; the histogram's mean is (100 x 0.01 + 10 x 0.05) / 110)."""
    inst = _instance()
    inst.b, inst.itl = 10, 0.01  # 10 steps of 10 requests
    inst.settle(0.1)
    inst.b, inst.itl = 1, 0.05  # 10 steps of 1 request
    inst.settle(0.6)
    itl_sum, itl_count = inst.period_itl(0.6)
    assert itl_count == pytest.approx(110.0) and itl_sum == pytest.approx(1.5)
    assert _period_mean_itl(inst, 0.6) == -1.0  # nothing since


def test_clock_index_is_the_clocks_index() -> None:
    """MIAD moves an instance to a clock by its index: the table's dict answers as
    ``clocks.index`` does, and refuses a clock it does not have."""
    for ci, f in enumerate(TABLE.clocks):
        assert TABLE.clock_index(f) == TABLE.clocks.index(f) == ci
    with pytest.raises(ValueError, match="not a clock"):
        TABLE.clock_index(TABLE.clocks[0] - 1.0)
