"""The routing service sizes its endpoints' batch rooms as the simulator sizes its instances.

The plan document carries each pool's planned traffic (``PlannedPool.mix``);
``kube.pools.Router`` builds each pod's endpoint model at the stream of the pools the pod
serves (core.classes.merged_stream), so core.router.PoolRouter gives it the per-member
room (core.routing.member_rooms at its credible slot load) that the simulator's engine
gives an instance serving the same requests. Fed the same inputs, both paths must give the
same numbers: b*_n, the TPOT batch, the pool's slot load, the room at each credited load.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sim_helpers import cluster

from joulepool.api.plan import PlanDocument, PlannedInstance, PlannedMix, PlannedPool, PlannedSLO
from joulepool.core.classes import StreamMix, merged_stream
from joulepool.core.router import PoolRouter
from joulepool.core.routing import EndpointModel, slot_load, waiting_requests_estimate
from joulepool.kube import testing as T
from joulepool.kube.pools import Router, RouterSettings
from joulepool.kube.state import ClusterState
from joulepool.sim.engine import Simulator
from joulepool.sim.planning import plan_windows
from joulepool.sim.policies import POLICIES
from joulepool.sim.runner import model_tables
from joulepool.sim.workload import Workload

SS, LS = 0, 2  # the simulator's class indices (core.classes.CLASS_NAMES)
NAMES = {SS: "chat", LS: "rag"}


def _workload(n: int, seed: int, bulk_ls: bool = False) -> Workload:
    """Short prompts with long answers (SS) and long prompts with short answers (LS),
    each class with its own SLOs; ``bulk_ls``: every LS request is bulk."""
    rng = np.random.default_rng(seed)
    arrival = np.cumsum(rng.exponential(1 / 4.0, n))
    ls = rng.random(n) < 0.35
    inp = np.where(ls, rng.integers(1100, 4000, n), rng.integers(50, 900, n)).astype(np.int64)
    out = np.where(ls, rng.integers(10, 300, n), rng.integers(20, 440, n)).astype(np.int64)
    ttft = np.where(ls, 0.6, 0.3)
    tpot = np.where(ls, 0.1, 0.15)
    return Workload(
        arrival_s=arrival, input_tokens=inp, output_tokens=out, predicted_tokens=out.copy(),
        category=np.zeros(n, dtype=np.int64),
        bulk=(ls & bulk_ls).astype(np.bool_), cls=np.where(ls, LS, SS).astype(np.int64),
        ttft_slo_s=ttft, tpot_slo_s=tpot, deadline_s=ttft + out * tpot,
        duration_s=float(arrival[-1]), scale=1.0)


def _planned(wl: Workload, cls: int, *assignments: PlannedInstance) -> PlannedPool:
    """Pool ``cls`` of the workload as the operator plans it: its SLO, tier and traffic
    (rate, mean prompt and response of its requests)."""
    mine = wl.cls == cls
    return PlannedPool(
        namespace="default", name=NAMES[cls], model="llama-3.1-8b",
        tier="bulk" if wl.bulk[mine].all() else "interactive",
        slo=PlannedSLO(ttftSeconds=float(wl.ttft_slo_s[mine][0]),
                       tpotSeconds=float(wl.tpot_slo_s[mine][0])),
        replicas=sum(a.instances for a in assignments), assignments=list(assignments),
        mix=PlannedMix(requestsPerSecond=float(mine.sum()) / wl.duration_s,
                       meanInputTokens=float(wl.input_tokens[mine].mean()),
                       meanOutputTokens=float(wl.predicted_tokens[mine].mean())))


def _chat_shares_its_pod_with_rag(wl: Workload) -> PlanDocument:
    """The plan of both pools: chat's one instance (1xH100 on h0) shared with rag, which
    has none of its own."""
    shared_one = PlannedInstance(node="h0", site="s1", product="H100", mode="1xH100",
                                 instances=1, gpus=1, gpusPerInstance=1,
                                 sharedWith=["default.rag"])
    return PlanDocument(pools={"default.chat": _planned(wl, SS, shared_one),
                               "default.rag": _planned(wl, LS)})


def _service(doc: PlanDocument, host: str) -> Router:
    """The routing service's pools over ``doc`` and one ready pod of ``host`` on h0."""
    state = ClusterState()
    state.replace_nodes([T.node("h0", "H100", gpus=1)])
    state.replace_pods([T.pod("p0", node_name="h0", ready=True, ip="10.0.0.1", pool=host,
                              mode="1xH100")])
    state.set_plan(doc)
    return Router(RouterSettings(), state)


