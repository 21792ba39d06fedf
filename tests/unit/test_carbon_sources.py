"""Carbon sources against fake providers on loopback: documented shapes, errors, 429, garbage."""

from __future__ import annotations

import base64
import time
from datetime import timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from carbon_fakes import NOW, FakeGrid, emissions_data, exporter_configmap
from prometheus_client import generate_latest
from pydantic import ValidationError

from joulepool.api.models import CarbonSourceSpec, EnergyPolicySpec, SiteCarbon
from joulepool.carbon import CarbonFeed
from joulepool.carbon.base import retry_after_seconds
from joulepool.core.energy import G_PER_LB

NOW_S = NOW.timestamp()
SECRETS = {
    "/api/v1/namespaces/joulepool/secrets/em": {
        "data": {"token": base64.b64encode(b"em-secret").decode()}},
    "/api/v1/namespaces/joulepool/secrets/wt": {
        "data": {"username": base64.b64encode(b"alice").decode(),
                 "password": base64.b64encode(b"pw").decode()}},
}


@pytest.fixture
async def grid(aiohttp_server: Any) -> tuple[FakeGrid, str]:
    fake = FakeGrid()
    server = await aiohttp_server(fake.app(), host="127.0.0.1")
    return fake, str(server.make_url("")).rstrip("/")


def reader(objects: dict[str, Any]) -> Any:
    async def read(path: str) -> Any:
        if path not in objects:
            raise LookupError(f"404 {path}")
        return objects[path]
    return read


def policy(*sites: SiteCarbon, steps: int = 6) -> EnergyPolicySpec:
    return EnergyPolicySpec(objective="carbon", window_steps=steps, step_seconds=300,
                            carbon=list(sites))


def live(site: str = "east", **source: Any) -> SiteCarbon:
    return SiteCarbon(site=site, source=CarbonSourceSpec.model_validate(source))


async def resolved(feed: CarbonFeed, pol: EnergyPolicySpec, now_s: float = NOW_S) -> Any:
    await feed.refresh(pol, now_s)
    return feed.resolve(pol, now_s)


def series(res: Any, site: str = "east") -> list[float] | None:
    for c in res.policy.carbon:
        if c.site == site:
            return c.values()
    return None


def metric(feed: CarbonFeed, name: str, **labels: str) -> float | None:
    value = feed.metrics.registry.get_sample_value(name, labels)
    return value


# ------------------------------------------------------------ each provider, happy path
async def test_carbon_aware_sdk_forecast_becomes_the_planning_series(grid):
    fake, url = grid
    feed = CarbonFeed()
    pol = policy(live(provider="carbonAwareSDK", url=url, location="eastus"))
    res = await resolved(feed, pol)
    await feed.close()
    # 5-minute points on 5-minute steps; the forecast's last value holds beyond it
    assert series(res) == [400.0, 300.0, 200.0, 200.0, 200.0, 200.0]
    assert fake.requests[0][1] == {"location": "eastus"}
    (status,) = res.statuses
    assert status.signal == "average" and not status.stale and status.horizon_seconds == 900
    assert status.message == ("data cover 15 of the planning window's 30 min ahead; "
                              "the last value holds")
    assert [c.status for c in res.conditions] == ["True", "True"]
    assert metric(feed, "joulepool_carbon_intensity_grams_per_kwh", site="east") == 400.0


async def test_exporter_configmap_is_read_from_binary_data():
    points = emissions_data("PJM_ROANOKE", [550.0, 560.0, 570.0, 580.0])
    objects = {"/api/v1/namespaces/kube-system/configmaps/carbonintensity":
               exporter_configmap(points)}
    feed = CarbonFeed(read_object=reader(objects))
    pol = policy(live(provider="configMap", configMap={"name": "carbonintensity"},
                      signal="marginal"), steps=3)
    res = await resolved(feed, pol)
    assert series(res) == [550.0, 560.0, 570.0]
    assert res.statuses[0].signal == "marginal"


async def test_configmap_plain_data_key_and_ten_minute_steps():
    points = emissions_data("westus", [100.0, 300.0, 500.0, 700.0])
    cm = {"data": {"forecast": __import__("json").dumps(points)}}
    feed = CarbonFeed(read_object=reader(
        {"/api/v1/namespaces/kube-system/configmaps/ci": cm}))
    pol = policy(live(provider="configMap", configMap={"name": "ci", "key": "forecast"}),
                 steps=2).model_copy(update={"step_seconds": 600})
    res = await resolved(feed, pol)
    assert series(res) == [200.0, 600.0]  # time-weighted mean of two 5-minute points


