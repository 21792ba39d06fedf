"""The simulator's candidate search names the endpoint the JouleSched rule picks.

``sim/candidates.py`` scores a few endpoints of a pool, one at a time, and skips the
rest by a lower bound of their cost; it must name exactly the endpoint the routing
profile (``core.scoring``, every endpoint scored) puts first, or decline. Pools here
are random, with the cases that break naive shortcuts: equal rows (idle instances),
cost and ETA ties, no batch room, every endpoint late, NaN and infinite numbers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from joulepool.core.scoring import EndpointState, RequestInfo, routing_profile
from joulepool.sim.candidates import CandidateIndex, _search_regular

#: EndpointState column of each Row field, in Row's order
COLUMNS = ("eps_j_per_token", "prefill_j_per_token", "wake_j_per_token",
           "batch_left_tokens", "queue_tokens", "tps", "prefill_weight", "prefill_wait_s",
           "prefill_step_s", "prefill_chunk_tokens", "prefill_s_per_token", "batch_room")


def _row(rng: np.random.Generator, odd: float) -> tuple[float, ...]:
    """A pool row from few distinct values (so rows and costs tie), a share ``odd`` of
    its numbers replaced by NaN, inf, 0 or -1."""
    idle = rng.random() < 0.3
    kind = int(rng.integers(0, 3))  # the instance type: its energy numbers and rates
    row = [
        (0.3, 0.05, 0.02)[kind] * (1.0 if idle else float(rng.choice([0.2, 0.5, 0.7]))),
        (0.004, 0.006, 0.009)[kind],
        (0.3, 0.05, 0.02)[kind],
        0.0 if idle else float(rng.choice([5.0, 80.0, 300.0, math.inf])),
        0.0 if idle else float(rng.choice([100.0, 900.0, 2500.0])),
        (900.0, 1500.0, 400.0)[kind],
        (0.05, 0.03, 0.1)[kind],
        0.0 if idle else float(rng.choice([0.0, 0.05, 0.3])),
        0.0 if idle else float(rng.choice([0.01, 0.03])),
        8192.0 - (0.0 if idle else float(rng.choice([4.0, 30.0]))),
        (4e-5, 2e-5, 1e-4)[kind],
        float(rng.choice([1.0, 3.0, 0.0, -1.0])) if not idle else 8.0,
    ]
    for i in range(len(row)):
        if rng.random() < odd:
            row[i] = float(rng.choice([math.nan, math.inf, 0.0, -1.0]))
    return tuple(row)


def _overflow(rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
    """Random overflow_rank inputs of ``n`` endpoints: (outstanding requests, TPOT batch,
    1 / capacity), columns not in the index's rows (the first two are put with them)."""
    return (rng.choice([0.0, 3.0, 8.0, 40.0], n), rng.choice([4.0, 9.0, 50.0, math.inf], n),
            rng.choice([0.1, 0.25, 1.0], n))


def _state(rows: list[tuple[float, ...]],
           overflow: tuple[np.ndarray, ...] | None = None) -> EndpointState:
    """The rows' columns; with ``overflow`` (:func:`_overflow`) also the outstanding
    requests, TPOT batch and 1 / capacity."""
    st = EndpointState(len(rows))
    for j, name in enumerate(COLUMNS):
        getattr(st, name)[:] = [r[j] for r in rows]
    if overflow is not None:
        st.outstanding[:], st.tpot_batch[:], st.inv_capacity[:] = overflow
    return st


def _request(rng: np.random.Generator) -> RequestInfo:
    out = float(rng.choice([1.0, 40.0, 300.0]))
    return RequestInfo(out, float(rng.choice([0.0, 200.0, 2000.0])), out,
                       float(rng.choice([0.5, 5.0, 60.0])),
                       float(rng.choice([0.0, 2.0, 40.0, math.inf, -1.0])), False,
                       float(rng.choice([0.1, 0.3, 0.6])))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
