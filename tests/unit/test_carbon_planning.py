"""The operator's planning loop with live carbon sources (fake Carbon Aware SDK on loopback)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from carbon_fakes import NOW, FakeGrid
from test_operator_planning import make_planner, plan, pool, reconcile

from joulepool.api.models import EnergyPolicySpec
from joulepool.core.planner import PlanNode

POLICY = "/apis/joulepool.dev/v1alpha1/energypolicies/default"


def sites_used(api: Any) -> set[str]:
    return {a.site for p in plan(api).pools.values() for a in p.assignments if a.instances}


async def test_forecast_crossing_moves_the_pool_to_the_cleaner_site(aiohttp_server):
    grid = FakeGrid(sdk_by_location={"east": [100.0] * 12, "west": [500.0] * 12})
    server = await aiohttp_server(grid.app(), host="127.0.0.1")
    url = str(server.make_url("")).rstrip("/")
    planner, api, world = make_planner()
    now = [NOW]
    planner.clock = lambda: now[0]
    world.nodes["e1"] = [PlanNode("e1", "east", "H100", 8)]
    world.nodes["w1"] = [PlanNode("w1", "west", "H100", 8)]
    world.add_pool(pool("chat", 5))
    src = {"provider": "carbonAwareSDK", "url": url, "refreshSeconds": 60}
    spec = EnergyPolicySpec.model_validate({
        "objective": "carbon", "windowSteps": 6, "stepSeconds": 300,
        "carbon": [{"site": "east", "source": {**src, "location": "east"}},
                   {"site": "west", "source": {**src, "location": "west"}}]})
    world.policies["default"] = [("default", spec)]
    api.objects[POLICY] = {"apiVersion": "joulepool.dev/v1alpha1", "kind": "EnergyPolicy",
                           "metadata": {"name": "default"}, "spec": {}}
    try:
        await reconcile(planner, world, force=True)
        assert sites_used(api) == {"east"}
        # the grids cross: east's forecast turns dirty, west's clean
        grid.sdk_by_location = {"east": [100.0] + [900.0] * 11, "west": [500.0] + [50.0] * 11}
        now[0] = NOW + timedelta(minutes=2)
        await reconcile(planner, world, force=True)
        assert sites_used(api) == {"west"}
        assert plan(api).version == 2
    finally:
        await planner.carbon.close()
    st = api.objects[POLICY]["status"]
    assert [(c["type"], c["status"]) for c in st["conditions"]] == [
        ("CarbonSourcesReady", "True"), ("CarbonSignalsConsistent", "True")]
    assert {s["site"]: s["gramsPerKWh"] for s in st["carbon"]} == {"east": 100.0, "west": 500.0}
    reg = planner.metrics.registry
    assert reg.get_sample_value("joulepool_plan_version") == 2
    assert reg.get_sample_value("joulepool_plan_changes_total") == 2
    assert reg.get_sample_value("joulepool_plan_feasible") == 1
    assert reg.get_sample_value("joulepool_pool_planned_instances", {"pool": "default.chat"}) >= 1
    assert reg.get_sample_value("joulepool_policy_target_miss_ratio") == spec.pi.target_miss_rate
    jpt = reg.get_sample_value("joulepool_pool_planned_joules_per_token",
                               {"pool": "default.chat", "model": "llama-3.1-8b"})
    assert jpt == plan(api).pools["default.chat"].joules_per_token and jpt > 0
    assert reg.get_sample_value("joulepool_carbon_intensity_grams_per_kwh",
                                {"site": "west"}) == 500.0


async def test_a_dead_source_never_stops_the_planner():
    planner, api, world = make_planner()
    planner.clock = lambda: NOW
    planner.carbon.wait_s = 0.5
    world.nodes["e1"] = [PlanNode("e1", "east", "H100", 8)]
    world.add_pool(pool("chat", 5))
    spec = EnergyPolicySpec.model_validate({
        "objective": "carbon",
        "carbon": [{"site": "east", "source": {
            "provider": "carbonAwareSDK", "url": "http://127.0.0.1:9", "location": "x",
            "fallbackGramsPerKWh": 300}}]})
    world.policies["default"] = [("default", spec)]
    api.objects[POLICY] = {"metadata": {"name": "default"}, "spec": {}}
    try:
        report = await reconcile(planner, world, force=True)
    finally:
        await planner.carbon.close()
    assert report.ok and plan(api).feasible and sites_used(api) == {"east"}
    st = api.objects[POLICY]["status"]
    ready = st["conditions"][0]
    assert ready["status"] == "False" and "fallback 300" in ready["message"]
    assert st["carbon"][0]["usingFallback"] is True


async def test_a_slow_source_is_waited_for_briefly_then_plans_again_when_it_answers(
        aiohttp_server):
    import time

    grid = FakeGrid()
    grid.mode["/emissions/forecasts/current"] = "slow"
    server = await aiohttp_server(grid.app(), host="127.0.0.1")
    planner, api, world = make_planner()
    planner.clock = lambda: NOW
    planner.carbon.wait_s = 0.2
    world.nodes["e1"] = [PlanNode("e1", "east", "H100", 8)]
    world.add_pool(pool("chat", 5))
    world.policies["default"] = [("default", EnergyPolicySpec.model_validate({
        "objective": "carbon", "carbon": [{"site": "east", "source": {
            "provider": "carbonAwareSDK", "url": str(server.make_url("")).rstrip("/"),
            "location": "x", "timeoutSeconds": 0.3}}]}))]
    before = planner.trigger()
    t0 = time.monotonic()
    try:
        report = await reconcile(planner, world, force=True)
        assert time.monotonic() - t0 < 1.0  # did not wait for the fetch's own timeout
        assert report.ok and plan(api).feasible
        task = planner.carbon._task
        assert task is not None
        await task  # the fetch times out in the background ...
    finally:
        await planner.carbon.close()
    assert planner.trigger() > before + 1  # ... and asked for another pass


def test_metrics_endpoint_serves_the_registry_and_a_taken_port_is_not_fatal(caplog):
    import socket
    import urllib.request

    from joulepool.operator.metrics import OperatorMetrics, serve

    metrics = OperatorMetrics()
    metrics.target_miss.set(0.05)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = serve(metrics, "127.0.0.1", port)
    assert server is not None
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        assert b"joulepool_policy_target_miss_ratio 0.05" in body
        assert serve(OperatorMetrics(), "127.0.0.1", port) is None  # taken: logged, no crash
        assert "cannot serve /metrics" in caplog.text
    finally:
        server.shutdown()


def test_operator_cli_metrics_flags():
    import argparse

    from joulepool.operator import cli

    p = argparse.ArgumentParser()
    cli.configure(p)
    cfg = cli.config_from_args(p.parse_args(["--metrics-port", "9999",
                                             "--metrics-address", "10.0.0.7"]))
    assert (cfg.metrics_port, cfg.metrics_address) == (9999, "10.0.0.7")
    cfg = cli.config_from_args(p.parse_args(["--metrics-port", "0"]))
    assert cfg.metrics_port is None
