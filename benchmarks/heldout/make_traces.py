"""Write the held-out trace CSVs (docs/simulator.md, "Held-out scenarios").

    python benchmarks/heldout/make_traces.py [OUTDIR]     (default benchmarks/heldout/traces)

Traces of shapes the energy matrix (``joulepool bench energy``) does not contain,
each one hour of TIMESTAMP (seconds), ContextTokens, GeneratedTokens, the format
``joulepool simulate --trace`` and ``bench energy --traces`` read. The bench
resamples (prompt, response) pairs jointly from a trace and keeps its per-minute
arrival-rate shape, so what a trace carries is its token distribution and its
minute-to-minute rate. Seeded: the same files on every run. The shapes and their
parameters are written down here, picked before any run, not fitted to a result:

- ``code``: code completion, prompts ~2,000 tokens with a wide spread (lognormal,
  sigma 0.8, up to 16k), answers ~30 tokens (lognormal sigma 0.9, from 1), a gentle
  rise of the rate over the hour (x1 to x1.6);
- ``heavy-tail``: Pareto (Lomax, shape 1.3) prompts with a median ~350 tokens and a
  tail to 60,000 (past an L4's KV room for 8B), answers ~200 (lognormal sigma 1);
- ``bursty``: chat-like tokens (prompts ~800, answers ~250, lognormal sigma 1 and
  0.8) with bursts: in each 12-minute period, 2 minutes at 3x the base rate;
- ``short-chat``: very short turns, prompts ~60 and answers ~40 (lognormal 0.6);
- ``reasoning``: prompts ~300, long answers ~1,500 with a heavy tail to 12,000
  (lognormal sigma 0.9).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt

SPAN_S = 3600.0
#: mean requests per trace: enough for the token distributions; the bench draws
#: its own arrivals at the cell's rate from the per-minute shape
REQUESTS = 6000
DEFAULT_OUT = Path(__file__).resolve().parent / "traces"

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


def lognormal(rng: np.random.Generator, mean: float, sigma: float, n: int, lo: int,
              hi: int) -> IntArray:
    """Integers from a lognormal of this mean (before clipping to [lo, hi])."""
    mu = math.log(mean) - sigma**2 / 2
    return np.clip(np.rint(rng.lognormal(mu, sigma, n)), lo, hi).astype(np.int64)


def arrivals(rng: np.random.Generator, minute_weight: Callable[[FloatArray], FloatArray]
             ) -> FloatArray:
    """Poisson arrivals over SPAN_S whose per-minute rate follows ``minute_weight``
    (scaled so that REQUESTS arrive on average)."""
    minutes = np.arange(int(SPAN_S // 60), dtype=np.float64)
    weight = minute_weight(minutes)
    counts = rng.poisson(REQUESTS * weight / weight.sum())
    t = np.repeat(minutes * 60.0, counts) + rng.random(int(counts.sum())) * 60.0
    return np.sort(t)


def flat(m: FloatArray) -> FloatArray:
    return np.ones_like(m)


def code(rng: np.random.Generator) -> tuple[FloatArray, IntArray, IntArray]:
    t = arrivals(rng, lambda m: 1.0 + 0.6 * m / m[-1])
    return t, lognormal(rng, 2000, 0.8, t.size, 16, 16_384), lognormal(rng, 30, 0.9, t.size,
                                                                      1, 1_000)


def heavy_tail(rng: np.random.Generator) -> tuple[FloatArray, IntArray, IntArray]:
    t = arrivals(rng, flat)
    shape, median = 1.3, 350.0
    scale = median / (2 ** (1 / shape) - 1)  # Lomax median = scale (2^(1/shape) - 1)
    prompts = np.clip(np.rint(scale * rng.pareto(shape, t.size)), 1, 60_000).astype(np.int64)
    return t, prompts, lognormal(rng, 200, 1.0, t.size, 1, 4_000)


def bursty(rng: np.random.Generator) -> tuple[FloatArray, IntArray, IntArray]:
    t = arrivals(rng, lambda m: np.where(m % 12 < 2, 3.0, 1.0))
    return t, lognormal(rng, 800, 1.0, t.size, 4, 16_384), lognormal(rng, 250, 0.8, t.size,
                                                                      1, 4_000)


def short_chat(rng: np.random.Generator) -> tuple[FloatArray, IntArray, IntArray]:
    t = arrivals(rng, flat)
    return t, lognormal(rng, 60, 0.6, t.size, 1, 1_000), lognormal(rng, 40, 0.6, t.size, 1, 500)


def reasoning(rng: np.random.Generator) -> tuple[FloatArray, IntArray, IntArray]:
    t = arrivals(rng, flat)
    return t, lognormal(rng, 300, 0.6, t.size, 8, 4_000), lognormal(rng, 1500, 0.9, t.size,
                                                                     16, 12_000)


TRACES: dict[str, Callable[[np.random.Generator], tuple[FloatArray, IntArray, IntArray]]] = {
    "code": code, "heavy-tail": heavy_tail, "bursty": bursty, "short-chat": short_chat,
    "reasoning": reasoning,
}


def write(out_dir: Path, names: list[str] | None = None) -> list[Path]:
    """Write ``<name>.csv`` for each trace (default all) under ``out_dir``; each has its
    own seed (its index in TRACES), so one can be written alone."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for seed, (name, make) in enumerate(TRACES.items()):
        if names is not None and name not in names:
            continue
        t, inp, out = make(np.random.default_rng([seed, 0x68656C64]))
        path = out_dir / f"{name}.csv"
        with path.open("w", encoding="utf-8") as f:
            f.write("TIMESTAMP,ContextTokens,GeneratedTokens\n")
            f.writelines(f"{a:.3f},{i},{o}\n" for a, i, o in zip(t, inp, out, strict=True))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else DEFAULT_OUT
    for path in write(out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
