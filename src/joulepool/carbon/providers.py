"""One client per carbon-intensity provider, each speaking that service's documented shape.

Every client is ``async (spec, ctx, now_s) -> Reading`` with points in
gCO2/kWh; it raises :class:`~joulepool.carbon.base.SourceError` for anything
it cannot read.  Shapes (read from each provider's public docs):

- Carbon Aware SDK Web API ``GET /emissions/forecasts/current?location=L``:
  ``[{"location", "forecastData": [{"location", "timestamp", "duration"
  (minutes), "value" (gCO2/kWh)}], ...}]``;
- the ConfigMap that Azure's kubernetes-carbon-intensity-exporter writes:
  ``binaryData.data`` = base64 of the same EmissionsData JSON array;
- Electricity Maps ``GET /v3/carbon-intensity/latest`` and ``/forecast``
  (``zone`` or ``lat``/``lon``; header ``auth-token``):
  ``{"zone", "carbonIntensity", "datetime", ...}`` and
  ``{"zone", "forecast": [{"carbonIntensity", "datetime"}], ...}``; average
  (lifecycle) intensity in gCO2eq/kWh;
- WattTime v3: ``GET /login`` (HTTP basic) -> ``{"token"}``; ``GET
  /v3/forecast?region=R&signal_type=co2_moer`` (bearer) ->
  ``{"data": [{"point_time", "value"}], "meta": {"units": "lbs_co2_per_mwh",
  "data_point_period_seconds", ...}}``; marginal (MOER);
- Prometheus ``GET /api/v1/query?query=Q`` -> ``{"status": "success",
  "data": {"resultType": "vector"|"scalar", "result": ...}}``.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from joulepool.api.models import CarbonSourceSpec
from joulepool.carbon.base import (
    FetchContext,
    Reading,
    SourceError,
    get_json,
    intensity,
    number,
    parse_time,
    read_object,
)
from joulepool.core.energy import IntensityPoint

Fetcher = Callable[[CarbonSourceSpec, FetchContext, float], Awaitable[Reading]]

#: public endpoints used when a source gives no url
DEFAULT_URLS = {
    "electricityMaps": "https://api.electricitymaps.com",
    "wattTime": "https://api.watttime.org",
}
#: WattTime says a login token lasts 30 minutes; renew a little earlier
WATTTIME_TOKEN_TTL_S = 25 * 60
#: WattTime ``meta.units`` -> our unit names
WATTTIME_UNITS = {"lbs_co2_per_mwh": "lbsPerMWh", "g_co2_per_kwh": "gPerKWh",
                  "kg_co2_per_mwh": "kgPerMWh"}
#: Electricity Maps ``temporalGranularity`` -> seconds
EM_GRANULARITY_S = {"5_minutes": 300.0, "15_minutes": 900.0, "hourly": 3600.0,
                    "daily": 86400.0}


def base_url(spec: CarbonSourceSpec) -> str:
    url = spec.url or DEFAULT_URLS.get(spec.provider)
    if not url:
        raise SourceError("config", f"carbon source {spec.provider} needs a url")
    return url.rstrip("/")


def signal_of(spec: CarbonSourceSpec) -> str:
    return spec.signal or ("marginal" if spec.provider == "wattTime" else "average")


def _bearer(ctx: FetchContext) -> dict[str, str]:
    token = ctx.credentials.values.get("token")
    return {"Authorization": f"Bearer {token}"} if token else {}


# ------------------------------------------------------------ EmissionsData (SDK, ConfigMap)
def _minutes(value: Any, what: str) -> float:
    """EmissionsData ``duration``: minutes as a number, or a .NET TimeSpan "hh:mm:ss"."""
    if isinstance(value, str) and ":" in value:
        try:
            h, m, s = (float(x) for x in value.split(":"))
        except ValueError as exc:
            raise SourceError("garbage", f"{what}: bad duration {value!r}") from exc
        return h * 60 + m + s / 60
    return number(value, what)


def emissions_points(data: Any, unit: str, what: str) -> tuple[IntensityPoint, ...]:
    """A JSON array of EmissionsData ``{location, timestamp, duration, value}``."""
    if not isinstance(data, list) or not data:
        raise SourceError("garbage", f"{what}: expected a non-empty EmissionsData array")
    points = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise SourceError("garbage", f"{what}[{i}] is not an object")
        duration_min = _minutes(item.get("duration"), f"{what}[{i}].duration")
        if duration_min <= 0:
            raise SourceError("garbage", f"{what}[{i}].duration must be > 0")
        points.append(IntensityPoint(
            parse_time(item.get("timestamp"), f"{what}[{i}].timestamp"),
            duration_min * 60.0,
            intensity(item.get("value"), unit, f"{what}[{i}].value")))
    return tuple(points)


async def fetch_carbon_aware_sdk(
    spec: CarbonSourceSpec, ctx: FetchContext, now_s: float,
) -> Reading:
    """Carbon Aware SDK Web API: the current forecast for ``spec.location``."""
    url = f"{base_url(spec)}/emissions/forecasts/current"
    body = await get_json(ctx, url, params={"location": spec.location or ""},
                          headers=_bearer(ctx))
    if not isinstance(body, list) or not body or not isinstance(body[0], dict):
        raise SourceError("garbage", f"{url}: expected an array of EmissionsForecast")
    points = emissions_points(body[0].get("forecastData"), spec.unit or "gPerKWh",
                              f"{url} forecastData")
    return Reading(points, signal_of(spec))


async def fetch_configmap(spec: CarbonSourceSpec, ctx: FetchContext, now_s: float) -> Reading:
    """The exporter's ConfigMap: EmissionsData JSON in ``binaryData[key]`` (or ``data[key]``)."""
    ref = spec.config_map
    if ref is None or ctx.read_object is None:
        raise SourceError("config", "configMap source without a ConfigMap or API access")
    what = f"ConfigMap {ref.namespace}/{ref.name}"
    cm = await read_object(ctx, f"/api/v1/namespaces/{ref.namespace}/configmaps/{ref.name}",
                           what)
    raw: bytes | None = None
    if ref.key in (cm.get("binaryData") or {}):
        try:
            raw = base64.b64decode(cm["binaryData"][ref.key], validate=True)
        except (binascii.Error, ValueError, TypeError) as exc:
            raise SourceError("garbage", f"{what}: binaryData.{ref.key} is not base64") from exc
    elif ref.key in (cm.get("data") or {}):
        raw = str(cm["data"][ref.key]).encode()
    if raw is None:
        raise SourceError("garbage", f"{what} has no key {ref.key!r}")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError("garbage", f"{what}: {ref.key} is not JSON") from exc
    return Reading(emissions_points(data, spec.unit or "gPerKWh", what), signal_of(spec))


