"""pydantic v2 models of joulepool's custom resources (group joulepool.dev, v1alpha1).

These models are the single source of truth: ``joulepool crds`` generates the
CRD OpenAPI schemas from them, and the operator, extender and CLI validate
with them, so a field means the same thing everywhere.
"""

from __future__ import annotations

import itertools
import math
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    model_validator,
)

# the API group and version are part of the contract; re-exported for the models' users
from joulepool.api.contract import API_VERSION as API_VERSION
from joulepool.api.contract import GROUP as GROUP
from joulepool.api.contract import VERSION as VERSION
from joulepool.core.classes import (
    PLAN_ALPHA,
    PLAN_INTERVAL_S,
    PLAN_STEP_S,
    PLAN_WINDOW_STEPS,
    SLO,
    PromptLengths,
    Tier,
)
from joulepool.core.controllers import MIAD_PERIOD_S, MIADController, PIController
from joulepool.core.cost import BULK_LAMBDA_FACTOR
from joulepool.core.planner import DEFAULT_MIP_REL_GAP
from joulepool.core.profiles import DEFAULT_BETA_DECODE, DEFAULT_BETA_PREFILL, DEFAULT_GAMMA

Objective = Literal["energy", "carbon"]


class _Model(BaseModel):
    """camelCase on the wire, snake_case in Python, unknown fields rejected."""

    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, alias_generator=None, frozen=False
    )


class ObjectMeta(BaseModel):
    """The parts of metadata joulepool reads; the rest passes through."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str = Field(min_length=1, max_length=253, description="object name")
    namespace: str | None = Field(default=None, description="object namespace")
    generation: int | None = Field(default=None, description="spec generation (API server)")
    labels: dict[str, str] = Field(default_factory=dict, description="object labels")
    annotations: dict[str, str] = Field(default_factory=dict,
                                        description="object annotations")
    uid: str | None = Field(default=None, description="object UID (API server)")


# --------------------------------------------------------------------------
# InferencePool
# --------------------------------------------------------------------------
class SLOSpec(_Model):
    """Latency targets of the pool's requests."""

    ttft_seconds: float = Field(
        alias="ttftSeconds", gt=0, le=600,
        description=("time-to-first-token target, seconds: the planner sizes replicas so "
                     "queueing plus prefill stay under it; the node agent's MIAD raises the "
                     "clock when the engines' tail TTFT nears it"))
    tpot_seconds: float = Field(
        alias="tpotSeconds", gt=0, le=60,
        description=("time-per-output-token (inter-token latency) target, seconds: bounds "
                     "the batch each GPU mode may run (planner) and the clock (MIAD)"))
    deadline_seconds: float | None = Field(
        default=None, alias="deadlineSeconds", gt=0, le=86400,
        description=("end-to-end deadline of a request, seconds, used by the router's "
                     "JouleSched cost and the deadline-miss rate its PI controller tracks; "
                     "default k*(TTFT + outputTokens*TPOT) per request"),
    )

    def to_core(self) -> SLO:
        return SLO(self.ttft_seconds, self.tpot_seconds, self.deadline_seconds)


class TokenQuantile(_Model):
    """One point of a prompt-length distribution."""

    quantile: float = Field(
        gt=0, le=1, description="probability, e.g. 0.99: 99 % of prompts are at most tokens")
    tokens: float = Field(gt=0, le=1e6, description="prompt length at that quantile, tokens")


#: the API server's check of inputTokenQuantiles (pydantic's in DemandSpec says the same)
_QUANTILE_RULES: list[JsonValue] = [
    {"rule": "self.all(a, self.exists_one(b, b.quantile == a.quantile))",
     "message": "each quantile may be given once"},
    {"rule": "self.all(a, self.all(b, a.quantile < b.quantile ? a.tokens <= b.tokens : true))",
     "message": "tokens must not fall as the quantile rises"},
]