def _assert_same_rooms(model: EndpointModel, sim: Simulator, cls: int) -> None:
    """b*_n, TPOT batch, pool slot load and the room at every credited load within two
    octaves of the pool's: the endpoint model's against the simulator's for an instance
    of class set ``cls``."""
    mode = "1xH100"
    assert model.mix is not None
    assert model.batch_limit == sim._sustainable_batch(mode, cls)
    assert model.tpot_carry_batch == sim._sustainable_batch(mode, cls, False)
    assert model.tpot_batch_limit == sim._tpot_gate(mode, cls,
                                                    sim._sustainable_batch(mode, cls, False))
    prior, mean_out = sim._pool_mix(cls)
    assert model.pool_slot_load == pytest.approx(prior, rel=1e-12)
    assert model.mix[4] == pytest.approx(mean_out, rel=1e-12)
    inst = next(i for i in sim.instances if i.table.mode == mode)
    inst.cls, inst.pool_rooms = cls, (sim._sustainable_batch(mode, cls),
                                      int(model.tpot_batch_limit))
    sim.mix_rooms.clear()
    differ = 0
    for k in range(-16, 17):
        load = prior * 2.0 ** (k / 8)
        inst.n_out, inst.sl_sum = 10, 10 * load  # credited with its own load (Z = 1)
        want = sim._member_rooms(inst, 1.0)
        assert model.rooms_at_slot_load(load) == want, k
        differ += want != inst.pool_rooms
    assert differ >= 8  # the rooms follow the load (this is no pool-room-only check)


def test_a_pools_endpoint_has_the_simulators_rooms() -> None:
    wl = _workload(600, 3)
    cl = cluster([("h0", "H100", 2)])
    sim = Simulator(cl, wl, POLICIES["freesh"], model_tables(cl), plan_windows(cl, wl))
    one = PlannedInstance(node="h0", site="s1", product="H100", mode="1xH100", instances=1,
                          gpus=1, gpusPerInstance=1)
    doc = PlanDocument(pools={"default.rag": _planned(wl, LS, one),
                              "default.chat": _planned(wl, SS)})
    router = _service(doc, "default.rag")
    (endpoint,) = router.pool("default.rag").endpoints
    _assert_same_rooms(endpoint.model, sim, LS)
    assert router.pool("default.rag").mix_rooms  # its rooms follow the credited loads


@pytest.mark.parametrize("bulk_ls", [False, True])
def test_a_shared_pod_has_the_rooms_of_the_simulators_shared_instance(bulk_ls: bool) -> None:
    """The host's pod the plan shares with a guest pool is sized at both pools' requests
    (rate-weighted means; TTFT and TPOT of the interactive ones), in the host's pool and
    in the guest's, as the simulator sizes an instance serving both classes."""
    wl = _workload(600, 4, bulk_ls)
    cl = cluster([("h0", "H100", 2)])
    sim = Simulator(cl, wl, POLICIES["freesh"], model_tables(cl), plan_windows(cl, wl))
    shared = sim._class_set((SS, LS))
    router = _service(_chat_shares_its_pod_with_rag(wl), "default.chat")
    (host,) = router.pool("default.chat").endpoints
    (guest,) = router.pool("default.rag").endpoints
    assert host.address == guest.address == "10.0.0.1:8000"
    _assert_same_rooms(host.model, sim, shared)
    _assert_same_rooms(guest.model, sim, shared)
    # the interactive requests' tightest TPOT: the bulk pool's does not bind
    assert router.stream_of(("default.chat", "default.rag")).tpot_s == (  # type: ignore[union-attr]
        0.15 if bulk_ls else 0.1)