@pytest.mark.parametrize("odd", [0.0, 0.03])
def test_candidate_search_names_the_rules_first_choice(odd: float) -> None:
    rng = np.random.default_rng(11 + int(odd * 100))
    answered = 0
    trials = 300
    for _ in range(trials):
        n = int(rng.integers(1, 40))
        index = CandidateIndex()
        rows = [_row(rng, odd) for _ in range(n)]
        overflow = _overflow(rng, n)
        outstanding, tpot_batch = overflow[0].tolist(), overflow[1].tolist()
        for pos in rng.permutation(n).tolist():  # rows written in any order, some rewritten
            if rng.random() < 0.3:  # a stale row and load first
                stale_out, stale_tpot, _ = _overflow(rng, 1)
                index.put(pos, _row(rng, odd), float(stale_out[0]), float(stale_tpot[0]))
            index.put(pos, rows[pos], outstanding[pos], tpot_batch[pos])
        st = _state(rows, overflow)
        profile = routing_profile("joulesched")
        for _ in range(5):
            r = _request(rng)
            fast = index.best(r, lambda st=st: st)
            if fast is None:
                continue
            answered += 1
            assert fast == profile.pick(r, st)[0][0], (rows, r)
    if odd == 0.0:  # it declines only where the rule has no plain answer
        assert answered > 0.5 * 5 * trials


def _late_row(rng: np.random.Generator) -> tuple[float, ...]:
    """A busy pool row whose first-token inputs (prefill wait, step, chunk, s per prompt
    token) come from few values, some a rounding error apart, so that first tokens tie
    exactly and the bound (wait + step) + pi_s x l ties with them."""
    row = list(_row(rng, 0.0))
    if rng.random() < 0.5:  # q_n a rounding error apart: equal ETAs at unequal q_n
        row[4] = float(rng.choice([900.0, 900.0 + 1e-13, 900.0 - 1e-13]))
    row[7] = float(rng.choice([0.0, 1e-18, 0.05, 0.05 + 1e-17, 0.3])) if rng.random() < 0.7 \
        else float(rng.random()) * 0.3
    row[8] = float(rng.choice([0.0, 0.01, 0.03]))
    row[9] = float(rng.choice([8188.0, 8162.0, 512.0, 1.0]))
    row[10] = float(rng.choice([4e-5, 2e-5, 1e-4, 0.0]))
    return tuple(row)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize(("odd", "guests"), [(0.0, 0.0), (0.05, 0.0), (0.0, 0.3), (0.05, 0.5)])
def test_nobody_on_time_goes_to_the_soonest_first_token_as_the_rule_sends_it(
        odd: float, guests: float) -> None:
    """With every endpoint late, the index's soonest search (the endpoints within their
    TPOT batch by a lower bound of their first token, then each tie by q_n) names the
    rule's choice, ties of first token and ETA included (equal ETAs at unequal q_n too),
    and reads the pool's columns only when no endpoint is within its TPOT batch or a
    row's first-token or ETA inputs are irregular, or (with a share of ``guests``:
    shared instances whose other classes' TTFT, ``shared_ttft_s``, may be tighter than
    the request's, which the rule ranks after the rest) when its answer is one of them."""
    rng = np.random.default_rng(23 + int(odd * 100) + int(guests * 10))
    answered = read = 0
    trials = 250
    for _ in range(trials):
        n = int(rng.integers(1, 60))
        rows = [_late_row(rng) for _ in range(n)]
        for row_no in range(n):  # a share of irregular first-token or ETA inputs
            if rng.random() < odd:
                field = int(rng.integers(4, 11))
                value = float(rng.choice([math.nan, math.inf, -1.0, 0.5]))
                rows[row_no] = (*rows[row_no][:field], value, *rows[row_no][field + 1:])
        overflow = _overflow(rng, n)
        if rng.random() < 0.1:  # nobody within the TPOT batch: least-loaded's score
            overflow[1][:] = 0.0
        index = CandidateIndex()
        guest = rng.random(n) < guests
        shared = np.where(guest, rng.choice([-2.0, 1e-10, 0.5], n), math.inf)
        index.shared_ttft = {pos: float(v) for pos, v in enumerate(shared) if v < math.inf}
        for pos in rng.permutation(n).tolist():
            if rng.random() < 0.3:
                index.put(pos, _late_row(rng), 0.0, math.inf)  # stale, within
            index.put(pos, rows[pos], float(overflow[0][pos]), float(overflow[1][pos]))
        st = _state(rows, overflow)
        st.shared_ttft_s[:] = shared
        regular = all(1.0 <= r[9] < math.inf and 0.0 <= r[8] < math.inf and
                      math.isfinite(r[7]) and 0.0 <= r[10] < math.inf and
                      math.isfinite(r[4]) and math.isfinite(r[6]) and 0.0 < r[5] < math.inf
                      for r in rows)
        within = bool((overflow[0] + 1.0 <= overflow[1]).any())
        profile = routing_profile("joulesched")
        for _ in range(4):
            out = float(rng.choice([1.0, 40.0, 300.0]))
            r = RequestInfo(out, float(rng.choice([0.0, 1.0, 200.0, 2000.0, 9000.0])), out,
                            float(rng.choice([0.5, 5.0, 60.0])),
                            float(rng.choice([0.0, 2.0, 40.0])), False,
                            float(rng.choice([-1.0, 1e-9])))  # every endpoint late
            reads = []
            fast = index.best(r, lambda st=st, reads=reads: reads.append(1) or st)
            read += bool(reads)
            assert not reads or not (within and regular) or guest.any(), \
                "columns read needlessly"
            if fast is None:
                continue
            answered += 1
            ranked, scores = profile.pick(r, st)
            assert fast == ranked[0], (rows, overflow, r)
            assert scores.late is not None
            tighter = shared < r.ttft_slo_s
            if tighter[fast] and scores.late.all():  # late everywhere: there only when no
                fits = overflow[0] + 1.0 <= overflow[1]  # other row serves in its TPOT group
                before = ~tighter & np.isfinite(scores.cost) & (fits | ~fits[fast])
                assert not before.any()
    if odd == 0.0 and guests == 0.0:
        assert answered > 0.8 * 4 * trials
        assert read < 0.2 * 4 * trials


