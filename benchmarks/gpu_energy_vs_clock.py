"""Energy per unit of work against the locked SM clock, on a real NVIDIA GPU.

    sudo .venv/bin/python benchmarks/gpu_energy_vs_clock.py [--gpu 0] [--clocks 8]
         [--seconds 8] [--load matmul|stream] [--size 8192] [--json out.json]

Needs an NVIDIA GPU, its driver, root or CAP_SYS_ADMIN (to lock clocks) and
torch or cupy for the load. It goes through joulepool's own NVML backend
(``joulepool.nodeagent.nvml``), so it also checks that code path on hardware:

1. reads energy, power and the supported clocks, and idles a few seconds to
   measure idle power;
2. for each of ``--clocks`` SM clocks spread over the lockable range (from
   the product's floor in ``core.profiles``, else half of max, up to max), locks
   it (min = max = f), runs the load for ``--seconds`` and measures energy from
   the counter (mJ) and work done;
3. resets the clocks (also on Ctrl-C / SIGTERM / any error) and prints, per
   clock, observed SM clock, power, throughput and joules per unit of work,
   plus the fitted exponents that ``core.profiles`` assumes:
   time per unit ~ (f_max/f)**beta and dynamic power ~ (f/f_max)**gamma.

Loads: ``matmul`` (bf16 GEMM, compute bound: prefill-like; unit = TFLOP) and
``stream`` (large elementwise copy-scale, memory bound: decode-like; unit =
GB moved). Exit codes: 0 done, 2 missing GPU / privilege / load library.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from collections.abc import Callable
from typing import Any


def _load(kind: str, size: int) -> tuple[Callable[[], None], Callable[[], None], float, str]:
    """(one unit of work, synchronise, work per call, unit name) from torch or cupy."""
    try:
        import torch

        if not torch.cuda.is_available():
            raise ImportError("torch has no CUDA")
        if kind == "matmul":
            a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
            c = torch.empty_like(a)

            def work() -> None:
                torch.matmul(a, b, out=c)

            return work, torch.cuda.synchronize, 2 * size**3 / 1e12, "TFLOP"
        x = torch.randn(size * size * 4, device="cuda", dtype=torch.float32)
        y = torch.empty_like(x)

        def stream() -> None:
            torch.mul(x, 1.0001, out=y)

        return stream, torch.cuda.synchronize, 2 * x.numel() * 4 / 1e9, "GB"
    except ImportError:
        pass
    try:
        import cupy as cp

        if kind == "matmul":
            a = cp.random.standard_normal((size, size), dtype=cp.float32).astype(cp.float16)
            b = cp.random.standard_normal((size, size), dtype=cp.float32).astype(cp.float16)

            def work_cp() -> None:
                cp.matmul(a, b)

            return (work_cp, cp.cuda.Device().synchronize, 2 * size**3 / 1e12, "TFLOP")
        x = cp.random.standard_normal(size * size * 4, dtype=cp.float32)
        y = cp.empty_like(x)

        def stream_cp() -> None:
            cp.multiply(x, 1.0001, out=y)

        return stream_cp, cp.cuda.Device().synchronize, 2 * x.size * 4 / 1e9, "GB"
    except ImportError as exc:
        raise SystemExit(
            "gpu_energy_vs_clock: needs torch (with CUDA) or cupy for the GPU load; "
            "pip install torch or cupy-cuda12x") from exc


def _slope(xs: list[float], ys: list[float]) -> float | None:
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else None


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--gpu", type=int, default=0)
    parser.add_argument("--clocks", type=int, default=8, help="how many clocks to measure")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds of load per clock")
    parser.add_argument("--idle-seconds", type=float, default=3.0)
    parser.add_argument("--load", choices=("matmul", "stream"), default="matmul")
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--json", help="also write the results here")
    return parser.parse_args(argv)


def _pick_clocks(nvml: Any, gpu: int, n_clocks: int) -> tuple[str, list[float]]:
    """(the GPU's name, the SM clocks to measure, highest first): ``n_clocks`` spread
    over the supported clocks from the product's floor (else half of max) to max."""
    from joulepool.core.profiles import product_for_label

    dev = nvml.devices()[gpu]
    product = product_for_label(dev.name)
    supported = sorted(nvml.supported_clocks_mhz(gpu))
    f_max = supported[-1]
    floor = product.f_min_mhz.value if product else f_max / 2
    usable = [f for f in supported if f >= floor - 1e-6]
    n = max(2, min(n_clocks, len(usable)))
    picks = sorted({usable[round(i * (len(usable) - 1) / (n - 1))] for i in range(n)},
                   reverse=True)
    print(f"GPU {gpu}: {dev.name} ({product.name if product else 'unknown product'}), "
          f"{len(supported)} supported SM clocks {supported[0]:g}-{f_max:g} MHz; "
          f"measuring {len(picks)} clocks from {picks[-1]:g} to {picks[0]:g} MHz")
    return str(dev.name), picks


def _measure(nvml: Any, gpu: int, f: float, load: tuple[Callable[[], None],
             Callable[[], None], float, str], seconds: float, idle_w: float) -> dict[str, Any]:
    """Lock ``f``, run the load ``seconds`` and return the clock's row (power from the
    energy counter, throughput, energy per unit of work)."""
    work, sync, per_call, unit = load
    nvml.set_locked_clocks(gpu, f, f)
    for _ in range(20):  # settle at the new clock
        work()
    sync()
    clocks, calls = [], 0
    e0, t0 = nvml.energy_mj(gpu), time.monotonic()
    while time.monotonic() - t0 < seconds:
        for _ in range(10):
            work()
        sync()
        calls += 10
        clocks.append(nvml.sm_clock_mhz(gpu))
    dt = time.monotonic() - t0
    joules = (nvml.energy_mj(gpu) - e0) / 1e3
    done = calls * per_call
    r = {"locked_mhz": f, "sm_mhz": sum(clocks) / len(clocks), "seconds": dt,
         "power_w": joules / dt, f"{unit}_per_s": done / dt,
         f"joules_per_{unit}": joules / done, "dynamic_w": joules / dt - idle_w}
    print(f"  {f:6.0f} MHz (SM {r['sm_mhz']:6.0f}): {r['power_w']:6.1f} W, "
          f"{r[f'{unit}_per_s']:8.2f} {unit}/s, {r[f'joules_per_{unit}']:.4f} J/{unit}")
    return r


def _fit(rows: list[dict[str, Any]], unit: str) -> tuple[float | None, float | None]:
    """(beta, gamma) fitted over ``rows`` and printed with the clock of least energy."""
    top = rows[0]
    beta = _slope([top["locked_mhz"] / r["locked_mhz"] for r in rows],
                  [top[f"{unit}_per_s"] / r[f"{unit}_per_s"] for r in rows])
    gamma = _slope([r["locked_mhz"] / top["locked_mhz"] for r in rows],
                   [r["dynamic_w"] / top["dynamic_w"] for r in rows])
    best = min(rows, key=lambda r: r[f"joules_per_{unit}"])
    print(f"fitted: time per {unit} ~ (f_max/f)^{beta:.2f}, dynamic power ~ (f/f_max)^"
          f"{gamma:.2f} (core.profiles assumes beta_decode 0.3, beta_prefill 1.0, gamma 2.0)"
          if beta is not None and gamma is not None else "fit: not enough points")
    print(f"least energy per {unit}: {best['locked_mhz']:g} MHz, "
          f"{best[f'joules_per_{unit}']:.4f} J/{unit} "
          f"({100 * (1 - best[f'joules_per_{unit}'] / top[f'joules_per_{unit}']):.1f} % below "
          f"{top['locked_mhz']:g} MHz)")
    return beta, gamma


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    from joulepool.core.device import GPUError, GPUErrorKind
    from joulepool.nodeagent.nvml import NvmlBackend

    nvml = NvmlBackend()
    try:
        nvml.init()
    except GPUError as exc:
        print(f"gpu_energy_vs_clock: no usable NVIDIA GPU here: {exc}", file=sys.stderr)
        return 2
    name, picks = _pick_clocks(nvml, args.gpu, args.clocks)

    def reset(*_: Any) -> None:
        try:
            nvml.reset_locked_clocks(args.gpu)
        except GPUError as exc:
            print(f"reset failed: {exc}", file=sys.stderr)

    def on_signal(signum: int, _frame: Any) -> None:
        reset()
        raise SystemExit(128 + signum)

    handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        reset()
        e0, t0 = nvml.energy_mj(args.gpu), time.monotonic()
        time.sleep(args.idle_seconds)
        idle_w = (nvml.energy_mj(args.gpu) - e0) / 1e3 / (time.monotonic() - t0)
        print(f"idle power {idle_w:.1f} W (energy counter over {args.idle_seconds:g} s)")
        load = _load(args.load, args.size)
        for _ in range(5):
            load[0]()
        load[1]()
        rows = [_measure(nvml, args.gpu, f, load, args.seconds, idle_w) for f in picks]
    except GPUError as exc:
        if exc.kind is not GPUErrorKind.NO_PERMISSION:
            raise
        print("cannot lock clocks: run as root or with CAP_SYS_ADMIN", file=sys.stderr)
        return 2
    finally:
        reset()
        nvml.shutdown()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    beta, gamma = _fit(rows, load[3])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"gpu": name, "load": args.load, "idle_w": idle_w, "rows": rows,
                       "beta": beta, "gamma": gamma}, fh, indent=2)
    return 0

if __name__ == "__main__":
    sys.exit(main())
