"""PoolRouter.decide picks exactly what it picked before its speed-ups.

``tests/data/router/decide_recorded.json`` holds the decisions of a seeded sequence
of routes, completions (with and without joules), scrapes (KV cache included),
ticks, releases, gateway fallbacks, subset hints and site intensities over three
pools, recorded with the router as it was before ``PoolRouter.decide`` was made
cheaper (joulepool 895eff6): every endpoint and fallback, and a digest of every
cost term's bits. The pools cover what the decision path branches on:

* ``profiles``: 160 endpoints of the built-in serving profiles (H100, A100, L4),
  rooms sized at a stream (credible slot loads), MIAD clocks, carbon weights, some
  predicted late at every decision;
* ``hard``: 48 such endpoints with ``hard_deadline`` (on-time before late within each
  group), driven into overload so that at times every endpoint is late and the
  overflow rank decides;
* ``constant``: 1,000 endpoints of fixed numbers in three kinds, as
  ``joulepool bench picker`` runs (hundreds of exact ties among the top four).

Regenerate (only when a change is *meant* to change decisions, saying so in the
commit): ``python tests/unit/test_decide_recorded.py --write``.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from joulepool.core.classes import Tier
from joulepool.core.controllers import MIADController, miad_step_target_s
from joulepool.core.cost import Scratch
from joulepool.core.profiles import DEFAULT_PROFILES
from joulepool.core.router import Endpoint, NoEndpoints, PoolRouter, RouteDecision, RouterConfig
from joulepool.core.routing import EndpointModel, waiting_requests_estimate

RECORDED = Path(__file__).resolve().parents[1] / "data" / "router" / "decide_recorded.json"
TTFT_S, TPOT_S = 1.0, 0.1


def _profile_endpoints(n: int) -> list[Endpoint]:
    """``n`` endpoints over the 8B profiles (H100, A100, L4), rooms at a 1,200/250 stream,
    clocks held at MIAD's step target; sites a, b, c."""
    target = miad_step_target_s(TPOT_S, MIADController.margin)
    models = [EndpointModel.from_profile(p, TPOT_S, serving=(1200.0, 250.0, TTFT_S),
                                         step_target_s=target)
              for p in DEFAULT_PROFILES[:3]]
    return [Endpoint(f"10.1.{i // 200}.{i % 200 + 1}:8000", models[i % 3], f"node{i % 7}",
                     site="abc"[i % 3]) for i in range(n)]


def _constant_endpoints(n: int) -> list[Endpoint]:
    kinds = ((0.12, 2400.0), (0.2, 1500.0), (0.45, 700.0))
    models = [EndpointModel.constant(e, t) for e, t in kinds]
    return [Endpoint(f"10.{i // 65000}.{(i // 250) % 250}.{i % 250 + 1}:8000", models[i % 3])
            for i in range(n)]


def _decision_record(d: RouteDecision, index: dict[str, int]) -> tuple[list[int], bytes]:
    """(endpoint then fallbacks, as rows), and the bits of its numbers."""
    rows = [index[d.endpoint], *(index[a] for a in d.fallbacks)]
    numbers = (d.deadline_s, d.tokens, d.eta_s, d.energy_j, d.slack_s, d.lam, d.cost)
    return rows, np.array(numbers, dtype=np.float64).tobytes() + str(d.tier).encode()


