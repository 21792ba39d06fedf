"""The one builder of the planner's problem, for the operator, ``joulepool plan`` and the simulator.

Every caller describes what to serve as :class:`ServiceClass` es (an InferencePool, or
one of the simulator's request classes), the GPU nodes as
:class:`~joulepool.core.planner.PlanNode` s (the one node type: :func:`node_from_label`
builds it from a Node's GPU product label), the serving modes, and how to find the
:class:`~joulepool.core.profiles.ServingProfile` of a class on a mode. :func:`build_problem`
fills the planner's matrices from core's serving model:

* ``power_w[r, m]`` and ``capacity_rps[r, m]`` = :meth:`ServingProfile.serving_point`
  (power in W of one instance, its sustainable requests/s with queueing headroom) at the
  class's mean prompt and output lengths and its TTFT/TPOT SLO, as one instance of a
  pool of ``pool_sizes`` instances (one M/G/n prefill queue; default one instance;
  docs/planner.md, "Pool-level TTFT"); 0 where the class may not use the mode (no
  profile, product not allowed);
* ``forecast_rps[r, t]`` = the class's forecast per step (requests/s);
* for classes that may share instances (the same ``ServiceClass.share_key``), the price of a
  request on a shared instance at the batch the group reaches (:func:`shared_batches`)
  and the rate of one class's prompts next to which another keeps its TTFT
  (:func:`shared_ttft`; docs/planner.md, "Shared instances").

The serving point sizes a class from its MEAN prompt; a mode whose prefill of the mean
prompt fits the TTFT may still miss it for a large share of the class's longer prompts.
:func:`prompt_tail_miss` counts that share from the class's prompt-length distribution
(:class:`~joulepool.core.classes.PromptLengths`), and :func:`build_problem` keeps a mode
for a class only where that share fits the headroom's TTFT miss budget, at no more than
the rate where it still does (docs/planner.md, "Prompt-length tail"). Conversely, a mode
whose prefill of the mean prompt exceeds the TTFT (FREESH's rule: not eligible) is judged
by the class's prompts when it has them (:func:`judged_by_prompts`): with heavy-tailed
prompts the mean lies far above what most of the class needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from joulepool.core.batching import prefill_times_s
from joulepool.core.classes import PromptLengths
from joulepool.core.planner import Mode, Objective, PlanNode, PlanProblem
from joulepool.core.profiles import (
    DEFAULT_HEADROOM,
    Headroom,
    ServingPoint,
    ServingProfile,
    default_batched_tokens,
    product_for_label,
)
from joulepool.core.queueing import conditional_wait_s, wait_probability
from joulepool.core.routing import steady_batch, steady_request_energy_j


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
    #: the class's prompt-length distribution (the simulator's trace; an InferencePool's
    #: declared ``inputTokenQuantiles`` or its node agents' observed prompts, the longer
    #: of the two); None (only the mean is known): the serving point's mean-prompt TTFT
    #: bound alone
    prompt_tokens: PromptLengths | None = None
    #: classes with the same key may share instances (one model served under the same
    #: names; docs/planner.md, "Shared instances"); None: instances of its own only
    share_key: str | None = None


#: (class index, mode) -> the profile serving that class on that mode, or None: not allowed
ProfileLookup = Callable[[int, Mode], ServingProfile | None]
#: (class name, mode name) -> instances of that mode serving that class: one pool, whose
#: prefills queue as one M/G/n queue behind a soonest-start router (absent: 1)
PoolSizes = Mapping[tuple[str, str], int]


@dataclass(frozen=True)
class BuiltProblem:
    problem: PlanProblem
    #: mode name -> per class: the serving point behind P and L (None: not allowed)
    serving: Mapping[str, tuple[ServingPoint | None, ...]]


def judged_by_prompts(profile: ServingProfile, cls: ServiceClass) -> bool:
    """Whether ``cls``'s TTFT on ``profile`` is judged by its prompt lengths alone: it has
    them, and its MEAN prompt's prefill exceeds the TTFT (FREESH's rule would make the mode
    not eligible, although with heavy-tailed prompts most of the class may prefill in
    time; docs/planner.md, "Prompt-length tail")."""
    return (cls.prompt_tokens is not None
            and cls.ttft_s < float(profile.prefill_s(cls.mean_input_tokens)))


def serving_point(profile: ServingProfile, cls: ServiceClass,
                  headroom: Headroom | None, pool_size: int = 1) -> ServingPoint:
    """One instance of ``profile`` serving ``cls``, one of ``pool_size`` such instances
    (their prefills one M/G/n queue); a class with no output serves nothing.

    At the class's mean prompt and output (:meth:`ServingProfile.serving_point`); where
    :func:`judged_by_prompts`, without the mean prompt's TTFT bounds, which
    :func:`build_problem` then takes from the class's prompts (:func:`_fit_prompt_tail`).
    A class without prompt lengths keeps FREESH's mean-prompt eligibility rule.
    """
    if cls.mean_output_tokens <= 0:
        return ServingPoint(0.0, float(profile.power_w(1)), 0.0, 0.0, 0.0, 0.0, 0.0, 1.0,
                            "no requests in the class")
    return profile.serving_point(cls.mean_input_tokens, cls.mean_output_tokens, cls.ttft_s,
                                 cls.tpot_s, headroom=headroom,
                                 ttft_from_mean=not judged_by_prompts(profile, cls),
                                 pool_size=pool_size)


def prompt_prefill_s(profile: ServingProfile, prompts: PromptLengths,
                     batch: float) -> npt.NDArray[np.float64]:
    """Seconds each prompt point's own prefill takes on one instance of ``profile`` with
    ``batch`` requests decoding (:func:`joulepool.core.batching.prefill_time_s`, chunked
    under the product's default token budget)."""
    budget = float(default_batched_tokens(profile.product))
    decode_s = float(profile.itl_s(max(batch, 1.0)))
    per_token = float(profile.prefill_s(1.0))
    return prefill_times_s(budget, batch, prompts.array(), decode_s, per_token)


def prompt_tail_miss(service_s: npt.ArrayLike, ttft_s: float, rate_rps: float,
                     pool_size: int = 1) -> float:
    """Share of a class's requests whose TTFT exceeds ``ttft_s`` at ``rate_rps`` req/s
    per instance, on one of ``pool_size`` instances behind a soonest-start router.

    ``service_s`` are the prefill times of equally likely prompts (:func:`prompt_prefill_s`).
    The serving model's M/G/1 prefill queue (``ServingProfile.serving_point``) with the
    class's own prompts: utilisation rho = rate E[S]; a request waits with probability
    rho, and then for an exponential time of mean E[S^2] / (2 E[S] (1 - rho)) (the
    Pollaczek-Khinchine mean wait over rho). A request whose own prefill S_i reaches
    the TTFT misses whatever the wait; otherwise it misses with
    rho exp(-(T - S_i) / that mean). 1.0 when rho >= 1. A pool of n instances is one
    M/G/n queue (:mod:`joulepool.core.queueing`): a request waits with probability
    C(n, n rho), and then for an exponential time n times shorter.
    """
    return PromptTailMiss(service_s, ttft_s, pool_size)(rate_rps)


#: the first two moments of a prefill queue's service time, (E[S] s, E[S^2] s^2)
QueueMoments = tuple[float, float]


def queue_moments(parts: Sequence[tuple[float, npt.ArrayLike]]) -> QueueMoments:
    """(E[S], E[S^2]) of a prefill queue fed by several streams: ``parts`` are (weight,
    prefill times of equally likely prompts) per stream, the weights their arrival rates
    (any scale); a mixture, so each moment is the weighted mean of the streams'. ValueError
    when no weight is positive."""
    total = math.fsum(max(float(w), 0.0) for w, _ in parts)
    if not total > 0.0:
        raise ValueError("a queue needs a stream with a positive rate")
    m1 = m2 = 0.0
    for w, service in parts:
        s = np.asarray(service, dtype=np.float64)
        share = max(float(w), 0.0) / total
        m1 += share * float(s.mean())
        m2 += share * float((s * s).mean())
    return m1, m2


class PromptTailMiss:
    """:func:`prompt_tail_miss` of one class on one mode as a function of the rate
    (req/s): what does not depend on the rate (E[S], E[S^2], each prompt's slack) is
    computed once, so the planner's search for the largest rate within the miss budget
    pays only the rate's part per evaluation. The same operations as before on the
    same values, so the same shares bit for bit.

    ``queue``: the moments of the prefill queue the class's prompts wait in when it is
    not the class's alone (:func:`queue_moments`: a shared instance's prefills hold its
    share group's prompts); the rate is then the whole queue's (req/s of the mixture per
    instance), while each prompt's slack is still its own class's TTFT less its own
    prefill. None: the class's own prompts make the queue."""

    def __init__(self, service_s: npt.ArrayLike, ttft_s: float, pool_size: int = 1,
                 queue: QueueMoments | None = None) -> None:
        if int(pool_size) < 1:
            raise ValueError("pool_size must be at least 1")
        self._pool = int(pool_size)
        s = np.asarray(service_s, dtype=np.float64)
        self._own = s >= ttft_s
        self._mean_s = float(s.mean())
        self._own_share = float(self._own.mean())
        self._mean_s2 = float((s * s).mean())
        if queue is not None:
            self._mean_s, self._mean_s2 = float(queue[0]), float(queue[1])
        self._slack = np.where(self._own, 0.0, ttft_s - s)

    def __call__(self, rate_rps: float) -> float:
        """The share of requests missing the TTFT at ``rate_rps`` req/s, 0..1."""
        rho = rate_rps * self._mean_s
        if rho >= 1.0:
            return 1.0
        if rho <= 0.0 or self._mean_s <= 0.0:
            return self._own_share
        if self._pool == 1:  # M/G/1, operation for operation as before
            wait_mean = self._mean_s2 / (2.0 * self._mean_s * (1.0 - rho))
            tail = np.where(self._own, 1.0, rho * np.exp(-self._slack / wait_mean))
            return float(tail.mean())
        scv = self._mean_s2 / (self._mean_s * self._mean_s) - 1.0
        wait_mean = conditional_wait_s(self._pool, rho, self._mean_s, scv)
        waits = wait_probability(self._pool, rho)
        tail = np.where(self._own, 1.0, waits * np.exp(-self._slack / wait_mean))
        return float(tail.mean())


def _tail_rate(service_s: npt.NDArray[np.float64], ttft_s: float, budget: float,
               max_rps: float, pool_size: int = 1, queue: QueueMoments | None = None
               ) -> float:
    """The largest rate <= ``max_rps`` at which :func:`prompt_tail_miss` <= ``budget``
    (it grows with the rate); 0 when even an idle instance misses more. ``queue``:
    :class:`PromptTailMiss`'s (the rate is then the whole queue's)."""
    miss = PromptTailMiss(service_s, ttft_s, pool_size, queue)
    if miss(0.0) > budget:
        return 0.0
    if miss(max_rps) <= budget:
        return max_rps
    lo, hi = 0.0, max_rps
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if miss(mid) <= budget else (lo, mid)
        if hi - lo <= 1e-7 * hi:
            break
    return lo


def _prompt_service(cls: ServiceClass, points: Mapping[int, tuple[ServingProfile, ServingPoint]]
                    ) -> dict[int, npt.NDArray[np.float64]]:
    """Per mode index that may serve ``cls``: the prefill time of each of its prompt
    points (:func:`prompt_prefill_s` at the serving point's batch); empty without prompt
    lengths."""
    prompts = cls.prompt_tokens
    if prompts is None:
        return {}
    return {m: prompt_prefill_s(prof, prompts, sp.batch) for m, (prof, sp) in points.items()
            if sp.rps > 0}


def _tail_budget(cls: ServiceClass, service: Mapping[int, npt.NDArray[np.float64]],
                 headroom: Headroom | None) -> float:
    """The share of ``cls``'s requests that may miss the TTFT on a mode: the headroom's
    TTFT miss budget beyond those whose own prefill misses it on the class's fastest mode
    (:func:`_fit_prompt_tail`)."""
    hr = headroom or DEFAULT_HEADROOM
    unavoidable = min(prompt_tail_miss(s, cls.ttft_s, 0.0) for s in service.values())
    return hr.ttft_miss.value + unavoidable


def shared_ttft(classes: Sequence[ServiceClass], modes: Sequence[Mode],
                capacity_rps: npt.NDArray[np.float64],
                service: Sequence[Mapping[int, npt.NDArray[np.float64]]],
                headroom: Headroom | None, pool_sizes: PoolSizes | None = None
                ) -> npt.NDArray[np.float64]:
    """[R, R, M] the planner's ``shared_ttft_rps``: req/s of class r' alone on a shared
    instance of mode m at which class r keeps its TTFT miss budget.

    A shared instance prefills the prompts of every class it serves in one queue, so a
    class with short prompts and a tight TTFT waits behind its guests' long prompts: its
    own L[r, m] (sized on its own prompts) overstates what it keeps on time there, and
    the shared row sum_r f[r] / L[r, m] <= y cannot see it. For two classes r != r' of
    one share group that mode m may serve (``capacity_rps`` > 0) and whose prompt
    prefill times ``service[r][m]`` are known, the entry is the largest rate of r''s
    stream alone in the queue (:func:`queue_moments` of its prompts) at which r's own
    prompts, each with its own slack T_r - S_i, miss at most r's budget
    (:class:`PromptTailMiss`, at r's pool size). inf elsewhere (no bound: the diagonal,
    a class without prompt lengths, another group). Where it is below L[r', m] the
    planner keeps r off the group's shared instances of m: the router sends r' there
    as it sends it to its own instances, up to about L[r', m], whatever flow the plan
    meant for it (docs/experiments/simulator.md, "Why the held-out cells fail").
    """
    R, M = len(classes), len(modes)
    out = np.full((R, R, M), np.inf)
    sizes = pool_sizes or {}
    for m, mode in enumerate(modes):
        for r, cls in enumerate(classes):
            if capacity_rps[r, m] <= 0 or cls.share_key is None or m not in service[r]:
                continue
            budget = _tail_budget(cls, service[r], headroom)
            pool = max(int(sizes.get((cls.name, mode.name), 1)), 1)
            for g, guest in enumerate(classes):
                if (g == r or guest.share_key != cls.share_key or capacity_rps[g, m] <= 0
                        or m not in service[g]):
                    continue
                queue = queue_moments([(1.0, service[g][m])])
                rate = _tail_rate(service[r][m], cls.ttft_s, budget, 1.0 / queue[0], pool,
                                  queue)
                out[r, g, m] = max(rate, 1e-9)  # (> 0 wherever L[r, m] > 0: idle fits)
    return out


def _fit_prompt_tail(cls: ServiceClass, points: dict[int, tuple[ServingProfile, ServingPoint]],
                     headroom: Headroom | None,
                     pools: Mapping[int, int] | None = None) -> dict[int, ServingPoint]:
    """Serving points of one class capped by its prompt tail, per mode index.

    The TTFT miss budget (``Headroom.ttft_miss``) is spent on the prompts that could
    meet the TTFT: those whose own prefill exceeds it on the class's fastest mode
    miss on every mode and are not charged to any, so a class with prompts too long
    for every mode keeps its best modes. A mode whose idle share of misses beyond that
    exceeds the budget is not eligible (rate 0); otherwise its rate is at most the
    largest at which its misses beyond it stay within the budget. A class without
    measured prompt lengths keeps its serving points. A point :func:`judged_by_prompts`
    (no TTFT bound of its own) reports the prompts' predicted miss share as its
    ``ttft_miss``. ``pools``: instances in the pool of each mode index (absent: 1).
    """
    size = pools or {}
    service = _prompt_service(cls, points)
    if not service:
        return {m: sp for m, (_, sp) in points.items()}
    budget = _tail_budget(cls, service, headroom)
    out: dict[int, ServingPoint] = {}
    for m, (prof, sp) in points.items():
        if m not in service:
            out[m] = sp
            continue
        n = size.get(m, 1)
        rate = _tail_rate(service[m], cls.ttft_s, budget, sp.rps, n)
        if rate >= sp.rps:
            # a point judged by the prompts has no prefill-wait miss of its own: add theirs
            out[m] = (replace(sp, ttft_miss=sp.ttft_miss + prompt_tail_miss(
                service[m], cls.ttft_s, sp.rps, n)) if judged_by_prompts(prof, cls) else sp)
        elif rate <= 0.0:
            share = prompt_tail_miss(service[m], cls.ttft_s, 0.0)
            out[m] = replace(sp, rps=0.0, binding=(
                f"prompt tail: {100 * share:.1f} % of prompts cannot prefill within TTFT"))
        else:
            out[m] = replace(sp, rps=rate, ttft_miss=prompt_tail_miss(
                service[m], cls.ttft_s, rate, n), binding="ttft (prompt tail)")
    return out


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
    pool_sizes: PoolSizes | None = None,
    **solver: Any,
) -> BuiltProblem:
    """The planner's problem; ``solver``: PlanProblem's ``time_limit_s`` / ``mip_rel_gap``.

    Nodes without GPUs are left out. Every forecast must have the same number of steps.
    ``pool_sizes``: the pool each (class, mode) is sized as (:data:`PoolSizes`; absent or
    None: one instance, FREESH's per-instance rates): L[r, m] and P[r, m] are then those
    of one instance of a pool of that many (docs/planner.md, "Pool-level TTFT";
    :func:`joulepool.core.sizing.solve_pooled` finds the sizes).
    """
    sizes = pool_sizes or {}
    steps = {len(c.forecast_rps) for c in classes}
    if len(steps) > 1:
        raise ValueError(f"forecasts of different lengths: {sorted(steps)}")
    R, M = len(classes), len(modes)
    power = np.zeros((R, M))
    capacity = np.zeros((R, M))
    idle = np.zeros(M)
    wake = np.zeros((R, M))
    serving: dict[str, list[ServingPoint | None]] = {m.name: [None] * R for m in modes}
    service: list[dict[int, npt.NDArray[np.float64]]] = []
    profiles: list[list[ServingProfile | None]] = [[None] * R for _ in modes]  # [m][r]
    for r, cls in enumerate(classes):
        points = {}
        pools = {m: max(int(sizes.get((cls.name, mode.name), 1)), 1)
                 for m, mode in enumerate(modes)}
        for m, mode in enumerate(modes):
            profile = profile_for(r, mode)
            if profile is not None:
                points[m] = (profile, serving_point(profile, cls, headroom, pools[m]))
                idle[m] = profile.idle_w  # the product's idle draw x GPUs: any model's
                profiles[m][r] = profile
        fitted = _fit_prompt_tail(cls, points, headroom, pools)
        service.append(_prompt_service(cls, {m: (prof, fitted[m])
                                             for m, (prof, _) in points.items()}))
        for m, sp in fitted.items():
            serving[modes[m].name][r] = sp
            power[r, m], capacity[r, m] = sp.power_w, sp.rps
    for m, mode in enumerate(modes):
        batches = shared_batches(classes, serving[mode.name], profiles[m])
        for r, cls in enumerate(classes):
            profile = profiles[m][r]
            if profile is not None:
                wake[r, m] = steady_request_energy_j(profile, cls.mean_input_tokens,
                                                     cls.mean_output_tokens, batches[r])
    shared = (shared_ttft(classes, modes, capacity, service, headroom, sizes)
              if any(c.share_key is not None for c in classes) else None)
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
        share_group=_share_groups(classes),
        idle_power_w=idle,
        wake_j_per_request=wake,
        shared_ttft_rps=shared,
        **solver,
    )
    return BuiltProblem(problem, {k: tuple(v) for k, v in serving.items()})


