"""Generate structural CRD YAML from the pydantic models.

Kubernetes wants *structural* OpenAPI v3: no ``$ref``, no ``anyOf`` with null
(use ``nullable``), a ``type`` on every node, no ``title``/``default: null``.
This module turns pydantic's JSON schema into that.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml
from pydantic import BaseModel

from joulepool.api.contract import ENERGYPOLICIES, GPUPROFILES, INFERENCEPOOLS
from joulepool.api.models import GROUP, VERSION, EnergyPolicy, GPUProfile, InferencePool

_DROP = {"title", "discriminator"}
_API_VERSION_DOC = "Versioned schema of this representation of an object (joulepool.dev/v1alpha1)."
_KIND_DOC = "The REST resource this object represents."


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_inline(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
        extra = {k: v for k, v in node.items() if k != "$ref"}
        target.update(extra)
        return _inline(target, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or key == "$defs":
            continue
        if key == "properties":
            out[key] = {k: _inline(v, defs) for k, v in value.items()}
        else:
            out[key] = _inline(value, defs)
    if "anyOf" in out:
        options = [o for o in out.pop("anyOf") if o.get("type") != "null"]
        nullable = len(options) < len(node["anyOf"])
        if len(options) == 1:
            merged = dict(options[0])
            merged.update(out)
            out = merged
        else:
            out["anyOf"] = options
            out.setdefault("x-kubernetes-int-or-string", True)
        if nullable:
            out["nullable"] = True
    if out.get("additionalProperties") is False or (
        "properties" in out and "additionalProperties" in out
    ):
        out.pop("additionalProperties")  # structural schemas prune instead
    for bound, flag in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(out.get(bound), (int, float)) and not isinstance(out[bound], bool):
            out[flag] = out[bound]
            out[bound] = True  # OpenAPI v3.0 form
    if "const" in out:
        out["enum"] = [out.pop("const")]
    if out.get("default", 0) is None:
        out.pop("default")
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if out.get("x-kubernetes-preserve-unknown-fields"):
        out.pop("additionalProperties", None)
        out["type"] = "object"
    if out.get("format") == "date-time":
        out["type"] = "string"
    return out


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The CRD's structural OpenAPI v3 schema of ``model`` (module docstring)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    schema: dict[str, Any] = _inline(raw, raw.get("$defs", {}))
    props = schema["properties"]
    # apiVersion/kind/metadata are the API server's business (their schema is its own)
    schema["properties"] = {
        "apiVersion": {"type": "string", "description": _API_VERSION_DOC},
        "kind": {"type": "string", "description": _KIND_DOC},
        # the API server forbids anything but the type on metadata (it owns the schema)
        "metadata": {"type": "object"},
        **{k: v for k, v in props.items() if k not in {"apiVersion", "kind", "metadata"}},
    }
    schema["required"] = [r for r in schema.get("required", []) if r not in {"metadata"}]
    schema.pop("additionalProperties", None)
    return schema


_CRDS: list[dict[str, Any]] = [
    {
        "model": InferencePool, "plural": INFERENCEPOOLS, "singular": "inferencepool",
        "scope": "Namespaced", "short": ["jpool"], "categories": ["joulepool"],
        "columns": [
            {"name": "Model", "type": "string", "jsonPath": ".spec.model"},
            {"name": "Tier", "type": "string", "jsonPath": ".spec.tier"},
            {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas"},
            {"name": "Planned", "type": "string",
             "jsonPath": ".status.conditions[?(@.type==\"Planned\")].status"},
            {"name": "Power W", "type": "number", "jsonPath": ".status.expectedPowerWatts"},
            {"name": "J/token", "type": "number", "jsonPath": ".status.joulesPerToken"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    },
    {
        "model": GPUProfile, "plural": GPUPROFILES, "singular": "gpuprofile",
        "scope": "Cluster", "short": ["gpuprof"], "categories": ["joulepool"],
        "columns": [
            {"name": "Product", "type": "string", "jsonPath": ".spec.product"},
            {"name": "Model", "type": "string", "jsonPath": ".spec.model"},
            {"name": "GPUs", "type": "integer", "jsonPath": ".spec.gpus"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    },
    {
        "model": EnergyPolicy, "plural": ENERGYPOLICIES, "singular": "energypolicy",
        "scope": "Cluster", "short": ["epol"], "categories": ["joulepool"],
        "columns": [
            {"name": "Objective", "type": "string", "jsonPath": ".spec.objective"},
            {"name": "Interval", "type": "number", "jsonPath": ".spec.planIntervalSeconds"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    },
]


def crd_documents() -> dict[str, dict[str, Any]]:
    """File name -> CRD manifest, for every joulepool resource."""
    docs: dict[str, dict[str, Any]] = {}
    for spec in _CRDS:
        model = spec["model"]
        kind = model.__name__
        docs[f"{spec['plural']}.{GROUP}.yaml"] = {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{spec['plural']}.{GROUP}"},
            "spec": {
                "group": GROUP,
                "scope": spec["scope"],
                "names": {
                    "kind": kind, "listKind": f"{kind}List", "plural": spec["plural"],
                    "singular": spec["singular"], "shortNames": spec["short"],
                    "categories": spec["categories"],
                },
                "versions": [{
                    "name": VERSION, "served": True, "storage": True,
                    "schema": {"openAPIV3Schema": structural_schema(model)},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": spec["columns"],
                }],
            },
        }
    return docs


def render(doc: dict[str, Any]) -> str:
    header = "# Generated by `joulepool crds` from joulepool.api.models. Do not edit.\n"
    return header + yaml.safe_dump(doc, sort_keys=False, width=100)