class DemandSpec(_Model):
    """Forecast load: a constant rate or a series of per-step rates."""

    requests_per_second: float = Field(
        alias="requestsPerSecond", ge=0, le=1e6,
        description="forecast request rate, requests per second (before the policy's alpha)")
    mean_input_tokens: float = Field(
        alias="meanInputTokens", gt=0, le=1e6,
        description="mean prompt length, tokens: sizes prefill work per request")
    mean_output_tokens: float = Field(
        alias="meanOutputTokens", gt=0, le=1e6,
        description="mean generated length, tokens: sizes decode work and energy per request")
    series: list[float] | None = Field(
        default=None, max_length=288,
        description="per-step req/s over the planning window; overrides requestsPerSecond",
    )
    step_seconds: float = Field(
        default=300, alias="stepSeconds", gt=0, le=86400,
        description="seconds each value of series covers")
    input_token_quantiles: list[TokenQuantile] | None = Field(
        default=None, alias="inputTokenQuantiles", min_length=1, max_length=32,
        description=(
            "prompt-length distribution as a few quantiles, e.g. p50/p90/p99: the planner "
            "keeps the pool off modes that cannot prefill its long prompts within the TTFT "
            "(linear between quantiles, the lowest and highest extended flat; "
            "docs/planner.md). Unset: the mean prompt alone, or what the node agents "
            "observe"),
        json_schema_extra={"x-kubernetes-validations": _QUANTILE_RULES})

    @model_validator(mode="after")
    def _series_non_negative(self) -> DemandSpec:
        if self.series is not None and any(v < 0 for v in self.series):
            raise ValueError("series: request rates must be >= 0")
        return self

    @model_validator(mode="after")
    def _quantiles_consistent(self) -> DemandSpec:
        if self.input_token_quantiles is not None:
            points = sorted(self.input_token_quantiles, key=lambda q: q.quantile)
            for a, b in itertools.pairwise(points):
                if a.quantile == b.quantile:
                    raise ValueError(
                        f"inputTokenQuantiles: quantile {a.quantile:g} is given twice")
                if b.tokens < a.tokens:
                    raise ValueError(
                        f"inputTokenQuantiles: tokens must not fall as the quantile rises "
                        f"({a.tokens:g} at {a.quantile:g}, {b.tokens:g} at {b.quantile:g})")
            self.input_token_quantiles = points
        return self

    def prompt_lengths(self) -> PromptLengths | None:
        """The declared prompt-length distribution (core.classes.PromptLengths); None when
        only the mean is given."""
        if not self.input_token_quantiles:
            return None
        return PromptLengths.from_quantiles([q.quantile for q in self.input_token_quantiles],
                                            [q.tokens for q in self.input_token_quantiles])

    def forecast(self, steps: int) -> list[float]:
        """Per-step req/s for a window of ``steps`` steps (series padded with its last value)."""
        if not self.series:
            return [self.requests_per_second] * steps
        s = list(self.series[:steps])
        return s + [s[-1]] * (steps - len(s))


class InferencePoolSpec(_Model):
    """A pool of LLM serving instances the operator plans, deploys and the router serves."""

    model: str = Field(
        min_length=1, max_length=128,
        description="served model, e.g. llama-3.1-8b; selects the GPUProfiles it is planned with")
    served_model_names: list[Annotated[str, StringConstraints(min_length=1, max_length=256)]] = (
        Field(
            default_factory=list, alias="servedModelNames", max_length=16,
            description=("the names clients send as an OpenAI request's model for this pool "
                         "(e.g. meta-llama/Llama-3.1-8B-Instruct); the router sends a request "
                         "to the pool listing its model and lists them on GET /v1/models, and "
                         "the operator passes them to the engine as --served-model-name "
                         "(vLLM, SGLang); empty: the pool's model"),
            json_schema_extra={"x-kubernetes-list-type": "set"},
        ))
    tier: Tier = Field(
        default=Tier.INTERACTIVE,
        description=("interactive or bulk: the router weighs a bulk request's lateness by "
                     "EnergyPolicy bulkLambdaFactor times lambda"))
    slo: SLOSpec = Field(description="latency targets of the pool's requests")
    demand: DemandSpec = Field(description="forecast load the planner sizes the pool for")
    objective: Objective | None = Field(
        default=None,
        description=("what the planner minimises: energy (joules) or carbon (gCO2 = energy "
                     "times the site's intensity); default from EnergyPolicy"),
    )
    gpu_products: list[str] = Field(
        default_factory=list, alias="gpuProducts",
        description="allowed GPU products (e.g. H100); empty allows all",
    )
    port: int | None = Field(
        default=None, ge=1, le=65535,
        description=("serving port of the engine: the operator annotates the pods with it "
                     "(joulepool.dev/port) for the router; default: the container port named "
                     "http, else the first container port, else 8000"))
    template: dict[str, Any] = Field(
        default_factory=dict,
        description=("pod template of the serving Deployments (one per planned GPU mode); "
                     "the operator adds labels, GPU requests and node affinity"),
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )

    @model_validator(mode="after")
    def _distinct_served_names(self) -> InferencePoolSpec:
        names = self.served_model_names
        if len(set(names)) != len(names):
            raise ValueError("servedModelNames must not repeat a name")
        return self

    def served_names(self) -> list[str]:
        """The model names the pool answers to: ``servedModelNames``, else ``[model]``."""
        return list(self.served_model_names) or [self.model]


