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

Why it stays fast at 10,000 GPUs: identical nodes (same site, product and
free GPUs) are aggregated into groups, so the model grows with the number of
distinct node shapes, not with the number of nodes.

* If every mode size used in a group divides the next larger one and the
  node size (powers of two, the normal case), a volume constraint
  ``sum gpus(m) * y <= k * G`` is exact: items whose sizes form a
  divisibility chain pack into k bins of size G whenever their volume fits,
  and first-fit decreasing finds that packing.
* Otherwise the group uses per-node packing patterns (maximal multisets of
  mode sizes that fit one node): ``z[p]`` nodes run pattern p and each
  mode's instances must fit the slots the patterns provide. That is exact
  for any sizes. Should patterns explode, the group is split into
  single nodes, where the volume constraint is again exact.

x is constant over the window, so the per-step demand rows reduce to one row
per class at its peak step; that is the same feasible set with T times fewer
rows. Per-step shortfalls are reported from the plan afterwards.

Infeasibility is never an exception: a hard-demand model is solved first (so
a feasible plan is exactly cost-optimal); if HiGHS proves it infeasible, or
runs out of time without any plan, a second model with slack on every demand
row and a dominant penalty gives the best partial plan, reported apart from
``assignments`` with per-class shortfalls and the binding capacities.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from joulepool.core.classes import CLASS_NAMES

