"""Render charts/joulepool with the real Helm engine (helm-python-sdk: Helm's Go
SDK over ctypes; no helm binary, no cluster) once per values set."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "charts" / "joulepool"
RELEASE = "joulepool"
NAMESPACE = "joulepool-system"
#: the Kubernetes version the chart is rendered for and validated against
#: (kind's node images of kind 0.24-0.26; kubernetes-validate ships its schemas)
KUBE_VERSION = "v1.31.0"
PROMETHEUS_API = "monitoring.coreos.com/v1"



@cache
def chart() -> helm.Chart:
    return helm.Chart.load(CHART_DIR)


def render_raw(
    values: dict[str, Any] | None = None,
    api_versions: tuple[str, ...] = (),
    kube_version: str = KUBE_VERSION,
    namespace: str = NAMESPACE,
    name: str = RELEASE,
) -> dict[str, str]:
    """Template path -> rendered text, like ``helm template``.

    ``Chart.render`` (0.2.2) exposes name/namespace/revision only; the library's
    render options also take ``kube_version`` and ``api_versions`` (the CLI's
    --kube-version / --api-versions), so we pass them through its native call.
    test_render.py checks that both options take effect, so an SDK that drops
    them fails loudly instead of rendering something else.
    """
    from helm_python import _native

    opts = {"name": name, "namespace": namespace, "kube_version": kube_version,
            "api_versions": list(api_versions), "is_install": True}
    out = _native.call_string(
        "helm_render", chart()._raw(), None if values is None else json.dumps(values),
        json.dumps(opts))
    rendered: dict[str, str] = json.loads(out)
    return rendered


@dataclass
class Rendered:
    """One rendering of the chart: its manifests (parsed) and NOTES.txt."""

    files: dict[str, str]
    docs: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for path, text in sorted(self.files.items()):
            if path.endswith("NOTES.txt"):
                continue
            for doc in yaml.safe_load_all(text):
                if doc:
                    doc.setdefault("__file__", path)  # dropped by .objects()
                    self.docs.append(doc)

    @property
    def notes(self) -> str:
        return next((t for p, t in self.files.items() if p.endswith("NOTES.txt")), "")

    def objects(self) -> Iterator[dict[str, Any]]:
        for d in self.docs:
            yield {k: v for k, v in d.items() if k != "__file__"}

    def kinds(self) -> list[str]:
        return [d["kind"] for d in self.docs]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects() if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        for o in self.all(kind):
            if o["metadata"]["name"] == name:
                return o
        raise KeyError(f"no {kind} {name}; have {[o['metadata']['name'] for o in self.all(kind)]}")

    def workloads(self) -> list[dict[str, Any]]:
        return [o for o in self.objects() if o["kind"] in ("Deployment", "DaemonSet")]

    def containers(self) -> Iterator[tuple[dict[str, Any], dict[str, Any], bool]]:
        """(workload, container, is_init) for every container of every workload."""
        for w in self.workloads():
            spec = w["spec"]["template"]["spec"]
            for c in spec.get("initContainers", []):
                yield w, c, True
            for c in spec["containers"]:
                yield w, c, False


def name(component: str) -> str:
    """Resource name of a component for release ``joulepool`` (fullname = release)."""
    return f"{RELEASE}-{component}"


#: the values sets the tests render; each is rendered once per session
VALUE_SETS: dict[str, tuple[dict[str, Any] | None, tuple[str, ...]]] = {
    "default": (None, ()),
    "kind": (yaml.safe_load((ROOT / "kind" / "values.yaml").read_text()), ()),
    "fake-gpus": ({"fakeGPUs": {"enabled": True}}, ()),
    "simulated": ({"nodeAgent": {"backend": "simulated"}}, ()),
    "monitor-only": ({"nodeAgent": {"clockControl": False}}, ()),
    "templated-crds": ({"crds": {"templated": True}}, ()),
    "prometheus": (None, (PROMETHEUS_API,)),
    "ignorable-all-pods": ({"scheduler": {"extender": {"ignorable": True, "gpuPodsOnly": False},
                                          "image": {"tag": "v1.30.4"}},
                            "operator": {"watchNamespace": "serving"},
                            "router": {"pdb": {"enabled": False}},
                            "nodeAgent": {"enabled": False}}, ()),
}


@cache
def rendered(key: str) -> Rendered:
    values, api_versions = VALUE_SETS[key]
    return Rendered(render_raw(values, api_versions))


def kind_gpu_nodes() -> list[tuple[str, str, str, int]]:
    """(node, site, product label, GPUs) of kind/cluster.yaml's workers, as the
    operator sees them (kind names workers <cluster>-worker, -worker2, ...)."""
    cluster = yaml.safe_load((ROOT / "kind" / "cluster.yaml").read_text())
    workers = [n for n in cluster["nodes"] if n["role"] == "worker"]
    return [(f"{cluster['name']}-worker{i + 1 if i else ''}",
             n["labels"]["topology.kubernetes.io/region"],
             n["labels"]["nvidia.com/gpu.product"], int(n["labels"]["nvidia.com/gpu.count"]))
            for i, n in enumerate(workers)]