class Condition(_Model):
    """A Kubernetes status condition."""

    type: str = Field(description="condition type, e.g. Planned, Ready")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown")
    reason: str = Field(default="", description="machine-readable reason (CamelCase)")
    message: str = Field(default="", description="human-readable detail")
    last_transition_time: datetime | None = Field(
        default=None, alias="lastTransitionTime", description="when status last changed")


class AssignmentStatus(_Model):
    """Instances of the pool the plan puts on one node in one serving mode."""

    site: str = Field(description="site of the node (topology.kubernetes.io/region)")
    node: str = Field(description="node name")
    gpu_product: str = Field(alias="gpuProduct", description="GPU product of the node")
    mode: str = Field(description="serving mode, e.g. 2xH100 (GPUs per instance x product)")
    gpus: int = Field(ge=0, description="GPUs of the node given to the pool")
    instances: int = Field(ge=0, description="serving instances on the node")


#: seconds after its ``updatedAt`` an ObservedPromptLengths entry stops counting: the
#: operator plans without it and node agents drop other nodes' older entries
OBSERVED_MAX_AGE_S = 900.0


#: the API server's form of ObservedPromptLengths._shape, so a status write the planner
#: would reject never lands (bounds finite: JSON has no infinity)
_OBSERVED_RULES: list[JsonValue] = [
    {"rule": "size(self.counts) == size(self.bounds) + 1",
     "message": "counts needs one value per bound and the total"},
    {"rule": "self.bounds[0] > 0.0 && self.bounds.isSorted() && "
             "self.bounds.all(b, self.bounds.indexOf(b) == self.bounds.lastIndexOf(b))",
     "message": "bounds must be finite, > 0 and ascend strictly"},
    {"rule": "self.counts[0] >= 0.0 && self.counts.isSorted()",
     "message": "counts must be cumulative: >= 0 and not falling"},
]


class ObservedPromptLengths(_Model):
    """One node's count of the prompt lengths its engines of the pool served, by bucket
    (the engines' prompt-length histograms summed), written by the node agent."""

    model_config = ConfigDict(**_Model.model_config,
                              json_schema_extra={"x-kubernetes-validations": _OBSERVED_RULES})

    node: str = Field(min_length=1, max_length=253, description="node whose agent counted them")
    bounds: list[float] = Field(
        min_length=1, max_length=64,
        description="finite bucket upper bounds, tokens, ascending (the engines' own)")
    counts: list[float] = Field(
        min_length=2, max_length=65,
        description="cumulative prompts at or below each bound, then the total (+Inf)")
    updated_at: datetime | None = Field(default=None, alias="updatedAt",
                                        description="when the agent wrote it")

    @model_validator(mode="after")
    def _shape(self) -> ObservedPromptLengths:
        if len(self.counts) != len(self.bounds) + 1:
            raise ValueError("counts needs one value per bound and the total")
        if any(b <= a for a, b in itertools.pairwise(self.bounds)) or self.bounds[0] <= 0 \
                or not all(math.isfinite(b) for b in self.bounds):
            raise ValueError("bounds must be finite, > 0 and ascend strictly")
        if self.counts[0] < 0 or any(b < a for a, b in itertools.pairwise(self.counts)):
            raise ValueError("counts must be cumulative: >= 0 and not falling")
        return self


