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
    "serving": "one instance under Poisson arrivals: prefill-first continuous batching; prefill "
               "is an M/G/1 queue, decode runs in the time prefill leaves and its steps pause "
               "for every prefill (fluid mean-value model, ServingProfile.serving_point)",
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
      queue, see ``serving_point``);
    * ``tpot_margin``: the mean effective TPOT, prefill pauses included, stays
      at or below ``(1 - tpot_margin) x`` the TPOT SLO;
    * ``prefill_scv``: squared coefficient of variation of prefill time
      (= of prompt length, prefill being linear in tokens) in that queue.
    """

    ttft_miss: Figure = field(default_factory=lambda: assumed(
        0.01, "JouleSched's target deadline-miss rate rho* = 1 %, applied to TTFT per instance"))
    tpot_margin: Figure = field(default_factory=lambda: assumed(
        0.1, "FREESH MIAD margin (docs/architecture.md 1.5): TPOT above target x (1 - 0.1) "
        "is at risk"))
    prefill_scv: Figure = field(default_factory=lambda: assumed(
        1.0, "exponential prompt lengths; the bundled Azure 2023 conversation trace's prompt "
             "SCV over all requests is 0.92"))

    def __post_init__(self) -> None:
        if not 0.0 < self.ttft_miss.value <= 1.0:
            raise ValueError("ttft_miss must be in (0, 1]")
        if not 0.0 <= self.tpot_margin.value < 1.0:
            raise ValueError("tpot_margin must be in [0, 1)")
        if not self.prefill_scv.value >= 0.0:
            raise ValueError("prefill_scv must be >= 0")

    @classmethod
    def none(cls) -> Headroom:
        """No headroom: the fluid model's SLO limits only (TPOT at its SLO, TTFT unbounded)."""
        why = "no headroom: the fluid model's limit"
        return cls(ttft_miss=Figure(1.0, why), tpot_margin=Figure(0.0, why),
                   prefill_scv=Figure(0.0, why))

    def scaled(self, s: float) -> Headroom:
        """A share ``s`` in [0, 1] of this headroom: 1 is itself, 0 is none.

        The TTFT miss target moves log-linearly from 1 (no bound) to
        ``ttft_miss``, the TPOT margin linearly from 0; the SCV is kept.
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
            prefill_scv=self.prefill_scv,
        )

    def describe(self) -> str:
        return (f"P(wait > TTFT SLO - prefill) <= {self.ttft_miss.value:.3g} (M/G/1 prefill "
                f"queue at the mean prompt, prefill SCV "
                f"{self.prefill_scv.value:g}), mean effective TPOT <= "
                f"{1 - self.tpot_margin.value:.3g} x SLO")


#: the headroom the planner sizes pools with unless told otherwise
DEFAULT_HEADROOM = Headroom()


@dataclass(frozen=True)
class ServingPoint:
    """One instance of a mode serving one request class at its sustainable rate."""

    rps: float  # sustainable requests/s (0: not eligible for this class)
    power_w: float  # time-average board power of the instance at that rate
    throughput_rps: float  # saturation throughput (``ServingProfile.throughput_rps``)
    batch: float  # mean decode batch
    prefill_utilisation: float  # share of time prefilling (rho of the M/G/1 queue)
    busy: float  # share of time prefilling or decoding
    tpot_s: float  # mean effective TPOT, prefill pauses included
    ttft_miss: float  # predicted share whose prefill wait pushes TTFT past the SLO
    binding: str  # what stops a higher rate: ttft, tpot, batch, prefill; or why not eligible

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
        decode batch of the largest size whose step meets TPOT. Queueing and
        the pauses prefill puts into decoding are ignored: an instance loaded
        to this rate misses its SLOs (see :meth:`serving_point`). 0 when no
        batch meets TPOT.
        """
        b = self.best_batch(tpot_slo_s, clock_mhz)
        if b == 0:
            return 0.0
        prefill = float(self.prefill_s(mean_input_tokens, clock_mhz))
        decode_share = mean_output_tokens * float(self.itl_s(b, clock_mhz)) / b
        return 1.0 / (decode_share + prefill)

    def serving_point(
        self,
        mean_input_tokens: float,
        mean_output_tokens: float,
        ttft_slo_s: float,
        tpot_slo_s: float,
        clock_mhz: float | None = None,
        headroom: Headroom | None = None,
    ) -> ServingPoint:
        """The sustainable rate of one instance for a request class, with queueing headroom.

        Model (``LAWS["serving"]``), for Poisson arrivals at rate lam, prefill
        time S = ``prefill_s(mean prompt)``, o mean output tokens and step
        time itl(b) at decode batch b:

        * prefill-first continuous batching (vLLM's default scheduler, and the
          simulator's engine): prefills are served one at a time, FCFS, as
          soon as the previous one ends: an M/G/1 queue with utilisation
          rho = lam * S;
        * decoding runs in the remaining 1 - rho of the time; in steady state
          the mean batch b solves  lam * o = (1 - rho) * b / itl(b)  (the
          engine is never idle); when even b = 1 keeps up, the engine idles
          part of the time and decodes at b = 1;
        * every prefill pauses the decode steps of the running batch, so the
          mean TPOT a request sees is  itl(b) / (1 - rho);
        * the M/G/1 waiting time W has P(W > 0) = rho and, given a wait, an
          approximately exponential tail with the Pollaczek-Khinchine mean
          S (1 + c^2) / (2 (1 - rho))  (exact for M/M/1), so the share of
          requests whose wait pushes TTFT = W + S past the SLO T is
          P(W > T - S) ~= rho * exp(-2 (1 - rho) (T - S) / (S (1 + c^2))),
          c^2 = ``headroom.prefill_scv``. (A request's own prefill is taken at
          the mean prompt: FREESH's eligibility rule; a class whose mean
          prefill is close to its TTFT SLO still misses for its longer
          prompts, which this does not count.)

        The sustainable rate is the largest lam with P(W > T - S) <=
        ``headroom.ttft_miss``, mean TPOT <= (1 - ``headroom.tpot_margin``) x
        SLO and the batch slots rarely full: the decoding requests are an
        M/G/infinity population, Poisson with mean b, so b + z sqrt(b) <=
        ``max_batch`` with z the normal quantile of 1 - ``headroom.ttft_miss``
        (a full batch stops admission, and the prefill queue then waits).
        Every one of them tightens as lam grows, so the rate is found by
        bisection. Not eligible (rps 0) when prefill alone
        exceeds TTFT or no batch meets TPOT. Power is the time average:
        prefill power for rho, decode power at b while decoding, idle power
        otherwise.
        """
        hr = headroom or DEFAULT_HEADROOM
        key = (self, float(mean_input_tokens), float(mean_output_tokens), float(ttft_slo_s),
               float(tpot_slo_s), None if clock_mhz is None else float(clock_mhz), hr)
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