def shared_batches(classes: Sequence[ServiceClass], points: Sequence[ServingPoint | None],
                   profiles: Sequence[ServingProfile | None]) -> list[float]:
    """Per class, the decode batch its requests join on a shared instance of one mode:
    the steady batch (:func:`~joulepool.core.routing.steady_batch`) of the decode tokens
    its share group leaves to shared instances, at most the class's own mean batch at its
    sustainable rate (``points[r].batch``: so a shared instance filled to L[r, m] costs
    about FREESH's P[r, m], never much less), at least 1. What a class leaves is its mean
    forecast less the whole instances of its own it would fill at L[r, m] (its rate modulo
    L[r, m]: the shared instances carry what is left over, docs/planner.md), times its
    tokens decoded after the first, summed over the group's classes that may use the mode
    and spread evenly over the fewest instances that hold it (sum of left / L[r, m],
    rounded up).
    A class that shares with no other (``share_key`` None) or may not use the mode: 1, the
    wake price (docs/planner.md, "Shared instances")."""
    tokens: dict[str, float] = {}  # decode tokens/s the group leaves to shared instances
    load: dict[str, float] = {}  # the same in instances, each class's at its L[r, m]
    for r, cls in enumerate(classes):
        sp = points[r]
        if cls.share_key is None or sp is None or sp.rps <= 0:
            continue
        left = math.fmod(float(np.mean(cls.forecast_rps)), sp.rps)
        key = cls.share_key
        tokens[key] = tokens.get(key, 0.0) + left * max(cls.mean_output_tokens - 1.0, 0.0)
        load[key] = load.get(key, 0.0) + left / sp.rps
    out = []
    for r, cls in enumerate(classes):
        sp, profile = points[r], profiles[r]
        if cls.share_key is None or sp is None or sp.rps <= 0 or profile is None:
            out.append(1.0)
            continue
        # spread over the fewest shared instances that hold it
        instances = max(1.0, math.ceil(load[cls.share_key] - 1e-9))
        batch = steady_batch(profile, tokens[cls.share_key] / instances)
        out.append(max(1.0, min(batch, sp.batch)))
    return out


def _share_groups(classes: Sequence[ServiceClass]) -> tuple[str, ...] | None:
    """The planner's share groups: a class's ``share_key``, or a group of its own; None
    when no class may share (FREESH's per-class formulation)."""
    if all(c.share_key is None for c in classes):
        return None
    return tuple(f"key:{c.share_key}" if c.share_key is not None else f"class:{c.name}"
                 for c in classes)