class InferencePoolStatus(_Model):
    """Written by the operator after each plan (``observedInputTokens``: by node agents)."""

    observed_generation: int | None = Field(
        default=None, alias="observedGeneration", description="spec generation last planned")
    conditions: list[Condition] = Field(
        default_factory=list, description="Planned, Deployed, Ready and their reasons")
    assignments: list[AssignmentStatus] = Field(
        default_factory=list, description="where the plan puts the pool's instances")
    replicas: int | None = Field(default=None, description="planned serving instances")
    expected_power_watts: float | None = Field(
        default=None, alias="expectedPowerWatts",
        description="planned power of the pool's GPUs at the forecast load, watts")
    joules_per_token: float | None = Field(
        default=None, alias="joulesPerToken",
        description="planned energy per output token, joules")
    grams_co2_per_hour: float | None = Field(
        default=None, alias="gramsCO2PerHour", description="planned emissions, gCO2 per hour")
    last_plan_time: datetime | None = Field(
        default=None, alias="lastPlanTime", description="when the plan in force was made")
    observed_input_tokens: list[ObservedPromptLengths] = Field(
        default_factory=list, alias="observedInputTokens", max_length=256,
        description=("prompt lengths the node agents saw the pool's engines serve, one entry "
                     "per node; the planner plans with the longer of these and "
                     "spec.demand.inputTokenQuantiles (docs/planner.md)"))


class InferencePool(_Model):
    """An LLM serving pool (short name jpool)."""

    api_version: Literal["joulepool.dev/v1alpha1"] = Field(
        "joulepool.dev/v1alpha1", alias="apiVersion", description="joulepool.dev/v1alpha1"
    )
    kind: Literal["InferencePool"] = Field("InferencePool", description="InferencePool")
    metadata: ObjectMeta = Field(description="standard object metadata")
    spec: InferencePoolSpec = Field(description="what to serve, how fast, for how much load")
    status: InferencePoolStatus | None = Field(default=None,
                                               description="the operator's plan for the pool")


# --------------------------------------------------------------------------
# GPUProfile
# --------------------------------------------------------------------------
class BatchPointSpec(_Model):
    """One measured operating point of an instance at the maximum clock."""

    batch: int = Field(ge=1, le=65536, description="running batch size, requests")
    inter_token_latency_seconds: float = Field(
        alias="interTokenLatencySeconds", gt=0,
        description="time per output token at this batch, seconds")
    power_watts: float = Field(alias="powerWatts", gt=0,
                               description="power of one GPU at this batch, watts")
    source: str = Field(default="", description="where the number came from, or 'assumed: why'")


class ClockSpec(_Model):
    """SM clock range the node agent may lock (MIAD) and the clock law is fitted over."""

    min_mhz: float = Field(alias="minMHz", gt=0, description="lowest usable SM clock, MHz")
    max_mhz: float = Field(alias="maxMHz", gt=0,
                           description="highest SM clock (where batchPoints were measured), MHz")
    step_mhz: float = Field(default=15, alias="stepMHz", gt=0,
                            description="spacing of the supported clocks, MHz")

    @model_validator(mode="after")
    def _ordered(self) -> ClockSpec:
        if self.min_mhz > self.max_mhz:
            raise ValueError("clock.minMHz must be <= clock.maxMHz")
        return self