def _drive(pool: PoolRouter, steps: int, seed: int, arrivals_per_s: float,
           check: Callable[[PoolRouter], None] | None = None) -> dict[str, Any]:
    """A seeded sequence of what the routing service does to a pool; every decision's
    rows and a digest of its numbers' bits. ``check`` is called with the pool after
    every step."""
    rng = np.random.default_rng(seed)
    addresses = [e.address for e in pool.endpoints]
    index = {a: i for i, a in enumerate(addresses)}
    digest = hashlib.sha256()
    rows: list[list[int]] = []
    stats = {"late": 0, "all_late": 0, "over_deadline": 0, "subset": 0}
    scorer = pool.profile.scorers[0][0]
    score = scorer.score

    def counting(request: Any, endpoints: Any) -> Any:  # how often some endpoint is late
        s = score(request, endpoints)
        stats["late"] += int(s.late is not None and bool(s.late.any()))
        stats["all_late"] += int(s.late is not None and bool(s.late.all()))
        return s

    scorer.score = counting  # type: ignore[method-assign]
    flying: list[tuple[str, str, float]] = []
    now = 0.0
    for step in range(steps):  # the offered rate swings from 0.2x to 2.2x
        if check is not None and step:
            check(pool)
        rate = arrivals_per_s * (1.2 + math.sin(step / 150.0))
        now += float(rng.exponential(1.0 / rate))
        op = rng.random()
        if op < 0.03:  # a scrape of one engine (KV cache sometimes nearly full)
            i = int(rng.integers(len(addresses)))
            pool.apply_scrape(addresses[i], float(rng.integers(0, 6)),
                              float(rng.integers(0, 300)), now,
                              kv_cache=float(rng.choice([0.2, 0.5, 0.97])))
            continue
        if op < 0.05:
            pool.tick(now)
            continue
        if op < 0.06 and flying:  # refused by the engine: forgotten
            address, rid, _ = flying.pop(int(rng.integers(len(flying))))
            pool.release(address, rid)
            continue
        if op < 0.07 and flying:  # the gateway sent it to a fallback
            k = int(rng.integers(len(flying)))
            address, rid, out = flying[k]
            served = addresses[int(rng.integers(len(addresses)))]
            if pool.move_routed(rid, address, served):
                flying[k] = (served, rid, out)
            continue
        while flying and (len(flying) > 400 or rng.random() < 0.45):
            address, rid, out = flying.pop(int(rng.integers(len(flying))))
            joules = float(out * rng.uniform(0.05, 0.6)) if rng.random() < 0.5 else None
            pool.report(address, rid, out, bool(rng.random() < 0.8), joules, now,
                        Tier.BULK if rng.random() < 0.2 else None)
        out_tokens = float(rng.integers(1, 900))
        in_tokens = float(rng.integers(0, 4000))
        tier = (Tier.BULK, Tier.INTERACTIVE, None)[int(rng.integers(3))]
        deadline = None if rng.random() < 0.5 else float(rng.uniform(0.5, 60.0))
        subset = None
        if rng.random() < 0.1:
            picks = rng.choice(len(addresses), size=int(rng.integers(1, 6)), replace=False)
            subset = frozenset(addresses[int(j)] for j in picks) | {"10.9.9.9:1"}
        try:
            d = pool.decide(out_tokens, in_tokens, tier, deadline, now, subset)
        except NoEndpoints:
            rows.append([])
            continue
        stats["subset"] += subset is not None
        stats["over_deadline"] += d.slack_s > 0
        flying.append((d.endpoint, d.request_id, out_tokens))
        picked, bits = _decision_record(d, index)
        rows.append(picked)
        digest.update(bits)
    return {"rows": rows, "sha256": digest.hexdigest(), "stats": stats}


def scenario(scale: float = 1.0, check: Callable[[PoolRouter], None] | None = None
             ) -> dict[str, Any]:
    """The recorded pools' decisions (see the module docstring); ``scale``: that share of
    the steps, ``check``: called with each pool after every step."""
    out: dict[str, Any] = {}
    for name, config, endpoints, steps, rate in (
        ("profiles", RouterConfig(), _profile_endpoints(160), 3000, 300.0),
        ("hard", RouterConfig(hard_deadline=True, fallbacks=2), _profile_endpoints(48),
         1500, 40.0),
        ("constant", RouterConfig(), _constant_endpoints(1000), 800, 500.0),
    ):
        pool = PoolRouter(name, config)
        pool.ttft_s, pool.tpot_s = TTFT_S, TPOT_S
        pool.set_endpoints(endpoints)
        if name == "profiles":
            pool.set_site_intensities({"a": 120.0, "b": 450.0, "c": math.nan})
        out[name] = _drive(pool, int(steps * scale), seed=len(name), arrivals_per_s=rate,
                           check=check)
    return out


