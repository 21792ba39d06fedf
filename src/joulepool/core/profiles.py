"""GPU product x served model: performance and energy model.

Every default number is a :class:`Figure` that names its source, or says
"assumed" and why, so users can see which parts of a result rest on
measurement (see ``docs/calibration.md``).

The model (all laws labelled in ``LAWS``):

* decode step time (inter-token latency) at max clock is interpolated
  linearly in batch between calibration points (each step reads the weights
  once and every sequence's KV cache: affine in batch); tokens/s = batch /
  step time; busy power at max clock is interpolated in log2(batch);
* the clock law (docs/clock-law.md), with r = f / f_max:
  decode stretches by ``r**-beta_decode`` (memory bound) down to the clock
  below which the SMs can no longer keep HBM busy (``bandwidth_clock_ratio``),
  then by 1/r; prefill stretches by ``r**-beta_prefill`` (compute bound);
  power above idle splits into a memory share ``memory_power_share`` (same
  energy per step, so its power falls as the step stretches) and an SM share
  that scales with ``r**gamma`` down to the voltage floor
  (``voltage_knee_ratio``) and with r below it. Idle power is paid for the
  whole, longer step, which makes energy per token U-shaped in the clock.

What one instance *sustains* for a request class (the planner's L[r, m]) is
:meth:`ServingProfile.serving_point`: a queueing model of a continuous-batching
engine with its queueing headroom (:class:`Headroom`), not its saturation
throughput (:meth:`ServingProfile.throughput_rps`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from statistics import NormalDist

import numpy as np
import numpy.typing as npt
from scipy.special import gammainc

from joulepool.core.batching import prefill_steps
from joulepool.core.queueing import pool_mean_wait_s, pool_wait_tail

FloatArray = npt.NDArray[np.float64]
ArrayLike = float | Sequence[float] | npt.NDArray[np.floating] | npt.NDArray[np.integer]

ASSUMED = "assumed"


@dataclass(frozen=True)
class Figure:
    """A number with where it came from."""

    value: float
    source: str

    @property
    def assumed(self) -> bool:
        return self.source.startswith(ASSUMED)


def measured(value: float, source: str) -> Figure:
    return Figure(float(value), source)


def assumed(value: float, why: str) -> Figure:
    return Figure(float(value), f"{ASSUMED}: {why}")


LAWS = {
    "clock_power": "power above idle = memory share / step stretch (same energy per step) + SM "
                   "share x r**gamma above the voltage knee, x r below it (r = f/f_max)",
    "clock_decode": "decode step time x r**-beta_decode (memory bound) above the bandwidth "
                    "clock, x 1/r below it (the SMs no longer keep HBM busy)",
    "clock_prefill": "prefill time x r**-beta_prefill (compute bound)",
    "batch": "step time linear in batch, power linear in log2(batch), between calibration points",
    "prefill_power": "prefill (compute bound) draws the power of the largest batch at f_max, "
                     "scaled to the clock by the clock law with prefill's stretch "
                     "(assumed: no published prefill power)",
    "serving": "one instance under Poisson arrivals, as the simulated engine runs it: prompts "
               "prefilled one at a time in chunks mixed into the decode steps under the "
               "token budget (core.batching); prefill is an M/G/1 queue whose service time "
               "is the prompt's compute plus one decode step per chunk; decode steps stretch "
               "by the prompt compute mixed into them; decoding requests hold their KV cache "
               "(fluid mean-value model, ServingProfile.serving_point)",
}


#: The clock law's shared figures (docs/clock-law.md). They are set so that the law
#: lands in the published DVFS bands, not fitted to any trace: H100 decode saves at
#: most ~30 % of its energy per token at its best clock (GreenLLM <= 34 %, H200
#: clock locking <= 32 % of decode energy, VoltanaLLM <= 36 %, throttLL'eM <= 44 %),
#: energy per token is U-shaped in the clock (VoltanaLLM, A100), and prefill
#: (compute bound) slows ~1/f while decode (memory bound) slows far less.
DEFAULT_GAMMA = assumed(
    2.5, "SM power ~ f V**2 with V rising ~ f**0.75 above the voltage floor (the usual "
         "DVFS range is 2-3); 2.5 puts H100 decode's best-clock saving at ~30 %, inside "
         "the published 30-45 % DVFS band")
DEFAULT_BETA_DECODE = assumed(
    0.3, "memory-bound decode: step time x r**-0.3 above the bandwidth clock, the middle "
         "of the 0.2-0.4 usually assumed")
DEFAULT_BETA_PREFILL = assumed(1.0, "compute-bound prefill: time ~ 1/f")
DEFAULT_MEMORY_POWER_SHARE = assumed(
    0.3, "HBM, memory controller and I/O share of power above idle, unaffected by the SM "
         "clock (its energy per step is fixed); 0.3 keeps the best-clock decode saving "
         "in the published band")


@dataclass(frozen=True)
class Headroom:
    """How much queueing headroom "sustainable" keeps (see :meth:`ServingProfile.serving_point`).

    An instance loaded to its saturation throughput meets TTFT only when no
    request ever waits for another's prefill, and TPOT only when no prefill
    ever pauses its decode steps: at 90 % of saturation most requests miss.
    The sustainable rate is instead the largest Poisson arrival rate at which

    * ``ttft_miss``: the predicted share of requests whose wait for other
      prefills pushes TTFT past its SLO stays at or below this (M/G/1 prefill
      queue, see ``serving_point``), and so does the share of time the batch
      slots or the KV cache are full (admission stops, and the queue waits);
    * ``tpot_margin``: the mean TPOT, prompt chunks mixed into the steps
      included, stays at or below ``(1 - tpot_margin) x`` the TPOT SLO;
    * ``tpot_miss``: the predicted share of requests whose own TPOT (their
      decode steps plus the prompt chunks that land in them) exceeds the TPOT
      SLO stays at or below this;
    * ``prefill_scv``: squared coefficient of variation of prompt length
      (prefill compute being linear in tokens), in the prefill queue and in the
      prompt compute a request's decode steps carry.
    """

    ttft_miss: Figure = field(default_factory=lambda: assumed(
        0.01, "JouleSched's target deadline-miss rate rho* = 1 %, applied to TTFT per instance"))
    tpot_margin: Figure = field(default_factory=lambda: assumed(
        0.1, "FREESH MIAD margin (docs/architecture.md 1.5): TPOT above target x (1 - 0.1) "
        "is at risk"))
    tpot_miss: Figure = field(default_factory=lambda: assumed(
        0.01, "JouleSched's target deadline-miss rate rho* = 1 %, applied to TPOT per "
              "instance"))
    prefill_scv: Figure = field(default_factory=lambda: assumed(
        1.0, "exponential prompt lengths; the bundled Azure 2023 conversation trace's prompt "
             "SCV over all requests is 0.92"))

    def __post_init__(self) -> None:
        if not 0.0 < self.ttft_miss.value <= 1.0:
            raise ValueError("ttft_miss must be in (0, 1]")
        if not 0.0 <= self.tpot_margin.value < 1.0:
            raise ValueError("tpot_margin must be in [0, 1)")
        if not 0.0 < self.tpot_miss.value <= 1.0:
            raise ValueError("tpot_miss must be in (0, 1]")
        if not self.prefill_scv.value >= 0.0:
            raise ValueError("prefill_scv must be >= 0")

    @classmethod
    def none(cls) -> Headroom:
        """No headroom: the fluid model's SLO limits only (mean TPOT at its SLO, TTFT
        unbounded, batch and KV cache full on average)."""
        why = "no headroom: the fluid model's limit"
        return cls(ttft_miss=Figure(1.0, why), tpot_margin=Figure(0.0, why),
                   tpot_miss=Figure(1.0, why), prefill_scv=Figure(0.0, why))

    def scaled(self, s: float) -> Headroom:
        """A share ``s`` in [0, 1] of this headroom: 1 is itself, 0 is none.

        The miss targets move log-linearly from 1 (no bound) to ``ttft_miss``
        and ``tpot_miss``, the TPOT margin linearly from 0; the SCV is kept.
        Used to plan with the most headroom a cluster can carry
        (:func:`joulepool.core.sizing.plan_with_headroom`).
        """
        s = min(max(float(s), 0.0), 1.0)
        if s == 1.0:
            return self
        why = f"{s:.0%} of the headroom"
        return Headroom(
            ttft_miss=Figure(self.ttft_miss.value ** s, f"{why}; {self.ttft_miss.source}"),
            tpot_margin=Figure(self.tpot_margin.value * s, f"{why}; {self.tpot_margin.source}"),
            tpot_miss=Figure(self.tpot_miss.value ** s, f"{why}; {self.tpot_miss.source}"),
            prefill_scv=self.prefill_scv,
        )

    def describe(self) -> str:
        return (f"P(wait > TTFT SLO - prefill) <= {self.ttft_miss.value:.3g} (M/G/1 prefill "
                f"queue at the mean prompt, chunked beside the batch, prompt SCV "
                f"{self.prefill_scv.value:g}; batch slots and KV cache full as rarely), "
                f"mean TPOT <= {1 - self.tpot_margin.value:.3g} x SLO, "
                f"P(TPOT > SLO) <= {self.tpot_miss.value:.3g}")


#: the headroom the planner sizes pools with unless told otherwise
DEFAULT_HEADROOM = Headroom()


@dataclass(frozen=True)
class ServingPoint:
    """One instance of a mode serving one request class at its sustainable rate."""

    rps: float  # sustainable requests/s (0: not eligible for this class)
    power_w: float  # time-average board power of the instance at that rate
    throughput_rps: float  # saturation throughput (``ServingProfile.throughput_rps``)
    batch: float  # mean decode batch (requests decoding, Little's law), at least 1
    prefill_utilisation: float  # share of time a prompt is being prefilled (M/G/1 rho)
    busy: float  # share of time prefilling or decoding
    tpot_s: float  # mean TPOT, the prompt chunks mixed into the decode steps included
    ttft_miss: float  # predicted share whose prefill wait pushes TTFT past the SLO
    binding: str  # what stops a higher rate: ttft, tpot, batch, kv, prefill; or why not eligible
    kv_share: float = 0.0  # mean KV-cache tokens held / the instance's KV-cache tokens
    tpot_miss: float = 0.0  # predicted share of requests whose own TPOT exceeds the SLO

    @property
    def utilisation(self) -> float:
        """The sustainable rate as a share of the saturation throughput."""
        return self.rps / self.throughput_rps if self.throughput_rps > 0 else 0.0


@dataclass(frozen=True)
class GPUProduct:
    """A GPU product: power envelope and the SM clocks NVML lets us lock."""

    name: str
    tdp_w: Figure
    idle_w: Figure
    f_max_mhz: Figure
    f_min_mhz: Figure
    clock_step_mhz: Figure
    memory_gb: Figure
    aliases: tuple[str, ...] = ()
    #: f / f_max below which the core voltage is at its floor (SM power then ~ f); None: none
    voltage_knee_ratio: Figure | None = None
    #: f / f_max below which memory-bound decode becomes clock bound (step ~ 1/f); None: none
    bandwidth_clock_ratio: Figure | None = None

    def supported_clocks(self) -> FloatArray:
        """Lockable SM clocks, ascending, always including f_max."""
        lo, hi, step = self.f_min_mhz.value, self.f_max_mhz.value, self.clock_step_mhz.value
        clocks = np.arange(hi, lo - 1e-9, -step)[::-1]
        return np.asarray(clocks, dtype=np.float64)


@dataclass(frozen=True)
class BatchPoint:
    """One calibration point at max clock: decode step time and board power."""

    batch: int
    itl_ms: Figure
    power_w: Figure


@dataclass(frozen=True)
class ServingProfile:
    """Performance and energy of one serving instance (model on ``gpus`` GPUs)."""

    product: GPUProduct
    model: str
    gpus: int
    points: tuple[BatchPoint, ...]
    max_batch: Figure
    prefill_tokens_per_s: Figure
    gamma: Figure = field(default_factory=lambda: DEFAULT_GAMMA)
    beta_decode: Figure = field(default_factory=lambda: DEFAULT_BETA_DECODE)
    beta_prefill: Figure = field(default_factory=lambda: DEFAULT_BETA_PREFILL)
    memory_power_share: Figure = field(default_factory=lambda: DEFAULT_MEMORY_POWER_SHARE)

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("a serving profile needs at least one batch point")
        batches = [p.batch for p in self.points]
        if batches != sorted(set(batches)) or batches[0] < 1:
            raise ValueError("batch points must be distinct, ascending and >= 1")
        if self.gpus < 1:
            raise ValueError("gpus must be >= 1")
        if not 0.0 <= self.memory_power_share.value <= 1.0:
            raise ValueError("memory_power_share must be in [0, 1]")
        for name in ("voltage_knee_ratio", "bandwidth_clock_ratio"):
            ratio = getattr(self.product, name)
            if ratio is not None and not 0.0 < ratio.value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1] (a share of f_max)")

    # -- identity -------------------------------------------------------------
    @property
    def mode(self) -> str:
        """Serving-mode name as used by the planner, e.g. ``4xH100``."""
        return f"{self.gpus}x{self.product.name}"

    @property
    def key(self) -> str:
        return f"{self.product.name}/{self.model}/tp{self.gpus}"

    @property
    def f_max(self) -> float:
        return self.product.f_max_mhz.value

    @property
    def f_min(self) -> float:
        return self.product.f_min_mhz.value

    @property
    def idle_w(self) -> float:
        """Idle power of all the instance's GPUs."""
        return self.product.idle_w.value * self.gpus

    # -- the model ------------------------------------------------------------
    def _interp(self, batch: ArrayLike, values: Sequence[float]) -> FloatArray:
        """Linear in log2(batch) between the points (power)."""
        b = np.clip(np.asarray(batch, dtype=np.float64), 1.0, self.max_batch.value)
        xs = np.log2([p.batch for p in self.points])
        return np.asarray(np.interp(np.log2(b), xs, values), dtype=np.float64)

    def _interp_linear(self, batch: ArrayLike, values: Sequence[float]) -> FloatArray:
        """Linear in batch between the points (step time: weights once + KV per sequence)."""
        b = np.clip(np.asarray(batch, dtype=np.float64), 1.0, self.max_batch.value)
        xs = [float(p.batch) for p in self.points]
        return np.asarray(np.interp(b, xs, values), dtype=np.float64)

    def _clock_ratio(self, clock_mhz: ArrayLike | None) -> FloatArray:
        if clock_mhz is None:
            return np.asarray(1.0)
        f = np.clip(np.asarray(clock_mhz, dtype=np.float64), self.f_min, self.f_max)
        return np.asarray(f / self.f_max, dtype=np.float64)

    def decode_stretch(self, clock_mhz: ArrayLike | None = None) -> FloatArray:
        """Decode step time at ``clock_mhz`` over that at f_max (``LAWS["clock_decode"]``)."""
        r = self._clock_ratio(clock_mhz)
        stretch = r ** (-self.beta_decode.value)
        sat = self.product.bandwidth_clock_ratio
        if sat is not None:  # below it: clock bound, continuous at r = sat
            rs = sat.value
            stretch = np.maximum(stretch, rs ** (-self.beta_decode.value) * rs / r)
        return np.asarray(stretch, dtype=np.float64)

    def prefill_stretch(self, clock_mhz: ArrayLike | None = None) -> FloatArray:
        """Prefill time at ``clock_mhz`` over that at f_max (``LAWS["clock_prefill"]``)."""
        r = self._clock_ratio(clock_mhz)
        return np.asarray(r ** (-self.beta_prefill.value), dtype=np.float64)

    def sm_power_scale(self, clock_mhz: ArrayLike | None = None) -> FloatArray:
        """SM power at ``clock_mhz`` over that at f_max: r**gamma, then ~ r below the knee."""
        r = self._clock_ratio(clock_mhz)
        g = self.gamma.value
        knee = self.product.voltage_knee_ratio
        if knee is None:
            return np.asarray(r**g, dtype=np.float64)
        k = knee.value
        return np.asarray(np.where(r >= k, r**g, k**g * r / k), dtype=np.float64)

    def _busy_power(self, at_max: FloatArray, stretch: FloatArray,
                    clock_mhz: ArrayLike | None) -> FloatArray:
        """``LAWS["clock_power"]``: power of a busy instance whose work stretches by ``stretch``."""
        dyn = np.maximum(at_max - self.idle_w, 0.0)
        s = self.memory_power_share.value
        scale = s / stretch + (1.0 - s) * self.sm_power_scale(clock_mhz)
        return np.asarray(self.idle_w + dyn * scale, dtype=np.float64)

    def itl_s(self, batch: ArrayLike, clock_mhz: ArrayLike | None = None) -> FloatArray:
        """Decode step time (inter-token latency) in seconds."""
        base = self._interp_linear(batch, [p.itl_ms.value / 1e3 for p in self.points])
        return np.asarray(base * self.decode_stretch(clock_mhz), dtype=np.float64)

    def decode_tokens_per_s(
        self, batch: ArrayLike, clock_mhz: ArrayLike | None = None
    ) -> FloatArray:
        b = np.clip(np.asarray(batch, dtype=np.float64), 1.0, self.max_batch.value)
        return np.asarray(b / self.itl_s(b, clock_mhz), dtype=np.float64)

    def prefill_s(self, tokens: ArrayLike, clock_mhz: ArrayLike | None = None) -> FloatArray:
        """Time to prefill ``tokens`` prompt tokens."""
        t = np.asarray(tokens, dtype=np.float64) / self.prefill_tokens_per_s.value
        return np.asarray(t * self.prefill_stretch(clock_mhz), dtype=np.float64)

    def power_w(self, batch: ArrayLike, clock_mhz: ArrayLike | None = None) -> FloatArray:
        """Board power of the whole instance; idle power when batch == 0."""
        b = np.asarray(batch, dtype=np.float64)
        at_max = self._interp(np.maximum(b, 1.0), [p.power_w.value for p in self.points])
        busy = self._busy_power(at_max, self.decode_stretch(clock_mhz), clock_mhz)
        return np.asarray(np.where(b > 0, busy, self.idle_w), dtype=np.float64)

    def prefill_power_w(self, clock_mhz: ArrayLike | None = None) -> FloatArray:
        """Board power of the whole instance while it prefills (``LAWS["prefill_power"]``)."""
        at_max = self._interp(self.max_batch.value, [p.power_w.value for p in self.points])
        return self._busy_power(at_max, self.prefill_stretch(clock_mhz), clock_mhz)

    def joules_per_token(
        self, batch: ArrayLike, clock_mhz: ArrayLike | None = None
    ) -> FloatArray:
        """Decode energy per output token at a steady batch (eps in JouleSched)."""
        return np.asarray(
            self.power_w(batch, clock_mhz) / self.decode_tokens_per_s(batch, clock_mhz),
            dtype=np.float64,
        )

    def best_batch(self, tpot_slo_s: float, clock_mhz: float | None = None) -> int:
        """Largest batch whose inter-token latency still meets the TPOT SLO (0 if none)."""
        batches = np.arange(1, int(self.max_batch.value) + 1)
        ok = self.itl_s(batches, clock_mhz) <= tpot_slo_s
        return int(batches[ok].max()) if ok.any() else 0

    def throughput_rps(
        self,
        mean_input_tokens: float,
        mean_output_tokens: float,
        tpot_slo_s: float,
        clock_mhz: float | None = None,
    ) -> float:
        """Saturation throughput, requests/s: never idle, decoding at :meth:`best_batch`.

        Each request occupies the engine for its prefill plus its share of a
        decode batch of the largest size whose step meets TPOT for its output
        after the first token (which the prefill's last step makes). Queueing and
        the pauses prefill puts into decoding are ignored: an instance loaded
        to this rate misses its SLOs (see :meth:`serving_point`). 0 when no
        batch meets TPOT.
        """
        b = self.best_batch(tpot_slo_s, clock_mhz)
        if b == 0:
            return 0.0
        prefill = float(self.prefill_s(mean_input_tokens, clock_mhz))
        # the prefill's last step makes the first token: o - 1 decode steps follow
        decode = max(mean_output_tokens - 1.0, 0.0)
        return 1.0 / (decode * float(self.itl_s(b, clock_mhz)) / b + prefill)

    def serving_point(
        self,
        mean_input_tokens: float,
        mean_output_tokens: float,
        ttft_slo_s: float,
        tpot_slo_s: float,
        clock_mhz: float | None = None,
        headroom: Headroom | None = None,
        batched_tokens: float | None = None,
        kv_tokens: float | None = None,
        ttft_from_mean: bool = True,
        pool_size: int = 1,
    ) -> ServingPoint:
        """The sustainable rate of one instance for a request class, with queueing headroom.

        A model of the simulated engine (``sim/instance.py``, vLLM V1's scheduler;
        ``LAWS["serving"]``, docs/planner.md "Serving model") for Poisson arrivals at
        rate lam, mean prompt P, mean output o (n = o - 1 tokens decoded after the
        prefill's first), prefill p s/token, decode step itl(b) at batch b, token
        budget B per step (``batched_tokens``, default :func:`default_batched_tokens`)
        and K tokens of KV cache (``kv_tokens``, default :func:`kv_capacity_tokens`):

        * prompts are admitted one at a time and prefilled in chunks of ``B - b``
          tokens mixed into the decode steps (:mod:`joulepool.core.batching`): the
          prefill takes S = P p + itl(b) x P / (B - b) (at least one step) while
          anything decodes: the service time of an M/G/1 queue with utilisation
          rho = lam S;
        * a decode step carries the prompt compute mixed into it, so with
          u = lam P p of the time spent on prompt tokens the mean TPOT is
          itl(b) / (1 - u), and the mean batch b (Little) solves
          lam n = b (1 - u) / itl(b) (when even b = 1 keeps up the engine idles part
          of the time and decodes at b = 1);
        * TTFT: the waiting time W has P(W > 0) = rho and an approximately
          exponential tail with the Pollaczek-Khinchine mean, so
          P(W > T - S) ~= rho exp(-2 (1 - rho) (T - S) / (S (1 + c^2))), c^2 the
          prompt SCV on S's compute share (exact for M/M/1). With ``pool_size`` n
          > 1 the instance is one of n identical instances fed by a soonest-start
          router at n lam in all: the n prefills are one M/G/n queue
          (:mod:`joulepool.core.queueing`), P(W > T - S) ~= C(n, n rho)
          exp(-2 n (1 - rho) (T - S) / (S (1 + c^2))), and lam is the rate per
          instance (its decode batch, TPOT and KV cache stay its own). A request's own
          prefill is taken at the mean prompt (FREESH's eligibility rule: a class
          whose mean prefill is close to its TTFT SLO still misses for its longer
          prompts, which this does not count);
        * TPOT of one request: its n steps plus the prompt compute arriving during
          its decode life L = n itl / (1 - u), compound Poisson with variance
          lam L P^2 (1 + c^2) p^2, so its TPOT has standard deviation
          p P sqrt(lam TPOT (1 + c^2) / n) (normal approximation);
        * admission stops when the batch slots (``max_batch``) or the KV cache are
          full: decoding requests are an M/G/infinity population, Poisson with mean
          b, each holding P + o KV tokens on average (the length-biased mean over a
          decode life for exponential output lengths), so b + z sqrt(b) must fit
          ``max_batch`` and (K (1 - watermark) - P) / (P + o), z the normal quantile
          of 1 - ``headroom.ttft_miss``.

        The sustainable rate is the largest lam with P(W > T - S) <= ``ttft_miss``,
        mean TPOT <= (1 - ``tpot_margin``) x SLO, P(TPOT > SLO) <= ``tpot_miss``
        and the batch and KV checks; each tightens as lam grows, so it is found by
        bisection. ``binding`` names the bound that stops a higher rate. Not eligible
        (rps 0, ``binding`` says why) when the mean prompt's prefill alone exceeds
        TTFT, no batch meets TPOT (with the margin), or the KV cache cannot hold a
        mean request. Power is the time average: prefill power for the prompt
        compute, decode power at b while decoding, idle power otherwise (a mixed
        step's energy is its parts', :func:`joulepool.core.batching.mixed_step`).

        ``ttft_from_mean`` False: the caller bounds TTFT from the class's prompt
        lengths (``core.problem``'s prompt-tail fit), so neither the mean prompt's
        prefill (the eligibility rule) nor the M/G/1 wait tail at the mean prompt
        bounds the rate; the waits for a batch slot or KV room still count.
        """
        hr = headroom or DEFAULT_HEADROOM
        budget = float(default_batched_tokens(self.product) if batched_tokens is None
                       else batched_tokens)
        kv = float(kv_capacity_tokens(self) if kv_tokens is None else kv_tokens)
        if int(pool_size) < 1:
            raise ValueError("pool_size must be at least 1")
        key = (self, float(mean_input_tokens), float(mean_output_tokens), float(ttft_slo_s),
               float(tpot_slo_s), None if clock_mhz is None else float(clock_mhz), hr,
               budget, kv, bool(ttft_from_mean), int(pool_size))
        try:
            return _cached_serving_point(key)
        except TypeError:  # a profile built with unhashable parts: compute without the cache
            return _serving_point(*key)

    def operating_point(
        self,
        mean_input_tokens: float,
        mean_output_tokens: float,
        ttft_slo_s: float,
        tpot_slo_s: float,
        clock_mhz: float | None = None,
        headroom: Headroom | None = None,
    ) -> tuple[float, float]:
        """(power W, sustainable requests/s) of one instance for a request class.

        The planner's P[r, m] and L[r, m]: :meth:`serving_point`'s rate, with
        the queueing headroom of ``headroom`` (default :data:`DEFAULT_HEADROOM`),
        and the instance's mean power at that rate. Returns (power, 0.0) when
        the mode cannot meet the SLO at all (prefill alone exceeds TTFT, or no
        batch meets TPOT): the planner reads 0 as "not eligible".
        """
        sp = self.serving_point(mean_input_tokens, mean_output_tokens, ttft_slo_s, tpot_slo_s,
                                clock_mhz, headroom)
        return sp.power_w, sp.rps

    def with_gpus(
        self, gpus: int, speedup: Figure, max_batch: Figure | None = None
    ) -> ServingProfile:
        """Derive another tensor-parallel degree: step time / speedup, power x gpus ratio.

        ``speedup`` < 1 means the new degree is slower (fewer GPUs).
        """
        scale = gpus / self.gpus
        pts = tuple(
            BatchPoint(
                p.batch,
                Figure(
                    p.itl_ms.value / speedup.value, f"derived from {self.key}; {speedup.source}"
                ),
                Figure(p.power_w.value * scale, f"derived from {self.key}: power x {scale:g}"),
            )
            for p in self.points
        )
        return replace(
            self,
            gpus=gpus,
            points=tuple(p for p in pts if max_batch is None or p.batch <= max_batch.value),
            max_batch=max_batch or self.max_batch,
            prefill_tokens_per_s=Figure(
                self.prefill_tokens_per_s.value * speedup.value,
                f"derived from {self.key}; {speedup.source}",
            ),
        )