def _ttft_rho(eps: float, k: float) -> float:
    """The rho in (0, 1) with rho * exp(-k (1 - rho)) = eps (k >= 0, 0 < eps < 1).

    The left side rises from 0 to 1 over (0, 1), so the root is unique. Newton on
    f(rho) = log(rho) + k rho - log(eps) - k, concave and rising, from rho = eps
    (where f <= 0) climbs to it without overshooting.
    """
    target = math.log(eps) + k
    rho = eps
    for _ in range(100):
        step = (target - math.log(rho) - k * rho) / (1.0 / rho + k)
        rho = min(rho + step, 1.0)
        if step <= 1e-15 * rho:
            break
    return rho


@functools.lru_cache(maxsize=256)
def _decode_table(
    prof: ServingProfile, clock_mhz: float | None
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """(batches 1..max, their step times, and the engine's reachable (batch, step time)).

    The engine runs the smallest batch that keeps up, so only batches whose
    throughput is a new record are states it settles in.
    """
    batches = np.arange(1.0, float(int(prof.max_batch.value)) + 1.0)
    itl_all = np.maximum.accumulate(prof.itl_s(batches, clock_mhz))  # searchable
    tps = batches / itl_all
    keep = tps >= np.maximum.accumulate(tps)
    return batches, itl_all, batches[keep], itl_all[keep]


def _serving_point(
    prof: ServingProfile,
    mean_input_tokens: float,
    mean_output_tokens: float,
    ttft_slo_s: float,
    tpot_slo_s: float,
    clock_mhz: float | None,
    hr: Headroom,
) -> ServingPoint:
    """:meth:`ServingProfile.serving_point`: each bound on lam in closed form, the least wins.

    Along the engine's busy curve (never idle) lam, rho, TPOT and the mean
    batch are all functions of the batch b, tabulated at every integer b;
    each SLO bound is read off that table (or solved for when it binds below
    b = 1, where the engine idles part of the time).
    """
    S = float(prof.prefill_s(mean_input_tokens, clock_mhz))
    o = max(float(mean_output_tokens), 0.0)
    batches, itl_all, b_c, itl_c = _decode_table(prof, clock_mhz)
    meets = int(np.searchsorted(itl_all, tpot_slo_s, side="right"))  # best_batch
    # == throughput_rps(), from the table already at hand
    throughput = 0.0 if meets == 0 else 1.0 / (
        o * float(itl_all[meets - 1]) / float(batches[meets - 1]) + S)

    def not_eligible(why: str) -> ServingPoint:
        return ServingPoint(0.0, float(prof.power_w(1, clock_mhz)), throughput, 0.0, 0.0, 0.0,
                            float(itl_all[0]), 1.0, why)

    if ttft_slo_s < S:
        return not_eligible("prefill alone exceeds TTFT")
    if throughput == 0.0:
        return not_eligible("no batch meets TPOT")
    cap = (1.0 - hr.tpot_margin.value) * tpot_slo_s
    eps = hr.ttft_miss.value
    # P(W > T - S) = rho exp(-k (1 - rho)) with k = 2 (T - S) / (S (1 + c^2))
    k = 2.0 * (ttft_slo_s - S) / (S * (1.0 + hr.prefill_scv.value)) if S > 0.0 else math.inf

    lam_c = 1.0 / (S + o * itl_c / b_c)  # busy curve: rises with b
    tpot_c = np.maximum.accumulate(itl_c / (1.0 - lam_c * S))
    itl1, lam1 = float(itl_c[0]), float(lam_c[0])

    bounds: dict[str, float] = {"batch": float(lam_c[-1])}  # decode keeps up at best
    if S > 0.0:
        bounds["prefill"] = (1.0 - 1e-9) / S
        if eps < 1.0:
            bounds["ttft"] = _ttft_rho(eps, k) / S
    # decoding requests are an M/G/infinity population, Poisson with mean N (N = b on
    # the busy curve): P(all batch slots full) <= ttft_miss for N + z sqrt(N) <= max_batch
    z = NormalDist().inv_cdf(1.0 - eps) if eps < 0.5 else 0.0
    n_max = ((-z + math.sqrt(z * z + 4.0 * float(batches[-1]))) / 2.0) ** 2
    if n_max >= 1.0:
        bounds["batch"] = min(bounds["batch"], float(np.interp(n_max, b_c, lam_c)))
    else:  # idling engine at b = 1: N = lam o itl(1) / (1 - rho)
        bounds["batch"] = n_max / (o * itl1 + n_max * S)
    if float(tpot_c[0]) <= cap:
        bounds["tpot"] = float(np.interp(cap, tpot_c, lam_c))
    elif itl1 <= cap and S > 0.0:  # idling engine at b = 1: itl(1) / (1 - lam S) <= cap
        bounds["tpot"] = (1.0 - itl1 / cap) / S
    else:
        return not_eligible("no batch meets TPOT with the headroom")
    binding = min(bounds, key=lambda name: bounds[name])
    lam = bounds[binding]

    rho = lam * S
    if lam <= lam1:  # the engine idles part of the time and decodes at b = 1
        b, it = 1.0, itl1
        dec = min(lam * o * itl1, 1.0 - rho)
    else:
        b = float(np.interp(lam, lam_c, b_c))
        it = float(prof.itl_s(b, clock_mhz))
        dec = 1.0 - rho
    ttft = rho * math.exp(-k * (1.0 - rho)) if S > 0.0 and rho > 0.0 else 0.0
    power = (rho * float(prof.prefill_power_w(clock_mhz)) + dec * float(prof.power_w(b, clock_mhz))
             + max(1.0 - rho - dec, 0.0) * prof.idle_w)
    return ServingPoint(
        rps=lam, power_w=power, throughput_rps=throughput, batch=b, prefill_utilisation=rho,
        busy=min(rho + dec, 1.0), tpot_s=it / (1.0 - rho), ttft_miss=ttft, binding=binding,
    )


@functools.lru_cache(maxsize=16384)
def _cached_serving_point(
    key: tuple[ServingProfile, float, float, float, float, float | None, Headroom],
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