def test_a_plan_without_mixes_keeps_the_tpot_batch() -> None:
    """A plan of an earlier release (no ``mix``): rooms are the TPOT operating batch, as
    before, and do not follow any load."""
    doc = T.plan({"default.chat": [("h0", "H100", 1)]}, tpot_s=0.15)
    state = ClusterState()
    state.replace_nodes([T.node("h0", "H100", gpus=1)])
    state.replace_pods([T.pod("p0", node_name="h0", ready=True, ip="10.0.0.1")])
    state.set_plan(doc)
    pool = Router(RouterSettings(), state).pool("default.chat")
    (endpoint,) = pool.endpoints
    assert endpoint.model.mix is None and not pool.mix_rooms
    assert endpoint.model.batch_limit == endpoint.model.op_batch


def test_merged_stream_is_the_mean_over_all_requests() -> None:
    chat = StreamMix(3.0, 500.0, 200.0, 0.3, 0.15)
    rag = StreamMix(1.0, 3000.0, 40.0, 0.6, 0.1)
    both = merged_stream([chat, rag])
    assert both.requests_per_second == 4.0
    assert both.mean_input_tokens == pytest.approx((3 * 500 + 3000) / 4)
    assert both.mean_output_tokens == pytest.approx((3 * 200 + 40) / 4)
    assert (both.ttft_s, both.tpot_s, both.bulk) == (pytest.approx(0.375), 0.1, False)
    assert slot_load(*both.serving[:2]) == pytest.approx(1125 / 160)
    bulk_rag = merged_stream([chat, StreamMix(1.0, 3000.0, 40.0, 0.6, 0.05, bulk=True)])
    assert (bulk_rag.ttft_s, bulk_rag.tpot_s) == (0.3, 0.15)  # interactive SLOs only
    idle = merged_stream([StreamMix(0.0, 100.0, 10.0, 0.3, 0.1),
                          StreamMix(0.0, 300.0, 30.0, 0.5, 0.2)])
    assert (idle.mean_input_tokens, idle.ttft_s, idle.tpot_s) == (200.0, 0.4, 0.1)
    assert merged_stream([chat]) is chat
    with pytest.raises(ValueError):
        merged_stream([])
    assert math.isfinite(both.ttft_s)


def test_x_b_is_read_at_the_clock_the_node_agent_holds_a_shared_pod_to() -> None:
    """The bulk guest's tighter TPOT does not size the shared pod's rooms (the simulator's
    rule: interactive SLOs), but the node agent holds the pod's step to it
    (PlanDocument.held_slo): the router reads X(b) at the clock that step needs."""
    from joulepool.core.controllers import MIADController, miad_step_target_s
    from joulepool.core.profiles import find_profile

    wl = _workload(600, 4, bulk_ls=True)
    wl.tpot_slo_s[wl.cls == LS] = 0.03  # the bulk pool's TPOT: 30 ms
    doc = _chat_shares_its_pod_with_rag(wl)
    router = _service(doc, "default.chat")
    stream = router.stream_of(("default.chat", "default.rag"))
    assert stream is not None and stream.tpot_s == 0.15
    assert doc.serving_slo("default.chat", "h0") == (0.3, 0.03)
    assert router.held_tpot_s(("default.chat", "default.rag")) == 0.03
    assert router.held_tpot_s(("default.chat",)) == 0.15  # a pod of chat's own instance
    profile = find_profile("H100", "llama-3.1-8b", 1)
    assert profile is not None

    def excess(held: float) -> np.ndarray:
        got = EndpointModel.from_profile(
            profile, 0.15, serving=stream.serving,
            step_target_s=miad_step_target_s(held, MIADController.margin)).excess
        assert got is not None
        return got

    for pool in ("default.chat", "default.rag"):
        (endpoint,) = router.pool(pool).endpoints
        assert endpoint.model.excess is not None
        assert np.array_equal(endpoint.model.excess, excess(0.03))
    assert not np.array_equal(excess(0.03), excess(0.15))


