"""Energy floor: the least energy any schedule could spend on a given amount of work.

A linear program over operating points. Every GPU draws its idle power for
the whole horizon whatever the schedule does; on top of that, the work is
split over columns

* decode: one instance of serving profile p at SM clock f running a steady
  batch b, for x instance-seconds: makes ``x * tps(b, f)`` output tokens and
  costs ``x * (P(b, f) - P_idle)`` joules;
* prefill: y instance-seconds at clock f: ``y / prefill_s(1, f)`` prompt
  tokens for ``y * (P_prefill(f) - P_idle)`` joules;

subject to, per demand (a request class, or a part of one):

* tokens: decode makes ``output - requests`` tokens (each request's first token
  comes with its prefill's last step), prefill every prompt token;
* GPU-seconds per (site, product): ``sum gpus(p) * (x + y) <= GPUs * T``;
* TPOT: a decode column must meet the demand's TPOT (``itl(b, f) <= tpot``);
* TTFT: the demand's prefill instance-seconds, over all GPUs and clocks, at most
  ``requests x ttft``;
* prompts prefilled on the GPUs that decode them: per demand and (site, product),
  prefill tokens = the demand's prompt-to-decode ratio x decode tokens. The engine
  (vLLM, and the simulator's) keeps a request's KV cache on the instance that
  prefilled it, so no schedule here prefills on one kind of GPU and decodes on
  another (disaggregated prefill).

Why each is a bound on every schedule (docs/marginal-energy.md, "Is the floor a
floor?"): a mixed step of the engine (``core.batching.mixed_step``) is a decode
step of ``itl(b, f)`` at ``P(b, f)`` plus a prompt chunk at the prefill power, so
any run's energy above idle is exactly a sum of these columns. Each request's TTFT
is at least its own prompt's prefill time, so the sum over a demand's requests of
their prefill times, which is its prefill instance-seconds, is at most
``requests x ttft`` (the old rule, every clock fitting the demand's *mean* prompt,
barred clocks and GPUs a schedule may use for its shorter prompts). The TPOT rule
per column is exact where every column up to the engine's batch limit meets TPOT
(FREESH's 150 ms on H100, A100 and L4 at every clock); under tighter TPOTs it
assumes a request's mean step cannot gain by mixing steps slower than TPOT with
faster ones (J/token convex along the eligible frontier), which is not proven.
The prefill-where-decoded equality holds per demand; callers split a class into
prompt-length parts (``sim.runner.FLOOR_PROMPT_PARTS``) so that a schedule's
routing of short and long prompts to different GPUs stays inside the LP.

It relaxes everything else a real schedule must also get right (arrival timing,
queueing, integral batches and instances, prefill stalling decode and lengthening
its steps, one clock per GPU at a time, the KV-cache capacity), so every schedule
of the same work under the same profiles spends at least this much: a physical
floor, not a target. All numbers come from
:class:`~joulepool.core.profiles.ServingProfile`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from joulepool.core.profiles import ServingProfile

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class FloorDemand:
    """Work of one request class (or a part of one) over the horizon.

    ``requests``: how many requests (0: ``input_tokens / mean_input_tokens``). Each
    one's first output token comes with its prefill's last step, so decode makes
    ``output_tokens - requests`` tokens; and each prefills within ``ttft_s``, so their
    prefill takes at most ``requests x ttft_s`` instance-seconds in all.
    """

    name: str
    output_tokens: float
    input_tokens: float
    mean_input_tokens: float
    ttft_s: float
    tpot_s: float
    requests: float = 0.0

    def __post_init__(self) -> None:
        for what in ("output_tokens", "input_tokens", "mean_input_tokens", "requests"):
            v = getattr(self, what)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{self.name}: {what} must be finite and >= 0")
        if self.ttft_s <= 0 or self.tpot_s <= 0:
            raise ValueError(f"{self.name}: SLO targets must be positive")
        if self.input_tokens > 0 and self.requests <= 0 and self.mean_input_tokens <= 0:
            # no requests to count: the TTFT row would allow no prefill at all
            raise ValueError(f"{self.name}: prompt tokens need requests or "
                             "mean_input_tokens > 0")

    @property
    def n_requests(self) -> float:
        """How many requests: ``requests``, or ``input_tokens / mean_input_tokens`` when
        that is 0 (0 when ``mean_input_tokens`` is 0 too)."""
        if self.requests > 0 or self.mean_input_tokens <= 0:
            return self.requests
        return self.input_tokens / self.mean_input_tokens

    @property
    def decode_tokens(self) -> float:
        """Output tokens made by decode steps (each request's first comes with its
        prefill); at least 0."""
        return max(self.output_tokens - min(self.n_requests, self.output_tokens), 0.0)


@dataclass(frozen=True)
class FloorGPUs:
    """``count`` GPUs of ``product`` at ``site``."""

    site: str
    product: str
    count: int

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError("GPU count must be >= 0")


@dataclass(frozen=True)
class FloorColumn:
    """One operating point the floor's solution uses: ``instance_s`` instance-seconds
    of ``profile`` (a :attr:`ServingProfile.key`) at ``site``, serving class ``demand``,
    decoding at ``batch`` (``kind`` "decode") or prefilling (``kind`` "prefill", batch 0)
    at ``clock_mhz``; ``tokens`` output or prompt tokens, ``dynamic_j`` J above idle."""

    demand: str
    site: str
    profile: str
    kind: str
    batch: float
    clock_mhz: float
    instance_s: float
    tokens: float
    dynamic_j: float

    @property
    def joules_per_token(self) -> float:
        """J above idle per token of this column (NaN when it makes none)."""
        return self.dynamic_j / self.tokens if self.tokens > 0 else math.nan


@dataclass(frozen=True)
class FloorResult:
    feasible: bool
    status: str
    energy_j: float  # idle_j + dynamic_j; NaN when infeasible
    idle_j: float
    dynamic_j: float
    output_tokens: float
    horizon_s: float
    #: classes with no SLO-feasible operating point: their floor ignores the SLO
    slo_relaxed: tuple[str, ...] = ()
    #: profile key -> share of the horizon's GPU-seconds the floor uses on it
    usage: dict[str, float] = field(default_factory=dict)
    #: dynamic_j split: J above idle of the decode columns and of the prefill columns
    decode_j: float = math.nan
    prefill_j: float = math.nan
    #: output-token-weighted mean decode batch of the decode columns it uses
    decode_batch: float = math.nan
    #: the operating points the solution uses (instance-seconds > 0)
    columns: tuple[FloorColumn, ...] = ()

    @property
    def joules_per_token(self) -> float:
        return self.energy_j / self.output_tokens if self.output_tokens > 0 else math.nan

    @property
    def mean_power_w(self) -> float:
        return self.energy_j / self.horizon_s


#: decode batches tried at each clock besides the largest one meeting the TPOT
_BATCH_GRID = tuple(2**k for k in range(0, 11))


@functools.cache
def decode_columns(
    p: ServingProfile, tpot_s: float, enforce: bool
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """(tokens per instance-second, dynamic joules per instance-second, batch, clock MHz)
    per column; read-only arrays, computed once per profile and TPOT."""
    clocks = p.product.supported_clocks()
    max_b = int(p.max_batch.value)
    tps_cols: list[float] = []
    dyn_cols: list[float] = []
    batch_cols: list[float] = []
    clock_cols: list[float] = []
    for f in clocks:
        b_star = p.best_batch(tpot_s, float(f)) if enforce else max_b
        if b_star <= 0:
            continue
        batches = np.array(sorted({b for b in _BATCH_GRID if b <= b_star} | {b_star}), float)
        tps = p.decode_tokens_per_s(batches, float(f))
        dyn = p.power_w(batches, float(f)) - p.idle_w
        tps_cols.extend(float(v) for v in tps)
        dyn_cols.extend(float(v) for v in dyn)
        batch_cols.extend(float(v) for v in batches)
        clock_cols.extend(float(f) for _ in batches)
    out = (np.array(tps_cols), np.array(dyn_cols), np.array(batch_cols), np.array(clock_cols))
    for arr in out:
        arr.flags.writeable = False
    return out


def prefill_columns(
    p: ServingProfile, mean_input: float, ttft_s: float, enforce: bool
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """(tokens per instance-second, dynamic J per instance-second, 0, clock MHz) per
    column."""
    clocks = p.product.supported_clocks()
    per_token = p.prefill_s(1.0, clocks)
    ok = (p.prefill_s(mean_input, clocks) <= ttft_s) if enforce else np.ones(clocks.size, bool)
    tps = 1.0 / per_token[ok]
    dyn = p.prefill_power_w(clocks[ok]) - p.idle_w
    return (np.asarray(tps, np.float64), np.asarray(dyn, np.float64), np.zeros(tps.size),
            np.asarray(clocks[ok], np.float64))


def _idle_energy(
    gpus: Sequence[FloorGPUs],
    profiles: Sequence[ServingProfile],
    idle_w: dict[str, float] | None,
    horizon_s: float,
) -> float:
    """J every GPU draws idle over the horizon, whatever the schedule."""
    idle_by_product: dict[str, float] = {p.product.name: p.product.idle_w.value for p in profiles}
    if idle_w:
        idle_by_product.update(idle_w)
    idle_j = 0.0
    for g in gpus:
        if g.count and g.product not in idle_by_product:
            raise ValueError(f"no idle power known for GPU product {g.product!r}")
        idle_j += g.count * idle_by_product.get(g.product, 0.0) * horizon_s
    return idle_j


def _slo_feasible(
    d: FloorDemand, groups: Sequence[FloorGPUs], profiles: Sequence[ServingProfile]
) -> bool:
    """Whether some GPU group offers a decode and a prefill column meeting d's SLO."""
    has_dec = any(
        decode_columns(p, d.tpot_s, True)[0].size
        for g in groups for p in profiles if p.product.name == g.product
    )
    has_pre = any(
        prefill_columns(p, d.mean_input_tokens, d.ttft_s, True)[0].size
        for g in groups for p in profiles if p.product.name == g.product
    )
    return has_dec and has_pre