class GPUProfileSpec(_Model):
    product: str = Field(min_length=1, description="GPU product, e.g. H100")
    model: str = Field(min_length=1, description="served model, as in InferencePool spec.model")
    gpus: int = Field(default=1, ge=1, le=64, description="GPUs per instance (TP degree)")
    idle_watts: float = Field(alias="idleWatts", gt=0, description="idle power per GPU, watts")
    batch_points: list[BatchPointSpec] = Field(
        alias="batchPoints", min_length=1,
        description="latency and power per batch size at the maximum clock, ascending batches")
    max_batch: int = Field(alias="maxBatch", ge=1,
                           description="largest running batch the engine admits")
    prefill_tokens_per_second: float = Field(
        alias="prefillTokensPerSecond", gt=0,
        description="prompt tokens one instance prefills per second at the maximum clock")
    clock: ClockSpec = Field(description="SM clock range and step")
    gamma: float = Field(
        default=DEFAULT_GAMMA.value, gt=0, le=5,
        description="clock law: SM power scales as (f/fmax)^gamma above the voltage floor "
                    "(docs/clock-law.md)")
    beta_decode: float = Field(
        default=DEFAULT_BETA_DECODE.value, alias="betaDecode", ge=0, le=2,
        description="clock law: decode time scales as (fmax/f)^betaDecode (memory bound: small)")
    beta_prefill: float = Field(
        default=DEFAULT_BETA_PREFILL.value, alias="betaPrefill", ge=0, le=2,
        description="clock law: prefill time scales as (fmax/f)^betaPrefill (compute bound)")

    @model_validator(mode="after")
    def _batches_ascending(self) -> GPUProfileSpec:
        b = [p.batch for p in self.batch_points]
        if b != sorted(set(b)):
            raise ValueError("batchPoints: batch sizes must be distinct and ascending")
        return self


class MeasuredProfile(_Model):
    """One node agent's online estimate of energy per token."""

    joules_per_token: float = Field(alias="joulesPerToken", ge=0,
                                    description="measured energy per output token, joules")
    samples: int = Field(ge=0, description="output tokens the estimate is based on")
    node: str = Field(default="", description="node whose agent measured it")
    updated_at: datetime | None = Field(default=None, alias="updatedAt",
                                        description="when the agent last published it")
    tokens_per_second: float | None = Field(
        default=None, alias="tokensPerSecond", ge=0,
        description="operating point of the estimate: mean output tokens per second of one "
                    "instance over the same window (the planner and router compare the "
                    "profile at the batch that yields this rate)")
    clock_mhz: float | None = Field(
        default=None, alias="clockMHz", ge=0,
        description="operating point of the estimate: mean SM clock over the same window, MHz")


class GPUProfileStatus(_Model):
    """Written by the node agents (measured) and the operator (conditions)."""

    measured: list[MeasuredProfile] = Field(
        default_factory=list, description="per-node measured J/token of this product and model")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="written by the operator: EpsDrift (True when the measured J/token is off "
                    "the profile by more than the drift threshold; docs/feedback.md)")


class GPUProfile(_Model):
    """How one GPU product serves one model: latency and power per batch, clock law."""

    api_version: Literal["joulepool.dev/v1alpha1"] = Field(
        "joulepool.dev/v1alpha1", alias="apiVersion", description="joulepool.dev/v1alpha1"
    )
    kind: Literal["GPUProfile"] = Field("GPUProfile", description="GPUProfile")
    metadata: ObjectMeta = Field(description="standard object metadata")
    spec: GPUProfileSpec = Field(description="the profile the planner and router use")
    status: GPUProfileStatus | None = Field(default=None,
                                            description="measurements by the node agents")


# --------------------------------------------------------------------------
# EnergyPolicy
# --------------------------------------------------------------------------
CarbonProvider = Literal[
    "configMap", "carbonAwareSDK", "electricityMaps", "wattTime", "prometheus",
]
CarbonSignal = Literal["average", "marginal"]
CarbonUnit = Literal["gPerKWh", "kgPerKWh", "gPerMWh", "kgPerMWh", "lbsPerMWh"]


class SecretKeyRef(_Model):
    """A Secret the operator reads a credential from (in the operator's namespace unless given)."""

    name: str = Field(min_length=1, max_length=253, description="name of the Secret")
    namespace: str | None = Field(
        default=None, max_length=63,
        description="namespace of the Secret; default: the operator's namespace",
    )


class ConfigMapRef(_Model):
    """A ConfigMap in the carbon-intensity-exporter shape (EmissionsData JSON under ``key``)."""

    name: str = Field(min_length=1, max_length=253, description="name of the ConfigMap")
    namespace: str = Field(default="kube-system", max_length=63,
                           description="namespace of the ConfigMap")
    key: str = Field(default="data", min_length=1, max_length=253,
                     description="binaryData (or data) key holding the EmissionsData JSON array")


