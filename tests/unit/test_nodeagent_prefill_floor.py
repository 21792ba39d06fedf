"""MIAD's prefill clock floor in the node agent: the prompt quantile from the engine's
prompt-length histogram, and the floor core.controllers.prefill_clock_floor puts under
MIAD (the simulator's function), on the simulated backend with injected time."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from test_nodeagent_agent import ProfileEngine, Rig, gpu_labels

from joulepool.api.enginemetrics import SGLANG, VLLM, parse_engine_metrics
from joulepool.core.batching import unqueued_first_token_s
from joulepool.core.controllers import MIADController, prefill_clock_floor
from joulepool.core.estimators import histogram_quantile
from joulepool.core.powercap import clock_under_power_cap, power_cap_for_clock
from joulepool.core.profiles import H100, H100_8B, default_batched_tokens
from joulepool.fakes.engine import SGLANG_PROMPT_BUCKETS, one_two_five_buckets
from joulepool.nodeagent.agent import FloorState
from joulepool.nodeagent.signals import PROMPT_QUANTILE, PromptWindow
from joulepool.nodeagent.signals import Histogram as H

INF = math.inf


def cumulative(samples: np.ndarray, bounds: tuple[float, ...]) -> list[float]:
    """Prometheus cumulative bucket counts of ``samples`` (``le`` semantics, +Inf last)."""
    return [float(np.count_nonzero(samples <= b)) for b in (*bounds, INF)]


# ------------------------------------------------------------------ the quantile (core)
@pytest.mark.parametrize("q", [0.5, 0.9, 0.99])
def test_histogram_quantile_matches_numpy_with_fine_buckets(q):
    rng = np.random.default_rng(11)
    prompts = np.round(rng.lognormal(np.log(900.0), 0.8, 20_000))
    bounds = tuple(float(b) for b in np.arange(10.0, 40_000.0, 10.0))
    got = histogram_quantile(q, (*bounds, INF), cumulative(prompts, bounds))
    # linear interpolation inside 10-token buckets: within one bucket of numpy's quantile
    assert got == pytest.approx(float(np.quantile(prompts, q)), abs=10.0)


@pytest.mark.parametrize("bounds", [one_two_five_buckets(131_072), SGLANG_PROMPT_BUCKETS],
                         ids=["vllm", "sglang"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_histogram_quantile_stays_in_numpys_bucket_with_engine_buckets(bounds, seed):
    """With the engines' coarse buckets the interpolated quantile lies in the bucket that
    holds numpy's quantile of the same prompts (no more can be known from the page)."""
    rng = np.random.default_rng(seed)
    prompts = np.round(rng.lognormal(np.log(1500.0), 1.0, 5_000))
    fb = tuple(float(b) for b in bounds)
    got = histogram_quantile(PROMPT_QUANTILE, (*fb, INF), cumulative(prompts, fb))
    exact = float(np.quantile(prompts, PROMPT_QUANTILE))
    i = int(np.searchsorted(fb, exact))  # numpy's quantile lies in (fb[i-1], fb[i]]
    lo, hi = (fb[i - 1] if i > 0 else 0.0), (fb[i] if i < len(fb) else fb[-1])
    assert got is not None and lo - 1e-9 <= got <= hi + 1e-9, (got, exact, lo, hi)


# ------------------------------------------------------------------ the window (signals)
def hist(samples, bounds=(100.0, 1000.0, 10_000.0)) -> H:
    return H((*bounds, INF), tuple(cumulative(np.asarray(samples, dtype=float), bounds)))


def test_prompt_window_reads_recent_prompts_then_falls_back_to_all_then_restarts():
    w = PromptWindow(window_s=60.0)
    assert w.add(0.0, H(), 0.99) is None  # no histogram on the page
    assert w.add(0.0, hist([]), 0.99) is None  # no request finished yet
    long_ones = [5000.0] * 50
    assert w.add(10.0, hist(long_ones), 0.99) > 1000.0
    # 100 short prompts later, then the window passes the long ones: only short ones count
    w.add(20.0, hist(long_ones + [50.0] * 100), 0.99)
    assert w.add(90.0, hist(long_ones + [50.0] * 100 + [60.0] * 100), 0.99) <= 100.0
    # nothing new in the window: every prompt since the engine started
    now = w.add(200.0, hist(long_ones + [50.0] * 100 + [60.0] * 100), 0.99)
    assert now == pytest.approx(histogram_quantile(
        0.99, (100.0, 1000.0, 10_000.0, INF), hist(long_ones + [50.0] * 200).counts))
    # the engine restarted (counts fell): only what it counted since
    assert w.add(210.0, hist([50.0]), 0.99) <= 100.0