async def test_electricity_maps_latest_then_forecast_with_auth_token(grid):
    fake, url = grid
    feed = CarbonFeed(read_object=reader(SECRETS))
    pol = policy(live(provider="electricityMaps", url=url, location="DE",
                      tokenSecretRef={"name": "em"}), steps=3).model_copy(
        update={"step_seconds": 3600})
    res = await resolved(feed, pol)
    await feed.close()
    assert series(res) == [250.0, 240.0, 230.0]
    paths = [(p, q) for p, q, _ in fake.requests]
    assert paths == [("/v3/carbon-intensity/latest", {"zone": "DE"}),
                     ("/v3/carbon-intensity/forecast", {"zone": "DE"})]
    assert all(h.get("auth-token") == "em-secret" for _, _, h in fake.requests)


async def test_electricity_maps_by_coordinates_and_without_forecast_access(grid):
    fake, url = grid
    fake.mode["/v3/carbon-intensity/forecast"] = "401"  # forecast not in this API plan
    feed = CarbonFeed(read_object=reader(SECRETS))
    pol = policy(live(provider="electricityMaps", url=url, latitude=48.1, longitude=11.6,
                      tokenSecretRef={"name": "em"}), steps=2)
    res = await resolved(feed, pol)
    await feed.close()
    assert series(res) == [250.0, 250.0]
    assert fake.requests[0][1] == {"lat": "48.1", "lon": "11.6"}
    assert not res.statuses[0].stale


async def test_electricity_maps_wrong_token_is_an_auth_failure(grid):
    fake, url = grid
    fake.token = "another"
    feed = CarbonFeed(read_object=reader(SECRETS))
    pol = policy(live(provider="electricityMaps", url=url, location="DE",
                      tokenSecretRef={"name": "em"}, fallbackGramsPerKWh=333))
    res = await resolved(feed, pol)
    await feed.close()
    assert series(res) == [333.0]
    assert res.statuses[0].using_fallback and "HTTP 401" in res.statuses[0].message
    assert metric(feed, "joulepool_carbon_source_errors_total", site="east",
                  provider="electricityMaps", reason="auth") == 1


async def test_watttime_moer_in_lbs_per_mwh_is_normalised_and_token_reused(grid):
    fake, url = grid
    feed = CarbonFeed(read_object=reader(SECRETS))
    pol = policy(live(provider="wattTime", url=url, location="CAISO_NORTH",
                      tokenSecretRef={"name": "wt"}, refreshSeconds=10), steps=2)
    res = await resolved(feed, pol)
    assert series(res) == [round(1000 * G_PER_LB / 1000, 3), round(900 * G_PER_LB / 1000, 3)]
    assert res.statuses[0].signal == "marginal"
    await resolved(feed, pol, NOW_S + 11)  # refresh due: same token, no new login
    assert fake.logins == 1
    fake.valid_wt_tokens.clear()  # the token expired server-side: one re-login, then data
    res = await resolved(feed, pol, NOW_S + 22)
    await feed.close()
    assert fake.logins == 2 and not res.statuses[0].stale and res.statuses[0].message == ""
    forecast_q = next(q for p, q, _ in fake.requests if p == "/v3/forecast")
    assert forecast_q == {"region": "CAISO_NORTH", "signal_type": "co2_moer"}


async def test_prometheus_query_for_on_site_meters_with_unit(grid):
    fake, url = grid
    fake.prom_value = "0.1235"
    feed = CarbonFeed()
    pol = policy(live(provider="prometheus", url=url, query="site_grid_intensity",
                      unit="kgPerKWh"), steps=2)
    res = await resolved(feed, pol)
    await feed.close()
    assert series(res) == [123.5, 123.5]
    assert fake.requests[0][1] == {"query": "site_grid_intensity"}


# ------------------------------------------------------------ failures
@pytest.mark.parametrize("mode,reason", [
    ("500", "http"), ("garbage", "garbage"), ("wrongshape", "garbage"), ("401", "auth"),
    ("huge", "garbage"),
])
async def test_failures_are_status_and_metric_never_exceptions(grid, mode, reason):
    fake, url = grid
    fake.mode["/emissions/forecasts/current"] = mode
    feed = CarbonFeed()
    pol = policy(live(provider="carbonAwareSDK", url=url, location="eastus"),
                 SiteCarbon(site="west", gramsPerKWh=90))
    res = await resolved(feed, pol)
    await feed.close()
    assert series(res) is None  # no data and no fallback: left to the planner's rule
    assert series(res, "west") == [90.0]
    ready = res.conditions[0]
    assert ready.status == "False" and ready.reason == "SourceStale"
    assert "east (carbonAwareSDK)" in ready.message and "dirtiest" in ready.message
    assert metric(feed, "joulepool_carbon_source_up", site="east",
                  provider="carbonAwareSDK") == 0
    assert metric(feed, "joulepool_carbon_source_errors_total", site="east",
                  provider="carbonAwareSDK", reason=reason) == 1


