"""FREESH pool planner: a MILP that places serving instances on nodes.

Every planning window FREESH decides, per request class r, how many instances
of each serving mode m (GPU product x tensor-parallel degree) run where, so
that forecast demand with headroom alpha is met at the least energy (or
carbon). joulepool takes the published site-level model down to nodes,
because a tensor-parallel instance must fit on one node:

    minimise   sum c[site(n), t] * x[n, r, m] * P[r, m] * dt      over n, r, m, t
    subject to sum_{n, m} x[n, r, m] * L[r, m] >= alpha * forecast[r, t]   all r, t
               sum_{r, m} x[n, r, m] * gpus(m)  <= free GPUs of node n      all n
               x[n, r, m] = 0 unless product(m) == product(n) and L[r, m] > 0

With ``share_group`` (classes of one group may share instances, docs/planner.md
"Shared instances") the model also has shared instances y[zone, g, m] carrying
req/s f[zone, r, m] of the group's classes, sum_r f / L[r, m] <= y, at idle[m]
each plus wake[r, m] J per request; a class's demand is then met by its own
instances and its flows together. Without it the model is FREESH's.

Why it stays fast at 10,000 GPUs: the model grows with the number of
distinct node shapes, not with the number of nodes.

* Sites whose carbon over the window is equal (every site, for energy) form
  one cost zone. Classes are planned per zone: y[zone, r, m] instances.
* Identical nodes of a zone (same product and free GPUs, k of them with G
  GPUs each) form a group that opens w[group, size] instance slots; each
  zone's instances of a (product, size) must fit the slots its groups open.
  Class decisions therefore carry no node-group symmetry.
* A group's slots are exact by volume, ``sum size * w <= k * G``, when its
  sizes form a divisibility chain dividing G (powers of two, the normal
  case): such items pack into k bins whenever their volume fits, and
  first-fit decreasing finds the packing. Otherwise the group uses per-node
  patterns (maximal multisets of sizes that fit one node), ``z[p]`` nodes
  running pattern p, which is exact for any sizes; should patterns explode,
  the group is split into single nodes, where volume is exact again. If a
  volume group ever fails to pack, it is re-planned node by node.

x is constant over the window, so the per-step demand rows reduce to one row
per class at its peak step: the same feasible set with T times fewer rows.
Per-step shortfalls are reported from the plan afterwards.

HiGHS stops once the plan is proven within ``mip_rel_gap`` of the optimum
(default DEFAULT_MIP_REL_GAP) or at ``time_limit_s``. A plan is reported
``"optimal"`` only when its proven gap is at most OPTIMAL_GAP; a plan that
stopped at a positive gap is ``"within_gap"`` and says its gap.

Carbon intensities may be negative (marginal intensities are, at times):
only each site's sum over the window enters the objective, and every
instance occupies GPUs, so the model stays bounded. A site whose window sum
is not positive is one where running an instance does not cost, so its
instances are bounded by its GPUs only, as in the published model.

Infeasibility is never an exception: a hard-demand model is solved first; if
HiGHS proves it infeasible, or runs out of time without any plan, the best
partial plan is found lexicographically (docs/planner.md): first a max-min
fair floor in req/s (the largest level u such that every class gets
min(its demand, u): classes below the level are served in full, no class is
starved for a smaller one), then, keeping every floor, the fewest unmet
requests per second, then the least energy or carbon. It is reported apart
from ``assignments`` with per-class shortfalls, the sites whose capacity
binds, and ``max_alpha``, the largest headroom alpha that fits.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from joulepool.core.classes import CLASS_NAMES, PLAN_ALPHA, PLAN_STEP_S
from joulepool.core.energy import J_PER_KWH
from joulepool.core.highs import quiet_stdout

__all__ = [
    "ASSUMED_FREESH_CARBON_G_PER_KWH",
    "ASSUMED_FREESH_FORECAST_RPS",
    "DEFAULT_MIP_REL_GAP",
    "DEFAULT_TIME_LIMIT_S",
    "FREESH_CAPACITY_RPS",
    "FREESH_MODES",
    "FREESH_NODES",
    "FREESH_POWER_W",
    "J_PER_KWH",
    "NO_ELIGIBLE_MODE",
    "OPTIMAL_GAP",
    "Assignment",
    "Mode",
    "PlanNode",
    "PlanProblem",
    "PlanResult",
    "Shortfall",
    "freesh_published_problem",
    "slo_mask",
    "solve",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
Objective = Literal["energy", "carbon"]

#: default relative MIP gap (EnergyPolicy ``mipRelGap``), see docs/planner.md: at
#: FREESH's size (30 GPUs) every published window ends at the exact optimum
#: (tests/unit/test_planner_freesh.py); at 10,000 GPUs the energy objective closes
#: it in 1-2 s, while the carbon objective stops at DEFAULT_TIME_LIMIT_S
#: with its gap reported (HiGHS's own 1 % default labelled plans 0.4 % off the
#: optimum "optimal"). Pass 0 for a proven optimum.
DEFAULT_MIP_REL_GAP = 1e-4
#: default solve time bound, s: what bounds a 10,000-GPU carbon window, inside the
#: 30-s target of ``joulepool bench planner`` with the model build and decomposition
DEFAULT_TIME_LIMIT_S = 20.0
#: a plan whose proven gap is at most this is reported "optimal" (HiGHS's own
#: feasibility tolerances are ~1e-7 relative); above it, "within_gap"
OPTIMAL_GAP = 1e-6
#: demand counts as met when short by at most this fraction (HiGHS tolerances are ~1e-7)
DEMAND_TOL_REL = 1e-6
#: slack penalty per unmet req/s (any class), as a multiple of the dearest cost per
#: req/s of any instance, so a partial plan serves all it can before it saves energy
#: or carbon (second stage of the lexicographic partial plan)
SLACK_WEIGHT = 1e4
#: the partial plan keeps every class's served req/s within this share of its
#: max-min fair floor (HiGHS's feasibility tolerances are ~1e-7)
FAIR_SHARE_TOL = 1e-7
#: a shared instance serves a class when its flow there is above this share of the
#: class's demand (at least 1 req/s): HiGHS leaves ~1e-9 where a flow is zero
SHARE_TOL_REL = 1e-6
#: above this many per-node patterns a group is split into single nodes
MAX_PATTERNS = 256
#: the partial-plan solve always gets at least this long (or the whole limit if shorter)
MIN_SECOND_SOLVE_S = 1.0
#: shares of what is left of the time limit, cumulative, by which the partial plan's
#: max-min floor and its fewest-unmet-demand plan are due (the largest alpha that fits
#: gets the rest): the plan itself matters most, the alpha diagnosis least
PARTIAL_SHARES = (0.35, 0.85)

NO_ELIGIBLE_MODE = "no eligible mode within SLO"


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Mode:
    """A serving mode: ``gpus`` GPUs of one product, tensor-parallel on one node."""

    name: str
    product: str
    gpus: int

    def __post_init__(self) -> None:
        if not self.name or not self.product:
            raise ValueError(f"Mode needs a name and a product, got {self!r}")
        _check_int(f"Mode {self.name!r} gpus", self.gpus, minimum=1)


@dataclass(frozen=True)
class PlanNode:
    """A node as the planner sees it: ``gpus`` is the number of GPUs free for pools."""

    name: str
    site: str
    product: str
    gpus: int

    def __post_init__(self) -> None:
        if not self.name or not self.site or not self.product:
            raise ValueError(f"PlanNode needs a name, site and product, got {self!r}")
        _check_int(f"PlanNode {self.name!r} gpus", self.gpus, minimum=0)


@dataclass(frozen=True, eq=False)
class PlanProblem:
    """One planning window. Arrays are validated and frozen on construction.

    A mode m may serve class r only when ``capacity_rps[r, m] > 0`` and, if
    ``eligible`` is given, ``eligible[r, m]``: the SLO eligibility mask
    (:func:`slo_mask`), False where the mode cannot meet the class's TTFT or
    TPOT SLO. ``carbon_g_per_kwh`` may hold negative (marginal) intensities.

    Malformed input (shapes, negative or non-finite numbers, missing carbon
    series) raises ValueError here: that is a caller bug, not infeasibility.
    ``eq=False`` because numpy arrays have no truth value for ``==``.
    """

    classes: tuple[str, ...]
    modes: tuple[Mode, ...]
    nodes: tuple[PlanNode, ...]
    power_w: FloatArray  # [R, M] W drawn by one instance of m serving r
    capacity_rps: FloatArray  # [R, M] sustainable req/s of one instance; 0 = ineligible
    forecast_rps: FloatArray  # [R, T]
    step_s: float = PLAN_STEP_S
    alpha: float = PLAN_ALPHA
    objective: Objective = "energy"
    carbon_g_per_kwh: Mapping[str, Sequence[float]] | None = None
    time_limit_s: float = DEFAULT_TIME_LIMIT_S
    mip_rel_gap: float = DEFAULT_MIP_REL_GAP
    eligible: BoolArray | None = None  # [R, M] SLO mask; None: every mode with L > 0
    #: per class, its share group: classes of one group may share instances (one model
    #: served under the same names); None: each class has instances of its own
    #: (FREESH's published formulation)
    share_group: tuple[str, ...] | None = None
    #: [M] W one instance of m draws serving nothing (needed with ``share_group``)
    idle_power_w: FloatArray | None = None
    #: [R, M] J above idle one request of r adds on an otherwise idle instance of m (its
    #: prefill, its decode at batch one: core.routing's wake cost), what a shared
    #: instance's flow costs per request (needed with ``share_group``)
    wake_j_per_request: FloatArray | None = None
    #: [R, R, M] req/s of class r' alone on one shared instance of m at which class r's
    #: prompts, waiting behind r''s in the prefill queue, keep their TTFT miss budget
    #: (inf: no bound; core.problem.shared_ttft). Where it is below L[r', m] for a class
    #: r' of r's share group that m may serve, r does not use the group's shared
    #: instances of m (the router fills them with r' as it fills r''s own); None: no
    #: such rule
    shared_ttft_rps: FloatArray | None = None

    def __post_init__(self) -> None:
        classes = tuple(self.classes)
        modes = tuple(self.modes)
        nodes = tuple(self.nodes)
        _check_unique("classes", classes)
        _check_unique("mode names", [m.name for m in modes])
        _check_unique("node names", [n.name for n in nodes])
        for m in modes:
            if not isinstance(m, Mode):
                raise ValueError(f"modes must be Mode instances, got {m!r}")
        for n in nodes:
            if not isinstance(n, PlanNode):
                raise ValueError(f"nodes must be PlanNode instances, got {n!r}")
        forecast = _matrix("forecast_rps", self.forecast_rps, classes, None)
        if classes and forecast.shape[1] == 0:
            raise ValueError("forecast_rps needs at least one step per class")
        power = _matrix("power_w", self.power_w, classes, len(modes))
        capacity = _matrix("capacity_rps", self.capacity_rps, classes, len(modes))
        for name in ("step_s", "alpha", "time_limit_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        gap = self.mip_rel_gap
        if not isinstance(gap, int | float) or not math.isfinite(gap) or not 0 <= gap < 1:
            raise ValueError(f"mip_rel_gap must be in [0, 1), got {gap!r}")
        if self.objective not in ("energy", "carbon"):
            raise ValueError(f"objective must be 'energy' or 'carbon', got {self.objective!r}")
        carbon = _carbon(self.carbon_g_per_kwh, forecast.shape[1])
        if self.objective == "carbon":
            if carbon is None:
                raise ValueError("objective 'carbon' needs carbon_g_per_kwh (site -> series)")
            missing = sorted({n.site for n in nodes} - set(carbon))
            if missing:
                raise ValueError(f"carbon_g_per_kwh has no series for site(s) {missing}")
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "modes", modes)
        object.__setattr__(self, "nodes", nodes)
        object.__setattr__(self, "forecast_rps", forecast)
        object.__setattr__(self, "power_w", power)
        object.__setattr__(self, "capacity_rps", capacity)
        object.__setattr__(self, "carbon_g_per_kwh", carbon)
        object.__setattr__(self, "eligible", _mask(self.eligible, len(classes), len(modes)))
        self._check_sharing(classes, modes)

    def _check_sharing(self, classes: tuple[str, ...], modes: tuple[Mode, ...]) -> None:
        """Validate and freeze ``share_group``, ``idle_power_w`` and ``shared_ttft_rps``."""
        idle = self.idle_power_w
        if idle is not None:
            arr = np.array(idle, dtype=np.float64)
            if arr.shape != (len(modes),) or not np.all(np.isfinite(arr)) or (arr < 0).any():
                raise ValueError(f"idle_power_w must be {len(modes)} finite values >= 0 "
                                 f"(one per mode), got {idle!r}")
            arr.setflags(write=False)
            object.__setattr__(self, "idle_power_w", arr)
        if self.share_group is None:
            return
        groups = tuple(self.share_group)
        if len(groups) != len(classes) or not all(isinstance(g, str) for g in groups):
            raise ValueError(f"share_group needs one group name per class {list(classes)}, "
                             f"got {self.share_group!r}")
        if idle is None or self.wake_j_per_request is None:
            raise ValueError("share_group needs idle_power_w and wake_j_per_request: a shared "
                             "instance costs its idle power plus what its requests add")
        object.__setattr__(self, "share_group", groups)
        object.__setattr__(self, "wake_j_per_request", _matrix(
            "wake_j_per_request", self.wake_j_per_request, classes, len(modes)))
        if self.shared_ttft_rps is not None:
            ttft = np.array(self.shared_ttft_rps, dtype=np.float64)
            shape = (len(classes), len(classes), len(modes))
            if ttft.shape != shape or np.isnan(ttft).any() or (ttft <= 0).any():
                raise ValueError(f"shared_ttft_rps must be {shape} values > 0 (inf: no bound)")
            ttft.setflags(write=False)
            object.__setattr__(self, "shared_ttft_rps", ttft)

    @property
    def steps(self) -> int:
        return int(self.forecast_rps.shape[1])

    def ttft_breaks(self, tol_rel: float = 1e-9) -> BoolArray:
        """[R, R', M] True where class r' at its own rate L[r', m] on a shared instance of
        mode m would break class r's TTFT there (:attr:`shared_ttft_rps` below L[r', m]
        by more than ``tol_rel``); all False without the rule."""
        ttft = self.shared_ttft_rps
        if ttft is None:
            R = len(self.classes)
            return np.zeros((R, R, len(self.modes)), dtype=np.bool_)
        return np.asarray(ttft < self.capacity_rps[None, :, :] * (1.0 - tol_rel),
                          dtype=np.bool_)

    @property
    def servable(self) -> BoolArray:
        """[R, M] True where mode m may serve class r: L > 0 and within the SLO mask."""
        ok = self.capacity_rps > 0
        if self.eligible is not None:
            ok = ok & self.eligible
        return np.asarray(ok, dtype=np.bool_)

    @property
    def demand_rps(self) -> FloatArray:
        """[R, T] req/s the plan must serve: alpha * forecast."""
        return np.asarray(self.alpha * self.forecast_rps, dtype=np.float64)

    def site_factor(self, site: str) -> float:
        """Objective units per W of constant power over the window, per second of step.

        Energy: T (so W * step_s * T = J). Carbon: sum_t c[site, t] / 3.6e6, so
        W * step_s * factor = gCO2.
        """
        if self.objective == "energy":
            return float(self.steps)
        assert self.carbon_g_per_kwh is not None  # checked in __post_init__
        series = self.carbon_g_per_kwh[site]
        total = series[0] * self.steps if len(series) == 1 else sum(series)
        return float(total) / J_PER_KWH


def _check_int(what: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")


def _check_unique(what: str, names: Sequence[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"duplicate entry {name!r} in {what}")
        seen.add(name)


def _matrix(name: str, value: Any, labels: tuple[str, ...], cols: int | None) -> FloatArray:
    """A read-only float [len(labels), cols] copy of ``value``, or a clear ValueError."""
    rows = len(labels)
    want = f"({rows}, {'T' if cols is None else cols})"
    if not isinstance(value, np.ndarray) and isinstance(value, Sequence):
        lengths = [len(row) if isinstance(row, Sequence | np.ndarray) else -1 for row in value]
        if len(lengths) == rows and len(set(lengths)) > 1:
            first = lengths[0]
            bad = next(i for i, n in enumerate(lengths) if n != first)
            raise ValueError(
                f"{name}: class {labels[bad]!r} has {lengths[bad]} entries but class "
                f"{labels[0]!r} has {first}; every class needs the same number"
            )
    try:
        arr = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric array of shape {want}: {exc}") from exc
    if rows == 0 and arr.size == 0:
        arr = np.zeros((0, cols if cols is not None else (arr.shape[-1] if arr.ndim == 2 else 0)))
    if arr.ndim != 2 or arr.shape[0] != rows or (cols is not None and arr.shape[1] != cols):
        raise ValueError(
            f"{name} must have shape {want} (one row per class {list(labels)}), got {arr.shape}"
        )
    bad_cells = ~np.isfinite(arr) | (arr < 0)
    if bad_cells.any():
        r, c = (int(i[0]) for i in np.nonzero(bad_cells))
        raise ValueError(
            f"{name}[{labels[r]!r}, {c}] = {arr[r, c]!r}: values must be finite and >= 0"
        )
    arr.setflags(write=False)
    return arr


def _mask(value: Any, rows: int, cols: int) -> BoolArray | None:
    """A read-only bool [rows, cols] copy of the SLO mask, or a clear ValueError."""
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.shape != (rows, cols) or arr.dtype.kind not in "bi":
        raise ValueError(
            f"eligible must be a boolean array of shape ({rows}, {cols}), got "
            f"{arr.dtype} {arr.shape}"
        )
    out = np.array(arr, dtype=np.bool_)
    out.setflags(write=False)
    return out


def slo_mask(
    ttft_s: npt.ArrayLike,
    tpot_s: npt.ArrayLike,
    ttft_slo_s: npt.ArrayLike,
    tpot_slo_s: npt.ArrayLike,
) -> BoolArray:
    """[R, M] SLO eligibility: mode m meets class r's TTFT and TPOT SLOs at its operating point.

    ``ttft_s`` and ``tpot_s`` are [R, M] (seconds, of one instance of m serving r);
    the SLOs are [R] (seconds). NaN latencies (unknown) are not eligible.
    """
    ttft = np.asarray(ttft_s, dtype=np.float64)
    tpot = np.asarray(tpot_s, dtype=np.float64)
    t_slo = np.asarray(ttft_slo_s, dtype=np.float64)[:, None]
    p_slo = np.asarray(tpot_slo_s, dtype=np.float64)[:, None]
    with np.errstate(invalid="ignore"):
        return np.asarray((ttft <= t_slo) & (tpot <= p_slo), dtype=np.bool_)


def _carbon(
    value: Mapping[str, Sequence[float]] | None, steps: int
) -> dict[str, tuple[float, ...]] | None:
    if value is None:
        return None
    out: dict[str, tuple[float, ...]] = {}
    for site, series in value.items():
        try:
            arr = np.atleast_1d(np.asarray(series, dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"carbon_g_per_kwh[{site!r}] must be numbers: {exc}") from exc
        if arr.ndim != 1 or arr.size == 0 or (steps and arr.size not in (1, steps)):
            raise ValueError(
                f"carbon_g_per_kwh[{site!r}] has {arr.size} values; "
                f"need 1 or {steps} (one per step)"
            )
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"carbon_g_per_kwh[{site!r}] must be finite")
        out[str(site)] = tuple(float(v) for v in arr)
    return out


# -------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class Assignment:
    """``instances`` instances of ``mode`` serving ``cls`` on ``node``.

    ``power_w`` and ``served_rps`` are the totals of those instances, so
    callers (operator status, router weights) need not look the profile up again.
    """

    node: str
    site: str
    product: str
    cls: str
    mode: str
    instances: int
    gpus: int  # instances * mode.gpus
    power_w: float = 0.0
    served_rps: float = 0.0
    #: shared instances (PlanProblem.share_group): every class they serve, ``cls`` (the
    #: one with the most load on them) first, and the req/s of each; empty: ``cls`` only
    serves: tuple[str, ...] = ()
    class_rps: tuple[float, ...] = ()

    def rps_of(self, cls: str) -> float:
        """req/s of ``cls`` these instances serve."""
        if self.serves:
            return self.class_rps[self.serves.index(cls)] if cls in self.serves else 0.0
        return self.served_rps if cls == self.cls else 0.0


@dataclass(frozen=True)
class Shortfall:
    """An unmet class at its worst step: demand = alpha * forecast, in req/s.

    ``sites``: the sites whose GPUs of a product this class could use are all
    taken (empty when the class has no eligible mode or no node can host one).
    """

    cls: str
    step: int
    demand_rps: float
    servable_rps: float
    shortfall_rps: float
    reason: str
    sites: tuple[str, ...] = ()


@dataclass(frozen=True)
class PlanResult:
    """The planner's answer.

    ``assignments`` is empty unless ``feasible``: a partial plan is never
    handed out as if it were one. When infeasible, the best partial plan
    (a max-min fair floor of req/s for every class, then the fewest unmet
    req/s, then the cheapest) is in ``partial_assignments`` so callers can
    choose between it and their last feasible plan. ``objective``,
    ``capacity`` and the methods describe :attr:`plan`, i.e. the assignments
    when feasible and the partial plan otherwise.

    ``status``: "optimal" (proven gap <= OPTIMAL_GAP), "within_gap" (stopped at
    the problem's ``mip_rel_gap``; ``mip_gap`` says how close), "time_limit"
    (stopped by ``time_limit_s``) or "infeasible". ``max_alpha``, for an
    infeasible window whose partial plan was solved: the largest demand
    headroom alpha (demand = alpha x forecast) the cluster can carry, so a
    value >= 1 means the headroom, not the forecast, is what does not fit;
    0 when some class has no mode that can serve it.
    """

    feasible: bool
    status: str  # "optimal" | "within_gap" | "time_limit" | "infeasible"
    objective: float  # J (energy) or gCO2 (carbon) over the window
    assignments: tuple[Assignment, ...]
    shortfalls: tuple[Shortfall, ...]
    binding: tuple[str, ...]
    capacity: Mapping[tuple[str, str], tuple[int, int]]  # (site, product) -> (used, total)
    solve_time_s: float
    mip_gap: float
    partial_assignments: tuple[Assignment, ...] = ()
    unit: str = "J"
    max_alpha: float | None = None

    @property
    def plan(self) -> tuple[Assignment, ...]:
        return self.assignments if self.feasible else self.partial_assignments

    def instances(self, cls: str) -> int:
        """Instances whose (first) class is ``cls``: each instance counts once."""
        return sum(a.instances for a in self.plan if a.cls == cls)

    def served_rps(self, cls: str) -> float:
        """req/s of ``cls`` the plan's instances serve (shared ones included)."""
        return float(sum(a.rps_of(cls) for a in self.plan))

    def power_w(self, cls: str | None = None) -> float:
        """Planned power of every instance, or of one class's instances."""
        return float(sum(a.power_w for a in self.plan if cls is None or a.cls == cls))


# ------------------------------------------------------------------------- the model

_Key = tuple[int, str, int]  # (cost zone, product, free GPUs per node)


@dataclass
class _Group:
    """k identical nodes (same cost zone, product and free GPUs) planned as one."""

    zone: int
    product: str
    gpus: int
    nodes: list[int]  # indices into problem.nodes
    sizes: tuple[int, ...] = ()  # distinct active mode sizes, descending
    patterns: IntArray | None = None  # [P, len(sizes)] slot counts, when not volume-exact

    @property
    def key(self) -> _Key:
        return (self.zone, self.product, self.gpus)


def _volume_exact(gpus: int, count: int, sizes: tuple[int, ...]) -> bool:
    """True when ``sum size * w <= count * gpus`` alone guarantees a packing.

    One node: trivially. Several: when sizes (descending) form a divisibility
    chain that divides the node size, first-fit decreasing never strands space.
    """
    if count == 1 or not sizes:
        return True
    if gpus % sizes[0]:
        return False
    return all(big % small == 0 for big, small in itertools.pairwise(sizes))


def _maximal_patterns(
    gpus: int, sizes: tuple[int, ...], limit: int
) -> list[tuple[int, ...]] | None:
    """All maximal multisets of ``sizes`` that fit ``gpus``; None above ``limit``."""
    out: list[tuple[int, ...]] = []
    smallest = sizes[-1]
    counts: list[int] = []
    calls = 0

    def rec(i: int, free: int) -> bool:
        nonlocal calls
        calls += 1
        if calls > 100 * limit or len(out) > limit:
            return False
        if i == len(sizes):
            if free < smallest:
                out.append(tuple(counts))
            return True
        for n in range(free // sizes[i], -1, -1):
            counts.append(n)
            ok = rec(i + 1, free - n * sizes[i])
            counts.pop()
            if not ok:
                return False
        return True

    return out if rec(0, gpus) and len(out) <= limit else None


@dataclass
class _Solve:
    x: FloatArray | None
    status: int
    gap: float
    message: str


def _node_groups(
    problem: PlanProblem,
    factors: list[float],
    mode_active: npt.NDArray[np.bool_],
    split: frozenset[_Key],
) -> list[_Group]:
    """Groups of identical nodes per cost zone (``factors[zone]``), with the slot sizes
    of the active modes that fit them; a group whose patterns explode, or that is in
    ``split``, becomes one group per node."""
    zone_of_factor = {f: i for i, f in enumerate(factors)}
    by_key: dict[_Key, list[int]] = {}
    for i, node in enumerate(problem.nodes):
        if node.gpus > 0:
            zone = zone_of_factor[problem.site_factor(node.site)]
            by_key.setdefault((zone, node.product, node.gpus), []).append(i)
    groups: list[_Group] = []
    for key, members in by_key.items():
        zone, product, gpus = key
        sizes = tuple(
            sorted(
                {
                    m.gpus
                    for j, m in enumerate(problem.modes)
                    if mode_active[j] and m.product == product and m.gpus <= gpus
                },
                reverse=True,
            )
        )
        if not sizes:
            continue
        patterns = None
        if key not in split and not _volume_exact(gpus, len(members), sizes):
            found = _maximal_patterns(gpus, sizes, MAX_PATTERNS)
            if found is None:
                split = split | {key}
            else:
                patterns = np.array(found, dtype=np.int64)
        if key in split and len(members) > 1:
            groups.extend(_Group(zone, product, gpus, [i], sizes) for i in members)
        else:
            groups.append(_Group(zone, product, gpus, members, sizes, patterns))
    return groups


class _Rows:
    """A sparse constraint matrix built block by block, with each row's bounds."""

    def __init__(self) -> None:
        self.rows: list[IntArray] = []
        self.cols: list[IntArray] = []
        self.vals: list[FloatArray] = []
        self.lo: list[FloatArray] = []
        self.hi: list[FloatArray] = []

    def block(self, r: IntArray, c: IntArray, v: npt.ArrayLike) -> None:
        """Coefficients ``v`` (one, or one per entry) at rows ``r``, columns ``c``."""
        self.rows.append(np.asarray(r, dtype=np.int64))
        self.cols.append(np.asarray(c, dtype=np.int64))
        self.vals.append(np.broadcast_to(np.asarray(v, dtype=np.float64), np.shape(r)))

    def bounds(self, low: npt.ArrayLike, high: npt.ArrayLike, n: int) -> None:
        """Bounds of the next ``n`` rows (one value for all, or one each)."""
        self.lo.append(np.broadcast_to(np.asarray(low, dtype=np.float64), (n,)))
        self.hi.append(np.broadcast_to(np.asarray(high, dtype=np.float64), (n,)))

    def matrix(self, nrow: int, n_var: int) -> tuple[sparse.csr_array, FloatArray, FloatArray]:
        """The (nrow x n_var) matrix and its rows' lower and upper bounds."""
        a = sparse.csr_array(
            (np.concatenate(self.vals), (np.concatenate(self.rows), np.concatenate(self.cols))),
            shape=(nrow, n_var),
        )
        return a, np.concatenate(self.lo), np.concatenate(self.hi)


class _Model:
    """Variables and constraints of one planning MILP (vectorised build).

    Sites whose carbon over the window is equal (all sites, for energy) form
    one cost zone: their nodes are interchangeable, so classes are planned per
    zone and only mode slots are planned per node group. That keeps the class
    decisions free of node-group symmetry, which is what makes HiGHS fast.

    Variables, in order:
      y[zone, o, m]  instances of m in the zone owned by o (the cost): o is a class, or
                     with ``share_group`` a share group whose classes share them
      w[group, s]    instance slots of size s opened in a node group
      z[group, p]    nodes of a pattern group that run pattern p
      f[zone, r, m]  req/s of class r on the zone's shared instances of m (share_group only)
      s[r]           unmet req/s of r (partial-plan model only)
      t              the level a plan maximises (fair floor and max alpha only)

    Without ``share_group`` (FREESH's formulation) an instance serves one class and
    costs P[r, m] whatever its load. With it, the instances of a share group's
    y[zone, g, m] carry flows f of the group's classes that may use m, within their
    capacity, ``sum_r f[zone, r, m] / L[r, m] <= y[zone, g, m]``, and cost
    ``idle[m]`` W each plus ``wake[r, m]`` J per request of r (W per req/s:
    ``PlanProblem.wake_j_per_request``, what a request adds on a lightly loaded
    instance), so a shared instance filled to L[r, m] costs at least about FREESH's
    P[r, m] and only what classes leave over shares (docs/planner.md, "Shared
    instances", also why not the operating point's ``(P - idle) / L``).
    """

    def __init__(self, problem: PlanProblem, split: frozenset[_Key]) -> None:
        self.p = problem
        R = len(problem.classes)
        self.demand = problem.demand_rps.max(axis=1) if R else np.zeros(0)  # peak, [R]
        self.mode_gpus = np.array([m.gpus for m in problem.modes], dtype=np.int64)
        active = problem.servable & (self.demand[:, None] > 0)  # [R, M]
        mode_active: npt.NDArray[np.bool_] = np.asarray(active.any(axis=0))
        factors = sorted({problem.site_factor(n.site) for n in problem.nodes})
        self.zone_factor = np.array(factors, dtype=np.float64)
        self.groups = _node_groups(problem, factors, mode_active, split)
        self.node_zone = np.full(len(problem.nodes), -1, dtype=np.int64)
        for grp in self.groups:
            self.node_zone[grp.nodes] = grp.zone
        room = self._add_slots()
        self.shared = problem.share_group is not None
        names = list(dict.fromkeys(problem.share_group or problem.classes))
        #: owner of each class's instances: the class itself, or its share group
        self.owner = np.array([names.index(g) for g in (problem.share_group or
                                                        problem.classes)], dtype=np.int64)
        self._add_instances(active, room)
        self._add_flows(active)
        # --- z[group, p]
        self.z_group: list[int] = []
        for gi, grp in enumerate(self.groups):
            if grp.patterns is not None:
                self.z_group.extend([gi] * len(grp.patterns))
        self.n_z = len(self.z_group)

    def _add_slots(self) -> FloatArray:
        """Variables w[group, size] (slots) and one link row per (zone, product, size).

        Returns, per link, the most slots its groups could open.
        """
        link_of: dict[tuple[int, str, int], int] = {}
        w_group: list[int] = []
        w_size: list[int] = []
        w_link: list[int] = []
        w_ub: list[int] = []
        for gi, grp in enumerate(self.groups):
            for size in grp.sizes:
                link = link_of.setdefault((grp.zone, grp.product, size), len(link_of))
                w_group.append(gi)
                w_size.append(size)
                w_link.append(link)
                w_ub.append(len(grp.nodes) * (grp.gpus // size))
        self.n_link = len(link_of)
        self.link_of = link_of
        self.w_group = np.array(w_group, dtype=np.int64)
        self.w_size = np.array(w_size, dtype=np.int64)
        self.w_link = np.array(w_link, dtype=np.int64)
        self.w_ub = np.array(w_ub, dtype=np.float64)
        self.n_w = len(w_group)
        room = np.zeros(max(self.n_link, 1))  # slots a link could open at most
        np.add.at(room, self.w_link, self.w_ub)
        return room

    def _add_instances(self, active: npt.NDArray[np.bool_], room: FloatArray) -> None:
        """Variables y[zone, o, m] with their cost and upper bounds: instances of one
        class (o = r < R), then, with share_group, shared ones (o = R + group)."""
        problem = self.p
        L = problem.capacity_rps
        R, n_zones, M = len(problem.classes), len(self.zone_factor), len(problem.modes)
        zm_link = np.full((n_zones, M), -1, dtype=np.int64)
        for (zone, product, size), link in self.link_of.items():
            for j, m in enumerate(problem.modes):
                if m.product == product and m.gpus == size:
                    zm_link[zone, j] = link
        self.zm_link = zm_link
        with np.errstate(divide="ignore", invalid="ignore"):
            fill = np.where(active, self.demand[:, None] / L, 0.0)  # instances each class fills
        owned = active
        if self.shared:  # a group's shared instances may carry any of its classes' modes
            groups = np.zeros((int(self.owner.max(initial=-1)) + 1, M), dtype=bool)
            np.logical_or.at(groups, self.owner, active)
            per_group = np.zeros(groups.shape)
            np.add.at(per_group, self.owner, fill)
            owned = np.concatenate([active, groups])
            fill = np.concatenate([fill, per_group])
        cube = (zm_link >= 0)[:, None, :] & owned[None, :, :]
        self.vz, self.vr, self.vm = (a.astype(np.int64) for a in np.nonzero(cube))
        vz, vr, vm = self.vz, self.vr, self.vm
        self.y_shared = vr >= R
        self.y_link = zm_link[vz, vm]
        self.n_y = len(vz)
        power = problem.power_w[np.minimum(vr, R - 1), vm] if self.n_y else np.zeros(0)
        if self.shared:
            assert problem.idle_power_w is not None  # PlanProblem checks it
            power = np.where(self.y_shared, problem.idle_power_w[vm], power)
        self.cost_y = power * problem.step_s * self.zone_factor[vz]
        # where an instance costs (window carbon sum > 0, or energy) no plan needs more
        # than its owner's demand; elsewhere only the GPUs bound it
        by_demand = np.ceil(fill[vr, vm])
        room_y = room[self.y_link] if self.n_y else np.zeros(0)
        self.ub_y = np.where(self.zone_factor[vz] > 0, np.minimum(room_y, by_demand), room_y)
        self.coverable = np.zeros(R, dtype=bool)
        self.coverable[vr[~self.y_shared]] = True

    def _add_flows(self, active: npt.NDArray[np.bool_]) -> None:
        """Variables f[zone, r, m] of shared instances (none without share_group), each
        req/s costing what a request adds on a lightly loaded instance."""
        problem = self.p
        self.f_y = np.zeros(0, dtype=np.int64)
        self.fz = self.fr = self.fm = self.f_y
        self.cost_f = self.ub_f = self.f_inv_cap = np.zeros(0)
        if not self.shared or not self.y_shared.any():
            return
        R = len(problem.classes)
        y_of = np.full((len(self.zone_factor), R + int(self.owner.max()) + 1,
                        len(problem.modes)), -1, dtype=np.int64)
        y_of[self.vz, self.vr, self.vm] = np.arange(self.n_y)
        usable = active & ~self._exposed()
        cube = (self.zm_link >= 0)[:, None, :] & usable[None, :, :]
        self.fz, self.fr, self.fm = (a.astype(np.int64) for a in np.nonzero(cube))
        self.f_y = y_of[self.fz, R + self.owner[self.fr], self.fm]
        assert problem.wake_j_per_request is not None  # PlanProblem checks it
        self.f_inv_cap = 1.0 / problem.capacity_rps[self.fr, self.fm]
        self.cost_f = (problem.wake_j_per_request[self.fr, self.fm] * problem.step_s
                       * self.zone_factor[self.fz])
        self.ub_f = self.demand[self.fr].astype(np.float64)
        self.coverable[self.fr] = True

    def _exposed(self) -> npt.NDArray[np.bool_]:
        """[R, M] classes that may not use their group's shared instances of a mode: a
        class r' of the group that the mode may serve would break r's TTFT at its own
        rate L[r', m] there (:attr:`PlanProblem.shared_ttft_rps` below it). The router
        fills a shared instance with each class as it fills one of its own, not with
        the plan's flows, so no flow split can keep r's TTFT next to r'."""
        problem = self.p
        if problem.shared_ttft_rps is None:
            return np.zeros((len(problem.classes), len(problem.modes)), dtype=bool)
        ok = problem.servable
        same = self.owner[:, None] == self.owner[None, :]  # [r, r']
        np.fill_diagonal(same, False)
        guest = same[:, :, None] & ok[None, :, :]  # [r, r', m]: r' shares m with r
        return np.asarray((guest & problem.ttft_breaks()).any(axis=1) & ok, dtype=np.bool_)

    @property
    def n_f(self) -> int:
        return len(self.fz)

    @property
    def n_x(self) -> int:
        """Variables of the plan itself (y, w, z, then f): extras come after them."""
        return self.n_int + self.n_f

    @property
    def n_int(self) -> int:
        return self.n_y + self.n_w + self.n_z

    # ------------------------------------------------------------------ build

    def _constraints(
        self, slack: bool, need: FloatArray, per_t: FloatArray | None
    ) -> tuple[sparse.csr_array, FloatArray, FloatArray]:
        """Rows over y, w, z, f (then s[dem] with ``slack``, then t when ``per_t`` is given).

        Demand row of each class with demand: served + s - per_t * t >= need.
        """
        vr, vm = self.vr, self.vm
        rows = _Rows()
        block, bounds = rows.block, rows.bounds
        y0, w0 = 0, self.n_y

        # demand: one row per class at its peak step (x is constant over the window)
        dem = np.flatnonzero(self.demand > 0)
        row_of_class = np.full(len(self.demand), -1, dtype=np.int64)
        row_of_class[dem] = np.arange(len(dem))
        y_idx = np.arange(self.n_y, dtype=np.int64)
        f_idx = self.n_int + np.arange(self.n_f, dtype=np.int64)
        own = y_idx[~self.y_shared]
        block(row_of_class[vr[own]], y0 + own, self.p.capacity_rps[vr[own], vm[own]])
        block(row_of_class[self.fr], f_idx, 1.0)
        n_slack = len(dem) if slack else 0
        if slack:
            block(np.arange(len(dem)), self.n_x + np.arange(len(dem)), 1.0)
        if per_t is not None:
            block(np.arange(len(dem)), np.full(len(dem), self.n_x + n_slack), -per_t)
        bounds(need, np.inf, len(dem))
        nrow = len(dem)

        # shared instances' capacity: sum_r f[zone, r, m] / L[r, m] <= y[zone, R + g, m]
        shared = y_idx[self.y_shared]
        row_of_y = np.full(self.n_y, -1, dtype=np.int64)
        row_of_y[shared] = nrow + np.arange(len(shared))
        block(row_of_y[self.f_y], f_idx, self.f_inv_cap)
        block(row_of_y[shared], y0 + shared, -1.0)
        bounds(-np.inf, 0.0, len(shared))
        nrow += len(shared)

        # link: instances of a (zone, product, size) <= slots opened in its groups
        w_idx = np.arange(self.n_w, dtype=np.int64)
        block(nrow + self.y_link, y0 + y_idx, 1.0)
        block(nrow + self.w_link, w0 + w_idx, -1.0)
        bounds(-np.inf, 0.0, self.n_link)
        nrow += self.n_link

        # volume rows (volume-exact groups): sum size * w <= k * G
        vol = np.array([g.patterns is None for g in self.groups], dtype=bool)
        vol_groups = np.flatnonzero(vol)
        row_of_group = np.full(len(self.groups), -1, dtype=np.int64)
        row_of_group[vol_groups] = nrow + np.arange(len(vol_groups))
        on_vol = vol[self.w_group] if self.n_w else np.zeros(0, dtype=bool)
        block(row_of_group[self.w_group[on_vol]], w0 + w_idx[on_vol], self.w_size[on_vol])
        caps = [len(self.groups[g].nodes) * self.groups[g].gpus for g in vol_groups]
        bounds(-np.inf, caps, len(vol_groups))
        nrow += len(vol_groups)

        nrow = self._pattern_rows(rows, nrow)
        return rows.matrix(nrow, self.n_x + n_slack + (1 if per_t is not None else 0))

    def _pattern_rows(self, rows: _Rows, nrow: int) -> int:
        """Rows of the pattern groups from row ``nrow`` on: slots of each size <= those
        the patterns provide; patterns <= nodes. The next free row."""
        w0, z0 = self.n_y, self.n_y + self.n_w
        zi = 0
        for gi, grp in enumerate(self.groups):
            if grp.patterns is None:
                continue
            n_s = len(grp.sizes)
            mine = np.flatnonzero(self.w_group == gi)
            rows.block(nrow + np.searchsorted(-np.array(grp.sizes), -self.w_size[mine]),
                       w0 + mine, 1.0)
            n_p = len(grp.patterns)
            pr, pc = np.nonzero(grp.patterns)  # pattern, size index
            rows.block(nrow + pc, z0 + zi + pr, -grp.patterns[pr, pc])
            rows.block(np.full(n_p, nrow + n_s), z0 + zi + np.arange(n_p), 1.0)
            rows.bounds(-np.inf, [0.0] * n_s + [float(len(grp.nodes))], n_s + 1)
            nrow += n_s + 1
            zi += n_p
        return nrow

    def _run(
        self, c: FloatArray, ub: FloatArray, slack: bool, time_limit_s: float,
        need: FloatArray | None = None, per_t: FloatArray | None = None,
    ) -> _Solve:
        """One HiGHS run; see :meth:`_constraints` for ``need`` (default: the demand) and t."""
        dem = self.demand[self.demand > 0]
        a, row_lo, row_hi = self._constraints(slack, dem if need is None else need, per_t)
        integrality = np.zeros(len(c), dtype=np.uint8)
        integrality[: self.n_int] = 1
        with quiet_stdout():  # disp=False, yet HiGHS 1.12 printf's a debug line (core.highs)
            res = milp(
                c,
                integrality=integrality,
                bounds=Bounds(np.zeros(len(c)), ub),
                constraints=LinearConstraint(a, row_lo, row_hi) if a.shape[0] else None,
                options={
                    "time_limit": max(time_limit_s, 1e-3),
                    "mip_rel_gap": self.p.mip_rel_gap,
                    "presolve": True,
                    "disp": False,
                },
            )
        x = None if res.x is None else np.asarray(res.x, dtype=np.float64)
        gap = getattr(res, "mip_gap", None)
        return _Solve(x, int(res.status), float(gap) if gap is not None else 0.0, str(res.message))

    def _base(self, n_extra: int) -> tuple[FloatArray, FloatArray]:
        """Cost (scaled to O(1) for HiGHS) and upper bounds of y, w, z, f, then ``n_extra``
        more."""
        top = float(np.abs(self.cost_y).max()) if self.n_y else 0.0
        top = top if top > 0 else 1.0
        c = np.zeros(self.n_x + n_extra)
        c[: self.n_y] = self.cost_y / top
        c[self.n_int : self.n_x] = self.cost_f / top
        ub = np.full(self.n_x + n_extra, np.inf)
        ub[: self.n_y] = self.ub_y
        ub[self.n_y : self.n_y + self.n_w] = self.w_ub
        ub[self.n_y + self.n_w : self.n_int] = [len(self.groups[g].nodes) for g in self.z_group]
        ub[self.n_int : self.n_x] = self.ub_f
        return c, ub

    def solve(self, time_limit_s: float) -> _Solve:
        """The hard-demand model: every class's peak demand met, least cost."""
        if self.n_int == 0:
            ok = not (self.demand > 0).any()
            return _Solve(np.zeros(0), 0 if ok else 2, 0.0, "nothing to decide")
        c, ub = self._base(0)
        return self._run(c, ub, False, time_limit_s)

    def _max_t(
        self, need: FloatArray, per_t: FloatArray, t_max: float, time_limit_s: float
    ) -> FloatArray | None:
        """A plan with the largest t in [0, t_max] and served >= need + per_t * t.

        Returns its variables (t last), or None when HiGHS found no plan in time.
        """
        _, ub = self._base(1)
        c = np.zeros(len(ub))
        c[-1] = -1.0
        ub[-1] = t_max
        run = self._run(c, ub, False, time_limit_s, need, per_t)
        return None if run.x is None or run.status not in (0, 1) else run.x

    def _fits(self, need: FloatArray, time_limit_s: float) -> bool:
        """Whether some plan serves ``need`` req/s (per class with demand)."""
        _, ub = self._base(0)
        run = self._run(np.zeros(len(ub)), ub, False, time_limit_s, need)
        return run.x is not None and run.status in (0, 1)

    def fair_floor(self, time_limit_s: float) -> tuple[FloatArray, FloatArray | None]:
        """Max-min fair served req/s per class with demand (docs/planner.md), and a plan.

        The water level u is the largest rate such that every class some mode can
        serve gets min(demand, u): classes below u are served in full, the others
        at least u. Found by bisection over the sorted demands (each probe asks
        whether demand capped at a level fits; one that finds no plan in time
        counts as not fitting, so the floor errs low), then one solve for u
        between them, whose plan (None if it found none) serves the floor.
        """
        dem = self.demand[self.demand > 0]
        cov = self.coverable[self.demand > 0]
        levels = np.unique(dem[cov])
        if not levels.size or self.n_int == 0:
            return np.zeros(len(dem)), None
        t0 = time.perf_counter()
        probe = max(time_limit_s / (math.ceil(math.log2(levels.size + 1)) + 2), 1e-3)
        lo, hi = -1, levels.size  # levels[lo] fits (-1: none does), levels[hi] does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._fits(np.where(cov, np.minimum(dem, levels[mid]), 0.0), probe):
                lo = mid
            else:
                hi = mid
        base = 0.0 if lo < 0 else float(levels[lo])
        top = float(levels[hi]) if hi < levels.size else base
        full = cov & (dem <= base)
        rest = cov & ~full
        left = max(time_limit_s - (time.perf_counter() - t0), 1e-3)
        x = self._max_t(np.where(full, dem, 0.0), rest.astype(np.float64), top, left)
        level = base if x is None else max(float(x[-1]), base)
        return np.where(cov, np.minimum(dem, level), 0.0), x

    def max_alpha(self, alpha: float, time_limit_s: float) -> float | None:
        """The largest headroom a <= alpha with a x forecast served.

        0 when a class has no mode that can serve it; None when HiGHS found no plan
        in time; at the time limit, the best a found so far (a lower bound).
        """
        dem = self.demand[self.demand > 0]
        if not self.coverable[self.demand > 0].all():
            return 0.0
        if self.n_int == 0 or not dem.size:
            return alpha
        x = self._max_t(np.zeros(len(dem)), dem / alpha, alpha, time_limit_s)
        return None if x is None else float(x[-1])

    def solve_partial(self, floor: FloatArray, time_limit_s: float) -> _Solve:
        """The fewest unmet req/s, then the least cost, with each class served >= ``floor``.

        Unmet req/s (at each class's peak step) weigh SLACK_WEIGHT x the dearest cost
        per req/s, the same for every class, so they dominate energy or carbon.
        """
        dem = self.demand[self.demand > 0]
        c, ub = self._base(len(dem))
        if self.n_int == 0:
            return _Solve(dem.copy(), 2 if dem.size else 0, 0.0, "nothing to decide")
        ub[self.n_x :] = dem - floor * (1.0 - FAIR_SHARE_TOL)
        own = ~self.y_shared
        per_rps = np.concatenate([  # an instance of one class; a flow and its instance share
            np.abs(c[: self.n_y][own]) / self.p.capacity_rps[self.vr[own], self.vm[own]],
            np.abs(c[self.n_int : self.n_x]) + np.abs(c[: self.n_y])[self.f_y] * self.f_inv_cap])
        c[self.n_x :] = SLACK_WEIGHT * max(float(per_rps.max(initial=0.0)), 1.0)
        return self._run(c, ub, True, time_limit_s)

    # ------------------------------------------------------------- decompose

    def decompose(self, x: FloatArray) -> tuple[dict[tuple[int, int, int], int], set[_Key]]:
        """Per-node instance counts {(node, r, m): n} and the groups that failed to pack."""
        xi = np.rint(x[: self.n_int]).astype(np.int64) if self.n_int else np.zeros(0, np.int64)
        y = xi[: self.n_y]
        w = xi[self.n_y : self.n_y + self.n_w]
        z = xi[self.n_y + self.n_w :]
        # 1. spread each link's class instances over the slots its groups opened
        items: list[list[tuple[int, int, int, int]]] = [[] for _ in self.groups]
        failed: set[_Key] = set()
        slots_of_link: dict[int, list[list[int]]] = {}
        for k in range(self.n_w):
            if w[k] > 0:
                slots_of_link.setdefault(int(self.w_link[k]), []).append(
                    [int(self.w_group[k]), int(w[k])]
                )
        order = np.lexsort((self.vr, self.vm, self.y_link))
        for j in order[y[order] > 0]:
            link, r, m, n = int(self.y_link[j]), int(self.vr[j]), int(self.vm[j]), int(y[j])
            slots = slots_of_link.get(link, [])
            while n > 0 and slots:
                gi, free = slots[0]
                q = min(free, n)
                items[gi].append((int(self.mode_gpus[m]), m, r, q))
                n -= q
                slots[0][1] -= q
                if slots[0][1] == 0:
                    slots.pop(0)
            if n > 0:  # more instances than slots: only after a numerically odd solve
                failed.update(g.key for g in self.groups if (g.zone, g.product) == self._zp(link))
        # 2. pack each group's instances onto its nodes
        placed: dict[tuple[int, int, int], int] = {}
        z_at = 0
        for gi, grp in enumerate(self.groups):
            mine = sorted(items[gi], key=lambda it: (-it[0], it[1], it[2]))
            if grp.patterns is None:
                out = _first_fit(grp.gpus, len(grp.nodes), mine)
            else:
                n_pat = len(grp.patterns)
                out = _fill_patterns(grp, z[z_at : z_at + n_pat], mine)
                z_at += n_pat
            if out is None:
                failed.add(grp.key)
                continue
            for local, r, m, n in out:
                key = (grp.nodes[local], r, m)
                placed[key] = placed.get(key, 0) + n
        return placed, failed

    def _zp(self, link: int) -> tuple[int, str]:
        zone, product, _ = next(k for k, v in self.link_of.items() if v == link)
        return zone, product


def _first_fit(
    gpus: int, count: int, items: list[tuple[int, int, int, int]]
) -> list[tuple[int, int, int, int]] | None:
    """First-fit decreasing of (size, m, r, n) items into ``count`` nodes of ``gpus``.

    ``start`` skips full nodes, so with divisible sizes this is next-fit and
    linear in nodes + item kinds.
    """
    free = [gpus] * count
    out: list[tuple[int, int, int, int]] = []
    start = 0
    for size, m, r, n in items:
        i = start
        while n > 0:
            if i >= count:
                return None
            fit = free[i] // size
            if fit:
                q = min(fit, n)
                free[i] -= q * size
                n -= q
                out.append((i, r, m, q))
            if free[i] < size:
                i += 1
            while start < count and free[start] == 0:
                start += 1
            i = max(i, start)
    return out


def _fill_patterns(
    grp: _Group, z: IntArray, items: list[tuple[int, int, int, int]]
) -> list[tuple[int, int, int, int]] | None:
    """Give z[p] nodes pattern p, then fill each size's slots with instances."""
    assert grp.patterns is not None
    if int(z.sum()) > len(grp.nodes):
        return None
    slots = np.repeat(grp.patterns, z, axis=0)  # [nodes used, sizes]
    out: list[tuple[int, int, int, int]] = []
    ptr = dict.fromkeys(range(len(grp.sizes)), 0)
    for size, m, r, n in items:
        si = grp.sizes.index(size)
        while n > 0:
            i = ptr[si]
            if i >= len(slots):
                return None
            q = min(int(slots[i, si]), n)
            if q:
                slots[i, si] -= q
                n -= q
                out.append((i, r, m, q))
            if slots[i, si] == 0:
                ptr[si] = i + 1
    return out


# ---------------------------------------------------------------------------- solve


def solve(problem: PlanProblem, *, partial: bool = True) -> PlanResult:
    """Plan one window. Never raises for an unservable window: see PlanResult.

    ``partial=False`` skips the second (slack) model when the window is
    infeasible: the result then says so with no partial plan. For callers
    that only ask whether a window fits (``core.sizing``'s probes).
    """
    t0 = time.perf_counter()
    deadline = t0 + problem.time_limit_s
    split: frozenset[_Key] = frozenset()
    while True:
        model = _Model(problem, split)
        run, from_hard, proven, max_alpha = _optimise(
            model, deadline, problem.time_limit_s, partial)
        x = run.x if run.x is not None else np.zeros(model.n_int)
        placed, failed = model.decompose(x)
        if not failed or failed <= split:
            break
        # Volume aggregation did not pack (cannot happen for divisible sizes):
        # re-plan those groups node by node, where the volume row is exact.
        split = split | failed
    result = _result(problem, model, run, placed, from_hard, proven, time.perf_counter() - t0)
    if max_alpha is None or result.feasible:
        return result
    return replace(result, max_alpha=max_alpha,
                   binding=(*result.binding, _alpha_line(problem.alpha, max_alpha)))


def _alpha_line(alpha: float, max_alpha: float) -> str:
    """Whether the demand headroom alpha is what does not fit."""
    if max_alpha <= 0.0:
        return "a class has no eligible mode: no headroom alpha fits"
    if max_alpha >= 1.0:
        return (f"the headroom is the cause: alpha {alpha:g} does not fit, "
                f"alpha {max_alpha:.4g} is the largest that does")
    return (f"the forecast itself does not fit (largest alpha that fits: {max_alpha:.4g} "
            f"< 1), whatever the headroom alpha {alpha:g}")


def _optimise(
    model: _Model, deadline: float, limit: float, partial: bool = True
) -> tuple[_Solve, bool, bool, float | None]:
    """Hard demand first; the partial plan only if that is infeasible or timed out empty.

    Returns the run to use, whether it is the hard one, whether infeasibility
    was proven, and the largest headroom alpha that fits (None without a partial plan).
    Without ``partial`` an infeasible hard run is returned as it is (no plan),
    and a trivially infeasible model is not solved.
    """
    trivially_infeasible = bool(((model.demand > 0) & ~model.coverable).any())
    if not trivially_infeasible:
        hard = model.solve(time_limit_s=deadline - time.perf_counter())
        if hard.x is not None and hard.status in (0, 1):
            return hard, True, False, None
        proven = hard.status == 2
        if not partial:
            return _Solve(None, hard.status, hard.gap, hard.message), False, proven, None
    else:
        proven = True
        if not partial:
            no_mode = _Solve(None, 2, math.inf, "a class has no mode that can serve it")
            return no_mode, False, True, None
    budget = max(deadline - time.perf_counter(), min(MIN_SECOND_SOLVE_S, limit))
    start = time.perf_counter()

    def until(share: float) -> float:  # time left until ``share`` of the budget is spent
        return max(start + share * budget - time.perf_counter(), 0.1 * budget)

    floor, floor_x = model.fair_floor(until(PARTIAL_SHARES[0]))
    soft = model.solve_partial(floor, time_limit_s=until(PARTIAL_SHARES[1]))
    if soft.x is None and floor_x is not None:  # no better plan in time: the floor's own
        soft = _Solve(floor_x, 1, math.inf, "partial plan: the max-min floor's plan")
    return soft, False, proven, model.max_alpha(model.p.alpha, until(1.0))


def _status(run: _Solve) -> str:
    """A feasible plan's status: proven optimal, stopped at the gap, or at the time limit."""
    if run.status != 0:
        return "time_limit"
    return "optimal" if run.gap <= OPTIMAL_GAP else "within_gap"


def _placed_assignments(
    problem: PlanProblem, placed: dict[tuple[int, int, int], int]
) -> tuple[list[Assignment], IntArray, FloatArray, float]:
    """Assignments of ``placed`` (node, class, mode) -> instances, with the GPUs used
    per node, the req/s served per class and the objective (J or gCO2)."""
    P, L = problem.power_w, problem.capacity_rps
    nodes, modes, classes = problem.nodes, problem.modes, problem.classes
    node_used = np.zeros(len(nodes), dtype=np.int64)
    served = np.zeros(len(classes))
    objective = 0.0
    factor: dict[str, float] = {}
    assignments: list[Assignment] = []
    for (ni, r, m), n in sorted(placed.items()):
        node, mode = nodes[ni], modes[m]
        node_used[ni] += n * mode.gpus
        served[r] += n * L[r, m]
        if node.site not in factor:
            factor[node.site] = problem.site_factor(node.site)
        objective += n * P[r, m] * problem.step_s * factor[node.site]
        assignments.append(
            Assignment(
                node=node.name,
                site=node.site,
                product=node.product,
                cls=classes[r],
                mode=mode.name,
                instances=n,
                gpus=n * mode.gpus,
                power_w=float(n * P[r, m]),
                served_rps=float(n * L[r, m]),
            )
        )
    return assignments, node_used, served, objective


def _shared_assignments(
    problem: PlanProblem, model: _Model, placed: dict[tuple[int, int, int], int],
    x: FloatArray | None,
) -> tuple[list[Assignment], IntArray, FloatArray, float]:
    """:func:`_placed_assignments` with shared instances: keys (node, R + group, mode)
    are a group's shared instances, whose flows in ``x`` give each class's req/s on
    them, spread over the zone's instances of the group and mode by their count."""
    R = len(problem.classes)
    own = {k: n for k, n in placed.items() if k[1] < R}
    assignments, node_used, served, objective = _placed_assignments(problem, own)
    assert problem.idle_power_w is not None and problem.wake_j_per_request is not None
    idle, wake = problem.idle_power_w, problem.wake_j_per_request
    nodes, modes, classes = problem.nodes, problem.modes, problem.classes
    flows = np.zeros((len(model.zone_factor), R, len(modes)))
    if x is not None and model.n_f:
        flows[model.fz, model.fr, model.fm] = np.maximum(x[model.n_int : model.n_x], 0.0)
    total: dict[tuple[int, int, int], int] = {}
    for (ni, o, m), n in placed.items():
        key = (int(model.node_zone[ni]), o, m)
        total[key] = total.get(key, 0) + n
    for (ni, o, m), n in sorted(placed.items()):
        if o < R:
            continue
        node, mode, zone = nodes[ni], modes[m], int(model.node_zone[ni])
        node_used[ni] += n * mode.gpus
        members = np.flatnonzero(model.owner == o - R)
        rps = flows[zone, members, m] * (n / total[(zone, o, m)])
        keep = rps > SHARE_TOL_REL * np.maximum(1.0, model.demand[members])
        order = sorted(np.flatnonzero(keep).tolist(), key=lambda i: (-rps[i], members[i]))
        mine = [int(members[i]) for i in order]
        loads = [float(rps[i]) for i in order]
        served[mine] += loads
        power = n * idle[m] + sum(q * wake[r, m] for r, q in zip(mine, loads, strict=True))
        objective += power * problem.step_s * problem.site_factor(node.site)
        assignments.append(
            Assignment(node=node.name, site=node.site, product=node.product,
                       cls=classes[(mine or members.tolist())[0]], mode=mode.name,
                       instances=n, gpus=n * mode.gpus, power_w=float(power),
                       served_rps=float(sum(loads)), serves=tuple(classes[r] for r in mine),
                       class_rps=tuple(loads)))
    return assignments, node_used, served, objective


def _site_capacity(
    problem: PlanProblem, node_used: IntArray
) -> dict[tuple[str, str], tuple[int, int]]:
    """(site, product) -> (GPUs used, GPUs free for planning)."""
    capacity: dict[tuple[str, str], tuple[int, int]] = {}
    for ni, node in enumerate(problem.nodes):
        used, total = capacity.get((node.site, node.product), (0, 0))
        capacity[(node.site, node.product)] = (used + int(node_used[ni]), total + node.gpus)
    return capacity


def _result(
    problem: PlanProblem,
    model: _Model,
    run: _Solve,
    placed: dict[tuple[int, int, int], int],
    from_hard: bool,
    proven: bool,
    elapsed: float,
) -> PlanResult:
    R = len(problem.classes)
    assignments, node_used, served, objective = (
        _shared_assignments(problem, model, placed, run.x) if model.shared
        else _placed_assignments(problem, placed))
    capacity = _site_capacity(problem, node_used)
    demand = problem.demand_rps  # [R, T]
    short = demand - served[:, None] if R else np.zeros((0, 0))
    tol = DEMAND_TOL_REL * np.maximum(1.0, model.demand)
    unmet = [r for r in range(R) if float(short[r].max()) > tol[r]]
    feasible = not unmet and run.x is not None
    if feasible:
        return PlanResult(
            feasible=True,
            status=_status(run),
            objective=float(objective),
            assignments=tuple(assignments),
            shortfalls=(),
            binding=(),
            capacity=capacity,
            solve_time_s=elapsed,
            mip_gap=run.gap,
            unit="J" if problem.objective == "energy" else "gCO2",
        )
    shortfalls, binding_all = _shortfalls(problem, unmet, short, served, node_used, proven)
    if run.x is None:
        binding_all.append(f"solver returned no plan: {run.message}")
    elif from_hard:
        binding_all.append("solver plan misses demand beyond tolerance (numerical trouble)")
    return PlanResult(
        feasible=False,
        status="infeasible" if proven or from_hard else "time_limit",
        objective=float(objective),
        assignments=(),
        shortfalls=tuple(shortfalls),
        binding=tuple(binding_all),
        capacity=capacity,
        solve_time_s=elapsed,
        mip_gap=run.gap,
        partial_assignments=tuple(assignments),
        unit="J" if problem.objective == "energy" else "gCO2",
    )


def _shortfalls(
    problem: PlanProblem,
    unmet: list[int],
    short: FloatArray,
    served: FloatArray,
    node_used: IntArray,
    proven: bool,
) -> tuple[list[Shortfall], list[str]]:
    """Per unmet class its worst step's shortfall and reason; the binding capacities."""
    demand = problem.demand_rps
    binding_all: list[str] = []
    shortfalls: list[Shortfall] = []
    for r in unmet:
        reason, binding, sites = _reason(problem, r, node_used)
        if not proven:
            reason = f"time limit reached before a feasible plan was found; {reason}"
        for b in binding:
            if b not in binding_all:
                binding_all.append(b)
        t = int(np.argmax(short[r]))
        shortfalls.append(
            Shortfall(
                cls=problem.classes[r],
                step=t,
                demand_rps=float(demand[r, t]),
                servable_rps=float(served[r]),
                shortfall_rps=float(short[r, t]),
                reason=reason,
                sites=sites,
            )
        )
    return shortfalls, binding_all


def _reason(
    problem: PlanProblem, r: int, node_used: IntArray
) -> tuple[str, list[str], tuple[str, ...]]:
    """Why class r is short: no eligible mode, no node that fits one, or full capacity.

    Returns the reason, the binding (site, product) capacities as text, and their sites.
    """
    servable = problem.servable
    eligible = [m for j, m in enumerate(problem.modes) if servable[r, j]]
    if not eligible:
        return NO_ELIGIBLE_MODE, [], ()
    largest: dict[tuple[str, str], int] = {}
    free: dict[tuple[str, str], int] = {}
    for ni, node in enumerate(problem.nodes):
        key = (node.site, node.product)
        largest[key] = max(largest.get(key, 0), node.gpus)
        free[key] = max(free.get(key, 0), node.gpus - int(node_used[ni]))
    placeable = [
        m for m in eligible if any(m.product == p and g >= m.gpus for (_, p), g in largest.items())
    ]
    if not placeable:
        needs = ", ".join(f"{m.name} needs {m.gpus} {m.product} GPUs on one node" for m in eligible)
        return f"no node can host an eligible mode ({needs})", [], ()
    # a (site, product) binds when no node there has room for another instance
    # of a mode that this class could use there
    used_total: dict[tuple[str, str], tuple[int, int]] = {}
    for ni, node in enumerate(problem.nodes):
        u, t = used_total.get((node.site, node.product), (0, 0))
        used_total[(node.site, node.product)] = (u + int(node_used[ni]), t + node.gpus)
    binding: list[str] = []
    sites: list[str] = []
    for key in sorted(largest):
        site, product = key
        sizes = [m.gpus for m in placeable if m.product == product and m.gpus <= largest[key]]
        if not sizes or free[key] >= min(sizes):
            continue
        used, total = used_total[key]
        text = f"site {site} {product}: {used}/{total} GPUs used"
        if used < total:
            text += f", no node has {min(sizes)} free GPUs for another instance"
        binding.append(text)
        if site not in sites:
            sites.append(site)
    if not binding:
        return "capacity of the eligible GPU products is exhausted", [], ()
    return "capacity: " + "; ".join(binding), binding, tuple(sites)


# ------------------------------------------------------------- published FREESH size

#: FREESH's serving modes (docs/calibration.md, FREESH pool profiles).
FREESH_MODES: tuple[Mode, ...] = (
    Mode("2xA100", "A100", 2),
    Mode("4xA100", "A100", 4),
    Mode("8xA100", "A100", 8),
    Mode("4xH100", "H100", 4),
)


def _frozen(rows: list[list[float]]) -> FloatArray:
    arr = np.array(rows, dtype=np.float64)
    arr.setflags(write=False)
    return arr


#: Published: W per instance by type (rows SS, SL, LS, LL) and mode (docs/calibration.md).
FREESH_POWER_W = _frozen(
    [
        [746, 1466, 2423, 1295],
        [699, 1231, 2150, 1020],
        [747, 1472, 2689, 1262],
        [710, 1286, 2202, 972],
    ]
)
#: Published: sustainable req/s per instance; 0 = mode misses the type's SLO (docs/calibration.md).
FREESH_CAPACITY_RPS = _frozen(
    [
        [5.49, 11.25, 14.85, 16.38],
        [0.0, 2.52, 5.31, 2.07],
        [2.61, 6.93, 11.97, 6.93],
        [0.0, 1.44, 5.04, 0.0],
    ]
)
#: Published GPU counts per site, (A100, H100) = (4, 4), (12, 2), (8, 0); the site
#: names and the split into nodes of at most 8 GPUs are assumptions (TP stays in a node).
FREESH_NODES: tuple[PlanNode, ...] = (
    PlanNode("site-1-a100-0", "site-1", "A100", 4),
    PlanNode("site-1-h100-0", "site-1", "H100", 4),
    PlanNode("site-2-a100-0", "site-2", "A100", 8),
    PlanNode("site-2-a100-1", "site-2", "A100", 4),
    PlanNode("site-2-h100-0", "site-2", "H100", 2),
    PlanNode("site-3-a100-0", "site-3", "A100", 8),
)
#: Assumed (not published): mean req/s per type over the window.
ASSUMED_FREESH_FORECAST_RPS: Mapping[str, float] = {"SS": 12.0, "SL": 2.0, "LS": 5.0, "LL": 1.5}
#: Assumed (not published): constant carbon intensity per site, gCO2/kWh.
ASSUMED_FREESH_CARBON_G_PER_KWH: Mapping[str, Sequence[float]] = {
    "site-1": (420.0,),
    "site-2": (250.0,),
    "site-3": (90.0,),
}


def freesh_published_problem(
    steps: int = 6,
    forecast_rps: Mapping[str, float] | npt.ArrayLike | None = None,
    *,
    objective: Objective = "energy",
    carbon_g_per_kwh: Mapping[str, Sequence[float]] | None = None,
    step_s: float = PLAN_STEP_S,
    alpha: float = PLAN_ALPHA,
) -> PlanProblem:
    """The published FREESH planning size: 3 sites, 24 A100 + 6 H100, 4 types, 4 modes.

    ``forecast_rps`` may be per-type mean rates (shaped by an assumed ramp that
    peaks mid-window at +15 %) or a full [4, steps] array. Carbon defaults to
    the assumed per-site constants when the objective is carbon.
    """
    _check_int("steps", steps, minimum=1)
    if forecast_rps is None or isinstance(forecast_rps, Mapping):
        rates = dict(ASSUMED_FREESH_FORECAST_RPS if forecast_rps is None else forecast_rps)
        unknown = set(rates) - set(CLASS_NAMES)
        if unknown:
            raise ValueError(f"unknown FREESH types {sorted(unknown)}; use {list(CLASS_NAMES)}")
        ramp = 1.0 + 0.15 * np.sin(2 * np.pi * np.arange(steps) / steps - np.pi / 2)  # assumed
        forecast = np.array([[rates.get(c, 0.0)] for c in CLASS_NAMES]) * ramp[None, :]
    else:
        forecast = np.asarray(forecast_rps, dtype=np.float64)
    if carbon_g_per_kwh is None and objective == "carbon":
        carbon_g_per_kwh = ASSUMED_FREESH_CARBON_G_PER_KWH
    return PlanProblem(
        classes=CLASS_NAMES,
        modes=FREESH_MODES,
        nodes=FREESH_NODES,
        power_w=FREESH_POWER_W,
        capacity_rps=FREESH_CAPACITY_RPS,
        forecast_rps=forecast,
        step_s=step_s,
        alpha=alpha,
        objective=objective,
        carbon_g_per_kwh=carbon_g_per_kwh,
    )