class _Columns:
    """The LP's columns in sparse blocks.

    Rows 0..2R-1 are demand (decode of class r at 2r, prefill at 2r+1) as
    -tokens <= -demand; rows 2R.. are GPU-seconds per group.
    """

    def __init__(self, n_classes: int, n_groups: int = 0,
                 prompt_ratio: Sequence[float] = ()) -> None:
        self.R = n_classes
        self.G = n_groups
        #: per class: prompt tokens per decode token (FloorDemand.decode_tokens; 0: no
        #: prefill-decode coupling)
        self.ratio = tuple(prompt_ratio)
        self.eq_i: list[FloatArray] = []  # coupling row per nonzero: class x group
        self.eq_j: list[FloatArray] = []
        self.eq_v: list[FloatArray] = []
        self.costs: list[FloatArray] = []
        self.rows_i: list[FloatArray] = []  # row index per nonzero
        self.cols_j: list[FloatArray] = []
        self.vals: list[FloatArray] = []
        self.col_key: list[FloatArray] = []  # profile index per column (for usage)
        self.col_kind: list[FloatArray] = []  # 0 decode, 1 prefill per column
        self.col_batch: list[FloatArray] = []  # decode batch per column (0: prefill)
        self.col_clock: list[FloatArray] = []  # SM clock per column, MHz
        self.col_class: list[FloatArray] = []  # class index per column
        self.col_group: list[FloatArray] = []  # GPU group index per column
        self.n_cols = 0

    def add(self, ri: int, kind: int, gi: int, pi: int, p: ServingProfile,
            tps: FloatArray, dyn: FloatArray, batch: FloatArray, clock: FloatArray) -> None:
        """Columns of profile ``pi`` on group ``gi`` for class ``ri``'s ``kind`` (0 decode,
        1 prefill): ``tps`` tokens and ``dyn`` dynamic J per instance-second at ``batch``
        (0 for prefill) and ``clock`` MHz."""
        k = tps.size
        if k == 0:
            return
        self.col_kind.append(np.full(k, float(kind)))
        self.col_batch.append(batch)
        self.col_clock.append(clock)
        self.col_class.append(np.full(k, float(ri)))
        self.col_group.append(np.full(k, float(gi)))
        js = np.arange(self.n_cols, self.n_cols + k, dtype=np.float64)
        self.costs.append(dyn)
        # demand row: produces tps tokens per instance-second
        self.rows_i.append(np.full(k, 2 * ri + kind, np.float64))
        self.cols_j.append(js)
        self.vals.append(-tps)
        # capacity row: gpus GPU-seconds per instance-second
        self.rows_i.append(np.full(k, 2 * self.R + gi, np.float64))
        self.cols_j.append(js)
        self.vals.append(np.full(k, float(p.gpus)))
        self.col_key.append(np.full(k, pi, np.float64))
        if self.G and ri < len(self.ratio) and self.ratio[ri] > 0:
            # prompts prefilled where they are decoded: prefill - ratio x decode = 0
            self.eq_i.append(np.full(k, ri * self.G + gi, np.float64))
            self.eq_j.append(js)
            self.eq_v.append(tps if kind == 1 else -self.ratio[ri] * tps)
        self.n_cols += k

    def coupling(self) -> Any:
        """The prefill-where-decoded equalities (rows class x group), or None."""
        from scipy import sparse

        if not self.eq_v:
            return None
        return sparse.csr_matrix(
            (np.concatenate(self.eq_v),
             (np.concatenate(self.eq_i).astype(int), np.concatenate(self.eq_j).astype(int))),
            shape=(self.R * self.G, self.n_cols))

    def ttft_rows(self, classes: Sequence[int],
                  limits_s: Sequence[float]) -> tuple[Any, FloatArray]:
        """(A, b) of one row per class in ``classes``: its prefill instance-seconds, all
        GPUs and clocks, at most its ``limits_s`` (requests x TTFT)."""
        from scipy import sparse

        kind = np.concatenate(self.col_kind)
        cls = np.concatenate(self.col_class)
        row_of = {c: i for i, c in enumerate(classes)}
        js = np.flatnonzero((kind == 1) & np.isin(cls, list(classes)))
        rows = np.array([row_of[int(cls[j])] for j in js], dtype=int)
        a = sparse.csr_matrix((np.ones(js.size), (rows, js)), shape=(len(classes), self.n_cols))
        return a, np.asarray(limits_s, np.float64)

    def matrix(self, n_groups: int) -> Any:
        from scipy import sparse

        rows = np.concatenate(self.rows_i).astype(int)
        cols = np.concatenate(self.cols_j).astype(int)
        return sparse.csr_matrix(
            (np.concatenate(self.vals), (rows, cols)), shape=(2 * self.R + n_groups, self.n_cols)
        )