def test_an_endpoints_file_pool_with_a_mix_is_sized_as_the_plans() -> None:
    """``--endpoints-file`` (no cluster): a pool entry's ``mix`` sizes its endpoints' rooms
    as a plan's mix does; without one, the TPOT operating batch."""
    from joulepool.kube.files import EndpointsFile

    wl = _workload(600, 3)
    planned = _planned(wl, LS, PlannedInstance(node="h0", site="s1", product="H100",
                                               mode="1xH100", instances=1, gpus=1,
                                               gpusPerInstance=1))
    from_plan = _service(PlanDocument(pools={"default.rag": planned}), "default.rag")
    (want,) = from_plan.pool("default.rag").endpoints
    entry = {"model": "llama-3.1-8b", "tier": planned.tier,
             "slo": planned.slo.model_dump(by_alias=True),
             "endpoints": [{"address": "10.0.0.9:8000", "product": "H100"}]}
    for mix in (planned.mix.model_dump(by_alias=True), None):  # type: ignore[union-attr]
        router = Router(RouterSettings())
        router.set_static(EndpointsFile.model_validate(
            {"pools": {"default.rag": {**entry, **({"mix": mix} if mix else {})}}}))
        (got,) = router.pool("default.rag").endpoints
        if mix is None:
            assert got.model.mix is None and got.model.batch_limit == got.model.op_batch
            continue
        assert (got.model.batch_limit, got.model.tpot_batch_limit, got.model.pool_slot_load) \
            == (want.model.batch_limit, want.model.tpot_batch_limit, want.model.pool_slot_load)
        assert all(got.model.rooms_at_slot_load(want.model.pool_slot_load * 2 ** (k / 8))
                   == want.model.rooms_at_slot_load(want.model.pool_slot_load * 2 ** (k / 8))
                   for k in range(-16, 17))
        assert router.pool("default.rag").mix_rooms


def test_endpoint_models_of_past_plans_do_not_pile_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every replan gives new mixes (and eps scales): the router's model cache keeps the
    latest ``MODEL_CACHE_ENTRIES`` (8 here) and still reuses a model asked for again."""
    from joulepool.kube import pools

    monkeypatch.setattr(pools, "MODEL_CACHE_ENTRIES", 8)
    router = Router(RouterSettings())
    first = StreamMix(4.0, 1000.0, 200.0, 0.5, 0.1)
    kept = router.endpoint_model("H100", "llama-3.1-8b", 1, stream=first)
    assert router.endpoint_model("H100", "llama-3.1-8b", 1, stream=first) is kept
    for replan in range(1, 20):
        stream = StreamMix(4.0, 1000.0 + replan, 200.0, 0.5, 0.1)
        model = router.endpoint_model("H100", "llama-3.1-8b", 1, stream=stream)
        assert router.endpoint_model("H100", "llama-3.1-8b", 1, stream=stream) is model
        assert len(router._models) <= 8
    again = router.endpoint_model("H100", "llama-3.1-8b", 1, stream=first)
    assert again is not kept and again.batch_limit == kept.batch_limit


def test_the_simulator_holds_an_instance_to_the_tpot_of_its_own_classes() -> None:
    """MIAD's TPOT target per instance, the node agent's rule (core.controllers.held_slo
    of the pools a pod serves): an instance serving only chat (TPOT 150 ms) is held to
    chat's, not to rag's tighter 100 ms elsewhere in the workload; one shared by both to
    rag's; the routing service reads the same targets for the pods of the same plan."""
    wl = _workload(600, 4)
    cl = cluster([("h0", "H100", 2)])
    sim = Simulator(cl, wl, POLICIES["combined"], model_tables(cl), plan_windows(cl, wl))
    shared = sim._class_set((SS, LS))
    assert (sim._held_tpot_s(SS), sim._held_tpot_s(LS), sim._held_tpot_s(shared)) == (
        0.15, 0.1, 0.1)
    assert float(wl.tpot_slo_s.min()) == 0.1  # the target every instance had before
    router = _service(_chat_shares_its_pod_with_rag(wl), "default.chat")
    assert router.held_tpot_s((NAMES[SS],)) is None  # not a plan key
    assert router.held_tpot_s(("default.chat",)) == sim._held_tpot_s(SS)
    assert router.held_tpot_s(("default.chat", "default.rag")) == sim._held_tpot_s(shared)