def test_a_negative_prefill_step_is_left_to_the_columns() -> None:
    """The soonest search's bound needs step >= 0 (then max(1, l / chunk) x step >=
    step). With a negative step a later row in bound order can come first: the index
    reads the columns instead, and answers as the rule does."""
    busy = (0.01, 0.004, 0.3, 100.0, 900.0, 1000.0, 0.04, 0.5, 0.02, 8000.0, 4e-5, 1.0)
    one_step = (*busy[:8], -1.0, 8000.0, *busy[10:])  # 100 tokens: one step, 0.5 - 1
    many_steps = (*busy[:8], -0.02, 1.0, *busy[10:])  # 100 steps: 0.5 - 2, bound 0.48
    rows = [busy, one_step, many_steps]
    index = CandidateIndex()
    for pos, row in enumerate(rows):
        index.put(pos, row)
    r = RequestInfo(50.0, 100.0, 50.0, 30.0, 5.0, False, -10.0)  # nobody on time
    read = []
    assert index.best(r, lambda: read.append(1) or _state(rows)) == 2
    assert read and routing_profile("joulesched").pick(r, _state(rows))[0][0] == 2


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
def test_equal_first_tokens_go_to_the_earliest_eta_then_the_lowest_position() -> None:
    """Among rows tied at the soonest first token the index takes the lowest ETA, then
    the lowest position, as the rule does: an ETA that rounds equal at a larger q_n
    wins by position, a row whose cost is infinite never wins, and a row with
    irregular ETA inputs (throughput 0 or negative, q_n NaN) leaves the choice to the
    columns."""
    busy = (0.01, 0.004, 0.3, 100.0, 1000.0, 1000.0, 0.04, 0.2, 0.02, 8000.0, 4e-5, 0.0)
    more = math.nextafter(1000.0, math.inf) * 1.0000000001  # a larger q_n ...
    rows = [(*busy[:4], more, *busy[5:]), busy, (*busy[:4], 1500.0, *busy[5:]), busy]
    # ... whose ETA rounds equal to q_n = 1000's for 2**30 tokens: position 0 wins
    r = RequestInfo(2.0**30, 0.0, 2.0**30, 30.0, 5.0, False, 1e-9)
    assert (1000.0 + r.tokens) / 1000.0 == (more + r.tokens) / 1000.0

    def best() -> tuple[int | None, bool]:
        """(the index's answer, whether it read the columns)"""
        index = CandidateIndex()
        for pos, row in enumerate(rows):
            index.put(pos, row)
        read: list[int] = []
        got = index.best(r, lambda: read.append(1) or _state(rows))
        assert got is None or got == routing_profile("joulesched").pick(r, _state(rows))[0][0]
        return got, bool(read)

    assert best() == (0, False)
    rows[0] = (math.inf, *rows[0][1:])  # position 0 cannot serve: the next ETA
    assert best() == (1, False)
    for mu in (0.0, -1000.0):  # no throughput: left to the columns
        rows[1] = (*busy[:5], mu, *busy[6:])
        assert best() == (3, True)
    rows[1] = (*busy[:4], math.nan, *busy[5:])  # q_n NaN: the columns, which decline
    assert best() == (None, True)


