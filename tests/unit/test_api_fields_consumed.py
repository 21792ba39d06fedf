"""Every spec field of joulepool's resources is described and read by what it configures.

``CONSUMERS`` names, per field, the modules that promise to read it; the test walks the
models (so a new field without an entry fails) and checks that a promised module
reads the attribute. Behaviour tests of the fields that were once read by nothing:
``test_energy_policy_router`` (spec.pi, bulkLambdaFactor -> router),
``test_nodeagent_agent::test_energy_policy_miad_period_sets_the_control_period``
(miad.periodSeconds -> node agent), ``test_operator_resources::
test_pool_port_reaches_the_router_through_the_pod_annotation`` (spec.port),
``test_operator_resources::test_served_model_names_reach_the_engine_args_and_the_plan``
and ``tests/integration/test_router_served_names.py`` (spec.servedModelNames).
"""

from __future__ import annotations

import re
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel

import joulepool
from joulepool.api import models

SRC = Path(joulepool.__file__).parent
POOLING = ("pooling.py",)
PROFILES = ("api/load.py",)
CARBON = ("carbon/feed.py", "carbon/providers.py")
ROUTER = ("kube/pools.py",)
AGENT = ("nodeagent/agent.py",)

#: "Model.field" -> modules (relative to the package), one of which reads ``.field``
CONSUMERS: dict[str, tuple[str, ...]] = {
    # InferencePool: the planner's input (pooling), the Deployments (operator)
    "InferencePoolSpec.model": POOLING, "InferencePoolSpec.tier": POOLING,
    "InferencePoolSpec.slo": POOLING, "InferencePoolSpec.demand": POOLING,
    "InferencePoolSpec.objective": POOLING, "InferencePoolSpec.gpu_products": POOLING,
    "InferencePoolSpec.port": ("operator/resources.py",),
    "InferencePoolSpec.served_model_names": ("pooling.py", "operator/resources.py"),
    "InferencePoolSpec.template": ("operator/resources.py",),
    "SLOSpec.ttft_seconds": ("api/models.py",), "SLOSpec.tpot_seconds": ("api/models.py",),
    "SLOSpec.deadline_seconds": ("api/models.py", "pooling.py"),
    "DemandSpec.requests_per_second": ("api/models.py",),
    "DemandSpec.mean_input_tokens": POOLING, "DemandSpec.mean_output_tokens": POOLING,
    "DemandSpec.series": ("api/models.py",), "DemandSpec.step_seconds": POOLING,
    "DemandSpec.input_token_quantiles": ("api/models.py",),
    "TokenQuantile.quantile": ("api/models.py",), "TokenQuantile.tokens": ("api/models.py",),
    # GPUProfile: turned into core ServingProfiles
    **{f"GPUProfileSpec.{f}": PROFILES for f in (
        "product", "model", "gpus", "idle_watts", "batch_points", "max_batch",
        "prefill_tokens_per_second", "clock", "gamma", "beta_decode", "beta_prefill")},
    **{f"BatchPointSpec.{f}": PROFILES for f in (
        "batch", "inter_token_latency_seconds", "power_watts", "source")},
    **{f"ClockSpec.{f}": PROFILES for f in ("min_mhz", "max_mhz", "step_mhz")},
    # EnergyPolicy
    "EnergyPolicySpec.plan_interval_seconds": ("operator/planning.py",),
    "EnergyPolicySpec.objective": POOLING, "EnergyPolicySpec.alpha": POOLING,
    "EnergyPolicySpec.window_steps": POOLING, "EnergyPolicySpec.step_seconds": POOLING,
    "EnergyPolicySpec.mip_rel_gap": POOLING, "EnergyPolicySpec.share_instances": POOLING,
    "EnergyPolicySpec.carbon": ("pooling.py", "carbon/feed.py"),
    "EnergyPolicySpec.pi": ROUTER, "EnergyPolicySpec.bulk_lambda_factor": ROUTER,
    "EnergyPolicySpec.miad": ("nodeagent/plansource.py",),
    **{f"PISpec.{f}": ROUTER for f in ("kp", "ki", "target_miss_rate", "lambda_min",
                                       "lambda_max")},
    **{f"MIADSpec.{f}": AGENT for f in ("k_inc", "step_mhz", "margin", "period_seconds",
                                        "control")},
    "SiteCarbon.site": ("pooling.py", "carbon/feed.py"),
    "SiteCarbon.grams_per_kwh": ("api/models.py",), "SiteCarbon.series": ("api/models.py",),
    "SiteCarbon.source": ("carbon/feed.py",),
    **{f"CarbonSourceSpec.{f}": CARBON for f in (
        "provider", "url", "location", "latitude", "longitude", "config_map", "query", "unit",
        "signal", "token_secret_ref", "refresh_seconds", "stale_after_seconds",
        "fallback_grams_per_kwh", "timeout_seconds")},
    **{f"ConfigMapRef.{f}": CARBON for f in ("name", "namespace", "key")},
    **{f"SecretKeyRef.{f}": CARBON for f in ("name", "namespace")},
}