def test_a_shared_pod_is_credited_once_from_every_pools_requests_as_the_simulators() -> None:
    """chat's pod p0 is shared with rag, p1 is chat's own. Both pools route to p0, chat
    to p1 too. The engine p0 holds all of them: in both pools its row counts every
    request on it and has one room, the simulator's for an instance serving both classes
    that holds those requests, credited by its home pool's (chat's) spread
    (core.routing.credited_slot_load). Before, each pool credited p0 from its own
    requests alone: rag saw 6 long prompts, chat 6 short ones, and two rooms."""
    from joulepool.core.classes import Tier
    from joulepool.core.routing import credibility_at

    wl = _workload(600, 4)
    cl = cluster([("h0", "H100", 2)])
    sim = Simulator(cl, wl, POLICIES["freesh"], model_tables(cl), plan_windows(cl, wl))
    shared = sim._class_set((SS, LS))
    one = {"node": "h0", "site": "s1", "product": "H100", "mode": "1xH100", "instances": 1,
           "gpus": 1, "gpusPerInstance": 1}
    doc = PlanDocument(pools={
        "default.chat": _planned(wl, SS, PlannedInstance(**one, sharedWith=["default.rag"]),
                                 PlannedInstance(**one)),
        "default.rag": _planned(wl, LS)})
    state = ClusterState()
    state.replace_nodes([T.node("h0", "H100", gpus=2)])
    state.replace_pods([T.pod(name, node_name="h0", ready=True, ip=ip, pool="default.chat",
                              mode="1xH100")
                        for name, ip in (("p0", "10.0.0.1"), ("p1", "10.0.0.2"))])
    state.set_plan(doc)
    router = Router(RouterSettings(), state)
    chat, rag = router.pool("default.chat"), router.pool("default.rag")
    p0, p1 = "10.0.0.1:8000", "10.0.0.2:8000"
    assert [e.address for e in rag.endpoints] == [p0]
    held: list[tuple[int, int]] = []  # (prompt, response) of what p0 holds
    for k in range(6):
        for pool, prompt, response, to in ((rag, 3000 + 40 * k, 30, p0),
                                           (chat, 200 + 10 * k, 300, p0),
                                           (chat, 100, 400 + 20 * k, p1)):
            pool.decide(response, prompt, Tier.INTERACTIVE, None, 0.0,
                        subset=frozenset({to}))
            if to == p0:
                held.append((prompt, response))
    i_chat, i_rag = chat.index[p0], rag.index[p0]
    assert chat.ledger_count[i_chat] == rag.ledger_count[i_rag] == len(held) == 12
    assert chat.slot_loads[i_chat] == pytest.approx(sum(slot_load(a, b) for a, b in held))
    chat_rooms, rag_rooms = chat._credible_rooms(), rag._credible_rooms()
    one_room = (float(chat_rooms[i_chat]), float(chat.state.tpot_batch[i_chat]))
    assert (float(rag_rooms[i_rag]), float(rag.state.tpot_batch[i_rag])) == one_room
    epv, vhm = chat.slot_load_spread()
    assert vhm > 0.0  # chat's members differ: the credibility is not 0
    (endpoint,) = rag.endpoints
    inst = next(i for i in sim.instances if i.table.mode == "1xH100")
    inst.cls, inst.pool_rooms = shared, (sim._sustainable_batch("1xH100", shared),
                                         int(endpoint.model.tpot_batch_limit))
    inst.n_out = len(held)
    inst.sl_sum = sum(slot_load(a, b) for a, b in held)
    sim.mix_rooms.clear()
    assert sim._member_rooms(inst, credibility_at(len(held), epv, vhm)) == one_room
    assert one_room != (float(endpoint.model.batch_limit),
                        float(endpoint.model.tpot_batch_limit))  # credited off the mean
    # a completion in one pool frees the engine in both
    rid = next(iter(rag.endpoints[i_rag].ledger))
    rag.report(p0, rid, 30, True, None, 1.0)
    assert chat.ledger_count[i_chat] == rag.ledger_count[i_rag] == 11
    # the pod stops being shared: each pool's row counts its own ledger again
    for pool in (chat, rag):
        pool.endpoints[pool.index[p0]].peers, pool.endpoints[pool.index[p0]].home = (), None
    for pool in (chat, rag):
        pool.shared_changed()
        _assert_kept_columns_recomputed(pool)
    assert (chat.ledger_count[i_chat], rag.ledger_count[i_rag]) == (6, 5)