def test_rows_leave_the_index_when_rewritten() -> None:
    """An endpoint whose row changes is scored by its new row only; one with no batch
    room is never the answer while another keeps the SLO; equal rows answer with the
    lowest position; with nobody on time, the soonest first token."""
    index = CandidateIndex()
    cheap = (0.01, 0.004, 0.3, 100.0, 0.0, 1000.0, 0.04, 0.0, 0.02, 8000.0, 4e-5, 3.0)
    idle = (0.3, 0.004, 0.3, 0.0, 0.0, 1000.0, 0.04, 0.0, 0.0, 8192.0, 4e-5, 8.0)
    busy = (0.01, 0.004, 0.3, 100.0, 900.0, 1000.0, 0.04, 0.2, 0.02, 8000.0, 4e-5, 0.0)
    rows = [busy] * 10

    def put(pos: int, row: tuple[float, ...]) -> None:
        rows[pos] = row
        index.put(pos, row)

    def best(r: RequestInfo) -> int | None:
        got = index.best(r, lambda: _state(rows))
        assert got is None or got == routing_profile("joulesched").pick(r, _state(rows))[0][0]
        return got

    r = RequestInfo(50.0, 500.0, 50.0, 30.0, 5.0, False, 0.5)
    for pos in range(10):
        put(pos, busy)
    for pos in (4, 2, 7):
        put(pos, idle)
    assert best(r) == 2
    put(5, cheap)
    assert best(r) == 5
    put(5, (*cheap[:11], 0.0))  # its batch is full now
    assert best(r) == 2
    put(2, cheap)
    assert best(r) == 2
    put(2, idle)
    put(2, idle)  # rewritten with the same row: still once
    assert best(r) == 2
    assert index.groups[(0.3, 0.004, 0.3)][idle] == (idle, [2, 4, 7])  # held once
    late = RequestInfo(50.0, 500.0, 50.0, 30.0, 5.0, False, 0.001)
    assert best(late) == 2  # nobody keeps the SLO: the soonest first token (idle ones tie)
    put(9, (math.nan, *idle[1:]))
    assert best(r) is None  # a row outside the bound's assumptions
    put(9, idle)
    assert best(r) == 2
    for pos in (2, 4, 5, 7, 9):
        put(pos, busy)
    put(6, (*busy[:7], 0.1, *busy[8:]))  # the shortest prefill queue
    assert best(r) == 6  # every batch full: the soonest first token
    assert index.groups == {}


@pytest.mark.parametrize("policy", ["joulesched", "combined"])
def test_runs_with_and_without_the_search_are_identical(policy: str, monkeypatch) -> None:
    """A whole run routes every request where scoring every endpoint would: the same
    first tokens, completions, instances and energy, bit for bit."""
    from sim_helpers import cluster

    from joulepool.sim.engine import simulate
    from joulepool.sim.planning import plan_windows
    from joulepool.sim.policies import POLICIES
    from joulepool.sim.runner import model_tables, static_capacity
    from joulepool.sim.trace import load_trace
    from joulepool.sim.workload import build_workload

    cl = cluster([("h", "H100", 4), ("a", "A100", 4), ("l", "L4", 2)])
    tables = model_tables(cl)
    cap = static_capacity(cl, 1150.0, 210.0, tables)
    wl = build_workload(load_trace(), 90.0, mode="rate", value=25.0, seed=2)
    plans = plan_windows(cl, wl) if POLICIES[policy].uses_planner else None

    def run():
        return simulate(cl, wl, POLICIES[policy], tables, plans,
                        static_capacity_rps=cap.per_mode_rps)

    answers = []
    best = CandidateIndex.best

    def counted(self, r, endpoints):
        answers.append(best(self, r, endpoints))
        return answers[-1]

    monkeypatch.setattr(CandidateIndex, "best", counted)
    fast = run()
    monkeypatch.setattr(CandidateIndex, "best", lambda self, r, endpoints: None)
    full = run()
    for name in ("t_first", "t_done", "instance_product", "gpu_energy_j", "gpu_busy_s"):
        np.testing.assert_array_equal(getattr(fast, name), getattr(full, name), err_msg=name)
    assert sum(a is not None for a in answers) > 0.5 * len(answers) > 0