@functools.lru_cache(maxsize=256)
def _decode_table(
    prof: ServingProfile, clock_mhz: float | None
) -> tuple[FloatArray, FloatArray]:
    """(batches 1..max, their decode step times at ``clock_mhz``, s)."""
    batches = np.arange(1.0, float(int(prof.max_batch.value)) + 1.0)
    return batches, np.asarray(prof.itl_s(batches, clock_mhz), dtype=np.float64)


#: quantiles of an exponential output length at which the TPOT tail is averaged
_OUTPUT_QUANTILES = -np.log1p(-(np.arange(32) + 0.5) / 32)


@dataclass(frozen=True)
class _Load:
    """The engine's mean state at one arrival rate (see ``_ServingModel.at``)."""

    lam: float  # requests/s
    batch: float  # mean decoding requests (time average)
    compute: float  # u: share of time spent on prompt tokens
    decoding: float  # share of time a decode step runs
    decode_w: float  # mean board power while decoding, W
    prefill_s: float  # S: mean prefill time beside the batch (TTFT's service time)
    rho: float  # lam x S: the prefill server's utilisation
    tpot_s: float  # mean TPOT
    tpot_miss: float  # P(one request's TPOT > SLO)
    ttft_miss: float  # P(wait for the prefill server > TTFT SLO - S)
    slot_miss: float  # P(wait for a batch slot / KV room > TTFT SLO - S)
    kv_tokens: float  # mean KV-cache tokens held

    @classmethod
    def overloaded(cls, lam: float, u: float) -> _Load:
        inf = math.inf
        return cls(lam, inf, u, 0.0, 0.0, inf, inf, inf, 1.0, 1.0, 1.0, inf)


