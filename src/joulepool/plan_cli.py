"""``joulepool plan``: plan InferencePools on a cluster file, without Kubernetes."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from joulepool.api.models import EnergyPolicySpec, InferencePool
    from joulepool.core.classes import PromptLengths


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--filename", required=True, action="append",
                        help="YAML with InferencePools (and optionally an EnergyPolicy and "
                             "GPUProfiles); repeatable")
    parser.add_argument("--cluster", help="cluster YAML (default: the bundled example cluster)")
    parser.add_argument("-o", "--output", choices=["table", "json"], default="table")
    parser.add_argument("--gie-pools", action="store_true",
                        help="plan as the operator does when it manages Gateway API Inference "
                             "Extension InferencePools for the pools (its --epp-service is "
                             "set and GIE's CRD is installed): no pool is served on another "
                             "pool's instances, whatever the EnergyPolicy's shareInstances")


def _default_cluster() -> Path:
    return Path(str(resources.files("joulepool") / "examples" / "cluster.yaml"))


def _without_live_carbon(policy: EnergyPolicySpec) -> EnergyPolicySpec:
    """``joulepool plan`` fetches no live carbon source: each plans as the operator does
    before its first fetch (fallbackGramsPerKWh, else the dirtiest known site); says so."""
    import sys

    from joulepool.carbon import CarbonFeed

    if not any(c.source is not None for c in policy.carbon):
        return policy
    resolved = CarbonFeed().resolve(policy, datetime.now(UTC).timestamp())
    for s in resolved.statuses:
        how = (f"fallback {s.grams_per_kwh:g} gCO2/kWh" if s.using_fallback
               else "the dirtiest known site's intensity")
        print(f"joulepool plan: site {s.site}: live carbon source ({s.provider}) not fetched; "
              f"planned with {how}", file=sys.stderr)
    return resolved.policy


def _observed_prompts(pools: Sequence[InferencePool], now: datetime
                      ) -> dict[str, PromptLengths]:
    """The prompt lengths the pools' ``status.observedInputTokens`` report at ``now``
    (pooling.observed_from_statuses, the operator's rule: the longer of these and the
    declared quantiles is planned); says on stderr which pools' entries are not used
    (older than pooling.OBSERVED_MAX_AGE_S or too few prompts)."""
    import sys

    from joulepool.api.plan import pool_key
    from joulepool.pooling import MIN_OBSERVED_PROMPTS, OBSERVED_MAX_AGE_S, observed_from_statuses

    observed = observed_from_statuses(pools, now)
    for p in pools:
        key = pool_key(p.metadata.namespace or "default", p.metadata.name)
        if p.status is not None and p.status.observed_input_tokens and key not in observed:
            print(f"joulepool plan: pool {key}: status.observedInputTokens not used (entries "
                  f"older than {OBSERVED_MAX_AGE_S:g} s or fewer than "
                  f"{MIN_OBSERVED_PROMPTS} prompts), as the operator would not",
                  file=sys.stderr)
    return observed


def run(args: argparse.Namespace) -> int:
    from joulepool.api.cluster import load_cluster
    from joulepool.api.load import ResourceError, load_manifests, profile_from_resource
    from joulepool.api.models import EnergyPolicy, EnergyPolicySpec, GPUProfile, InferencePool
    from joulepool.cli import UsageError
    from joulepool.core.profiles import DEFAULT_PROFILES
    from joulepool.pooling import nodes_from_cluster, plan_pools, sharing_policy

    try:
        resources_ = [r for f in args.filename for r in load_manifests(f)]
        cluster = load_cluster(args.cluster or _default_cluster())
    except ResourceError as exc:
        raise UsageError(str(exc)) from None
    pools = [r for r in resources_ if isinstance(r, InferencePool)]
    if not pools:
        raise UsageError(f"{', '.join(args.filename)}: no InferencePool found")
    policies = [r for r in resources_ if isinstance(r, EnergyPolicy)]
    policy = policies[0].spec if policies else EnergyPolicySpec()
    if not policy.carbon and cluster.carbon:
        policy = policy.model_copy(update={"carbon": cluster.carbon})
    policy = _without_live_carbon(policy)
    policy, withheld = sharing_policy(policy, args.gie_pools)
    sharing_note = ("instances are not shared between pools (--gie-pools: a GIE "
                    "InferencePool's selector reaches only its own pool's pods), although "
                    "the EnergyPolicy says shareInstances: true" if withheld else "")
    profiles = (*DEFAULT_PROFILES,
                *(profile_from_resource(r) for r in resources_ if isinstance(r, GPUProfile)))
    observed = _observed_prompts(pools, now=datetime.now(UTC))
    plan = plan_pools(pools, nodes_from_cluster(cluster.expanded()), policy, profiles,
                      observed=observed)
    if args.output == "json":
        print(json.dumps({
            "feasible": plan.result.feasible,
            "status": plan.result.status,
            "objective": plan.objective,
            "objectiveValue": plan.result.objective,
            "solveSeconds": plan.result.solve_time_s,
            "binding": list(plan.result.binding),
            "headroom": plan.headroom_note or None,
            "shareInstances": policy.share_instances,
            "plan": json.loads(plan.document.to_json()),
        }, indent=2))
    else:
        print(render_table(plan))
        if sharing_note:
            print(f"\nnote: {sharing_note}")
    return 0 if plan.result.feasible else 1


def render_table(plan: object) -> str:
    from joulepool.pooling import PoolPlan

    assert isinstance(plan, PoolPlan)
    res = plan.result
    unit = "gCO2" if plan.objective == "carbon" else "J"
    lines = [
        f"plan: {res.status}, objective {plan.objective} = {res.objective:.4g} {unit} per window, "
        f"solved in {res.solve_time_s * 1e3:.0f} ms",
        "",
        f"{'POOL':<28} {'REPLICAS':>8} {'POWER W':>9} {'J/TOKEN':>8} {'gCO2/h':>8}  PLACEMENT",
    ]
    for key, out in plan.outcomes.items():
        where = ", ".join(f"{a.instances} x {a.mode} on {a.node}" for a in out.assignments) or "-"
        jpt = f"{out.joules_per_token:.3f}" if out.joules_per_token is not None else "-"
        co2 = f"{out.grams_co2_per_hour:.0f}" if out.grams_co2_per_hour is not None else "-"
        lines.append(
            f"{key:<28} {out.replicas:>8} {out.expected_power_w:>9.0f} {jpt:>8} {co2:>8}  {where}"
        )
    if plan.headroom_note:
        lines += ["", f"note: {plan.headroom_note}"]
    if not res.feasible:
        lines += ["", "cannot be met:"]
        lines += [f"  {k}: {o.message}" for k, o in plan.outcomes.items() if not o.planned]
        lines += [f"  {b}" for b in res.binding]
    lines += ["", "capacity used (site/product: used/total GPUs):"]
    lines += [f"  {s}/{p}: {u}/{t}" for (s, p), (u, t) in sorted(res.capacity.items())]
    return "\n".join(lines)