class CarbonSourceSpec(_Model):
    """Where one site's live carbon intensity comes from; see docs/carbon-sources.md."""

    provider: CarbonProvider = Field(description=(
        "configMap (Azure kubernetes-carbon-intensity-exporter / Carbon Aware SDK "
        "EmissionsData), carbonAwareSDK (Web API /emissions/forecasts/current), "
        "electricityMaps (/v3/carbon-intensity latest + forecast), wattTime (v3 forecast, "
        "marginal co2_moer) or prometheus (an instant query for on-site meters)"))
    url: str | None = Field(
        default=None, max_length=2048, pattern=r"^https?://",
        description=("base URL of the service (for prometheus: of the Prometheus server); "
                     "default: the provider's public API (none for carbonAwareSDK and "
                     "prometheus, which need it)"))
    location: str | None = Field(
        default=None, max_length=253,
        description=("the grid location: Carbon Aware SDK location, Electricity Maps zone, "
                     "WattTime region"))
    latitude: float | None = Field(default=None, ge=-90, le=90,
                                   description="Electricity Maps: latitude instead of a zone")
    longitude: float | None = Field(default=None, ge=-180, le=180,
                                    description="Electricity Maps: longitude instead of a zone")
    config_map: ConfigMapRef | None = Field(
        default=None, alias="configMap", description="configMap provider: the ConfigMap to read")
    query: str | None = Field(
        default=None, max_length=4096,
        description="prometheus provider: PromQL whose first sample is the intensity now")
    unit: CarbonUnit | None = Field(
        default=None,
        description=("unit of the values the source returns; default: the provider's own "
                     "(lbsPerMWh for wattTime, gPerKWh otherwise); normalised to gCO2/kWh"))
    signal: CarbonSignal | None = Field(
        default=None,
        description=("average or marginal emissions; default: marginal for wattTime, average "
                     "otherwise (set it for carbonAwareSDK to match its backend)"))
    token_secret_ref: SecretKeyRef | None = Field(
        default=None, alias="tokenSecretRef",
        description=("Secret holding the credentials: key 'token' (Electricity Maps "
                     "auth-token, prometheus/SDK bearer token) or keys 'username' and "
                     "'password' (WattTime login)"))
    refresh_seconds: float = Field(
        default=300, alias="refreshSeconds", ge=10, le=86400,
        description="seconds between fetches (a 429's Retry-After can make it longer)")
    stale_after_seconds: float = Field(
        default=3600, alias="staleAfterSeconds", ge=10, le=7 * 86400,
        description=("after this many seconds without a successful fetch the last data is "
                     "stale and fallbackGramsPerKWh is used"))
    fallback_grams_per_kwh: float | None = Field(
        default=None, alias="fallbackGramsPerKWh", ge=0,
        description=("gCO2/kWh planned with while the source has no fresh data; unset: the "
                     "site counts as the dirtiest known site"))
    timeout_seconds: float = Field(
        default=10, alias="timeoutSeconds", gt=0, le=60,
        description="bound on one fetch (connect + read of every request it makes)")

    @model_validator(mode="after")
    def _provider_fields(self) -> CarbonSourceSpec:
        p = self.provider
        if p == "configMap" and self.config_map is None:
            raise ValueError("carbon source configMap: give configMap.name")
        if p in ("carbonAwareSDK", "prometheus") and not self.url:
            raise ValueError(f"carbon source {p}: give url")
        if p == "prometheus" and not self.query:
            raise ValueError("carbon source prometheus: give query")
        if p in ("carbonAwareSDK", "wattTime") and not self.location:
            raise ValueError(f"carbon source {p}: give location")
        if p == "electricityMaps" and not self.location and (
                self.latitude is None or self.longitude is None):
            raise ValueError("carbon source electricityMaps: give location (zone) or "
                             "latitude and longitude")
        if p in ("electricityMaps", "wattTime") and self.token_secret_ref is None:
            raise ValueError(f"carbon source {p}: give tokenSecretRef")
        return self