def prompt_page(engine: str, prompts: list[float], bounds: tuple[int, ...]) -> str:
    spec = SGLANG if engine == "sglang" else VLLM
    r = CollectorRegistry()
    h = Histogram(spec.prompt_tokens[0], "", ["model_name"], buckets=bounds, registry=r)
    h.labels("m")  # the series exists before the first request finishes, as in vLLM
    for p in prompts:
        h.labels("m").observe(p)
    return generate_latest(r).decode()


@pytest.mark.parametrize("engine,bounds", [("vllm", one_two_five_buckets(131_072)),
                                           ("sglang", SGLANG_PROMPT_BUCKETS)])
def test_engine_pages_yield_the_prompt_histogram(engine, bounds):
    s = parse_engine_metrics(prompt_page(engine, [120.0, 3000.0, 3000.0], bounds))
    assert s.engine == engine
    assert s.prompt_tokens.bounds[-1] == INF and s.prompt_tokens.counts[-1] == 3
    assert parse_engine_metrics(prompt_page(engine, [], bounds)).prompt_tokens.counts[-1] == 0


# ------------------------------------------------------------------ the floor (agent)
class PromptEngine(ProfileEngine):
    """A ProfileEngine whose page carries a prompt quantile (None: no histogram)."""

    def __init__(self, *a, prompt: float | None = None, histogram: bool = True,
                 running: int = 0, **kw) -> None:
        super().__init__(*a, **kw)
        self.prompt = prompt
        self.running = running  # the engine's running gauge
        self.histogram = histogram
        self.page = H((1000.0, 10_000.0, INF), (0.0, 0.0, 0.0))  # the scraped histogram
        self.pool: str | None = None

    def reading(self, dt: float):
        return replace(super().reading(dt), prompts=self.page if self.histogram else None,
                       prompt_tail_tokens=self.prompt if self.histogram else None,
                       pool=self.pool, running=self.running)


def add_engine(rig: Rig, **kw) -> PromptEngine:
    e = PromptEngine(rig.gpus, [0], 4, url=f"http://e{len(rig.engines)}", **kw)
    rig.engines.append(e)
    return e


def expected_floor(prompt: float, ttft_s: float, margin: float = MIADController.margin) -> float:
    clocks = [f for f in H100.supported_clocks()
              if H100.f_min_mhz.value - 1e-6 <= f <= H100.f_max_mhz.value + 1e-6]
    return prefill_clock_floor(lambda f: float(H100_8B.prefill_s(prompt, f)), clocks, ttft_s,
                               margin)


async def test_long_prompts_raise_the_floor_and_the_clock_never_goes_under_it():
    ttft = 0.6
    rig = Rig(slo=(ttft, 0.05))
    await rig.agent.start()
    e = add_engine(rig, prompt=200.0)
    await rig.ticks(40)  # light load, short prompts: MIAD walks down to the lowest clock
    assert rig.locked(0) == H100.f_min_mhz.value
    assert rig.metric("joulepool_miad_prefill_floor_state", state="applied",
                      **gpu_labels()) == 1
    assert rig.metric("joulepool_miad_prefill_floor_hertz", **gpu_labels()) == \
        H100.f_min_mhz.value * 1e6
    e.prompt = 8000.0  # 0.8 s at 990 MHz, 0.4 s at f_max: a 0.6 s TTFT needs ~1,470 MHz
    floor = expected_floor(8000.0, ttft)
    assert H100.f_min_mhz.value < floor < H100.f_max_mhz.value
    assert float(H100_8B.prefill_s(8000.0, floor)) <= 0.9 * ttft
    await rig.ticks(1)
    assert rig.locked(0) == floor  # raised at once, not after a missed first token
    assert rig.metric("joulepool_miad_decisions_total", direction="up", **gpu_labels()) == 1
    for _ in range(30):  # MIAD keeps wanting to lower it; it stays at the floor
        await rig.ticks(1)
        assert rig.locked(0) >= floor
    assert rig.locked(0) == floor
    assert rig.metric("joulepool_miad_prefill_floor_hertz", **gpu_labels()) == floor * 1e6
    assert rig.metric("joulepool_miad_prefill_floor_prompt_tokens", **gpu_labels()) == 8000.0
    # TPOT still met at the floor: the batch's step time is well inside the SLO
    assert float(H100_8B.itl_s(4, floor)) <= 0.05 * 0.9
    # a TPOT risk still raises the clock above the floor
    e.extra_tpot = 0.2
    await rig.ticks(1)
    assert rig.locked(0) > floor
    e.extra_tpot = 0.0
    e.prompt = 200.0  # short prompts again: the floor falls and MIAD walks down past it
    await rig.ticks(60)
    assert rig.locked(0) == H100.f_min_mhz.value