async def test_garbage_values_in_a_valid_shape_are_rejected(grid):
    fake, url = grid
    for bad in ([float("nan")], [-5.0], ["lots"]):
        fake.sdk_values = bad  # type: ignore[assignment]
        feed = CarbonFeed()
        pol = policy(live(provider="carbonAwareSDK", url=url, location="x",
                          fallbackGramsPerKWh=500))
        res = await resolved(feed, pol)
        await feed.close()
        assert series(res) == [500.0] and res.statuses[0].stale, bad


async def test_429_retry_after_postpones_the_next_fetch(grid):
    fake, url = grid
    fake.mode["/emissions/forecasts/current"] = "429"
    fake.retry_after = "900"
    feed = CarbonFeed()
    pol = policy(live(provider="carbonAwareSDK", url=url, location="eastus",
                      refreshSeconds=60))
    await resolved(feed, pol)
    assert len(fake.requests) == 1
    assert metric(feed, "joulepool_carbon_source_errors_total", site="east",
                  provider="carbonAwareSDK", reason="rate_limited") == 1
    fake.mode.clear()
    await resolved(feed, pol, NOW_S + 120)  # refreshSeconds passed, Retry-After not yet
    assert len(fake.requests) == 1
    res = await resolved(feed, pol, NOW_S + 901)
    await feed.close()
    assert len(fake.requests) == 2 and not res.statuses[0].stale


def test_retry_after_forms():
    assert retry_after_seconds("120") == 120
    when = NOW + timedelta(seconds=300)
    assert retry_after_seconds(format_datetime(when, usegmt=True), NOW) == pytest.approx(300)
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None
    assert retry_after_seconds("99999999") == 3600  # bounded


async def test_a_hanging_source_is_bounded_by_its_timeout(grid):
    fake, url = grid
    fake.mode["/emissions/forecasts/current"] = "slow"
    feed = CarbonFeed()
    pol = policy(live(provider="carbonAwareSDK", url=url, location="eastus",
                      timeoutSeconds=0.3, fallbackGramsPerKWh=420))
    t0 = time.monotonic()
    res = await resolved(feed, pol)
    await feed.close()
    assert time.monotonic() - t0 < 5
    assert series(res) == [420.0] and "0.3s" in res.statuses[0].message


async def test_unreachable_source_and_missing_secret():
    feed = CarbonFeed(read_object=reader({}))
    pol = policy(live(provider="carbonAwareSDK", url="http://127.0.0.1:9", location="x"),
                 live("west", provider="electricityMaps", url="http://127.0.0.1:9",
                      location="DE", tokenSecretRef={"name": "missing"}))
    res = await resolved(feed, pol)
    await feed.close()
    msgs = {s.site: s.message for s in res.statuses}
    assert "127.0.0.1:9" in msgs["east"]
    assert "Secret joulepool/missing" in msgs["west"]


async def test_last_good_data_serves_until_stale_then_fallback(grid):
    fake, url = grid
    feed = CarbonFeed()
    pol = policy(live(provider="carbonAwareSDK", url=url, location="eastus",
                      refreshSeconds=60, staleAfterSeconds=1200, fallbackGramsPerKWh=999),
                 steps=2)
    assert series(await resolved(feed, pol)) == [400.0, 300.0]
    fake.mode["/emissions/forecasts/current"] = "500"
    later = await resolved(feed, pol, NOW_S + 600)  # failing, but the data is fresh enough
    assert series(later) == [200.0, 200.0] and not later.statuses[0].stale
    assert later.statuses[0].message  # the failure is still reported
    stale = await resolved(feed, pol, NOW_S + 1900)
    await feed.close()
    assert series(stale) == [999.0]
    st = stale.statuses[0]
    assert st.stale and st.using_fallback and st.grams_per_kwh == 999
    assert metric(feed, "joulepool_carbon_source_stale", site="east",
                  provider="carbonAwareSDK") == 1
    assert b"joulepool_carbon_source_last_success_timestamp_seconds" in generate_latest(
        feed.metrics.registry)


async def test_the_grid_is_aligned_so_the_series_changes_once_per_step(grid):
    _, url = grid
    feed = CarbonFeed()
    pol = policy(live(provider="carbonAwareSDK", url=url, location="x", refreshSeconds=3600))
    a = await resolved(feed, pol, NOW_S + 10)
    b = await resolved(feed, pol, NOW_S + 250)
    c = await resolved(feed, pol, NOW_S + 310)
    await feed.close()
    assert a.policy == b.policy and series(c)[0] == 300.0