def _usage(
    profiles: Sequence[ServingProfile], x: FloatArray, cols: _Columns, a: Any, total_gpu_s: float
) -> dict[str, float]:
    """Profile key -> share of the horizon's GPU-seconds the solution uses on it."""
    keys = np.concatenate(cols.col_key).astype(int)
    gpu_s = x * np.asarray(a[2 * cols.R:].sum(axis=0)).ravel()
    usage: dict[str, float] = {}
    for pi, p in enumerate(profiles):
        used = float(gpu_s[keys == pi].sum())
        if used > 0:
            usage[p.key] = used / total_gpu_s
    return usage


def energy_floor(
    demands: Sequence[FloorDemand],
    gpus: Sequence[FloorGPUs],
    profiles: Sequence[ServingProfile],
    horizon_s: float,
    idle_w: dict[str, float] | None = None,
) -> FloorResult:
    """Least energy (J) to do ``demands`` on ``gpus`` within ``horizon_s``.

    ``profiles`` are the serving modes allowed (one model); ``idle_w``
    overrides the per-GPU idle power by product (default: the profiles').
    """
    from scipy import sparse
    from scipy.optimize import linprog

    if horizon_s <= 0:
        raise ValueError("horizon must be positive")
    idle_j = _idle_energy(gpus, profiles, idle_w, horizon_s)
    out_total = float(sum(d.output_tokens for d in demands))
    groups = [g for g in gpus if g.count > 0]
    ratio = [d.input_tokens / d.decode_tokens if d.decode_tokens > 0 else 0.0
             for d in demands]
    cols = _Columns(len(demands), len(groups), ratio)
    relaxed: list[str] = []
    ttft_rows: list[int] = []
    for ri, d in enumerate(demands):
        enforce = True
        if (d.output_tokens > 0 or d.input_tokens > 0) and not _slo_feasible(
            d, groups, profiles
        ):
            enforce = False
            relaxed.append(d.name)
        elif d.input_tokens > 0:
            ttft_rows.append(ri)
        for gi, g in enumerate(groups):
            for pi, p in enumerate(profiles):
                if p.product.name != g.product:
                    continue
                cols.add(ri, 0, gi, pi, p, *decode_columns(p, d.tpot_s, enforce))
                # every clock: the TTFT is the demand's row below, not a column rule
                cols.add(ri, 1, gi, pi, p,
                         *prefill_columns(p, d.mean_input_tokens, d.ttft_s, False))
    need = np.array([[d.decode_tokens, d.input_tokens] for d in demands], np.float64).ravel()
    if cols.n_cols == 0:
        ok = not np.any(need > 0)
        status = "no work" if ok else "no operating point"
        return FloorResult(ok, status, idle_j if ok else math.nan, idle_j, 0.0, out_total,
                           horizon_s, tuple(relaxed))
    a = cols.matrix(len(groups))
    b = np.concatenate([-need, [g.count * horizon_s for g in groups]])
    ttft_a, ttft_b = cols.ttft_rows(ttft_rows, [demands[r].n_requests * demands[r].ttft_s
                                                for r in ttft_rows])
    c = np.concatenate(cols.costs)
    eq = cols.coupling()
    res = linprog(c, A_ub=sparse.vstack([a, ttft_a]).tocsr(), b_ub=np.concatenate([b, ttft_b]),
                  A_eq=eq, b_eq=None if eq is None else np.zeros(eq.shape[0]),
                  bounds=(0, None), method="highs")
    if res.status != 0 or res.x is None:
        if res.status == 2:
            status = "infeasible: the work does not fit the GPUs in the horizon"
        else:
            status = f"solver: {res.message}"
        return FloorResult(False, status, math.nan, idle_j, math.nan, out_total, horizon_s,
                           tuple(relaxed))
    x = np.asarray(res.x)
    usage = _usage(profiles, x, cols, a, sum(g.count for g in groups) * horizon_s)
    dyn_j = float(c @ x)
    kind = np.concatenate(cols.col_kind)
    dec = kind == 0
    tokens = x * -np.asarray(a[: 2 * cols.R].sum(axis=0)).ravel()
    batch = np.concatenate(cols.col_batch)
    dec_tokens = tokens[dec]
    mean_b = (float(dec_tokens @ batch[dec] / dec_tokens.sum()) if dec_tokens.sum() > 0
              else math.nan)
    used = _used_columns(demands, groups, profiles, cols, x, tokens, c)
    return FloorResult(True, "optimal", idle_j + dyn_j, idle_j, dyn_j, out_total, horizon_s,
                       tuple(relaxed), usage, decode_j=float(c[dec] @ x[dec]),
                       prefill_j=float(c[~dec] @ x[~dec]), decode_batch=mean_b, columns=used)


def _used_columns(demands: Sequence[FloorDemand], groups: Sequence[FloorGPUs],
                  profiles: Sequence[ServingProfile], cols: _Columns, x: FloatArray,
                  tokens: FloatArray, cost: FloatArray) -> tuple[FloorColumn, ...]:
    """The solution's columns with instance-seconds above a billionth of the largest."""
    meta = [np.concatenate(v) for v in (cols.col_class, cols.col_group, cols.col_key,
                                         cols.col_kind, cols.col_batch, cols.col_clock)]
    keep = np.flatnonzero(x > 1e-9 * max(float(x.max()), 1e-300))
    return tuple(
        FloorColumn(demand=demands[int(meta[0][j])].name, site=groups[int(meta[1][j])].site,
                    profile=profiles[int(meta[2][j])].key,
                    kind="prefill" if meta[3][j] else "decode", batch=float(meta[4][j]),
                    clock_mhz=float(meta[5][j]), instance_s=float(x[j]),
                    tokens=float(tokens[j]), dynamic_j=float(cost[j] * x[j]))
        for j in keep)