# ------------------------------------------------------------ Electricity Maps
def _em_params(spec: CarbonSourceSpec) -> dict[str, str]:
    if spec.location:
        return {"zone": spec.location}
    return {"lat": f"{spec.latitude}", "lon": f"{spec.longitude}"}


def _spaced(starts: Sequence[float], default_s: float) -> list[float]:
    """Durations of points that start at ``starts`` (sorted): the gap to the next one."""
    out = [b - a for a, b in itertools.pairwise(starts)]
    out.append(out[-1] if out else default_s)
    return [d if d > 0 else default_s for d in out]


async def fetch_electricity_maps(
    spec: CarbonSourceSpec, ctx: FetchContext, now_s: float,
) -> Reading:
    """Electricity Maps: the latest value, then the forecast where the plan includes it."""
    url = base_url(spec)
    headers = {"auth-token": ctx.credentials.need("token")}
    unit = spec.unit or "gPerKWh"
    latest = await get_json(ctx, f"{url}/v3/carbon-intensity/latest",
                            params=_em_params(spec), headers=headers)
    if not isinstance(latest, dict):
        raise SourceError("garbage", f"{url}/v3/carbon-intensity/latest: not an object")
    step = EM_GRANULARITY_S.get(str(latest.get("temporalGranularity")), 3600.0)
    points = [IntensityPoint(parse_time(latest.get("datetime"), "latest.datetime"), step,
                             intensity(latest.get("carbonIntensity"), unit,
                                       "latest.carbonIntensity"))]
    try:
        fc = await get_json(ctx, f"{url}/v3/carbon-intensity/forecast",
                            params=_em_params(spec), headers=headers)
    except SourceError as exc:
        if exc.reason not in ("auth", "http"):
            raise
        return Reading(tuple(points), signal_of(spec))  # forecast not in this plan
    items = fc.get("forecast") if isinstance(fc, dict) else None
    if not isinstance(items, list):
        raise SourceError("garbage", f"{url}/v3/carbon-intensity/forecast: no forecast array")
    rows = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise SourceError("garbage", f"forecast[{i}] is not an object")
        rows.append((parse_time(item.get("datetime"), f"forecast[{i}].datetime"),
                     intensity(item.get("carbonIntensity"), unit,
                               f"forecast[{i}].carbonIntensity")))
    rows.sort()
    future = [r for r in rows if r[0] >= points[0].end_s]
    durations = _spaced([t for t, _ in future], step)
    points += [IntensityPoint(t, d, v) for (t, v), d in zip(future, durations, strict=True)]
    return Reading(tuple(points), signal_of(spec))


