"""SLO signals from engine metrics: parsing, windows, scraping over HTTP, discovery."""

from __future__ import annotations

import math
import types

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from joulepool.core.controllers import Direction, MIADController, PeriodLatencies, miad_signal
from joulepool.core.profiles import H100
from joulepool.nodeagent.discovery import endpoint_for_pod
from joulepool.nodeagent.signals import (
    EngineSample,
    EngineWindow,
    PrometheusSignalSource,
    metrics_url,
    parse_engine_metrics,
    parse_engine_spec,
    tail,
)
from joulepool.nodeagent.signals import Histogram as H


def vllm_text(ttft: list[float], tpot: list[float], waiting: int = 0, tokens: int = 0,
              model: str = "m", gpu: str | None = None, running: int = 1) -> str:
    r = CollectorRegistry()
    Gauge("vllm:num_requests_waiting", "", ["model_name"], registry=r).labels(model).set(waiting)
    Gauge("vllm:num_requests_running", "", ["model_name"], registry=r).labels(model).set(running)
    h1 = Histogram("vllm:time_to_first_token_seconds", "", ["model_name"], registry=r,
                   buckets=(0.1, 0.5, 1.0, 2.0))
    h2 = Histogram("vllm:time_per_output_token_seconds", "", ["model_name"], registry=r,
                   buckets=(0.01, 0.02, 0.05, 0.1))
    for v in ttft:
        h1.labels(model).observe(v)
    for v in tpot:
        h2.labels(model).observe(v)
    Counter("vllm:generation_tokens", "", ["model_name"], registry=r).labels(model).inc(tokens)
    if gpu is not None:
        Gauge("joulepool_engine_gpu_info", "", ["gpu", "product", "model_name"],
              registry=r).labels(gpu, "H100", model).set(1)
    return generate_latest(r).decode()


def test_parse_vllm_exposition():
    s = parse_engine_metrics(vllm_text([0.2, 0.3, 1.5], [0.015] * 10, waiting=2, tokens=42,
                                       gpu="0,3"))
    assert s.waiting == 2 and s.running == 1
    assert s.generation_tokens == 42
    assert s.model == "m"
    assert s.gpus == frozenset({0, 3})
    assert s.ttft.bounds == (0.1, 0.5, 1.0, 2.0, math.inf)
    assert s.ttft.counts == (0, 2, 2, 3, 3)
    assert s.tpot.counts[1] == 10


def test_parse_sums_over_label_sets_and_ignores_other_metrics():
    text = vllm_text([0.2], [0.015], model="a", tokens=5) + "\n".join([
        '# TYPE other_metric gauge', 'other_metric 7'
    ]) + "\n"
    s = parse_engine_metrics(text)
    assert s.generation_tokens == 5
    assert parse_engine_metrics("").ttft.bounds == ()


def _signal(latencies: PeriodLatencies, tokens: float) -> tuple[float | None, float | None,
                                                                 float]:
    """(TTFT tail, TPOT, tokens) MIAD reads from one scrape (core's miad_signal)."""
    sig = miad_signal(latencies)
    return sig.ttft_tail_s, sig.mean_itl_s, tokens


def test_window_tail_uses_only_recent_observations():
    w = EngineWindow(window_s=5.0)
    old = parse_engine_metrics(vllm_text([], [0.09] * 100, tokens=100))  # slow, long ago
    ttft, tpot, tokens = _signal(*w.add(0.0, old, 0.9))
    assert tpot is not None and tpot > 0.05  # first scrape: everything so far
    assert tokens == 0.0
    t = 0.0
    for _ in range(10):  # then 10 s of fast tokens
        t += 1.0
        new = parse_engine_metrics(vllm_text([], [0.09] * 100 + [0.015] * int(50 * t),
                                             tokens=100 + int(50 * t)))
        ttft, tpot, tokens = _signal(*w.add(t, new, 0.9))
    assert tokens == pytest.approx(50.0)
    assert tpot is not None and 0.01 <= tpot <= 0.02  # the slow past fell out of the window
    assert ttft is None  # no first tokens in the window


def test_window_handles_engine_restart():
    w = EngineWindow(window_s=5.0)
    w.add(0.0, parse_engine_metrics(vllm_text([], [0.015] * 500, tokens=500)), 0.9)
    _, tpot, tokens = _signal(*w.add(1.0, parse_engine_metrics(vllm_text([], [0.09] * 3,
                                                                         tokens=3)), 0.9))
    assert tokens == 3.0  # counter reset: the new value is the increase
    assert tpot is not None and tpot > 0.05


