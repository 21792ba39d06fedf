"""Static sources: endpoints file, plan file, Nodes/Pods list file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from joulepool.kube import testing as T
from joulepool.kube.files import (
    FileError,
    load_endpoints_file,
    load_objects,
    load_plan_text,
)


def test_endpoints_file_yaml_and_validation(tmp_path: Path) -> None:
    p = tmp_path / "ep.yaml"
    p.write_text(
        "pools:\n  ns.chat:\n    model: llama-3.1-8b\n    tier: bulk\n    endpoints:\n"
        "      - {address: '10.0.0.1:8000', product: H100}\n"
        "      - {address: '[fd00::1]:9000', joulesPerToken: 0.3, tokensPerSecond: 500}\n"
    )
    doc = load_endpoints_file(p)
    pool = doc.pools["ns.chat"]
    assert pool.tier == "bulk" and pool.endpoints[1].address == "[fd00::1]:9000"
    for bad, needle in [
        ({"pools": {"x": {"endpoints": [{"address": "nohost"}]}}}, "host:port"),
        ({"pools": {"x": {"endpoints": [{"address": "a:70000"}]}}}, "host:port"),
        ({"pools": {"x": {"endpoints": [{"address": "a:1", "joulesPerToken": -1}]}}},
         "joulesPerToken"),
        ({"pools": {"x": {"tier": "gold"}}}, "tier"),
        ({"pool": {}}, "pool"),
        ({"pools": {"x": {"mix": {"requestsPerSecond": 1, "meanInputTokens": 500,
                                  "meanOutputTokens": 100}}}}, "mix needs slo"),
    ]:
        p.write_text(json.dumps(bad))
        with pytest.raises(FileError, match=needle):
            load_endpoints_file(p)


def test_plan_and_objects_files(tmp_path: Path) -> None:
    p = tmp_path / "plan.yaml"
    p.write_text("version: 3\npools: {}\n")
    assert json.loads(load_plan_text(p))["version"] == 3
    p.write_text("- 1\n")
    with pytest.raises(FileError, match="mapping"):
        load_plan_text(p)
    with pytest.raises(FileError, match="cannot read"):
        load_plan_text(tmp_path / "missing")
    objs = tmp_path / "objs.json"
    objs.write_text(json.dumps({"kind": "List", "items": [T.node("n"), T.pod("p")]}))
    nodes, pods = load_objects(objs)
    assert len(nodes) == 1 and len(pods) == 1
    objs.write_text(json.dumps([{"kind": "Service"}]))
    with pytest.raises(FileError, match="Node or Pod"):
        load_objects(objs)