def test_only_the_profile_it_answers_for_gets_an_index() -> None:
    from joulepool.core.scoring import LeastLoadedScorer
    from joulepool.sim.instance import Pool

    assert CandidateIndex.serves(routing_profile("joulesched"))
    assert not CandidateIndex.serves(routing_profile("least-loaded"))
    mixed = routing_profile("joulesched")
    mixed.scorers = (*mixed.scorers, (LeastLoadedScorer(), 0.5))
    assert not CandidateIndex.serves(mixed)
    with pytest.raises(ValueError, match="candidate index"):
        Pool([], mixed, indexed=True)
    assert Pool([], routing_profile("least-loaded")).index is None


def test_regular_rows_are_the_ones_the_soonest_search_assumes() -> None:
    """_search_regular (one finite sum for seven finiteness checks) against the
    assumptions written out, on rows mixing NaN, infinities, negatives and zeros."""
    rng = np.random.default_rng(11)
    values = [math.nan, math.inf, -math.inf, -1.0, 0.0, 0.5, 1.0, 3.0, 1e300]
    for _ in range(20_000):
        row = tuple(float(rng.choice(values)) for _ in range(12))
        q, mu, w, wait, step, chunk, pf_s = row[4:11]
        finite = all(math.isfinite(x) for x in (q, mu, w, wait, step, chunk, pf_s))
        expected = finite and step >= 0.0 and chunk >= 1.0 and pf_s >= 0.0 and mu > 0.0
        got = _search_regular(row)  # type: ignore[arg-type]
        overflow = finite and not math.isfinite(q + mu + w + wait + step + chunk + pf_s)
        # a finite row whose sum overflows is only ever sent to the full rule
        assert got == (expected and not overflow)


def _structure(index: CandidateIndex) -> tuple[object, ...]:
    """What an index holds, comparable between two indexes: its energy groups (each
    entry's row and positions), each position's placement kind and row, the soonest
    search's groups and counts (brought up to date first)."""
    index._refresh_firsts()
    groups = {key: {entry_key: (row, list(same)) for entry_key, (row, same) in group.items()}
              for key, group in index.groups.items()}
    kinds = {pos: (("group", old[1], old[2]) if type(old) is tuple else old)
             for pos, old in index.placed.items()}
    firsts = {pf_s: (list(ties), {tie: list(same) for tie, same in members.items()})
              for pf_s, (ties, members) in index.firsts.items()}
    first_kinds = {pos: (placed[:3] if type(placed) is tuple else placed)
                   for pos, placed in index.first_placed.items()}
    return (groups, kinds, dict(index.rows), index.odd, firsts, first_kinds, index.within,
            index.first_odd)


@pytest.mark.parametrize("odd", [0.0, 0.05])
def test_rows_rewritten_many_times_leave_the_index_as_written_once(odd: float) -> None:
    """The index is kept incrementally (a busy row whose energy group changed moves
    there; rows put since the last soonest search are placed when it runs): after any
    sequence of puts, with soonest searches' refreshes in between, it holds exactly what
    an index holding only each position's last row and load holds."""
    rng = np.random.default_rng(5 + int(odd * 100))
    for _ in range(200):
        n = int(rng.integers(1, 30))
        index = CandidateIndex()
        last: dict[int, tuple[tuple[float, ...], float, float]] = {}
        for _ in range(int(rng.integers(1, 6 * n))):
            pos = int(rng.integers(0, n))
            row = _late_row(rng) if rng.random() < 0.5 else _row(rng, odd)
            out, tpot, _ = _overflow(rng, 1)
            last[pos] = (row, float(out[0]), float(tpot[0]))
            index.put(pos, *last[pos])
            if rng.random() < 0.1:  # a request reached the soonest search
                index._refresh_firsts()
        fresh = CandidateIndex()
        for pos in sorted(last):
            fresh.put(pos, *last[pos])
        assert _structure(index) == _structure(fresh)
