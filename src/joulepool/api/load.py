"""Parse and validate resources from YAML/dicts with messages that name the field."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from joulepool.api.models import RESOURCES, GPUProfile
from joulepool.core.feedback import (
    Correction,
    FeedbackParams,
    Measured,
    corrected_profile,
    correction,
)
from joulepool.core.profiles import (
    PRODUCTS,
    BatchPoint,
    Figure,
    GPUProduct,
    ServingProfile,
    assumed,
)


class ResourceError(ValueError):
    """A resource failed validation; ``field`` is its dotted path, e.g. spec.slo.ttftSeconds."""

    def __init__(self, message: str, field: str = "", source: str = "") -> None:
        self.field = field
        self.source = source
        where = f"{source}: " if source else ""
        at = f"{field}: " if field else ""
        super().__init__(f"{where}{at}{message}")


def load_yaml(text: str, all_documents: bool = False) -> Any:
    """``yaml.safe_load`` (``safe_load_all`` as a list when ``all_documents``) that reports
    nesting too deep for the parser as a ``yaml.YAMLError`` (the parser recurses once per
    level; a few hundred levels overflow Python's stack), so callers' YAML error handling
    covers it: a clear message and exit status 2 instead of a RecursionError traceback."""
    try:
        if all_documents:
            return list(yaml.safe_load_all(text))
        return yaml.safe_load(text)
    except RecursionError:
        raise yaml.YAMLError("nested too deeply to parse (more levels than any "
                             "joulepool resource has)") from None


def _dotted(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def from_validation_error(exc: ValidationError, source: str = "") -> ResourceError:
    """First error of a pydantic ValidationError as a ResourceError naming the field."""
    err = exc.errors()[0]
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return ResourceError(f"{err['msg']}{more}", _dotted(err["loc"]), source)


def parse_resource(obj: Any, source: str = "") -> BaseModel:
    """Validate one manifest dict into its model by ``kind``."""
    if not isinstance(obj, dict):
        raise ResourceError("expected a mapping (a Kubernetes object)", "", source)
    kind = obj.get("kind")
    model = RESOURCES.get(str(kind))
    if model is None:
        raise ResourceError(
            f"unknown kind {kind!r}; expected one of {sorted(RESOURCES)}", "kind", source
        )
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise from_validation_error(exc, source) from None


def load_manifests(path: str | Path) -> list[BaseModel]:
    """Every joulepool resource in a (multi-document) YAML file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ResourceError(f"cannot read: {exc.strerror}", "", str(p)) from None
    except UnicodeDecodeError as exc:
        raise ResourceError(f"not UTF-8 text: {exc}", "", str(p)) from None
    try:
        docs = [d for d in load_yaml(text, all_documents=True) if d is not None]
    except yaml.YAMLError as exc:
        raise ResourceError(f"invalid YAML: {exc}", "", str(p)) from None
    out = []
    for i, doc in enumerate(docs):
        src = f"{p} (document {i + 1})" if len(docs) > 1 else str(p)
        out.append(parse_resource(doc, src))
    return out


def profile_from_resource(res: GPUProfile) -> ServingProfile:
    """A GPUProfile resource as a core ServingProfile (user numbers, user-labelled)."""
    spec = res.spec
    src = f"GPUProfile {res.metadata.name}"
    known = PRODUCTS.get(spec.product)
    product = GPUProduct(
        name=spec.product,
        tdp_w=known.tdp_w if known else assumed(0, "unknown product"),
        idle_w=Figure(spec.idle_watts, src),
        f_max_mhz=Figure(spec.clock.max_mhz, src),
        f_min_mhz=Figure(spec.clock.min_mhz, src),
        clock_step_mhz=Figure(spec.clock.step_mhz, src),
        memory_gb=known.memory_gb if known else assumed(0, "unknown product"),
        aliases=known.aliases if known else (),
        voltage_knee_ratio=known.voltage_knee_ratio if known else None,
        bandwidth_clock_ratio=known.bandwidth_clock_ratio if known else None,
    )
    return ServingProfile(
        product=product,
        model=spec.model,
        gpus=spec.gpus,
        points=tuple(
            BatchPoint(
                p.batch,
                Figure(p.inter_token_latency_seconds * 1e3, p.source or src),
                Figure(p.power_watts, p.source or src),
            )
            for p in spec.batch_points
        ),
        max_batch=Figure(spec.max_batch, src),
        prefill_tokens_per_s=Figure(spec.prefill_tokens_per_second, src),
        gamma=Figure(spec.gamma, src),
        beta_decode=Figure(spec.beta_decode, src),
        beta_prefill=Figure(spec.beta_prefill, src),
    )


def measurements_from_resource(res: GPUProfile) -> list[Measured]:
    """The node agents' measurements in ``status.measured``, as core.feedback reads them."""
    if res.status is None:
        return []
    return [
        Measured(joules_per_token=m.joules_per_token, tokens=float(m.samples), node=m.node,
                 updated_at=m.updated_at, tokens_per_second=m.tokens_per_second,
                 clock_mhz=m.clock_mhz)
        for m in res.status.measured
    ]


def corrected_profile_from_resource(
    res: GPUProfile, now: datetime, params: FeedbackParams | None = None,
) -> tuple[ServingProfile, Correction]:
    """The resource's profile with its measured eps fed back (core.feedback), and how."""
    profile = profile_from_resource(res)
    corr = correction(profile, measurements_from_resource(res), now, params)
    return corrected_profile(profile, corr.scale), corr
