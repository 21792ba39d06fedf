"""GPU product x served model: performance and energy model.

Every default number is a :class:`Figure` that names its source, or says
"assumed" and why, so users can see which parts of a result rest on
measurement (see ``shared/design/CALIBRATION.md``).

The model (all laws labelled in ``LAWS``):

* decode step time (inter-token latency) at max clock is interpolated in
  log2(batch) between calibration points; tokens/s = batch / step time;
* lowering the SM clock f stretches decode by ``(f_max/f)**beta_decode``
  (memory bound) and prefill by ``(f_max/f)**beta_prefill`` (compute bound);
* busy power at max clock is interpolated like the step time; the part above
  idle power scales with ``(f/f_max)**gamma``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

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
    "clock_power": "dynamic power above idle scales with (f/f_max)**gamma (assumed law, gamma 2-3)",
    "clock_decode": "decode step time scales with (f_max/f)**beta_decode (assumed, memory bound)",
    "clock_prefill": "prefill time scales with (f_max/f)**beta_prefill (assumed, compute bound)",
    "batch": "step time and power interpolated in log2(batch) between calibration points",
    "prefill_power": "prefill (compute bound) draws the power of the largest batch at that clock "
                     "(assumed: no published prefill power)",
}


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
    gamma: Figure = field(default_factory=lambda: assumed(2.0, "low end of 2-3, CALIBRATION.md"))
    beta_decode: Figure = field(
        default_factory=lambda: assumed(0.3, "middle of 0.2-0.4, CALIBRATION.md")
    )
    beta_prefill: Figure = field(default_factory=lambda: assumed(1.0, "CALIBRATION.md"))

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("a serving profile needs at least one batch point")
        batches = [p.batch for p in self.points]
        if batches != sorted(set(batches)) or batches[0] < 1:
            raise ValueError("batch points must be distinct, ascending and >= 1")
        if self.gpus < 1:
            raise ValueError("gpus must be >= 1")

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
        b = np.clip(np.asarray(batch, dtype=np.float64), 1.0, self.max_batch.value)
        xs = np.log2([p.batch for p in self.points])
        return np.asarray(np.interp(np.log2(b), xs, values), dtype=np.float64)

    def _clock_ratio(self, clock_mhz: ArrayLike | None) -> FloatArray:
        if clock_mhz is None:
            return np.asarray(1.0)
        f = np.clip(np.asarray(clock_mhz, dtype=np.float64), self.f_min, self.f_max)
        return np.asarray(f / self.f_max, dtype=np.float64)

    def itl_s(self, batch: ArrayLike, clock_mhz: ArrayLike | None = None) -> FloatArray:
        """Decode step time (inter-token latency) in seconds."""
        base = self._interp(batch, [p.itl_ms.value / 1e3 for p in self.points])
        ratio = self._clock_ratio(clock_mhz)
        return np.asarray(base * ratio ** (-self.beta_decode.value), dtype=np.float64)

    def decode_tokens_per_s(
        self, batch: ArrayLike, clock_mhz: ArrayLike | None = None
    ) -> FloatArray:
        b = np.clip(np.asarray(batch, dtype=np.float64), 1.0, self.max_batch.value)
        return np.asarray(b / self.itl_s(b, clock_mhz), dtype=np.float64)

    def prefill_s(self, tokens: ArrayLike, clock_mhz: ArrayLike | None = None) -> FloatArray:
        """Time to prefill ``tokens`` prompt tokens."""
        ratio = self._clock_ratio(clock_mhz)
        t = np.asarray(tokens, dtype=np.float64) / self.prefill_tokens_per_s.value
        return np.asarray(t * ratio ** (-self.beta_prefill.value), dtype=np.float64)

    def power_w(self, batch: ArrayLike, clock_mhz: ArrayLike | None = None) -> FloatArray:
        """Board power of the whole instance; idle power when batch == 0."""
        b = np.asarray(batch, dtype=np.float64)
        busy = self._interp(np.maximum(b, 1.0), [p.power_w.value for p in self.points])
        dyn = np.maximum(busy - self.idle_w, 0.0) * self._clock_ratio(clock_mhz) ** self.gamma.value
        return np.asarray(np.where(b > 0, self.idle_w + dyn, self.idle_w), dtype=np.float64)

    def prefill_power_w(self, clock_mhz: ArrayLike | None = None) -> FloatArray:
        """Board power of the whole instance while it prefills (``LAWS["prefill_power"]``)."""
        return self.power_w(self.max_batch.value, clock_mhz)

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

    def operating_point(
        self,
        mean_input_tokens: float,
        mean_output_tokens: float,
        ttft_slo_s: float,
        tpot_slo_s: float,
        clock_mhz: float | None = None,
    ) -> tuple[float, float]:
        """(power W, sustainable requests/s) of one instance for a request class.

        Runs at the largest batch that meets TPOT; each request also occupies
        the engine for its prefill. Returns (power, 0.0) when the mode cannot
        meet the SLO at all (prefill alone exceeds TTFT, or no batch meets TPOT):
        the planner reads 0 as "not eligible".
        """
        b = self.best_batch(tpot_slo_s, clock_mhz)
        prefill = float(self.prefill_s(mean_input_tokens, clock_mhz))
        if b == 0 or prefill > ttft_slo_s:
            return float(self.power_w(1, clock_mhz)), 0.0
        decode_share = mean_output_tokens * float(self.itl_s(b, clock_mhz)) / b
        rps = 1.0 / (decode_share + prefill)
        return float(self.power_w(b, clock_mhz)), rps

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


# --------------------------------------------------------------------------
# Defaults from CALIBRATION.md
# --------------------------------------------------------------------------
_MLE = "ML.ENERGY leaderboard v3, H100 80GB bf16 chat"
_CAL = "CALIBRATION.md"

H100 = GPUProduct(
    name="H100",
    tdp_w=measured(700, "vendor spec, H100 SXM TDP"),
    idle_w=assumed(75, "H100 idle, CALIBRATION.md"),
    f_max_mhz=measured(1980, "vendor spec, H100 SXM max SM clock"),
    f_min_mhz=assumed(990, "half of max: below it decode SLOs fail in practice"),
    clock_step_mhz=assumed(15, "NVML reports H100/A100 SM clocks in 15 MHz steps"),
    memory_gb=measured(80, "vendor spec"),
    aliases=("NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-SXM5-80GB", "NVIDIA H100 80GB HBM3"),
)
A100 = GPUProduct(
    name="A100",
    tdp_w=measured(400, "vendor spec, A100 SXM TDP"),
    idle_w=measured(60, "published idle measurement on A100-80GB, CALIBRATION.md"),
    f_max_mhz=measured(1410, "vendor spec, A100 max SM clock"),
    f_min_mhz=measured(1005, "lowest clock of published A100 DVFS sweeps, CALIBRATION.md"),
    clock_step_mhz=assumed(15, "NVML reports H100/A100 SM clocks in 15 MHz steps"),
    memory_gb=measured(80, "vendor spec, A100-80GB"),
    aliases=("NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-80GB-PCIe", "NVIDIA A100-SXM4-80GB"),
)
L4 = GPUProduct(
    name="L4",
    tdp_w=measured(72, "vendor spec, L4 TDP"),
    idle_w=assumed(16, "L4 idle, CALIBRATION.md"),
    f_max_mhz=measured(2040, "vendor spec, L4 max SM clock"),
    f_min_mhz=assumed(1020, "half of max, as for H100"),
    clock_step_mhz=assumed(15, "same step as the other products"),
    memory_gb=measured(24, "vendor spec"),
    aliases=("NVIDIA-L4", "NVIDIA L4"),
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
        _pt(1, assumed(6.6, "linear fit of the b=8 and b=64 points to b=1"),
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