def test_decisions_are_the_recorded_ones() -> None:
    recorded = json.loads(RECORDED.read_text())
    now = scenario()
    assert now.keys() == recorded.keys()
    for name, got in now.items():
        want = recorded[name]
        assert len(got["rows"]) == len(want["rows"]), name
        for k, (a, b) in enumerate(zip(got["rows"], want["rows"], strict=True)):
            assert a == b, f"{name}: decision {k} picked rows {a}, recorded {b}"
        assert got["sha256"] == want["sha256"], f"{name}: a cost term's bits differ"
        assert got["stats"] == want["stats"], name


def _columns_as_recomputed(pool: PoolRouter) -> None:
    """The columns PoolRouter keeps one row at a time are what the whole-column
    formulas give from the rows' state, bit for bit."""
    np.testing.assert_array_equal(pool.waiting_est, waiting_requests_estimate(
        pool.waiting, pool.ledger_count, pool.max_batch))
    held = np.maximum(pool.ledger_count, pool.scraped)
    assert pool.requests_held.tobytes() == held.tobytes()
    assert pool.room.tobytes() == (pool.op_batch - held).tobytes()


def test_columns_kept_row_by_row_are_the_recomputed_ones() -> None:
    scenario(0.3, check=_columns_as_recomputed)


def _batch_left_keeps_the_prefill_wait(pool: PoolRouter) -> None:
    wait = pool.state.prefill_wait_s.copy()
    pool._batch_left(0.0)
    assert pool.state.prefill_wait_s.tobytes() == wait.tobytes()


def test_steps_left_are_computed_without_touching_the_decisions_prefill_wait() -> None:
    """R_n (PoolRouter._batch_left) computed again after a decision, as a describe path
    might, leaves the prefill wait the decision handed its scorers as it was."""
    scenario(0.05, check=_batch_left_keeps_the_prefill_wait)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_decisions_without_the_scratch_arrays_are_the_same(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The scorer's terms written into each pool's scratch arrays (reused by every
    decision) and into fresh arrays (a state whose scratch does not fit its columns)
    give the same decisions and the same bits."""
    kept = scenario(0.3)
    monkeypatch.setattr("joulepool.core.scoring.Scratch", lambda n: Scratch(0))
    assert scenario(0.3) == kept


def test_the_recording_exercises_every_branch() -> None:
    """The sequence reaches what it claims to: fallbacks ranked, subsets, endpoints
    predicted late (every one of them in the ``hard`` pool at times) and deadlines
    missed (else the recording would prove little)."""
    recorded = json.loads(RECORDED.read_text())
    for name in ("profiles", "hard", "constant"):
        rows, stats = recorded[name]["rows"], recorded[name]["stats"]
        assert sum(1 for r in rows if len(r) > 1) > 0.9 * len(rows)  # fallbacks ranked
        assert len({r[0] for r in rows if r}) > 20  # not a handful of endpoints
        assert stats["subset"] > 50
    for name in ("profiles", "hard"):  # endpoints predicted late, deadlines missed
        stats = recorded[name]["stats"]
        assert stats["late"] > 1000 and stats["over_deadline"] > 2, (name, stats)
    assert recorded["hard"]["stats"]["all_late"] > 50  # the overflow rank decides


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    RECORDED.parent.mkdir(parents=True, exist_ok=True)
    RECORDED.write_text(json.dumps(scenario(), separators=(",", ":")) + "\n")
    print(f"wrote {RECORDED}")


def test_scorers_cannot_write_the_columns_the_router_keeps() -> None:
    """The rooms and the no-steps-left zeros are kept from one decision to the next: a
    scorer plugin writing into them would change every later decision, so it gets
    read-only columns (writing raises) and the pool's own rooms stay as they were."""
    pool = PoolRouter("constant", RouterConfig())
    pool.ttft_s, pool.tpot_s = TTFT_S, TPOT_S
    pool.set_endpoints(_constant_endpoints(12))
    pool.decide(100.0, 200.0, Tier.INTERACTIVE, None, 0.0)
    rooms = pool.room.copy()
    state = pool.state
    assert not pool.mix_rooms and not state.batch_left_tokens.any()  # the kept columns
    for column in (state.batch_room, state.batch_left_tokens):
        with pytest.raises(ValueError, match="read-only"):
            column[0] = -1.0
    assert pool.room.tobytes() == rooms.tobytes()
