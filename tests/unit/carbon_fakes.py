"""Fake grid-data services on loopback, each answering in its provider's documented shape.

``FakeGrid`` serves all of them from one aiohttp app; ``mode[path]`` makes a
path answer ``ok`` (the default), ``429`` (with Retry-After), ``500``,
``401``, ``garbage`` (not JSON), ``wrongshape`` (JSON of another shape) or
``slow`` (never within the client's timeout).  Every request is recorded.
"""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def emissions_data(location: str, values: list[float], minutes: int = 5,
                   start: datetime = NOW) -> list[dict[str, Any]]:
    """Carbon Aware SDK EmissionsData points, ``minutes`` apart from ``start``."""
    return [{"location": location, "timestamp": iso(start + timedelta(minutes=minutes * i)),
             "duration": minutes, "value": v} for i, v in enumerate(values)]


def exporter_configmap(points: list[dict[str, Any]]) -> dict[str, Any]:
    """A ConfigMap as Azure's kubernetes-carbon-intensity-exporter writes it."""
    values = [p["value"] for p in points]
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "carbonintensity", "namespace": "kube-system"},
        "immutable": True,
        "data": {"forecastDateTime": "2026-03-01 12:00:00 +0000 UTC",
                 "lastHeartbeatTime": "2026-03-01 11:57:26 +0000 UTC", "message": "",
                 "numOfRecords": str(len(points)), "minForecast": f"{min(values):f}",
                 "maxForecast": f"{max(values):f}"},
        "binaryData": {"data": base64.b64encode(json.dumps(points).encode()).decode()},
    }


@dataclass
class FakeGrid:
    sdk_values: list[float] = field(default_factory=lambda: [400.0, 300.0, 200.0])
    #: per-location forecasts (else sdk_values)
    sdk_by_location: dict[str, list[float]] = field(default_factory=dict)
    em_latest: float = 250.0
    em_forecast: list[float] = field(default_factory=lambda: [240.0, 230.0])
    wt_lbs: list[float] = field(default_factory=lambda: [1000.0, 900.0])
    prom_value: str = "123.5"
    token: str = "em-secret"
    wt_user: tuple[str, str] = ("alice", "pw")
    retry_after: str = "120"
    mode: dict[str, str] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, str], dict[str, str]]] = field(default_factory=list)
    logins: int = 0
    valid_wt_tokens: set[str] = field(default_factory=set)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/emissions/forecasts/current", self.sdk)
        app.router.add_get("/v3/carbon-intensity/latest", self.em_latest_h)
        app.router.add_get("/v3/carbon-intensity/forecast", self.em_forecast_h)
        app.router.add_get("/login", self.wt_login)
        app.router.add_get("/v3/forecast", self.wt_forecast)
        app.router.add_get("/api/v1/query", self.prom)
        return app

    async def _fault(self, request: web.Request) -> web.Response | None:
        self.requests.append((request.path, dict(request.query), dict(request.headers)))
        mode = self.mode.get(request.path, "ok")
        if mode == "429":
            return web.json_response({"message": "rate limited"}, status=429,
                                     headers={"Retry-After": self.retry_after})
        if mode == "500":
            return web.json_response({"error": "boom"}, status=500)
        if mode == "401":
            return web.json_response({"error": "unauthorized"}, status=401)
        if mode == "garbage":
            return web.Response(body=b"\x00\xffnot json<html>", content_type="text/html")
        if mode == "wrongshape":
            return web.json_response({"unexpected": [1, 2, 3]})
        if mode == "huge":
            return web.Response(body=b"[" + b"1," * (3 << 20) + b"1]",
                                content_type="application/json")
        if mode == "slow":
            await asyncio.sleep(30)
        return None

    async def sdk(self, request: web.Request) -> web.Response:
        if (bad := await self._fault(request)) is not None:
            return bad
        loc = request.query.get("location", "")
        values = self.sdk_by_location.get(loc, self.sdk_values)
        return web.json_response([{
            "generatedAt": iso(NOW), "requestedAt": iso(NOW), "location": loc,
            "dataStartAt": iso(NOW), "dataEndAt": iso(NOW + timedelta(minutes=15)),
            "windowSize": 5, "optimalDataPoints": emissions_data(loc, [min(values)]),
            "forecastData": emissions_data(loc, values),
        }])

    def _em_auth(self, request: web.Request) -> web.Response | None:
        if request.headers.get("auth-token") != self.token:
            return web.json_response({"message": "bad token"}, status=401)
        if "zone" not in request.query and not {"lat", "lon"} <= set(request.query):
            return web.json_response({"message": "zone or lat/lon"}, status=400)
        return None

    async def em_latest_h(self, request: web.Request) -> web.Response:
        if (bad := await self._fault(request)) is not None or (bad := self._em_auth(request)):
            return bad
        return web.json_response({
            "zone": request.query.get("zone", "DE"), "carbonIntensity": self.em_latest,
            "datetime": iso(NOW), "updatedAt": iso(NOW), "createdAt": iso(NOW),
            "emissionFactorType": "lifecycle", "isEstimated": False,
            "estimationMethod": None, "temporalGranularity": "hourly"})

    async def em_forecast_h(self, request: web.Request) -> web.Response:
        if (bad := await self._fault(request)) is not None or (bad := self._em_auth(request)):
            return bad
        return web.json_response({
            "zone": request.query.get("zone", "DE"), "updatedAt": iso(NOW),
            "forecast": [{"carbonIntensity": v, "datetime": iso(NOW + timedelta(hours=1 + i))}
                         for i, v in enumerate(self.em_forecast)]})

    async def wt_login(self, request: web.Request) -> web.Response:
        if (bad := await self._fault(request)) is not None:
            return bad
        expect = "Basic " + base64.b64encode(":".join(self.wt_user).encode()).decode()
        if request.headers.get("Authorization") != expect:
            return web.json_response({"error": "bad credentials"}, status=403)
        self.logins += 1
        token = f"wt-token-{self.logins}"
        self.valid_wt_tokens.add(token)
        return web.json_response({"token": token})

    async def wt_forecast(self, request: web.Request) -> web.Response:
        if (bad := await self._fault(request)) is not None:
            return bad
        auth = request.headers.get("Authorization", "")
        if auth.removeprefix("Bearer ") not in self.valid_wt_tokens:
            return web.json_response({"error": "token expired"}, status=401)
        if request.query.get("signal_type") != "co2_moer" or "region" not in request.query:
            return web.json_response({"error": "region and signal_type"}, status=400)
        return web.json_response({
            "data": [{"point_time": (NOW + timedelta(minutes=5 * i)).isoformat(), "value": v}
                     for i, v in enumerate(self.wt_lbs)],
            "meta": {"data_point_period_seconds": 300, "region": request.query["region"],
                     "signal_type": "co2_moer", "model": {"date": "2026-02-01"},
                     "units": "lbs_co2_per_mwh", "generated_at_period_seconds": 300,
                     "generated_at": NOW.isoformat()}})

    async def prom(self, request: web.Request) -> web.Response:
        if (bad := await self._fault(request)) is not None:
            return bad
        return web.json_response({"status": "success", "data": {
            "resultType": "vector",
            "result": [{"metric": {"__name__": "site_grid_intensity"},
                        "value": [NOW.timestamp(), self.prom_value]}]}})
