"""Cluster description files (``--cluster FILE``) for the planner CLI and the simulator.

A cluster is a list of GPU node groups plus optional carbon intensity per
site. On a real cluster the operator builds the same thing from Node objects.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field, ValidationError, model_validator

from joulepool.api.load import ResourceError, from_validation_error, load_yaml
from joulepool.api.models import SiteCarbon, _Model


class NodeGroup(_Model):
    name: str = Field(min_length=1, description="node name, or prefix when count > 1")
    site: str = Field(default="default", min_length=1)
    product: str = Field(min_length=1, description="GPU product, e.g. H100")
    gpus: int = Field(ge=1, le=64, description="GPUs per node")
    count: int = Field(default=1, ge=1, le=100000, description="identical nodes in the group")

    def node_names(self) -> list[str]:
        if self.count == 1:
            return [self.name]
        return [f"{self.name}-{i}" for i in range(self.count)]


class ClusterSpec(_Model):
    name: str = "cluster"
    nodes: list[NodeGroup] = Field(min_length=1)
    carbon: list[SiteCarbon] = Field(default_factory=list)
    step_seconds: float = Field(default=300, alias="stepSeconds", gt=0)

    @model_validator(mode="after")
    def _static_carbon(self) -> ClusterSpec:
        live = [c.site for c in self.carbon if c.source is not None]
        if live:
            raise ValueError(f"carbon of site(s) {live}: a cluster file takes gramsPerKWh or "
                             "series; live sources belong in the EnergyPolicy")
        return self

    def expanded(self) -> list[tuple[str, str, str, int]]:
        """(node name, site, product, gpus) for every node."""
        return [(n, g.site, g.product, g.gpus) for g in self.nodes for n in g.node_names()]

    def carbon_by_site(self) -> dict[str, list[float]]:
        return {c.site: c.values() for c in self.carbon}


def load_cluster(path: str | Path) -> ClusterSpec:
    p = Path(path)
    try:
        data = load_yaml(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ResourceError(f"cannot read: {exc.strerror}", "", str(p)) from None
    except UnicodeDecodeError as exc:
        raise ResourceError(f"not UTF-8 text: {exc}", "", str(p)) from None
    except yaml.YAMLError as exc:
        raise ResourceError(f"invalid YAML: {exc}", "", str(p)) from None
    try:
        return ClusterSpec.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc, str(p)) from None