@dataclass(frozen=True)
class _ServingModel:
    """``LAWS["serving"]`` for one profile, class and engine; ``at(lam)`` is the state."""

    prof: ServingProfile
    clock: float | None
    prompt: float  # mean prompt tokens P
    decode_tokens: float  # n: mean tokens decoded after the first (the prefill's)
    ttft_slo: float
    tpot_slo: float
    budget: float  # tokens per step
    scv: float  # prompt-length SCV
    kv_per_seq: float  # mean KV tokens one decoding request holds
    slots: int  # decoding requests admission lets in: max_batch, or what the KV cache holds
    z: float  # normal quantile of 1 - ttft_miss: the batch a long prefill queue sees
    pf_tok: float  # prefill s per prompt token
    itl: FloatArray  # decode step time at batch 1..slots
    power: FloatArray  # board power while decoding at batch 1..slots
    #: steps a mean prompt takes to prefill beside batch 1..slots (core.batching)
    chunk_steps: FloatArray
    ttft_from_mean: bool = True  # False: no M/G/1 wait bound at the mean prompt
    pool: int = 1  # instances whose prefills form one M/G/n queue (soonest-start router)

    def at(self, lam: float) -> _Load:
        """The mean state at ``lam`` requests/s (module doc of ``serving_point``)."""
        p, n, P = self.pf_tok, self.decode_tokens, self.prompt
        u = lam * P * p
        if u >= 1.0:
            return _Load.overloaded(lam, u)
        pi, full, wait_rate = self._population(lam, u)
        if wait_rate <= 0.0:
            return _Load.overloaded(lam, u)
        k = np.arange(1.0, self.slots + 1.0)
        busy = float(pi[1:].sum())  # P(anything decodes)
        batch = float((k * pi[1:]).sum())
        # a prompt is prefilled in chunks beside the batch: one decode step per chunk
        S = P * p + float((pi[1:] * self.itl * self.chunk_steps).sum())
        rho = lam * S
        # the long waits happen while the batch is large (arrivals that queued join it
        # one by one): the wait tail is taken with the prefill beside the batch's upper
        # quantile, N + z sqrt(N)
        high = min(batch + self.z * math.sqrt(batch), float(self.slots))
        j = max(math.ceil(high), 1) - 1
        s_high = P * p + busy * float(self.itl[j]) * prefill_steps(self.budget, j + 1.0, P)
        ttft_miss = (self._prefill_tail(max(s_high, S), lam * max(s_high, S))
                     if self.ttft_from_mean else 0.0)
        x = max(self.ttft_slo - S, 0.0)
        slot_miss = float(full * math.exp(-wait_rate * x))
        ttft_mean = S + pool_mean_wait_s(self.pool, rho, S, self.scv) + full / wait_rate
        decode_w = float((pi[1:] * self.power).sum()) / busy if busy > 0.0 else 0.0
        itl = float((pi[1:] * self.itl).sum()) / busy if busy > 0.0 else float(self.itl[0])
        if n > 0.0:
            # Little, plus the prompts queued behind a request when it starts decoding
            tpot = batch / (lam * n) + u * ttft_mean / (n * (1.0 - u)) if lam > 0.0 else itl
        else:
            tpot = 0.0
        return _Load(lam, batch, u, busy * (1.0 - u), decode_w, S, rho, tpot,
                     self._tpot_tail(lam, itl, ttft_mean), ttft_miss, slot_miss,
                     batch * self.kv_per_seq + rho * P)

    def _population(self, lam: float, u: float) -> tuple[FloatArray, float, float]:
        """Decoding requests as a birth-death process: arrivals at ``lam``; at k decoding,
        (1 - u) / itl(k) steps per second each end one of k requests with probability 1 / n
        (exponential output lengths). Admission stops at ``slots``; beyond it requests
        queue. Returns (P(k decoding) for k = 0..slots, P(an arrival finds the slots
        full), the rate of the full state's wait tail)."""
        n = self.decode_tokens
        pi = np.zeros(self.slots + 1)
        if n <= 0.0 or lam <= 0.0:
            pi[0] = 1.0
            return pi, 0.0, math.inf
        k = np.arange(1.0, self.slots + 1.0)
        mu = k * (1.0 - u) / (n * self.itl)  # completions/s at k decoding
        logs = np.concatenate(([0.0], np.cumsum(np.log(lam / mu))))
        weights = np.exp(logs - logs.max())
        top = float(mu[-1])
        if lam >= top:
            return pi, 1.0, 0.0
        queued = weights[-1] * lam / (top - lam)  # states with requests waiting for a slot
        z = float(weights.sum()) + queued
        pi = weights / z
        full = float(pi[-1]) + queued / z  # PASTA: arrivals that find every slot taken
        pi[-1] += queued / z
        return pi, full, top - lam

    def _prefill_tail(self, S: float, rho: float) -> float:
        """The pool's prefill wait tail P(W > T - S) (:func:`core.queueing.pool_wait_tail`;
        M/G/1 at one instance: rho exp(-2 (1 - rho) (T - S) / (S (1 + c^2))), exact for
        M/M/1), c^2 the prefill time's SCV (the prompt's, on its compute share)."""
        if rho >= 1.0 or self.ttft_slo <= S:
            return 1.0
        if rho <= 0.0 or S <= 0.0:
            return 0.0
        c2 = self.scv * (self.prompt * self.pf_tok / S) ** 2
        return pool_wait_tail(self.pool, rho, self.ttft_slo - S, S, c2)

    def _tpot_tail(self, lam: float, itl: float, ttft_mean: float) -> float:
        """P(a request's TPOT > SLO): a request decoding m tokens misses when the prompts
        arriving while it waits and decodes (Poisson, each P p seconds of compute in its
        steps) exceed m (SLO - itl), i.e. when j = floor(m (SLO - itl) / (P p)) + 1 of
        them arrive within its TTFT, its m steps and the compute of the j - 1 before the
        last; averaged over an exponential output length. None misses when a step with
        a whole mean prompt's chunk still meets the SLO (one prompt is prefilled at a
        time)."""
        n, tau = self.decode_tokens, self.tpot_slo
        if n <= 0.0:
            return 0.0
        if itl >= tau:
            return 1.0
        work = self.prompt * self.pf_tok
        # a step carries one prompt's chunk at most: if even that leaves the step within
        # the SLO, no request misses
        if work <= 0.0 or lam <= 0.0 or itl + work <= tau:
            return 0.0
        m = np.maximum(n * _OUTPUT_QUANTILES, 1.0)
        # P(Poisson(mu) >= j) = P(j, mu), the regularised lower incomplete gamma function;
        # more than k prompts' compute means at least floor(k) + 1 prompts
        need = np.floor(m * (tau - itl) / work) + 1.0
        # the last of them must arrive before the request is done: within its TTFT, its
        # own m steps and the compute of the ones before it
        window = ttft_mean + m * itl + (need - 1.0) * work
        return float(np.mean(gammainc(need, lam * window)))


