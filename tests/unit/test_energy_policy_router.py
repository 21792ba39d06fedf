"""EnergyPolicy spec.pi and bulkLambdaFactor are read by the router (through its poller)."""

from __future__ import annotations

from typing import Any

import pytest

from joulepool.kube.files import EndpointsFile
from joulepool.kube.policy import EnergyPolicyPoller
from joulepool.kube.pools import Router, RouterSettings
from joulepool.router.models import CompleteRequest, RouteRequest, complete, route

EP = "10.0.0.1:8000"


class FakeCustomObjects:
    """CustomObjectsApi.get_cluster_custom_object as the API server answers it."""

    def __init__(self, obj: dict[str, Any] | None) -> None:
        self.obj = obj

    def get_cluster_custom_object(self, group: str, version: str, plural: str, name: str,
                                  **kw: Any) -> dict[str, Any]:
        assert kw.get("_request_timeout")  # never an unbounded API call
        assert (group, version, plural, name) == (
            "joulepool.dev", "v1alpha1", "energypolicies", "default")
        if self.obj is None:
            err = RuntimeError("Not Found")
            err.status = 404  # type: ignore[attr-defined]
            raise err
        return self.obj


def _policy(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "joulepool.dev/v1alpha1", "kind": "EnergyPolicy",
            "metadata": {"name": "default"}, "spec": spec}


def _router() -> Router:
    r = Router(RouterSettings(pi_every=1, lambda_initial=10.0))
    r.set_static(EndpointsFile.model_validate({"pools": {"ns.p": {
        "slo": {"ttftSeconds": 0.5, "tpotSeconds": 0.05},
        "endpoints": [{"address": EP, "joulesPerToken": 0.1, "tokensPerSecond": 100}],
    }}}))
    r.sync()
    return r


def _route(r: Router, tier: str) -> float:
    req = RouteRequest.model_validate({"pool": "ns.p", "outputTokens": 10, "tier": tier},
                                      strict=False)
    return route(r, req, now=0.0).lam


def _miss(r: Router, now: float) -> None:
    complete(r, CompleteRequest.model_validate(
        {"pool": "ns.p", "endpoint": EP, "deadlineMet": False, "outputTokens": 10},
        strict=False), now=now)


async def test_policy_gains_clamps_and_bulk_factor_reach_every_pool() -> None:
    r = _router()
    pool = r.pools["ns.p"]
    base_bulk = _route(r, "bulk") / _route(r, "interactive")
    api = FakeCustomObjects(_policy(
        pi={"kp": 0.0, "ki": 1.0, "targetMissRate": 0.5, "lambdaMin": 5.0, "lambdaMax": 10.5},
        bulkLambdaFactor=1.0))
    await EnergyPolicyPoller(api, r).poll()
    assert (pool.pi.kp, pool.pi.ki, pool.pi.target) == (0.0, 1.0, 0.5)
    assert _route(r, "bulk") == _route(r, "interactive")  # the policy's factor, not the flag's
    assert base_bulk < 1.0
    _miss(r, 1.0)  # error 1 - 0.5 = 0.5: lambda += ki * 0.5, clamped at lambdaMax
    assert pool.pi.lam == pytest.approx(10.5)
    api.obj = None  # deleted: back to the router's own settings
    await EnergyPolicyPoller(api, r).poll()
    assert (pool.pi.kp, pool.pi.ki) == (RouterSettings.kp, RouterSettings.ki)
    assert _route(r, "bulk") / _route(r, "interactive") == pytest.approx(base_bulk)


async def test_invalid_or_unreadable_policy_keeps_what_is_in_force() -> None:
    r = _router()
    pool = r.pools["ns.p"]
    api = FakeCustomObjects(_policy(pi={"ki": 3.0}))
    poller = EnergyPolicyPoller(api, r)
    await poller.poll()
    assert pool.pi.ki == 3.0
    api.obj = _policy(pi={"lambdaMin": 9.0, "lambdaMax": 1.0})  # invalid: min > max
    await poller.poll()
    assert pool.pi.ki == 3.0

    class Broken:
        def get_cluster_custom_object(self, *a: Any, **kw: Any) -> dict[str, Any]:
            raise TimeoutError("API server slow")

    await EnergyPolicyPoller(Broken(), r).poll()
    assert pool.pi.ki == 3.0
    # a pool created while the policy is in force gets it too
    r.pools.clear()
    r.set_static(r.static)
    r.sync()
    assert r.pools["ns.p"].pi.ki == 3.0