def test_tail_without_inf_bucket():
    assert tail(0.5, H((0.1, 0.2), (1, 2)), None) == pytest.approx(0.1)
    assert tail(0.5, H(), None) is None


def test_engine_spec_and_urls():
    e = parse_engine_spec("0,2@http://10.0.0.5:8000", pool="ns.p")
    assert e.url == "http://10.0.0.5:8000/metrics" and e.gpus == frozenset({0, 2})
    assert e.pool == "ns.p"
    assert parse_engine_spec("http://h:1/custom").url == "http://h:1/custom"
    assert parse_engine_spec("http://h:1/").gpus is None
    assert metrics_url("https://h") == "https://h/metrics"
    for bad in ("x@http://h:1", "localhost:8000", "-1@http://h:1", "@http://h:1"):
        with pytest.raises(ValueError):
            parse_engine_spec(bad)


async def _serve(handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}"


async def test_scrapes_over_http_and_reports_failures():
    state = {"tokens": 0, "fail": False}

    async def handler(_):
        if state["fail"]:
            return web.Response(status=500)
        state["tokens"] += 10
        return web.Response(text=vllm_text([0.2], [0.015] * state["tokens"],
                                           tokens=state["tokens"], gpu="1"))

    runner, base = await _serve(handler)
    errors: list[str] = []
    src = PrometheusSignalSource([parse_engine_spec(base)], stale_s=2.0, on_error=errors.append)
    try:
        (r1,) = await src.read(0.0)
        (r2,) = await src.read(1.0)
        assert r1.fresh and r2.fresh and not r2.stale
        assert r2.tokens == 10.0 and r2.gpus == frozenset({1}) and r2.model == "m"
        assert r2.mean_itl_s is not None and 0.01 < r2.mean_itl_s <= 0.02
        state["fail"] = True
        (r3,) = await src.read(2.0)
        assert not r3.fresh and not r3.stale and r3.gpus == frozenset({1})
        (r4,) = await src.read(4.0)
        assert r4.stale
        assert errors == [base + "/metrics"] * 2
    finally:
        await src.close()
        await runner.cleanup()
    # an engine nobody listens on: not fresh, stale at once (never seen)
    src = PrometheusSignalSource([parse_engine_spec("http://127.0.0.1:9")], timeout_s=0.5)
    (r,) = await src.read(0.0)
    assert not r.fresh and r.stale
    await src.close()


async def test_discovery_is_merged_and_failures_keep_the_last_list():
    calls = {"n": 0}
    found = [parse_engine_spec("http://127.0.0.1:9", pool="ns.a")]

    async def discover():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("API down")
        return found

    clock = {"t": 0.0}
    src = PrometheusSignalSource([], discover=discover, discover_interval_s=10.0,
                                 timeout_s=0.2, monotonic=lambda: clock["t"])
    (r,) = await src.read(0.0)
    assert r.pool == "ns.a"
    clock["t"] = 11.0
    (r,) = await src.read(1.0)  # discovery failed: still the old engine
    assert calls["n"] == 2 and r.engine == "http://127.0.0.1:9/metrics"
    await src.close()


def _pod(ip="10.1.2.3", phase="Running", ports=((8000, "http"),), annotations=None,
         labels=None):
    ns = types.SimpleNamespace
    return ns(
        status=ns(pod_ip=ip, phase=phase),
        metadata=ns(labels=labels or {"joulepool.dev/pool": "ns.chat"},
                    annotations=annotations or {}),
        spec=ns(containers=[ns(ports=[ns(container_port=p, name=n) for p, n in ports])]))


def test_endpoint_for_pod():
    e = endpoint_for_pod(_pod())
    assert e is not None and e.url == "http://10.1.2.3:8000/metrics" and e.pool == "ns.chat"
    assert endpoint_for_pod(_pod(phase="Pending")) is None
    e = endpoint_for_pod(_pod(annotations={"joulepool.dev/metrics-port": "9000",
                                           "joulepool.dev/gpus": "1,2"}))
    assert e is not None and e.url.endswith(":9000/metrics") and e.gpus == frozenset({1, 2})
    e = endpoint_for_pod(_pod(ip="fd00::1", ports=((5000, "grpc"), (8080, "metrics"))))
    assert e is not None and e.url == "http://[fd00::1]:8080/metrics"