def _kv_slots(room: float, prompt: float, output: float, hr: Headroom) -> float:
    """Decoding requests a KV cache of ``room`` tokens takes, as batch slots.

    A decoding request holds its prompt and the tokens generated so far: P + o on average
    over its life (length-biased, exponential outputs), variance o^2 + SCV P^2. The cache
    fills on the sum over the N decoding requests, Poisson: it overflows at most
    ``ttft_miss`` of the time while N a + z sqrt(N E[K^2]) <= room (normal), a = P + o;
    the slots are the count whose own margin (N + z sqrt(N), as for the batch) gives the
    same N: equal to room / a when every request holds the same.
    """
    a = prompt + output
    second = a * a + output * output + hr.prefill_scv.value * prompt * prompt
    eps = hr.ttft_miss.value
    z = NormalDist().inv_cdf(1.0 - eps) if eps < 0.5 else 0.0
    root = (-z * math.sqrt(second) + math.sqrt(z * z * second + 4.0 * a * room)) / (2.0 * a)
    return root * root + z * root


def _serving_model(prof: ServingProfile, mean_input_tokens: float, mean_output_tokens: float,
                   ttft_slo_s: float, tpot_slo_s: float, clock_mhz: float | None,
                   hr: Headroom, budget: float, kv_tokens: float,
                   ttft_from_mean: bool = True, pool: int = 1) -> _ServingModel | str:
    """The model for one class on ``prof``, or why the instance cannot serve it."""
    batches, itl = _decode_table(prof, clock_mhz)
    P = max(float(mean_input_tokens), 0.0)
    o = max(float(mean_output_tokens), 0.0)
    per_seq = max(P + o, 1.0)
    room = kv_tokens * (1.0 - KV_WATERMARK.value) - P  # below the watermark, beside a prompt
    if room < per_seq:
        return "the KV cache cannot hold a mean request"
    slots = int(batches[-1])  # an unknown model or GPU memory: no KV limit
    if math.isfinite(room):
        slots = min(slots, math.floor(_kv_slots(room, P, o, hr)))
    if slots < 1:  # room for one, but not with the queueing margin
        return "the KV cache cannot hold a mean request"
    return _ServingModel(
        prof=prof, clock=clock_mhz, prompt=P,
        decode_tokens=max(float(mean_output_tokens) - 1.0, 0.0),
        ttft_slo=float(ttft_slo_s), tpot_slo=float(tpot_slo_s), budget=float(budget),
        scv=hr.prefill_scv.value, kv_per_seq=per_seq, slots=slots,
        z=NormalDist().inv_cdf(1.0 - hr.ttft_miss.value) if hr.ttft_miss.value < 0.5 else 0.0,
        pf_tok=float(prof.prefill_s(1.0, clock_mhz)), itl=itl[:slots],
        power=np.asarray(prof.power_w(batches[:slots], clock_mhz), dtype=np.float64),
        chunk_steps=np.array([prefill_steps(float(budget), b, P)
                              for b in np.arange(1.0, slots + 1.0)]),
        ttft_from_mean=ttft_from_mean, pool=pool)


