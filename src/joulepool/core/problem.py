"""The one builder of the planner's problem, for the operator, ``joulepool plan`` and the simulator.

Every caller describes what to serve as :class:`ServiceClass` es (an InferencePool, or
one of the simulator's request classes), the GPU nodes as
:class:`~joulepool.core.planner.PlanNode` s (the one node type: :func:`node_from_label`
builds it from a Node's GPU product label), the serving modes, and how to find the
:class:`~joulepool.core.profiles.ServingProfile` of a class on a mode. :func:`build_problem`
fills the planner's matrices from core's serving model:

* ``power_w[r, m]`` and ``capacity_rps[r, m]`` = :meth:`ServingProfile.serving_point`
  (power in W of one instance, its sustainable requests/s with queueing headroom) at the
  class's mean prompt and output lengths and its TTFT/TPOT SLO; 0 where the class may
  not use the mode (no profile, product not allowed);
* ``forecast_rps[r, t]`` = the class's forecast per step (requests/s).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from joulepool.core.planner import Mode, Objective, PlanNode, PlanProblem
from joulepool.core.profiles import Headroom, ServingPoint, ServingProfile, product_for_label


def node_from_label(name: str, site: str, product_label: str, gpus: int) -> PlanNode:
    """A node from its GPU product label (e.g. ``NVIDIA-H100-80GB-HBM3``): the core product
    name when the label is known, else the label itself (no profile will match it)."""
    product = product_for_label(product_label)
    return PlanNode(name, site, product.name if product else product_label, gpus)


@dataclass(frozen=True)
class ServiceClass:
    """Requests the planner sizes instances for: lengths in tokens, SLOs in seconds."""

    name: str
    mean_input_tokens: float
    mean_output_tokens: float
    ttft_s: float
    tpot_s: float
    #: requests/s per planning step (before the problem's alpha)
    forecast_rps: Sequence[float]


#: (class index, mode) -> the profile serving that class on that mode, or None: not allowed
ProfileLookup = Callable[[int, Mode], ServingProfile | None]


@dataclass(frozen=True)
class BuiltProblem:
    problem: PlanProblem
    #: mode name -> per class: the serving point behind P and L (None: not allowed)
    serving: Mapping[str, tuple[ServingPoint | None, ...]]


def serving_point(profile: ServingProfile, cls: ServiceClass,
                  headroom: Headroom | None) -> ServingPoint:
    """One instance of ``profile`` serving ``cls``; a class with no output serves nothing."""
    if cls.mean_output_tokens <= 0:
        return ServingPoint(0.0, float(profile.power_w(1)), 0.0, 0.0, 0.0, 0.0, 0.0, 1.0,
                            "no requests in the class")
    return profile.serving_point(cls.mean_input_tokens, cls.mean_output_tokens, cls.ttft_s,
                                 cls.tpot_s, headroom=headroom)


def build_problem(
    classes: Sequence[ServiceClass],
    modes: Sequence[Mode],
    nodes: Sequence[PlanNode],
    profile_for: ProfileLookup,
    *,
    step_s: float,
    alpha: float,
    objective: Objective,
    carbon_g_per_kwh: Mapping[str, Sequence[float]] | None = None,
    headroom: Headroom | None = None,
    **solver: Any,
) -> BuiltProblem:
    """The planner's problem; ``solver``: PlanProblem's ``time_limit_s`` / ``mip_rel_gap``.

    Nodes without GPUs are left out. Every forecast must have the same number of steps.
    """
    R, M = len(classes), len(modes)
    steps = {len(c.forecast_rps) for c in classes}
    if len(steps) > 1:
        raise ValueError(f"forecasts of different lengths: {sorted(steps)}")
    power = np.zeros((R, M))
    capacity = np.zeros((R, M))
    serving: dict[str, list[ServingPoint | None]] = {m.name: [None] * R for m in modes}
    for m, mode in enumerate(modes):
        for r, cls in enumerate(classes):
            profile = profile_for(r, mode)
            if profile is None:
                continue
            sp = serving_point(profile, cls, headroom)
            serving[mode.name][r] = sp
            power[r, m], capacity[r, m] = sp.power_w, sp.rps
    forecast = np.array([list(c.forecast_rps) for c in classes], dtype=np.float64)
    problem = PlanProblem(
        classes=tuple(c.name for c in classes),
        modes=tuple(modes),
        nodes=tuple(n for n in nodes if n.gpus > 0),
        power_w=power,
        capacity_rps=capacity,
        forecast_rps=forecast.reshape(R, steps.pop() if steps else 0),
        step_s=step_s,
        alpha=alpha,
        objective=objective,
        carbon_g_per_kwh=carbon_g_per_kwh,
        **solver,
    )
    return BuiltProblem(problem, {k: tuple(v) for k, v in serving.items()})