def _assert_kept_columns_recomputed(pool: PoolRouter) -> None:
    """The ledger columns are each endpoint's own ledger's, and the columns the pool keeps
    row by row (held, room, waiting) are what the whole-column formulas give from them."""
    eps = pool.endpoints
    assert pool.ledger_count.tolist() == [len(e.ledger) for e in eps]
    assert pool.ledger_tokens.tolist() == [e.ledger_tokens for e in eps]
    assert pool.slot_loads.tolist() == [e.slot_loads for e in eps]
    held = np.maximum(pool.ledger_count, pool.scraped)
    assert pool.requests_held.tobytes() == held.tobytes()
    assert pool.room.tobytes() == (pool.op_batch - held).tobytes()
    np.testing.assert_array_equal(pool.waiting_est, waiting_requests_estimate(
        pool.waiting, pool.ledger_count, pool.max_batch))


def test_the_simulator_holds_a_shared_instance_to_a_bulk_guests_tighter_slo() -> None:
    """rag's requests are all bulk, with a TTFT (200 ms) and TPOT (30 ms) tighter than
    chat's: the shared instance's MIAD step target and its clock floor's TTFT answer to
    them, as the node agent holds the pod to every pool it serves (PlanDocument.held_slo),
    while its rooms stay sized at chat's interactive TPOT, as the routing service's."""
    wl = _workload(600, 4, bulk_ls=True)
    wl.tpot_slo_s[wl.cls == LS] = 0.03
    wl.ttft_slo_s[wl.cls == LS] = 0.2
    doc = _chat_shares_its_pod_with_rag(wl)
    cl = cluster([("h0", "H100", 2)])
    sim = Simulator(cl, wl, POLICIES["combined"], model_tables(cl), plan_windows(cl, wl))
    shared = sim._class_set((SS, LS))
    assert doc.held_slo(["default.chat", "default.rag"]) == (0.2, 0.03)
    assert (sim._floor_prompt(shared)[1], sim._held_tpot_s(shared)) == (0.2, 0.03)
    assert (sim._floor_prompt(SS)[1], sim._held_tpot_s(SS)) == (0.3, 0.15)
    router = _service(doc, "default.chat")
    stream = router.stream_of(("default.chat", "default.rag"))
    assert stream is not None and stream.tpot_s == 0.15
    (host,) = router.pool("default.chat").endpoints
    _assert_same_rooms(host.model, sim, shared)