def _sub_models(annotation: object) -> typing.Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in typing.get_args(annotation):
        yield from _sub_models(arg)


def _spec_fields() -> list[tuple[type[BaseModel], str]]:
    """(model, field) of every spec model, reached from the resources' ``spec``."""
    out: list[tuple[type[BaseModel], str]] = []
    seen: set[type[BaseModel]] = set()

    def walk(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, field in model.model_fields.items():
            out.append((model, name))
            for sub in _sub_models(field.annotation):
                walk(sub)

    for resource in models.RESOURCES.values():
        for sub in _sub_models(resource.model_fields["spec"].annotation):
            walk(sub)
    return out


def test_every_spec_field_is_read_by_its_consumer() -> None:
    unread, unlisted = [], []
    for model, name in _spec_fields():
        key = f"{model.__name__}.{name}"
        if key not in CONSUMERS:
            unlisted.append(key)
            continue
        pattern = re.compile(rf"\.{name}\b")
        if not any(pattern.search((SRC / m).read_text()) for m in CONSUMERS[key]):
            unread.append(f"{key} in {' or '.join(CONSUMERS[key])}")
    assert not unlisted, f"spec fields with no consumer listed: {unlisted}"
    assert not unread, f"spec fields their consumer does not read: {unread}"
    stale = set(CONSUMERS) - {f"{m.__name__}.{n}" for m, n in _spec_fields()}
    assert not stale, f"CONSUMERS lists fields that no longer exist: {sorted(stale)}"


def test_every_model_field_has_a_description() -> None:
    missing = []
    seen: set[type[BaseModel]] = set()

    def walk(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, field in model.model_fields.items():
            if not field.description:
                missing.append(f"{model.__name__}.{name}")
            for sub in _sub_models(field.annotation):
                walk(sub)

    for resource in models.RESOURCES.values():
        walk(resource)
    assert not missing


def _properties(node: dict[str, typing.Any], path: str) -> typing.Iterator[tuple[str, dict]]:
    for name, sub in (node.get("properties") or {}).items():
        yield f"{path}.{name}", sub
        yield from _properties(sub, f"{path}.{name}")
        if "items" in sub:
            yield from _properties(sub["items"], f"{path}.{name}[]")


def test_kubectl_explain_has_a_description_for_every_crd_field() -> None:
    """What `kubectl explain` prints: every property of the committed CRDs is described."""
    root = Path(__file__).resolve().parents[2]
    count = 0
    for path in sorted((root / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        assert schema.get("description"), path.name
        for where, prop in _properties(schema, crd["spec"]["names"]["shortNames"][0]):
            if where.endswith(".metadata") and where.count(".") == 1:
                assert prop == {"type": "object"}  # the API server forbids anything else
                continue
            assert prop.get("description"), where
            count += 1
    assert count >= 100
    slo = yaml.safe_load((root / "crds/inferencepools.joulepool.dev.yaml").read_text())
    slo_props = slo["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"][
        "spec"]["properties"]["slo"]["properties"]
    assert "seconds" in slo_props["ttftSeconds"]["description"]  # the unit is stated