def _violations(m: _ServingModel, s: _Load, hr: Headroom) -> list[str]:
    """The headroom bounds state ``s`` breaks (empty: sustainable), as
    ``ServingPoint.binding`` names."""
    out = []
    if s.rho >= 1.0 - 1e-9 or not math.isfinite(s.batch):
        out.append("prefill")
    if hr.ttft_miss.value < 1.0 and s.ttft_miss + s.slot_miss > hr.ttft_miss.value:
        if s.slot_miss <= s.ttft_miss:
            out.append("ttft")
        else:  # waiting for a batch slot, or for KV room when the cache holds fewer
            out.append("batch" if m.slots >= int(m.prof.max_batch.value) else "kv")
    if s.tpot_s > (1.0 - hr.tpot_margin.value) * m.tpot_slo or (
            hr.tpot_miss.value < 1.0 and s.tpot_miss > hr.tpot_miss.value):
        out.append("tpot")
    return out


def _serving_point(
    prof: ServingProfile,
    mean_input_tokens: float,
    mean_output_tokens: float,
    ttft_slo_s: float,
    tpot_slo_s: float,
    clock_mhz: float | None,
    hr: Headroom,
    budget: float,
    kv_tokens: float,
    ttft_from_mean: bool = True,
    pool_size: int = 1,
) -> ServingPoint:
    """:meth:`ServingProfile.serving_point`: the largest rate meeting every bound.

    Every bound tightens as the rate grows, so the rate is found by bisection on
    the model's state (``_ServingModel.at``); the bound that breaks just above it
    is the binding one.
    """
    throughput = prof.throughput_rps(mean_input_tokens, mean_output_tokens, tpot_slo_s,
                                     clock_mhz)
    itl1 = float(prof.itl_s(1, clock_mhz))

    def not_eligible(why: str) -> ServingPoint:
        return ServingPoint(0.0, float(prof.power_w(1, clock_mhz)), throughput, 0.0, 0.0, 0.0,
                            itl1, 1.0, why)

    if ttft_from_mean and ttft_slo_s < float(prof.prefill_s(mean_input_tokens, clock_mhz)):
        return not_eligible("prefill alone exceeds TTFT")
    if throughput == 0.0:
        return not_eligible("no batch meets TPOT")
    if itl1 > (1.0 - hr.tpot_margin.value) * tpot_slo_s:
        return not_eligible("no batch meets TPOT with the headroom")
    m = _serving_model(prof, mean_input_tokens, mean_output_tokens, ttft_slo_s, tpot_slo_s,
                       clock_mhz, hr, budget, kv_tokens, ttft_from_mean, pool_size)
    if isinstance(m, str):
        return not_eligible(m)
    # no faster than the prompts' compute, or than the full batch decodes
    hi = math.inf if m.prompt <= 0.0 else 1.0 / (m.prompt * m.pf_tok)
    if m.decode_tokens > 0.0:
        hi = min(hi, m.slots / (m.decode_tokens * float(m.itl[-1])))
    lo = 0.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if _violations(m, m.at(mid), hr) else (mid, hi)
        if hi - lo <= 1e-7 * hi:
            break
    broken = _violations(m, m.at(hi), hr)
    s = m.at(lo)
    power = (s.compute * float(prof.prefill_power_w(clock_mhz)) + s.decoding * s.decode_w
             + max(1.0 - s.compute - s.decoding, 0.0) * prof.idle_w)
    return ServingPoint(
        rps=lo, power_w=power, throughput_rps=throughput, batch=max(s.batch, 1.0),
        prefill_utilisation=s.rho, busy=min(s.compute + s.decoding, 1.0), tpot_s=s.tpot_s,
        ttft_miss=float(s.ttft_miss + s.slot_miss), binding=broken[0] if broken else "prefill",
        kv_share=s.kv_tokens / kv_tokens, tpot_miss=s.tpot_miss,
    )


