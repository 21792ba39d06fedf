"""Simulated clusters: the two built-ins and ``--cluster FILE``.

A cluster file is the same YAML ``joulepool plan --cluster`` reads (``nodes``
groups with name/site/product/gpus/count, optional ``carbon`` per site and
``stepSeconds``) plus an optional ``simulator`` section::

    simulator:
      model: llama-3.1-8b              # served model (default llama-3.1-8b)
      staticModes: {A100: 1, H100: 1}  # GPUs per instance for the non-planner policies
      planModes: [1xA100, 1xH100]      # modes the planner may use (default: all profiled)
      objective: energy                # planner objective: energy | carbon
      durationSeconds: 600             # default --duration
      load: 0.5                        # default arrivals: one of load, scale, rate, replay

Sites without a carbon entry get the dirtiest listed intensity (as the
planner does), or 420 gCO2/kWh if none is listed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from joulepool.core.planner import ASSUMED_FREESH_CARBON_G_PER_KWH, FREESH_NODES, PlanNode
from joulepool.core.profiles import (
    DEFAULT_PROFILES,
    LLAMA_8B,
    LLAMA_70B,
    PRODUCTS,
    ServingProfile,
    product_for_label,
)

if TYPE_CHECKING:
    from joulepool.api.cluster import ClusterSpec

#: JouleSched section 6: marginal grid intensity 0.42 kgCO2/kWh
JOULESCHED_G_PER_KWH = 420.0


class ClusterError(ValueError):
    """A cluster description that cannot be simulated."""


#: default offered load: this fraction of the static deployment's capacity at SLO
#: (``sim.runner.capacity_at_slo``), the utilisation of a cluster sized for its peaks
#: (docs/simulator.md, "Offered load")
DEFAULT_LOAD = 0.5


@dataclass(frozen=True)
class SimCluster:
    name: str
    model: str
    nodes: tuple[PlanNode, ...]
    carbon_g_per_kwh: Mapping[str, tuple[float, ...]]  # per site, one value per step
    carbon_step_s: float
    static_modes: Mapping[str, int]  # product -> GPUs per instance
    plan_modes: tuple[str, ...]  # mode names, e.g. "4xA100"
    objective: Literal["energy", "carbon"]
    duration_s: float
    notes: tuple[str, ...] = ()
    #: default arrivals: ("load", fraction of the capacity at SLO), ("scale", x trace
    #: rate), ("rate", req/s) or ("replay", 1)
    default_arrival: tuple[str, float] = ("load", DEFAULT_LOAD)
    profiles: tuple[ServingProfile, ...] = field(default=DEFAULT_PROFILES, repr=False)

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ClusterError(f"cluster {self.name!r} has no nodes")
        for n in self.nodes:
            if n.product not in PRODUCTS:
                raise ClusterError(
                    f"node {n.name!r}: unknown GPU product {n.product!r}; "
                    f"known: {sorted(PRODUCTS)}"
                )
        for site in self.sites:
            if site not in self.carbon_g_per_kwh:
                raise ClusterError(f"site {site!r} has no carbon intensity")
        for product, g in self.static_modes.items():
            if self.profile(product, g) is None:
                raise ClusterError(
                    f"static mode {g}x{product}: no serving profile for {self.model}"
                )
        for mode in self.plan_modes:
            if self.mode_profile(mode) is None:
                raise ClusterError(f"plan mode {mode!r}: no serving profile for {self.model}")
        if self.duration_s <= 0 or self.carbon_step_s <= 0:
            raise ClusterError("duration and carbon step must be positive")
        kind, value = self.default_arrival
        if kind not in ("load", "scale", "rate", "replay") or not value > 0:
            raise ClusterError(f"default arrival {self.default_arrival!r}: need load, scale, "
                               "rate or replay with a positive value")

    # -- lookups ---------------------------------------------------------------
    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n.site for n in self.nodes))

    @property
    def gpus_total(self) -> int:
        return sum(n.gpus for n in self.nodes)

    def gpu_counts(self) -> dict[tuple[str, str], int]:
        """(site, product) -> GPUs."""
        out: dict[tuple[str, str], int] = {}
        for n in self.nodes:
            out[(n.site, n.product)] = out.get((n.site, n.product), 0) + n.gpus
        return out

    def profile(self, product: str, gpus: int) -> ServingProfile | None:
        found = None
        for p in self.profiles:  # later (user) profiles win
            if p.model == self.model and p.product.name == product and p.gpus == gpus:
                found = p
        return found

    def idle_w(self, product: str) -> float:
        """Idle power of one GPU of ``product`` (from this cluster's profiles when present)."""
        for p in reversed(self.profiles):
            if p.product.name == product:
                return p.product.idle_w.value
        return PRODUCTS[product].idle_w.value

    def mode_profile(self, mode: str) -> ServingProfile | None:
        gpus, _, product = mode.partition("x")
        try:
            return self.profile(product, int(gpus))
        except ValueError:
            return None

    def carbon_at(self, site: str, t_s: float) -> float:
        series = self.carbon_g_per_kwh[site]
        return series[int(t_s // self.carbon_step_s) % len(series)]

    def carbon_window(self, site: str, start_s: float, steps: int, step_s: float) -> list[float]:
        return [self.carbon_at(site, start_s + k * step_s) for k in range(steps)]

    def describe(self) -> list[str]:
        counts: dict[str, dict[str, int]] = {}
        for n in self.nodes:
            counts.setdefault(n.site, {}).setdefault(n.product, 0)
            counts[n.site][n.product] += n.gpus
        sites = "; ".join(
            f"{s}: " + ", ".join(f"{g} {p}" for p, g in sorted(c.items()))
            + f" ({_carbon_text(self.carbon_g_per_kwh[s])} gCO2/kWh)"
            for s, c in counts.items()
        )
        static = ", ".join(f"{g}x{p}" for p, g in sorted(self.static_modes.items()))
        lines = [
            f"cluster {self.name}: {self.gpus_total} GPUs, {len(self.nodes)} nodes; {sites}",
            f"model {self.model}; static deployment (non-planner policies): {static} instances; "
            f"planner modes: {', '.join(self.plan_modes)}; planner objective: {self.objective}",
        ]
        return lines + list(self.notes)


def _carbon_text(series: Sequence[float]) -> str:
    if len(set(series)) == 1:
        return f"{series[0]:.0f}"
    return f"{min(series):.0f}-{max(series):.0f}, time-varying"


# ------------------------------------------------------------------ built-ins
def joulesched_320() -> SimCluster:
    nodes = (
        *(PlanNode(f"a100-{i}", "site-1", "A100", 8) for i in range(20)),
        *(PlanNode(f"h100-{i}", "site-1", "H100", 8) for i in range(16)),
        *(PlanNode(f"l4-{i}", "site-1", "L4", 8) for i in range(4)),
    )
    return SimCluster(
        name="joulesched-320",
        model=LLAMA_8B,
        nodes=nodes,
        carbon_g_per_kwh={"site-1": (JOULESCHED_G_PER_KWH,)},
        carbon_step_s=300.0,
        static_modes={"A100": 1, "H100": 1, "L4": 1},
        plan_modes=("1xA100", "1xH100", "1xL4"),
        objective="energy",
        duration_s=600.0,
        notes=(
            "JouleSched's 320 GPUs (160 A100, 128 H100, 32 L4) on one site at its 420 gCO2/kWh; "
            "the paper does not name the model: llama-3.1-8b on one GPU, the one model "
            "all three products have profiles for (an L4 cannot hold a 70B model); "
            "nodes of 8 GPUs (assumed)",
        ),
    )


def _freesh_carbon() -> dict[str, tuple[float, ...]]:
    """Assumed 5-min series over 2 h (looped), around core's assumed FREESH site means.

    site-1: a solar-heavy grid at the evening ramp (+-25 %, rising); site-2:
    a thermal grid with a small swing (+-8 %); site-3: hydro-heavy with a
    slow swing (+-20 %, falling). Illustrative only; give real series with
    ``--cluster``.
    """
    k = np.arange(24)
    mean = {s: v[0] for s, v in ASSUMED_FREESH_CARBON_G_PER_KWH.items()}
    ramp = np.clip((k - 2) / 12.0, 0.0, 1.0)
    series = {
        "site-1": mean["site-1"] * (0.75 + 0.5 * ramp),
        "site-2": mean["site-2"] * (1.0 + 0.08 * np.sin(2 * np.pi * k / 24)),
        "site-3": mean["site-3"] * (1.2 - 0.4 * ramp),
    }
    return {s: tuple(float(round(x, 1)) for x in v) for s, v in series.items()}


def freesh_3site() -> SimCluster:
    nodes = tuple(FREESH_NODES)
    return SimCluster(
        name="freesh-3site",
        model=LLAMA_70B,
        nodes=nodes,
        carbon_g_per_kwh=_freesh_carbon(),
        carbon_step_s=300.0,
        static_modes={"A100": 4, "H100": 4},
        plan_modes=("2xA100", "4xA100", "8xA100", "4xH100"),
        objective="carbon",
        duration_s=3600.0,
        notes=(
            "FREESH served a 1-hour production workload at the trace's own rate (--scale 1: "
            "more than twice what this cluster serves within SLO with a 70B model, by "
            f"sim.runner.capacity_at_slo); by default {DEFAULT_LOAD:g} of the capacity at "
            "SLO, as every built-in cluster; "
            "FREESH's 3 sites, (A100, H100) = (4, 4), (12, 2), (8, 0), and its four modes "
            "2x/4x/8xA100 and 4xH100; served model llama-3.1-70b (FREESH's pool profiles "
            "point to a 70B model; our profiles, not FREESH's table, are used); "
            "carbon series assumed (illustrative), around core's assumed site means; "
            "the 2 H100 at site-2 fit no mode (FREESH has no 2xH100) and idle",
        ),
    )


BUILTIN: dict[str, Any] = {"joulesched-320": joulesched_320, "freesh-3site": freesh_3site}


# ------------------------------------------------------------------ files
_ARRIVAL_KEYS = ("load", "scale", "rate", "replay")
_SIMULATOR_KEYS = {"model", "staticModes", "planModes", "objective", "durationSeconds",
                   *_ARRIVAL_KEYS}


def _read_cluster_yaml(p: Path) -> tuple[ClusterSpec, dict[str, Any]]:
    """The file's ClusterSpec and its ``simulator`` mapping (ClusterError if invalid)."""
    import yaml
    from pydantic import ValidationError

    from joulepool.api.cluster import ClusterSpec
    from joulepool.api.load import from_validation_error, load_yaml

    try:
        data = load_yaml(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ClusterError(f"{p}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ClusterError(f"{p}: not UTF-8 text: {exc}") from None
    except yaml.YAMLError as exc:
        raise ClusterError(f"{p}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ClusterError(f"{p}: expected a mapping with 'nodes'")
    sim = data.pop("simulator", None) or {}
    if not isinstance(sim, dict):
        raise ClusterError(f"{p}: simulator: expected a mapping")
    try:
        spec = ClusterSpec.model_validate(data)
    except ValidationError as exc:
        raise ClusterError(str(from_validation_error(exc, str(p)))) from None
    unknown = sorted(set(sim) - _SIMULATOR_KEYS)
    if unknown:
        raise ClusterError(
            f"{p}: simulator: unknown key(s) {unknown}; known: {sorted(_SIMULATOR_KEYS)}"
        )
    return spec, sim


def _file_nodes(p: Path, spec: ClusterSpec) -> list[PlanNode]:
    nodes = []
    for name, site, label, gpus in spec.expanded():
        product = product_for_label(label)
        if product is None:
            raise ClusterError(
                f"{p}: node {name!r}: unknown GPU product {label!r}; known: {sorted(PRODUCTS)}"
            )
        nodes.append(PlanNode(name, site, product.name, gpus))
    return nodes


def _file_modes(
    p: Path, sim: dict[str, Any], profiles: list[ServingProfile], products: set[str]
) -> tuple[dict[str, int], tuple[str, ...]]:
    """simulator.staticModes (default: smallest profiled degree per product) and
    simulator.planModes (default: every profiled mode of a product present)."""
    static_raw = sim.get("staticModes")
    if static_raw is None:
        static: dict[str, int] = {}
        for q in sorted(profiles, key=lambda q: q.gpus, reverse=True):
            if q.product.name in products:
                static[q.product.name] = q.gpus
    elif isinstance(static_raw, dict):
        try:
            static = {str(k): int(v) for k, v in static_raw.items()}
        except (TypeError, ValueError):
            raise ClusterError(f"{p}: simulator.staticModes: GPU counts must be integers") \
                from None
    else:
        raise ClusterError(f"{p}: simulator.staticModes: expected a mapping product -> GPUs")
    plan_raw = sim.get("planModes")
    if plan_raw is None:
        plan = tuple(sorted({q.mode for q in profiles if q.product.name in products}))
    elif isinstance(plan_raw, list):
        plan = tuple(str(m) for m in plan_raw)
    else:
        raise ClusterError(f"{p}: simulator.planModes: expected a list such as [4xA100]")
    return static, plan


def _file_duration(p: Path, sim: dict[str, Any]) -> float:
    try:
        duration = float(sim.get("durationSeconds", 600.0))
    except (TypeError, ValueError):
        raise ClusterError(f"{p}: simulator.durationSeconds must be a number") from None
    if not math.isfinite(duration) or duration <= 0:
        raise ClusterError(f"{p}: simulator.durationSeconds must be positive")
    return duration


def _file_arrival(p: Path, sim: dict[str, Any]) -> tuple[str, float]:
    """At most one of simulator.load/scale/rate/replay (default load DEFAULT_LOAD)."""
    given = [k for k in _ARRIVAL_KEYS if k in sim]
    if len(given) > 1:
        raise ClusterError(f"{p}: simulator: give at most one of {', '.join(_ARRIVAL_KEYS)}")
    if not given:
        return ("load", DEFAULT_LOAD)
    key = given[0]
    try:
        value = 1.0 if key == "replay" else float(sim[key])
    except (TypeError, ValueError):
        raise ClusterError(f"{p}: simulator.{key} must be a number") from None
    if key == "replay" and sim[key] is not True:
        raise ClusterError(f"{p}: simulator.replay must be true when given")
    if not (math.isfinite(value) and value > 0):
        raise ClusterError(f"{p}: simulator.{key} must be positive")
    return (key, value)


def _file_carbon(
    spec: ClusterSpec, nodes: list[PlanNode]
) -> tuple[dict[str, tuple[float, ...]], list[str]]:
    """Carbon series per site; a site without one gets the highest given (noted)."""
    carbon = {s: tuple(float(v) for v in vals) for s, vals in spec.carbon_by_site().items()}
    sites = dict.fromkeys(n.site for n in nodes)
    fallback = max((max(v) for v in carbon.values()), default=JOULESCHED_G_PER_KWH)
    notes = []
    for site in sites:
        if site not in carbon:
            carbon[site] = (fallback,)
            notes.append(f"site {site}: no carbon given, assumed {fallback:.0f} gCO2/kWh")
    return carbon, notes


def load_cluster_file(path: str | Path) -> SimCluster:
    """A cluster from a YAML file: an ``api.cluster.ClusterSpec`` plus an optional
    ``simulator`` mapping; any problem raises ClusterError naming the file and key."""
    p = Path(path)
    spec, sim = _read_cluster_yaml(p)
    nodes = _file_nodes(p, spec)
    model = str(sim.get("model", LLAMA_8B))
    profiles = [q for q in DEFAULT_PROFILES if q.model == model]
    if not profiles:
        models = sorted({q.model for q in DEFAULT_PROFILES})
        raise ClusterError(f"{p}: simulator.model {model!r} has no profiles; known: {models}")
    static, plan = _file_modes(p, sim, profiles, {n.product for n in nodes})
    objective = sim.get("objective", "energy")
    if objective not in ("energy", "carbon"):
        raise ClusterError(f"{p}: simulator.objective must be energy or carbon")
    duration = _file_duration(p, sim)
    arrival = _file_arrival(p, sim)
    carbon, notes = _file_carbon(spec, nodes)
    try:
        return SimCluster(
            name=spec.name,
            model=model,
            nodes=tuple(nodes),
            carbon_g_per_kwh=carbon,
            carbon_step_s=float(spec.step_seconds),
            static_modes=static,
            plan_modes=plan,
            objective=objective,
            duration_s=duration,
            notes=tuple(notes),
            default_arrival=arrival,
        )
    except ClusterError as exc:
        raise ClusterError(f"{p}: {exc}") from None


def resolve_cluster(name_or_path: str) -> SimCluster:
    """A built-in cluster by name, or a cluster file."""
    if name_or_path in BUILTIN:
        cluster: SimCluster = BUILTIN[name_or_path]()
        return cluster
    p = Path(name_or_path)
    if not p.exists():
        raise ClusterError(
            f"{name_or_path}: neither a built-in cluster ({', '.join(BUILTIN)}) nor a file"
        )
    return load_cluster_file(p)