@pytest.mark.parametrize("histogram,prompt,model,state", [
    (False, None, None, FloorState.NO_HISTOGRAM),
    (True, None, None, FloorState.NO_TRAFFIC),
    (True, 8000.0, "some-unprofiled-model", FloorState.NO_PROFILE),
])
async def test_without_a_known_prompt_tail_miad_behaves_as_before_and_says_why(
        histogram, prompt, model, state, caplog):
    caplog.set_level("INFO", logger="joulepool.nodeagent")
    rig = Rig(slo=(0.6, 0.05))
    await rig.agent.start()
    e = add_engine(rig, prompt=prompt, histogram=histogram)
    if model is not None:  # the engine serves a model joulepool has no profile of
        e.profile = replace(H100_8B, model=model)
    await rig.ticks(40)
    assert rig.locked(0) == H100.f_min_mhz.value  # no floor: all the way down, as today
    for st in FloorState:
        assert rig.metric("joulepool_miad_prefill_floor_state", state=st.value,
                          **gpu_labels()) == (1 if st is state else 0)
    assert rig.metric("joulepool_miad_prefill_floor_hertz", **gpu_labels()) == 0
    said = [r.getMessage() for r in caplog.records if "prefill clock floor" in r.getMessage()]
    assert said == [f"GPU 0: no MIAD prefill clock floor: {state.reason}"]  # once


async def test_in_power_mode_the_floor_is_the_lowest_limit_that_keeps_the_floors_clock():
    ttft = 0.6
    rig = Rig(slo=(ttft, 0.05), control="power")
    await rig.agent.start()
    e = add_engine(rig, prompt=200.0)
    await rig.ticks(80)  # short prompts, light load: MIAD walks the limit down to its lowest
    lowest = rig.gpus.gpu(0)["power_limit_w"]
    assert lowest == rig.agent.gpus[0].controller.lowest
    e.prompt = 8000.0
    clock = expected_floor(8000.0, ttft)
    watts = power_cap_for_clock(H100_8B, clock) / H100_8B.gpus
    assert watts > lowest
    await rig.ticks(1)
    limit = rig.gpus.gpu(0)["power_limit_w"]
    assert watts <= limit < watts + 5.0  # the lowest 5-W level that keeps the clock
    for _ in range(20):  # held there; the GPU, even at its largest batch, keeps the clock
        await rig.ticks(1)
        assert rig.gpus.gpu(0)["power_limit_w"] == limit
    assert clock_under_power_cap(H100_8B, H100_8B.max_batch.value, limit) >= clock
    assert rig.gpus.effective_clock(rig.gpus.gpu(0)) >= clock
    assert rig.metric("joulepool_miad_prefill_floor_state", state="applied",
                      **gpu_labels()) == 1
    assert rig.metric("joulepool_miad_prefill_floor_watts", **gpu_labels()) == limit


async def test_the_tightest_engine_sets_the_floor():
    rig = Rig(count=1, slo=(0.6, 0.05))
    await rig.agent.start()
    add_engine(rig, prompt=200.0)
    add_engine(rig, prompt=6000.0)
    await rig.ticks(40)
    assert rig.locked(0) == expected_floor(6000.0, 0.6)


async def test_the_floor_counts_the_decode_steps_the_prompt_shares_and_the_step_it_waits_for():
    """Beside a running batch the prompt's chunks share steps with its decodes, after the
    step in progress: the floor is the clock at which that first token
    (core.batching.unqueued_first_token_s, the simulator's) meets (1 - margin) x TTFT,
    above the idle engine's."""
    ttft = 0.6
    rig = Rig(slo=(ttft, 0.05))
    await rig.agent.start()
    e = add_engine(rig, prompt=6000.0)
    await rig.ticks(3)
    idle = expected_floor(6000.0, ttft)
    assert rig.metric("joulepool_miad_prefill_floor_hertz", **gpu_labels()) == idle * 1e6
    e.running = 64
    clocks = [f for f in H100.supported_clocks()
              if H100.f_min_mhz.value - 1e-6 <= f <= H100.f_max_mhz.value + 1e-6]
    budget = default_batched_tokens(H100)
    busy = prefill_clock_floor(
        lambda f: unqueued_first_token_s(budget, 64, 6000.0, float(H100_8B.itl_s(64, f)),
                                         float(H100_8B.prefill_s(1.0, f))), clocks, ttft, 0.1)
    assert idle < busy < H100.f_max_mhz.value
    await rig.ticks(1)
    assert rig.metric("joulepool_miad_prefill_floor_hertz", **gpu_labels()) == busy * 1e6
    assert rig.locked(0) >= busy
    below = max(f for f in clocks if f < busy)  # one step lower would miss it
    assert unqueued_first_token_s(budget, 64, 6000.0, float(H100_8B.itl_s(64, below)),
                                  float(H100_8B.prefill_s(1.0, below))) > 0.9 * ttft