# ------------------------------------------------------------ WattTime
async def _watttime_token(url: str, ctx: FetchContext, now_s: float, renew: bool) -> str:
    token, until = ctx.memo.get("token"), float(ctx.memo.get("token_until", 0.0))
    if token and not renew and now_s < until:
        return str(token)
    user_pass = f"{ctx.credentials.need('username')}:{ctx.credentials.need('password')}"
    basic = "Basic " + base64.b64encode(user_pass.encode()).decode()
    body = await get_json(ctx, f"{url}/login", headers={"Authorization": basic})
    token = body.get("token") if isinstance(body, dict) else None
    if not isinstance(token, str) or not token:
        raise SourceError("garbage", f"{url}/login: no token in the answer")
    ctx.memo.update(token=token, token_until=now_s + WATTTIME_TOKEN_TTL_S)
    return token


async def fetch_watttime(spec: CarbonSourceSpec, ctx: FetchContext, now_s: float) -> Reading:
    """WattTime v3: the co2_moer forecast for ``spec.location`` (a region); one re-login on 401."""
    url = base_url(spec)
    params = {"region": spec.location or "", "signal_type": "co2_moer"}
    for attempt in (0, 1):
        token = await _watttime_token(url, ctx, now_s, renew=attempt > 0)
        try:
            body = await get_json(ctx, f"{url}/v3/forecast", params=params,
                                  headers={"Authorization": f"Bearer {token}"})
            break
        except SourceError as exc:
            if exc.reason != "auth" or attempt:
                raise
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        raise SourceError("garbage", f"{url}/v3/forecast: no data array")
    meta: dict[str, Any] = body["meta"] if isinstance(body.get("meta"), dict) else {}
    unit = spec.unit or WATTTIME_UNITS.get(str(meta.get("units")))
    if unit is None:
        raise SourceError("garbage", f"{url}/v3/forecast: unknown units {meta.get('units')!r}")
    period = meta.get("data_point_period_seconds")
    rows = []
    for i, item in enumerate(body["data"]):
        if not isinstance(item, dict):
            raise SourceError("garbage", f"data[{i}] is not an object")
        rows.append((parse_time(item.get("point_time"), f"data[{i}].point_time"),
                     intensity(item.get("value"), unit, f"data[{i}].value")))
    if not rows:
        raise SourceError("garbage", f"{url}/v3/forecast: empty data")
    rows.sort()
    step = number(period, "meta.data_point_period_seconds") if period is not None else 300.0
    durations = _spaced([t for t, _ in rows], step)
    points = tuple(IntensityPoint(t, d, v) for (t, v), d in zip(rows, durations, strict=True))
    return Reading(points, signal_of(spec))


# ------------------------------------------------------------ Prometheus
async def fetch_prometheus(spec: CarbonSourceSpec, ctx: FetchContext, now_s: float) -> Reading:
    """An instant query; its first sample holds until the next refresh."""
    url = f"{base_url(spec)}/api/v1/query"
    body = await get_json(ctx, url, params={"query": spec.query or ""}, headers=_bearer(ctx))
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(body, dict) or body.get("status") != "success" or not isinstance(data,
                                                                                        dict):
        raise SourceError("garbage", f"{url}: not a successful query answer: {body!r:.200}")
    kind, result = data.get("resultType"), data.get("result")
    if kind == "vector" and isinstance(result, list):
        if not result:
            raise SourceError("nodata", f"{url}: the query returned no series")
        sample = result[0].get("value") if isinstance(result[0], dict) else None
    elif kind == "scalar":
        sample = result
    else:
        raise SourceError("garbage", f"{url}: resultType {kind!r}; need vector or scalar")
    if not isinstance(sample, list) or len(sample) != 2:
        raise SourceError("garbage", f"{url}: bad sample {sample!r:.100}")
    at = number(sample[0], "sample time")
    value = intensity(sample[1], spec.unit or "gPerKWh", "sample value")
    return Reading((IntensityPoint(at, spec.refresh_seconds, value),), signal_of(spec))


FETCHERS: dict[str, Fetcher] = {
    "carbonAwareSDK": fetch_carbon_aware_sdk,
    "configMap": fetch_configmap,
    "electricityMaps": fetch_electricity_maps,
    "wattTime": fetch_watttime,
    "prometheus": fetch_prometheus,
}