@functools.lru_cache(maxsize=16384)
def _cached_serving_point(
    key: tuple[ServingProfile, float, float, float, float, float | None, Headroom, float,
               float, bool, int],
) -> ServingPoint:
    """Pools re-planned with unchanged demand ask the same question every window."""
    return _serving_point(*key)


# --------------------------------------------------------------------------
# Defaults from docs/calibration.md
# --------------------------------------------------------------------------
_MLE = "ML.ENERGY leaderboard v3, H100 80GB bf16 chat"
_CAL = "docs/calibration.md"

H100 = GPUProduct(
    name="H100",
    tdp_w=measured(700, "vendor spec, H100 SXM TDP"),
    idle_w=assumed(75, "H100 idle, docs/calibration.md"),
    f_max_mhz=measured(1980, "vendor spec, H100 SXM max SM clock"),
    f_min_mhz=assumed(990, "half of max: below it decode SLOs fail in practice"),
    clock_step_mhz=assumed(15, "NVML reports H100/A100 SM clocks in 15 MHz steps"),
    memory_gb=measured(80, "vendor spec"),
    aliases=("NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-SXM5-80GB", "NVIDIA H100 80GB HBM3"),
    voltage_knee_ratio=assumed(0.75, "voltage floor near 1.5 GHz: below it SM power ~ f"),
    bandwidth_clock_ratio=assumed(
        0.6, "below ~1.2 GHz too few memory requests in flight to keep 3.35 TB/s of HBM busy: "
             "decode turns clock bound, which makes its energy U-shaped (minimum ~0.6 f_max)"),
)
A100 = GPUProduct(
    name="A100",
    tdp_w=measured(400, "vendor spec, A100 SXM TDP"),
    idle_w=measured(60, "published idle measurement on A100-80GB, docs/calibration.md"),
    f_max_mhz=measured(1410, "vendor spec, A100 max SM clock"),
    f_min_mhz=measured(1005, "lowest clock of published A100 DVFS sweeps, docs/calibration.md"),
    clock_step_mhz=assumed(15, "NVML reports H100/A100 SM clocks in 15 MHz steps"),
    memory_gb=measured(80, "vendor spec, A100-80GB"),
    aliases=("NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-80GB-PCIe", "NVIDIA A100-SXM4-80GB"),
    voltage_knee_ratio=assumed(0.85, "voltage floor near 1.2 GHz (A100 DVFS sweeps go down "
                                     "to 1005 MHz only)"),
    bandwidth_clock_ratio=assumed(
        0.8, "VoltanaLLM measures a U-shaped energy-vs-clock curve on A100 inside its "
             "1005-1410 MHz sweep: decode turns clock bound near 1.13 GHz"),
)
L4 = GPUProduct(
    name="L4",
    tdp_w=measured(72, "vendor spec, L4 TDP"),
    idle_w=assumed(16, "L4 idle, docs/calibration.md"),
    f_max_mhz=measured(2040, "vendor spec, L4 max SM clock"),
    f_min_mhz=assumed(1020, "half of max, as for H100"),
    clock_step_mhz=assumed(15, "same step as the other products"),
    memory_gb=measured(24, "vendor spec"),
    aliases=("NVIDIA-L4", "NVIDIA L4"),
    voltage_knee_ratio=assumed(0.75, "no published L4 DVFS data: H100's ratio"),
    bandwidth_clock_ratio=assumed(0.6, "no published L4 DVFS data: H100's ratio"),
)
PRODUCTS: dict[str, GPUProduct] = {p.name: p for p in (H100, A100, L4)}