@pytest.mark.parametrize(("condition", "deleting", "ready"), [
    ("True", False, True), ("False", False, False), (None, False, False),
    ("True", True, False)])
def test_a_discovered_pod_is_ready_by_the_routing_services_rule(condition, deleting, ready):
    """The endpoint of a Running pod (kubernetes client V1Pod) carries its readiness as the
    routing service reads the same pod (kube.objects.Pod.ready): Ready condition True and
    not being deleted; a pod that is not Ready is still scraped."""
    from datetime import UTC, datetime

    from kubernetes.client import (
        ApiClient,
        V1Container,
        V1ObjectMeta,
        V1Pod,
        V1PodCondition,
        V1PodSpec,
        V1PodStatus,
    )

    from joulepool.kube.objects import Pod

    v1 = V1Pod(
        metadata=V1ObjectMeta(name="p", namespace="ns", labels={"joulepool.dev/pool": "ns.c"},
                              deletion_timestamp=datetime.now(UTC) if deleting else None),
        spec=V1PodSpec(containers=[V1Container(name="vllm")]),
        status=V1PodStatus(phase="Running", pod_ip="10.1.2.3", conditions=None
                           if condition is None else [V1PodCondition(type="Ready",
                                                                     status=condition)]))
    e = endpoint_for_pod(v1)
    assert e is not None and e.ready is ready
    assert Pod.model_validate(ApiClient().sanitize_for_serialization(v1)).ready is ready


def test_engine_sample_defaults():
    assert EngineSample().gpus is None


def test_the_period_mean_itl_is_the_histograms_increment_between_two_scrapes():
    """One slow early gap leaves the period's mean as soon as a period passes, however
    long the TTFT window; a restart (counts falling) or a new bucket layout starts over."""
    from joulepool.nodeagent.signals import increment

    w = EngineWindow(window_s=60.0)
    first, _ = w.add(0.0, parse_engine_metrics(vllm_text([], [0.09] + [0.015] * 9)), 0.9)
    assert first.itl_count == 10 and first.mean_itl == pytest.approx((0.09 + 9 * 0.015) / 10)
    later, _ = w.add(1.0, parse_engine_metrics(vllm_text([], [0.09] + [0.015] * 109)), 0.9)
    assert later.itl_count == 100 and later.mean_itl == pytest.approx(0.015)
    old = H((0.1, math.inf), (5, 6), 0.4, 6)
    assert increment(H((0.1, math.inf), (8, 9), 0.5, 9), old) == (pytest.approx(0.1), 3)
    assert increment(H((0.1, math.inf), (1, 2), 0.05, 2), old) == (0.05, 2)  # restarted
    assert increment(H((0.2, math.inf), (8, 9), 0.5, 9), old) == (0.5, 9)  # new layout
    assert increment(H((0.1, math.inf), (8, 9), 0.5, 9), None) == (0.5, 9)


def test_a_period_with_requests_running_and_no_gap_reads_as_a_stall():
    """Requests running at both scrapes and no token gap between them (a step longer
    than the period, a stalled engine): TPOT is at least the time between the scrapes,
    so MIAD raises the clock instead of reading 'no signal' and lowering it."""
    w = EngineWindow(window_s=0.0)
    gaps = [0.015] * 10
    w.add(0.0, parse_engine_metrics(vllm_text([], gaps)), 0.9)
    stuck, _ = w.add(1.5, parse_engine_metrics(vllm_text([], gaps)), 0.9)
    assert stuck.itl_count == 0 and stuck.stalled == pytest.approx(1.5)
    assert miad_signal(stuck).mean_itl_s == pytest.approx(1.5)
    ctrl = MIADController(H100.supported_clocks(), ttft_target_s=0.5, tpot_target_s=0.05)
    assert ctrl.step(ctrl.lowest, miad_signal(stuck))[1] is Direction.UP
    # nothing running at the end of the period: idle, not stalled
    idle, _ = w.add(2.5, parse_engine_metrics(vllm_text([], gaps, running=0)), 0.9)
    assert idle.stalled == 0.0 and miad_signal(idle).mean_itl_s is None
    # a gap completed: the mean gap is the signal, the stall rule stays out
    moving, _ = w.add(3.5, parse_engine_metrics(vllm_text([], [*gaps, 0.04])), 0.9)
    assert moving.stalled == 0.0 and miad_signal(moving).mean_itl_s == pytest.approx(0.04)