class SiteCarbon(_Model):
    """One site's grid carbon intensity: a constant, a fixed series, or a live source."""

    site: str = Field(min_length=1, description="site name (the nodes' site label)")
    grams_per_kwh: float | None = Field(
        default=None, alias="gramsPerKWh",
        description="constant intensity, gCO2/kWh (a marginal intensity may be negative)")
    series: list[float] | None = Field(
        default=None, max_length=288,
        description="intensity per planning step (gCO2/kWh), windowSteps values or one; "
                    "marginal intensities may be negative")
    source: CarbonSourceSpec | None = Field(
        default=None, description="a live source, refreshed by the operator")

    @model_validator(mode="after")
    def _one_of(self) -> SiteCarbon:
        given = [v is not None for v in (self.grams_per_kwh, self.series, self.source)]
        if sum(given) != 1:
            raise ValueError("carbon: give exactly one of gramsPerKWh, series or source")
        static = [*(self.series or []), *([self.grams_per_kwh] if self.grams_per_kwh is not None
                                          else [])]
        if not all(math.isfinite(v) for v in static):
            raise ValueError("carbon: intensities must be finite numbers")
        return self

    def values(self) -> list[float]:
        """The static intensities (a live source is resolved by ``joulepool.carbon`` first)."""
        if self.source is not None:
            raise ValueError(f"carbon of site {self.site!r} comes from a live source; "
                             "resolve it with joulepool.carbon before planning")
        return list(self.series) if self.series is not None else [float(self.grams_per_kwh or 0)]


class PISpec(_Model):
    """The router's PI controller of lambda (velocity form, stepped per pool)."""

    kp: float = Field(default=PIController.kp, ge=0,
                      description="proportional gain, lambda per unit change of the miss rate")
    ki: float = Field(default=PIController.ki, ge=0,
                      description="integral gain, lambda per unit miss-rate error per step")
    target_miss_rate: float = Field(
        default=PIController.target, alias="targetMissRate", ge=0, le=1,
        description="deadline-miss rate the controller holds each pool at (fraction)")
    lambda_min: float = Field(default=PIController.lam_min, alias="lambdaMin", ge=0,
                              description="lower clamp of lambda, joules per second late")
    lambda_max: float = Field(default=PIController.lam_max, alias="lambdaMax", gt=0,
                              description="upper clamp of lambda, joules per second late")

    @model_validator(mode="after")
    def _ordered(self) -> PISpec:
        if self.lambda_min > self.lambda_max:
            raise ValueError("pi.lambdaMin must be <= pi.lambdaMax")
        return self


class MIADSpec(_Model):
    """The node agents' per-GPU clock controller (multiplicative increase, additive decrease)."""

    k_inc: float = Field(default=MIADController.k_inc, alias="kInc", gt=1, le=4,
                         description="clock multiplier when latency is at risk (> 1)")
    step_mhz: float = Field(default=MIADController.step_mhz, alias="stepMHz", gt=0, le=1000,
                            description="clock decrease per calm control period, MHz")
    margin: float = Field(default=MIADController.margin, ge=0, lt=1,
                          description="at risk above target*(1-margin) (fraction)")
    period_seconds: float = Field(
        default=MIAD_PERIOD_S, alias="periodSeconds", gt=0, le=60,
        description="control period of the node agents, seconds (overrides --interval)")
    control: Literal["clocks", "power"] | None = Field(
        default=None,
        description="what the node agents steer on each GPU: locked SM clocks, or the GPU's "
                    "power limit (within the device's constraints); unset: each agent's "
                    "--control")