LLAMA_8B = "llama-3.1-8b"
LLAMA_70B = "llama-3.1-70b"

#: A100 decode is slower than H100 by the Splitwise llama2-70b TP2 ratio at batch 1
#: (memory bound) and by more at large batches, where H100's ~3x bf16 compute shows.
A100_SLOWDOWN = measured(54.9 / 37.0, "Splitwise perf model, llama2-70b TP2 batch 1: 54.9/37.0 ms")
A100_SLOWDOWN_LARGE_BATCH = assumed(2.4, "A100 vs H100 step time at batch 512: compute-bound share")
#: A100 busy power above idle relative to H100's, by TDP ratio above idle.
_A100_POWER = assumed((400 - 60) / (700 - 75), "A100 dynamic power = H100's x TDP-above-idle ratio")


def _pt(batch: int, itl_ms: Figure, power_w: Figure) -> BatchPoint:
    return BatchPoint(batch, itl_ms, power_w)


def _itl_from_jpt(jpt: float, batch: int, power: float, src: str) -> Figure:
    """ITL derived from published J/token and power: itl = J/token * batch / power."""
    return Figure(jpt * batch / power * 1e3, f"derived: J/token x batch / power, {src}")


H100_8B = ServingProfile(
    product=H100,
    model=LLAMA_8B,
    gpus=1,
    points=(
        _pt(1, assumed(6.775, "b=8 and b=64 points extended linearly in batch to b=1"),
            assumed(420, "extrapolated below the b=8 point")),
        _pt(8, measured(7.3, f"{_MLE} Llama-3.1-8B b=8"), measured(486, f"{_MLE} b=8")),
        _pt(64, measured(11.5, f"{_MLE} Llama-3.1-8B b=64"), measured(610, f"{_MLE} b=64")),
        _pt(256, _itl_from_jpt(0.077, 256, 691, f"{_MLE} b=256"), measured(691, f"{_MLE} b=256")),
        _pt(512, _itl_from_jpt(0.070, 512, 688, f"{_MLE} b=512"), measured(688, f"{_MLE} b=512")),
    ),
    max_batch=measured(512, f"{_MLE}: largest batch measured"),
    prefill_tokens_per_s=assumed(20000, "H100 8B prefill: 16 GFLOP/token at ~30% MFU"),
)

H100_70B = ServingProfile(
    product=H100,
    model=LLAMA_70B,
    gpus=4,
    points=(
        _pt(1, assumed(15.5, "b=8 step time less a small batch term"),
            assumed(1600, "extrapolated below the b=8 point")),
        _pt(8, measured(16.6, f"{_MLE} Llama-3.1-70B TP4 b=8"), measured(1765, f"{_MLE} b=8")),
        _pt(64, _itl_from_jpt(0.797, 64, 2002, f"{_MLE} b=64"), measured(2002, f"{_MLE} b=64")),
        _pt(256, _itl_from_jpt(0.479, 256, 2354, f"{_MLE} b=256"), measured(2354, f"{_MLE} b=256")),
        _pt(512, _itl_from_jpt(0.421, 512, 2493, f"{_MLE} b=512"), measured(2493, f"{_MLE} b=512")),
    ),
    max_batch=measured(512, f"{_MLE}: largest batch measured"),
    prefill_tokens_per_s=assumed(10000, "4xH100 70B prefill: 140 GFLOP/token at ~40% MFU"),
)


def _derive_a100(h100: ServingProfile, max_batch: Figure) -> ServingProfile:
    """A100 profile from the H100 one: slower decode, lower power (both labelled)."""
    idle = A100.idle_w.value * h100.gpus
    def slowdown(batch: int) -> float:
        # log2-batch interpolation from batch 8 (memory bound) to 512 (compute heavy)
        w = min(max((np.log2(batch) - 3.0) / 6.0, 0.0), 1.0)
        lo, hi = A100_SLOWDOWN.value, A100_SLOWDOWN_LARGE_BATCH.value
        return float(lo + w * (hi - lo))

    pts = tuple(
        BatchPoint(
            p.batch,
            Figure(
                p.itl_ms.value * slowdown(p.batch),
                f"derived: H100 x slowdown from {A100_SLOWDOWN.source} to "
                f"{A100_SLOWDOWN_LARGE_BATCH.source}",
            ),
            Figure(
                idle + (p.power_w.value - h100.idle_w) * _A100_POWER.value,
                f"derived: H100 point; {_A100_POWER.source}",
            ),
        )
        for p in h100.points
        if p.batch <= max_batch.value
    )
    return ServingProfile(
        product=A100,
        model=h100.model,
        gpus=h100.gpus,
        points=pts,
        max_batch=max_batch,
        prefill_tokens_per_s=assumed(
            h100.prefill_tokens_per_s.value / 3.0, "A100 bf16 dense FLOPS ~1/3 of H100"
        ),
    )


A100_8B = _derive_a100(H100_8B, assumed(256, "A100-80GB KV-cache room for 8B at ~2k context"))
A100_70B = _derive_a100(H100_70B, assumed(256, "A100-80GB TP4 KV-cache room at ~2k context"))

#: L4: 24 GB at ~300 GB/s; an 8B bf16 model (16 GB) is memory bound at ~53 ms per step.
L4_8B = ServingProfile(
    product=L4,
    model=LLAMA_8B,
    gpus=1,
    points=(
        _pt(1, Figure(16.0 / 300.0 * 1e3, "derived: 16 GB weights / 300 GB/s"),
            assumed(45, "L4 light decode, below 72 W TDP")),
        _pt(16, assumed(62, "weights read plus KV reads for 16 sequences at ~1k tokens"),
            assumed(68, "near 72 W TDP")),
        _pt(32, assumed(72, "KV reads grow with batch; 8 GB left for KV cache"),
            assumed(71, "at 72 W TDP")),
    ),
    max_batch=assumed(32, "8 GB of KV cache left at ~1k context"),
    prefill_tokens_per_s=assumed(2500, "L4 ~121 TFLOPS bf16 dense, compute bound"),
)

#: 2- and 8-GPU A100 modes for the 70B model, as FREESH's mode set uses.
A100_70B_TP2 = A100_70B.with_gpus(
    2,
    assumed(0.5 * 1.15, "TP2 vs TP4: half the GPUs, less all-reduce overhead"),
    assumed(64, "2x80 GB less 140 GB of weights leaves ~20 GB of KV cache"),
)
A100_70B_TP8 = A100_70B.with_gpus(8, assumed(2 * 0.65, "TP8 vs TP4 at 65% TP efficiency"))

