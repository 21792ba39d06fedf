"""From resources to a plan and back: the one translation the CLI and the operator share.

``plan_pools`` turns InferencePools, GPU nodes, an EnergyPolicy and serving
profiles into a core :class:`~joulepool.core.planner.PlanProblem`, solves it
jointly (so no two pools can book the same GPU) and turns the result into
per-pool outcomes and the plan document the extender and node agents read.

Each pool's L[r, m] is core's sustainable rate *with queueing headroom*
(:meth:`~joulepool.core.profiles.ServingProfile.operating_point` with
:class:`~joulepool.core.profiles.Headroom`) of one instance in a pool of the
size the plan deploys (the router starts each prompt where it starts soonest,
so a pool's prefills queue as one M/G/n queue), sized through
:func:`~joulepool.core.sizing.plan_pooled`, which keeps the full headroom
unless the cluster cannot carry the demand with it (then the plan says how
much it kept). The demand is the pool's forecast as given, times
the EnergyPolicy's alpha: give the step's peak rate (e.g. its busiest
minute), not its mean, as the simulator's planner does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

# re-exported: an agent's entry older than this is ignored (api.models, the contract)
from joulepool.api.models import OBSERVED_MAX_AGE_S as OBSERVED_MAX_AGE_S
from joulepool.api.models import (
    AssignmentStatus,
    EnergyPolicySpec,
    InferencePool,
    ObservedPromptLengths,
)
from joulepool.api.plan import (
    PlanDocument,
    PlannedInstance,
    PlannedMix,
    PlannedNode,
    PlannedPool,
    PlannedSLO,
    pool_key,
)
from joulepool.core.classes import PromptLengths
from joulepool.core.energy import grams_co2_per_hour, joules_per_token
from joulepool.core.planner import Assignment, Mode, PlanNode, PlanProblem, PlanResult
from joulepool.core.problem import PoolSizes, ServiceClass, node_from_label
from joulepool.core.problem import build_problem as build_core_problem
from joulepool.core.profiles import DEFAULT_PROFILES, Headroom, ServingProfile
from joulepool.core.sizing import plan_pooled


@dataclass(frozen=True)
class PoolOutcome:
    """What the plan means for one pool: its status fields."""

    key: str
    replicas: int
    assignments: tuple[AssignmentStatus, ...]
    expected_power_w: float
    joules_per_token: float | None
    grams_co2_per_hour: float | None
    planned: bool
    message: str
    #: pools whose instances also serve this one (shared instances), and how many
    hosts: tuple[str, ...] = ()
    shared_instances: int = 0


@dataclass(frozen=True)
class PoolPlan:
    result: PlanResult
    document: PlanDocument
    outcomes: dict[str, PoolOutcome] = field(default_factory=dict)
    objective: str = "energy"
    #: empty, or how far the queueing headroom had to be relaxed to fit (core.sizing)
    headroom_note: str = ""
    #: share of the asked-for queueing headroom the plan carries (core.sizing.SizedPlan.scale)
    headroom_scale: float = 1.0


def _modes(profiles: Sequence[ServingProfile], products: set[str]) -> tuple[Mode, ...]:
    seen: dict[str, Mode] = {}
    for p in profiles:
        if p.product.name in products:
            seen.setdefault(p.mode, Mode(p.mode, p.product.name, p.gpus))
    return tuple(sorted(seen.values(), key=lambda m: (m.product, m.gpus)))


def _profile_for(
    profiles: Sequence[ServingProfile], model: str, mode: Mode
) -> ServingProfile | None:
    # user-supplied profiles come last in the sequence and win
    found = None
    for p in profiles:
        if p.model == model and p.product.name == mode.product and p.gpus == mode.gpus:
            found = p
    return found


def _objective(pools: Sequence[InferencePool], policy: EnergyPolicySpec) -> str:
    wanted = {p.spec.objective for p in pools if p.spec.objective}
    return wanted.pop() if len(wanted) == 1 else policy.objective


#: observed prompt lengths count once the node agents' fresh entries hold this many prompts
MIN_OBSERVED_PROMPTS = 200


def observed_prompt_lengths(
    entries: Sequence[ObservedPromptLengths], now: datetime,
    max_age_s: float = OBSERVED_MAX_AGE_S, min_prompts: float = MIN_OBSERVED_PROMPTS,
) -> PromptLengths | None:
    """The prompt lengths the node agents saw a pool's engines serve (its
    ``status.observedInputTokens``): the fresh entries' histograms summed, over the bucket
    layout that counts the most prompts (engines of other versions may bucket
    differently); None with fewer than ``min_prompts`` prompts."""
    groups: dict[tuple[float, ...], list[float]] = {}
    for e in entries:
        t = e.updated_at
        if t is None or (now - (t if t.tzinfo else t.replace(tzinfo=UTC))).total_seconds() \
                > max_age_s:
            continue
        acc = groups.setdefault(tuple(e.bounds), [0.0] * len(e.counts))
        for i, c in enumerate(e.counts):
            acc[i] += c
    if not groups:
        return None
    bounds, counts = max(groups.items(), key=lambda kv: kv[1][-1])
    if counts[-1] < min_prompts:
        return None
    return PromptLengths.from_histogram(bounds, counts)


def observed_from_statuses(pools: Sequence[InferencePool], now: datetime
                           ) -> dict[str, PromptLengths]:
    """Per pool key, :func:`observed_prompt_lengths` of the pool's own
    ``status.observedInputTokens`` at ``now`` (pools without enough fresh prompts left
    out): what ``joulepool plan`` passes as ``observed`` to :func:`plan_pools`, as the
    operator does with the statuses it watches."""
    out: dict[str, PromptLengths] = {}
    for p in pools:
        if p.status is None or not p.status.observed_input_tokens:
            continue
        found = observed_prompt_lengths(p.status.observed_input_tokens, now)
        if found is not None:
            out[pool_key(p.metadata.namespace or "default", p.metadata.name)] = found
    return out


def _service_class(pool: InferencePool, steps: int,
                   observed: PromptLengths | None = None, share: bool = True) -> ServiceClass:
    """The pool as the planner's class; its prompt lengths are the longer, at each
    quantile, of the declared (``inputTokenQuantiles``) and the ``observed`` ones.
    ``share``: the class may share instances with the pools of its :func:`share_key`
    (EnergyPolicy ``shareInstances``); False: instances of its own only."""
    s = pool.spec
    declared = s.demand.prompt_lengths()
    prompts = declared.longer(observed) if declared and observed else declared or observed
    namespace = pool.metadata.namespace or "default"
    return ServiceClass(
        pool_key(namespace, pool.metadata.name),
        s.demand.mean_input_tokens, s.demand.mean_output_tokens,
        s.slo.ttft_seconds, s.slo.tpot_seconds, s.demand.forecast(steps),
        prompt_tokens=prompts, share_key=share_key(pool) if share else None)


def share_key(pool: InferencePool) -> str:
    """Pools with the same key may share instances: one namespace (no engine serves two
    tenants), one model, answering to the same names (an engine is started with one
    pool's ``--served-model-name`` list)."""
    names = "|".join(sorted(pool.spec.served_names()))
    return f"{pool.metadata.namespace or 'default'}/{pool.spec.model}/{names}"


def sharing_policy(policy: EnergyPolicySpec, gie_pools: bool) -> tuple[EnergyPolicySpec, bool]:
    """The EnergyPolicy pools are planned with, and whether its ``shareInstances`` was
    withheld: where the pools are served through GIE InferencePools (``gie_pools``: the
    operator manages them), instances are not shared, since a GIE pool's label selector
    reaches only its own pool's pods and a pool served on another pool's instances would
    have no endpoints behind the gateway. The operator and ``joulepool plan`` both ask
    this (docs/planner.md, "Not shared where the operator manages GIE pools")."""
    withheld = policy.share_instances and gie_pools
    return (policy.model_copy(update={"share_instances": False}) if withheld else policy,
            withheld)


def _carbon(policy: EnergyPolicySpec, nodes: Sequence[PlanNode], objective: str
            ) -> dict[str, list[float]] | None:
    """Intensity per site; a site without data counts as the dirtiest known one."""
    # live sources are resolved to series by joulepool.carbon first (the operator does);
    # one still live here counts as an unknown site
    carbon = {c.site: c.values() for c in policy.carbon if c.source is None} or None
    if objective == "carbon" and carbon is not None:
        worst = max(max(v) for v in carbon.values())
        for site in {n.site for n in nodes} - set(carbon):
            carbon[site] = [worst]  # unknown site: assume the dirtiest known grid
    return carbon


def build_problem(
    pools: Sequence[InferencePool],
    nodes: Sequence[PlanNode],
    policy: EnergyPolicySpec,
    profiles: Sequence[ServingProfile] = DEFAULT_PROFILES,
    headroom: Headroom | None = None,
    observed: Mapping[str, PromptLengths] | None = None,
    pool_sizes: PoolSizes | None = None,
) -> PlanProblem:
    """The joint MILP for every pool over every GPU node (core's one builder).

    P[r, m] and L[r, m] come from core's serving model with ``headroom``
    (default :data:`~joulepool.core.profiles.DEFAULT_HEADROOM`); a pool may use
    the modes of its ``gpuProducts`` that have a profile of its model. ``observed``:
    prompt lengths the node agents saw, by pool key (:func:`observed_prompt_lengths`).
    ``pool_sizes``: each (class, mode)'s L[r, m] is one instance's in a pool of that many
    (:data:`~joulepool.core.problem.PoolSizes`; absent: 1, per instance).
    """
    seen = observed or {}
    modes = _modes(profiles, {n.product for n in nodes})

    def profile_for(r: int, mode: Mode) -> ServingProfile | None:
        allowed = set(pools[r].spec.gpu_products)
        if allowed and mode.product not in allowed:
            return None
        return _profile_for(profiles, pools[r].spec.model, mode)

    objective = _objective(pools, policy)
    carbon = _carbon(policy, nodes, objective)
    if objective == "carbon" and carbon is None:
        objective = "energy"  # no carbon data: energy is the honest proxy
    return build_core_problem(
        [_service_class(p, policy.window_steps,
                        seen.get(pool_key(p.metadata.namespace or "default", p.metadata.name)),
                        share=policy.share_instances)
         for p in pools], modes, nodes, profile_for,
        step_s=policy.step_seconds, alpha=policy.alpha,
        objective="carbon" if objective == "carbon" else "energy",
        carbon_g_per_kwh=carbon, headroom=headroom, mip_rel_gap=policy.mip_rel_gap,
        pool_sizes=pool_sizes,
    ).problem


def plan_pools(
    pools: Sequence[InferencePool],
    nodes: Sequence[PlanNode],
    policy: EnergyPolicySpec,
    profiles: Sequence[ServingProfile] = DEFAULT_PROFILES,
    version: int = 1,
    now: datetime | None = None,
    partial: bool = False,
    observed: Mapping[str, PromptLengths] | None = None,
) -> PoolPlan:
    """Plan every pool jointly and describe the result per pool and per node.

    ``partial``: when the plan is infeasible, describe the planner's best
    partial plan (``result.partial_assignments``) instead of no assignments;
    the document still says ``feasible: false`` and each short pool's outcome
    says what is unmet.  The operator uses it when it has no earlier feasible
    plan to keep serving.
    """
    now = now or datetime.now(UTC)
    # the router sends each prompt to the instance that starts it soonest, so a pool's
    # first tokens queue as one M/G/n queue: L[r, m] at the pool sizes the plan deploys
    sized = plan_pooled(
        lambda hr, sizes: build_problem(pools, nodes, policy, profiles, hr, observed, sizes))
    plan = describe(sized.problem, sized.result, pools, nodes, version, now, partial=partial,
                    headroom_note=sized.note())
    return replace(plan, headroom_scale=sized.scale)


def _carbon_now(problem: PlanProblem, site: str) -> float | None:
    if not problem.carbon_g_per_kwh or site not in problem.carbon_g_per_kwh:
        return None
    return float(problem.carbon_g_per_kwh[site][0])


def _instance_figures(problem: PlanProblem, assignments: Sequence[Assignment],
                      output_tokens: Mapping[str, float]) -> tuple[float, float, float | None]:
    """Planned power (W), output tokens/s and g CO2/h (None: no carbon data at one of
    their sites) of ``assignments``; ``output_tokens``: each class's mean output tokens
    per request. A shared instance's power is that of the load it carries, its tokens
    those of every class it serves, each at its own output length."""
    power = tokens_per_s = 0.0
    co2: float | None = 0.0
    for a in assignments:
        power += a.power_w
        tokens_per_s += sum(a.rps_of(c) * output_tokens[c] for c in a.serves or (a.cls,))
        c = _carbon_now(problem, a.site)
        co2 = None if c is None or co2 is None else co2 + grams_co2_per_hour(a.power_w, c)
    return power, tokens_per_s, co2


def describe(
    problem: PlanProblem,
    result: PlanResult,
    pools: Sequence[InferencePool],
    nodes: Sequence[PlanNode],
    version: int,
    now: datetime,
    partial: bool = False,
    headroom_note: str = "",
) -> PoolPlan:
    """Per-pool outcomes and the plan document for a solved problem (see ``plan_pools``).

    ``headroom_note`` (from :meth:`~joulepool.core.sizing.SizedPlan.note`) is
    added to the document's message and every planned pool's message.
    """
    mode_by_name = {m.name: m for m in problem.modes}
    short = {s.cls: s for s in result.shortfalls}
    doc = PlanDocument(
        version=version, generatedAt=now, objective=problem.objective,
        feasible=result.feasible,
        message="; ".join([*result.binding, *([headroom_note] if headroom_note else [])]),
        nodes={n.name: PlannedNode(site=n.site, product=n.product, gpus=n.gpus) for n in nodes},
    )
    outcomes: dict[str, PoolOutcome] = {}
    output_tokens = {problem.classes[r]: p.spec.demand.mean_output_tokens
                     for r, p in enumerate(pools)}
    for r, pool in enumerate(pools):
        key = problem.classes[r]
        mine = [a for a in (result.plan if partial else result.assignments)
                if a.cls == key and a.instances > 0]
        power, tokens_per_s, co2 = _instance_figures(problem, mine, output_tokens)
        for a in mine:
            node = doc.nodes.get(a.node)
            if node is not None:
                node.pools[key] = node.pools.get(key, 0) + a.gpus
        replicas = sum(a.instances for a in mine)
        gap = short.get(key)
        borrowed = [a for a in (result.plan if partial else result.assignments)
                    if key in a.serves and a.cls != key]
        hosts = sorted({a.cls for a in borrowed})
        message = (
            f"unmet demand {gap.shortfall_rps:.3g} req/s of {gap.demand_rps:.3g} "
            f"at step {gap.step}: {gap.reason}" if gap else f"{replicas} instance(s) planned"
        )
        if hosts and not gap:
            message += f"; also served on instances of {', '.join(hosts)}"
        if headroom_note and mine:
            message += f" ({headroom_note})"
        assignments = tuple(
            AssignmentStatus(site=a.site, node=a.node, gpuProduct=a.product, mode=a.mode,
                             gpus=a.gpus, instances=a.instances)
            for a in mine
        )
        jpt = joules_per_token(power, tokens_per_s) if tokens_per_s > 0 else None
        outcomes[key] = PoolOutcome(
            key=key, replicas=replicas, assignments=assignments, expected_power_w=power,
            joules_per_token=jpt, grams_co2_per_hour=co2 if mine else None,
            planned=gap is None, message=message, hosts=tuple(hosts),
            shared_instances=sum(a.instances for a in borrowed),
        )
        s = pool.spec
        doc.pools[key] = PlannedPool(
            namespace=pool.metadata.namespace or "default", name=pool.metadata.name,
            model=s.model, tier=str(s.tier), servedModelNames=list(s.served_model_names),
            slo=PlannedSLO(ttftSeconds=s.slo.ttft_seconds, tpotSeconds=s.slo.tpot_seconds,
                           deadlineSeconds=s.slo.deadline_seconds),
            replicas=replicas, joulesPerToken=jpt, expectedPowerWatts=power,
            mix=PlannedMix(requestsPerSecond=float(problem.forecast_rps[r].mean()),
                           meanInputTokens=s.demand.mean_input_tokens,
                           meanOutputTokens=s.demand.mean_output_tokens),
            assignments=[
                PlannedInstance(node=a.node, site=a.site, product=a.product, mode=a.mode,
                                instances=a.instances, gpus=a.gpus,
                                gpusPerInstance=mode_by_name[a.mode].gpus,
                                sharedWith=[c for c in a.serves if c != key])
                for a in mine
            ],
        )
    return PoolPlan(result=result, document=doc, outcomes=outcomes, objective=problem.objective,
                    headroom_note=headroom_note)


def outcomes_from_document(doc: PlanDocument) -> dict[str, PoolOutcome]:
    """Per-pool outcomes of a published plan document (an operator restart reads its plan
    in force back from the ConfigMap). Figures are the ones the document carries;
    gCO2/h is not in it and is left unknown (None) until the next plan."""
    out: dict[str, PoolOutcome] = {}
    for key, p in doc.pools.items():
        mine = [a for a in p.assignments if a.instances > 0]
        borrowed = [(host, a) for host, q in doc.pools.items() if host != key
                    for a in q.assignments if key in a.shared_with and a.instances > 0]
        out[key] = PoolOutcome(
            key=key, replicas=sum(a.instances for a in mine),
            assignments=tuple(
                AssignmentStatus(site=a.site, node=a.node, gpuProduct=a.product, mode=a.mode,
                                 gpus=a.gpus, instances=a.instances)
                for a in mine),
            expected_power_w=float(p.expected_power_watts or 0.0),
            joules_per_token=p.joules_per_token, grams_co2_per_hour=None,
            planned=doc.feasible,
            message=f"{sum(a.instances for a in mine)} instance(s) planned",
            hosts=tuple(sorted({h for h, _ in borrowed})),
            shared_instances=sum(a.instances for _, a in borrowed),
        )
    return out


def nodes_from_cluster(expanded: Sequence[tuple[str, str, str, int]]) -> list[PlanNode]:
    """The nodes of a cluster file (``ClusterSpec.expanded()``), products from their labels."""
    return [node_from_label(n, site, product, gpus) for n, site, product, gpus in expanded]


def by_key(pools: Sequence[InferencePool]) -> Mapping[str, InferencePool]:
    return {pool_key(p.metadata.namespace or "default", p.metadata.name): p for p in pools}