async def test_mixed_signals_are_a_condition(grid):
    _, url = grid
    feed = CarbonFeed()
    pol = policy(live(provider="carbonAwareSDK", url=url, location="x"),
                 live("west", provider="carbonAwareSDK", url=url, location="y",
                      signal="marginal"))
    res = await resolved(feed, pol)
    await feed.close()
    assert res.conditions[1].status == "False" and res.conditions[1].reason == "MixedSignals"


async def test_a_changed_source_starts_afresh(grid):
    fake, url = grid
    feed = CarbonFeed()
    pol = policy(live(provider="carbonAwareSDK", url=url, location="x", refreshSeconds=3600))
    await resolved(feed, pol)
    pol2 = policy(live(provider="carbonAwareSDK", url=url, location="y", refreshSeconds=3600))
    await resolved(feed, pol2, NOW_S + 5)
    await feed.close()
    assert [q["location"] for _, q, _ in fake.requests] == ["x", "y"]


def test_source_spec_validation_names_what_is_missing():
    for body, words in [
        ({"provider": "prometheus", "url": "http://p:9090"}, "give query"),
        ({"provider": "carbonAwareSDK", "location": "x"}, "give url"),
        ({"provider": "electricityMaps", "tokenSecretRef": {"name": "s"}}, "zone"),
        ({"provider": "wattTime", "location": "CAISO_NORTH"}, "tokenSecretRef"),
        ({"provider": "configMap"}, "configMap.name"),
        ({"provider": "carbonAwareSDK", "url": "ftp://x", "location": "x"}, "pattern"),
    ]:
        with pytest.raises(ValidationError, match=words):
            CarbonSourceSpec.model_validate(body)
    with pytest.raises(ValidationError, match="exactly one"):
        SiteCarbon.model_validate({"site": "a", "gramsPerKWh": 1,
                                   "source": {"provider": "configMap",
                                              "configMap": {"name": "c"}}})
    with pytest.raises(ValidationError, match="more than once"):
        EnergyPolicySpec.model_validate({"carbon": [{"site": "a", "gramsPerKWh": 1},
                                                    {"site": "a", "gramsPerKWh": 2}]})


def test_the_live_carbon_example_is_a_valid_energy_policy():
    from pathlib import Path

    from joulepool.api.load import load_manifests
    from joulepool.api.models import EnergyPolicy

    path = Path(__file__).resolve().parents[2] / "examples" / "energypolicy-live-carbon.yaml"
    (policy,) = load_manifests(str(path))
    assert isinstance(policy, EnergyPolicy)
    providers = [c.source.provider for c in policy.spec.carbon if c.source]
    assert providers == ["electricityMaps", "configMap"]


def _source_for(provider: str, url: str) -> SiteCarbon:
    return live(**{
        "carbonAwareSDK": {"provider": "carbonAwareSDK", "url": url, "location": "x"},
        "electricityMaps": {"provider": "electricityMaps", "url": url, "location": "DE",
                            "tokenSecretRef": {"name": "em"}},
        "wattTime": {"provider": "wattTime", "url": url, "location": "CAISO_NORTH",
                     "tokenSecretRef": {"name": "wt"}},
        "prometheus": {"provider": "prometheus", "url": url, "query": "q"},
    }[provider], refreshSeconds=30, fallbackGramsPerKWh=111)


@pytest.mark.parametrize("provider,path", [
    ("carbonAwareSDK", "/emissions/forecasts/current"),
    ("electricityMaps", "/v3/carbon-intensity/latest"),
    ("wattTime", "/login"),
    ("wattTime", "/v3/forecast"),
    ("prometheus", "/api/v1/query"),
])
@pytest.mark.parametrize("mode", ["429", "garbage", "wrongshape", "500"])
async def test_every_provider_survives_rate_limits_and_garbage(grid, provider, path, mode):
    fake, url = grid
    fake.mode[path] = mode
    fake.retry_after = "600"
    feed = CarbonFeed(read_object=reader(SECRETS))
    pol = policy(_source_for(provider, url), steps=2)
    try:
        res = await resolved(feed, pol)
        assert series(res) == [111.0] and res.statuses[0].using_fallback
        assert res.conditions[0].status == "False"
        asked = len(fake.requests)
        await resolved(feed, pol, NOW_S + 60)  # retried 60 s after an error, not after a 429
        assert (len(fake.requests) == asked) == (mode == "429")
        fake.mode.clear()
        res = await resolved(feed, pol, NOW_S + 601)  # the service recovered: fresh data
        assert not res.statuses[0].stale and not res.statuses[0].using_fallback
    finally:
        await feed.close()