__all__ = [
    "ASSUMED_FREESH_CARBON_G_PER_KWH",
    "ASSUMED_FREESH_FORECAST_RPS",
    "FREESH_CAPACITY_RPS",
    "FREESH_MODES",
    "FREESH_NODES",
    "FREESH_POWER_W",
    "Assignment",
    "Mode",
    "PlanNode",
    "PlanProblem",
    "PlanResult",
    "Shortfall",
    "freesh_published_problem",
    "solve",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
Objective = Literal["energy", "carbon"]

#: joules per kWh: gCO2 = W * s / J_PER_KWH * gCO2/kWh
J_PER_KWH = 3.6e6
#: relative MIP gap at which HiGHS may stop (its default, made explicit)
MIP_REL_GAP = 1e-4
#: demand counts as met when short by at most this fraction (HiGHS tolerances are ~1e-7)
DEMAND_TOL_REL = 1e-6
#: slack penalty per req/s, in units of the dearest cost per req/s: any partial
#: plan serves everything the cluster can before it saves energy
SLACK_WEIGHT = 1e4
#: above this many per-node patterns a group is split into single nodes
MAX_PATTERNS = 256
#: the partial-plan solve always gets at least this long (or the whole limit if shorter)
MIN_SECOND_SOLVE_S = 1.0

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
    step_s: float = 300.0
    alpha: float = 1.1
    objective: Objective = "energy"
    carbon_g_per_kwh: Mapping[str, Sequence[float]] | None = None
    time_limit_s: float = 30.0

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

    @property
    def steps(self) -> int:
        return int(self.forecast_rps.shape[1])

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
        if not np.all(np.isfinite(arr)) or np.any(arr < 0):
            raise ValueError(f"carbon_g_per_kwh[{site!r}] must be finite and >= 0")
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


@dataclass(frozen=True)
class Shortfall:
    """An unmet class at its worst step: demand = alpha * forecast, in req/s."""

    cls: str
    step: int
    demand_rps: float
    servable_rps: float
    shortfall_rps: float
    reason: str


@dataclass(frozen=True)
class PlanResult:
    """The planner's answer.

    ``assignments`` is empty unless ``feasible``: a partial plan is never
    handed out as if it were one. When infeasible, the best partial plan
    (serve as much as the cluster can, then cheapest) is in
    ``partial_assignments`` so callers can choose between it and their last
    feasible plan. ``objective``, ``capacity`` and the methods describe
    :attr:`plan`, i.e. the assignments when feasible and the partial plan
    otherwise.
    """

    feasible: bool
    status: str  # "optimal" | "time_limit" | "infeasible"
    objective: float  # J (energy) or gCO2 (carbon) over the window
    assignments: tuple[Assignment, ...]
    shortfalls: tuple[Shortfall, ...]
    binding: tuple[str, ...]
    capacity: Mapping[tuple[str, str], tuple[int, int]]  # (site, product) -> (used, total)
    solve_time_s: float
    mip_gap: float
    partial_assignments: tuple[Assignment, ...] = ()
    unit: str = "J"

    @property
    def plan(self) -> tuple[Assignment, ...]:
        return self.assignments if self.feasible else self.partial_assignments

    def instances(self, cls: str) -> int:
        return sum(a.instances for a in self.plan if a.cls == cls)

    def served_rps(self, cls: str) -> float:
        """req/s the plan's instances of ``cls`` sustain."""
        return float(sum(a.served_rps for a in self.plan if a.cls == cls))

    def power_w(self, cls: str | None = None) -> float:
        """Planned power of every instance, or of one class's instances."""
        return float(sum(a.power_w for a in self.plan if cls is None or a.cls == cls))


# ------------------------------------------------------------------------- the model


@dataclass
class _Group:
    """k identical nodes (same site, product, free GPUs) planned as one."""

    site: str
    product: str
    gpus: int
    nodes: list[int]  # indices into problem.nodes
    sizes: tuple[int, ...] = ()  # distinct active mode sizes, descending
    patterns: IntArray | None = None  # [P, len(sizes)] slot counts, when not volume-exact


def _volume_exact(gpus: int, count: int, sizes: tuple[int, ...]) -> bool:
    """True when ``sum size * y <= count * gpus`` alone guarantees a packing.

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


class _Model:
    """Variables and constraints of one planning MILP (vectorised build)."""

    def __init__(self, problem: PlanProblem, split: frozenset[tuple[str, str, int]]) -> None:
        self.p = problem
        R, M = len(problem.classes), len(problem.modes)
        self.demand = problem.demand_rps.max(axis=1) if R else np.zeros(0)  # peak, [R]
        L = problem.capacity_rps
        self.mode_gpus = np.array([m.gpus for m in problem.modes], dtype=np.int64)
        active = (L > 0) & (self.demand[:, None] > 0)  # [R, M]
        mode_active: npt.NDArray[np.bool_] = np.asarray(active.any(axis=0))

        # --- groups of identical nodes
        by_key: dict[tuple[str, str, int], list[int]] = {}
        for i, node in enumerate(problem.nodes):
            if node.gpus > 0:
                by_key.setdefault((node.site, node.product, node.gpus), []).append(i)
        groups: list[_Group] = []
        for (site, product, gpus), members in by_key.items():
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
            if (site, product, gpus) not in split and not _volume_exact(gpus, len(members), sizes):
                found = _maximal_patterns(gpus, sizes, MAX_PATTERNS)
                if found is None:
                    split = split | {(site, product, gpus)}
                else:
                    patterns = np.array(found, dtype=np.int64)
            if (site, product, gpus) in split and len(members) > 1:
                groups.extend(_Group(site, product, gpus, [i], sizes) for i in members)
            else:
                groups.append(_Group(site, product, gpus, members, sizes, patterns))
        self.groups = groups
        n_groups = len(groups)
        self.g_count = np.array([len(g.nodes) for g in groups], dtype=np.int64)
        self.g_gpus = np.array([g.gpus for g in groups], dtype=np.int64)
        sites = sorted({g.site for g in groups})
        factor = {s: problem.site_factor(s) for s in sites}
        self.g_factor = np.array([factor[g.site] for g in groups], dtype=np.float64)

        # --- y[g, r, m]: instances of m for r in group g
        fit = np.zeros((n_groups, M), dtype=bool)
        for gi, grp in enumerate(groups):
            fit[gi] = [m.product == grp.product and m.gpus <= grp.gpus for m in problem.modes]
        cube = fit[:, None, :] & active[None, :, :]
        self.vg, self.vr, self.vm = (a.astype(np.int64) for a in np.nonzero(cube))
        vg, vr, vm = self.vg, self.vr, self.vm
        self.n_y = len(vg)
        self.cost_y = problem.power_w[vr, vm] * problem.step_s * self.g_factor[vg]
        with np.errstate(divide="ignore", invalid="ignore"):
            by_demand = np.ceil(self.demand[vr] / L[vr, vm])
        by_room = self.g_count[vg] * (self.g_gpus[vg] // self.mode_gpus[vm])
        self.ub_y = np.minimum(by_room, by_demand).astype(np.float64)
        self.coverable = np.zeros(R, dtype=bool)
        self.coverable[vr] = True

        # --- z[g, p]: nodes of group g running pattern p
        self.z_group: list[int] = []
        self.z_pattern: list[int] = []
        for gi, grp in enumerate(groups):
            if grp.patterns is not None:
                self.z_group.extend([gi] * len(grp.patterns))
                self.z_pattern.extend(range(len(grp.patterns)))
        self.n_z = len(self.z_group)

    # ------------------------------------------------------------------ build

    def _constraints(self, slack: bool) -> tuple[sparse.csr_array, FloatArray, FloatArray]:
        R = len(self.p.classes)
        vg, vr, vm = self.vg, self.vr, self.vm
        rows: list[IntArray] = []
        cols: list[IntArray] = []
        vals: list[FloatArray] = []
        lo: list[float] = []
        hi: list[float] = []
        y_idx = np.arange(self.n_y, dtype=np.int64)

        # demand: one row per class at its peak step (x is constant over the window)
        dem_rows = np.flatnonzero(self.demand > 0)
        row_of_class = np.full(R, -1, dtype=np.int64)
        row_of_class[dem_rows] = np.arange(len(dem_rows))
        rows.append(row_of_class[vr])
        cols.append(y_idx)
        vals.append(self.p.capacity_rps[vr, vm])
        lo.extend(self.demand[dem_rows].tolist())
        hi.extend([np.inf] * len(dem_rows))
        if slack:
            s0 = self.n_y + self.n_z
            rows.append(np.arange(len(dem_rows), dtype=np.int64))
            cols.append(s0 + np.arange(len(dem_rows), dtype=np.int64))
            vals.append(np.ones(len(dem_rows)))
        nrow = len(dem_rows)

        # volume rows for volume-exact groups
        vol_groups = [gi for gi, g in enumerate(self.groups) if g.patterns is None]
        row_of_group = np.full(len(self.groups), -1, dtype=np.int64)
        row_of_group[vol_groups] = nrow + np.arange(len(vol_groups))
        mask = row_of_group[vg] >= 0
        rows.append(row_of_group[vg][mask])
        cols.append(y_idx[mask])
        vals.append(self.mode_gpus[vm][mask].astype(np.float64))
        lo.extend([-np.inf] * len(vol_groups))
        hi.extend((self.g_count[vol_groups] * self.g_gpus[vol_groups]).astype(float).tolist())
        nrow += len(vol_groups)

        # pattern groups: instances of each size <= slots of that size; patterns <= nodes
        if self.n_z:
            size_row = np.full((len(self.groups), int(self.mode_gpus.max()) + 1), -1, np.int64)
            z_rows: list[int] = []
            z_cols: list[int] = []
            z_vals: list[float] = []
            z0 = self.n_y
            zi = 0
            for gi, grp in enumerate(self.groups):
                if grp.patterns is None:
                    continue
                for si, size in enumerate(grp.sizes):
                    size_row[gi, size] = nrow + si
                count_row = nrow + len(grp.sizes)
                for pattern in grp.patterns:
                    for si, n in enumerate(pattern):
                        if n:
                            z_rows.append(nrow + si)
                            z_cols.append(z0 + zi)
                            z_vals.append(-float(n))
                    z_rows.append(count_row)
                    z_cols.append(z0 + zi)
                    z_vals.append(1.0)
                    zi += 1
                lo.extend([-np.inf] * (len(grp.sizes) + 1))
                hi.extend([0.0] * len(grp.sizes) + [float(len(grp.nodes))])
                nrow += len(grp.sizes) + 1
            r_y = size_row[vg, self.mode_gpus[vm]]
            mask = r_y >= 0
            rows.append(r_y[mask])
            cols.append(y_idx[mask])
            vals.append(np.ones(int(mask.sum())))
            rows.append(np.array(z_rows, dtype=np.int64))
            cols.append(np.array(z_cols, dtype=np.int64))
            vals.append(np.array(z_vals, dtype=np.float64))

        n_var = self.n_y + self.n_z + (len(dem_rows) if slack else 0)
        a = sparse.csr_array(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
            shape=(nrow, n_var),
        )
        return a, np.array(lo, dtype=np.float64), np.array(hi, dtype=np.float64)

    def solve(self, slack: bool, time_limit_s: float) -> _Solve:
        """One HiGHS run; ``slack`` adds a penalised shortfall variable per class."""
        dem_rows = np.flatnonzero(self.demand > 0)
        n_s = len(dem_rows) if slack else 0
        n_var = self.n_y + self.n_z + n_s
        if n_var == 0:
            ok = not dem_rows.size
            return _Solve(np.zeros(0), 0 if ok else 2, 0.0, "nothing to decide")
        scale = float(self.cost_y.max()) if self.n_y and self.cost_y.max() > 0 else 1.0
        cost_y = self.cost_y / scale  # keep coefficients O(1) for HiGHS
        c = np.zeros(n_var)
        c[: self.n_y] = cost_y
        lb = np.zeros(n_var)
        ub = np.empty(n_var)
        ub[: self.n_y] = self.ub_y
        ub[self.n_y : self.n_y + self.n_z] = [len(self.groups[g].nodes) for g in self.z_group]
        integrality = np.ones(n_var, dtype=np.uint8)
        if slack:
            per_rps = cost_y / self.p.capacity_rps[self.vr, self.vm] if self.n_y else np.ones(1)
            c[self.n_y + self.n_z :] = SLACK_WEIGHT * max(float(per_rps.max()), 1.0)
            ub[self.n_y + self.n_z :] = self.demand[dem_rows]
            integrality[self.n_y + self.n_z :] = 0
        a, row_lo, row_hi = self._constraints(slack)
        res = milp(
            c,
            integrality=integrality,
            bounds=Bounds(lb, ub),
            constraints=LinearConstraint(a, row_lo, row_hi) if a.shape[0] else None,
            options={
                "time_limit": max(time_limit_s, 1e-3),
                "mip_rel_gap": MIP_REL_GAP,
                "presolve": True,
                "disp": False,
            },
        )
        x = None if res.x is None else np.asarray(res.x, dtype=np.float64)
        gap = getattr(res, "mip_gap", None)
        return _Solve(x, int(res.status), float(gap) if gap is not None else 0.0, str(res.message))

    # ------------------------------------------------------------- decompose

    def decompose(
        self, x: FloatArray
    ) -> tuple[dict[tuple[int, int, int], int], set[tuple[str, str, int]]]:
        """Per-node instance counts {(node, r, m): n} and the groups that failed to pack."""
        y = np.rint(x[: self.n_y]).astype(np.int64) if self.n_y else np.zeros(0, np.int64)
        z = np.rint(x[self.n_y : self.n_y + self.n_z]).astype(np.int64)
        placed: dict[tuple[int, int, int], int] = {}
        failed: set[tuple[str, str, int]] = set()
        bounds = np.searchsorted(self.vg, np.arange(len(self.groups) + 1))
        z_at = 0
        for gi, grp in enumerate(self.groups):
            sel = range(int(bounds[gi]), int(bounds[gi + 1]))
            items = sorted(
                (
                    (int(self.mode_gpus[self.vm[j]]), int(self.vm[j]), int(self.vr[j]), int(y[j]))
                    for j in sel
                    if y[j] > 0
                ),
                key=lambda it: (-it[0], it[1], it[2]),
            )
            if grp.patterns is None:
                out = _first_fit(grp.gpus, len(grp.nodes), items)
            else:
                n_pat = len(grp.patterns)
                out = _fill_patterns(grp, z[z_at : z_at + n_pat], items)
                z_at += n_pat
            if out is None:
                failed.add((grp.site, grp.product, grp.gpus))
                continue
            for local, r, m, n in out:
                key = (grp.nodes[local], r, m)
                placed[key] = placed.get(key, 0) + n
        return placed, failed


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


def solve(problem: PlanProblem) -> PlanResult:
    """Plan one window. Never raises for an unservable window: see PlanResult."""
    t0 = time.perf_counter()
    deadline = t0 + problem.time_limit_s
    split: frozenset[tuple[str, str, int]] = frozenset()
    while True:
        model = _Model(problem, split)
        run, from_hard, proven = _optimise(model, deadline, problem.time_limit_s)
        x = run.x if run.x is not None else np.zeros(model.n_y + model.n_z)
        placed, failed = model.decompose(x)
        if not failed or failed <= split:
            break
        # Volume aggregation did not pack (cannot happen for divisible sizes):
        # re-plan those groups node by node, where the volume row is exact.
        split = split | failed
    return _result(problem, model, run, placed, from_hard, proven, time.perf_counter() - t0)


def _optimise(model: _Model, deadline: float, limit: float) -> tuple[_Solve, bool, bool]:
    """Hard demand first; slack model only if that is infeasible or timed out empty.

    Returns the run to use, whether it is the hard one, and whether
    infeasibility was proven.
    """
    trivially_infeasible = bool(((model.demand > 0) & ~model.coverable).any())
    if not trivially_infeasible:
        hard = model.solve(slack=False, time_limit_s=deadline - time.perf_counter())
        if hard.x is not None and hard.status in (0, 1):
            return hard, True, False
        proven = hard.status == 2
    else:
        proven = True
    remaining = max(deadline - time.perf_counter(), min(MIN_SECOND_SOLVE_S, limit))
    soft = model.solve(slack=True, time_limit_s=remaining)
    return soft, False, proven


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
    P, L = problem.power_w, problem.capacity_rps
    nodes, modes, classes = problem.nodes, problem.modes, problem.classes
    node_used = np.zeros(len(nodes), dtype=np.int64)
    served = np.zeros(R)
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
    capacity: dict[tuple[str, str], tuple[int, int]] = {}
    for ni, node in enumerate(nodes):
        used, total = capacity.get((node.site, node.product), (0, 0))
        capacity[(node.site, node.product)] = (used + int(node_used[ni]), total + node.gpus)

    demand = problem.demand_rps  # [R, T]
    short = demand - served[:, None] if R else np.zeros((0, 0))
    tol = DEMAND_TOL_REL * np.maximum(1.0, model.demand)
    unmet = [r for r in range(R) if float(short[r].max()) > tol[r]]
    feasible = not unmet and run.x is not None
    if feasible:
        status = "optimal" if run.status == 0 else "time_limit"
        return PlanResult(
            feasible=True,
            status=status,
            objective=float(objective),
            assignments=tuple(assignments),
            shortfalls=(),
            binding=(),
            capacity=capacity,
            solve_time_s=elapsed,
            mip_gap=run.gap,
            unit="J" if problem.objective == "energy" else "gCO2",
        )

    binding_all: list[str] = []
    shortfalls: list[Shortfall] = []
    for r in unmet:
        reason, binding = _reason(problem, r, node_used, unmet)
        if not proven:
            reason = f"time limit reached before a feasible plan was found; {reason}"
        for b in binding:
            if b not in binding_all:
                binding_all.append(b)
        t = int(np.argmax(short[r]))
        shortfalls.append(
            Shortfall(
                cls=classes[r],
                step=t,
                demand_rps=float(demand[r, t]),
                servable_rps=float(served[r]),
                shortfall_rps=float(short[r, t]),
                reason=reason,
            )
        )
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


def _reason(
    problem: PlanProblem, r: int, node_used: IntArray, unmet: list[int]
) -> tuple[str, list[str]]:
    """Why class r is short: no eligible mode, no node that fits one, or full capacity."""
    L = problem.capacity_rps
    eligible = [m for j, m in enumerate(problem.modes) if L[r, j] > 0]
    if not eligible:
        return NO_ELIGIBLE_MODE, []
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
        return f"no node can host an eligible mode ({needs})", []
    # a (site, product) binds when no node there has room for another instance
    # of a mode that this class could use there
    used_total: dict[tuple[str, str], tuple[int, int]] = {}
    for ni, node in enumerate(problem.nodes):
        u, t = used_total.get((node.site, node.product), (0, 0))
        used_total[(node.site, node.product)] = (u + int(node_used[ni]), t + node.gpus)
    binding: list[str] = []
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
    if not binding:
        return "capacity of the eligible GPU products is exhausted", []
    return "capacity: " + "; ".join(binding), binding


# ------------------------------------------------------------- published FREESH size

#: FREESH's serving modes (CALIBRATION.md, FREESH pool profiles).
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


#: Published: W per instance by type (rows SS, SL, LS, LL) and mode (CALIBRATION.md).
FREESH_POWER_W = _frozen(
    [
        [746, 1466, 2423, 1295],
        [699, 1231, 2150, 1020],
        [747, 1472, 2689, 1262],
        [710, 1286, 2202, 972],
    ]
)
#: Published: sustainable req/s per instance; 0 = mode misses the type's SLO (CALIBRATION.md).
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
    step_s: float = 300.0,
    alpha: float = 1.1,
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
