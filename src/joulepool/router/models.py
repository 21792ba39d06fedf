"""The request bodies and answers of ``POST /v1/route`` and ``POST /v1/complete``.

Bodies are validated strictly (numbers as JSON numbers, in range, finite); a body
that does not validate is a 400 naming the field.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from joulepool.core.classes import Tier
from joulepool.core.router import CompletionOutcome, RouteDecision
from joulepool.kube.pools import Router

MAX_TOKENS = 10_000_000


class RouteRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)
    pool: str = Field(min_length=1, max_length=253)
    # estimates (a length predictor may give fractions): numbers, not strings
    input_tokens: float = Field(default=0, alias="inputTokens", ge=0, le=MAX_TOKENS,
                                allow_inf_nan=False)
    output_tokens: float = Field(alias="outputTokens", ge=0, le=MAX_TOKENS, allow_inf_nan=False)
    tier: Tier | None = None
    deadline_seconds: float | None = Field(
        default=None, alias="deadlineSeconds", gt=0, le=7 * 86400, allow_inf_nan=False
    )


class CompleteRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)
    pool: str = Field(min_length=1, max_length=253)
    endpoint: str = Field(min_length=1, max_length=300)
    request_id: str | None = Field(default=None, alias="requestId", max_length=64)
    ttft_seconds: float | None = Field(
        default=None, alias="ttftSeconds", ge=0, le=7 * 86400, allow_inf_nan=False
    )
    e2e_seconds: float | None = Field(
        default=None, alias="e2eSeconds", ge=0, le=7 * 86400, allow_inf_nan=False
    )
    output_tokens: float = Field(default=0, alias="outputTokens", ge=0, le=MAX_TOKENS,
                                 allow_inf_nan=False)
    deadline_met: bool = Field(alias="deadlineMet")
    joules: float | None = Field(default=None, ge=0, le=1e12, allow_inf_nan=False)



def _number(x: float) -> float | None:
    return x if math.isfinite(x) else None


def decision_to_wire(d: RouteDecision) -> dict[str, Any]:
    """The ``/v1/route`` response body; cost terms the routing profile does not compute
    (e.g. energy under ``least-loaded``) are null."""
    return {
        "pool": d.pool,
        "endpoint": d.endpoint,
        "fallbacks": d.fallbacks,
        "requestId": d.request_id,
        "tier": str(d.tier),
        "deadlineSeconds": d.deadline_s,
        "cost": {
            "energyJoules": _number(d.energy_j),
            "slackSeconds": _number(d.slack_s),
            "lambda": d.lam,
            "etaSeconds": _number(d.eta_s),
            "total": d.cost,
        },
    }


def outcome_to_wire(o: CompletionOutcome) -> dict[str, Any]:
    """The ``/v1/complete`` response body."""
    return {
        "pool": o.pool,
        "endpointKnown": o.endpoint_known,
        "lambda": o.lam,
        "missRatio": o.miss_ratio,
        "epsScale": o.eps_scale,
    }


def route(router: Router, req: RouteRequest, now: float) -> RouteDecision:
    """Route a ``/v1/route`` body through its pool's core router (UnknownPool, NoEndpoints)."""
    return router.pool(req.pool).decide(req.output_tokens, req.input_tokens, req.tier,
                                        req.deadline_seconds, now)


def complete(router: Router, rep: CompleteRequest, now: float) -> dict[str, Any]:
    """Learn from a ``/v1/complete`` body; the answer's body (UnknownPool)."""
    out = router.pool(rep.pool).report(rep.endpoint, rep.request_id, rep.output_tokens,
                                       rep.deadline_met, rep.joules, now)
    return outcome_to_wire(out)
