"""kind/: the cluster config, the values kind/up.sh installs, and the scripts."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import yaml
from chartlib import ROOT, kind_gpu_nodes

from joulepool.core.profiles import product_for_label

KIND = ROOT / "kind"
CLUSTER = yaml.safe_load((KIND / "cluster.yaml").read_text())
VALUES = yaml.safe_load((KIND / "values.yaml").read_text())
GPU_NODES = [n for n in CLUSTER["nodes"] if n["role"] == "worker"]


def test_kind_gpu_nodes() -> None:
    assert [n[0] for n in kind_gpu_nodes()] == [
        "joulepool-worker", "joulepool-worker2", "joulepool-worker3"]


def test_cluster_shape() -> None:
    assert CLUSTER["kind"] == "Cluster"
    assert CLUSTER["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    assert [n["role"] for n in CLUSTER["nodes"]] == ["control-plane", "worker", "worker", "worker"]
    assert "labels" not in CLUSTER["nodes"][0]


def test_gpu_nodes_are_h100_a100_l4_in_two_regions() -> None:
    products = []
    for n in GPU_NODES:
        labels = n["labels"]
        assert labels["nvidia.com/gpu.present"] == "true"
        product = product_for_label(labels["nvidia.com/gpu.product"])
        assert product is not None, labels["nvidia.com/gpu.product"]
        products.append(product.name)
    assert sorted(products) == ["A100", "H100", "L4"]
    regions = {n["labels"]["topology.kubernetes.io/region"] for n in GPU_NODES}
    assert len(regions) == 2


def test_every_gpu_node_gets_its_fake_gpus() -> None:
    """One device plugin per node label, advertising the node's gpu.count."""
    fake = VALUES["fakeGPUs"]
    assert fake["enabled"] is True
    by_label = {p["label"]: p for p in fake["products"]}
    for n in GPU_NODES:
        labels = n["labels"]
        entry = by_label[labels["nvidia.com/gpu.product"]]
        assert entry["count"] == int(labels["nvidia.com/gpu.count"])
        product = product_for_label(labels["nvidia.com/gpu.product"])
        assert product is not None and product.name == entry["product"]
    assert len(by_label) == len(GPU_NODES)


def test_kind_values() -> None:
    assert VALUES["nodeAgent"]["backend"] == "simulated"
    assert VALUES["image"] == {"repository": "joulepool", "tag": "dev", "pullPolicy": "Never"}


# --------------------------------------------------------------------------
# the scripts
# --------------------------------------------------------------------------
def _dry_run() -> list[str]:
    out = subprocess.run(["bash", str(KIND / "up.sh"), "--dry-run"], check=True,
                         capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PATH": "/usr/bin:/bin"})
    return out.stdout.strip().splitlines()


@pytest.mark.parametrize("script", ["up.sh", "down.sh"])
def test_scripts_are_executable_bash(script: str) -> None:
    path = KIND / script
    assert os.access(path, os.X_OK)
    assert path.read_text().startswith("#!/usr/bin/env bash\nset -euo pipefail") or (
        "set -euo pipefail" in path.read_text())
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)


def test_up_dry_run_needs_no_tools_and_runs_nothing() -> None:
    lines = _dry_run()
    tools = [line.split()[0] for line in lines]
    assert tools == ["kind", "docker", "kind", "helm", "kubectl", "kubectl", "kubectl"]


def test_up_does_what_the_issue_asks() -> None:
    lines = _dry_run()
    create, build, load, install, apply, planned, ready = lines
    assert "--config kind/cluster.yaml" in create and "--name joulepool" in create
    assert build == "docker build -t joulepool:dev ."
    assert load == "kind load docker-image joulepool:dev --name joulepool"
    assert "charts/joulepool" in install and "--values kind/values.yaml" in install
    assert "--wait" in install
    assert apply.endswith("apply -f examples/kind-chat-pool.yaml")
    # joulepool's short name: the bare word inferencepool is GIE's kind too
    assert " jpool/chat " in planned and "--for=condition=Planned" in planned
    assert " jpool/chat " in ready and "--for=condition=Ready" in ready
    # the image it builds is the one the values install
    image = f"{VALUES['image']['repository']}:{VALUES['image']['tag']}"
    assert image in build and image in load
    # every file it names exists
    for word in " ".join(lines).split():
        if "/" in word and not word.startswith(("-", "jpool/")) and "=" not in word:
            assert (ROOT / word).exists(), word


def readme_quick_start(text: str) -> list[str] | None:
    """Command lines of the code blocks in the "Try it on kind" section of ``text``."""
    m = re.search(r"^(#+) *Try it on kind[^\n]*\n", text, re.M | re.I)
    if not m:
        return None
    level = len(m.group(1))
    body = re.split("^#{1," + str(level) + "} ", text[m.end():], flags=re.M)[0]
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", body, re.S | re.M)
    return [line.strip() for b in blocks for line in b.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def up_sh_matches(lines: list[str]) -> bool:
    """``lines`` show `kind/up.sh` and, in order and together, every command it runs."""
    steps = _dry_run()
    runs = [lines[i:i + len(steps)] for i in range(len(lines) - len(steps) + 1)]
    return "kind/up.sh" in lines and steps in runs


def test_readme_quick_start_is_what_up_sh_does() -> None:
    """The README shows `kind/up.sh` and, in order, exactly the commands it runs."""
    readme = ROOT / "README.md"
    assert readme.exists(), "README.md is missing"
    lines = readme_quick_start(readme.read_text())
    assert lines is not None, "README.md lost its 'Try it on kind' section"
    assert up_sh_matches(lines), "README's kind quick start differs from `kind/up.sh --dry-run`"


def test_down_deletes_the_cluster_up_creates() -> None:
    text = (KIND / "down.sh").read_text()
    assert "CLUSTER=joulepool" in text and 'kind delete cluster --name "$CLUSTER"' in text


def test_kind_installs_the_router_token_and_the_network_policies() -> None:
    """kind gets the chart's defaults: the router requires the bearer token of the Secret
    the chart generates, and every component has its ingress NetworkPolicy."""
    import base64

    from chartlib import name, rendered

    assert "auth" not in VALUES.get("router", {}) and "networkPolicy" not in VALUES
    r = rendered("kind")
    secret = r.get("Secret", name("router-token"))
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert len(token) == 48 and token.isalnum()
    dep = r.get("Deployment", name("router"))
    spec = dep["spec"]["template"]["spec"]
    (router,) = [c for c in spec["containers"] if c["name"] == "router"]
    args = router["args"]
    assert args[args.index("--token-file") + 1] == "/etc/joulepool/router-token/token"
    assert any(v.get("secret", {}).get("secretName") == name("router-token")
               for v in spec["volumes"])
    policies = {p["metadata"]["name"] for p in r.all("NetworkPolicy")}
    components = {"router", "scheduler", "operator", "node-agent", "node-agent-reset",
                  "device-plugin"}
    assert policies == {name(c) for c in components}