DEFAULT_PROFILES: tuple[ServingProfile, ...] = (
    H100_8B, A100_8B, L4_8B, H100_70B, A100_70B, A100_70B_TP2, A100_70B_TP8,
)


def product_for_label(label: str) -> GPUProduct | None:
    """Map a node's ``nvidia.com/gpu.product`` label to a known product."""
    needle = label.strip()
    for product in PRODUCTS.values():
        if needle == product.name or needle in product.aliases:
            return product
    upper = needle.upper()
    for product in PRODUCTS.values():
        if product.name in upper.replace("-", " ").split() or f"-{product.name}-" in f"-{upper}-":
            return product
    return None


def find_profile(
    product: str, model: str, gpus: int | None = None,
    profiles: Sequence[ServingProfile] = DEFAULT_PROFILES,
) -> ServingProfile | None:
    """The profile for a product and model (and TP degree, if given)."""
    for p in profiles:
        if p.product.name == product and p.model == model and (gpus is None or p.gpus == gpus):
            return p
    return None


def profiles_for_model(
    model: str, profiles: Sequence[ServingProfile] = DEFAULT_PROFILES
) -> tuple[ServingProfile, ...]:
    return tuple(p for p in profiles if p.model == model)


# --------------------------------------------------------------------------
# The serving engine's memory and start-up (vLLM), per model and GPU product
# --------------------------------------------------------------------------
GIB = float(2**30)


@dataclass(frozen=True)
class ModelArch:
    """What the engine's memory model needs of a model's architecture.

    KV cache per token = ``layers`` x ``kv_heads`` x ``head_dim`` x 2 (K and V) x
    ``kv_bytes`` (over all of an instance's GPUs; tensor parallelism splits it).
    """

    name: str
    layers: Figure
    kv_heads: Figure
    head_dim: Figure
    kv_bytes: Figure  # bytes per KV element
    weights_bytes: Figure  # all weights, over all GPUs
    context_tokens: Figure  # longest sequence (prompt + output) the model takes

    @property
    def kv_bytes_per_token(self) -> float:
        """KV-cache bytes one token of one sequence holds (all layers, K and V)."""
        return (self.layers.value * self.kv_heads.value * self.head_dim.value * 2.0
                * self.kv_bytes.value)


_HF8 = "meta-llama/Llama-3.1-8B config.json"
_HF70 = "meta-llama/Llama-3.1-70B config.json"
MODELS: dict[str, ModelArch] = {
    LLAMA_8B: ModelArch(
        name=LLAMA_8B,
        layers=measured(32, f"{_HF8}: num_hidden_layers"),
        kv_heads=measured(8, f"{_HF8}: num_key_value_heads (GQA)"),
        head_dim=measured(128, f"{_HF8}: hidden_size 4096 / 32 attention heads"),
        kv_bytes=measured(2, "vLLM's default kv_cache_dtype 'auto' = model dtype bf16"),
        weights_bytes=measured(8.03e9 * 2, f"{_HF8}: 8.03 B parameters in bf16"),
        context_tokens=measured(131072, f"{_HF8}: max_position_embeddings"),
    ),
    LLAMA_70B: ModelArch(
        name=LLAMA_70B,
        layers=measured(80, f"{_HF70}: num_hidden_layers"),
        kv_heads=measured(8, f"{_HF70}: num_key_value_heads (GQA)"),
        head_dim=measured(128, f"{_HF70}: hidden_size 8192 / 64 attention heads"),
        kv_bytes=measured(2, "vLLM's default kv_cache_dtype 'auto' = model dtype bf16"),
        weights_bytes=measured(70.6e9 * 2, f"{_HF70}: 70.6 B parameters in bf16"),
        context_tokens=measured(131072, f"{_HF70}: max_position_embeddings"),
    ),
}

#: vLLM's ``gpu_memory_utilization`` default: the share of each GPU's memory the engine
#: takes for weights, activations and KV cache
GPU_MEMORY_UTILIZATION = measured(0.9, "vLLM EngineArgs.gpu_memory_utilization default")
#: share of the KV cache kept free when admitting (no admission into the last blocks, so
#: a preempted request does not come straight back and thrash)
KV_WATERMARK = assumed(0.01, "vLLM v0 block manager's watermark default (0.01)")
#: vLLM V1 (OpenAI API server) ``max_num_batched_tokens`` default by GPU memory
VLLM_BATCHED_TOKENS_LARGE_GPU = measured(
    8192, "vLLM V1 EngineArgs default for the OpenAI API server on GPUs with >= 70 GiB")
VLLM_BATCHED_TOKENS_SMALL_GPU = measured(
    2048, "vLLM V1 EngineArgs default for the OpenAI API server on GPUs under 70 GiB")
#: what loading an instance costs when the planner starts one (docs/simulator.md)
LOAD_BANDWIDTH_BYTES_PER_S = assumed(
    2e9, "weights read from a node-local cache at ~2 GB/s per GPU (safetensors, NVMe)")
WARMUP_S = assumed(
    20.0, "vLLM engine start after the weights: memory profiling run, CUDA graph capture")


def model_arch(model: str) -> ModelArch | None:
    """The architecture figures of ``model`` (None: unknown, no memory model)."""
    return MODELS.get(model)


def kv_capacity_tokens(
    profile: ServingProfile, memory_utilization: float = GPU_MEMORY_UTILIZATION.value
) -> float:
    """Tokens of KV cache one instance holds: (GPUs x memory x utilisation - weights)
    / KV bytes per token. ``inf`` when the model's architecture is unknown; 0 when
    the weights do not fit. GPU memory is read in GiB, as NVML reports it."""
    arch = model_arch(profile.model)
    mem = profile.product.memory_gb.value
    if arch is None or mem <= 0:
        return math.inf
    room = profile.gpus * mem * GIB * memory_utilization - arch.weights_bytes.value
    return max(room, 0.0) / arch.kv_bytes_per_token


def max_model_len(profile: ServingProfile, kv_tokens: float) -> float:
    """Longest sequence (prompt + output tokens) the engine takes: the model's context,
    cut to what the KV cache holds less its watermark (vLLM refuses a max_model_len whose
    KV does not fit); ``inf`` for an unknown model."""
    arch = model_arch(profile.model)
    context = arch.context_tokens.value if arch is not None else math.inf
    return min(context, math.floor(kv_tokens * (1.0 - KV_WATERMARK.value)))


def default_batched_tokens(product: GPUProduct) -> int:
    """vLLM V1's ``max_num_batched_tokens`` default for ``product`` (OpenAI API server)."""
    large = product.memory_gb.value >= 70
    return int((VLLM_BATCHED_TOKENS_LARGE_GPU if large else VLLM_BATCHED_TOKENS_SMALL_GPU).value)


def startup(profile: ServingProfile) -> tuple[float, float]:
    """(seconds, mean W of the whole instance) to start an instance: weights loaded at
    ``LOAD_BANDWIDTH_BYTES_PER_S`` per GPU at idle power, then ``WARMUP_S`` of warm-up at
    prefill power (profiling and graph capture run the model). Unknown model: warm-up only."""
    arch = model_arch(profile.model)
    load_s = 0.0 if arch is None else (
        arch.weights_bytes.value / (profile.gpus * LOAD_BANDWIDTH_BYTES_PER_S.value))
    warm = WARMUP_S.value
    total = load_s + warm
    if total <= 0:
        return 0.0, profile.idle_w
    energy = load_s * profile.idle_w + warm * float(profile.prefill_power_w())
    return total, energy / total