class EnergyPolicySpec(_Model):
    """Cluster-wide planning and control parameters (the EnergyPolicy named default)."""

    plan_interval_seconds: float = Field(
        default=PLAN_INTERVAL_S, alias="planIntervalSeconds", ge=10,
        description="the operator re-plans at least this often, seconds")
    objective: Objective = Field(
        default="energy",
        description="what the planner minimises unless a pool says otherwise: energy or carbon")
    alpha: float = Field(default=PLAN_ALPHA, ge=1, le=10,
                         description="demand headroom: pools are planned for alpha times "
                         "their forecast rate")
    window_steps: int = Field(default=PLAN_WINDOW_STEPS, alias="windowSteps", ge=1, le=288,
                              description="planning window length, in steps")
    mip_rel_gap: float = Field(
        default=DEFAULT_MIP_REL_GAP, alias="mipRelGap", ge=0, lt=1,
        description="relative MIP gap the planner stops at: a plan within this share of the "
                    "optimum is reported 'within_gap', 0 asks for a proven optimum "
                    "('optimal'); the default is exact at FREESH's size and keeps a "
                    "10,000-GPU window within 30 s")
    step_seconds: float = Field(default=PLAN_STEP_S, alias="stepSeconds", gt=0,
                                description="length of one planning step, seconds")
    carbon: list[SiteCarbon] = Field(
        default_factory=list,
        description="grid carbon intensity per site (one entry per site)")
    pi: PISpec = Field(default_factory=PISpec,
                       description="the router's lambda controller (JouleSched's PI)")
    miad: MIADSpec = Field(default_factory=MIADSpec,
                           description="the node agents' clock controller")
    bulk_lambda_factor: float = Field(
        default=BULK_LAMBDA_FACTOR, alias="bulkLambdaFactor", ge=0, le=1,
        description="the router weighs a bulk request's lateness by this times lambda"
    )
    share_instances: bool = Field(
        default=True, alias="shareInstances",
        description="pools of one namespace that serve one model under the same names may "
                    "share instances (one pod serves several pools at low load, held to the "
                    "tightest of their SLOs); false: every instance serves one pool "
                    "(FREESH's plan). Not shared while the operator manages GIE "
                    "InferencePools (their selectors reach only their own pool's pods)")

    @model_validator(mode="after")
    def _one_entry_per_site(self) -> EnergyPolicySpec:
        sites = [c.site for c in self.carbon]
        dup = sorted({x for x in sites if sites.count(x) > 1})
        if dup:
            raise ValueError(f"carbon: site(s) {dup} listed more than once")
        return self


class SiteCarbonStatus(_Model):
    """What the operator last planned with for one site's live carbon source."""

    site: str = Field(description="site name")
    provider: str = Field(description="the source's provider")
    signal: CarbonSignal = Field(description="average or marginal emissions")
    grams_per_kwh: float | None = Field(
        default=None, alias="gramsPerKWh",
        description="intensity now (first planning step), gCO2/kWh; null: none known")
    horizon_seconds: float = Field(
        default=0, alias="horizonSeconds",
        description="seconds ahead the last fetched data covers")
    last_success_time: datetime | None = Field(
        default=None, alias="lastSuccessTime", description="time of the last successful fetch")
    stale: bool = Field(default=False,
                        description="no successful fetch within staleAfterSeconds")
    using_fallback: bool = Field(default=False, alias="usingFallback",
                                 description="planned with fallbackGramsPerKWh")
    message: str = Field(default="", description="the last error, if the last fetch failed")


class EnergyPolicyStatus(_Model):
    """Written by the operator."""

    conditions: list[Condition] = Field(
        default_factory=list,
        description="CarbonSourcesReady: every live source has fresh data")
    carbon: list[SiteCarbonStatus] = Field(
        default_factory=list, description="per-site state of the live carbon sources")


class EnergyPolicy(_Model):
    """Cluster-scoped planning and control parameters; only the one named default is used."""

    api_version: Literal["joulepool.dev/v1alpha1"] = Field(
        "joulepool.dev/v1alpha1", alias="apiVersion", description="joulepool.dev/v1alpha1"
    )
    kind: Literal["EnergyPolicy"] = Field("EnergyPolicy", description="EnergyPolicy")
    metadata: ObjectMeta = Field(description="standard object metadata")
    spec: EnergyPolicySpec = Field(default_factory=EnergyPolicySpec,
                                   description="planning and control parameters")
    status: EnergyPolicyStatus | None = Field(default=None,
                                              description="live carbon sources' state")

    def site_intensities(self) -> dict[str, float]:
        """gCO2/kWh per site now: static entries of the spec (a series' first value),
        then what the operator resolved for live sources (``status.carbon``). Read by the
        node agents (energy accounting) and the router (marginal carbon)."""
        out = {c.site: c.values()[0] for c in self.spec.carbon if c.source is None}
        for s in self.status.carbon if self.status is not None else ():
            if s.grams_per_kwh is not None:
                out[s.site] = s.grams_per_kwh
        return out


RESOURCES: dict[str, type[_Model]] = {
    "InferencePool": InferencePool,
    "GPUProfile": GPUProfile,
    "EnergyPolicy": EnergyPolicy,
}
